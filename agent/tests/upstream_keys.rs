//! Symmetric keys for upstreams against a real server: chronyd from Debian (`-x`, never
//! adjusting the clock) with a keyfile. The agent binary signs every request with the
//! upstream's key and takes only replies signed with it; a packet capture on loopback shows
//! that nothing it sends is unsigned, with a wrong key and without its key file too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::{Agent, TempDir, agent_config, chronyd_with, free_udp_port, wait_for};
use stratum_agent::wire_tap::Recorder;
use stratum_ntp::packet::Packet;
use stratum_ntp::symmetric::{MacCheck, SymmetricKeys};

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The server's keys, in chrony's spelling (test keys, not secrets).
const SERVER_KEYS: &str = "\
1 AES128 HEX:6b1f0e2d3c4b5a69788796a5b4c3d2e1
2 SHA1 HEX:0102030405060708090a0b0c0d0e0f1011121314
";

/// The agent's config for one upstream, chronyd on `port`, signed with key `key_id` of `keys`.
fn keyed_config(dir: &Path, port: u16, keys: &Path, key_id: u32) -> serde_json::Value {
    let mut config = agent_config("keys-1", &[SocketAddr::from((LOOPBACK, port))], 1, dir);
    config["upstreams"][0]["key"] =
        serde_json::json!({"keysFile": keys.display().to_string(), "keyId": key_id});
    config
}

fn metric(agent: &Agent, prefix: &str) -> Option<f64> {
    let (_, body) = agent.get_metrics_port("/metrics")?;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Whether `payload` carries a MAC that verifies under `keys`.
fn signed(payload: &[u8], keys: &SymmetricKeys) -> bool {
    Packet::parse(payload)
        .is_ok_and(|view| matches!(keys.check(payload, view.mac), MacCheck::Valid { .. }))
}

#[test]
fn the_agent_syncs_from_chronyd_with_a_key_and_never_sends_an_unsigned_request() {
    let dir = TempDir::new("upstream-keys");
    let server_keys = dir.path().join("chrony.keys");
    std::fs::write(&server_keys, SERVER_KEYS).unwrap();
    let port = free_udp_port(LOOPBACK);
    let chrony = chronyd_with(
        dir.path(),
        LOOPBACK,
        port,
        None,
        &format!("keyfile {}\n", server_keys.display()),
    );
    let keys = SymmetricKeys::parse(SERVER_KEYS).unwrap();
    let wire = Recorder::start(&[port]).expect("packet capture (needs CAP_NET_RAW)");

    // Key 2 (SHA1, a legacy server's): synchronized, shown as authenticated.
    let agent_keys = dir.path().join("upstream.keys");
    std::fs::write(&agent_keys, SERVER_KEYS).unwrap();
    let start = |block: u8, keys_file: &Path, key_id: u32| {
        let config = keyed_config(dir.path(), port, keys_file, key_id);
        Agent::start(dir.path(), block, &config, 0.2, 20.0)
    };
    let agent = start(44, &agent_keys, 2);
    wait_for(
        Duration::from_secs(60),
        "the agent synchronized with a key, four samples in",
        || {
            agent.status().is_some_and(|s| {
                s["tracking"]["synchronized"] == true
                    && s["sources"][0]["samples"].as_u64() >= Some(4)
            })
        },
    );
    let status = agent.status().unwrap_or_default();
    assert_eq!(
        status["sources"][0]["authentication"], "SymmetricKey",
        "{status:#}"
    );
    drop(agent);

    // A wrong key under id 1: chronyd cannot verify it and the agent takes nothing unsigned.
    let wrong = dir.path().join("wrong.keys");
    std::fs::write(&wrong, "1 AES128 HEX:6b1f0e2d3c4b5a69788796a5b4c3d2e2\n").unwrap();
    let before = wire.seen();
    let agent = start(45, &wrong, 1);
    // Two of its requests on the wire, no answer from chronyd (it drops bad MACs): nothing to
    // sample, so the agent stays unsynchronized.
    wait_for(
        Duration::from_secs(30),
        "two requests with the wrong key",
        || wire.seen() >= before + 2,
    );
    let status = agent.status().unwrap();
    assert_eq!(status["tracking"]["synchronized"], false, "{status:#}");
    assert_eq!(
        status["sources"][0]["samples"].as_u64().unwrap_or(0),
        0,
        "{status:#}"
    );
    drop(agent);

    // No key file at all: not one request.
    let missing = dir.path().join("missing.keys");
    let agent = start(46, &missing, 1);
    wait_for(
        Duration::from_secs(20),
        "polls withheld without the key",
        || {
            metric(
                &agent,
                r#"stratum_agent_upstream_key_polls_withheld_total{source="127.0.0.1"}"#,
            ) >= Some(2.0)
        },
    );
    drop(agent);

    let (datagrams, dropped) = wire.finish().unwrap();
    assert_eq!(dropped, 0);
    let requests: Vec<_> = datagrams
        .iter()
        .filter(|d| d.destination.port() == port)
        .collect();
    assert!(requests.len() >= 4, "{datagrams:?}\n{}", chrony.log_text());
    for d in &requests {
        let view = Packet::parse(&d.payload).expect("an NTP request");
        assert!(view.mac.is_some(), "an unsigned request went out: {d:?}");
    }
    // The agent that held key 2 signed with it; the one with the wrong key 1 did not verify.
    let verified = requests
        .iter()
        .filter(|d| signed(&d.payload, &keys))
        .count();
    assert!(
        verified >= 4 && verified < requests.len(),
        "{verified} of {}",
        requests.len()
    );
    let replies: Vec<_> = datagrams
        .iter()
        .filter(|d| d.source.port() == port)
        .collect();
    assert!(replies.len() >= 4);
    for d in &replies {
        assert!(
            signed(&d.payload, &keys),
            "chronyd answered unsigned: {d:?}"
        );
    }
}
