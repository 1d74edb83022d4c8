//! One worker thread: owns one SO_REUSEPORT socket of one tenant port and loops
//! receive batch → decide and build every reply → stamp transmit time → send batch.
//!
//! Per batch it loads the port's policy generation and the clock snapshot (two lock-free
//! `ArcSwap` loads) and takes the port's rate-table lock once. Why one lock per port and not
//! a table per worker: clients pick a fresh source port per request (RFC 9109), so the
//! kernel's 4-tuple hash spreads one client over every worker, and per-worker tables would
//! multiply each client's limit (and the tenant budget) by the number of workers. Held for
//! the decisions of one batch (at most 32 trie lookups and table probes, a few microseconds),
//! while the syscalls, which dominate, run outside it in parallel.

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use stratum_ntp::server::patch_transmit_timestamp;

use super::batch_io::{RecvBatch, SendBatch};
use super::path::{ClockSnapshot, PortPolicy, PortState, Request, handle_request};
use super::stats::Tally;
use crate::clock::host_realtime;

/// What the workers of one port share.
pub struct PortShared {
    /// The current policy generation.
    pub policy: ArcSwap<PortPolicy>,
    /// Rate table and client log.
    pub state: Mutex<PortState>,
}

/// Runs until `stop` is set (the owner also wakes the socket so this returns promptly).
pub fn run(
    socket: std::net::UdpSocket,
    port: Arc<PortShared>,
    clock: Arc<ArcSwap<ClockSnapshot>>,
    index: usize,
    stop: Arc<AtomicBool>,
) {
    let mut received = RecvBatch::new();
    let mut replies = SendBatch::new();
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        match received.receive(socket.as_fd()) {
            // Woken to stop: what the shutdown returned is not a datagram.
            _ if stop.load(Ordering::Relaxed) => break,
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) if is_idle(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "receive failed on a tenant socket");
                // Do not spin on a persistent error; the stop flag is checked again after.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let policy = port.policy.load();
        let clock = clock.load();
        // Without a kernel timestamp (never expected with SO_TIMESTAMPNS) use one reading
        // per batch.
        let batch_host_now = host_realtime();
        {
            let mut state = port.state.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..received.len() {
                let Some(datagram) = received.get(i) else {
                    break;
                };
                let source = datagram
                    .source
                    .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |s| s.ip());
                let request = Request {
                    source,
                    bytes: datagram.bytes,
                    truncated: datagram.truncated,
                    received_at: clock
                        .timescale
                        .to_clock(datagram.host_rx.unwrap_or(batch_host_now)),
                };
                let Some(out) = replies.next_buffer() else {
                    break;
                };
                let (outcome, len) =
                    handle_request(&policy, &mut state, &clock.state, request, out);
                tally.record(outcome);
                if outcome.answered() && datagram.source.is_some() {
                    replies.push_reply(&received, i, len);
                }
            }
        }
        if !replies.is_empty() {
            // Transmit timestamp as late as possible: one reading right before the syscall.
            let transmit_at = clock.timescale.to_clock(host_realtime());
            for j in 0..replies.len() {
                if let Some(reply) = replies.payload_mut(j) {
                    patch_transmit_timestamp(reply, transmit_at);
                }
            }
            replies.send(socket.as_fd());
        }
        policy.stats.worker(index).flush(&mut tally);
    }
}

fn is_idle(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
