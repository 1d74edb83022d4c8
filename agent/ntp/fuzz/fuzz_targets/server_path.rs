//! The server hot path on arbitrary input: parse, policy decision, reply building.
//! Never panics, and a reply is never larger than the request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;
use stratum_ntp::packet::{LeapIndicator, Packet, ReferenceId};
use stratum_ntp::server::{
    ClientRateLimit, Decision, DenyAction, RateLimiter, RefusalLimit, ServerClockState,
    ServerPolicy, TenantConfig, build_kod, build_reply,
};
use stratum_ntp::time::{ClockTime, NtpTimestamp};

fn policy() -> &'static ServerPolicy {
    static POLICY: OnceLock<ServerPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let tenant = |allow: &str| TenantConfig {
            name: allow.to_string(),
            allow: vec![allow.parse().expect("static prefix")],
            allow_except: vec!["10.1.0.0/16".parse().expect("static prefix")],
            deny: vec![("10.2.0.0/16".parse().expect("static prefix"), DenyAction::Kod)],
            kod_not_allowed: true,
            client_rate_limit: Some(ClientRateLimit {
                kod: true,
                ..ClientRateLimit::default()
            }),
            budget: None,
            max_root_distance: Some(0.05),
            refusals: RefusalLimit::default(),
        };
        ServerPolicy::new(&[tenant("10.0.0.0/8"), tenant("::/0")])
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 20 {
        return;
    }
    let (meta, packet) = data.split_at(20);
    let tenant = u32::from(meta[0] % 3);
    let src = if meta[1] & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(meta[2], meta[3], meta[4], meta[5]))
    } else {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&meta[2..18]);
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    let now = ClockTime::from_unix_nanos(
        1_700_000_000_000_000_000 + i64::from(u16::from_be_bytes([meta[18], meta[19]])) * 1_000_000,
    );
    let mut limiter = RateLimiter::new(64, 7);
    let decision = policy().decide(&mut limiter, tenant, src, now);
    let Ok(request) = Packet::parse(packet) else {
        return;
    };
    let state = ServerClockState {
        synchronized: meta[1] & 2 == 0,
        leap: LeapIndicator::from_bits(meta[1] >> 2),
        stratum: meta[6],
        precision: -20,
        root_delay: f64::from(meta[7]) * 1e-3,
        root_dispersion: f64::from(meta[8]) * 1e-3,
        reference_id: ReferenceId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_clock_time(now),
        updated_at: now,
    };
    let mut out = [0u8; 1024];
    let written = match decision {
        Decision::Serve => {
            build_reply(&request, now, now, &state, policy().max_root_distance(tenant), &mut out)
        }
        Decision::Kod(code) => build_kod(&request, code, &mut out),
        Decision::Drop(_) => None,
    };
    if let Some(len) = written {
        assert!(len <= packet.len(), "reply {len} larger than request {}", packet.len());
        let reply = Packet::parse(&out[..len]).expect("our reply parses");
        assert_eq!(reply.header.origin_timestamp, request.header.transmit_timestamp);
    }
});
