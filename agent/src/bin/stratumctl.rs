//! `stratumctl`: look at the local agent (`tracking`, `sources`) or query any NTP server
//! (`query HOST[:PORT]`). Every view takes `--json`.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stratum_agent::query::{query, resolve_target};
use stratum_agent::status::{AgentStatus, fmt_seconds};

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
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The system clock: sync state, offset, frequency, stratum, root delay and dispersion.
    Tracking,
    /// Every source with its role, reachability, offset, delay and jitter.
    Sources,
    /// Query an NTP server once: offset, delay, stratum, reference, leap.
    Query {
        /// HOST[:PORT], port 123 by default.
        target: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Query { target, timeout } => {
            let addr = resolve_target(&target)
                .await
                .with_context(|| format!("resolving {target}"))?;
            let r = query(addr, Duration::from_secs_f64(timeout)).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("Server          : {}", r.server);
                if let Some(code) = &r.kiss_code {
                    println!("Kiss-o'-Death   : {code}");
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
        }
        Command::Tracking => {
            let s = fetch(&cli.agent).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s.tracking)?);
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
        Command::Sources => {
            let s = fetch(&cli.agent).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s.sources)?);
            } else {
                println!(
                    "{:<2} {:<28} {:<12} {:>3} {:>4} {:>4} {:>12} {:>12} {:>12}",
                    "", "Source", "State", "St", "Poll", "Reach", "Offset", "Delay", "Jitter"
                );
                for src in &s.sources {
                    let mark = match src.state.as_str() {
                        "selected" => "*",
                        "combined" => "+",
                        "candidate" => "-",
                        "falseticker" => "x",
                        "unreachable" => "?",
                        _ => " ",
                    };
                    let opt = |v: Option<f64>| v.map(fmt_seconds).unwrap_or_else(|| "-".into());
                    println!(
                        "{mark:<2} {:<28} {:<12} {:>3} {:>4} {:>4o} {:>12} {:>12} {:>12}",
                        format!("{} {}", src.name, src.address),
                        src.state,
                        src.stratum.map_or("-".into(), |s| s.to_string()),
                        src.poll,
                        src.reach,
                        opt(src.offset_seconds),
                        opt(src.delay_seconds),
                        opt(src.jitter_seconds),
                    );
                }
            }
        }
    }
    Ok(())
}

/// GETs the agent's status over plain HTTP/1.1 on loopback.
async fn fetch(agent: &str) -> anyhow::Result<AgentStatus> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(agent)
        .await
        .with_context(|| {
            format!("connecting to the agent at {agent} (is stratum-agent running? see --agent)")
        })?;
    stream
        .write_all(
            format!("GET /status HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
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
    serde_json::from_str(body).context("decoding the agent's status")
}
