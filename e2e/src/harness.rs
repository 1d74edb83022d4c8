//! Helpers for the e2e tests: the cluster's client, condition waits with deadlines, and the
//! TimeService every test shares (only one TimeService may select the nodes). Its agents run on
//! the kwok nodes (as processes of the kubelet stand-in) and on the real node (as containers of
//! the image `make images` built, started by the real kubelet).

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use stratum_api::{NodeClock, TenantTimePolicy, TimeService};

/// Field manager of objects the tests create.
pub const TEST_MANAGER: &str = "stratum-e2e";
/// Name of the shared TimeService.
pub const SHARED_TIME_SERVICE: &str = "e2e";
/// Namespace of the agents.
pub const AGENT_NAMESPACE: &str = "stratum-system";

/// A client for the e2e cluster (`KUBECONFIG`, set by `e2e/stack.sh env`).
pub async fn client() -> Client {
    Client::try_default()
        .await
        .unwrap_or_else(|e| panic!("no e2e cluster ({e}); run `make e2e`"))
}

/// The image of the agents on the real node (`make images`, imported by `node.sh`).
pub const AGENT_IMAGE: &str = "localhost/stratum/agent:dev";

/// The nodes the shared TimeService runs agents on: the kwok nodes and the real node.
pub fn agent_nodes() -> Vec<String> {
    let mut nodes: Vec<String> = (0..3).map(|i| format!("kwok-node-{i}")).collect();
    nodes.push(crate::real_node::real_node());
    nodes
}

/// The stack's run directory (`e2e/stack.sh env` exports it).
pub fn run_dir() -> std::path::PathBuf {
    std::env::var("STRATUM_E2E_RUN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.run").into())
}

/// The agents' drift directory: inside the run directory, so the real node's hostPath never
/// touches this machine's own `/var/lib` (the stand-in maps it per kwok node, too).
pub fn drift_directory() -> String {
    run_dir()
        .join("node/host/var/lib/stratum")
        .to_string_lossy()
        .into_owned()
}

/// The upstream addresses `e2e/stack.sh` started.
pub fn upstreams() -> Vec<String> {
    std::env::var("STRATUM_E2E_UPSTREAMS")
        .unwrap_or_else(|_| "10.77.1.1 10.77.1.2 10.77.1.3".into())
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// The falseticker's address.
pub fn falseticker() -> String {
    std::env::var("STRATUM_E2E_FALSETICKER").unwrap_or_else(|_| "10.77.1.9".into())
}

/// Polls `check` every 200 ms until it returns `Some`, or panics naming `what` after `timeout`.
/// The cluster's state is read, not pushed: a condition on the API server, a real process or a
/// packet, which no simulated clock reaches.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(timeout, Duration::from_millis(200), what, check).await
}

/// As [`wait_for`], polling every `interval`: for figures that want a finer resolution.
pub async fn poll_until<T, F, Fut>(
    timeout: Duration,
    interval: Duration,
    what: &str,
    check: F,
) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_within(timeout, interval, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// As [`wait_for`]; on timeout the panic also carries what `explain` reads from the cluster
/// then, so a CI log says which part of the state never came (no rerun needed to find out).
pub async fn wait_for_explained<T, F, Fut, E, EFut>(
    timeout: Duration,
    what: &str,
    check: F,
    explain: E,
) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
    E: FnOnce() -> EFut,
    EFut: Future<Output = String>,
{
    match poll_within(timeout, Duration::from_millis(200), check).await {
        Some(found) => found,
        None => {
            let state = explain().await;
            panic!("timed out after {timeout:?} waiting for {what}; the cluster then:\n{state}")
        }
    }
}

/// `check`'s first `Some` and when it came, or `None` once `timeout` has passed.
async fn poll_within<T, F, Fut>(
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Option<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Server-side applies `object` with the test field manager.
pub async fn apply<K>(api: &Api<K>, object: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object["metadata"]["name"]
        .as_str()
        .expect("object name")
        .to_string();
    api.patch(
        &name,
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"))
}

/// The shared TimeService spec: the stack's honest upstreams plus the falseticker.
pub fn shared_time_service(extra_upstreams: &[&str]) -> serde_json::Value {
    let mut hosts: Vec<String> = upstreams();
    hosts.push(falseticker());
    hosts.extend(extra_upstreams.iter().map(|s| s.to_string()));
    serde_json::json!({
        "apiVersion": "stratum.io/v1alpha1", "kind": "TimeService",
        "metadata": {"name": SHARED_TIME_SERVICE},
        "spec": {
            // Polls of 8 s keep the holdover floor (4 maxPoll intervals) at 32 s, so losing
            // every upstream shows within a test's patience.
            "upstreams": hosts.iter().map(|h| serde_json::json!({"host": h, "minPoll": 3, "maxPoll": 3})).collect::<Vec<_>>(),
            "selection": {"minSources": 2},
            // The production pod spec (SYS_TIME under Discipline) on a software clock: the
            // real node's kubelet runs the agent unchanged and this machine's clock never moves.
            "discipline": {"makeStep": {"threshold": "128ms", "limit": 3}, "clock": "Simulated",
                           "driftDirectory": drift_directory()},
            // No tolerations: the default tolerates every taint, the real node's too.
            "placement": {"nodeSelector": {"kubernetes.io/os": "linux"}},
            "agent": {"image": AGENT_IMAGE, "imagePullPolicy": "Never"},
            "serving": {"holdover": "20s"},
            "reporting": {"interval": "10s"}
        }
    })
}

/// Ensures the shared TimeService exists and is Ready on every node.
pub async fn ensure_shared_time_service(client: &Client) -> TimeService {
    let api: Api<TimeService> = Api::all(client.clone());
    apply(&api, shared_time_service(&[])).await;
    wait_for_explained(
        Duration::from_secs(120),
        "shared TimeService Ready with every node of the stack synchronized",
        || async {
            let ts = api.get(SHARED_TIME_SERVICE).await.ok()?;
            let status = ts.status.clone()?;
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            // Every node of the stack counted: the real node registers a little after the kwok
            // nodes, and a fresh stack's first test must not see the TimeService without it.
            let every_node = usize::try_from(status.nodes.desired)
                .is_ok_and(|desired| desired >= agent_nodes().len());
            (ready && every_node && status.nodes.synchronized == status.nodes.desired).then_some(ts)
        },
        || describe_shared_time_service(client),
    )
    .await
    .0
}

/// The shared TimeService's status and each of its NodeClocks (synchronized, last report,
/// sources and their states), one line each: what a failed wait on it prints.
pub async fn describe_shared_time_service(client: &Client) -> String {
    let mut lines = Vec::new();
    match Api::<TimeService>::all(client.clone())
        .get(SHARED_TIME_SERVICE)
        .await
    {
        Ok(ts) => lines.push(format!(
            "TimeService {SHARED_TIME_SERVICE}: {}",
            serde_json::to_string(&ts.status).unwrap_or_default()
        )),
        Err(e) => lines.push(format!("TimeService {SHARED_TIME_SERVICE}: {e}")),
    }
    match Api::<NodeClock>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(clocks) => {
            for clock in clocks {
                let Some(status) = clock.status.as_ref() else {
                    lines.push(format!("NodeClock {}: no status", clock.name_any()));
                    continue;
                };
                let sources: Vec<String> = status
                    .sources
                    .iter()
                    .map(|s| serde_json::to_string(s).unwrap_or_default())
                    .collect();
                lines.push(format!(
                    "NodeClock {}: synchronized {}, offset {:?}, last update {:?}, conditions {}, sources [{}]",
                    clock.name_any(),
                    status.synchronized,
                    status.offset,
                    status.last_update.as_ref().map(|t| t.0.to_string()),
                    serde_json::to_string(&status.conditions).unwrap_or_default(),
                    sources.join(", "),
                ));
            }
        }
        Err(e) => lines.push(format!("NodeClocks: {e}")),
    }
    lines.join("\n")
}

/// Creates (or replaces) a tenant policy.
pub async fn apply_tenant(
    client: &Client,
    namespace: &str,
    spec: serde_json::Value,
) -> TenantTimePolicy {
    let api: Api<TenantTimePolicy> = Api::namespaced(client.clone(), namespace);
    apply(
        &api,
        serde_json::json!({
            "apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy",
            "metadata": {"name": "ntp", "namespace": namespace},
            "spec": spec
        }),
    )
    .await
}

/// Deletes an object if it exists.
pub async fn delete<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api.delete(name, &DeleteParams::foreground()).await;
}

/// Name of an object, for messages.
pub fn name_of<K: ResourceExt>(k: &K) -> String {
    k.name_any()
}

/// `GET url` through curl (no HTTP client in this crate); the body on a 2xx answer.
pub fn http_get(url: &str) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "5", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends one NTP client request from inside network namespace `netns` (via the stratumctl
/// binary) and returns its JSON answer, or `None` when nothing came back.
pub fn query_from_netns(netns: &str, server: SocketAddr) -> Option<serde_json::Value> {
    query_from_netns_within(netns, server, Duration::from_secs(1))
}

/// As [`query_from_netns`], waiting at most `timeout` for the answer: for figures where a
/// second spent on a request sent too early would hide when serving began.
pub fn query_from_netns_within(
    netns: &str,
    server: SocketAddr,
    timeout: Duration,
) -> Option<serde_json::Value> {
    let stratumctl = std::env::var("STRATUM_E2E_TARGET")
        .map(|t| format!("{t}/stratumctl"))
        .unwrap_or_else(|_| "stratumctl".into());
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            &stratumctl,
            "--json",
            "query",
            "--timeout",
            &timeout.as_secs_f64().to_string(),
            &server.to_string(),
        ])
        .output()
        .ok()?;
    // 0 served synchronized, 2 unsynchronized, 3 Kiss-o'-Death: all answers; 1 is none.
    if !matches!(out.status.code(), Some(0 | 2 | 3)) {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A network namespace owning a tenant pod's IP, so queries really come from that pod's
/// address; removed on drop.
pub struct PodNetns(String);

impl PodNetns {
    /// Makes namespace `name` owning `ip` (`netns.sh add`); panics when it cannot.
    pub fn new(name: &str, ip: &str) -> Self {
        let scripts = std::env::var("STRATUM_E2E_SCRIPTS")
            .unwrap_or_else(|_| format!("{}/../e2e/scripts", env!("CARGO_MANIFEST_DIR")));
        let status = std::process::Command::new(format!("{scripts}/netns.sh"))
            .args(["add", name, ip])
            .status()
            .expect("netns.sh");
        assert!(status.success(), "netns.sh add {name} {ip}");
        PodNetns(name.to_string())
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let scripts = std::env::var("STRATUM_E2E_SCRIPTS")
            .unwrap_or_else(|_| format!("{}/../e2e/scripts", env!("CARGO_MANIFEST_DIR")));
        let _ = std::process::Command::new(format!("{scripts}/netns.sh"))
            .args(["del", &self.0])
            .status();
    }
}

/// Creates a tenant pod on `node` and returns the IP kwok gives it.
pub async fn tenant_pod(client: &kube::Client, namespace: &str, name: &str, node: &str) -> String {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    apply(&pods, serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": {"app": "client"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.example.invalid/client"}]}
    }))
    .await;
    wait_for(
        Duration::from_secs(30),
        "the tenant pod to get an IP",
        || async { pods.get(name).await.ok()?.status?.pod_ip },
    )
    .await
    .0
}

/// A node's InternalIP.
pub async fn node_ip(client: &kube::Client, node: &str) -> String {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes
        .get(node)
        .await
        .unwrap_or_else(|e| panic!("node {node}: {e}"));
    n.status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .unwrap_or_else(|| panic!("node {node} has no InternalIP"))
        .address
}

/// Creates or updates a namespace with `labels`.
pub async fn namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    apply(
        &api,
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
    )
    .await;
}

/// The e2e stack's run directory for its processes (`STRATUM_E2E_STACK`).
pub fn stack_dir() -> std::path::PathBuf {
    std::env::var("STRATUM_E2E_STACK")
        .expect("STRATUM_E2E_STACK from e2e/stack.sh env")
        .into()
}

/// PID of the process the kubelet stand-in runs for operator pod `pod`, if it runs.
pub fn operator_pid(pod: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(stack_dir().join("pods").join(pod).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// The port the operator gave the tenant of `namespace`.
pub async fn tenant_port(client: &kube::Client, namespace: &str) -> u16 {
    let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), namespace);
    wait_for(Duration::from_secs(60), "the tenant's port", || async {
        ttp.get("ntp").await.ok()?.status?.port
    })
    .await
    .0 as u16
}

/// A blackhole route for a prefix in a node's network namespace (`e2e-<node>`), removed on
/// drop, so a failing test never leaves a node cut off for the next one.
pub struct Blackhole {
    netns: String,
    prefix: String,
}

impl Blackhole {
    /// Blackholes `prefix` in node `node`'s namespace; panics when it cannot.
    pub fn new(node: &str, prefix: &str) -> Self {
        let netns = format!("e2e-{node}");
        let status = std::process::Command::new("ip")
            .args(["-n", &netns, "route", "add", "blackhole", prefix])
            .status()
            .expect("ip");
        assert!(status.success(), "blackholing {prefix} in {netns}");
        Self {
            netns,
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.netns, "route", "del", "blackhole", &self.prefix])
            .status();
    }
}

/// The upstreams' range (`e2e/stack.sh`).
pub const UPSTREAM_RANGE: &str = "10.77.1.0/24";

/// Cuts node `node`'s network namespace off from every upstream until the guard is dropped.
pub fn cut_upstreams(node: &str) -> Blackhole {
    Blackhole::new(node, UPSTREAM_RANGE)
}

/// Readiness of each node's endpoint in the tenant's IPv4 EndpointSlice, sorted by node.
pub async fn endpoint_readiness(
    client: &kube::Client,
    namespace: &str,
) -> Option<Vec<(String, bool)>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=ntp"))
        .await
        .ok()?;
    let v4 = list.items.into_iter().find(|s| s.address_type == "IPv4")?;
    let mut out: Vec<(String, bool)> = v4
        .endpoints
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e.node_name.clone().unwrap_or_default(),
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

/// An instant query through Prometheus' HTTP API (curl encodes it), at `time` or now.
pub fn prometheus_query(base: &str, query: &str, time: Option<u64>) -> Option<serde_json::Value> {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-fsS", "--max-time", "10", "-G"])
        .arg(format!("{base}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={query}"));
    if let Some(t) = time {
        curl.arg("--data-urlencode").arg(format!("time={t}"));
    }
    let out = curl.output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The first sample's value of an instant query to the stack's Prometheus at `base`.
pub fn prometheus_value(base: &str, query: &str) -> Option<f64> {
    let response = prometheus_query(base, query, None)?;
    response["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

/// Status, reason and message of the condition `type_` among `conditions`.
pub fn condition_of(
    conditions: &[stratum_api::common::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The queries of the chart dashboard's panel titled `title`, in target order.
pub fn dashboard_queries(title: &str) -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/stratum/files/dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
            .unwrap_or_default();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["title"] == title)
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(
        !queries.is_empty(),
        "no dashboard panel {title:?} with queries"
    );
    queries
}
