//! The fuzz target's property, run on seeded random input in `cargo test` (the libFuzzer
//! target in agent/fuzz explores further): the per-packet path never panics, answers only
//! client-mode NTPv3/v4 requests, with exactly 48 bytes, never more than the request, echoing
//! the request's transmit timestamp.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stratum_agent::server::path::{PortPolicy, PortState, Request, handle_request};
use stratum_agent::server::stats::TenantStats;
use stratum_agent::server::tenants::core_tenant;
use stratum_api::agent_config::{RateLimitConfig, TenantConfig};
use stratum_ntp::packet::{LeapIndicator, Mode, Packet, ReferenceId};
use stratum_ntp::server::ServerClockState;
use stratum_ntp::time::{ClockTime, NtpTimestamp};

#[test]
fn random_datagrams_sources_and_clock_states_never_break_the_per_packet_path() {
    let config = TenantConfig {
        id: "ns/random".into(),
        port: 12300,
        allowed: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        allowed_sets: vec![],
        denied: vec!["10.2.0.0/16".parse().unwrap()],
        rate_limit: RateLimitConfig {
            client_interval_seconds: 1.0,
            client_burst: 4,
            tenant_requests_per_second: Some(1000),
            tenant_burst: Some(2000),
            kiss_of_death: true,
        },
        max_root_distance_seconds: Some(0.05),
        nts: None,
        symmetric_keys: None,
    };
    let port = PortPolicy::new(
        core_tenant(&config),
        Arc::new(TenantStats::new("x".into(), 1)),
    );
    let mut state = PortState::new(64, 1);
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let base = ClockTime::from_unix_secs(1_700_000_000);
    let mut answered = 0;
    for i in 0..50_000u32 {
        let len = match rng.random_range(0..4) {
            0 => rng.random_range(0..48),
            1 => 48,
            _ => rng.random_range(48..200),
        };
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if len >= 48 && rng.random_bool(0.5) {
            // Bias towards plausible requests so the deeper paths run.
            bytes[0] = (rng.random_range(0..4u8) << 6) | (rng.random_range(1..5u8) << 3) | 3;
        }
        let source: IpAddr = if rng.random_bool(0.7) {
            IpAddr::V4(std::net::Ipv4Addr::new(
                10,
                rng.random_range(0..4),
                rng.random(),
                rng.random(),
            ))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::from(rng.random::<u128>()))
        };
        let now = base.add_nanos(i64::from(i) * 1_000_000);
        let clock = ServerClockState {
            synchronized: rng.random_bool(0.8),
            leap: LeapIndicator::from_bits(rng.random_range(0..4)),
            stratum: rng.random(),
            precision: -20,
            root_delay: rng.random_range(0.0..0.2),
            root_dispersion: rng.random_range(0.0..0.2),
            reference_id: ReferenceId(*b"GPS\0"),
            reference_time: NtpTimestamp::from_clock_time(now),
            updated_at: now,
        };
        let mut out = [0u8; 48];
        let (outcome, written) = handle_request(
            &port,
            &mut state,
            &clock,
            Request {
                source,
                bytes: &bytes,
                truncated: rng.random_bool(0.01),
                received_at: now,
            },
            &mut out,
        );
        if outcome.answered() {
            answered += 1;
            assert_eq!(written, 48);
            assert!(written <= bytes.len());
            let asked = Packet::parse(&bytes).unwrap().header;
            assert_eq!(asked.mode, Mode::Client);
            assert!(matches!(asked.version, 3 | 4));
            let reply = Packet::parse(&out).unwrap().header;
            assert_eq!(reply.origin_timestamp, asked.transmit_timestamp);
        } else {
            assert_eq!(written, 0);
        }
    }
    assert!(
        answered > 250,
        "only {answered} answers: the generator misses the deep paths"
    );
}
