//! End-to-end tests on a real Kubernetes API server (`make e2e` starts it with `e2e/stack.sh`
//! and runs these with `--ignored --test-threads=1`). Each waits on conditions, never sleeps
//! blindly; figures (latencies) are printed, not asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use stratum_api::{NodeClock, TenantTimePolicy, TimeService};
use stratum_e2e::harness::*;

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn invalid_objects_are_rejected_by_the_api_server_with_the_cel_messages() {
    let client = client().await;
    let ts: Api<TimeService> = Api::all(client.clone());
    let bad = serde_json::json!({
        "apiVersion": "stratum.io/v1alpha1", "kind": "TimeService", "metadata": {"name": "e2e-invalid"},
        "spec": {"upstreams": [{"host": "ntp.example", "minPoll": 9, "maxPoll": 6}],
                 "serving": {"tenantPorts": {"start": 20000, "end": 10000}}}
    });
    let err = ts
        .create(&Default::default(), &serde_json::from_value(bad).unwrap())
        .await
        .expect_err("the API server accepted an invalid TimeService");
    let text = err.to_string();
    assert!(
        text.contains("minPoll must be less than or equal to maxPoll"),
        "{text}"
    );
    assert!(
        text.contains("tenantPorts.start must be less than or equal to tenantPorts.end"),
        "{text}"
    );

    let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), "default");
    let bad = serde_json::json!({
        "apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy", "metadata": {"name": "e2e-invalid"},
        "spec": {"allowedClients": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["192.168.0.0/24"]}}],
                 "timezone": ""}
    });
    let err = ttp
        .create(&Default::default(), &serde_json::from_value(bad).unwrap())
        .await
        .expect_err("the API server accepted an invalid TenantTimePolicy");
    let text = err.to_string();
    assert!(
        text.contains("every except entry must be a CIDR strictly inside cidr"),
        "{text}"
    );
    assert!(
        text.contains("timezone must not be empty when set"),
        "{text}"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn a_time_service_yields_agents_on_every_node_that_report_and_become_ready() {
    let client = client().await;
    let ts = ensure_shared_time_service(&client).await;
    let status = ts.status.unwrap();
    let nodes = status.nodes;
    // Three kwok nodes and the real node.
    let count = i32::try_from(agent_nodes().len()).unwrap();
    assert_eq!(nodes.desired, count);
    assert_eq!(nodes.ready, count);
    assert_eq!(nodes.synchronized, count);

    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let ds = ds
        .get(&format!("{SHARED_TIME_SERVICE}-agent"))
        .await
        .unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.add.as_deref(), Some(&["SYS_TIME".to_string()][..]));
    assert_ne!(
        c.security_context.as_ref().unwrap().privileged,
        Some(true),
        "agents are never privileged"
    );
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );

    let clocks: Api<NodeClock> = Api::all(client.clone());
    let list = clocks.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.items.iter().map(name_of).collect::<Vec<_>>(),
        agent_nodes(),
        "one NodeClock per node"
    );
    for nc in &list.items {
        let s = nc.status.as_ref().unwrap();
        assert!(s.synchronized, "{} not synchronized", name_of(nc));
        assert!(
            s.offset_nanos.abs() < 5_000_000,
            "{} is {} off",
            name_of(nc),
            s.offset.clone().unwrap_or_default()
        );
        let liar = s
            .sources
            .iter()
            .find(|src| src.address.starts_with(&falseticker()))
            .unwrap();
        assert!(
            !matches!(
                liar.state,
                stratum_api::node_clock::SourceState::Selected
                    | stratum_api::node_clock::SourceState::Combined
            ),
            "{} uses the falseticker",
            name_of(nc)
        );
    }
    // Once it has answered a few times, every agent marks the +30 s server a falseticker.
    wait_for(
        Duration::from_secs(90),
        "every agent to mark the falseticker",
        || async {
            let list = clocks.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .all(|nc| {
                    nc.status.as_ref().is_some_and(|s| {
                        s.sources.iter().any(|src| {
                            src.address.starts_with(&falseticker())
                                && src.state == stratum_api::node_clock::SourceState::Falseticker
                        })
                    })
                })
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn tenants_get_services_endpoint_slices_and_time_config_in_their_namespace() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    namespace(
        &client,
        "e2e-team-a",
        serde_json::json!({"tenant": "e2e-team-a"}),
    )
    .await;
    namespace(
        &client,
        "e2e-team-b",
        serde_json::json!({"tenant": "e2e-team-b"}),
    )
    .await;
    apply_tenant(
        &client,
        "e2e-team-a",
        serde_json::json!({"timezone": "Europe/Berlin"}),
    )
    .await;
    apply_tenant(
        &client,
        "e2e-team-b",
        serde_json::json!({
            "allowedClients": [{"namespaceSelector": {"matchLabels": {"tenant": "e2e-team-b"}}}],
            "rateLimit": {"kissOfDeath": true}
        }),
    )
    .await;
    for ns in ["e2e-team-a", "e2e-team-b"] {
        let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), ns);
        let (port, _) = wait_for(
            Duration::from_secs(60),
            &format!("{ns} tenant Ready with an endpoint per node"),
            || async {
                let t = ttp.get("ntp").await.ok()?;
                let s = t.status?;
                let ready = s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                (ready && usize::try_from(s.ready_endpoints).ok()? == agent_nodes().len())
                    .then_some(s.port?)
            },
        )
        .await;
        let svc: Api<Service> = Api::namespaced(client.clone(), ns);
        let svc = svc.get("ntp").await.unwrap();
        let spec = svc.spec.unwrap();
        assert!(spec.selector.is_none(), "selector-less Service");
        assert_eq!(spec.ports.unwrap()[0].port, 123);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        let slices = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=ntp"))
            .await
            .unwrap();
        let v4 = slices
            .items
            .iter()
            .find(|s| s.address_type == "IPv4")
            .expect("an IPv4 slice");
        assert_eq!(v4.ports.as_ref().unwrap()[0].port, Some(port));
        let endpoints = v4.endpoints.clone().unwrap_or_default();
        assert_eq!(endpoints.len(), agent_nodes().len());
        assert!(
            endpoints.iter().all(|e| e.node_name.is_some()
                && e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        );
    }
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), "e2e-team-a");
    let data = cm.get("time-config").await.unwrap().data.unwrap();
    assert_eq!(data.get("TZ").map(String::as_str), Some("Europe/Berlin"));
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn adding_an_upstream_reaches_every_agent_without_restart() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let ts: Api<TimeService> = Api::all(client.clone());
    // A second address of an honest server is a new upstream for every agent.
    apply(&ts, shared_time_service(&["10.77.1.3"])).await;
    let extra = "10.77.1.2";
    apply(&ts, {
        let mut spec = shared_time_service(&[]);
        spec["spec"]["upstreams"].as_array_mut().unwrap().push(serde_json::json!({"host": extra, "port": 123, "minPoll": 5, "maxPoll": 6, "kind": "Server"}));
        spec
    })
    .await;
    // The revision with five upstreams, as it is now: other changes (e.g. tenant allow lists
    // of earlier tests settling) may write newer revisions, which still carry the upstream.
    let revision_with_upstream = || async {
        let c = cm
            .get(&format!("{SHARED_TIME_SERVICE}-agent-config"))
            .await
            .ok()?;
        let cfg = stratum_api::AgentConfig::from_config_map(&c).ok()?;
        (cfg.upstreams.len() == 5).then(|| cfg.revision.clone())
    };
    wait_for(
        Duration::from_secs(30),
        "the agent config to carry the new upstream",
        revision_with_upstream,
    )
    .await;
    let clocks: Api<NodeClock> = Api::all(client.clone());
    let (_, took) = wait_for(
        Duration::from_secs(60),
        "every agent to run the current revision, with the new upstream",
        || async {
            let revision = revision_with_upstream().await?;
            let list = clocks.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .all(|nc| {
                    nc.status
                        .as_ref()
                        .and_then(|s| s.config_revision.as_deref())
                        == Some(revision.as_str())
                })
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "new upstream reached every agent {:.1} s after the config changed",
        took.as_secs_f64()
    );

    // An NTS upstream whose CA bundle holds no certificate is refused on the TimeService:
    // the agents keep the config they have rather than one with no usable trust anchors.
    apply(&ts, {
        let mut spec = shared_time_service(&[]);
        spec["spec"]["upstreams"][0]["nts"] = true.into();
        spec["spec"]["nts"] = serde_json::json!({"caBundle": "not a certificate"});
        spec
    })
    .await;
    let (why, _) = wait_for(
        Duration::from_secs(30),
        "Degraded=True, InvalidSpec, naming the CA bundle",
        || async {
            let t = ts.get(SHARED_TIME_SERVICE).await.ok()?;
            t.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "InvalidSpec")
                .map(|c| c.message)
                .filter(|m| m.contains("nts.caBundle"))
        },
    )
    .await;
    eprintln!("NTS upstream with an unusable CA bundle refused: {why}");
    let c = cm
        .get(&format!("{SHARED_TIME_SERVICE}-agent-config"))
        .await
        .unwrap();
    let kept = stratum_api::AgentConfig::from_config_map(&c).unwrap();
    assert!(
        kept.upstreams.iter().all(|u| !u.nts),
        "an nts upstream reached the agents' config"
    );
    assert_eq!(
        kept.upstreams.len(),
        5,
        "the refused spec (four upstreams) replaced the last good config (five)"
    );
    // Restore the shared spec.
    apply(&ts, shared_time_service(&[])).await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn an_overlapping_second_time_service_gets_conflict_and_no_daemon_set() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ts: Api<TimeService> = Api::all(client.clone());
    let mut second = shared_time_service(&[]);
    second["metadata"]["name"] = "e2e-second".into();
    apply(&ts, second).await;
    wait_for(
        Duration::from_secs(30),
        "Conflict=True on the younger TimeService",
        || async {
            let t = ts.get("e2e-second").await.ok()?;
            t.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Conflict" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    assert!(
        ds.get_opt("e2e-second-agent").await.unwrap().is_none(),
        "a conflicting TimeService got a DaemonSet"
    );
    let first = ts.get(SHARED_TIME_SERVICE).await.unwrap();
    assert!(
        first
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == "Conflict" && c.status == "False")
    );
    delete(&ts, "e2e-second").await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn deleting_a_tenant_removes_its_service_slices_and_config_entry() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    namespace(&client, "e2e-team-gone", serde_json::json!({})).await;
    apply_tenant(&client, "e2e-team-gone", serde_json::json!({})).await;
    let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), "e2e-team-gone");
    wait_for(Duration::from_secs(60), "the tenant Ready", || async {
        ttp.get("ntp").await.ok()?.status?.port.map(|_| ())
    })
    .await;
    let svc: Api<Service> = Api::namespaced(client.clone(), "e2e-team-gone");
    assert!(svc.get_opt("ntp").await.unwrap().is_some());
    delete(&ttp, "ntp").await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "e2e-team-gone");
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    wait_for(
        Duration::from_secs(60),
        "Service, EndpointSlices and config entry gone",
        || async {
            let no_svc = svc.get_opt("ntp").await.ok()?.is_none();
            let no_slices = slices
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty();
            let cfg = stratum_api::AgentConfig::from_config_map(
                &cm.get(&format!("{SHARED_TIME_SERVICE}-agent-config"))
                    .await
                    .ok()?,
            )
            .ok()?;
            let gone = !cfg
                .serving
                .tenants
                .iter()
                .any(|t| t.id == "e2e-team-gone/ntp");
            (no_svc && no_slices && gone).then_some(())
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn tenant_clients_get_time_on_their_port_and_are_refused_on_the_other_tenants() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    namespace(&client, "e2e-serve-a", serde_json::json!({})).await;
    namespace(&client, "e2e-serve-b", serde_json::json!({})).await;
    apply_tenant(
        &client,
        "e2e-serve-a",
        serde_json::json!({"rateLimit": {"kissOfDeath": true}}),
    )
    .await;
    apply_tenant(&client, "e2e-serve-b", serde_json::json!({})).await;
    let ip_a = tenant_pod(&client, "e2e-serve-a", "client", "kwok-node-0").await;
    let ip_b = tenant_pod(&client, "e2e-serve-b", "client", "kwok-node-1").await;
    let port_a = tenant_port(&client, "e2e-serve-a").await;
    let port_b = tenant_port(&client, "e2e-serve-b").await;
    let _ns_a = PodNetns::new("e2e-t-serve-a", &ip_a);
    let _ns_b = PodNetns::new("e2e-t-serve-b", &ip_b);
    let agent: std::net::IpAddr = node_ip(&client, "kwok-node-0").await.parse().unwrap();

    // A's client is served by the agent on its node, once the allow list has propagated.
    let (answer, took) = wait_for(
        Duration::from_secs(30),
        "tenant A's client served on A's port",
        || async {
            query_from_netns("e2e-t-serve-a", (agent, port_a).into())
                .filter(|a| a["kissCode"].is_null())
        },
    )
    .await;
    eprintln!(
        "tenant A served {:.2} s after its pod got an address",
        took.as_secs_f64()
    );
    assert_eq!(answer["leap"], "none");
    assert!(answer["stratum"].as_u64().unwrap() >= 2 && answer["stratum"].as_u64().unwrap() < 16);
    assert!(
        answer["offsetSeconds"].as_f64().unwrap().abs() < 0.01,
        "valid time: {answer}"
    );

    // B's client on A's port: KoD DENY (A enables KoD); A's client on B's port: silence.
    let b_on_a = query_from_netns("e2e-t-serve-b", (agent, port_a).into());
    assert_eq!(
        b_on_a.as_ref().map(|a| a["kissCode"].clone()),
        Some("DENY".into()),
        "{b_on_a:?}"
    );
    wait_for(
        Duration::from_secs(30),
        "tenant B's client served on B's port",
        || async {
            query_from_netns("e2e-t-serve-b", (agent, port_b).into())
                .filter(|a| a["kissCode"].is_null())
        },
    )
    .await;
    assert!(
        query_from_netns("e2e-t-serve-a", (agent, port_b).into()).is_none(),
        "A's client answered on B's port"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn a_new_pod_in_the_tenant_namespace_is_allowed_within_two_seconds() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    namespace(&client, "e2e-churn", serde_json::json!({})).await;
    apply_tenant(&client, "e2e-churn", serde_json::json!({})).await;
    let port = tenant_port(&client, "e2e-churn").await;
    let agent: std::net::IpAddr = node_ip(&client, "kwok-node-2").await.parse().unwrap();
    let ip = tenant_pod(&client, "e2e-churn", "newcomer", "kwok-node-2").await;
    let _ns = PodNetns::new("e2e-t-churn", &ip);
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(30), "the new pod served", || async {
        query_from_netns("e2e-t-churn", (agent, port).into()).filter(|a| a["kissCode"].is_null())
    })
    .await;
    let latency = started.elapsed();
    eprintln!(
        "new pod allowed {:.2} s after it got its address (goal: 2 s)",
        latency.as_secs_f64()
    );
    assert!(
        latency < Duration::from_secs(10),
        "allow-list propagation took {latency:?}"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn restarting_the_operator_converges_to_the_same_state_without_duplicates() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    namespace(&client, "e2e-restart", serde_json::json!({})).await;
    apply_tenant(&client, "e2e-restart", serde_json::json!({})).await;
    let port_before = tenant_port(&client, "e2e-restart").await;
    // The operator runs from the chart's Deployment: kill the leader replica's process, as
    // a crash would. The kubelet stand-in restarts it; the standby may take the Lease first.
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let leader = leases
        .get("stratum-operator-leader")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a leader");
    let pid = operator_pid(&leader).expect("the leader's process runs");
    let killed_at = std::time::Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // Meanwhile change something, which the new leader must pick up.
    apply_tenant(
        &client,
        "e2e-restart",
        serde_json::json!({"timezone": "Asia/Tokyo"}),
    )
    .await;
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), "e2e-restart");
    wait_for(
        Duration::from_secs(90),
        "the restarted operator to apply the change",
        || async {
            (cm.get("time-config").await.ok()?.data?.get("TZ")? == "Asia/Tokyo").then_some(())
        },
    )
    .await;
    eprintln!(
        "change applied {:.1} s after the leader was killed",
        killed_at.elapsed().as_secs_f64()
    );
    let (restarted, took) = wait_for(
        Duration::from_secs(30),
        "the kubelet stand-in to restart the killed operator",
        || async { operator_pid(&leader).filter(|p| *p != pid) },
    )
    .await;
    eprintln!(
        "killed operator pid {pid} running again as pid {restarted} ({:.1} s after the change)",
        took.as_secs_f64()
    );
    assert_eq!(
        tenant_port(&client, "e2e-restart").await,
        port_before,
        "port is stable across restarts"
    );
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    assert_eq!(
        ds.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "one DaemonSet"
    );
    let svc: Api<Service> = Api::namespaced(client.clone(), "e2e-restart");
    assert_eq!(
        svc.list(&ListParams::default()).await.unwrap().items.len(),
        1,
        "one Service"
    );
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "e2e-restart");
    assert_eq!(
        slices
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2,
        "one IPv4 and one IPv6 slice"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn an_agent_token_may_write_only_its_own_nodes_node_clock() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    // The kubelet stand-in gave each agent a kubeconfig with its pod-bound token.
    let stack =
        std::env::var("STRATUM_E2E_STACK").expect("STRATUM_E2E_STACK from e2e/stack.sh env");
    let kubeconfig =
        kube::config::Kubeconfig::read_from(format!("{stack}/agents/kwok-node-0/kubeconfig"))
            .unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    // The kubeconfig points at the API server's address on the test bridge, which the host
    // reaches as well as the namespaces do.
    let agent = kube::Client::try_from(config).unwrap();
    let clocks: Api<NodeClock> = Api::all(agent);
    let params = kube::api::PatchParams::apply("stratum-agent").force();
    let body = |node: &str| {
        kube::api::Patch::Apply(serde_json::json!({
            "apiVersion": "stratum.io/v1alpha1", "kind": "NodeClock",
            "metadata": {"name": node}, "spec": {"timeService": SHARED_TIME_SERVICE}
        }))
    };
    clocks
        .patch("kwok-node-0", &params, &body("kwok-node-0"))
        .await
        .expect("an agent may write its own NodeClock");
    let err = clocks
        .patch("kwok-node-1", &params, &body("kwok-node-1"))
        .await
        .expect_err("an agent wrote another node's NodeClock");
    let text = err.to_string();
    assert!(
        text.contains("may only write NodeClock kwok-node-0"),
        "{text}"
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn an_agent_that_loses_every_upstream_stops_being_ready_in_its_tenants_endpoint_slices() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ns = "e2e-holdover";
    namespace(&client, ns, serde_json::json!({})).await;
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let all_ready = |nodes: &[(String, bool)]| {
        nodes.len() == agent_nodes().len() && nodes.iter().all(|(_, r)| *r)
    };
    wait_for(
        Duration::from_secs(60),
        "a ready endpoint per node",
        || async {
            endpoint_readiness(&client, ns)
                .await
                .filter(|e| all_ready(e))
        },
    )
    .await;

    let isolated = "kwok-node-2";
    let clocks: Api<NodeClock> = Api::all(client.clone());
    let cut = cut_upstreams(isolated);
    // Holdover is 20 s in the shared spec, raised by the agent to 4 maxPoll intervals (32 s).
    let (_, unsynchronized_after) = wait_for(
        Duration::from_secs(120),
        "the isolated agent's NodeClock to turn unsynchronized",
        || async {
            let status = clocks.get(isolated).await.ok()?.status?;
            (!status.synchronized).then_some(status)
        },
    )
    .await;
    let status = clocks.get(isolated).await.unwrap().status.unwrap();
    assert_eq!(status.stratum, 16, "no localStratum set: stratum 16");
    let (endpoints, unready_after) = wait_for(
        Duration::from_secs(30),
        "the isolated agent's endpoint to turn not ready",
        || async {
            endpoint_readiness(&client, ns)
                .await
                .filter(|e| e.iter().any(|(n, r)| n == isolated && !*r))
        },
    )
    .await;
    // The other agents still reach their upstreams and stay ready.
    let want: Vec<(String, bool)> = agent_nodes()
        .into_iter()
        .map(|n| {
            let ready = n != isolated;
            (n, ready)
        })
        .collect();
    assert_eq!(endpoints, want);
    let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), ns);
    wait_for(
        Duration::from_secs(30),
        "every endpoint but one ready",
        || async {
            let want = i32::try_from(agent_nodes().len()).ok()? - 1;
            (ttp.get("ntp").await.ok()?.status?.ready_endpoints == want).then_some(())
        },
    )
    .await;
    eprintln!(
        "upstreams cut: NodeClock unsynchronized after {:.1} s, endpoint not ready {:.1} s later",
        unsynchronized_after.as_secs_f64(),
        unready_after.as_secs_f64()
    );

    drop(cut);
    let (_, back_after) = wait_for(
        Duration::from_secs(120),
        "the agent to resynchronize and its endpoint to be ready again",
        || async {
            endpoint_readiness(&client, ns)
                .await
                .filter(|e| all_ready(e))
        },
    )
    .await;
    eprintln!(
        "upstreams restored: endpoint ready again after {:.1} s",
        back_after.as_secs_f64()
    );
    delete(&ttp, "ntp").await;
}
