//! `stratum-e2e-kubelet`: runs the real binary for every Stratum pod kwok "runs" on a fake
//! node — `stratum-agent` for agent pods, in their node's network namespace, and
//! `stratum-operator` for the chart's operator pods, in a namespace that owns the pod's IP
//! (see `stratum_e2e::kubelet`), with their Secret volumes kept up to date. Pods on a real node (`--real-node`) are left to its kubelet.
//! When the API server listens on loopback only, it also forwards it onto the test bridge,
//! where the namespaces can reach it. Restarts a process that exits; stops every process it
//! started on SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Client};
use stratum_e2e::kubelet::{
    PodKind, SecretMount, agent_command, pod_command, restart_delay, secret_volume_files,
};
use tokio::process::{Child, Command};

#[derive(Parser)]
struct Args {
    /// The agent binary.
    #[arg(long)]
    agent_bin: PathBuf,
    /// The operator binary.
    #[arg(long)]
    operator_bin: PathBuf,
    /// `e2e/scripts/netns.sh`, which makes the operator pods' network namespaces.
    #[arg(long)]
    netns_script: PathBuf,
    /// Run directory: logs, kubeconfigs and per-node hostPath stand-ins go under it.
    #[arg(long)]
    run_dir: PathBuf,
    /// CA certificate of the API server.
    #[arg(long)]
    ca_file: PathBuf,
    /// Where the API server listens.
    #[arg(long, default_value = "10.77.255.254:16443")]
    apiserver: SocketAddr,
    /// Address on the test bridge that the namespaces reach the API server at; when it differs
    /// from `--apiserver` (an API server on loopback), this process forwards it there.
    #[arg(long, default_value = "10.77.255.254:16443")]
    apiserver_proxy: SocketAddr,
    /// Nodes whose pods a real kubelet runs (the e2e real node): never started here.
    #[arg(long = "real-node")]
    real_nodes: Vec<String>,
    /// Network namespace of node N is `<prefix>N`; of a pod P with its own address `<prefix>pod-P`.
    #[arg(long, default_value = "e2e-")]
    netns_prefix: String,
    /// Simulated clock offset of the first node's agent, seconds; node i gets i times this.
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    sim_offset_step: f64,
    /// Simulated frequency error, ppm, alternating in sign between nodes.
    #[arg(long, default_value_t = 40.0)]
    sim_ppm: f64,
    /// A Prometheus file_sd file to keep listing the running pods' named ports, labelled as
    /// Prometheus' Kubernetes pod discovery would (Debian's Prometheus is built without it).
    #[arg(long)]
    targets_file: Option<PathBuf>,
    /// Label selector of the pods to run.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name in (stratum-agent,stratum-operator)"
    )]
    selector: String,
}

/// One pod and its process (absent while waiting to be restarted).
struct Running {
    pod: Pod,
    kind: PodKind,
    node: String,
    /// The agent's position among nodes (its simulated clock error).
    index: usize,
    /// Working directory: kubeconfig, log, pid.
    dir: PathBuf,
    /// The network namespace made for this pod (operator pods), removed with it.
    own_netns: Option<String>,
    child: Option<Child>,
    restarts: u32,
    start_at: Option<Instant>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("KUBECONFIG must point at the e2e cluster")?;
    std::fs::create_dir_all(args.run_dir.join("agents"))?;

    if args.apiserver_proxy != args.apiserver {
        tokio::spawn(forward(args.apiserver_proxy, args.apiserver));
    }

    let pods: Api<Pod> = Api::all(client.clone());
    let mut stream = watcher(pods, watcher::Config::default().labels(&args.selector)).boxed();
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut node_index: BTreeMap<String, usize> = BTreeMap::new();
    let mut targets_written = String::new();
    // The kubelet refreshes Secret volumes at each pod sync (about a minute); a few seconds
    // here keeps tests short without hammering the API server.
    let mut volumes_synced = Instant::now();
    // Stratum's pods that a real node's kubelet runs: not ours to start, but Prometheus
    // discovers them like any other pod.
    let mut on_real_nodes: BTreeMap<String, Pod> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            e = stream.next() => match e { Some(e) => Some(e), None => break },
            _ = tick.tick() => None,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (live, gone): (Vec<Pod>, Vec<Pod>) = match event {
            None => (vec![], vec![]),
            Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                if p.metadata.deletion_timestamp.is_some() {
                    (vec![], vec![p])
                } else {
                    (vec![p], vec![])
                }
            }
            Some(Ok(watcher::Event::Delete(p))) => (vec![], vec![p]),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pod watch interrupted");
                continue;
            }
        };
        for pod in gone {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            on_real_nodes.remove(&uid);
            if let Some(mut r) = running.remove(&uid) {
                tracing::info!(node = %r.node, pod = ?pod.metadata.name, "pod deleted: stopping it");
                remove(&args, &mut r).await;
            }
        }
        for pod in live {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_ref());
            if node.is_some_and(|n| args.real_nodes.contains(n)) {
                on_real_nodes.insert(uid, pod);
                continue;
            }
            if let Some(r) = running.get_mut(&uid) {
                r.pod = pod; // e.g. kwok filled in its IP
                continue;
            }
            match admit(&args, pod, &mut node_index) {
                Ok(Some(r)) => {
                    running.insert(uid, r);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = format!("{e:#}"), "cannot prepare pod"),
            }
        }
        supervise(&client, &args, &mut running).await;
        if volumes_synced.elapsed() >= VOLUME_SYNC {
            volumes_synced = Instant::now();
            for r in running.values().filter(|r| r.child.is_some()) {
                if let Err(e) = sync_secret_volumes(&client, &args, r).await {
                    tracing::warn!(pod = ?r.pod.metadata.name, error = format!("{e:#}"), "cannot update Secret volumes");
                }
            }
        }
        if let Some(path) = &args.targets_file {
            let pods = running
                .values()
                .filter(|r| r.child.is_some())
                .map(|r| (&r.pod, r.node.as_str()))
                .chain(on_real_nodes.values().filter_map(|p| {
                    let running = p.status.as_ref()?.phase.as_deref() == Some("Running");
                    running.then_some((p, p.spec.as_ref()?.node_name.as_deref()?))
                }));
            let text = targets(pods).to_string();
            if text != targets_written {
                if let Err(e) = write_atomically(path, text.as_bytes()) {
                    tracing::warn!(error = %e, "cannot write the Prometheus targets");
                }
                targets_written = text;
            }
        }
    }
    for r in running.values_mut() {
        remove(&args, r).await;
    }
    Ok(())
}

/// How often running pods' Secret volumes are brought up to date.
const VOLUME_SYNC: Duration = Duration::from_secs(3);

/// A pod to run, once it is bound (and, without host networking, has its IP).
fn admit(
    args: &Args,
    pod: Pod,
    node_index: &mut BTreeMap<String, usize>,
) -> anyhow::Result<Option<Running>> {
    let Some(kind) = PodKind::of(&pod) else {
        return Ok(None);
    };
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let Some(node) = spec.node_name.clone() else {
        return Ok(None);
    };
    if args.real_nodes.contains(&node) {
        return Ok(None); // its own kubelet runs it, as a container
    }
    let name = pod.metadata.name.clone().context("pod without name")?;
    let index = match kind {
        PodKind::Agent => {
            let next = node_index.len();
            *node_index.entry(node.clone()).or_insert(next)
        }
        PodKind::Operator => 0,
    };
    let (dir, own_netns) = if spec.host_network == Some(true) {
        (args.run_dir.join("agents").join(&node), None)
    } else {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            return Ok(None); // kwok gives it an address in a later update
        };
        let netns: String = format!("{}pod-{name}", args.netns_prefix)
            .chars()
            .take(64)
            .collect();
        let status = std::process::Command::new(&args.netns_script)
            .args(["add", &netns, &ip])
            .status()
            .with_context(|| format!("running {}", args.netns_script.display()))?;
        anyhow::ensure!(status.success(), "netns.sh add {netns} {ip} failed");
        tracing::info!(pod = %name, %ip, %netns, "pod network namespace");
        (args.run_dir.join("pods").join(&name), Some(netns))
    };
    std::fs::create_dir_all(&dir)?;
    Ok(Some(Running {
        pod,
        kind,
        node,
        index,
        dir,
        own_netns,
        child: None,
        restarts: 0,
        start_at: Some(Instant::now()),
    }))
}

/// Notices exited processes and (re)starts those whose time has come.
async fn supervise(client: &Client, args: &Args, running: &mut BTreeMap<String, Running>) {
    let now = Instant::now();
    for r in running.values_mut() {
        if let Some(child) = r.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let delay = restart_delay(r.restarts);
            tracing::warn!(node = %r.node, pod = ?r.pod.metadata.name, %status, ?delay, "process exited; restarting");
            r.child = None;
            r.restarts += 1;
            r.start_at = Some(now + delay);
            let _ = std::fs::remove_file(r.dir.join("pid"));
        }
        if r.child.is_some() || r.start_at.is_none_or(|t| t > now) {
            continue;
        }
        match start(client, args, r).await {
            Ok(child) => {
                tracing::info!(node = %r.node, pod = ?r.pod.metadata.name, pid = ?child.id(), restarts = r.restarts, "started");
                if let Some(pid) = child.id() {
                    let _ = std::fs::write(r.dir.join("pid"), pid.to_string());
                }
                r.child = Some(child);
                r.start_at = None;
            }
            Err(e) => {
                let delay = restart_delay(r.restarts);
                tracing::error!(node = %r.node, error = format!("{e:#}"), ?delay, "cannot start; retrying");
                r.restarts += 1;
                r.start_at = Some(now + delay);
            }
        }
    }
}

async fn start(client: &Client, args: &Args, r: &Running) -> anyhow::Result<Child> {
    let pod = &r.pod;
    let name = pod.metadata.name.clone().context("pod without name")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .context("pod without namespace")?;
    let node_root = args.run_dir.join("nodes");
    let (command, bin, netns) = match r.kind {
        PodKind::Agent => {
            let sign = if r.index.is_multiple_of(2) { 1.0 } else { -1.0 };
            let command = agent_command(
                pod,
                &node_root,
                args.sim_offset_step * (r.index as f64 + 1.0) * sign,
                args.sim_ppm * sign,
            )?;
            let netns = format!("{}{}", args.netns_prefix, command.node);
            (command, &args.agent_bin, netns)
        }
        PodKind::Operator => (
            pod_command(pod, &node_root)?,
            &args.operator_bin,
            r.own_netns
                .clone()
                .context("operator pod without its namespace")?,
        ),
    };
    for dir in &command.host_dirs {
        std::fs::create_dir_all(dir)?;
    }
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let token = pod_token(
        client,
        &namespace,
        &sa,
        &name,
        pod.metadata.uid.as_deref().unwrap_or_default(),
    )
    .await?;
    let kubeconfig = r.dir.join("kubeconfig");
    write_kubeconfig(args, &kubeconfig, &token, &namespace)?;
    // The container's user must be able to read its credentials, and only it.
    if command.run_as_user.is_some() || command.run_as_group.is_some() {
        let uid = command.run_as_user.and_then(|u| u32::try_from(u).ok());
        let gid = command.run_as_group.and_then(|g| u32::try_from(g).ok());
        std::os::unix::fs::chown(&kubeconfig, uid, gid)
            .with_context(|| format!("chown {}", kubeconfig.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(r.dir.join(match r.kind {
            PodKind::Agent => "agent.log",
            PodKind::Operator => "operator.log",
        }))?;
    let mut identity = Vec::new();
    if let Some(uid) = command.run_as_user {
        identity.push(format!("--reuid={uid}"));
    }
    if let Some(gid) = command.run_as_group {
        identity.push(format!("--regid={gid}"));
    }
    if !identity.is_empty() {
        identity.push("--clear-groups".into());
    }
    // Secret volumes: projected under the pod's directory, then bind-mounted read-only at
    // their mount path inside the mount namespace `ip netns exec` gives the process (its `/`
    // is a slave of the host's, so nothing shows outside it).
    let mut binds = Vec::new();
    for mount in &command.secret_mounts {
        let source = project_secret_volume(client, r, mount).await?;
        ensure_mount_point(args, Path::new(&mount.mount_path))?;
        binds.push(source.display().to_string());
        binds.push(mount.mount_path.clone());
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &netns]);
    if !binds.is_empty() {
        cmd.args(["sh", "-c", BIND_THEN_EXEC, "sh"])
            .args(&binds)
            .arg("--");
    }
    cmd.arg("setpriv")
        .args(&identity)
        .args(["--bounding-set=-sys_time", "--inh-caps=-sys_time"])
        .arg(bin)
        .args(&command.args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", &kubeconfig)
        .env("STRATUM_DENY_SYSTEM_CLOCK", "1")
        .env("RUST_LOG", "info")
        .envs(&command.env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("spawning {} in netns {netns}", bin.display()))
}

/// `sh -c` script: bind-mounts each `SOURCE TARGET` pair read-only, then after `--` execs
/// the rest (the arguments stay arguments: nothing is interpolated into the script).
const BIND_THEN_EXEC: &str = r#"while [ "$1" != -- ]; do
  mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" || exit 1
  shift 2
done
shift
exec "$@""#;

/// Brings the pod's Secret volumes up to date with their Secrets.
async fn sync_secret_volumes(client: &Client, args: &Args, r: &Running) -> anyhow::Result<()> {
    let command = pod_command(&r.pod, &args.run_dir.join("nodes"))?;
    for mount in &command.secret_mounts {
        project_secret_volume(client, r, mount).await?;
    }
    Ok(())
}

/// Writes `mount`'s Secret into the pod's directory for it, as the kubelet lays a Secret
/// volume out: the members in a fresh `..<time>` directory, the `..data` link swapped to it
/// in one rename, and each member a link through `..data`. Unchanged content is left alone.
/// Returns the directory.
async fn project_secret_volume(
    client: &Client,
    r: &Running,
    mount: &SecretMount,
) -> anyhow::Result<PathBuf> {
    let namespace = r.pod.metadata.namespace.as_deref().unwrap_or("default");
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&mount.secret_name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{}", mount.secret_name))?;
    let files = secret_volume_files(mount, secret.as_ref()).with_context(|| {
        format!(
            "Secret {namespace}/{} of volume {} not found",
            mount.secret_name, mount.volume
        )
    })?;
    let dir = r.dir.join("volumes").join(&mount.volume);
    project(&dir, &files, mount.mode)
        .with_context(|| format!("projecting volume {} into {}", mount.volume, dir.display()))?;
    Ok(dir)
}

fn project(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let current = std::fs::read_link(&data).ok();
    if let Some(current) = &current {
        let held: Option<BTreeMap<String, Vec<u8>>> = std::fs::read_dir(dir.join(current))
            .ok()
            .and_then(|entries| {
                entries
                    .map(|e| {
                        let e = e.ok()?;
                        let name = e.file_name().into_string().ok()?;
                        Some((name, std::fs::read(e.path()).ok()?))
                    })
                    .collect()
            });
        if held.as_ref() == Some(files) {
            return Ok(());
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let fresh = format!("..{stamp}");
    std::fs::create_dir(dir.join(&fresh))?;
    for (name, content) in files {
        let path = dir.join(&fresh).join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    let link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&link);
    symlink(&fresh, &link)?;
    std::fs::rename(&link, &data)?;
    for name in files.keys() {
        let member = dir.join(name);
        if std::fs::symlink_metadata(&member).is_err() {
            symlink(Path::new("..data").join(name), &member)?;
        }
    }
    // Members gone from the Secret, and the previous generation.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !files.contains_key(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    if let Some(current) = current {
        std::fs::remove_dir_all(dir.join(current))?;
    }
    Ok(())
}

/// Creates a mount target that the host lacks (one machine plays every node), recording
/// the topmost directory it made in `<run-dir>/mount-points` for `e2e/stack.sh down`.
fn ensure_mount_point(args: &Args, target: &Path) -> anyhow::Result<()> {
    let Some(top) = target.ancestors().filter(|a| !a.exists()).last() else {
        return Ok(()); // exists already
    };
    std::fs::create_dir_all(target).with_context(|| format!("mkdir {}", target.display()))?;
    use std::io::Write;
    let mut record = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.run_dir.join("mount-points"))?;
    writeln!(record, "{}", top.display())?;
    Ok(())
}

/// A kubeconfig holding only the pod's token, for the API server at its bridge address.
fn write_kubeconfig(args: &Args, path: &Path, token: &str, namespace: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let ca = std::fs::read(&args.ca_file)
        .with_context(|| format!("reading {}", args.ca_file.display()))?;
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "pod",
        "clusters": [{"name": "e2e", "cluster": {
            "server": format!("https://{}", args.apiserver_proxy),
            "certificate-authority-data": base64(&ca)}}],
        "users": [{"name": "pod", "user": {"token": token}}],
        "contexts": [{"name": "pod", "context": {"cluster": "e2e", "user": "pod", "namespace": namespace}}],
    });
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, &serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}

/// Prometheus file_sd target groups: every named container port of every running pod (with its
/// node), with the `__meta_kubernetes_*` labels Kubernetes pod discovery gives.
fn targets<'a>(pods: impl Iterator<Item = (&'a Pod, &'a str)>) -> serde_json::Value {
    let mut groups = Vec::new();
    for (pod, node) in pods {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) else {
            continue;
        };
        let mut labels = BTreeMap::new();
        labels.insert(
            "__meta_kubernetes_namespace".to_string(),
            pod.metadata.namespace.clone().unwrap_or_default(),
        );
        labels.insert(
            "__meta_kubernetes_pod_name".to_string(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        labels.insert("__meta_kubernetes_pod_node_name".into(), node.to_owned());
        labels.insert("__meta_kubernetes_pod_phase".into(), "Running".into());
        for (k, v) in pod.metadata.labels.iter().flatten() {
            let key: String = k
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            labels.insert(format!("__meta_kubernetes_pod_label_{key}"), v.clone());
        }
        let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
        for c in containers {
            for port in c.ports.iter().flatten() {
                let Some(name) = &port.name else { continue };
                let mut labels = labels.clone();
                labels.insert(
                    "__meta_kubernetes_pod_container_name".into(),
                    c.name.clone(),
                );
                labels.insert(
                    "__meta_kubernetes_pod_container_port_name".into(),
                    name.clone(),
                );
                groups.push(serde_json::json!({
                    "targets": [format!("{ip}:{}", port.container_port)],
                    "labels": labels,
                }));
            }
        }
    }
    serde_json::Value::Array(groups)
}

/// Replaces `path` in one step, so a reader never sees half a file.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Stops a pod's process and removes what was made for it.
async fn remove(args: &Args, r: &mut Running) {
    if let Some(child) = r.child.as_mut() {
        stop(child).await;
    }
    r.child = None;
    let _ = std::fs::remove_file(r.dir.join("pid"));
    if let Some(netns) = r.own_netns.take() {
        let _ = std::process::Command::new(&args.netns_script)
            .args(["del", &netns])
            .status();
    }
}

/// A token for the pod's service account, bound to the pod (so it carries the node claim).
async fn pod_token(
    client: &Client,
    namespace: &str,
    sa: &str,
    pod: &str,
    uid: &str,
) -> anyhow::Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(24 * 3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid.into()),
            }),
        }),
        ..Default::default()
    };
    let response: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{sa} bound to pod {pod}"))?;
    response
        .status
        .and_then(|s| s.token)
        .context("TokenRequest without a token")
}

/// Forwards TCP connections from `listen` to `upstream` (TLS passes through untouched).
async fn forward(listen: SocketAddr, upstream: SocketAddr) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot forward the API server onto the test bridge");
            return;
        }
    };
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // `ip netns exec` replaces itself with the agent, so the PID is the agent's.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
