//! The loopback tap behind `stratumctl bench --in-server` and `make bench`'s in-server
//! latency: on real loopback traffic it sees every request, pairs every answer with it, and
//! its in-server time is inside the generator's round trip. Needs CAP_NET_RAW (the test
//! suite runs as root, like the e2e stack).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stratum_agent::loadgen::{self, LoadSpec};
use stratum_agent::wire_tap::Tap;

#[test]
fn the_tap_pairs_every_echoed_request_and_times_it_within_the_round_trip() {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || loadgen::echo_server(listen, 1, &stop))
    };
    let spec = |requests: u64| LoadSpec {
        target: listen,
        rate: 2_000.0,
        duration: Duration::from_secs(5),
        max_requests: requests,
        sources: loadgen::source_addresses("127.9.1.0/24".parse().unwrap(), 20),
        wait: Duration::from_secs(2),
    };
    // The echo binds on its own thread: wait (bounded) until it answers.
    let answering = (0..50).any(|_| loadgen::run(&spec(1), |_| {}).unwrap().answered > 0);
    assert!(answering, "the echo server never answered");

    let tap = Tap::start(port).expect("a packet socket (run as root: CAP_NET_RAW)");
    let load = loadgen::run(&spec(1000), |_| {}).unwrap();
    let seen = tap.finish().unwrap();
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap().unwrap();

    assert_eq!(load.sent, 1000);
    assert_eq!(seen.requests, load.sent, "{seen:?}");
    assert_eq!(seen.paired, load.answered, "{seen:?} {load:?}");
    assert_eq!(seen.unpaired_replies, 0, "{seen:?}");
    assert_eq!(seen.unanswered, load.lost, "{seen:?} {load:?}");
    // Each answer's time in the server lies inside its round trip, so every quantile does.
    assert!(seen.latency.p50_ns > 0, "{seen:?}");
    assert!(
        seen.latency.p50_ns <= load.latency.p50_ns,
        "{seen:?} {load:?}"
    );
    assert!(
        seen.latency.max_ns <= load.latency.max_ns,
        "{seen:?} {load:?}"
    );
}
