//! Test harness: real NTP peers (chronyd from Debian, optionally behind libfaketime to make a
//! falseticker) and real agent processes, all on loopback, every process killed on drop.
//! Waits are on conditions with a deadline, never blind sleeps.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

mod chronyd_query;
mod poll;
#[allow(unused_imports)]
pub use chronyd_query::chronyd_query;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "stratum-it-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

/// A free UDP port on `ip` (bound then released; the race with other tests is harmless on
/// per-test loopback addresses).
pub fn free_udp_port(ip: Ipv4Addr) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Finds a binary on PATH or in /usr/sbin, or fails the test saying how to get it.
pub fn require(binary: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(binary);
        if p.is_file() {
            return p;
        }
    }
    panic!("{binary} not found: run `make deps` (installs chrony, ntpsec-ntpdig and faketime)");
}

/// libfaketime's preload library (Debian package `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        // Both chronyd and the agent exit on SIGTERM (the agent after saving its drift): wait
        // for that exit itself rather than polling for it.
        let _ = self.child.wait();
    }
}

/// chronyd serving its (never adjusted) clock at `local stratum 2`, optionally shifted by
/// libfaketime (`"+10s"`) to play a falseticker.
pub fn chronyd(dir: &Path, ip: Ipv4Addr, port: u16, fake_offset: Option<&str>) -> Proc {
    chronyd_with(dir, ip, port, fake_offset, "")
}

/// [`chronyd`] with `extra` lines appended to its configuration (NTS server keys, say).
pub fn chronyd_with(
    dir: &Path,
    ip: Ipv4Addr,
    port: u16,
    fake_offset: Option<&str>,
    extra: &str,
) -> Proc {
    let conf = dir.join(format!("chrony-{ip}-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbindaddress {ip}\ncmdport 0\nlocal stratum 2\nallow 127.0.0.0/8\npidfile {pid}\ndriftfile {drift}\n{extra}",
            pid = dir.join(format!("chronyd-{port}.pid")).display(),
            drift = dir.join(format!("chronyd-{port}.drift")).display(),
        ),
    )
    .unwrap();
    let log = dir.join(format!("chronyd-{port}.log"));
    let chronyd = require("chronyd");
    // -x: never touch the system clock; -d: foreground. libfaketime is preloaded directly (the
    // `faketime` wrapper forks, and killing it would orphan chronyd).
    let mut cmd = Command::new(chronyd);
    if let Some(offset) = fake_offset {
        require("faketime");
        cmd.env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME", offset)
            .env("DONT_FAKE_MONOTONIC", "1");
    }
    cmd.arg("-x").arg("-d").arg("-f").arg(&conf);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn chronyd");
    let proc = Proc {
        child,
        name: format!("chronyd {ip}:{port}"),
        log,
    };
    wait_for(
        Duration::from_secs(10),
        &format!("{} answering", proc.name),
        || ntp_answers(SocketAddr::from((ip, port))),
    );
    proc
}

/// Whether an NTP server answers a client request.
pub fn ntp_answers(server: SocketAddr) -> bool {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut request = [0u8; 48];
    request[0] = 0x23; // LI 0, version 4, mode 3
    request[40..48].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    if socket.send_to(&request, server).is_err() {
        return false;
    }
    let mut buf = [0u8; 128];
    matches!(socket.recv_from(&mut buf), Ok((n, _)) if n >= 48)
}

/// Waits until `cond` holds ([`poll::poll_until`]), or fails the test after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, cond: impl FnMut() -> bool) -> Duration {
    poll::poll_until(timeout, cond)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// An agent process with a file config.
pub struct Agent {
    pub proc: Proc,
    pub started: Instant,
    pub config: PathBuf,
    pub metrics: SocketAddr,
    pub status: SocketAddr,
}

/// An upstream entry for the agent config.
pub fn upstream(addr: SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "host": addr.ip().to_string(), "kind": "server", "port": addr.port(), "iburst": true,
        "minPoll": 4, "maxPoll": 6, "maxSources": 1
    })
}

/// An agent config polling `upstreams` with the given minimum of agreeing sources.
pub fn agent_config(
    revision: &str,
    upstreams: &[SocketAddr],
    min_sources: u8,
    dir: &Path,
) -> serde_json::Value {
    serde_json::json!({
        "version": 1, "revision": revision, "timeService": "it",
        "clock": {"backend": "simulated"},
        "upstreams": upstreams.iter().map(|a| upstream(*a)).collect::<Vec<_>>(),
        "selection": {"minSources": min_sources, "maxDistanceSeconds": 1.5},
        "discipline": {"makeStepThresholdSeconds": 0.128, "makeStepLimit": 3, "maxSlewPpm": 500,
            "panicStartupSeconds": 86400, "panicRuntimeSeconds": 1000, "rtcSync": true,
            "driftFile": dir.join("drift.json").display().to_string()},
        "leap": {"mode": "kernel", "smearWindowSeconds": 86400},
        "serving": {"holdoverSeconds": 3600, "tenants": []},
        "reporting": {"heartbeatSeconds": 30}
    })
}

/// Writes a config atomically (rename), as a ConfigMap volume update would.
pub fn write_config(path: &Path, config: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Agent {
    /// Starts `stratum-agent run` with a simulated clock `sim_offset` seconds and `sim_ppm` off.
    /// Its HTTP ports live on `127.<block>.1.1`, so parallel tests never collide.
    pub fn start(
        dir: &Path,
        block: u8,
        config: &serde_json::Value,
        sim_offset: f64,
        sim_ppm: f64,
    ) -> Agent {
        let config_path = dir.join("agent-config.json");
        write_config(&config_path, config);
        let metrics: SocketAddr = ([127, block, 1, 1], 9123).into();
        let status: SocketAddr = ([127, block, 1, 1], 9124).into();
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_stratum-agent"))
            .args([
                "run",
                "--no-report",
                "--clock",
                "simulated",
                "--node-name",
                "it-node",
            ])
            .arg("--config")
            .arg(&config_path)
            .arg(format!("--sim-offset={sim_offset}"))
            .arg(format!("--sim-frequency-ppm={sim_ppm}"))
            .arg(format!("--metrics-addr={metrics}"))
            .arg(format!("--status-addr={status}"))
            .arg("--state-dir")
            .arg(dir)
            .env("STRATUM_DENY_SYSTEM_CLOCK", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn stratum-agent");
        Agent {
            proc: Proc {
                child,
                name: "stratum-agent".into(),
                log,
            },
            started: Instant::now(),
            config: config_path,
            metrics,
            status,
        }
    }

    /// GET `path` on the metrics port: (status code, body).
    pub fn get_metrics_port(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics, path)
    }

    /// The agent's status JSON.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.status, "/status")?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    pub fn ready(&self) -> bool {
        matches!(self.get_metrics_port("/readyz"), Some((200, _)))
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Runs stratumctl against this agent.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_stratumctl"))
            .arg("--agent")
            .arg(self.status.to_string())
            .args(args)
            .output()
            .unwrap()
    }
}

/// Minimal HTTP/1.1 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The sources array of a status, as (address, state) pairs.
pub fn source_states(status: &serde_json::Value) -> Vec<(String, String)> {
    status["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["address"].as_str().unwrap_or("").to_string(),
                        s["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
