//! Issue 15, "server policy under spoofing", sans-IO on simulated time: a flood of 10^6
//! distinct spoofed sources (deny-listed, outside the allow list and allowed-but-new; IPv4
//! and IPv6) through `handle_request`, interleaved with two real allowed clients, one polite
//! and one over its limit. Pinned:
//! - refusals (KoD DENY + RATE) stay within the tenant's refusal budget, exactly
//!   `burst + per_second × window`, and each source prefix gets at most one per
//!   `source_interval`;
//! - the real clients keep their rate state (the heavy one stays limited, the polite one is
//!   always served) and their rows in the client log, with every request counted;
//! - only allowed sources are in the client log;
//! - a refusal carries no usable time, even after the worker's transmit-timestamp patch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use stratum_agent::server::path::{PortPolicy, PortState, Request, handle_request};
use stratum_agent::server::stats::{Outcome, TenantStats};
use stratum_agent::server::tenants::core_tenant;
use stratum_api::agent_config::{RateLimitConfig, TenantConfig};
use stratum_ntp::packet::{KissCode, LeapIndicator, Packet, ReferenceId};
use stratum_ntp::server::{RefusalLimit, ServerClockState, patch_transmit_timestamp};
use stratum_ntp::time::{ClockTime, NtpTimestamp};

const INTERVAL: f64 = 2.0;
const BURST: u32 = 4;

fn start() -> ClockTime {
    ClockTime::from_unix_secs(1_700_000_000)
}

/// The production mapping (`core_tenant`) of a tenant with KoD on, a deny list and a
/// per-client limit of 1 per 2 s, burst 4. Only the leak is turned off, so "stays limited"
/// has an exact bound instead of a random quarter of extra answers.
fn port() -> PortPolicy {
    let config = TenantConfig {
        id: "ns/a".into(),
        port: 12300,
        allowed: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        allowed_sets: vec![],
        denied: vec![
            "10.64.0.0/10".parse().unwrap(),
            "fd66::/16".parse().unwrap(),
        ],
        rate_limit: RateLimitConfig {
            client_interval_seconds: INTERVAL,
            client_burst: BURST,
            tenant_requests_per_second: None,
            tenant_burst: None,
            kiss_of_death: true,
        },
        max_root_distance_seconds: None,
        nts: None,
        symmetric_keys: None,
    };
    let mut core = core_tenant(&config);
    if let Some(limit) = core.client_rate_limit.as_mut() {
        limit.leak_log2 = 0;
    }
    assert_eq!(
        core.refusals,
        RefusalLimit::default(),
        "the shipped default"
    );
    PortPolicy::new(core, Arc::new(TenantStats::new("ns/a".into(), 1)))
}

fn clock() -> ServerClockState {
    ServerClockState {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        precision: -20,
        root_delay: 0.001,
        root_dispersion: 0.001,
        reference_id: ReferenceId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_clock_time(start()),
        updated_at: start(),
    }
}

fn request_bytes(cookie: u64) -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0] = (4 << 3) | 3;
    r[40..48].copy_from_slice(&cookie.to_be_bytes());
    r
}

/// Flood source `i`: distinct for every `i`, in one of eight classes.
fn spoofed(i: u32) -> IpAddr {
    let n = i / 8;
    match i % 8 {
        // Deny list (KoD DENY).
        0 | 4 => IpAddr::V4(Ipv4Addr::from(0x0A40_0000 + i / 4)),
        7 => IpAddr::V6(Ipv6Addr::from(
            (0xfd66u128 << 112) | (u128::from(n) << 64) | 1,
        )),
        // Outside the allow list (KoD DENY), one /64 each for IPv6.
        1 => IpAddr::V4(Ipv4Addr::from(0x6440_0000 + n)),
        5 => IpAddr::V6(Ipv6Addr::from(
            (0x2001_0db8u128 << 96) | (u128::from(n) << 64) | 1,
        )),
        // Allowed but never seen before (10.128.0.0/9, fd00:0:0:1::/64).
        2 | 6 => IpAddr::V4(Ipv4Addr::from(0x0A80_0000 + i)),
        _ => IpAddr::V6(Ipv6Addr::from(
            (0xfd00u128 << 112) | (1u128 << 64) | u128::from(n),
        )),
    }
}

fn prefix(source: IpAddr) -> IpNet {
    match source {
        IpAddr::V4(_) => IpNet::new(source, 24).unwrap().trunc(),
        IpAddr::V6(_) => IpNet::new(source, 64).unwrap().trunc(),
    }
}

#[derive(Default, Debug)]
struct Client {
    sent: u64,
    served: u64,
}

#[test]
fn a_million_spoofed_sources_get_refusals_only_within_budget_and_real_clients_keep_their_state() {
    const FLOOD: u32 = 1_000_000;
    const SPACING_NS: i64 = 100_000; // 10^6 packets over 100 simulated seconds
    let window = f64::from(FLOOD) * SPACING_NS as f64 * 1e-9;
    let port = port();
    let budget = port.config().refusals;
    let mut state = PortState::new(4096, 0x15);
    let clock = clock();
    let polite_ip: IpAddr = "10.0.0.1".parse().unwrap();
    let heavy_ip: IpAddr = "fd00::2".parse().unwrap();
    let (mut polite, mut heavy) = (Client::default(), Client::default());
    let mut out = [0u8; 48];
    let mut ask = |state: &mut PortState, source: IpAddr, at: ClockTime, cookie: u64| {
        let request = Request {
            source,
            bytes: &request_bytes(cookie),
            truncated: false,
            received_at: at,
        };
        let (outcome, len) = handle_request(&port, state, &clock, request, &mut out);
        let kod = (len == 48 && out[1] == 0).then(|| out[12..16].to_vec());
        (outcome, kod)
    };

    // Before the flood both real clients have history: the polite one polled twice, the
    // heavy one spent its burst just before.
    for k in 0..2 {
        polite.sent += 1;
        let at = start().add_secs(-10.0 + 4.0 * f64::from(k));
        let (outcome, _) = ask(&mut state, polite_ip, at, 1);
        polite.served += u64::from(outcome == Outcome::Served);
    }
    for k in 0..20 {
        heavy.sent += 1;
        let at = start().add_secs(-0.5 + 0.01 * f64::from(k));
        let (outcome, _) = ask(&mut state, heavy_ip, at, 2);
        heavy.served += u64::from(outcome == Outcome::Served);
    }
    assert_eq!((polite.served, heavy.served), (2, u64::from(BURST)));
    let heavy_served_before = heavy.served;

    let mut refusals: u64 = 0;
    let mut last_refusal: HashMap<IpNet, ClockTime> = HashMap::new();
    let mut refused_too_soon = Vec::new();
    let mut note_refusal = |source: IpAddr, at: ClockTime| {
        refusals += 1;
        if let Some(last) = last_refusal.insert(prefix(source), at)
            && at.secs_since(last) < budget.source_interval
        {
            refused_too_soon.push((source, at.secs_since(last)));
        }
    };
    for i in 0..FLOOD {
        let at = start().add_nanos(i64::from(i) * SPACING_NS);
        // The polite client polls every 4 s (within 1 per 2 s); the heavy one every second,
        // twice its limit, with ~3700 newcomers per 1024-set table between two of its
        // requests: plenty to evict it from a least-recently-seen table.
        if i % 40_000 == 0 {
            polite.sent += 1;
            let (outcome, kod) = ask(&mut state, polite_ip, at, 1);
            polite.served += u64::from(outcome == Outcome::Served);
            assert!(kod.is_none());
        }
        if i % 10_000 == 0 {
            heavy.sent += 1;
            let (outcome, kod) = ask(&mut state, heavy_ip, at, 2);
            heavy.served += u64::from(outcome == Outcome::Served);
            if let Some(code) = kod {
                assert_eq!(code, b"RATE");
                note_refusal(heavy_ip, at);
            }
        }
        let source = spoofed(i);
        let (outcome, kod) = ask(&mut state, source, at, 3);
        if kod.is_some() {
            assert!(matches!(
                outcome,
                Outcome::Denied { kod: true } | Outcome::RateLimited { kod: true }
            ));
            note_refusal(source, at);
        }
    }

    // (a) The refusal budget, exactly: a full bucket plus the refill over the window.
    let bound = (budget.burst + budget.per_second * window).floor() as u64;
    eprintln!(
        "refusals {refusals} (bound {bound}) for {FLOOD} spoofed requests over {window} s; \
         polite {polite:?}, heavy {heavy:?}"
    );
    assert!(refusals <= bound, "{refusals} refusals, budget {bound}");
    // Demand far exceeds the budget, so it is used, not merely never reached.
    assert!(refusals >= bound - 5, "{refusals} refusals, budget {bound}");
    assert!(
        refused_too_soon.is_empty(),
        "prefixes refused twice within {} s: {:?}",
        budget.source_interval,
        &refused_too_soon[..refused_too_soon.len().min(5)]
    );

    // (b) Rate state survives the flood: the heavy client got no fresh bursts (one token per
    // interval since its burst was spent half a second before), the polite one was always
    // answered.
    let heavy_bound = ((window + 0.5) / INTERVAL).ceil() as u64;
    assert!(
        heavy.served - heavy_served_before <= heavy_bound,
        "heavy client served {} times during the flood, limit allows {heavy_bound}",
        heavy.served - heavy_served_before
    );
    assert_eq!(
        polite.served, polite.sent,
        "the polite client is always served"
    );

    // ... and so do their rows in the client log, with every request counted.
    let rows = state.clients.top(state.clients.capacity());
    let row = |ip: IpAddr| rows.iter().find(|r| r.address == ip).map(|r| r.requests);
    assert_eq!(row(polite_ip), Some(polite.sent), "polite client's row");
    assert_eq!(row(heavy_ip), Some(heavy.sent), "heavy client's row");
    // Strangers are never in the log.
    let allowed: [IpNet; 2] = ["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let denied: [IpNet; 2] = [
        "10.64.0.0/10".parse().unwrap(),
        "fd66::/16".parse().unwrap(),
    ];
    for r in &rows {
        assert!(
            allowed.iter().any(|n| n.contains(&r.address))
                && !denied.iter().any(|n| n.contains(&r.address)),
            "stranger {} in the client log",
            r.address
        );
    }
}

#[test]
fn refusals_carry_no_usable_time_even_after_the_workers_transmit_patch() {
    let port = port();
    let mut state = PortState::new(64, 1);
    let clock = clock();
    let cookie = 0xDEAD_BEEF_1234_5678;
    let at = start().add_secs(0.5);
    let send = |state: &mut PortState, source: &str, k: i64| {
        let mut out = [0u8; 48];
        let (outcome, len) = handle_request(
            &port,
            state,
            &clock,
            Request {
                source: source.parse().unwrap(),
                bytes: &request_bytes(cookie),
                truncated: false,
                received_at: at.add_nanos(k),
            },
            &mut out,
        );
        // What the worker does to every reply of a batch just before sending it.
        let patched = patch_transmit_timestamp(&mut out[..len], at.add_secs(0.001));
        (outcome, len, patched, out)
    };
    // Served first: the patch does write time into ordinary replies.
    let (outcome, _, patched, served) = send(&mut state, "10.0.0.9", 0);
    assert_eq!((outcome, patched), (Outcome::Served, true));
    let served = Packet::parse(&served).unwrap().header;
    assert_eq!(
        served.transmit_timestamp,
        NtpTimestamp::from_clock_time(at.add_secs(0.001))
    );

    let mut kods = Vec::new();
    let (outcome, len, patched, bytes) = send(&mut state, "192.0.2.7", 1);
    assert_eq!(
        (outcome, len, patched),
        (Outcome::Denied { kod: true }, 48, false)
    );
    kods.push((KissCode::Deny, bytes));
    let mut k = 2;
    let rate = loop {
        let (outcome, len, patched, bytes) = send(&mut state, "10.0.0.9", k);
        k += 1;
        if outcome == (Outcome::RateLimited { kod: true }) {
            assert_eq!((len, patched), (48, false));
            break bytes;
        }
        assert!(k < 100, "no KoD RATE");
    };
    kods.push((KissCode::Rate, rate));
    for (code, bytes) in kods {
        let kod = Packet::parse(&bytes).unwrap().header;
        assert_eq!(kod.stratum, 0, "{code:?}");
        assert_eq!(kod.kiss_code(), Some(code));
        assert_eq!(
            kod.origin_timestamp.to_bits(),
            cookie,
            "the client can match it"
        );
        assert!(
            kod.receive_timestamp.is_zero(),
            "{code:?} carries a receive time"
        );
        assert!(
            kod.transmit_timestamp.is_zero(),
            "{code:?} carries a transmit time"
        );
        assert!(
            kod.reference_timestamp.is_zero(),
            "{code:?} carries a reference time"
        );
        assert_eq!(kod.root_delay.to_secs_f64(), 0.0);
        assert_eq!(kod.root_dispersion.to_secs_f64(), 0.0);
        assert_eq!(kod.leap, LeapIndicator::Unknown);
    }
}
