//! `stratumctl query`'s exit status, against the real server on loopback: 0 for time from a
//! synchronized server, 2 for an unsynchronized answer, 3 for a Kiss-o'-Death, 1 for no answer.
//! Scripts and init containers branch on it, so a refusal must never look like success.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
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

/// A server with tenant `ns/open` (serves loopback) and `ns/closed` (allows nobody on
/// loopback, and says so with a Kiss-o'-Death), both on the loopback addresses of [`at`].
fn open_and_closed_tenants() -> (stratum_agent::server::Server, u16, u16) {
    let (open, closed) = (free_udp_port(), free_udp_port());
    let server = start_server(
        1,
        &serving(vec![
            tenant("ns/open", open, &["127.0.0.0/8"], true),
            tenant("ns/closed", closed, &["192.0.2.0/24"], true),
        ]),
    );
    (server, open, closed)
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn query_exits_0_when_served_2_when_unsynchronized_3_when_refused_and_1_without_answer() {
    let (server, open, closed) = open_and_closed_tenants();

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

/// Runs `stratumctl waitsync` with `args` against `target`.
fn waitsync(target: SocketAddr, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stratumctl"));
    command
        .arg("waitsync")
        .args(args)
        .arg(target.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

#[test]
fn waitsync_waits_through_unsynchronized_answers_and_ends_as_soon_as_time_is_good() {
    let (server, open, closed) = open_and_closed_tenants();
    let unsynchronized_answers = |server: &stratum_agent::server::Server| {
        server
            .stats()
            .tenants
            .iter()
            .find(|t| t.tenant == "ns/open")
            .map_or(0, |t| t.totals.served_unsynchronized)
    };

    // Unsynchronized throughout: it keeps asking, then gives up with 2.
    server.publish_clock(ServerClockState::unsynchronized(-20), Timescale::IDENTITY);
    let out = waitsync(at(open), &["--timeout", "1", "--interval", "0.1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the server is unsynchronized"), "{stderr}");
    assert!(
        unsynchronized_answers(&server) >= 2,
        "it asked more than once"
    );

    // Synchronized while it waits: it ends with 0 on the next answer.
    let before = unsynchronized_answers(&server);
    let mut waiting = waitsync(at(open), &["--timeout", "30", "--interval", "0.1"])
        .spawn()
        .unwrap();
    // Its progress lines are the event to wait on: two unsynchronized answers seen.
    let mut progress = BufReader::new(waiting.stderr.take().unwrap()).lines();
    let not_yet = progress
        .by_ref()
        .map_while(Result::ok)
        .filter(|line| line.contains("the server is unsynchronized"))
        .take(2)
        .count();
    assert_eq!(not_yet, 2, "waitsync never asked the unsynchronized server");
    assert!(unsynchronized_answers(&server) >= before + 2);
    server.publish_clock(synchronized_state(), Timescale::IDENTITY);
    let out = waiting.wait_with_output().unwrap();
    // Held open until now: its later progress lines must not meet a closed pipe.
    drop(progress);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("synchronized: offset"), "{stdout}");

    // A bound the server cannot meet is waited for, not waved through.
    let out = waitsync(
        at(open),
        &[
            "--timeout",
            "0.5",
            "--interval",
            "0.1",
            "--max-distance",
            "0",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("root distance"), "{stderr}");

    // Refused: 3 at once, not after the timeout. Silent: 1.
    let out = waitsync(at(closed), &["--timeout", "30"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = waitsync(
        at(free_udp_port()),
        &["--timeout", "0.5", "--interval", "0.1"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
