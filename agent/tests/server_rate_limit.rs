//! Must-show 2: a client above its rate is limited (with KoD RATE when the tenant enables
//! KoD) while the tenant's other clients, each within its own limit, are all answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use stratum_agent::loadgen::{self, LoadReport, LoadSpec};

fn load(target: SocketAddr, sources: &str, count: usize, requests: u64, rate: f64) -> LoadReport {
    loadgen::run(
        &LoadSpec {
            target,
            rate,
            duration: Duration::from_secs(10),
            max_requests: requests,
            sources: loadgen::source_addresses(sources.parse().unwrap(), count),
            wait: Duration::from_secs(2),
        },
        |_| {},
    )
    .unwrap()
}

fn limited_tenant(port: u16, kod: bool) -> stratum_api::agent_config::TenantConfig {
    let mut t = tenant("ns/limited", port, &["127.0.0.0/8"], kod);
    // 4 back to back, then 10/s: the heavy client below (400/s) exceeds it at once. KoD RATE
    // is due once per interval, and one due KoD in four is leaked as a normal answer
    // instead, so a short interval gives the heavy client several chances at one.
    t.rate_limit.client_burst = 4;
    t.rate_limit.client_interval_seconds = 0.1;
    t
}

fn run_both(kod: bool) -> (LoadReport, LoadReport) {
    let port = free_udp_port();
    let _server = start_server(2, &serving(vec![limited_tenant(port, kod)]));
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let heavy = std::thread::spawn(move || load(target, "127.40.0.1/32", 1, 400, 400.0));
    // 200 clients, 2 requests each: within the burst of 4.
    let polite = load(target, "127.41.0.0/16", 200, 400, 400.0);
    (heavy.join().unwrap(), polite)
}

#[test]
fn a_client_above_its_rate_gets_kod_rate_and_the_others_are_all_answered() {
    let (heavy, polite) = run_both(true);
    eprintln!("heavy: {heavy:?}\npolite: {polite:?}");
    assert_eq!(polite.answered, polite.sent, "every polite client answered");
    assert_eq!(polite.kod_rate, 0);
    // 4 of burst, then about a quarter leaked (chrony's leak): far below all 400.
    assert!(
        heavy.answered < heavy.sent / 2,
        "heavy client answered {} of {}",
        heavy.answered,
        heavy.sent
    );
    assert!(
        heavy.kod_rate >= 1,
        "the heavy client was told to slow down"
    );
}

#[test]
fn without_kod_the_limited_client_is_dropped_silently() {
    let (heavy, polite) = run_both(false);
    assert_eq!(polite.answered, polite.sent);
    assert!(heavy.answered < heavy.sent / 2);
    assert_eq!(heavy.kod_rate + heavy.kod_deny, 0);
}
