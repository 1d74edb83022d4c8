//! The per-packet path never allocates: every outcome (served, KoD, dropped, rate limited,
//! malformed, ignored) is driven through `handle_request` under a counting allocator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use stratum_agent::server::path::{PortPolicy, PortState, Request, handle_request};
use stratum_agent::server::stats::{Outcome, TenantStats};
use stratum_agent::server::tenants::core_tenant;
use stratum_api::agent_config::{RateLimitConfig, TenantConfig};
use stratum_ntp::packet::{LeapIndicator, ReferenceId};
use stratum_ntp::server::ServerClockState;
use stratum_ntp::time::{ClockTime, NtpTimestamp};

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn the_per_packet_path_does_not_allocate() {
    let config = TenantConfig {
        id: "ns/a".into(),
        port: 12300,
        allowed: (0..10_000u32)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
            .chain(["127.0.0.0/8".parse().unwrap()])
            .collect(),
        allowed_sets: vec![],
        // Another /24 than the rate-limited clients': refusals are budgeted per source prefix,
        // and both KoD DENY and KoD RATE must be exercised.
        denied: vec!["127.0.9.13/32".parse().unwrap()],
        rate_limit: RateLimitConfig {
            client_interval_seconds: 1.0,
            client_burst: 3,
            tenant_requests_per_second: Some(1_000_000),
            tenant_burst: Some(1_000_000),
            kiss_of_death: true,
        },
        max_root_distance_seconds: Some(0.5),
        nts: None,
        symmetric_keys: None,
    };
    let port = PortPolicy::new(
        core_tenant(&config),
        Arc::new(TenantStats::new("ns/a".into(), 1)),
    );
    let mut state = PortState::new(4096, 7);
    let now = ClockTime::from_unix_secs(1_700_000_000);
    let clock = ServerClockState {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        precision: -20,
        root_delay: 0.001,
        root_dispersion: 0.001,
        reference_id: ReferenceId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_clock_time(now),
        updated_at: now,
    };
    let mut client = [0u8; 48];
    client[0] = (4 << 3) | 3;
    let mut control = client;
    control[0] = (2 << 3) | 6;
    let sources: Vec<std::net::IpAddr> = [
        "127.0.0.1",
        "127.0.9.13",
        "192.0.2.1",
        "10.3.4.5",
        "::ffff:127.0.0.2",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut out = [0u8; 48];
    // The first request of a tenant with a budget sizes the limiter's per-tenant table once
    // (it grows with configured tenants, never with traffic): measure after a warm-up.
    const WARM_UP: usize = 100;
    let mut before = 0;
    for i in 0..10_000 + WARM_UP {
        if i == WARM_UP {
            before = allocations();
        }
        let bytes: &[u8] = match i % 7 {
            0 => &control,
            1 => &client[..20],
            _ => &client,
        };
        let (outcome, _) = handle_request(
            &port,
            &mut state,
            &clock,
            Request {
                source: sources[i % sources.len()],
                bytes,
                truncated: false,
                received_at: now.add_nanos(i as i64),
            },
            &mut out,
        );
        // Recorded outside the measured window would need allocation-free storage too:
        // a fixed array of flags.
        let index = match outcome {
            Outcome::Served => 0,
            Outcome::ServedUnsynchronized => 1,
            Outcome::Denied { kod: false } => 2,
            Outcome::Denied { kod: true } => 3,
            Outcome::RateLimited { kod: false } => 4,
            Outcome::RateLimited { kod: true } => 5,
            Outcome::Malformed => 6,
            Outcome::Ignored => 7,
            // Authentication outcomes: a port without NTS or keys never has them (sealed
            // replies allocate).
            Outcome::NtsNak
            | Outcome::NtsFailed
            | Outcome::Unauthenticated { .. }
            | Outcome::MacNak
            | Outcome::MacFailed => 8,
        };
        SEEN.with(|s| s.set(s.get() | (1 << index)));
    }
    let after = allocations();
    let mut seen = std::collections::HashSet::new();
    SEEN.with(|s| {
        for bit in 0..8 {
            if s.get() & (1 << bit) != 0 {
                seen.insert(bit);
            }
        }
    });
    assert_eq!(after - before, 0, "the per-packet path allocated");
    for expected in [0, 3, 4, 5, 6, 7] {
        assert!(
            seen.contains(&expected),
            "outcome {expected} never exercised: {seen:?}"
        );
    }
}

thread_local! {
    static SEEN: Cell<u32> = const { Cell::new(0) };
}
