//! `stratumctl`: look at the local agent (`tracking`, `sources`, `clients`, `serverstats`),
//! query any NTP server (`query HOST[:PORT]`), or load one (`bench`, with `echo-server` as the
//! baseline). Every view takes `-o text|wide|json|yaml`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use stratum_agent::delay_proxy::{self, DelayPlan};
use stratum_agent::loadgen::{self, LatencySummary, LoadReport, LoadSpec};
use stratum_agent::query::{SyncBound, Verdict, WaitStep, query, resolve_target};
use stratum_agent::server::{ServerStats, TenantClients};
use stratum_agent::status::{AgentStatus, fmt_seconds, sourcestats_table};
use stratum_agent::wire_tap::{self, TapReport};

#[derive(Parser)]
#[command(
    name = "stratumctl",
    version,
    about = "Inspect a Stratum agent or query any NTP server"
)]
struct Cli {
    /// The agent's status endpoint.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:9124",
        env = "STRATUM_AGENT"
    )]
    agent: String,
    /// Output: `text` (tables for people), `wide` (more columns), `json` or `yaml` (every
    /// field, with the agent's identity: node, TimeService, version, clock, config revision).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// The same as `-o json` (kept for scripts written before `-o`).
    #[arg(long, global = true, hide = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// `-o`: one choice for every subcommand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Tables and lines for people (`report`: Markdown).
    #[value(alias = "markdown")]
    Text,
    /// As text, with more columns where a view has more to show.
    Wide,
    /// JSON, every field.
    Json,
    /// YAML, the same fields as JSON.
    Yaml,
}

impl Output {
    /// Whether this is a machine format.
    fn structured(self) -> bool {
        matches!(self, Output::Json | Output::Yaml)
    }

    /// Prints `value` as JSON or YAML (only called for those).
    fn print<T: serde::Serialize>(self, value: &T) -> anyhow::Result<()> {
        match self {
            Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
            _ => println!("{}", serde_json::to_string_pretty(value)?),
        }
        Ok(())
    }
}

/// An agent view in JSON or YAML: which node, TimeService and config revision it is of,
/// beside it, so collected outputs can be told apart.
#[derive(serde::Serialize)]
struct WithIdentity<'a, T: serde::Serialize> {
    #[serde(flatten)]
    identity: &'a stratum_agent::status::Identity,
    #[serde(flatten)]
    view: T,
}

#[derive(Subcommand)]
enum Command {
    /// The system clock: sync state, offset, frequency, stratum, root delay and dispersion.
    Tracking,
    /// Every source with its role, reachability, offset, delay and jitter.
    Sources,
    /// Every source's regression, as chronyc sourcestats shows it: samples (NP), residual
    /// runs (NR), span, frequency and skew, offset and standard deviation.
    Sourcestats,
    /// The most active clients of each tenant: requests, drops, KoDs, last seen.
    Clients {
        /// Only this tenant (`namespace/name`).
        #[arg(long)]
        tenant: Option<String>,
        /// Rows per tenant.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Per-tenant server counters: received, served, denied, rate limited, KoD, malformed.
    Serverstats,
    /// Load an NTP server: valid client requests at a fixed rate from many source addresses;
    /// prints answers, loss and latency. Bounded by --duration and --max-requests.
    Bench {
        /// The server, ADDR:PORT.
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Stop after this many requests.
        #[arg(long, default_value_t = 1_000_000)]
        max_requests: u64,
        /// Source addresses are taken from here (any local range; on Linux all of
        /// 127.0.0.0/8 is local). Must match the target's family.
        #[arg(long, default_value = "127.0.0.0/16")]
        sources: IpNet,
        /// How many distinct sources to use.
        #[arg(long, default_value_t = 1024)]
        source_count: usize,
        /// Seconds to wait for late answers after the last request.
        #[arg(long, default_value_t = 1.0)]
        wait: f64,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
        /// Also tap loopback and time each request inside the server, from the kernel's
        /// receive stamp of the request to that of its reply (needs CAP_NET_RAW; the target
        /// must be on this host's loopback).
        #[arg(long)]
        in_server: bool,
        /// Send NTS-authenticated requests: run the key exchange with this NTS-KE endpoint
        /// first (ADDR:PORT), check one authenticated answer from --target, then load it
        /// with requests built and sealed per batch.
        #[arg(long)]
        nts_ke: Option<SocketAddr>,
        /// PEM CA bundle that vouches for the NTS-KE endpoint (default: the public web PKI).
        #[arg(long, requires = "nts_ke")]
        nts_ca: Option<std::path::PathBuf>,
    },
    /// Relay UDP between clients on --listen and --upstream, holding back (and, in the
    /// `loss` scenario, dropping) each datagram by a seeded plan: every relay with the same
    /// scenario and seed gives its client the same path. For accuracy comparisons; stops
    /// after --duration.
    DelayProxy {
        /// Where clients send.
        #[arg(long)]
        listen: SocketAddr,
        /// The server, ADDR:PORT.
        #[arg(long)]
        upstream: SocketAddr,
        /// symmetric, asymmetric, jitter, loss or route-change.
        #[arg(long)]
        scenario: stratum_agent::delay_proxy::Scenario,
        /// Seed of the delays.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// route-change: seconds after the start when the way back gets 20 ms longer.
        #[arg(long, default_value_t = 60.0)]
        route_change_after: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 600.0)]
        duration: f64,
    },
    /// A raw UDP echo with the server's socket options and batching: the practical ceiling
    /// for `bench`. Stops after --duration.
    EchoServer {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:12399")]
        listen: SocketAddr,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
    },
    /// Wait until an NTP server serves synchronized time within a bound, for init containers
    /// and scripts. Exit 0 when it does, 2 when --timeout passes first (the last answer was
    /// unsynchronized or outside the bound), 3 when the server refuses this client, 1 when it
    /// never answered.
    Waitsync {
        /// HOST[:PORT], port 123 by default.
        target: String,
        /// Give up after this many seconds (at most 3600).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Seconds between queries (at least 0.1; keep it above the tenant's per-client rate
        /// limit, or the server answers with RATE).
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Largest root distance accepted, seconds.
        #[arg(long, default_value_t = 0.1)]
        max_distance: f64,
        /// Largest |offset| from this host accepted, seconds (default: any; a host whose own
        /// clock is wrong is what it waits to correct).
        #[arg(long)]
        max_offset: Option<f64>,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// A compliance report of time synchronization for a period (PCI DSS 10.6.1-10.6.3, ISO
    /// 27001:2022 A.8.17), from the cluster (your kubeconfig), optionally Prometheus and the
    /// API server's audit log. Missing evidence makes a control "not evidenced", never a pass.
    Report {
        /// Start of the period, RFC 3339 (default: --period before --until).
        #[arg(long)]
        since: Option<k8s_openapi::jiff::Timestamp>,
        /// End of the period, RFC 3339 (default: now).
        #[arg(long)]
        until: Option<k8s_openapi::jiff::Timestamp>,
        /// Length of the period when --since is not given, a Go duration ("24h", "168h").
        #[arg(long, default_value = "24h")]
        period: kube::core::Duration,
        /// Prometheus base URL (http://HOST:PORT) for accuracy over the period; without it,
        /// accuracy is the NodeClocks' at this point in time.
        #[arg(long)]
        prometheus: Option<String>,
        /// The API server's audit log (JSON lines, audit.k8s.io/v1) for who changed what;
        /// without it, the operator's Events (no user, short-lived).
        #[arg(long)]
        audit_log: Option<std::path::PathBuf>,
        /// Time a node may be unsynchronized (or unreported) in the period and still pass, a Go
        /// duration.
        #[arg(long, default_value = "0s")]
        allowed_unsynchronized: kube::core::Duration,
        /// Print the JSON Schema of `-o json` (and `-o yaml`) and exit.
        #[arg(long)]
        schema: bool,
    },
    /// Query an NTP server once: offset, delay, stratum, reference, leap.
    Query {
        /// HOST[:PORT], port 123 by default.
        target: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
}

/// Exit status: 0 success (for `query`: served by a synchronized server), 1 error, and for
/// `query` 2 when the server is unsynchronized and 3 when it refused (Kiss-o'-Death).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let output = if cli.json { Output::Json } else { cli.output };
    match cli.command {
        Command::Report {
            since,
            until,
            period,
            prometheus,
            audit_log,
            allowed_unsynchronized,
            schema,
        } => {
            use stratum_agent::compliance;
            if schema {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&compliance::json_schema())?
                );
                return Ok(ExitCode::SUCCESS);
            }
            anyhow::ensure!(
                !period.is_negative() && !allowed_unsynchronized.is_negative(),
                "--period and --allowed-unsynchronized must not be negative"
            );
            let until = until.unwrap_or_else(k8s_openapi::jiff::Timestamp::now);
            let since = match since {
                Some(s) => s,
                None => until
                    .checked_sub(k8s_openapi::jiff::SignedDuration::try_from(
                        std::time::Duration::from(period),
                    )?)
                    .context("--period reaches before the year -9999")?,
            };
            anyhow::ensure!(
                since < until,
                "--since ({since}) must be before --until ({until})"
            );
            let request = compliance::fetch::Request {
                since,
                until,
                prometheus,
                audit_log,
                allowed_unsynchronized_seconds: std::time::Duration::from(allowed_unsynchronized)
                    .as_secs_f64(),
            };
            let evidence = compliance::fetch::gather(&request).await?;
            for e in [
                &evidence.metrics.as_ref().err(),
                &evidence.rbac.as_ref().err(),
            ]
            .into_iter()
            .flatten()
            {
                eprintln!("report: missing evidence: {e}");
            }
            let report = compliance::build(&evidence);
            if output.structured() {
                output.print(&report)?;
            } else {
                print!("{}", compliance::markdown::render(&report));
            }
        }
        Command::Clients { tenant, limit } => {
            let mut path = format!("/clients?limit={limit}");
            if let Some(t) = &tenant {
                path.push_str(&format!(
                    "&tenant={}",
                    stratum_agent::compliance::prometheus::percent_encode(t)
                ));
            }
            let tenants: Vec<TenantClients> = fetch_json(&cli.agent, &path).await?;
            if output.structured() {
                #[derive(serde::Serialize)]
                struct Clients<'a> {
                    tenants: &'a [TenantClients],
                }
                let status = fetch(&cli.agent).await?;
                output.print(&WithIdentity {
                    identity: &status.identity,
                    view: Clients { tenants: &tenants },
                })?;
            } else {
                let now = stratum_agent::clock::host_realtime();
                for t in &tenants {
                    println!("Tenant {} (port {})", t.tenant, t.port);
                    println!(
                        "  {:<40} {:>10} {:>10} {:>8} {:>10}",
                        "Client", "Requests", "Dropped", "KoD", "Last"
                    );
                    for c in &t.clients {
                        let ago =
                            now.unix_nanos().saturating_sub(c.last_seen_unix_nanos) as f64 * 1e-9;
                        println!(
                            "  {:<40} {:>10} {:>10} {:>8} {:>9.0}s",
                            c.address.to_string(),
                            c.requests,
                            c.dropped,
                            c.kod,
                            ago.max(0.0)
                        );
                    }
                }
            }
        }
        Command::Serverstats => {
            let stats: ServerStats = fetch_json(&cli.agent, "/serverstats").await?;
            if output.structured() {
                let status = fetch(&cli.agent).await?;
                output.print(&WithIdentity {
                    identity: &status.identity,
                    view: &stats,
                })?;
            } else {
                print!("{}", serverstats_text(&stats));
            }
        }
        Command::Bench {
            target,
            rate,
            duration,
            max_requests,
            sources,
            source_count,
            wait,
            quiet,
            in_server,
            nts_ke,
            nts_ca,
        } => {
            if in_server && !target.ip().is_loopback() {
                anyhow::bail!("--in-server taps loopback: the target must be a loopback address");
            }
            let nts_jar = match nts_ke {
                Some(ke) => Some(nts_cookies(ke, nts_ca.as_deref(), target).await?),
                None => None,
            };
            let spec = LoadSpec {
                target,
                rate,
                duration: Duration::try_from_secs_f64(duration)
                    .context("--duration must be a non-negative number of seconds")?,
                max_requests,
                sources: loadgen::source_addresses(sources, source_count),
                wait: Duration::try_from_secs_f64(wait)
                    .context("--wait must be a non-negative number of seconds")?,
            };
            // Blocking threads and sleeps: keep them off the async runtime.
            let (load, in_server) = tokio::task::spawn_blocking(move || {
                let tap = in_server
                    .then(|| wire_tap::Tap::start(spec.target.port()))
                    .transpose()
                    .context("starting the loopback tap")?;
                let progress = |p: &loadgen::Progress| {
                    if !quiet {
                        eprintln!(
                            "{:>5.1}s  sent {:>10}  replies {:>10}",
                            p.elapsed.as_secs_f64(),
                            p.sent,
                            p.replies
                        );
                    }
                };
                let load = match nts_jar {
                    Some(jar) => loadgen::run_nts(&spec, jar, progress)?,
                    None => loadgen::run(&spec, progress)?,
                };
                let in_server = tap
                    .map(wire_tap::Tap::finish)
                    .transpose()
                    .context("reading the loopback tap")?;
                anyhow::Ok((load, in_server))
            })
            .await??;
            if output.structured() {
                output.print(&BenchOutput { load, in_server })?;
            } else {
                print_load_report(&load);
                if let Some(tap) = &in_server {
                    print_tap_report(tap);
                }
            }
        }
        Command::EchoServer {
            listen,
            workers,
            duration,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            let timer = {
                let stop = stop.clone();
                let run_for = Duration::try_from_secs_f64(duration)
                    .context("--duration must be a non-negative number of seconds")?
                    .min(loadgen::MAX_DURATION);
                std::thread::spawn(move || {
                    std::thread::sleep(run_for);
                    stop.store(true, Ordering::Relaxed);
                })
            };
            eprintln!("echoing on {listen} with {workers} worker(s) for {duration} s");
            let echoed =
                tokio::task::spawn_blocking(move || loadgen::echo_server(listen, workers, &stop))
                    .await??;
            let _ = timer.join();
            eprintln!("echoed {echoed} datagrams");
        }
        Command::DelayProxy {
            listen,
            upstream,
            scenario,
            seed,
            route_change_after,
            duration,
        } => {
            let plan = DelayPlan::new(
                scenario,
                seed,
                Duration::try_from_secs_f64(route_change_after)
                    .context("--route-change-after must be a non-negative number of seconds")?,
            );
            let run_for = Duration::try_from_secs_f64(duration)
                .context("--duration must be a non-negative number of seconds")?
                .min(loadgen::MAX_DURATION);
            let stop = Arc::new(AtomicBool::new(false));
            let timer = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(run_for);
                    stop.store(true, Ordering::Relaxed);
                })
            };
            eprintln!("relaying {listen} -> {upstream} ({scenario}, seed {seed}) for {duration} s");
            let stats = tokio::task::spawn_blocking(move || {
                delay_proxy::relay(listen, upstream, plan, &stop)
            })
            .await??;
            let _ = timer.join();
            eprintln!(
                "relayed {} out, {} back, dropped {}",
                stats.out, stats.back, stats.dropped
            );
        }
        Command::Waitsync {
            target,
            timeout,
            interval,
            max_distance,
            max_offset,
            quiet,
        } => {
            if !(0.0..=3600.0).contains(&timeout) {
                anyhow::bail!("--timeout must be between 0 and 3600 seconds");
            }
            if !(interval >= 0.1 && interval.is_finite()) {
                anyhow::bail!("--interval must be at least 0.1 seconds");
            }
            let bound = SyncBound {
                max_root_distance: max_distance,
                max_offset,
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
            let mut answered = false;
            let last_problem = loop {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                // A name may start resolving only once the cluster's DNS is up: look it up
                // every time.
                let attempt = match resolve_target(&target).await {
                    Ok(addr) => query(addr, remaining.min(Duration::from_secs(2)))
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(anyhow::Error::from(e).context(format!("resolving {target}"))),
                };
                let problem = match attempt {
                    Ok(r) => {
                        answered = true;
                        match r.wait_step(bound) {
                            WaitStep::Done => {
                                if output.structured() {
                                    output.print(&r)?;
                                } else if !quiet {
                                    println!(
                                        "synchronized: offset {}, root distance {}",
                                        fmt_seconds(r.offset_seconds),
                                        fmt_seconds(r.root_distance())
                                    );
                                }
                                return Ok(ExitCode::SUCCESS);
                            }
                            WaitStep::Refused(why) => {
                                eprintln!("waitsync: {why}");
                                return Ok(ExitCode::from(Verdict::Refused.exit_code()));
                            }
                            WaitStep::NotYet(why) => why,
                        }
                    }
                    Err(e) => format!("{e:#}"),
                };
                if !quiet {
                    eprintln!("waitsync: not yet: {problem}");
                }
                let pause = Duration::from_secs_f64(interval);
                if tokio::time::Instant::now() + pause >= deadline {
                    break problem;
                }
                tokio::time::sleep(pause).await;
            };
            eprintln!("waitsync: gave up after {timeout} s: {last_problem}");
            return Ok(ExitCode::from(if answered {
                Verdict::Unsynchronized.exit_code()
            } else {
                1
            }));
        }
        Command::Query { target, timeout } => {
            let addr = resolve_target(&target)
                .await
                .with_context(|| format!("resolving {target}"))?;
            let r = query(addr, Duration::from_secs_f64(timeout)).await?;
            if output.structured() {
                output.print(&r)?;
            } else {
                println!("Server          : {}", r.server);
                if let Some(code) = &r.kiss_code {
                    // A Kiss-o'-Death carries no time: say what the server refused and stop.
                    println!("Kiss-o'-Death   : {code} (the server refused to serve this client)");
                    return Ok(ExitCode::from(r.verdict().exit_code()));
                }
                println!("Stratum         : {}", r.stratum);
                println!("Reference ID    : {}", r.reference_id);
                println!("Leap status     : {}", r.leap);
                println!(
                    "Offset          : {} (server − this host)",
                    fmt_seconds(r.offset_seconds)
                );
                println!("Round-trip delay: {}", fmt_seconds(r.delay_seconds));
                println!("Root delay      : {}", fmt_seconds(r.root_delay_seconds));
                println!(
                    "Root dispersion : {}",
                    fmt_seconds(r.root_dispersion_seconds)
                );
            }
            return Ok(ExitCode::from(r.verdict().exit_code()));
        }
        Command::Tracking => {
            let s = fetch(&cli.agent).await?;
            if output.structured() {
                output.print(&WithIdentity {
                    identity: &s.identity,
                    view: &s.tracking,
                })?;
            } else {
                let t = &s.tracking;
                println!(
                    "Node            : {} (TimeService {}, clock {})",
                    s.identity.node, s.identity.time_service, s.identity.clock
                );
                println!(
                    "Reference ID    : {} {}",
                    t.reference_id,
                    t.system_peer.as_deref().unwrap_or("")
                );
                println!("Stratum         : {}", t.stratum);
                println!(
                    "Synchronized    : {} ({} of min {} sources agree)",
                    if t.synchronized { "yes" } else { "no" },
                    t.agreeing_sources,
                    t.min_sources
                );
                println!(
                    "System offset   : {} (node clock − true time)",
                    fmt_seconds(t.offset_seconds)
                );
                if let Some(line) = stratum_agent::status::host_daemon_line(t) {
                    println!("Host daemon     : {line}");
                }
                if let Some(why) = &t.clock_yielded {
                    println!("Clock yielded   : {why}");
                }
                println!(
                    "Frequency       : {:+.3} ppm (± {:.3} ppm)",
                    t.frequency_ppm, t.frequency_error_ppm
                );
                println!("Jitter          : {}", fmt_seconds(t.jitter_seconds));
                println!("Root delay      : {}", fmt_seconds(t.root_delay_seconds));
                println!(
                    "Root dispersion : {}",
                    fmt_seconds(t.root_dispersion_seconds)
                );
                println!("Leap status     : {}", t.leap);
                if output == Output::Wide {
                    println!(
                        "Root distance   : {}",
                        fmt_seconds(t.root_distance_seconds).trim_start_matches('+')
                    );
                    println!(
                        "Last update     : {}",
                        t.last_update_ago_seconds
                            .map_or("never".into(), |ago| format!("{ago:.1} s ago"))
                    );
                    println!(
                        "Agent           : version {}, config from {}",
                        s.identity.version,
                        s.identity.config_source.name()
                    );
                }
                println!(
                    "Steps           : {}{}",
                    t.steps,
                    t.last_step_seconds
                        .map(|s| format!(" (last {})", fmt_seconds(s)))
                        .unwrap_or_default()
                );
                if let Some(r) = &t.refusal {
                    println!("Refused         : {r}");
                }
                println!(
                    "Config          : revision {}{}",
                    s.identity.config_revision,
                    s.identity
                        .config_error
                        .as_deref()
                        .map(|e| format!(" (latest change rejected: {e})"))
                        .unwrap_or_default()
                );
            }
        }
        Command::Sourcestats | Command::Sources => {
            let s = fetch(&cli.agent).await?;
            if output.structured() {
                output.print(&WithIdentity {
                    identity: &s.identity,
                    view: SourcesView {
                        sources: &s.sources,
                    },
                })?;
            } else if matches!(cli.command, Command::Sources) {
                print!(
                    "{}",
                    stratum_agent::status::sources_table(&s.sources, output == Output::Wide)
                );
            } else {
                print!(
                    "{}",
                    sourcestats_table(&s.sources, s.tracking.frequency_ppm)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sources` and `sourcestats` in JSON or YAML.
#[derive(serde::Serialize)]
struct SourcesView<'a> {
    sources: &'a [stratum_agent::status::SourceView],
}

/// `bench --json`: the load report, plus the tap's when `--in-server` asked for it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BenchOutput {
    #[serde(flatten)]
    load: LoadReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_server: Option<TapReport>,
}

/// "p50 … us, p90 …, p99 …, p99.9 …, max …": one latency line of `bench`.
/// `stratumctl serverstats` as text: the per-tenant counters, then an authentication table
/// for the tenants that saw NTS or symmetric keys (or refused requests without them), so the
/// plain majority keeps the one table; then the ports not served.
fn serverstats_text(stats: &ServerStats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Serving {} (stratum {}), {} worker(s) for all ports",
        if stats.synchronized {
            "synchronized"
        } else {
            "UNSYNCHRONIZED (LI=3)"
        },
        stats.stratum,
        stats.workers
    );
    let _ = writeln!(
        out,
        "{:<32} {:>6} {:>11} {:>11} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8}",
        "Tenant",
        "Port",
        "Received",
        "Served",
        "Unsync",
        "Denied",
        "RateLim",
        "KoD-R",
        "KoD-D",
        "Malformed",
        "Ignored"
    );
    for t in &stats.tenants {
        let n = &t.totals;
        let _ = writeln!(
            out,
            "{:<32} {:>6} {:>11} {:>11} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8}",
            t.tenant,
            t.port,
            n.received,
            n.served,
            n.served_unsynchronized,
            n.denied,
            n.rate_limited,
            n.kod_rate,
            n.kod_deny,
            n.malformed,
            n.ignored
        );
    }
    let authenticating: Vec<_> = stats
        .tenants
        .iter()
        .filter(|t| {
            let n = &t.totals;
            n.authenticated
                + n.nts_nak
                + n.nts_failed
                + n.mac_authenticated
                + n.mac_nak
                + n.mac_failed
                + n.unauthenticated
                > 0
        })
        .collect();
    if !authenticating.is_empty() {
        // NTS: authenticated replies, NTS NAKs, dropped NTS requests; symmetric keys: signed
        // replies, crypto-NAKs, dropped MAC requests; then requests without either refused.
        let _ = writeln!(
            out,
            "\n{:<32} {:>6} {:>11} {:>8} {:>10} {:>11} {:>10} {:>8} {:>15}",
            "Authenticating tenant",
            "Port",
            "NTS",
            "NTS-NAK",
            "NTS-Failed",
            "Signed",
            "Crypto-NAK",
            "Bad-MAC",
            "Unauthenticated"
        );
        for t in authenticating {
            let n = &t.totals;
            let _ = writeln!(
                out,
                "{:<32} {:>6} {:>11} {:>8} {:>10} {:>11} {:>10} {:>8} {:>15}",
                t.tenant,
                t.port,
                n.authenticated,
                n.nts_nak,
                n.nts_failed,
                n.mac_authenticated,
                n.mac_nak,
                n.mac_failed,
                n.unauthenticated
            );
        }
    }
    for f in &stats.failed {
        let _ = writeln!(
            out,
            "{:<32} {:>6} NOT SERVED after {} attempt(s): {}",
            f.tenant, f.port, f.attempts, f.error
        );
    }
    out
}

fn quantiles_us(l: &LatencySummary) -> String {
    let us = |ns: u64| ns as f64 / 1000.0;
    format!(
        "p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        us(l.p50_ns),
        us(l.p90_ns),
        us(l.p99_ns),
        us(l.p999_ns),
        us(l.max_ns)
    )
}

fn print_tap_report(t: &TapReport) {
    println!(
        "In server       : {} ({} paired of {} requests seen; {} unanswered)",
        quantiles_us(&t.latency),
        t.paired,
        t.requests,
        t.unanswered
    );
}

fn print_load_report(r: &LoadReport) {
    println!(
        "Target          : {} from {} source address(es)",
        r.target, r.sources
    );
    println!(
        "Sent            : {} in {:.2} s ({:.0}/s of {:.0}/s asked{})",
        r.sent,
        r.send_seconds,
        r.sent_rate,
        r.target_rate,
        if r.generator_limited {
            ", GENERATOR-LIMITED"
        } else {
            ""
        }
    );
    println!(
        "Answered        : {} ({} unsynchronized)",
        r.answered, r.unsynchronized
    );
    println!(
        "Kiss-o'-Death   : RATE {}, DENY {}, other {}",
        r.kod_rate, r.kod_deny, r.kod_other
    );
    println!(
        "Lost            : {} ({:.4}%)",
        r.lost,
        r.loss_ratio * 100.0
    );
    println!("Latency         : {}", quantiles_us(&r.latency));
}

/// GETs the agent's status over plain HTTP/1.1 on loopback.
async fn fetch(agent: &str) -> anyhow::Result<AgentStatus> {
    fetch_json(agent, "/status").await
}

/// GETs `path` from the agent's status endpoint and decodes the JSON body.
async fn fetch_json<T: serde::de::DeserializeOwned>(agent: &str, path: &str) -> anyhow::Result<T> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(agent)
        .await
        .with_context(|| {
            format!("connecting to the agent at {agent} (is stratum-agent running? see --agent)")
        })?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8(response).context("agent reply is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP reply from the agent")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "agent answered: {}",
        head.lines().next().unwrap_or("")
    );
    serde_json::from_str(body).with_context(|| format!("decoding the agent's {path}"))
}

/// Cookies for `stratumctl bench --nts-ke`: a key exchange with `ke`, then one authenticated
/// exchange with `target`, so a load never measures a server that answers without NTS.
async fn nts_cookies(
    ke: SocketAddr,
    ca: Option<&std::path::Path>,
    target: SocketAddr,
) -> anyhow::Result<stratum_ntp::nts::CookieJar> {
    use stratum_agent::nts_ke;
    use stratum_ntp::nts::ef::{ClientRequest, verify_response};
    let trust = match ca {
        Some(path) => nts_ke::client_config(nts_ke::roots_from_pem_file(path)?)?,
        None => nts_ke::trust(None)?,
    };
    let exchange = nts_ke::key_exchange(
        &ke.ip().to_string(),
        ke.port(),
        trust,
        Duration::from_secs(5),
    )
    .await
    .with_context(|| format!("NTS key exchange with {ke}"))?;
    let mut jar = stratum_ntp::nts::CookieJar::new(exchange.keys, exchange.agreement.cookies);
    // The request the load will send, so the check exercises exactly that.
    let header = stratum_ntp::packet::Packet::parse(&loadgen::client_request(
        stratum_agent::clock::host_realtime(),
    ))?
    .header;
    let request = ClientRequest::build(&header, &mut jar, &mut rand::rng())
        .context("the key exchange gave no cookie")?;
    let socket = tokio::net::UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    socket.send_to(&request.datagram, target).await?;
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .with_context(|| format!("no answer from {target} to an NTS request"))??;
    let answer = verify_response(&buf[..n], &request.unique_id, &jar.keys().s2c)
        .with_context(|| format!("{target} did not answer with authenticated NTS"))?;
    jar.add(answer.cookies);
    Ok(jar)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row<'a>(text: &'a str, table: &str, tenant: &str) -> Vec<&'a str> {
        text.split(table)
            .nth(1)
            .and_then(|rest| rest.lines().find(|l| l.starts_with(tenant)))
            .map(|l| l.split_whitespace().skip(2).collect())
            .unwrap_or_default()
    }

    /// An NTS tenant, a symmetric-key tenant and a plain one: the authentication table lists
    /// the first two with their own columns, and leaves the plain tenant out.
    #[test]
    fn serverstats_shows_nts_and_symmetric_key_tenants_in_the_authentication_table() {
        let tenant = |id: &str, port: u16, totals: serde_json::Value| serde_json::json!({"tenant": id, "port": port, "clientsTracked": 1, "totals": totals});
        let zero = serde_json::json!({
            "received": 10, "served": 10, "servedUnsynchronized": 0, "denied": 0,
            "rateLimited": 0, "malformed": 0, "ignored": 0, "kodRate": 0, "kodDeny": 0,
            "ntsNak": 0, "ntsFailed": 0, "unauthenticated": 0, "authenticated": 0,
            "macNak": 0, "macFailed": 0, "macAuthenticated": 0
        });
        let with = |changes: serde_json::Value| {
            let mut t = zero.clone();
            t.as_object_mut()
                .unwrap()
                .extend(changes.as_object().unwrap().clone());
            t
        };
        let stats: ServerStats = serde_json::from_value(serde_json::json!({
            "workers": 2, "synchronized": true, "stratum": 3,
            "tenants": [
                tenant("team-a/ntp", 12301, with(serde_json::json!({"authenticated": 7, "ntsNak": 1}))),
                tenant("lab/ntp", 12302, with(serde_json::json!(
                    {"macAuthenticated": 5, "macNak": 2, "macFailed": 1, "unauthenticated": 3}))),
                tenant("plain/ntp", 12303, zero.clone()),
            ]
        }))
        .unwrap();
        let text = serverstats_text(&stats);
        let table = "Authenticating tenant";
        assert_eq!(
            row(&text, table, "team-a/ntp"),
            ["7", "1", "0", "0", "0", "0", "0"],
            "{text}"
        );
        assert_eq!(
            row(&text, table, "lab/ntp"),
            ["0", "0", "0", "5", "2", "1", "3"],
            "{text}"
        );
        assert!(row(&text, table, "plain/ntp").is_empty(), "{text}");
        assert_eq!(
            row(&text, "Tenant", "plain/ntp")[..2],
            ["10", "10"],
            "{text}"
        );
    }
}
