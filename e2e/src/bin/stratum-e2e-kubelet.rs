//! `stratum-e2e-kubelet`: runs a real `stratum-agent` for every agent pod kwok "runs" on a
//! fake node, inside that node's network namespace (see `stratum_e2e::kubelet`). It also
//! forwards the API server onto the test bridge, because the namespaces cannot reach the
//! host's loopback where the API server listens. Stops every agent it started on SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Client};
use stratum_e2e::kubelet::agent_command;
use tokio::process::{Child, Command};

#[derive(Parser)]
struct Args {
    /// The agent binary.
    #[arg(long)]
    agent_bin: PathBuf,
    /// Run directory: agent logs, kubeconfigs and per-node hostPath stand-ins go under it.
    #[arg(long)]
    run_dir: PathBuf,
    /// CA certificate of the API server.
    #[arg(long)]
    ca_file: PathBuf,
    /// Where the API server listens (host loopback).
    #[arg(long, default_value = "127.0.0.1:16443")]
    apiserver: SocketAddr,
    /// Address on the test bridge to forward the API server on, reachable from the namespaces.
    #[arg(long, default_value = "10.77.255.254:16443")]
    apiserver_proxy: SocketAddr,
    /// Network namespace of node N is `<prefix>N`.
    #[arg(long, default_value = "e2e-")]
    netns_prefix: String,
    /// Simulated clock offset of the first node's agent, seconds; node i gets i times this.
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    sim_offset_step: f64,
    /// Simulated frequency error, ppm, alternating in sign between nodes.
    #[arg(long, default_value_t = 40.0)]
    sim_ppm: f64,
    /// Label selector of agent pods.
    #[arg(long, default_value = "app.kubernetes.io/name=stratum-agent")]
    selector: String,
}

struct Running {
    child: Child,
    node: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("KUBECONFIG must point at the e2e cluster")?;
    std::fs::create_dir_all(args.run_dir.join("agents"))?;

    tokio::spawn(forward(args.apiserver_proxy, args.apiserver));

    let pods: Api<Pod> = Api::all(client.clone());
    let mut stream = watcher(pods, watcher::Config::default().labels(&args.selector)).boxed();
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut node_index: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            e = stream.next() => match e { Some(e) => e, None => break },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (live, gone): (Vec<Pod>, Vec<Pod>) = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                if p.metadata.deletion_timestamp.is_some() {
                    (vec![], vec![p])
                } else {
                    (vec![p], vec![])
                }
            }
            Ok(watcher::Event::Delete(p)) => (vec![], vec![p]),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch interrupted");
                continue;
            }
        };
        for pod in gone {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if let Some(mut r) = running.remove(&uid) {
                tracing::info!(node = %r.node, "pod deleted: stopping its agent");
                stop(&mut r.child).await;
            }
        }
        for pod in live {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if running.contains_key(&uid) {
                continue;
            }
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let next = node_index.len();
            let i = *node_index.entry(node.clone()).or_insert(next);
            match start(&client, &args, &pod, i).await {
                Ok(child) => {
                    tracing::info!(%node, pod = ?pod.metadata.name, "agent started");
                    running.insert(uid, Running { child, node });
                }
                Err(e) => tracing::error!(%node, error = format!("{e:#}"), "cannot start agent"),
            }
        }
        // Reap agents that exited on their own, so a later pod event can restart them.
        running.retain(|_, r| match r.child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(node = %r.node, %status, "agent exited");
                false
            }
            _ => true,
        });
    }
    for r in running.values_mut() {
        stop(&mut r.child).await;
    }
    Ok(())
}

async fn start(client: &Client, args: &Args, pod: &Pod, index: usize) -> anyhow::Result<Child> {
    let name = pod.metadata.name.clone().context("pod without name")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .context("pod without namespace")?;
    let sign = if index.is_multiple_of(2) { 1.0 } else { -1.0 };
    let command = agent_command(
        pod,
        &args.run_dir.join("nodes"),
        args.sim_offset_step * (index as f64 + 1.0) * sign,
        args.sim_ppm * sign,
    )?;
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
    let dir = args.run_dir.join("agents").join(&command.node);
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    let ca = std::fs::read(&args.ca_file)
        .with_context(|| format!("reading {}", args.ca_file.display()))?;
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "agent",
        "clusters": [{"name": "e2e", "cluster": {
            "server": format!("https://{}", args.apiserver_proxy),
            "certificate-authority-data": base64(&ca)}}],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "e2e", "user": "agent", "namespace": namespace}}],
    });
    std::fs::write(&kubeconfig, serde_json::to_vec_pretty(&doc)?)?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let netns = format!("{}{}", args.netns_prefix, command.node);
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &netns,
        "setpriv",
        "--bounding-set=-sys_time",
        "--inh-caps=-sys_time",
    ])
    .arg(&args.agent_bin)
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
        .with_context(|| format!("spawning the agent in netns {netns}"))
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
