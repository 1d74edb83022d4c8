//! Tenants reaching their Service by name, on the stack's real node (`e2e/scripts/node.sh`):
//! real pods that a kubelet started through containerd, cluster DNS from CoreDNS, ClusterIPs
//! routed by kube-proxy (nftables mode). The agents answering are those of the shared
//! TimeService: a container on the real node itself, processes of the stand-in on the kwok
//! nodes. A packet from a pod crosses kube-proxy's DNAT to one of them (on the real node or
//! across the bridge into another node's namespace) and its reply comes back through the
//! reverse NAT. Figures are printed, not asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use stratum_e2e::harness::*;
use stratum_e2e::real_node::*;

/// An answer that is valid time: synchronized, a real stratum, not a kiss.
fn is_valid_time(answer: &serde_json::Value) -> bool {
    answer["kissCode"].is_null()
        && answer["leap"].as_u64() == Some(0)
        && answer["stratum"]
            .as_u64()
            .is_some_and(|s| (2..16).contains(&s))
}

/// Waits until `pod` gets valid time through `vip:123`, and checks the reply came from the
/// address asked (kube-proxy's reverse NAT); returns how long that took.
async fn served_through(pod: &RealPod, vip: &str, what: &str) -> Duration {
    let (answer, took) = wait_for(Duration::from_secs(60), what, || async {
        pod.probe(vip, 123).filter(is_valid_time)
    })
    .await;
    assert_eq!(
        answer["from"],
        serde_json::json!(format!("{vip}:123")),
        "{what}: {answer}"
    );
    took
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn a_real_pod_resolves_its_tenants_service_by_name_and_gets_time_through_the_cluster_ip() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let (a, b) = ("e2e-real-a", "e2e-real-b");
    namespace(&client, a, serde_json::json!({})).await;
    namespace(&client, b, serde_json::json!({})).await;
    // Closest: the real node's own agent or another node's, whichever kube-proxy picks.
    apply_tenant(
        &client,
        a,
        serde_json::json!({"service": {"routing": "Closest"}, "rateLimit": {"kissOfDeath": true}}),
    )
    .await;
    apply_tenant(&client, b, serde_json::json!({})).await;
    let pod_a = real_pod(&client, a, "client").await;
    let pod_b = real_pod(&client, b, "client").await;
    let name = format!("ntp.{a}.svc.cluster.local");
    let vip = cluster_ip(&client, a, "ntp").await;

    // The kubelet gave the pod the cluster's DNS.
    let resolv = pod_a.resolv_conf();
    let dns = std::env::var("STRATUM_E2E_DNS_IP").unwrap_or_else(|_| "10.79.0.10".into());
    assert!(
        resolv.contains(&format!("nameserver {dns}")),
        "pod resolv.conf: {resolv}"
    );
    assert!(
        resolv.contains(&format!(
            "search {a}.svc.cluster.local svc.cluster.local cluster.local"
        )),
        "pod resolv.conf: {resolv}"
    );

    // ntpdig resolves the name through CoreDNS and is answered through the ClusterIP, once the
    // pod's address has reached tenant A's allow list.
    let (dig, took) = wait_for(
        Duration::from_secs(60),
        "ntpdig in tenant A's pod served by name",
        || async {
            pod_a
                .ntpdig(&name)
                .filter(|d| d["stratum"].as_u64().is_some_and(|s| (2..16).contains(&s)))
        },
    )
    .await;
    eprintln!(
        "ntpdig {name} from a real pod: served {:.1} s after the pod was Ready: {dig}",
        took.as_secs_f64()
    );
    assert_eq!(
        dig["ip"],
        serde_json::json!(vip),
        "{name} is the ClusterIP: {dig}"
    );
    assert!(
        dig["offset"].as_f64().unwrap().abs() < 0.05,
        "valid time: {dig}"
    );

    // chronyd -Q: a second real client, resolving the same name.
    let offset = pod_a
        .chronyd_offset(&name)
        .expect("chronyd -Q in tenant A's pod measured no offset");
    eprintln!("chronyd -Q {name} from a real pod: offset {offset:+.6} s");
    assert!(offset.abs() < 0.05, "chronyd measured {offset} s");

    // The reply comes from the address asked (kube-proxy's reverse NAT), not the agent's own.
    let answer = pod_a
        .probe(&vip, 123)
        .expect("no reply to a probe of the ClusterIP");
    assert_eq!(
        answer["from"],
        serde_json::json!(format!("{vip}:123")),
        "{answer}"
    );
    assert!(is_valid_time(&answer), "{answer}");

    // Tenant B's pod asking A's Service is refused: Kiss-o'-Death DENY (A enables KoD).
    let (b_on_a, _) = wait_for(
        Duration::from_secs(30),
        "tenant B's pod refused on A's Service",
        || async { pod_b.probe(&vip, 123) },
    )
    .await;
    assert_eq!(b_on_a["kissCode"], "DENY", "{b_on_a}");
    assert!(
        pod_b.ntpdig(&name).is_none(),
        "ntpdig in tenant B's pod got time from A's Service"
    );

    // The same, from inside tenants' own containers (the ntp-client image): the workload
    // resolves the name itself and both real clients get time through the ClusterIP.
    let run = run_client_pod(
        &client,
        a,
        "ntp-client",
        &[("SERVICE", &name)],
        r#"i=0
until ntpdig -j -t 2 "$SERVICE" >/tmp/dig 2>/tmp/dig.err; do
  i=$((i+1)); [ "$i" -ge 60 ] && { cat /tmp/dig.err >/dev/termination-log; exit 1; }
  sleep 1
done
chronyd -d -Q -t 10 -u root "server $SERVICE iburst maxsamples 4" "pidfile /tmp/chronyd.pid" \
  "cmdport 0" >/tmp/chrony 2>&1
{ cat /tmp/dig; echo; busybox grep -o 'System clock wrong by [-0-9.]* seconds' /tmp/chrony; } \
  >/dev/termination-log"#,
    )
    .await;
    assert_eq!(run.exit_code, 0, "tenant A's container: {}", run.message);
    let (dig, offset) = ntpdig_and_chrony_offset(&run);
    assert_eq!(
        dig["ip"],
        serde_json::json!(vip),
        "in-container ntpdig: {dig}"
    );
    assert!(
        offset.abs() < 0.05,
        "in-container chronyd measured {offset} s"
    );
    eprintln!("in tenant A's container: ntpdig {dig}, chronyd -Q offset {offset:+.6} s");

    // Tenant B's container gets time from its own Service, and is refused on A's every time.
    let run = run_client_pod(
        &client,
        b,
        "ntp-client",
        &[("OWN", &format!("ntp.{b}.svc.cluster.local")), ("OTHER", &name)],
        r#"i=0
until ntpdig -j -t 2 "$OWN" >/dev/null 2>&1; do
  i=$((i+1)); [ "$i" -ge 60 ] && { echo "never served by its own Service" >/dev/termination-log; exit 2; }
  sleep 1
done
served=0
for k in 1 2 3; do ntpdig -j -t 2 "$OTHER" >/dev/null 2>&1 && served=$((served+1)); done
echo "own Service served; the other tenant's served $served of 3" >/dev/termination-log
[ "$served" -eq 0 ]"#,
    )
    .await;
    assert_eq!(run.exit_code, 0, "tenant B's container: {}", run.message);
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn node_local_routing_answers_only_from_a_ready_local_agent_and_closest_reaches_another() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ns = "e2e-real-route";
    let node = real_node();
    namespace(&client, ns, serde_json::json!({})).await;
    let pod = real_pod(&client, ns, "client").await;
    let routing = |r: &str| serde_json::json!({"service": {"routing": r}});
    let svc: Api<Service> = Api::namespaced(client.clone(), ns);
    let policy = |want: Option<&'static str>| {
        let svc = svc.clone();
        async move {
            let spec = svc.get("ntp").await.ok()?.spec?;
            (spec.internal_traffic_policy.as_deref() == want).then_some(spec.cluster_ip?)
        }
    };
    let local_ready = |ready: bool| {
        let client = client.clone();
        let node = node.clone();
        async move {
            let endpoints = endpoint_readiness(&client, ns).await?;
            endpoints
                .iter()
                .any(|(n, r)| *n == node && *r == ready)
                .then_some(())
        }
    };

    apply_tenant(&client, ns, routing("NodeLocal")).await;
    let (vip, _) = wait_for(
        Duration::from_secs(30),
        "internalTrafficPolicy: Local",
        || policy(Some("Local")),
    )
    .await;
    let port = tenant_port(&client, ns).await;
    wait_for(
        Duration::from_secs(60),
        "the real node's endpoint ready",
        || local_ready(true),
    )
    .await;
    // NodeLocal: only the real node's own agent can answer, and it does.
    served_through(
        &pod,
        &vip,
        "NodeLocal: the pod served by its own node's agent",
    )
    .await;

    // Cut the real node's agent off from its upstreams: it runs on, unsynchronized, and its
    // endpoint turns not ready.
    let cut = cut_upstreams(&node);
    let start = Instant::now();
    wait_for(
        Duration::from_secs(150),
        "the real node's endpoint not ready",
        || local_ready(false),
    )
    .await;
    let unready_after = start.elapsed();
    // The kubelet's readiness probe (/readyz: synchronized) says the same.
    wait_for(
        Duration::from_secs(30),
        "the real node's agent pod not Ready (its readiness probe failing)",
        || async { (!pod_ready(&agent_pod(&client, &node).await?)?).then_some(()) },
    )
    .await;
    // The agent is alive and says it is unsynchronized when asked directly...
    let node_ip = node_ip(&client, &node).await;
    let direct = pod
        .probe(&node_ip, port)
        .expect("the unsynchronized agent answers when asked directly");
    assert!(
        direct["leap"].as_u64() == Some(3) || direct["stratum"].as_u64() == Some(16),
        "an unsynchronized answer: {direct}"
    );
    // ... but kube-proxy, once it has programmed the EndpointSlice change (its sync is rate
    // limited, so a probe right after the write can still reach the old rule), has no ready
    // local endpoint for the Service: no answer at all, and three more probes in a row stay
    // unanswered, so one lost packet cannot pass for it.
    let (_, proxy_after) = wait_for(
        Duration::from_secs(30),
        "kube-proxy to stop sending NodeLocal traffic to the not-ready local agent",
        || async { pod.probe(&vip, 123).is_none().then_some(()) },
    )
    .await;
    for _ in 0..3 {
        let answer = pod.probe(&vip, 123);
        assert!(
            answer.is_none(),
            "answered under NodeLocal without a ready local agent: {answer:?}"
        );
    }
    // Closest sends the same pod to another node's ready agent.
    apply_tenant(&client, ns, routing("Closest")).await;
    wait_for(Duration::from_secs(30), "a Closest Service", || {
        policy(Some("Cluster"))
    })
    .await;
    let closest_after = served_through(
        &pod,
        &vip,
        "Closest: the pod served by another node's agent",
    )
    .await;
    eprintln!(
        "upstreams cut on {node}: endpoint not ready after {:.1} s; NodeLocal silent {:.1} s \
         later (a silent probe waits 2 s); Closest served by another node {:.1} s after the \
         switch",
        unready_after.as_secs_f64(),
        proxy_after.as_secs_f64(),
        closest_after.as_secs_f64()
    );

    // Back: the agent resynchronizes and NodeLocal is answered by it again.
    drop(cut);
    apply_tenant(&client, ns, routing("NodeLocal")).await;
    wait_for(
        Duration::from_secs(150),
        "the real node's endpoint ready again",
        || local_ready(true),
    )
    .await;
    served_through(
        &pod,
        &vip,
        "NodeLocal answered by the resynchronized local agent",
    )
    .await;
}

/// A second address on a node until dropped.
struct SecondAddress {
    netns: String,
    addr: String,
}

impl SecondAddress {
    fn new(netns: &str, addr: &str) -> Self {
        let scripts = std::env::var("STRATUM_E2E_SCRIPTS")
            .unwrap_or_else(|_| format!("{}/scripts", env!("CARGO_MANIFEST_DIR")));
        let ok = std::process::Command::new(format!("{scripts}/netns.sh"))
            .args(["add-addr", netns, addr])
            .status()
            .unwrap()
            .success();
        assert!(ok, "netns.sh add-addr {netns} {addr}");
        SecondAddress {
            netns: netns.into(),
            addr: addr.into(),
        }
    }
}

impl Drop for SecondAddress {
    fn drop(&mut self) {
        let scripts = std::env::var("STRATUM_E2E_SCRIPTS")
            .unwrap_or_else(|_| format!("{}/scripts", env!("CARGO_MANIFEST_DIR")));
        let _ = std::process::Command::new(format!("{scripts}/netns.sh"))
            .args(["del-addr", &self.netns, &self.addr])
            .status();
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn an_agent_on_a_node_with_two_addresses_answers_from_the_address_asked() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ns = "e2e-real-pktinfo";
    namespace(&client, ns, serde_json::json!({})).await;
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let port = tenant_port(&client, ns).await;
    let pod = real_pod(&client, ns, "client").await;
    let node = "kwok-node-0";
    let primary = node_ip(&client, node).await;
    // An address the node's routes do not prefer as a source: the agent (bound to the wildcard
    // address) must answer from it because it was asked there (IP_PKTINFO), not because the
    // kernel would pick it.
    let second = "10.77.2.10";
    let _second = SecondAddress::new(&format!("e2e-{node}"), second);

    let (answer, _) = wait_for(
        Duration::from_secs(60),
        "the agent answering the real pod on its primary address",
        || async { pod.probe(&primary, port).filter(is_valid_time) },
    )
    .await;
    assert_eq!(
        answer["from"],
        serde_json::json!(format!("{primary}:{port}")),
        "{answer}"
    );
    let (answer, _) = wait_for(
        Duration::from_secs(10),
        "the agent answering on its second address",
        || async { pod.probe(second, port) },
    )
    .await;
    assert_eq!(
        answer["from"],
        serde_json::json!(format!("{second}:{port}")),
        "the reply left from another address than the one asked: {answer}"
    );
    assert!(is_valid_time(&answer), "{answer}");
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn a_pod_that_adds_sys_time_runs_on_the_real_node_without_it() {
    let client = client().await;
    let ns = "e2e-real-caps";
    namespace(&client, ns, serde_json::json!({})).await;
    // Shaped like the agent DaemonSet's container: root, adds SYS_TIME, never privileged.
    let pod = real_pod_with(
        &client,
        ns,
        "adds-sys-time",
        serde_json::json!({"runAsUser": 0, "privileged": false, "allowPrivilegeEscalation": false,
                           "capabilities": {"add": ["SYS_TIME"]}}),
    )
    .await;
    let caps = capabilities(pod.pid);
    assert_eq!(
        caps.len(),
        5,
        "capability sets of pid {}: {caps:?}",
        pod.pid
    );
    for (set, value) in &caps {
        assert_eq!(
            value & CAP_SYS_TIME_BIT,
            0,
            "{set} = {value:016x} holds CAP_SYS_TIME"
        );
    }
    assert!(
        caps.iter()
            .any(|(set, value)| set == "CapEff" && *value != 0),
        "a root container keeps the runtime's other default capabilities: {caps:?}"
    );
    // The runtime wrapper removed it from this container's spec, and said so.
    assert!(
        runtime_wrapper_removed_sys_time(&pod.container_id),
        "no removal logged for container {}:\n{}",
        pod.container_id,
        runtime_wrapper_log()
    );
    // The node's containerd and kubelet never had it to give.
    for name in ["containerd", "kubelet"] {
        let pid = node_process_pid(name).unwrap_or_else(|| panic!("no PID of the node's {name}"));
        let bounding = capabilities(pid)
            .into_iter()
            .find(|(set, _)| set == "CapBnd")
            .unwrap_or_else(|| panic!("no CapBnd of {name} ({pid})"))
            .1;
        assert_eq!(
            bounding & CAP_SYS_TIME_BIT,
            0,
            "{name} may grant CAP_SYS_TIME"
        );
    }
    eprintln!(
        "a pod adding SYS_TIME runs without it: {}",
        describe_capabilities(&caps)
    );
}
