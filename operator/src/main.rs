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
use stratum_operator::leader::Elector;
use stratum_operator::metrics::Metrics;
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
    #[arg(long, env = "STRATUM_AGENT_IMAGE", default_value = concat!("stratum-agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
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
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
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

    let (leading_tx, mut leading) = watch::channel(!args.leader_election);
    // Without election the sender lives as long as main, so leadership is never "lost".
    let mut leading_tx = Some(leading_tx);
    if args.leader_election
        && let Some(leading_tx) = leading_tx.take()
    {
        let elector = Elector {
            api: Api::<Lease>::namespaced(client.clone(), &args.namespace),
            name: names::LEADER_LEASE_NAME.into(),
            identity: identity.clone(),
            duration: Duration::from_secs(args.lease_seconds),
        };
        tokio::spawn(elector.run(leading_tx));
        // A standby replica is healthy and ready; it just does not write.
        health.set_ready(true);
        tracing::info!(%identity, "waiting for the leader lease");
        leading
            .wait_for(|l| *l)
            .await
            .context("leader election ended")?;
    }
    metrics.leader.set(1);

    let settings = OperatorSettings {
        namespace: args.namespace.clone(),
        agent_image: args.agent_image.clone(),
        agent_cluster_role: args.agent_cluster_role.clone(),
    };
    let reporter = Reporter {
        controller: names::FIELD_MANAGER.into(),
        instance: Some(identity),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        Arc::new(Mutex::new(Index::new(args.namespace.clone()))),
        metrics.clone(),
        Some(Recorder::new(client.clone(), reporter)),
    ));
    health.set_ready(true);

    let mut lost = leading.clone();
    let lost_leadership = async move {
        let _ = lost.wait_for(|l| !*l).await;
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let stop = async move {
        tokio::select! {
            () = lost_leadership => tracing::error!("leadership lost; stopping controllers"),
            () = shutdown => tracing::info!("shutting down"),
        }
    };
    wiring::run(client, ctx, stop).await;
    server.abort();
    drop(leading_tx);
    if !*leading.borrow() {
        anyhow::bail!("stopped after losing the leader lease; restart to campaign again");
    }
    Ok(())
}
