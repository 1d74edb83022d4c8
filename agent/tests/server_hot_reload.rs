//! Must-show 4: 1000 config changes (tenants added, removed, moved, renamed, their allow
//! lists and limits changed) while clients of an unchanged tenant run: not one of their
//! requests goes unanswered, and a removed tenant's port really closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use stratum_agent::loadgen::{self, LoadSpec};
use stratum_agent::server::ApplyReport;
use stratum_api::agent_config::TenantConfig;

const CHANGES: usize = 1000;

/// The `step`th config: the steady tenant as is, plus a churning set of others.
fn config(step: usize, steady: &TenantConfig, churn_ports: &[u16]) -> Vec<TenantConfig> {
    let mut tenants = vec![steady.clone()];
    let mut a = tenant(
        "ns/churn-a",
        churn_ports[(step / 4) % 2],
        &["127.0.0.0/8"],
        step.is_multiple_of(3),
    );
    a.allowed
        .push(format!("10.{}.0.0/16", step % 256).parse().unwrap());
    a.rate_limit.client_burst = 1 + (step % 50) as u32;
    tenants.push(a);
    if step % 4 < 2 {
        // Comes and goes every other step; renamed every fourth.
        let id = if step % 8 < 4 {
            "ns/churn-c"
        } else {
            "ns/churn-c2"
        };
        tenants.push(tenant(id, churn_ports[2], &["127.0.0.0/8"], false));
    }
    tenants
}

#[test]
fn a_thousand_config_changes_lose_no_answer_of_an_unchanged_tenant() {
    let steady_port = free_udp_port();
    let churn_ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let steady = tenant("ns/steady", steady_port, &["127.0.0.0/8"], false);
    let server = start_server(2, &serving(config(0, &steady, &churn_ports)));
    let target: SocketAddr = format!("127.0.0.1:{steady_port}").parse().unwrap();

    let mut changes = 0;
    let mut rounds = Vec::new();
    let mut totals = ApplyReport::default();
    while changes < CHANGES {
        // One bounded load round at a time, changes running alongside it.
        let done = Arc::new(AtomicBool::new(false));
        let round = {
            let done = done.clone();
            std::thread::spawn(move || {
                let report = loadgen::run(
                    &LoadSpec {
                        target,
                        rate: 2000.0,
                        duration: Duration::from_secs(2),
                        max_requests: 4000,
                        sources: loadgen::source_addresses("127.70.0.0/24".parse().unwrap(), 100),
                        wait: Duration::from_secs(2),
                    },
                    |_| {},
                )
                .unwrap();
                done.store(true, Ordering::Relaxed);
                report
            })
        };
        while !done.load(Ordering::Relaxed) && changes < CHANGES {
            changes += 1;
            let report = server.apply(&serving(config(changes, &steady, &churn_ports)));
            assert!(report.failed.is_empty(), "{report:?}");
            assert!(
                !report.opened.contains(&steady_port)
                    && !report.closed.contains(&steady_port)
                    && !report.updated.contains(&steady_port),
                "the steady tenant's port was touched: {report:?}"
            );
            totals.opened.extend(report.opened);
            totals.closed.extend(report.closed);
            totals.updated.extend(report.updated);
        }
        rounds.push(round.join().unwrap());
    }
    let sent: u64 = rounds.iter().map(|r| r.sent).sum();
    let lost: u64 = rounds.iter().map(|r| r.lost).sum();
    eprintln!(
        "{changes} changes ({} opened, {} closed, {} updated) during {} load rounds: \
         {sent} requests to the steady tenant, {lost} lost",
        totals.opened.len(),
        totals.closed.len(),
        totals.updated.len(),
        rounds.len()
    );
    assert_eq!(changes, CHANGES);
    assert_eq!(lost, 0, "answers of the unchanged tenant were lost");
    assert!(totals.opened.len() > 100 && totals.closed.len() > 100 && totals.updated.len() > 100);

    // Remove every other tenant: their ports close (bindable again without SO_REUSEPORT).
    server.apply(&serving(vec![steady]));
    for port in churn_ports {
        assert!(
            std::net::UdpSocket::bind(("::", port)).is_ok(),
            "port {port} of a removed tenant is still open"
        );
    }
    assert_eq!(server.served_ports().len(), 1);
}
