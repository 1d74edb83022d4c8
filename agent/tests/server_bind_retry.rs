//! Issue 15: a tenant port that cannot be bound (another process holds it) is reported, not
//! only logged: in the apply report, in `failed_ports` (which the agent puts in its NodeClock
//! status), in `/serverstats` and in `stratum_agent_tenant_port_bind_failures`; and it is
//! bound again, both on the next apply and on its own (backoff timer), once it is free.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use stratum_agent::metrics::Metrics;
use stratum_agent::server::{Server, ServerOptions};

fn bind_failures(server: &Server, metrics: &Metrics) -> String {
    server.export_metrics(metrics);
    metrics
        .render()
        .lines()
        .find(|l| l.starts_with("stratum_agent_tenant_port_bind_failures "))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_port_held_elsewhere_is_reported_and_served_once_it_is_free() {
    let (free, held_port) = (free_udp_port(), free_udp_port());
    // A socket without SO_REUSEPORT: ours cannot join it.
    let holder = UdpSocket::bind(("::", held_port)).unwrap();
    let server = Server::new(ServerOptions {
        workers: 2,
        ..ServerOptions::default()
    });
    server.publish_clock(
        synchronized_state(),
        stratum_agent::clock::Timescale::IDENTITY,
    );
    let config = serving(vec![
        tenant("ns/free", free, &["127.0.0.0/8"], false),
        tenant("ns/held", held_port, &["127.0.0.0/8"], false),
    ]);
    let metrics = Metrics::new().unwrap();

    let report = server.apply(&config);
    assert_eq!(report.opened, [free]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, held_port);
    let failed = server.failed_ports();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].port, failed[0].tenant.as_str()),
        (held_port, "ns/held")
    );
    assert!(failed[0].error.contains("in use"), "{:?}", failed[0]);
    assert_eq!(server.stats().failed, failed);
    assert_eq!(
        bind_failures(&server, &metrics),
        "stratum_agent_tenant_port_bind_failures 1"
    );
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let client = "127.0.0.1".parse().unwrap();
    assert!(ask(client, at(free), Duration::from_secs(2)).is_some());

    // The next apply retries at once: still held, so still failing, one more attempt.
    let report = server.apply(&config);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(server.failed_ports()[0].attempts, 2);

    // Freed: the backoff timer (driven by the agent loop calling retry_failed) binds it
    // without any config change.
    drop(holder);
    assert!(
        wait_until(Duration::from_secs(10), || !server
            .retry_failed()
            .opened
            .is_empty()),
        "the freed port was never bound again"
    );
    assert!(server.failed_ports().is_empty());
    assert_eq!(
        bind_failures(&server, &metrics),
        "stratum_agent_tenant_port_bind_failures 0"
    );
    assert!(ask(client, at(held_port), Duration::from_secs(2)).is_some());

    // A failing port removed from the config is no longer reported.
    let holder = UdpSocket::bind(("::", free_udp_port())).unwrap();
    let blocked = holder.local_addr().unwrap().port();
    let report = server.apply(&serving(vec![tenant(
        "ns/blocked",
        blocked,
        &["127.0.0.0/8"],
        false,
    )]));
    assert_eq!(report.closed.len(), 2);
    assert_eq!(server.failed_ports().len(), 1);
    server.apply(&serving(vec![]));
    assert!(server.failed_ports().is_empty());
}
