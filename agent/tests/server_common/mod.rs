//! Helpers shared by the server integration tests: an in-process server with a chosen clock,
//! config builders, a one-shot client bound to a chosen source address, and the external NTP
//! programs (chronyd, ntpdig, ntpd-rs), looked up so a test can skip with a clear message
//! when one is missing (`bench/setup.sh` installs them).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/chronyd_query.rs"]
mod chronyd_query;
#[path = "../common/poll.rs"]
mod poll;
#[allow(unused_imports)]
pub use chronyd_query::chronyd_query;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use stratum_agent::clock::{Timescale, host_realtime};
use stratum_agent::server::{Server, ServerOptions};
use stratum_api::agent_config::{RateLimitConfig, ServingConfig, TenantConfig};
use stratum_ntp::packet::{LeapIndicator, ReferenceId};
use stratum_ntp::server::ServerClockState;
use stratum_ntp::time::NtpTimestamp;

/// A UDP port free on every address right now (the kernel's pick; racy only against other
/// processes grabbing the same ephemeral port in the next instant).
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("[::]:0").expect("binding an ephemeral port");
    socket.local_addr().unwrap().port()
}

/// A tenant allowing `allowed`, with a generous per-client limit unless changed.
pub fn tenant(id: &str, port: u16, allowed: &[&str], kod: bool) -> TenantConfig {
    TenantConfig {
        id: id.into(),
        port,
        allowed: allowed.iter().map(|a| a.parse().unwrap()).collect(),
        allowed_sets: vec![],
        denied: vec![],
        rate_limit: RateLimitConfig {
            client_interval_seconds: 0.001,
            client_burst: 1000,
            tenant_requests_per_second: None,
            tenant_burst: None,
            kiss_of_death: kod,
        },
        max_root_distance_seconds: None,
        nts: None,
        symmetric_keys: None,
    }
}

pub fn serving(tenants: Vec<TenantConfig>) -> ServingConfig {
    ServingConfig {
        holdover_seconds: 0.0,
        local_stratum: None,
        peer_port: None,
        peer_allowed: vec![],
        tenants,
        cidr_sets: vec![],
        metrics_per_tenant: true,
        nts_cookie_keys_file: None,
    }
}

/// A synchronized stratum-2 state on the host clock (which is true time for these tests).
pub fn synchronized_state() -> ServerClockState {
    let now = host_realtime();
    ServerClockState {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        precision: -20,
        root_delay: 0.0005,
        root_dispersion: 0.0005,
        reference_id: ReferenceId([127, 0, 0, 1]),
        reference_time: NtpTimestamp::from_clock_time(now),
        updated_at: now,
    }
}

/// An in-process server of `workers` worker threads (for all ports) serving synchronized
/// host time.
pub fn start_server(workers: usize, config: &ServingConfig) -> Server {
    start_server_on("::".parse().unwrap(), workers, config)
}

/// As [`start_server`], binding `bind`.
pub fn start_server_on(bind: IpAddr, workers: usize, config: &ServingConfig) -> Server {
    let server = Server::new(ServerOptions {
        workers,
        bind,
        ..ServerOptions::default()
    });
    server.publish_clock(synchronized_state(), Timescale::IDENTITY);
    let report = server.apply(config);
    assert!(
        report.failed.is_empty(),
        "ports failed: {:?}",
        report.failed
    );
    server
}

/// A 48-byte NTPv4 client request with a recognisable transmit timestamp.
pub fn client_request(cookie: u64) -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0] = (4 << 3) | 3;
    r[40..48].copy_from_slice(&cookie.to_be_bytes());
    r
}

/// Sends one request from `source` to `target` and waits up to `timeout` for the answer.
pub fn ask(source: IpAddr, target: SocketAddr, timeout: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).expect("binding the client");
    socket.set_read_timeout(Some(timeout)).unwrap();
    let cookie = 0x5EED_0000_0000_0000 | u64::from(socket.local_addr().unwrap().port());
    socket.send_to(&client_request(cookie), target).ok()?;
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            return None;
        };
        if from.port() == target.port() && n >= 48 && buf[24..32] == cookie.to_be_bytes() {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// Whether `condition` holds within `timeout` ([`poll::poll_until`]).
pub fn wait_until(timeout: Duration, condition: impl FnMut() -> bool) -> bool {
    poll::poll_until(timeout, condition).is_some()
}

/// A program on PATH (or at one of `extra` paths).
pub fn find_program(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    extra
        .iter()
        .cloned()
        .chain(on_path)
        .chain([
            PathBuf::from("/usr/sbin").join(name),
            PathBuf::from("/usr/bin").join(name),
        ])
        .find(|p| p.is_file())
}

/// ntpd-rs' daemon: `NTPD_RS_BIN`, then bench/setup.sh's cache, then PATH.
pub fn ntpd_rs() -> Option<PathBuf> {
    let mut extra = Vec::new();
    if let Some(dir) = std::env::var_os("NTPD_RS_BIN") {
        extra.push(PathBuf::from(dir).join("ntp-daemon"));
    }
    let cache = std::env::var_os("STRATUM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/stratum")));
    if let Some(cache) = cache {
        // The benchmark's release build, else the debug build `make deps` makes for the tests.
        extra.push(cache.join("ntpd-rs-1.9.0/bin/ntp-daemon"));
        extra.push(cache.join("ntpd-rs-1.9.0-debug/bin/ntp-daemon"));
    }
    find_program("ntp-daemon", &extra)
}

/// Prints why a test is skipped; returns `None` so callers can `let Some(x) = .. else`.
pub fn skip<T>(why: &str) -> Option<T> {
    eprintln!("SKIPPED: {why} (bench/setup.sh installs it)");
    None
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "stratum-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident set size of this process, bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A chronyd serving (`-x`: never touching the clock) stratum 2 to loopback on `port`, without
/// CAP_SYS_TIME, its files in `dir`; stopped when the returned child drops. `None` (with a
/// SKIPPED line) when chronyd is not installed.
pub fn chronyd_serving(dir: &TempDir, port: u16) -> Option<Child> {
    let chronyd = find_program("chronyd", &[]).or_else(|| skip("chronyd not installed"))?;
    std::fs::write(
        dir.path("chrony.conf"),
        format!(
            "port {port}\nlocal stratum 2\nallow 127.0.0.0/8\ncmdport 0\npidfile {}\n",
            dir.path("chronyd.pid").display()
        ),
    )
    .unwrap();
    let child = std::process::Command::new("setpriv")
        .args(["--bounding-set=-sys_time", "--inh-caps=-sys_time"])
        .arg(&chronyd)
        .args(["-x", "-d", "-u", "root", "-f"])
        .arg(dir.path("chrony.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting chronyd");
    Some(Child(child))
}

/// A TCP port free on loopback right now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Status code and body of `GET path` on a loopback port (the agent's HTTP surfaces).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// Runs `ntp-ctl force-sync` (ntpd-rs' one-shot client) with the config `toml` under a
/// pseudo-terminal (it insists on one), answers "no" to its offer to set the clock, and
/// returns what it printed. It runs without CAP_SYS_TIME whatever the caller has.
pub fn ntp_ctl_force_sync(ctl: &std::path::Path, toml: &str) -> String {
    let dir = TempDir::new("ntpdrs");
    let conf = dir.path("ntp.toml");
    std::fs::write(&conf, toml).unwrap();
    let mut child = std::process::Command::new("setpriv")
        .args(["--bounding-set=-sys_time", "--inh-caps=-sys_time"])
        .args(["timeout", "20", "script", "-qec"])
        .arg(format!(
            "{} force-sync -c {}",
            ctl.display(),
            conf.display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running ntp-ctl force-sync");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"n\n").unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
