//! Issue 15 on real sockets: a flood from 3000 loopback sources outside the allow list, each
//! in its own /24 (the spoofed flood loopback allows), on a tenant with KoD on. The KoD DENY
//! replies, as the sources receive them and as the server counts them, stay within the
//! default refusal budget over the run (`burst + per_second × seconds`), every request is
//! still counted as denied, no stranger enters the client log, and an allowed client polling
//! meanwhile is answered every time; another tenant's refusals are untouched by the flood.
//! Bounded: 10 000 requests, about 3 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use stratum_agent::loadgen::{self, LoadSpec};
use stratum_ntp::server::RefusalLimit;

#[test]
fn a_flood_of_strangers_gets_kod_deny_only_within_the_refusal_budget() {
    let (port, port_b) = (free_udp_port(), free_udp_port());
    let server = start_server(
        2,
        &serving(vec![
            tenant("ns/a", port, &["127.1.0.0/16"], true),
            // Another tenant on the same workers, with refusals of its own to send.
            tenant("ns/b", port_b, &["127.2.0.0/16"], true),
        ]),
    );
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // 127.100.0.9, 127.100.1.9, ...: one source per /24, so only the tenant's budget binds.
    let strangers: Vec<IpAddr> = (0..3000u32)
        .map(|j| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                100 + (j / 250) as u8,
                (j % 250) as u8,
                9,
            ))
        })
        .collect();
    let started = Instant::now();
    let allowed = std::thread::spawn(move || {
        loadgen::run(
            &LoadSpec {
                target,
                rate: 10.0,
                duration: Duration::from_secs(2),
                max_requests: 20,
                sources: loadgen::source_addresses("127.1.0.0/24".parse().unwrap(), 20),
                wait: Duration::from_secs(1),
            },
            |_| {},
        )
        .unwrap()
    });
    let flood = std::thread::spawn(move || {
        loadgen::run(
            &LoadSpec {
                target,
                rate: 5000.0,
                duration: Duration::from_secs(2),
                max_requests: 10_000,
                sources: strangers,
                wait: Duration::from_secs(1),
            },
            |_| {},
        )
        .unwrap()
    });
    // While A's budget is spent (1000 strangers in, 40 + 20/s allowed), B still refuses its
    // own stranger: each tenant port has its own refusal budget.
    let denied_on_a = || {
        server
            .stats()
            .tenants
            .into_iter()
            .find(|t| t.tenant == "ns/a")
            .map_or(0, |t| t.totals.denied)
    };
    assert!(wait_until(Duration::from_secs(5), || denied_on_a() >= 1000));
    let on_b = ask(
        "127.250.0.9".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], port_b)),
        Duration::from_secs(1),
    )
    .expect("tenant B sent no refusal while A's budget was spent");
    assert_eq!((on_b[1], &on_b[12..16]), (0, &b"DENY"[..]), "{on_b:?}");
    let flood = flood.join().unwrap();
    let allowed = allowed.join().unwrap();
    // Every request has been decided once the server's count reaches what was sent.
    let totals = || {
        server
            .stats()
            .tenants
            .into_iter()
            .find(|t| t.tenant == "ns/a")
            .unwrap()
            .totals
    };
    // loadgen counts failed sends in `sent`; those never reached the server.
    let delivered = flood.sent - flood.send_failures;
    assert!(wait_until(Duration::from_secs(5), || {
        totals().received >= delivered + allowed.sent - allowed.send_failures
    }));
    let seconds = started.elapsed().as_secs_f64();
    let totals = totals();
    let budget = RefusalLimit::default();
    let bound = (budget.burst + budget.per_second * seconds).floor() as u64;
    eprintln!(
        "REFUSALS: {} strangers' requests in {seconds:.2} s, {} KoD DENY received, {} sent \
         by the server (budget {bound}); allowed client {} of {} answered",
        flood.sent, flood.kod_deny, totals.kod_deny, allowed.answered, allowed.sent
    );
    assert!(flood.sent >= 5_000, "the flood ran: {}", flood.sent);
    assert_eq!(flood.answered, 0, "no stranger is served");
    assert!(
        flood.kod_deny >= 1,
        "refusals are still sent within the budget"
    );
    assert!(
        totals.kod_deny <= bound,
        "server sent {} KoD DENY, budget {bound}",
        totals.kod_deny
    );
    assert!(flood.kod_deny <= totals.kod_deny);
    assert_eq!(totals.denied, delivered, "every stranger counted as denied");
    assert_eq!(
        allowed.answered, allowed.sent,
        "the allowed client is answered"
    );
    let logged = server.clients(Some("ns/a"), 10_000);
    let net: ipnet::IpNet = "127.1.0.0/16".parse().unwrap();
    for row in logged.iter().flat_map(|t| &t.clients) {
        assert!(
            net.contains(&row.address),
            "stranger {} logged",
            row.address
        );
    }
}
