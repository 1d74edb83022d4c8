//! The e2e stack's real node (`e2e/scripts/node.sh`): a kubelet with containerd, kube-proxy and
//! CoreDNS in a network namespace of its own. Tenant workloads there are real pods. Two kinds:
//! - [`run_client_pod`]: a pod of the `ntp-client` image (`make images`: Debian's `ntpdig` and
//!   `chronyd`) whose own container runs the clients and reports through its termination
//!   message, exactly as a tenant's workload would;
//! - [`real_pod`]: a pause pod whose network namespace hosts clients started from this machine
//!   (`node.sh pod-exec`, with the pod's `/etc/resolv.conf`), for what a container cannot
//!   report: where a reply came from (`e2e/node/ntp_probe.py`), many probes in a loop.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus, Service};
use kube::Client;
use kube::api::Api;

use crate::harness::{apply, wait_for};

/// The taint (and label) that keeps every other pod off the real node.
pub const REAL_NODE_TAINT: &str = "stratum.e2e/real-node";
/// The sandbox image `node.sh` builds; tenant pods run it as their one container.
pub const PAUSE_IMAGE: &str = "localhost/stratum-e2e/pause:1";

/// The tenant workload image: chrony's `chronyd`, ntpsec's `ntpdig` and busybox's `sh`.
pub const CLIENT_IMAGE: &str = "localhost/stratum/ntp-client:dev";

/// Name of the real node.
pub fn real_node() -> String {
    std::env::var("STRATUM_E2E_REAL_NODE").unwrap_or_else(|_| "node-real".into())
}

/// The real node's second address (it has two; the InternalIP is the first).
pub fn real_node_second_ip() -> String {
    std::env::var("STRATUM_E2E_REAL_NODE_IP2").unwrap_or_else(|_| "10.77.0.251".into())
}

fn scripts_dir() -> PathBuf {
    std::env::var("STRATUM_E2E_SCRIPTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts")))
}

fn node_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/node"))
}

/// `node.sh ctr ARGS...`: ctr against the node's containerd (CRI namespace).
pub fn ctr(args: &[&str]) -> Output {
    Command::new(scripts_dir().join("node.sh"))
        .arg("ctr")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running node.sh ctr: {e}"))
}

/// Host PID of a running container, by its ID (from `ctr tasks ls`).
pub fn container_pid(container_id: &str) -> Option<u32> {
    let out = ctr(&["tasks", "ls"]);
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == container_id).then_some(())?;
        f.next()?.parse().ok()
    })
}

/// A pod manifest with one `container`, bound to the real node (tolerating its taint), label
/// `app: <app>`, a 1 s grace period.
fn pod_on_real_node(
    namespace: &str,
    name: &str,
    app: &str,
    container: serde_json::Value,
    restart_policy: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "nodeName": real_node(),
            "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 1,
            "containers": [container]
        }
    })
}

/// A pod on the real node, running the pause image.
pub struct RealPod {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    /// Its container's ID in containerd.
    pub container_id: String,
    /// Host PID of its container.
    pub pid: u32,
}

/// Creates pod `name` in `namespace` on the real node and waits until it runs and is Ready.
pub async fn real_pod(client: &Client, namespace: &str, name: &str) -> RealPod {
    real_pod_with(client, namespace, name, serde_json::json!({})).await
}

/// As [`real_pod`], with `security_context` as its container's securityContext.
pub async fn real_pod_with(
    client: &Client,
    namespace: &str,
    name: &str,
    security_context: serde_json::Value,
) -> RealPod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    apply(
        &pods,
        pod_on_real_node(
            namespace,
            name,
            "client",
            serde_json::json!({"name": "c", "image": PAUSE_IMAGE, "imagePullPolicy": "Never",
                               "securityContext": security_context}),
            "Always",
        ),
    )
    .await;
    let (ready, took) = wait_for(
        Duration::from_secs(60),
        &format!("pod {namespace}/{name} Ready on the real node"),
        || async {
            let status = pods.get(name).await.ok()?.status?;
            if let Some(why) = refused_by_the_kubelet(&status) {
                return Some(Err(why));
            }
            let ready = status
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let id = status.container_statuses?.first()?.container_id.clone()?;
            ready.then_some(Ok((
                status.pod_ip?,
                id.trim_start_matches("containerd://").to_string(),
            )))
        },
    )
    .await;
    let (ip, container_id) = ready.unwrap_or_else(|why| {
        panic!("the real node's kubelet refused pod {namespace}/{name}: {why}")
    });
    eprintln!(
        "pod {namespace}/{name} Ready on the real node in {:.1} s",
        took.as_secs_f64()
    );
    let pid = container_pid(&container_id)
        .unwrap_or_else(|| panic!("no task for container {container_id} in containerd"));
    RealPod {
        namespace: namespace.into(),
        name: name.into(),
        ip,
        container_id,
        pid,
    }
}

/// How a [`run_client_pod`] pod ended.
#[derive(Debug)]
pub struct ClientRun {
    /// Its container's exit code.
    pub exit_code: i32,
    /// What the script wrote to `/dev/termination-log` (at most 4 KiB).
    pub message: String,
}

/// Runs `script` (busybox `sh -c`) once in a new pod `name` of the `ntp-client` image on the
/// real node, with `env`, and waits for its container to end. An old pod of that name is
/// deleted first (a pod's command cannot change).
pub async fn run_client_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    env: &[(&str, &str)],
    script: &str,
) -> ClientRun {
    let env: Vec<serde_json::Value> = env
        .iter()
        .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
        .collect();
    run_pod_container(
        client,
        namespace,
        name,
        serde_json::json!({"name": "client", "image": CLIENT_IMAGE, "imagePullPolicy": "Never",
                           "command": ["sh", "-c", script], "env": env}),
    )
    .await
}

/// Runs `container` once in a new pod `name` on the real node and waits for it to end, as
/// [`run_client_pod`] does, for containers that need more than a script and plain variables.
pub async fn run_pod_container(
    client: &Client,
    namespace: &str,
    name: &str,
    container: serde_json::Value,
) -> ClientRun {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    if pods.get_opt(name).await.ok().flatten().is_some() {
        let _ = pods.delete(name, &Default::default()).await;
        wait_for(
            Duration::from_secs(60),
            &format!("old pod {namespace}/{name} gone"),
            || async { pods.get_opt(name).await.ok()?.is_none().then_some(()) },
        )
        .await;
    }
    apply(
        &pods,
        pod_on_real_node(namespace, name, "ntp-client", container, "Never"),
    )
    .await;
    let (run, took) = wait_for(
        Duration::from_secs(180),
        &format!("client pod {namespace}/{name} to finish"),
        || async {
            let status = pods.get(name).await.ok()?.status?;
            if let Some(why) = refused_by_the_kubelet(&status) {
                return Some(Err(why));
            }
            let ended = status
                .container_statuses?
                .first()?
                .state
                .clone()?
                .terminated?;
            Some(Ok(ClientRun {
                exit_code: ended.exit_code,
                message: ended.message.unwrap_or_default(),
            }))
        },
    )
    .await;
    let run = run.unwrap_or_else(|why| {
        panic!("the real node's kubelet refused pod {namespace}/{name}: {why}")
    });
    eprintln!(
        "client pod {namespace}/{name} ended in {:.1} s: exit {}",
        took.as_secs_f64(),
        run.exit_code
    );
    run
}

/// What a client pod that ran ntpdig and then `chronyd -Q` left in its termination message:
/// ntpdig's JSON report on the first line, chronyd's "System clock wrong by X seconds" on the
/// next. Panics, naming what is missing, when either is absent; asserts that ntpdig got valid
/// time (a real stratum, |offset| < 50 ms).
pub fn ntpdig_and_chrony_offset(run: &ClientRun) -> (serde_json::Value, f64) {
    let mut lines = run.message.lines().filter(|l| !l.trim().is_empty());
    let dig: serde_json::Value = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no ntpdig report: {}", run.message));
    assert!(
        dig["stratum"]
            .as_u64()
            .is_some_and(|s| (2..16).contains(&s))
            && dig["offset"].as_f64().is_some_and(|o| o.abs() < 0.05),
        "ntpdig got no valid time: {dig}"
    );
    let chrony = lines
        .next()
        .unwrap_or_else(|| panic!("no chronyd -Q output: {}", run.message));
    let offset = chrony
        .strip_prefix("System clock wrong by ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("chronyd -Q measured nothing: {chrony}"));
    (dig, offset)
}

/// Why the kubelet failed a pod before any container ran (admission refused it or evicted it:
/// disk or memory pressure, no room), if it did. A container that ran and exited leaves
/// `reason` unset, so a client pod's own exit code is not mistaken for this.
fn refused_by_the_kubelet(status: &PodStatus) -> Option<String> {
    if status.phase.as_deref() != Some("Failed") {
        return None;
    }
    let reason = status.reason.as_deref()?;
    Some(format!(
        "{reason}: {}",
        status.message.as_deref().unwrap_or("(no message)")
    ))
}

impl RealPod {
    /// `program args...` from this machine in this pod's network namespace, seeing the pod's
    /// `/etc/resolv.conf`, without CAP_SYS_TIME (`node.sh pod-exec`).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(scripts_dir().join("node.sh"));
        cmd.args(["pod-exec", &self.namespace, &self.name, program])
            .args(args);
        cmd
    }

    /// The pod's resolv.conf, as the kubelet wrote it.
    pub fn resolv_conf(&self) -> String {
        self.command("cat", &["/etc/resolv.conf"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Debian's `ntpdig` against `host` (a name or address): its JSON report (`time`,
    /// `offset`, `precision`, `host`, `ip`, `stratum`, `leap`) when it got a time.
    pub fn ntpdig(&self, host: &str) -> Option<serde_json::Value> {
        let out = self
            .command("ntpdig", &["-j", "-t", "2", host])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `chronyd -Q` (measure once, never set the clock) against `host`: the offset it measured,
    /// in seconds, when it got one.
    pub fn chronyd_offset(&self, host: &str) -> Option<f64> {
        self.chronyd_query(&[&format!("server {host} iburst maxsamples 4")])
    }

    /// `chronyd -Q` with `config` (one directive per item, e.g. a recipe's lines; a pidfile
    /// and `cmdport 0` are added): the offset it measured, in seconds, when it got one.
    pub fn chronyd_query(&self, config: &[&str]) -> Option<f64> {
        let pidfile = std::env::temp_dir().join(format!(
            "stratum-e2e-chronyd-{}-{}.pid",
            self.namespace, self.name
        ));
        let out = self
            .command(
                "chronyd",
                &[
                    "-d",
                    "-Q",
                    "-t",
                    "10",
                    "-u",
                    "root",
                    &format!("pidfile {}", pidfile.display()),
                    "cmdport 0",
                ]
                .into_iter()
                .chain(config.iter().copied())
                .collect::<Vec<_>>(),
            )
            .output()
            .ok()?;
        // "System clock wrong by 0.000123 seconds (ignored)" on stderr (or stdout).
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines().find_map(|l| {
            let rest = l.split("System clock wrong by ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// One request to `host:port` from an unconnected socket (`e2e/node/ntp_probe.py`): the
    /// reply's source address and header, or `None` when nothing came back.
    pub fn probe(&self, host: &str, port: u16) -> Option<serde_json::Value> {
        let script = node_dir().join("ntp_probe.py");
        let out = self
            .command(
                "python3",
                &[&script.to_string_lossy(), host, &port.to_string(), "2"],
            )
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// The capability sets (`CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb`) of host process `pid`.
pub fn capabilities(pid: u32) -> Vec<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            key.starts_with("Cap")
                .then(|| Some((key.to_string(), u64::from_str_radix(value.trim(), 16).ok()?)))?
        })
        .collect()
}

/// Whether host process `pid` still runs (a zombie has exited).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

/// `CapInh 0000…, CapPrm …`: capability sets for a report line.
pub fn describe_capabilities(caps: &[(String, u64)]) -> String {
    caps.iter()
        .map(|(k, v)| format!("{k} {v:016x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the node's runtime wrapper logged removing CAP_SYS_TIME from container
/// `container_id`'s spec.
pub fn runtime_wrapper_removed_sys_time(container_id: &str) -> bool {
    runtime_wrapper_log()
        .lines()
        .any(|l| l.contains(container_id) && l.contains("removed CAP_SYS_TIME"))
}

/// Bit of CAP_SYS_TIME in a capability set.
pub const CAP_SYS_TIME_BIT: u64 = 1 << 25;
/// Bit of CAP_NET_BIND_SERVICE in a capability set.
pub const CAP_NET_BIND_SERVICE_BIT: u64 = 1 << 10;

fn node_run_dir() -> PathBuf {
    let run_dir = std::env::var("STRATUM_E2E_RUN_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.run").into());
    PathBuf::from(run_dir).join("node")
}

/// What the node's test-only runtime wrapper logged (`e2e/node/runc_drop_sys_time.py`).
pub fn runtime_wrapper_log() -> String {
    std::fs::read_to_string(node_run_dir().join("logs/runtime-wrapper.log")).unwrap_or_default()
}

/// PID of one of the node's own processes (`containerd`, `kubelet`, `kube-proxy`, `coredns`).
pub fn node_process_pid(name: &str) -> Option<u32> {
    std::fs::read_to_string(node_run_dir().join("pids").join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The shared TimeService's agent pod on `node` that is not terminating, if there is one.
pub async fn agent_pod(client: &Client, node: &str) -> Option<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), crate::harness::AGENT_NAMESPACE);
    let params = kube::api::ListParams::default()
        .labels("app.kubernetes.io/name=stratum-agent")
        .fields(&format!("spec.nodeName={node}"));
    pods.list(&params)
        .await
        .ok()?
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
}

/// Whether a pod's Ready condition is True (`None` before it has one).
pub fn pod_ready(pod: &Pod) -> Option<bool> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(ready.status == "True")
}

/// The shared TimeService's agent pod on `node` (not terminating), once it is Ready, with its
/// container's ID in containerd.
pub async fn ready_agent_pod(client: &Client, node: &str) -> (Pod, String) {
    wait_for(
        Duration::from_secs(120),
        &format!("the agent pod on {node} Ready"),
        || async {
            let pod = agent_pod(client, node).await?;
            let id = pod
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .container_id
                .clone()?;
            (pod_ready(&pod) == Some(true))
                .then(|| (pod, id.trim_start_matches("containerd://").to_string()))
        },
    )
    .await
    .0
}

/// The ClusterIP of Service `name` in `namespace`.
pub async fn cluster_ip(client: &Client, namespace: &str, name: &str) -> String {
    let svc: Api<Service> = Api::namespaced(client.clone(), namespace);
    wait_for(
        Duration::from_secs(30),
        &format!("Service {namespace}/{name}'s ClusterIP"),
        || async { svc.get(name).await.ok()?.spec?.cluster_ip },
    )
    .await
    .0
}

/// chronyd with config `conf` in the real node's network namespace, where its host-network
/// agent sees that namespace's loopback: `-x` (never adjusts a clock), without CAP_SYS_TIME,
/// as root (so it reads the test's key files), stderr to `log`.
pub fn chronyd_in_real_node(conf: &std::path::Path, log: std::fs::File) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &format!("e2e-{}", real_node())])
        .args([
            "setpriv",
            "--bounding-set=-sys_time",
            "--inh-caps=-sys_time",
        ])
        .args(["chronyd", "-x", "-d", "-u", "root", "-f"])
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("chronyd (make deps installs chrony)")
}
