//! `stratum-agent`: the node daemon. See docs/contracts.md for the command line the operator's
//! DaemonSet uses.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stratum_agent::agent::{self, AgentOptions, Outputs, Shared};
use stratum_agent::clock::{Backend, SimulationParams, SystemClockPolicy};
use stratum_agent::config_cache::{ConfigCache, ConfigOrigin};
use stratum_agent::config_source::{self, ConfigSource, ConfigUpdate};
use stratum_agent::host_daemons::{self, HostDaemonView};
use stratum_agent::metrics::Metrics;
use stratum_agent::server::{ServerOptions, default_workers};
use stratum_agent::{VERSION, ops, report};
use stratum_api::agent_config::{AgentConfig, ClockBackend, LogLevel};
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

    raise_open_file_limit();
    // The probes and metrics answer from here on: liveness must never wait for a config, and
    // so never for the API server.
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

    let cache = args
        .state_dir
        .as_deref()
        .and_then(|dir| ConfigCache::for_source(dir, &source));
    let (config_tx, mut config_rx) = mpsc::channel(8);
    tracing::info!(%source, node = %args.node_name, "starting");
    tokio::spawn(config_source::watch(source, client.clone(), config_tx));

    // The backend comes from the flag or the first config: the source's, or the cached one
    // when the source gives none within the grace (the API server is down or the ConfigMap
    // unusable).
    let (first_config, origin) =
        first_config(&mut config_rx, cache.as_deref(), CACHE_GRACE).await?;
    logging.apply(first_config.log_level);
    let kind = match args.clock {
        Some(ClockArg::System) => ClockBackend::System,
        Some(ClockArg::Readonly) => ClockBackend::Readonly,
        Some(ClockArg::Simulated) => ClockBackend::Simulated,
        None => first_config.clock.backend,
    };
    // Beside another daemon the system clock is only observed, unless the TimeService takes
    // over; a watcher restarts the agent when that changes.
    let take_over = Arc::new(AtomicBool::new(first_config.discipline.take_over));
    // Before the server opens any port: every bound NTP socket is someone else's.
    let detection = host_daemons::observe(&BTreeSet::new());
    let configured = kind;
    let (kind, yielded) =
        host_daemons::backend_to_run(configured, &detection, first_config.discipline.take_over);
    if let Some(why) = &yielded {
        tracing::warn!(reason = %why, "not steering the system clock");
    } else if let Some(seen) = detection.describe() {
        tracing::warn!(detail = %seen, "another time daemon seems to run");
    }
    shared.metrics.set_host_daemons(&detection);
    shared.host_daemons.store(Arc::new(HostDaemonView {
        detection,
        yielded,
        clock: None,
    }));
    let sim = SimulationParams {
        initial_offset: args.sim_offset,
        frequency_error_ppm: args.sim_frequency_ppm,
        wander_ppm_per_sqrt_s: args.sim_wander,
        seed: rand::random(),
    };
    let backend = Backend::open(
        kind,
        first_config.discipline.rtc_sync,
        sim,
        SystemClockPolicy::from_env(),
    )?;
    tracing::info!(clock = ?kind, "clock backend open");

    // Hand the first config to the loop again, then keep forwarding.
    let (loop_tx, loop_rx) = mpsc::channel(8);
    let first = match origin {
        ConfigOrigin::Cache => ConfigUpdate::Cached(first_config),
        ConfigOrigin::Source | ConfigOrigin::None => ConfigUpdate::Valid(first_config),
    };
    loop_tx.send(first).await.ok();
    let forwarded_take_over = Arc::clone(&take_over);
    tokio::spawn(async move {
        while let Some(u) = config_rx.recv().await {
            if let ConfigUpdate::Valid(c) = &u {
                logging.apply(c.log_level);
                forwarded_take_over.store(c.discipline.take_over, Ordering::Relaxed);
            }
            if loop_tx.send(u).await.is_err() {
                return;
            }
        }
    });

    let (snap_tx, snap_rx) = watch::channel(Default::default());
    let (event_tx, event_rx) = mpsc::channel(64);
    let (hb_tx, hb_rx) = watch::channel(Duration::from_secs(60));
    let reporter = if let (Some(client), false) = (client, args.no_report) {
        tokio::spawn(report::run(
            client,
            args.node_name.clone(),
            String::new(),
            hb_rx,
            snap_rx,
            event_rx,
        ))
    } else {
        // Keep the channels open so the loop's sends succeed and are dropped.
        tokio::spawn(async move {
            let (_hb, _snap, mut events) = (hb_rx, snap_rx, event_rx);
            while events.recv().await.is_some() {}
        })
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    tokio::spawn(watch_host_daemons(
        shared.clone(),
        (configured, kind),
        take_over,
        Arc::clone(&shutdown_tx),
    ));
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
        config_cache: cache,
    };
    let outputs = Outputs {
        snapshots: snap_tx,
        events: event_tx,
        heartbeat: hb_tx,
    };
    let result = agent::run(opts, backend, shared, outputs, loop_rx, shutdown_rx).await;
    // The loop published "unsynchronized" on its way out; give the reporter a bounded moment
    // to write it, so the endpoints drop before the process is gone but the exit stays fast.
    if tokio::time::timeout(FINAL_REPORT_DEADLINE, reporter)
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?FINAL_REPORT_DEADLINE, "the last NodeClock write did not finish");
    }
    result
}

/// How often the node is looked at for other time daemons.
const HOST_DAEMON_INTERVAL: Duration = Duration::from_secs(60);
/// How often the clock is read as a daemon found there sees it: about one Prometheus scrape,
/// so the dashboard draws it beside the agent's offset.
const DAEMON_CLOCK_INTERVAL: Duration = Duration::from_secs(15);

/// Looks for other time daemons every [`HOST_DAEMON_INTERVAL`] and reads the clock as the one
/// found sees it every [`DAEMON_CLOCK_INTERVAL`] (from the start), publishes both, and stops
/// the agent (the kubelet restarts it) when the backend it should run changes.
async fn watch_host_daemons(
    shared: Arc<Shared>,
    (configured, running): (ClockBackend, ClockBackend),
    take_over: Arc<AtomicBool>,
    shutdown: Arc<watch::Sender<bool>>,
) {
    let mut look = tokio::time::interval(HOST_DAEMON_INTERVAL);
    look.tick().await; // the start looked already
    let mut read_clock = tokio::time::interval(DAEMON_CLOCK_INTERVAL);
    read_clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let view = shared.host_daemons.load_full();
        let (detection, restart) = tokio::select! {
            _ = look.tick() => {
                // Only the sockets this agent holds: a tenant port it failed to bind (say 123,
                // held by chronyd) is another daemon's evidence, not ours.
                let ports: BTreeSet<u16> = shared
                    .server
                    .served_ports()
                    .into_iter()
                    .map(|(port, ..)| port)
                    .collect();
                let detection = tokio::task::spawn_blocking(move || host_daemons::observe(&ports))
                    .await
                    .unwrap_or_default();
                shared.metrics.set_host_daemons(&detection);
                let restart = host_daemons::restart_reason(
                    running,
                    configured,
                    &detection,
                    take_over.load(Ordering::Relaxed),
                );
                (detection, restart)
            }
            _ = read_clock.tick() => (view.detection.clone(), None),
        };
        let looked = detection.clone();
        let clock = tokio::task::spawn_blocking(move || host_daemons::observe_clock(&looked))
            .await
            .unwrap_or_default();
        shared.metrics.set_host_daemon_clock(clock.as_ref());
        shared.host_daemons.store(Arc::new(HostDaemonView {
            detection,
            yielded: view.yielded.clone(),
            clock,
        }));
        if let Some(why) = restart {
            tracing::warn!(reason = %why, "stopping so that the restart runs the right clock backend");
            let _ = shutdown.send(true);
            return;
        }
    }
}

/// How long a start waits for the source before running the cached config instead.
const CACHE_GRACE: Duration = Duration::from_millis(500);

/// How long the exit waits for the last NodeClock write.
const FINAL_REPORT_DEADLINE: Duration = Duration::from_millis(700);

/// The first config to run and where it came from: the source's first valid one if it comes
/// within `grace`, else the cached one (at once when the source rejects its config), else the
/// source's first valid one whenever it comes.
async fn first_config(
    rx: &mut mpsc::Receiver<ConfigUpdate>,
    cache: Option<&ConfigCache>,
    grace: Duration,
) -> anyhow::Result<(Box<AgentConfig>, ConfigOrigin)> {
    let mut cached = match cache.map(ConfigCache::load) {
        Some(Ok(cached)) => cached.map(Box::new),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "ignoring the cached config");
            None
        }
        None => None,
    };
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let update = match &cached {
            Some(_) => tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or(None),
            None => rx.recv().await,
        };
        match update {
            Some(ConfigUpdate::Valid(c)) => return Ok((c, ConfigOrigin::Source)),
            Some(ConfigUpdate::Cached(c)) => return Ok((c, ConfigOrigin::Cache)),
            Some(ConfigUpdate::Rejected(why)) => {
                tracing::error!(reason = %why, "config rejected; waiting for a valid one");
            }
            None if cached.is_none() => anyhow::bail!("config source closed"),
            None => {}
        }
        // Past the grace, or the source has only a bad config: the last good one runs.
        if let Some(config) = cached.take() {
            tracing::warn!(
                revision = %config.revision,
                "no valid config from the source yet; running the last good config from the \
                 state directory"
            );
            return Ok((config, ConfigOrigin::Cache));
        }
    }
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
        // Colour codes only for a person at a terminal: in a file, a pipe or a log collector
        // (`kubectl logs`) they are noise in every line.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
