//! The agent's full per-packet path on arbitrary datagrams, sources and clock states: parse,
//! mode/version gate, deny list, allow trie, rate table, tenant budget, accuracy requirement,
//! reply or KoD. Never panics; an answer is only ever 48 bytes, never larger than the request,
//! answers only client-mode NTPv3/v4 requests and echoes their transmit timestamp.
#![no_main]

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use stratum_agent::server::path::{PortPolicy, PortState, Request, handle_request};
use stratum_agent::server::stats::TenantStats;
use stratum_agent::server::tenants::core_tenant;
use stratum_api::agent_config::{RateLimitConfig, TenantConfig};
use stratum_ntp::packet::{LeapIndicator, Packet, ReferenceId};
use stratum_ntp::server::ServerClockState;
use stratum_ntp::time::{ClockTime, NtpTimestamp};

fn port() -> &'static PortPolicy {
    static PORT: OnceLock<PortPolicy> = OnceLock::new();
    PORT.get_or_init(|| {
        let config = TenantConfig {
            id: "ns/fuzz".into(),
            port: 12300,
            allowed: vec![
                "10.0.0.0/8".parse().expect("static"),
                "fd00::/8".parse().expect("static"),
                "127.0.0.0/8".parse().expect("static"),
            ],
            allowed_sets: vec![],
            denied: vec!["10.2.0.0/16".parse().expect("static")],
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
        PortPolicy::new(core_tenant(&config), Arc::new(TenantStats::new("ns/fuzz".into(), 1)))
    })
}

thread_local! {
    // Kept across inputs so sequences of requests exercise the rate table.
    static STATE: RefCell<PortState> = RefCell::new(PortState::new(64, 7));
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 24 {
        return;
    }
    let (meta, datagram) = data.split_at(24);
    let source = if meta[0] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(meta[1], meta[2], meta[3], meta[4]))
    } else {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&meta[1..17]);
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    let now = ClockTime::from_unix_nanos(
        1_700_000_000_000_000_000 + i64::from(u16::from_be_bytes([meta[17], meta[18]])) * 1_000_000,
    );
    let clock = ServerClockState {
        synchronized: meta[0] & 2 == 0,
        leap: LeapIndicator::from_bits(meta[0] >> 2),
        stratum: meta[19],
        precision: -20,
        root_delay: f64::from(meta[20]) * 1e-3,
        root_dispersion: f64::from(meta[21]) * 1e-3,
        reference_id: ReferenceId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_clock_time(now),
        updated_at: now.add_secs(-f64::from(meta[22])),
    };
    let request = Request {
        source,
        bytes: datagram,
        truncated: meta[23] & 1 == 1,
        received_at: now,
    };
    let mut out = [0u8; 48];
    let (outcome, len) =
        STATE.with(|state| handle_request(port(), &mut state.borrow_mut(), &clock, request, &mut out));
    if outcome.answered() {
        assert_eq!(len, 48, "answers are one header");
        assert!(len <= datagram.len(), "reply {len} larger than request {}", datagram.len());
        let asked = Packet::parse(datagram).expect("only parseable requests are answered").header;
        assert_eq!(asked.mode, stratum_ntp::packet::Mode::Client);
        assert!(matches!(asked.version, 3 | 4));
        let reply = Packet::parse(&out[..len]).expect("our reply parses").header;
        assert_eq!(reply.origin_timestamp, asked.transmit_timestamp);
        assert_eq!(reply.version, asked.version);
    } else {
        assert_eq!(len, 0);
    }
});
