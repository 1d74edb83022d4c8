//! The chart's operator as containers on the stack's real node: the operator Deployment is
//! moved there (nodeSelector, toleration, the image `make images` built and `node.sh` imported)
//! for the test and moved back to the kwok nodes afterwards. What is real there and nowhere
//! else: the securityContext (non-root, read-only root), the kubelet's probes, and SIGTERM on
//! pod deletion. Figures are printed; the bounds the issue sets are asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use stratum_e2e::harness::*;
use stratum_e2e::real_node::*;

const OPERATOR_IMAGE: &str = "localhost/stratum/operator:dev";
const LEASE: &str = "stratum-operator-leader";

fn deployment_name() -> String {
    format!(
        "{}-operator",
        std::env::var("STRATUM_E2E_RELEASE").unwrap_or_else(|_| "stratum".into())
    )
}

/// The operator pods (not terminating) with their node, IP and container ID.
async fn operator_pods(client: &kube::Client) -> Vec<(String, String, Option<String>, String)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    api.list(&ListParams::default().labels("app.kubernetes.io/name=stratum-operator"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status?;
            let ready = status
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())?;
            let id = status
                .container_statuses
                .as_ref()
                .and_then(|c| c.first())
                .and_then(|c| c.container_id.clone())
                .map(|id| id.trim_start_matches("containerd://").to_string());
            Some((p.metadata.name?, p.spec?.node_name?, id, status.pod_ip?))
        })
        .collect()
}

async fn lease_holder(client: &kube::Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    leases.get(LEASE).await.ok()?.spec?.holder_identity
}

/// Moves the operator Deployment onto the real node; moves it back when dropped.
struct OperatorOnRealNode {
    original: serde_json::Value,
}

impl OperatorOnRealNode {
    async fn new(client: &kube::Client) -> Self {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
        let current = deployments.get(&deployment_name()).await.unwrap();
        let pod = current.spec.unwrap().template.spec.unwrap();
        let image = pod.containers[0].image.clone();
        let pull = pod.containers[0].image_pull_policy.clone();
        // Strategic merge merges maps: the real node's key must be removed by name.
        let mut selector = serde_json::json!(pod.node_selector.clone().unwrap_or_default());
        selector[REAL_NODE_TAINT] = serde_json::Value::Null;
        let original = serde_json::json!({"spec": {"template": {"spec": {
            "nodeSelector": selector,
            "tolerations": pod.tolerations,
            "containers": [{"name": pod.containers[0].name, "image": image, "imagePullPolicy": pull}]
        }}}});
        let moved = serde_json::json!({"spec": {"template": {"spec": {
            "nodeSelector": {REAL_NODE_TAINT: "true"},
            "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": pod.containers[0].name, "image": OPERATOR_IMAGE, "imagePullPolicy": "Never"}]
        }}}});
        deployments
            .patch(
                &deployment_name(),
                &PatchParams::default(),
                &Patch::Strategic(moved),
            )
            .await
            .unwrap();
        OperatorOnRealNode { original }
    }
}

impl Drop for OperatorOnRealNode {
    fn drop(&mut self) {
        // Drop cannot await, and the test's client lives on its (now blocked) runtime: kubectl
        // puts the Deployment back, also when the test failed.
        let kubectl = std::env::var("STRATUM_E2E_BIN")
            .map(|b| format!("{b}/kubectl"))
            .unwrap_or_else(|_| "kubectl".into());
        let status = std::process::Command::new(kubectl)
            .args([
                "-n",
                AGENT_NAMESPACE,
                "patch",
                "deployment",
                &deployment_name(),
            ])
            .args(["--type", "strategic", "-p", &self.original.to_string()])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not move the operator Deployment back: {status:?}");
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the images of `make images`: make e2e"]
async fn the_operator_runs_as_non_root_containers_on_the_real_node_and_hands_over_its_lease_on_deletion()
 {
    let client = client().await;
    let images = ctr(&["images", "ls", "-q"]);
    assert!(
        String::from_utf8_lossy(&images.stdout)
            .lines()
            .any(|l| l == OPERATOR_IMAGE),
        "{OPERATOR_IMAGE} is not on the real node: run `make images` before `make e2e`"
    );
    let replicas = {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
        let d = deployments.get(&deployment_name()).await.unwrap();
        d.spec.unwrap().replicas.unwrap_or(1) as usize
    };
    assert!(replicas >= 2, "the chart runs a standby replica");
    let moved = OperatorOnRealNode::new(&client).await;
    let node = real_node();
    let (pods, took) = wait_for(
        Duration::from_secs(120),
        "every operator replica Ready on the real node, one of them leading",
        || async {
            let pods = operator_pods(&client).await;
            let all_here = pods.len() == replicas && pods.iter().all(|p| p.1 == node);
            let holder = lease_holder(&client).await?;
            (all_here && pods.iter().any(|p| p.0 == holder)).then_some(pods)
        },
    )
    .await;
    eprintln!(
        "{replicas} operator containers Ready on {node}, one leading, {:.1} s after the move",
        took.as_secs_f64()
    );

    // Non-root, read-only root filesystem: as the kernel sees the container's process.
    let mut pids = Vec::new();
    for (name, _, id, _) in &pods {
        let id = id.as_deref().unwrap();
        let pid = container_pid(id).unwrap_or_else(|| panic!("no task for {name}'s container"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid: Vec<u32> = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            uid.iter().all(|u| *u != 0),
            "{name} runs as root: Uid {uid:?}"
        );
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .unwrap_or_else(|| panic!("no root mount of {name}"));
        let options = root.split_whitespace().nth(5).unwrap();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "{name}'s root is writable: {root}"
        );
        let caps = capabilities(pid);
        assert!(
            caps.iter()
                .any(|(set, value)| set == "CapEff" && *value == 0),
            "{name} has effective capabilities: {caps:?}"
        );
        pids.push((name.clone(), pid, uid[0]));
    }

    // Delete the leader: SIGTERM ends its process; it releases the Lease; the standby leads.
    let leader = lease_holder(&client).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let lease_duration = Duration::from_secs(
        leases
            .get(LEASE)
            .await
            .unwrap()
            .spec
            .unwrap()
            .lease_duration_seconds
            .unwrap_or(15) as u64,
    );
    let (_, leader_pid, _) = pids.iter().find(|p| p.0 == leader).unwrap().clone();
    let standby: Vec<String> = pids
        .iter()
        .filter(|p| p.0 != leader)
        .map(|p| p.0.clone())
        .collect();
    let api: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let deleted = Instant::now();
    api.delete(&leader, &DeleteParams::default()).await.unwrap();
    // Three events at once, polled every 50 ms for sub-second figures: the process exits, the
    // Lease is released (seen empty, if the next holder is not quicker), another pod takes it.
    let exited = Cell::new(None);
    let released = Cell::new(None);
    let taken = RefCell::new(None);
    let ((new_leader, taken_after), _) = poll_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the deleted leader's exit and another replica taking the Lease",
        || async {
            if exited.get().is_none() && !process_alive(leader_pid) {
                exited.set(Some(deleted.elapsed()));
            }
            let holder = lease_holder(&client).await.unwrap_or_default();
            if holder.is_empty() && released.get().is_none() {
                released.set(Some(deleted.elapsed()));
            }
            // The standby, or the Deployment's replacement pod: whichever campaigns first after
            // the release.
            if !holder.is_empty() && holder != leader && taken.borrow().is_none() {
                *taken.borrow_mut() = Some((holder, deleted.elapsed()));
            }
            exited.get().and(taken.borrow().clone())
        },
    )
    .await;
    let (exited, released) = (exited.get().unwrap(), released.get());
    let by_standby = standby.contains(&new_leader);
    eprintln!(
        "leader {leader} deleted: process exited after {:.2} s, Lease released after {}, \
         {new_leader} ({}) leads after {:.2} s",
        exited.as_secs_f64(),
        released.map_or("(not seen empty)".into(), |r| format!(
            "{:.2} s",
            r.as_secs_f64()
        )),
        if by_standby {
            "the standby"
        } else {
            "the replacement pod"
        },
        taken_after.as_secs_f64()
    );
    assert!(
        exited < Duration::from_secs(2),
        "the operator took {exited:?} to exit on SIGTERM"
    );
    assert!(
        taken_after < Duration::from_secs(5),
        "the standby took {taken_after:?} to lead"
    );
    // Taken before the lease could have run out: the old leader released it.
    assert!(
        released.is_some() || taken_after < lease_duration,
        "the Lease was not released: taken after {taken_after:?}, duration {lease_duration:?}"
    );

    // Back to the kwok nodes, where the rest of the suite expects the operator.
    drop(moved);
    let (_, back_after) = wait_for(
        Duration::from_secs(60),
        "every operator replica Ready on the kwok nodes again",
        || async {
            let pods = operator_pods(&client).await;
            (pods.len() == replicas && pods.iter().all(|p| p.1 != node)).then_some(())
        },
    )
    .await;
    eprintln!(
        "operator back on the kwok nodes after {:.1} s",
        back_after.as_secs_f64()
    );
}
