//! The agents' safe defaults on a real API server, scheduler and DaemonSet controller: the
//! shared TimeService sets no tolerations, so a node tainted `NoSchedule` and a control-plane
//! node get agents; a Windows node gets none; a node whose agent cannot be scheduled is counted
//! and named in the TimeService's status. The nodes are kwok's (it marks their pods ready), and
//! are deleted again however the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use stratum_api::TimeService;
use stratum_e2e::harness::*;

const TAINTED: &str = "e2e-defaults-tainted";
const CONTROL_PLANE: &str = "e2e-defaults-control-plane";
const WINDOWS: &str = "e2e-defaults-windows";
/// Allocatable far below the agent's default requests: its pod stays Pending.
const FULL: &str = "e2e-defaults-full";
const TEST_NODES: [&str; 4] = [TAINTED, CONTROL_PLANE, WINDOWS, FULL];

/// A kwok node (kwok keeps the allocatable it is created with) with `labels` and `taints`.
fn kwok_node(
    name: &str,
    os: &str,
    taints: serde_json::Value,
    allocatable: serde_json::Value,
) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/os": os, "kubernetes.io/hostname": name,
                       "stratum.e2e/defaults-test": "true"}
        },
        "spec": {"taints": taints},
        "status": {"allocatable": allocatable, "capacity": allocatable}
    }))
    .unwrap()
}

/// Deletes the test's nodes when dropped, a panic included: a node left without an agent would
/// keep the shared TimeService from Ready for every later test. The test's runtime is the one
/// thread dropping this, so the deletes run on a thread with a runtime and client of its own.
struct TestNodes;

impl TestNodes {
    async fn delete_all() {
        let Ok(client) = kube::Client::try_default().await else {
            return;
        };
        let nodes: Api<Node> = Api::all(client);
        for name in TEST_NODES {
            let _ = nodes.delete(name, &DeleteParams::default()).await;
        }
    }
}

impl Drop for TestNodes {
    fn drop(&mut self) {
        let _ = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            runtime.block_on(TestNodes::delete_all());
        })
        .join();
    }
}

/// Agent pods of the shared TimeService by node (`None` for one not scheduled yet), with
/// their Ready condition.
async fn agent_pods(pods: &Api<Pod>) -> Vec<(Option<String>, bool)> {
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/name=stratum-agent,stratum.io/time-service={SHARED_TIME_SERVICE}"
        )))
        .await
        .unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (p.spec.as_ref().and_then(|s| s.node_name.clone()), ready)
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn tainted_and_control_plane_nodes_get_agents_windows_none_and_status_names_a_node_without_one()
 {
    let client = client().await;
    ensure_shared_time_service(&client).await;

    // The DaemonSet the operator wrote for a TimeService with no tolerations and no resources.
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let pod = ds
        .get(&format!("{SHARED_TIME_SERVICE}-agent"))
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let tolerations = serde_json::to_value(&pod.tolerations).unwrap();
    assert_eq!(tolerations, serde_json::json!([{"operator": "Exists"}]));
    assert_eq!(pod.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let resources = serde_json::to_value(&pod.containers[0].resources).unwrap();
    assert_eq!(
        resources,
        serde_json::json!({"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "384Mi"}})
    );

    let guard = TestNodes;
    TestNodes::delete_all().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let roomy = serde_json::json!({"cpu": "8", "memory": "16Gi", "pods": "110"});
    for node in [
        kwok_node(
            TAINTED,
            "linux",
            serde_json::json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
            roomy.clone(),
        ),
        kwok_node(
            CONTROL_PLANE,
            "linux",
            serde_json::json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]),
            roomy.clone(),
        ),
        kwok_node(WINDOWS, "windows", serde_json::json!([]), roomy.clone()),
        kwok_node(
            FULL,
            "linux",
            serde_json::json!([]),
            serde_json::json!({"cpu": "1m", "memory": "1Mi", "pods": "110"}),
        ),
    ] {
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let (agents, took) = wait_for(
        Duration::from_secs(90),
        "ready agents on the tainted and control-plane nodes",
        || async {
            let agents = agent_pods(&pods).await;
            let ready_on = |node: &str| {
                agents
                    .iter()
                    .any(|(n, ready)| n.as_deref() == Some(node) && *ready)
            };
            (ready_on(TAINTED) && ready_on(CONTROL_PLANE)).then_some(agents)
        },
    )
    .await;
    println!("agents ready on the tainted and control-plane nodes after {took:?}");
    assert!(
        agents.iter().all(|(n, _)| n.as_deref() != Some(WINDOWS)),
        "an agent pod on the Windows node: {agents:?}"
    );
    assert!(
        agents.iter().all(|(n, _)| n.as_deref() != Some(FULL)),
        "an agent pod was bound to the full node: {agents:?}"
    );

    let ts: Api<TimeService> = Api::all(client.clone());
    let (ready, took) = wait_for(
        Duration::from_secs(60),
        "the TimeService to count and name the node without an agent",
        || async {
            let status = ts.get(SHARED_TIME_SERVICE).await.ok()?.status?;
            let ready = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?
                .clone();
            // The full node by name: a status written before the tainted node's agent was
            // counted can name that node instead, for a moment.
            (status.nodes.without_agent == 1
                && ready.reason == "NodesWithoutAgent"
                && ready.message.ends_with(&format!(": {FULL}")))
            .then_some(ready)
        },
    )
    .await;
    println!("status named the node after {took:?}: {}", ready.message);
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.ends_with(&format!(": {FULL}")),
        "{}",
        ready.message
    );
    for elsewhere in [TAINTED, CONTROL_PLANE, WINDOWS] {
        assert!(!ready.message.contains(elsewhere), "{}", ready.message);
    }

    // Gone again: the shared TimeService is Ready with no node left out.
    drop(guard);
    let ts = ensure_shared_time_service(&client).await;
    assert_eq!(ts.status.unwrap().nodes.without_agent, 0);
}
