//! Issue 17: `serving.metrics.perTenant: false` turns the request metrics from one series per
//! tenant into totals under `tenant="_all"`, on a real server with real requests: the totals
//! are the sum of the tenants' counts, never go down when a tenant is removed, and switching
//! back restores the per-tenant series; no tenant's id appears while totals are on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use stratum_agent::metrics::Metrics;
use stratum_agent::server::{Server, ServerOptions};

/// `tenant` label → served count, from the exported text.
fn served(server: &Server, metrics: &Metrics) -> BTreeMap<String, u64> {
    server.export_metrics(metrics);
    metrics
        .render()
        .lines()
        .filter_map(|l| {
            let rest =
                l.strip_prefix("stratum_agent_tenant_requests_total{outcome=\"served\",tenant=\"")?;
            let (tenant, value) = rest.split_once("\"} ")?;
            Some((tenant.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// [`served`] once it counts `answered` requests in all: a worker counts a request after
/// sending its reply, so a read the instant the last answer arrives can be one short.
fn served_after(server: &Server, metrics: &Metrics, answered: u64) -> BTreeMap<String, u64> {
    wait_until(Duration::from_secs(5), || {
        served(server, metrics).values().sum::<u64>() >= answered
    });
    served(server, metrics)
}

fn series_count(metrics: &Metrics) -> usize {
    metrics
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("stratum_agent_tenant_requests_total{")
                || l.starts_with("stratum_agent_tenant_kod_sent_total{")
        })
        .count()
}

#[test]
fn totals_only_sums_every_tenant_keeps_counting_and_switches_back() {
    let (a, b) = (free_udp_port(), free_udp_port());
    let server = Server::new(ServerOptions {
        workers: 2,
        ..ServerOptions::default()
    });
    server.publish_clock(
        synchronized_state(),
        stratum_agent::clock::Timescale::IDENTITY,
    );
    let metrics = Metrics::new().unwrap();
    let both = vec![
        tenant("ns/a", a, &["127.0.0.0/8"], false),
        tenant("ns/b", b, &["127.0.0.0/8"], false),
    ];
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let ask_on = |port: u16, n: usize| {
        for i in 0..n {
            // A client address each: the per-client rate limit never bites.
            let client = format!("127.0.9.{}", i + 1).parse().unwrap();
            assert!(
                ask(client, at(port), Duration::from_secs(2)).is_some(),
                "no answer on {port}"
            );
        }
    };

    // Per tenant (the default): 8 series per tenant.
    server.apply(&serving(both.clone()));
    ask_on(a, 2);
    ask_on(b, 3);
    let per_tenant = served_after(&server, &metrics, 5);
    assert_eq!(
        per_tenant,
        BTreeMap::from([("ns/a".into(), 2), ("ns/b".into(), 3)])
    );
    assert_eq!(series_count(&metrics), 16);

    // Totals only: one set of 8 series, the tenants' sum; no tenant id left.
    let mut totals = serving(both.clone());
    totals.metrics_per_tenant = false;
    server.apply(&totals);
    assert_eq!(
        served_after(&server, &metrics, 5),
        BTreeMap::from([("_all".into(), 5)])
    );
    assert_eq!(series_count(&metrics), 8);
    assert!(!metrics.render().contains("ns/a"), "a tenant id leaked");

    // A tenant removed: its counts stay in the totals, which keep counting.
    let mut only_a = serving(vec![both[0].clone()]);
    only_a.metrics_per_tenant = false;
    server.apply(&only_a);
    assert_eq!(
        served_after(&server, &metrics, 5)["_all"],
        5,
        "the totals went down"
    );
    ask_on(a, 1);
    assert_eq!(served_after(&server, &metrics, 6)["_all"], 6);

    // And back: per tenant again, the totals' series gone.
    server.apply(&serving(vec![both[0].clone()]));
    assert_eq!(
        served_after(&server, &metrics, 3),
        BTreeMap::from([("ns/a".into(), 3)])
    );
    assert_eq!(series_count(&metrics), 8);
}
