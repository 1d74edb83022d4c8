//! `stratum-agent`: the node daemon. See docs/contracts.md for the command line the operator's
//! DaemonSet uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stratum_agent::agent::{self, AgentOptions, Outputs, Shared};
use stratum_agent::clock::{Backend, SimulationParams, SystemClockPolicy};
use stratum_agent::config_source::{self, ConfigSource};
use stratum_agent::metrics::Metrics;
use stratum_agent::server::{ServerOptions, default_workers};
use stratum_agent::{VERSION, ops, report};
use stratum_api::agent_config::{ClockBackend, LogLevel};
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(
    name = "stratum-agent",
    version,
    about = "Stratum node agent: disciplines the node clock and serves tenants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Check an agent config file and print every problem.
    Validate {
        /// The JSON file.
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch this ConfigMap (`namespace/name`; binaryData agent-config.json.gz or data agent-config.json).
    #[arg(long, conflicts_with = "config")]
    config_map: Option<String>,
    /// Read and watch this agent config file instead.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Override the config's clock backend (tests, e2e and demos use `simulated`).
    #[arg(long, value_enum)]
    clock: Option<ClockArg>,
    /// Initial offset of the simulated clock, seconds.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    sim_offset: f64,
    /// Frequency error of the simulated clock, ppm.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    sim_frequency_ppm: f64,
    /// Frequency wander of the simulated clock, ppm per √s.
    #[arg(long, default_value_t = 0.0)]
    sim_wander: f64,
    /// Metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9123")]
    metrics_addr: SocketAddr,
    /// Local status endpoint for stratumctl.
    #[arg(long, default_value = "127.0.0.1:9124")]
    status_addr: SocketAddr,
    /// Directory for the drift file; defaults to the config's driftFile.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Do not report to the API server (no NodeClock, no Events).
    #[arg(long)]
    no_report: bool,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// NTP server worker threads for all tenant ports together (each owns one SO_REUSEPORT
    /// socket of every port); 0 = one per core this process may use.
    #[arg(long, default_value_t = 0)]
    server_workers: usize,
    /// Clients tracked per tenant port for rate limiting and `stratumctl clients`.
    #[arg(long, default_value_t = 4096)]
    server_client_table: usize,
    /// Address tenant ports bind to: `::` serves IPv4 and IPv6 on every address; a specific
    /// address serves only it.
    #[arg(long, default_value = "::")]
    server_bind: std::net::IpAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClockArg {
    System,
    Readonly,
    Simulated,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Validate { path } => {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            match stratum_api::AgentConfig::from_bytes(&bytes) {
                Ok(c) => {
                    println!(
                        "{}: valid (revision {}, {} upstreams, {} tenants)",
                        path.display(),
                        c.revision,
                        c.upstreams.len(),
                        c.serving.tenants.len()
                    );
                    Ok(())
                }
                Err(stratum_api::ConfigError::Invalid(problems)) => {
                    for p in &problems {
                        eprintln!("{}: {p}", path.display());
                    }
                    anyhow::bail!("{} problem(s)", problems.len())
                }
                Err(e) => anyhow::bail!("{}: {e}", path.display()),
            }
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let logging = init_logging(args.log_format);
    let source = match (&args.config_map, &args.config) {
        (Some(cm), None) => {
            let (namespace, name) = cm
                .split_once('/')
                .with_context(|| format!("--config-map must be namespace/name, got {cm:?}"))?;
            ConfigSource::ConfigMap {
                namespace: namespace.into(),
                name: name.into(),
            }
        }
        (None, Some(path)) => ConfigSource::File(path.clone()),
        _ => anyhow::bail!("give exactly one of --config-map or --config"),
    };
    let needs_client = matches!(source, ConfigSource::ConfigMap { .. }) || !args.no_report;
    let client = if needs_client {
        Some(kube::Client::try_default().await.context(
            "connecting to the Kubernetes API (use --no-report with --config outside a cluster)",
        )?)
    } else {
        None
    };

    let (config_tx, mut config_rx) = mpsc::channel(8);
    tracing::info!(%source, node = %args.node_name, "starting");
    raise_open_file_limit();
    tokio::spawn(config_source::watch(source, client.clone(), config_tx));

    // The backend comes from the flag or the first valid config.
    let first = loop {
        match config_rx.recv().await {
            Some(config_source::ConfigUpdate::Valid(c)) => {
                logging.apply(c.log_level);
                break c;
            }
            Some(config_source::ConfigUpdate::Rejected(why)) => {
                tracing::error!(reason = %why, "config rejected; waiting for a valid one")
            }
            None => anyhow::bail!("config source closed"),
        }
    };
    let kind = match args.clock {
        Some(ClockArg::System) => ClockBackend::System,
        Some(ClockArg::Readonly) => ClockBackend::Readonly,
        Some(ClockArg::Simulated) => ClockBackend::Simulated,
        None => first.clock.backend,
    };
    let sim = SimulationParams {
        initial_offset: args.sim_offset,
        frequency_error_ppm: args.sim_frequency_ppm,
        wander_ppm_per_sqrt_s: args.sim_wander,
        seed: rand::random(),
    };
    let backend = Backend::open(
        kind,
        first.discipline.rtc_sync,
        sim,
        SystemClockPolicy::from_env(),
    )?;
    tracing::info!(clock = ?kind, "clock backend open");

    // Hand the first config to the loop again, then keep forwarding.
    let (loop_tx, loop_rx) = mpsc::channel(8);
    loop_tx
        .send(config_source::ConfigUpdate::Valid(first))
        .await
        .ok();
    tokio::spawn(async move {
        while let Some(u) = config_rx.recv().await {
            if let config_source::ConfigUpdate::Valid(c) = &u {
                logging.apply(c.log_level);
            }
            if loop_tx.send(u).await.is_err() {
                return;
            }
        }
    });

    let shared = Shared::with_server(
        Metrics::new()?,
        ServerOptions {
            workers: match args.server_workers {
                0 => default_workers(),
                n => n,
            },
            client_capacity: args.server_client_table.max(4),
            bind: args.server_bind,
            ..ServerOptions::default()
        },
    );
    let (snap_tx, snap_rx) = watch::channel(Default::default());
    let (event_tx, event_rx) = mpsc::channel(64);
    let (hb_tx, hb_rx) = watch::channel(Duration::from_secs(60));
    let metrics_listener = ops::serve(args.metrics_addr, ops::metrics_router(shared.clone()));
    let status_listener = ops::serve(args.status_addr, ops::status_router(shared.clone()));
    tokio::spawn(async move {
        if let Err(e) = metrics_listener.await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = status_listener.await {
            tracing::error!(error = %e, "status server failed");
        }
    });
    if let (Some(client), false) = (client, args.no_report) {
        tokio::spawn(report::run(
            client,
            args.node_name.clone(),
            String::new(),
            hb_rx,
            snap_rx,
            event_rx,
        ));
    } else {
        // Keep the channels open so the loop's sends succeed and are dropped.
        tokio::spawn(async move {
            let (_hb, _snap, mut events) = (hb_rx, snap_rx, event_rx);
            while events.recv().await.is_some() {}
        });
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });

    let opts = AgentOptions {
        node: args.node_name,
        state_dir: args.state_dir,
        version: VERSION.into(),
    };
    let outputs = Outputs {
        snapshots: snap_tx,
        events: event_tx,
        heartbeat: hb_tx,
    };
    agent::run(opts, backend, shared, outputs, loop_rx, shutdown_rx).await
}

/// The filter of the agent's log: `RUST_LOG` when set (someone debugging this node wins),
/// else the config's `logLevel` (the TimeService's `spec.agent.logLevel`).
fn log_filter(env: Option<&str>, level: LogLevel) -> String {
    match env {
        Some(directives) if !directives.trim().is_empty() => directives.to_owned(),
        _ => level.as_str().to_owned(),
    }
}

/// Sets the log level from each config the agent takes, without a restart.
#[derive(Clone)]
struct LogControl {
    env: Option<String>,
    filter: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
}

impl LogControl {
    fn apply(&self, level: LogLevel) {
        let directives = log_filter(self.env.as_deref(), level);
        match tracing_subscriber::EnvFilter::try_new(&directives) {
            Ok(filter) => {
                if let Err(e) = self.filter.reload(filter) {
                    tracing::warn!(error = %e, "log level not changed");
                }
            }
            Err(e) => tracing::warn!(error = %e, %directives, "log filter not understood"),
        }
    }
}

/// Every tenant port costs one socket per server worker (1000 tenants on 64 cores: 64,000
/// descriptors), past the usual soft limit of 1024: take the hard limit, as Go does.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, "cannot raise the open file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open file limit"),
    }
}

fn init_logging(format: LogFormat) -> LogControl {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = std::env::var("RUST_LOG").ok();
    let initial =
        tracing_subscriber::EnvFilter::try_new(log_filter(env.as_deref(), LogLevel::Info))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(initial);
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    LogControl {
        env,
        filter: handle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configs_log_level_sets_the_filter_unless_rust_log_is_given() {
        assert_eq!(log_filter(None, LogLevel::Debug), "debug");
        assert_eq!(log_filter(None, LogLevel::Error), "error");
        assert_eq!(log_filter(Some(""), LogLevel::Warn), "warn");
        assert_eq!(
            log_filter(Some("stratum_agent=trace"), LogLevel::Error),
            "stratum_agent=trace"
        );
        for level in [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            assert!(tracing_subscriber::EnvFilter::try_new(log_filter(None, level)).is_ok());
        }
    }
}
