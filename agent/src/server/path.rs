//! The per-packet path, free of IO so tests and the fuzz target drive exactly what workers
//! run: parse → mode/version → deny list → allow trie → client rate limit → tenant budget →
//! accuracy requirement → reply, or a KoD within the tenant's refusal budget, or nothing.
//! Nothing here allocates.
//!
//! Only sources past the deny and allow lists are logged for `stratumctl clients` (and only
//! they reach the rate table): strangers, spoofed or not, are counted in the tenant's
//! `denied` counter and nowhere else, so they cannot push real clients out of either table.

use std::net::IpAddr;
use std::sync::Arc;

use stratum_ntp::packet::{KissCode, Mode, Packet};
use stratum_ntp::server::{
    Decision, DropReason, RateLimiter, ServerClockState, ServerPolicy, TenantConfig, build_kod,
    build_reply,
};
use stratum_ntp::time::ClockTime;

use super::clients::{ClientLog, ClientOutcome, address_key};
use super::stats::{Outcome, TenantStats};
use crate::clock::Timescale;

/// The only tenant of a port's policy: each port serves exactly one tenant.
const PORT_TENANT: u32 = 0;

/// What every worker reads per batch for the clock: the state to publish and how to read the
/// served clock from host timestamps. Replaced whole by the run loop each turn.
#[derive(Clone, Copy, Debug)]
pub struct ClockSnapshot {
    /// Stratum, leap, root delay/dispersion, reference: what replies say.
    pub state: ServerClockState,
    /// Host realtime → served (disciplined) clock.
    pub timescale: Timescale,
}

impl ClockSnapshot {
    /// Before the first publication: unsynchronized, on the host clock.
    pub fn initial() -> Self {
        Self {
            state: ServerClockState::unsynchronized(-20),
            timescale: Timescale::IDENTITY,
        }
    }
}

/// One generation of one port's rules: immutable, swapped whole on a tenant change.
#[derive(Debug)]
pub struct PortPolicy {
    /// The tenant's counters (kept across generations and port moves).
    pub stats: Arc<TenantStats>,
    /// The rules as configured, to tell whether a new config changes them.
    pub config: TenantConfig,
    policy: ServerPolicy,
}

impl PortPolicy {
    /// Builds the tries for `config`.
    pub fn new(config: TenantConfig, stats: Arc<TenantStats>) -> Self {
        let policy = ServerPolicy::new(std::slice::from_ref(&config));
        Self {
            stats,
            config,
            policy,
        }
    }
}

/// A port's mutable state: the rate-limit table and the client log, both bounded.
#[derive(Debug)]
pub struct PortState {
    /// Per-client token buckets and the tenant budget.
    pub limiter: RateLimiter,
    /// Who asked, for `stratumctl clients`.
    pub clients: ClientLog,
}

impl PortState {
    /// Tables of `capacity` clients, keyed by `seed`.
    pub fn new(capacity: usize, seed: u64) -> Self {
        Self {
            limiter: RateLimiter::new(capacity, seed),
            clients: ClientLog::new(capacity, seed.rotate_left(32)),
        }
    }
}

/// One datagram as the path sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Sender (IPv4-mapped IPv6 is treated as IPv4).
    pub source: IpAddr,
    /// The datagram.
    pub bytes: &'a [u8],
    /// It was longer than the receive buffer.
    pub truncated: bool,
    /// Kernel receive time on the served clock.
    pub received_at: ClockTime,
}

/// Handles one request. Writes the answer, if any, into `out` and returns its length with the
/// outcome. A served reply's transmit timestamp is provisional (the receive time): the worker
/// overwrites it just before sending with `patch_transmit_timestamp`, which leaves KoDs
/// (`Denied { kod: true }`, `RateLimited { kod: true }`) without time.
pub fn handle_request(
    port: &PortPolicy,
    state: &mut PortState,
    clock: &ServerClockState,
    request: Request<'_>,
    out: &mut [u8],
) -> (Outcome, usize) {
    let Request {
        source,
        received_at,
        ..
    } = request;
    let (outcome, len) = decide_and_build(port, state, clock, request, out);
    let logged = match outcome {
        // Denied covers the deny list and sources outside the allow list: not clients.
        Outcome::Malformed | Outcome::Ignored | Outcome::Denied { .. } => None,
        Outcome::Served | Outcome::ServedUnsynchronized => Some(ClientOutcome::Answered),
        Outcome::RateLimited { kod: true } => Some(ClientOutcome::Kod),
        Outcome::RateLimited { kod: false } => Some(ClientOutcome::Dropped),
    };
    if let Some(logged) = logged {
        state.clients.record(
            address_key(source.to_canonical()),
            received_at.unix_nanos(),
            logged,
        );
    }
    (outcome, len)
}

fn decide_and_build(
    port: &PortPolicy,
    state: &mut PortState,
    clock: &ServerClockState,
    request: Request<'_>,
    out: &mut [u8],
) -> (Outcome, usize) {
    let Request {
        source,
        bytes,
        truncated,
        received_at,
    } = request;
    if truncated {
        return (Outcome::Malformed, 0);
    }
    let Ok(view) = Packet::parse(bytes) else {
        return (Outcome::Malformed, 0);
    };
    // Only client requests of NTPv3/v4 are ever answered: control (6/7), symmetric and
    // broadcast packets stop here, before they can touch the rate table or earn a KoD.
    if view.header.mode != Mode::Client || !matches!(view.header.version, 3 | 4) {
        return (Outcome::Ignored, 0);
    }
    let source = source.to_canonical();
    let decision = port
        .policy
        .decide(&mut state.limiter, PORT_TENANT, source, received_at);
    match decision {
        Decision::Serve => {
            match build_reply(
                &view,
                received_at,
                received_at,
                clock,
                port.config.max_root_distance,
                out,
            ) {
                Some(len) => {
                    // LI = 3 is how build_reply says "unsynchronized" (or too far for this
                    // tenant's requirement).
                    let unsynchronized = out[0] >> 6 == 3;
                    let outcome = if unsynchronized {
                        Outcome::ServedUnsynchronized
                    } else {
                        Outcome::Served
                    };
                    (outcome, len)
                }
                None => (Outcome::Ignored, 0),
            }
        }
        Decision::Kod(code) => {
            let outcome = match code {
                KissCode::Rate => Outcome::RateLimited { kod: true },
                _ => Outcome::Denied { kod: true },
            };
            match build_kod(&view, code, out) {
                Some(len) => (outcome, len),
                None => (Outcome::Ignored, 0),
            }
        }
        Decision::Drop(DropReason::Denied | DropReason::NotAllowed) => {
            (Outcome::Denied { kod: false }, 0)
        }
        Decision::Drop(DropReason::RateLimited | DropReason::TenantBudget) => {
            (Outcome::RateLimited { kod: false }, 0)
        }
        Decision::Drop(DropReason::UnknownTenant) => (Outcome::Ignored, 0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use stratum_ntp::packet::{LeapIndicator, ReferenceId};
    use stratum_ntp::server::{ClientRateLimit, DenyAction, RefusalLimit};
    use stratum_ntp::time::NtpTimestamp;

    fn now() -> ClockTime {
        ClockTime::from_unix_secs(1_700_000_000)
    }

    fn port(kod: bool) -> PortPolicy {
        PortPolicy::new(
            TenantConfig {
                name: "ns/a".into(),
                allow: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
                allow_except: vec![],
                deny: vec![("10.9.0.0/16".parse().unwrap(), DenyAction::Ignore)],
                kod_not_allowed: kod,
                client_rate_limit: Some(ClientRateLimit {
                    interval: 1.0,
                    burst: 2,
                    leak_log2: 0,
                    kod,
                }),
                budget: None,
                max_root_distance: Some(0.5),
                refusals: RefusalLimit::default(),
            },
            Arc::new(TenantStats::new("ns/a".into(), 1)),
        )
    }

    fn synced() -> ServerClockState {
        ServerClockState {
            synchronized: true,
            leap: LeapIndicator::NoWarning,
            stratum: 3,
            precision: -20,
            root_delay: 0.001,
            root_dispersion: 0.001,
            reference_id: ReferenceId([127, 0, 0, 1]),
            reference_time: NtpTimestamp::from_clock_time(now()),
            updated_at: now(),
        }
    }

    fn request(first_byte: u8) -> [u8; 48] {
        let mut r = [0u8; 48];
        r[0] = first_byte;
        r[40..48].copy_from_slice(&7u64.to_be_bytes());
        r
    }

    fn req<'a>(src: &str, bytes: &'a [u8], truncated: bool) -> Request<'a> {
        Request {
            source: src.parse().unwrap(),
            bytes,
            truncated,
            received_at: now(),
        }
    }

    const V4_CLIENT: u8 = (4 << 3) | 3;

    fn run(port: &PortPolicy, state: &mut PortState, src: &str, bytes: &[u8]) -> Outcome {
        let mut out = [0u8; 48];
        handle_request(port, state, &synced(), req(src, bytes, false), &mut out).0
    }

    #[test]
    fn allowed_client_is_served_and_ipv4_mapped_sources_match_ipv4_prefixes() {
        let port = port(false);
        let mut state = PortState::new(64, 1);
        assert_eq!(
            run(&port, &mut state, "10.1.2.3", &request(V4_CLIENT)),
            Outcome::Served
        );
        assert_eq!(
            run(&port, &mut state, "::ffff:10.1.2.4", &request(V4_CLIENT)),
            Outcome::Served
        );
        let logged: Vec<IpAddr> = state.clients.top(5).iter().map(|c| c.address).collect();
        assert!(
            logged.contains(&"10.1.2.4".parse().unwrap()),
            "mapped source logged as IPv4"
        );
    }

    #[test]
    fn control_modes_are_ignored_before_policy_and_garbage_is_malformed() {
        let port = port(true);
        let mut state = PortState::new(64, 1);
        for mode in [6u8, 7] {
            assert_eq!(
                run(&port, &mut state, "192.0.2.1", &request((2 << 3) | mode)),
                Outcome::Ignored,
                "mode {mode} from a stranger must not even earn a KoD"
            );
        }
        assert_eq!(
            run(&port, &mut state, "10.0.0.1", &[0u8; 12]),
            Outcome::Malformed
        );
        assert_eq!(state.clients.occupied(), 0);
    }

    #[test]
    fn strangers_get_kod_deny_only_when_the_tenant_enables_kod() {
        let mut state = PortState::new(64, 1);
        assert_eq!(
            run(&port(false), &mut state, "192.0.2.1", &request(V4_CLIENT)),
            Outcome::Denied { kod: false }
        );
        let mut out = [0u8; 48];
        let (outcome, len) = handle_request(
            &port(true),
            &mut state,
            &synced(),
            req("192.0.2.1", &request(V4_CLIENT), false),
            &mut out,
        );
        assert_eq!(outcome, Outcome::Denied { kod: true });
        assert_eq!(&out[12..16], b"DENY");
        assert_eq!((len, out[1]), (48, 0), "KoD: 48 bytes, stratum 0");
        assert_eq!(
            run(&port(true), &mut state, "10.9.1.1", &request(V4_CLIENT)),
            Outcome::Denied { kod: false },
            "the deny list says ignore"
        );
    }

    #[test]
    fn strangers_never_enter_the_rate_table_or_the_client_log() {
        let port = port(true);
        let mut state = PortState::new(64, 1);
        for i in 0..1000u32 {
            // Outside the allow list, and on the deny list.
            for base in [0xC000_0200u32, 0x0A09_0000] {
                let source = IpAddr::V4((base + i).into());
                let mut out = [0u8; 48];
                let request = Request {
                    source,
                    bytes: &request(V4_CLIENT),
                    truncated: false,
                    received_at: now().add_nanos(i64::from(i) * 1_000_000),
                };
                let (outcome, _) = handle_request(&port, &mut state, &synced(), request, &mut out);
                assert!(matches!(outcome, Outcome::Denied { .. }), "{source}");
            }
        }
        assert_eq!(state.limiter.occupied(), 0);
        assert_eq!(state.clients.occupied(), 0);
    }

    #[test]
    fn a_client_over_its_burst_is_limited_and_others_are_not() {
        let port = port(true);
        let mut state = PortState::new(64, 1);
        let outcomes: Vec<_> = (0..4)
            .map(|_| run(&port, &mut state, "10.0.0.1", &request(V4_CLIENT)))
            .collect();
        assert_eq!(outcomes[..2], [Outcome::Served, Outcome::Served]);
        assert_eq!(outcomes[2], Outcome::RateLimited { kod: true });
        assert_eq!(outcomes[3], Outcome::RateLimited { kod: false });
        assert_eq!(
            run(&port, &mut state, "10.0.0.2", &request(V4_CLIENT)),
            Outcome::Served
        );
    }

    #[test]
    fn unsynchronized_clock_is_served_with_li3_stratum16() {
        let port = port(false);
        let mut state = PortState::new(64, 1);
        let mut out = [0u8; 48];
        let (outcome, _) = handle_request(
            &port,
            &mut state,
            &ServerClockState::unsynchronized(-20),
            req("10.0.0.1", &request(V4_CLIENT), false),
            &mut out,
        );
        assert_eq!(outcome, Outcome::ServedUnsynchronized);
        assert_eq!((out[0] >> 6, out[1]), (3, 16));
    }

    #[test]
    fn truncated_datagrams_are_malformed() {
        let port = port(false);
        let mut state = PortState::new(64, 1);
        let mut out = [0u8; 48];
        let (outcome, len) = handle_request(
            &port,
            &mut state,
            &synced(),
            req("10.0.0.1", &request(V4_CLIENT), true),
            &mut out,
        );
        assert_eq!((outcome, len), (Outcome::Malformed, 0));
    }
}
