//! The server wired into the real agent binary: a simulated clock 0.3 s off, synchronized
//! from a chronyd (`-x`, serving, never touching the clock) on loopback; tenants served from
//! a config file, answered unsynchronized until the agent is and with its disciplined clock
//! after; a file change moves tenants without a restart; counters in /metrics, /serverstats
//! and /clients; a tenant port held by another socket is reported in /status and the
//! metrics, and served once it is free, with no config change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use stratum_api::AgentConfig;
use stratum_ntp::packet::Packet;

#[test]
fn the_agent_serves_tenants_with_its_disciplined_clock_and_follows_config_changes() {
    let dir = TempDir::new("agentbin");
    let upstream_port = free_udp_port();
    let Some(_chronyd) = chronyd_serving(&dir, upstream_port) else {
        return;
    };

    let (port_a, port_b, port_c) = (free_udp_port(), free_udp_port(), free_udp_port());
    let mut config = AgentConfig::from_json(include_str!("data/agent-config.json")).unwrap();
    config.upstreams[0].port = upstream_port;
    config.serving.tenants = vec![
        tenant("ns/a", port_a, &["127.0.0.0/8"], true),
        tenant("ns/b", port_b, &["127.0.0.0/8"], false),
    ];
    let config_path = dir.path("agent.json");
    std::fs::write(&config_path, config.to_json()).unwrap();
    let (metrics_port, status_port) = (free_tcp_port(), free_tcp_port());
    let _agent = Child(
        Command::new(env!("CARGO_BIN_EXE_stratum-agent"))
            .args([
                "run",
                "--node-name",
                "test",
                "--clock",
                "simulated",
                "--sim-offset",
                "0.3",
            ])
            .args(["--no-report", "--server-workers", "2", "--config"])
            .arg(&config_path)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--status-addr")
            .arg(format!("127.0.0.1:{status_port}"))
            .arg("--state-dir")
            .arg(&dir.0)
            .env("STRATUM_DENY_SYSTEM_CLOCK", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the agent"),
    );
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let client = "127.0.0.1".parse().unwrap();

    // Synchronized answers: LI 0, stratum 3 (chronyd's 2 + 1), the disciplined clock within
    // a few ms of true time although the simulated oscillator started 0.3 s off.
    let mut synced = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            synced = ask(client, at(port_a), Duration::from_millis(500)).filter(|r| r[0] >> 6 != 3);
            synced.is_some()
        }),
        "the agent never answered as synchronized"
    );
    let reply = Packet::parse(synced.as_deref().unwrap()).unwrap().header;
    let host = stratum_agent::clock::host_realtime();
    let served = reply.transmit_timestamp.to_clock_time_near(host);
    assert_eq!(reply.stratum, 3);
    assert!(
        served.secs_since(host).abs() < 0.05,
        "served {:?} host {host:?}",
        served.secs_since(host)
    );
    assert!(ask(client, at(port_b), Duration::from_secs(1)).is_some());

    // Hot reload through the file: B leaves (its port closes), C arrives, A keeps serving.
    config.serving.tenants = vec![
        tenant("ns/a", port_a, &["127.0.0.0/8"], true),
        tenant("ns/c", port_c, &["127.0.0.0/8"], false),
    ];
    config.revision = "test-2".into();
    std::fs::write(&config_path, config.to_json()).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        ask(client, at(port_c), Duration::from_millis(300)).is_some()
    }));
    assert!(wait_until(Duration::from_secs(5), || {
        std::net::UdpSocket::bind(("::", port_b)).is_ok()
    }));
    assert!(ask(client, at(port_a), Duration::from_secs(1)).is_some());

    let metrics = http_get(metrics_port, "/metrics").unwrap().1;
    assert!(
        metrics.contains(r#"stratum_agent_tenant_requests_total{outcome="served",tenant="ns/a"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"stratum_agent_tenant_kod_sent_total{code="RATE",tenant="ns/a"} 0"#)
    );
    assert!(
        !metrics.contains(r#"tenant="ns/b""#),
        "a removed tenant's series must go"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&http_get(status_port, "/serverstats").unwrap().1).unwrap();
    let a = stats["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "ns/a")
        .unwrap();
    assert!(a["totals"]["served"].as_u64().unwrap() >= 2, "{stats}");
    let clients: serde_json::Value =
        serde_json::from_str(&http_get(status_port, "/clients?tenant=ns%2Fa").unwrap().1).unwrap();
    assert_eq!(
        clients[0]["clients"][0]["address"], "127.0.0.1",
        "{clients}"
    );

    // A tenant port held by another socket (no SO_REUSEPORT): reported in /status (which the
    // NodeClock's TenantPorts condition is built from) and the metric, then served without a
    // config change once it is free.
    let holder = std::net::UdpSocket::bind(("::", 0)).unwrap();
    let held = holder.local_addr().unwrap().port();
    config
        .serving
        .tenants
        .push(tenant("ns/held", held, &["127.0.0.0/8"], false));
    config.revision = "test-3".into();
    std::fs::write(&config_path, config.to_json()).unwrap();
    let failed_ports = || -> Vec<u64> {
        http_get(status_port, "/status")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|status| {
                status["failedPorts"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|f| f["port"].as_u64()).collect())
            })
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(10), || failed_ports()
            == [u64::from(held)]),
        "the held port never showed in /status"
    );
    assert!(
        http_get(metrics_port, "/metrics")
            .unwrap()
            .1
            .contains("stratum_agent_tenant_port_bind_failures 1")
    );
    drop(holder);
    assert!(
        wait_until(Duration::from_secs(15), || {
            ask(client, at(held), Duration::from_millis(300)).is_some()
        }),
        "the freed port was never served"
    );
    assert!(wait_until(Duration::from_secs(5), || failed_ports().is_empty()));
}
