//! `stratumctl query`'s exit status, against the real server on loopback: 0 for time from a
//! synchronized server, 2 for an unsynchronized answer, 3 for a Kiss-o'-Death, 1 for no answer.
//! Scripts and init containers branch on it, so a refusal must never look like success.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use stratum_agent::clock::Timescale;
use stratum_ntp::server::ServerClockState;

/// Runs `stratumctl --json query ADDR` and returns its exit code and its JSON, if any.
fn query(target: SocketAddr) -> (Option<i32>, Option<serde_json::Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_stratumctl"))
        .args(["--json", "query", "--timeout", "1", &target.to_string()])
        .output()
        .expect("running stratumctl");
    (out.status.code(), serde_json::from_slice(&out.stdout).ok())
}

#[test]
fn query_exits_0_when_served_2_when_unsynchronized_3_when_refused_and_1_without_answer() {
    let (open, closed) = (free_udp_port(), free_udp_port());
    let server = start_server(
        1,
        &serving(vec![
            tenant("ns/open", open, &["127.0.0.0/8"], true),
            // Allows nobody on loopback, and says so with a Kiss-o'-Death.
            tenant("ns/closed", closed, &["192.0.2.0/24"], true),
        ]),
    );
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    let (code, answer) = query(at(open));
    assert_eq!(code, Some(0), "{answer:?}");
    assert_eq!(answer.unwrap()["stratum"], 2);

    let (code, answer) = query(at(closed));
    assert_eq!(code, Some(3), "{answer:?}");
    assert_eq!(answer.unwrap()["kissCode"], "DENY");

    server.publish_clock(ServerClockState::unsynchronized(-20), Timescale::IDENTITY);
    let (code, answer) = query(at(open));
    assert_eq!(code, Some(2), "{answer:?}");
    assert_eq!(answer.unwrap()["leap"], "unsynchronized");

    // Nothing listens here any more: an error, not an answer.
    let silent = free_udp_port();
    let (code, answer) = query(at(silent));
    assert_eq!(code, Some(1), "{answer:?}");
    assert!(answer.is_none());
}
