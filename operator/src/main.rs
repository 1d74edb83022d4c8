//! `stratum-operator`: runs the TimeService and TenantTimePolicy controllers while holding the
//! leader Lease, and serves `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use stratum_operator::build::OperatorSettings;
use stratum_operator::controller::{Context, wiring};
use stratum_operator::http::{self, Health};
use stratum_operator::index::Index;
use stratum_operator::leader::{Elector, Timing};
use stratum_operator::metrics::Metrics;
use stratum_operator::model::ServerVersion;
use stratum_operator::names;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Reconciles Stratum TimeServices and TenantTimePolicies.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Namespace of the operator and of every agent child.
    #[arg(long, env = "POD_NAMESPACE", default_value = "stratum-system")]
    namespace: String,
    /// Agent image for TimeServices that name none.
    #[arg(long, env = "STRATUM_AGENT_IMAGE", default_value = concat!("localhost/stratum/agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
    /// Pull secret of the agent pods, a Secret name in the operator's namespace; repeat for
    /// several. Used for TimeServices that set no `spec.agent.imagePullSecrets`.
    #[arg(long = "agent-image-pull-secret", value_name = "SECRET")]
    agent_image_pull_secrets: Vec<String>,
    /// Priority class of the agent pods of TimeServices that set no
    /// `spec.placement.priorityClassName`; an empty value sets none.
    #[arg(long, default_value = "system-node-critical")]
    agent_priority_class: String,
    /// The agents' static ClusterRole (installed by the chart) that each TimeService's agent
    /// ServiceAccount is bound to.
    #[arg(long, default_value = "stratum-agent")]
    agent_cluster_role: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Hold a Lease before reconciling, so only one replica writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespaces whose TenantTimePolicies are refused (comma-separated or repeated; an empty
    /// value closes none).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    closed_tenant_namespace: Vec<String>,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    // Colour codes only at a terminal, never in `kubectl logs` or a collector's files.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match args.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }

    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let health = Health::default();
    let server = tokio::spawn(http::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("stratum-operator-{}", std::process::id()));

    // SIGTERM (pod deletion) and SIGINT both stop the operator; the leader releases its Lease.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        stop_tx.send_replace(true);
    });

    let (leading_tx, mut leading) = watch::channel(!args.leader_election);
    // Without election the sender lives as long as main, so leadership is never "lost".
    let mut leading_tx = Some(leading_tx);
    let mut elector_task = None;
    if args.leader_election
        && let Some(leading_tx) = leading_tx.take()
    {
        let elector = Elector {
            api: Api::<Lease>::namespaced(client.clone(), &args.namespace),
            name: names::LEADER_LEASE_NAME.into(),
            identity: identity.clone(),
            timing: Timing::for_lease(Duration::from_secs(args.lease_seconds)),
        };
        elector_task = Some(tokio::spawn(elector.run(leading_tx, stop_rx.clone())));
        // A standby replica is healthy and ready; it just does not write.
        health.set_ready(true);
        tracing::info!(%identity, "waiting for the leader lease");
        let mut stopping = stop_rx.clone();
        tokio::select! {
            elected = leading.wait_for(|l| *l) => {
                elected.context("leader election ended")?;
            }
            _ = stopping.wait_for(|s| *s) => {
                tracing::info!("stopped before becoming leader");
                server.abort();
                return Ok(());
            }
        }
    }
    metrics.leader.set(1);

    let settings = OperatorSettings {
        namespace: args.namespace.clone(),
        agent_image: args.agent_image.clone(),
        agent_image_pull_secrets: args.agent_image_pull_secrets.clone(),
        agent_cluster_role: args.agent_cluster_role.clone(),
        agent_priority_class: args.agent_priority_class.clone(),
    };
    // Read once: what the cluster serves decides which tenants' asks can be met (routing
    // Closest needs 1.34). An upgraded control plane restarts nothing, so a stale version
    // only refuses until the next restart; an unparsable one refuses nothing.
    let info = client
        .apiserver_version()
        .await
        .context("reading the API server's version")?;
    let mut index = Index::new(args.namespace.clone())
        .with_closed_namespaces(args.closed_tenant_namespace.clone());
    match ServerVersion::from_info(&info) {
        Some(version) => {
            tracing::info!(%version, git_version = %info.git_version, "API server version");
            index = index.with_server_version(version);
        }
        None => tracing::warn!(
            git_version = %info.git_version,
            "cannot tell the API server's version; no tenant is refused for it"
        ),
    }
    let reporter = Reporter {
        controller: names::FIELD_MANAGER.into(),
        instance: Some(identity),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        Arc::new(Mutex::new(index)),
        metrics.clone(),
        Some(Recorder::new(client.clone(), reporter)),
    ));
    health.set_ready(true);

    let mut lost = leading.clone();
    let lost_leadership = async move {
        let _ = lost.wait_for(|l| !*l).await;
    };
    let mut stopping = stop_rx.clone();
    let stop = async move {
        tokio::select! {
            () = lost_leadership => tracing::error!("leadership lost; stopping controllers"),
            _ = stopping.wait_for(|s| *s) => tracing::info!("shutting down"),
        }
    };
    wiring::run(client, ctx, stop).await;
    let lost_leadership = !*leading.borrow();
    // The elector sees the stop too and releases the Lease before it returns.
    if let Some(task) = elector_task {
        let _ = task.await;
    }
    server.abort();
    drop(leading_tx);
    if lost_leadership {
        anyhow::bail!("stopped after losing the leader lease; restart to campaign again");
    }
    Ok(())
}

/// Resolves on SIGTERM (what the kubelet sends on pod deletion) or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the operator");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
