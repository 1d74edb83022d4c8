//! Another time daemon on the node (chronyd, ntpd, ntpd-rs, systemd-timesyncd): two programs
//! steering one clock fight, and each blames the other's corrections on the network. The agent
//! looks for one without any privilege or host mount:
//! - the kernel's own PLL or FLL switched on (`adjtimex` read with modes 0): ntpd and
//!   systemd-timesyncd discipline through it; the agent never does;
//! - UDP sockets of the node's network namespace (`/proc/net/udp{,6}`, the node's own with
//!   the default host network): chronyd's command port 323 on loopback, or port 123 bound by
//!   something that is not this agent.
//!
//! What it cannot see: a timesyncd that left the PLL off, and, with a pod network, sockets of
//! the node. The parsing and the judgement are pure; [`observe`] does the reading.
//!
//! Beside a daemon, the agent also reads that daemon's own view of the clock ([`daemon_clock`]):
//! chronyd answers `tracking` on its command port ([`chrony`]); ntpd and systemd-timesyncd
//! leave their correction and error estimate in the kernel. Set beside the agent's own
//! measurement, it is what an admin compares before handing the clock over.

pub mod chrony;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use stratum_api::agent_config::ClockBackend;

use crate::clock::system::KernelClockState;
use crate::status::HostDaemonClock;

/// chronyd's command port (`cmdport`), bound on loopback by default.
const CHRONY_COMMAND_PORT: u16 = 323;
/// The NTP port.
const NTP_PORT: u16 = 123;
/// `st` of an unconnected (bound, listening) UDP socket in /proc/net/udp (TCP_CLOSE).
const UDP_UNCONNECTED: &str = "07";

/// One sign of another daemon.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Evidence {
    /// The kernel PLL is on (STA_PLL): ntpd or systemd-timesyncd.
    KernelPll,
    /// The kernel FLL is on (STA_FLL): ntpd.
    KernelFll,
    /// Port 323 bound on loopback: chronyd's command port.
    ChronyCommandPort(SocketAddr),
    /// Port 123 bound by another program: chronyd, ntpd or ntpd-rs.
    NtpPort(SocketAddr),
}

impl Evidence {
    /// Metric label, from a closed set.
    pub fn label(&self) -> &'static str {
        match self {
            Evidence::KernelPll => "kernel_pll",
            Evidence::KernelFll => "kernel_fll",
            Evidence::ChronyCommandPort(_) => "chrony_command_port",
            Evidence::NtpPort(_) => "ntp_port",
        }
    }

    /// Every label, for metrics that export one series each.
    pub const LABELS: [&'static str; 4] = [
        "kernel_pll",
        "kernel_fll",
        "chrony_command_port",
        "ntp_port",
    ];
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Evidence::KernelPll => {
                write!(f, "the kernel PLL is on (ntpd or systemd-timesyncd)")
            }
            Evidence::KernelFll => write!(f, "the kernel FLL is on (ntpd)"),
            Evidence::ChronyCommandPort(a) => {
                write!(f, "UDP {a} is bound (chronyd's command port)")
            }
            Evidence::NtpPort(a) => {
                write!(
                    f,
                    "UDP {a} is bound by another program (chronyd, ntpd or ntpd-rs)"
                )
            }
        }
    }
}

/// What one look found; empty when nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detection {
    /// Every sign, sorted.
    pub evidence: Vec<Evidence>,
}

impl Detection {
    /// Whether another daemon seems to run.
    pub fn found(&self) -> bool {
        !self.evidence.is_empty()
    }

    /// One sentence for status, conditions and Events; `None` when nothing was found.
    pub fn describe(&self) -> Option<String> {
        self.found().then(|| {
            let signs: Vec<String> = self.evidence.iter().map(ToString::to_string).collect();
            format!(
                "another time daemon seems to run on this node: {}",
                signs.join("; ")
            )
        })
    }
}

/// What the agent knows about other daemons, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostDaemonView {
    /// The last look.
    pub detection: Detection,
    /// Why the system clock is only observed, when the agent yielded it at start.
    pub yielded: Option<String>,
    /// The clock as that daemon sees it, read last.
    pub clock: Option<HostDaemonClock>,
}

/// Judges the kernel state and the bound UDP sockets; `own_ports` are this agent's.
pub fn detect(
    kernel: Option<KernelClockState>,
    bound_udp: &[SocketAddr],
    own_ports: &BTreeSet<u16>,
) -> Detection {
    let mut evidence = BTreeSet::new();
    if let Some(k) = kernel {
        if k.pll {
            evidence.insert(Evidence::KernelPll);
        }
        if k.fll {
            evidence.insert(Evidence::KernelFll);
        }
    }
    for a in bound_udp {
        if own_ports.contains(&a.port()) {
            continue;
        }
        match a.port() {
            CHRONY_COMMAND_PORT if a.ip().is_loopback() => {
                evidence.insert(Evidence::ChronyCommandPort(*a));
            }
            NTP_PORT => {
                evidence.insert(Evidence::NtpPort(*a));
            }
            _ => {}
        }
    }
    Detection {
        evidence: evidence.into_iter().collect(),
    }
}

/// The unconnected UDP sockets listed in `/proc/net/udp` (`v6 = false`) or `/proc/net/udp6`.
/// Lines that do not parse are skipped: the file is the kernel's, but its format is not ours.
pub fn parse_proc_net_udp(text: &str, v6: bool) -> Vec<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            (state == UDP_UNCONNECTED).then_some(())?;
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = if v6 { parse_v6(ip)? } else { parse_v4(ip)? };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

/// An IPv4 address as the kernel prints it: one 32-bit word in host (little-endian) order.
fn parse_v4(hex: &str) -> Option<IpAddr> {
    let word = u32::from_str_radix(hex, 16).ok()?;
    (hex.len() == 8).then(|| IpAddr::V4(Ipv4Addr::from(word.to_le_bytes())))
}

/// An IPv6 address as the kernel prints it: four 32-bit words, each in host order.
fn parse_v6(hex: &str) -> Option<IpAddr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
        let word = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    // A dual-stack socket bound to an IPv4 address shows it IPv4-mapped.
    Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
}

/// Looks now: the kernel state and the node's bound UDP sockets.
pub fn observe(own_ports: &BTreeSet<u16>) -> Detection {
    let kernel = crate::clock::system::kernel_state()
        .inspect_err(|e| tracing::debug!(error = %e, "reading the kernel clock state"))
        .ok();
    let mut bound = Vec::new();
    for (path, v6) in [("/proc/net/udp", false), ("/proc/net/udp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            bound.extend(parse_proc_net_udp(&text, v6));
        }
    }
    detect(kernel, &bound, own_ports)
}

/// How long chronyd has to answer on loopback.
const CHRONY_TIMEOUT: Duration = Duration::from_millis(500);
/// The kernel's "no estimate" error (NTP_PHASE_LIMIT, 16 s, in µs): what it holds until a
/// daemon sets one.
const KERNEL_NO_ESTIMATE_US: i64 = 16_000_000;

/// The clock as the daemon that `detection` found sees it: chronyd asked on the command port
/// it was seen on; otherwise what a daemon steering through the kernel PLL or FLL left there;
/// `None` when neither (no daemon, or one that only shows by the NTP port).
pub fn daemon_clock(
    detection: &Detection,
    kernel: Option<KernelClockState>,
) -> Option<HostDaemonClock> {
    let chronyd = detection.evidence.iter().find_map(|e| match e {
        Evidence::ChronyCommandPort(a) => Some(*a),
        _ => None,
    });
    if let Some(address) = chronyd {
        return Some(match ask_chronyd(address) {
            Ok(tracking) => chrony_view(&tracking),
            Err(why) => HostDaemonClock {
                daemon: "chronyd".into(),
                error: Some(format!("asking chronyd on {address}: {why}")),
                ..Default::default()
            },
        });
    }
    let kernel_discipline = detection
        .evidence
        .iter()
        .any(|e| matches!(e, Evidence::KernelPll | Evidence::KernelFll));
    kernel_discipline.then(|| kernel.map(kernel_view)).flatten()
}

/// chronyd's tracking report as the agent shows it.
pub fn chrony_view(t: &chrony::ChronyTracking) -> HostDaemonClock {
    HostDaemonClock {
        daemon: "chronyd".into(),
        offset_seconds: Some(t.system_offset_seconds),
        error_bound_seconds: Some(t.root_distance_seconds()),
        synchronized: t.synchronized,
        reference: Some(t.reference()),
        error: None,
    }
}

/// What a daemon left in the kernel's discipline: the correction still pending (the clock is
/// behind by what it will be advanced) and the error it estimated.
pub fn kernel_view(k: KernelClockState) -> HostDaemonClock {
    let estimate = (k.claims_sync && (0..KERNEL_NO_ESTIMATE_US).contains(&k.estimated_error_us))
        .then(|| k.estimated_error_us as f64 / 1e6);
    HostDaemonClock {
        daemon: "kernel".into(),
        offset_seconds: Some(-(k.pending_offset_nanos as f64) / 1e9),
        error_bound_seconds: estimate,
        synchronized: k.claims_sync,
        reference: None,
        error: None,
    }
}

/// One `tracking` round trip to chronyd's command port.
fn ask_chronyd(address: SocketAddr) -> Result<chrony::ChronyTracking, String> {
    let local: SocketAddr = match address {
        SocketAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
    socket.connect(address).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(CHRONY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // Any value the reply must echo; the connected socket already filters the sender.
    let sequence = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    socket
        .send(&chrony::tracking_request(sequence))
        .map_err(|e| e.to_string())?;
    let mut reply = [0u8; 512];
    // A late answer to an earlier request is skipped, a few at most: whatever holds the port
    // cannot keep this thread waiting.
    let mut last = String::new();
    for _ in 0..4 {
        let n = socket.recv(&mut reply).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {} ms", CHRONY_TIMEOUT.as_millis())
            }
            _ => e.to_string(),
        })?;
        match chrony::parse_tracking_reply(&reply[..n], sequence) {
            Err(e @ chrony::ChronyError::NotOurs { .. }) => last = e.to_string(),
            other => return other.map_err(|e| e.to_string()),
        }
    }
    Err(last)
}

/// Reads the clock as the daemon `detection` found sees it (see [`daemon_clock`]); blocks for
/// up to half a second on chronyd.
pub fn observe_clock(detection: &Detection) -> Option<HostDaemonClock> {
    let kernel = crate::clock::system::kernel_state().ok();
    daemon_clock(detection, kernel)
}

/// The backend to run: the configured one, except that the system clock is not steered while
/// another daemon does unless the TimeService takes over; then it is only observed (readonly),
/// and the reason says why.
pub fn backend_to_run(
    configured: ClockBackend,
    detection: &Detection,
    take_over: bool,
) -> (ClockBackend, Option<String>) {
    match (configured, detection.describe()) {
        (ClockBackend::System, Some(why)) if !take_over => (
            ClockBackend::Readonly,
            Some(format!(
                "{why}; the agent only observes the clock until it stops (or the TimeService sets \
                 spec.discipline.takeOver)"
            )),
        ),
        _ => (configured, None),
    }
}

/// Why the process should restart to run another backend: the daemon it yielded to is gone,
/// or one appeared beside a clock it steers (`running` is what it runs, `configured` what the
/// config and flags asked for).
pub fn restart_reason(
    running: ClockBackend,
    configured: ClockBackend,
    detection: &Detection,
    take_over: bool,
) -> Option<String> {
    let (wanted, why) = backend_to_run(configured, detection, take_over);
    match (running, wanted) {
        (r, w) if r == w => None,
        (ClockBackend::System, _) => why,
        _ => Some(
            "no other time daemon is seen any more (or takeOver was set); restarting to \
                   steer the system clock"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // Captured from a node running chronyd (command port on 127.0.0.1 and ::1, NTP port on
    // every address), plus a connected client socket and this agent's tenant port 30001.
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  140: 0100007F:0143 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 20123 2 0000000000000000 0
  201: 00000000:007B 00000000:0000 07 00000000:00000000 00:00000000 00000000   108        0 20120 2 0000000000000000 0
  333: 0A00020F:C350 0A4D0101:007B 01 00000000:00000000 00:00000000 00000000     0        0 20999 2 0000000000000000 0
  402: 00000000:7531 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 30000 2 0000000000000000 0
  garbage line
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  140: 00000000000000000000000001000000:0143 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 20124 2 0000000000000000 0
  150: 0000000000000000FFFF000001004D0A:007B 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 20125 2 0000000000000000 0
";

    fn kernel(pll: bool, fll: bool) -> KernelClockState {
        KernelClockState {
            frequency_ppm: 0,
            tick_us: 10_000,
            pll,
            fll,
            claims_sync: true,
            pending_offset_nanos: 0,
            estimated_error_us: 0,
        }
    }

    #[test]
    fn proc_net_udp_yields_the_bound_unconnected_sockets_of_both_families() {
        let v4 = parse_proc_net_udp(UDP, false);
        assert_eq!(
            v4,
            [
                "127.0.0.1:323".parse().unwrap(),
                "0.0.0.0:123".parse().unwrap(),
                "0.0.0.0:30001".parse().unwrap(),
            ]
        );
        let v6 = parse_proc_net_udp(UDP6, true);
        assert_eq!(
            v6,
            [
                "[::1]:323".parse().unwrap(),
                "10.77.0.1:123".parse().unwrap()
            ]
        );
    }

    #[test]
    fn chronyd_is_found_by_its_ports_and_the_agents_own_ports_never_count() {
        let mut bound = parse_proc_net_udp(UDP, false);
        bound.extend(parse_proc_net_udp(UDP6, true));
        let own: BTreeSet<u16> = [30001].into();
        let found = detect(Some(kernel(false, false)), &bound, &own);
        assert_eq!(
            found.evidence,
            [
                Evidence::ChronyCommandPort("127.0.0.1:323".parse().unwrap()),
                Evidence::ChronyCommandPort("[::1]:323".parse().unwrap()),
                Evidence::NtpPort("0.0.0.0:123".parse().unwrap()),
                Evidence::NtpPort("10.77.0.1:123".parse().unwrap()),
            ]
        );
        assert!(found.describe().unwrap().contains("chronyd's command port"));
        // A tenant served on port 123 by this agent is not another daemon.
        let ours = detect(None, &["0.0.0.0:123".parse().unwrap()], &[123].into());
        assert!(!ours.found());
        // 323 on a routable address is not chronyd's command socket.
        let other = detect(None, &["10.0.0.5:323".parse().unwrap()], &BTreeSet::new());
        assert!(!other.found());
    }

    #[test]
    fn a_daemon_steering_through_the_kernel_is_read_from_its_pending_correction() {
        // ntpd set 25 µs to apply (the clock is 25 µs behind) and a 40 µs error estimate.
        let steered = KernelClockState {
            pending_offset_nanos: 25_000,
            estimated_error_us: 40,
            ..kernel(true, false)
        };
        let found = detect(Some(steered), &[], &BTreeSet::new());
        let view = daemon_clock(&found, Some(steered)).unwrap();
        assert_eq!(view.daemon, "kernel");
        assert!(
            (view.offset_seconds.unwrap() + 25e-6).abs() < 1e-15,
            "{view:?}"
        );
        assert_eq!(view.error_bound_seconds, Some(40e-6));
        assert!(view.synchronized);
        // Unsynchronized, or the kernel's 16 s placeholder: no error estimate.
        for k in [
            KernelClockState {
                claims_sync: false,
                ..steered
            },
            KernelClockState {
                estimated_error_us: 16_000_000,
                ..steered
            },
        ] {
            assert_eq!(kernel_view(k).error_bound_seconds, None, "{k:?}");
        }
        // A daemon seen only by its NTP port has no view to read, and no daemon none at all.
        let port_only = detect(None, &["0.0.0.0:123".parse().unwrap()], &BTreeSet::new());
        assert_eq!(daemon_clock(&port_only, Some(steered)), None);
        assert_eq!(daemon_clock(&Detection::default(), Some(steered)), None);
    }

    #[test]
    fn a_chronyd_that_does_not_answer_is_reported_with_the_reason() {
        // A loopback port nothing listens on: the send is refused or the wait times out.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap();
        drop(closed);
        let found = Detection {
            evidence: vec![Evidence::ChronyCommandPort(address)],
        };
        let view = daemon_clock(&found, None).unwrap();
        assert_eq!(view.daemon, "chronyd");
        assert_eq!(view.offset_seconds, None);
        let why = view.error.unwrap();
        assert!(
            why.starts_with(&format!("asking chronyd on {address}: ")),
            "{why}"
        );
    }

    #[test]
    fn the_kernel_pll_or_fll_means_a_daemon_steers_through_the_kernel() {
        let none = BTreeSet::new();
        assert!(!detect(Some(kernel(false, false)), &[], &none).found());
        assert_eq!(
            detect(Some(kernel(true, false)), &[], &none).evidence,
            [Evidence::KernelPll]
        );
        assert_eq!(
            detect(Some(kernel(true, true)), &[], &none).evidence,
            [Evidence::KernelPll, Evidence::KernelFll]
        );
    }

    #[test]
    fn the_system_clock_is_only_observed_beside_another_daemon_unless_taken_over() {
        let found = detect(Some(kernel(true, false)), &[], &BTreeSet::new());
        let (backend, why) = backend_to_run(ClockBackend::System, &found, false);
        assert_eq!(backend, ClockBackend::Readonly);
        assert!(why.unwrap().contains("takeOver"));
        assert_eq!(
            backend_to_run(ClockBackend::System, &found, true),
            (ClockBackend::System, None)
        );
        assert_eq!(
            backend_to_run(ClockBackend::System, &Detection::default(), false),
            (ClockBackend::System, None)
        );
        // Simulated and readonly clocks steer nothing real: nothing to yield.
        assert_eq!(
            backend_to_run(ClockBackend::Simulated, &found, false),
            (ClockBackend::Simulated, None)
        );
    }

    #[test]
    fn the_agent_restarts_only_when_the_backend_it_should_run_changes() {
        let (system, readonly) = (ClockBackend::System, ClockBackend::Readonly);
        let found = detect(Some(kernel(true, false)), &[], &BTreeSet::new());
        let none = Detection::default();
        // A daemon appeared beside a steered clock: yield.
        assert!(restart_reason(system, system, &found, false).is_some());
        // Still there, or taken over: stay.
        assert_eq!(restart_reason(readonly, system, &found, false), None);
        assert_eq!(restart_reason(system, system, &found, true), None);
        // Gone, or takeOver set later: steer again.
        assert!(restart_reason(readonly, system, &none, false).is_some());
        assert!(restart_reason(readonly, system, &found, true).is_some());
        // A readonly or simulated configuration never restarts over daemons.
        assert_eq!(restart_reason(readonly, readonly, &found, false), None);
        let sim = ClockBackend::Simulated;
        assert_eq!(restart_reason(sim, sim, &found, false), None);
    }
}
