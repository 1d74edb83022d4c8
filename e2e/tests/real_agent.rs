//! The shared TimeService's agent as a container on the stack's real node: the image that
//! `make images` built, started by a real kubelet through containerd from the DaemonSet the
//! operator wrote. What is real here and nowhere else: the securityContext as the kernel sees
//! it, the kubelet's probes, the hostPath drift file, and pod deletion (preStop drain, SIGTERM,
//! the replacement pod). Figures are printed; the bounds the issue sets are asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams};
use stratum_e2e::harness::*;
use stratum_e2e::real_node::*;

/// The `frequencyPpm` of the drift file an agent on the real node keeps.
fn drift_file_ppm() -> Option<f64> {
    let path = std::path::Path::new(&drift_directory()).join("drift.json");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    file["frequencyPpm"].as_f64()
}

/// The frequency an agent's log says it restored from its drift file (`--log-format json`).
fn restored_ppm(log: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("drift restored"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|line| {
            line["fields"]["ppm"]
                .as_f64()
                .or_else(|| line["ppm"].as_f64())
        })
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the images of `make images`: make e2e"]
async fn the_agent_container_runs_without_sys_time_drains_before_it_exits_and_keeps_its_drift() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let node = real_node();
    let ns = "e2e-real-agent";
    namespace(&client, ns, serde_json::json!({})).await;
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let (pod, container_id) = ready_agent_pod(&client, &node).await;
    let pod_name = pod.metadata.name.clone().unwrap();

    // The pod spec is production's: SYS_TIME asked for, a read-only root, both probes.
    let spec = pod.spec.clone().unwrap();
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some(AGENT_IMAGE));
    let sc = container.security_context.clone().unwrap();
    assert_eq!(
        sc.capabilities.unwrap().add.as_deref(),
        Some(&["SYS_TIME".to_string()][..])
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());

    // As the kernel sees the process: no CAP_SYS_TIME anywhere (the node's runtime wrapper
    // removed it, and said so), nothing else either, and the root really is read-only.
    let pid = container_pid(&container_id)
        .unwrap_or_else(|| panic!("no task for the agent container {container_id}"));
    let caps = capabilities(pid);
    assert_eq!(caps.len(), 5, "capability sets of pid {pid}: {caps:?}");
    for (set, value) in &caps {
        assert_eq!(
            value & CAP_SYS_TIME_BIT,
            0,
            "{set} = {value:016x} holds CAP_SYS_TIME"
        );
        if set == "CapEff" {
            assert_eq!(
                value & !CAP_NET_BIND_SERVICE_BIT,
                0,
                "the agent holds capabilities it never asked for: CapEff {value:016x}"
            );
        }
    }
    assert!(
        runtime_wrapper_removed_sys_time(&container_id),
        "the runtime wrapper logged no removal for the agent container {container_id}"
    );
    let probe_file = format!("/proc/{pid}/root/stratum-e2e-write-probe");
    let write = std::fs::write(&probe_file, b"x");
    let _ = std::fs::remove_file(&probe_file);
    assert_eq!(
        write.as_ref().err().and_then(std::io::Error::raw_os_error),
        Some(30), // EROFS
        "writing into the agent's root filesystem: {write:?}"
    );
    eprintln!(
        "agent container {pod_name} on {node}: {}",
        describe_capabilities(&caps)
    );

    // Its endpoint is in the tenant's ready set.
    wait_for(
        Duration::from_secs(60),
        "the real node's endpoint ready",
        || async {
            endpoint_readiness(&client, ns)
                .await?
                .iter()
                .any(|(n, r)| *n == node && *r)
                .then_some(())
        },
    )
    .await;

    // Delete the pod: the endpoint leaves the ready set while the agent still runs (the
    // preStop drain), then SIGTERM ends it well inside the grace period.
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let deleted = Instant::now();
    pods.delete(&pod_name, &DeleteParams::default())
        .await
        .unwrap();
    let (_, unready_after) = wait_for(
        Duration::from_secs(10),
        "the deleted agent's endpoint out of the ready set",
        || async {
            let endpoints = endpoint_readiness(&client, ns).await?;
            (!endpoints.iter().any(|(n, r)| *n == node && *r)).then_some(())
        },
    )
    .await;
    let alive_when_unready = process_alive(pid);
    let (_, exit_wait) = wait_for(
        Duration::from_secs(15),
        "the deleted agent's process to exit",
        || async { (!process_alive(pid)).then_some(()) },
    )
    .await;
    let exited_after = deleted.elapsed();
    eprintln!(
        "agent pod {pod_name} deleted: endpoint not ready after {:.2} s, process exited after \
         {:.2} s ({:.2} s later)",
        unready_after.as_secs_f64(),
        exited_after.as_secs_f64(),
        exit_wait.as_secs_f64()
    );
    assert!(
        alive_when_unready,
        "the agent exited before its endpoint left the ready set"
    );
    assert!(
        exited_after < Duration::from_secs(10),
        "the agent took {exited_after:?}: the kubelet's grace period would have killed it"
    );

    // On its way out it saved its drift on the hostPath; the replacement pod reads it.
    let saved = drift_file_ppm().expect("no drift file on the real node's hostPath");
    let (new_pod, _) = ready_agent_pod(&client, &node).await;
    let new_name = new_pod.metadata.name.unwrap();
    assert_ne!(new_name, pod_name, "the DaemonSet made a new pod");
    let (restored, _) = wait_for(
        Duration::from_secs(30),
        "the new agent's log to say it restored the drift",
        || async {
            let log = pods.logs(&new_name, &LogParams::default()).await.ok()?;
            restored_ppm(&log)
        },
    )
    .await;
    eprintln!(
        "drift file: {saved:+.6} ppm saved by {pod_name}, {restored:+.6} ppm restored by {new_name}"
    );
    assert!(
        (restored - saved).abs() < 1e-9,
        "the new agent restored {restored} ppm, the file held {saved} ppm"
    );
}

/// The kubelet's restart count of the agent container on `node`'s current pod.
async fn agent_restarts(client: &kube::Client, node: &str) -> Option<i32> {
    let pod = agent_pod(client, node).await?;
    Some(pod.status?.container_statuses?.first()?.restart_count)
}

/// Seconds the process `pid` has run, from /proc (clock ticks of 10 ms).
fn process_age(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the parenthesised command name.
    let after_comm = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(uptime - start_ticks / 100.0)
}

/// `stratum_agent_config_source{source="…"}` at 1 on the agent's metrics port, if readable.
fn config_source(node_ip: &str) -> Option<String> {
    let metrics = http_get(&format!("http://{node_ip}:9123/metrics"))?;
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix("stratum_agent_config_source{source=\"")?;
        let (source, value) = rest.split_once("\"} ")?;
        (value.trim() == "1").then(|| source.to_string())
    })
}

/// The agent container that replaced `old` on `node` (the kubelet restarted it), once it runs
/// (and, with `ready`, is Ready): its ID and host PID.
async fn restarted_agent(
    client: &kube::Client,
    node: &str,
    old: &str,
    ready: bool,
) -> (String, u32) {
    wait_for(
        Duration::from_secs(90),
        "the agent restarted by the kubelet",
        || async {
            let pod = agent_pod(client, node).await?;
            if ready && pod_ready(&pod) != Some(true) {
                return None;
            }
            let id = pod
                .status?
                .container_statuses?
                .first()?
                .container_id
                .clone()?;
            let id = id.trim_start_matches("containerd://").to_string();
            let pid = (id != old).then(|| container_pid(&id)).flatten()?;
            Some((id, pid))
        },
    )
    .await
    .0
}

/// IDs of the node's running containers (`ctr tasks ls`).
fn running_tasks() -> std::collections::BTreeSet<String> {
    String::from_utf8_lossy(&ctr(&["tasks", "ls"]).stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("RUNNING"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Sends SIGTERM to `pid` and returns how long it took to exit. The exit is waited for on a
/// pidfd (opened before the signal, so the pid cannot be reused meanwhile), which the kernel
/// makes readable when the process exits: no polling interval, the exact moment.
fn terminate(pid: u32) -> Duration {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let raw = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a pid");
    let pidfd = pidfd_open(raw, PidfdFlags::empty()).expect("pidfd_open");
    let signalled = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid}");
    let deadline = Duration::from_secs(15);
    loop {
        let left = deadline.saturating_sub(signalled.elapsed());
        let timeout = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(ready) => {
                assert_eq!(ready, 1, "pid {pid} still runs 15 s after SIGTERM");
                return signalled.elapsed();
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll on the pidfd of {pid}: {e}"),
        }
    }
}

/// The API server, as the real node's host-network pods reach it (the `kubernetes` Service),
/// dropped in the node's network namespace: connections hang, as in an outage. The kubelet
/// and kube-proxy use the API server's own address and are untouched. Removed on drop.
struct ApiOutage {
    rule: Vec<String>,
}

impl ApiOutage {
    fn start(cluster_ip: &str) -> Self {
        let rule: Vec<String> = [
            "OUTPUT", "-p", "tcp", "-d", cluster_ip, "--dport", "443", "-j", "DROP",
        ]
        .map(String::from)
        .to_vec();
        let status = Self::iptables("-I", &rule);
        assert!(status.success(), "cutting the API server off: {status}");
        Self { rule }
    }

    fn iptables(op: &str, rule: &[String]) -> std::process::ExitStatus {
        std::process::Command::new("ip")
            .args(["netns", "exec", &format!("e2e-{}", real_node())])
            .args(["iptables", "-w", "-t", "raw", op])
            .args(rule)
            .status()
            .expect("iptables")
    }
}

impl Drop for ApiOutage {
    fn drop(&mut self) {
        let _ = Self::iptables("-D", &self.rule);
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster and the images of `make images`: make e2e"]
async fn the_agent_says_unsynchronized_before_it_exits_and_rides_out_an_api_outage_on_its_cached_config()
 {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let node = real_node();
    let ns = "e2e-outage";
    namespace(&client, ns, serde_json::json!({})).await;
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let client_ip = tenant_pod(&client, ns, "client", "kwok-node-0").await;
    let _netns = PodNetns::new("e2e-t-outage", &client_ip);
    let port = tenant_port(&client, ns).await;
    let node_ip = node_ip(&client, &node).await;
    let agent_addr: std::net::SocketAddr =
        (node_ip.parse::<std::net::IpAddr>().unwrap(), port).into();
    let served =
        || query_from_netns("e2e-t-outage", agent_addr).filter(|a| a["kissCode"].is_null());
    let (_, container_id) = ready_agent_pod(&client, &node).await;
    wait_for(
        Duration::from_secs(60),
        "the tenant served by the real node's agent",
        || async { served() },
    )
    .await;

    // The config it runs is kept on the node for a start without the API server.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let cache = std::path::Path::new(&drift_directory()).join(format!(
        "last-config.{AGENT_NAMESPACE}.{SHARED_TIME_SERVICE}-agent-config.json.gz"
    ));
    wait_for(
        Duration::from_secs(30),
        "the agent's cached config to be the ConfigMap's",
        || async {
            let cm = cms
                .get(&format!("{SHARED_TIME_SERVICE}-agent-config"))
                .await
                .ok()?;
            let current = stratum_api::AgentConfig::from_config_map(&cm)
                .ok()?
                .revision;
            let cached = stratum_api::AgentConfig::from_bytes(&std::fs::read(&cache).ok()?).ok()?;
            (cached.revision == current).then_some(())
        },
    )
    .await;

    // SIGTERM (no pod deletion, so no preStop): the NodeClock says unsynchronized before the
    // process is gone, and the exit takes under a second.
    let clocks: Api<stratum_api::NodeClock> = Api::all(client.clone());
    let synchronized =
        |nc: &stratum_api::NodeClock| nc.status.as_ref().is_some_and(|s| s.synchronized);
    let (before, _) = wait_for(
        Duration::from_secs(60),
        "the real node's NodeClock synchronized",
        || async { clocks.get(&node).await.ok().filter(synchronized) },
    )
    .await;
    let pid = container_pid(&container_id).expect("the agent's pid");
    let tasks_before = running_tasks();
    let took = terminate(pid);
    let after = clocks.get(&node).await.unwrap();
    // Read before any new container ran, so what it says is the old agent's last word.
    let new_tasks: Vec<String> = running_tasks().difference(&tasks_before).cloned().collect();
    assert!(
        new_tasks.is_empty(),
        "a container started before the NodeClock was read: {new_tasks:?}"
    );
    eprintln!(
        "SIGTERM to exit: {:.3} s; NodeClock synchronized={} when the process was gone",
        took.as_secs_f64(),
        synchronized(&after)
    );
    assert!(
        !synchronized(&after),
        "the agent exited with its NodeClock still synchronized"
    );
    assert_ne!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(took < Duration::from_secs(1), "the exit took {took:?}");

    // The kubelet restarts it; once it serves and syncs again, the API server goes away.
    let (container_id, _) = restarted_agent(&client, &node, &container_id, true).await;
    wait_for(
        Duration::from_secs(60),
        "the restarted agent serving",
        || async { served() },
    )
    .await;
    let kubernetes_ip = cluster_ip(&client, "default", "kubernetes").await;
    let outage = ApiOutage::start(&kubernetes_ip);
    let cut_at = Instant::now();

    // Restarted during the outage, it starts from its cached config.
    let pid = container_pid(&container_id).expect("the agent's pid");
    let took = terminate(pid);
    let (_, new_pid) = restarted_agent(&client, &node, &container_id, false).await;
    let (_, _) = poll_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        "the agent restarted in the outage serving",
        // Short waits: a request sent before the port opened must not cost a whole second.
        || async {
            query_from_netns_within("e2e-t-outage", agent_addr, Duration::from_millis(100))
                .filter(|a| a["kissCode"].is_null())
        },
    )
    .await;
    let serving_at_age = process_age(new_pid).unwrap();
    let source = config_source(&node_ip);
    eprintln!(
        "API server cut off: SIGTERM to exit {:.3} s; the new agent served its tenant {:.2} s \
         after its process started (config source {source:?})",
        took.as_secs_f64(),
        serving_at_age
    );
    assert_eq!(source.as_deref(), Some("cache"));
    let restarts = agent_restarts(&client, &node).await.unwrap();

    // Five minutes without the API server: the kubelet's liveness probe never fails, the
    // agent keeps serving, and its NodeClock (unreachable) is not written.
    let outage_for = Duration::from_secs(
        std::env::var("STRATUM_E2E_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300),
    );
    let frozen = clocks.get(&node).await.unwrap().metadata.resource_version;
    let mut checks = 0;
    while cut_at.elapsed() < outage_for {
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(process_alive(new_pid), "the agent died in the outage");
        assert_eq!(
            agent_restarts(&client, &node).await,
            Some(restarts),
            "the kubelet restarted the agent during the outage (liveness failed?)"
        );
        assert!(
            served().is_some(),
            "the tenant was not served {:?} into the outage",
            cut_at.elapsed()
        );
        checks += 1;
    }
    assert_eq!(
        clocks.get(&node).await.unwrap().metadata.resource_version,
        frozen,
        "the NodeClock was written: the outage did not cut the agent off"
    );
    eprintln!(
        "{:.0} s of API outage: live, serving and not restarted at {checks} checks",
        cut_at.elapsed().as_secs_f64()
    );

    // Back: the agent finds its ConfigMap again and reports.
    drop(outage);
    let (_, back) = wait_for(
        Duration::from_secs(120),
        "the agent's config from its ConfigMap again",
        || async { (config_source(&node_ip)? == "source").then_some(()) },
    )
    .await;
    wait_for(
        Duration::from_secs(60),
        "the NodeClock written again",
        || async {
            (clocks.get(&node).await.ok()?.metadata.resource_version != frozen).then_some(())
        },
    )
    .await;
    eprintln!(
        "API server back: config from the ConfigMap after {:.1} s",
        back.as_secs_f64()
    );
}
