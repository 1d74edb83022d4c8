//! Issue 15: the server costs O(cores), not O(tenants × cores). 1000 tenant ports are served
//! by at most one worker per core (asserted: a thread count, not a timing), every one of
//! them answers, and an idle server sleeps: its CPU time over 5 s and its RSS are printed
//! (not asserted, they depend on the machine). Alone in its file so the process holds only
//! this test's threads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use stratum_agent::server::default_workers;

const TENANTS: usize = 1000;

/// Threads of this process.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// `/proc/self/task/<tid>` of each of the server's worker threads (named `ntp-worker-N`).
fn worker_tasks() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("ntp-worker-"))
        })
        .map(|t| t.path())
        .collect()
}

/// Context switches (voluntary and not) of the server's worker threads: a thread that is
/// never woken does not switch.
fn worker_switches() -> (usize, u64) {
    let mut workers = 0;
    let mut switches = 0;
    for task in worker_tasks() {
        workers += 1;
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        switches += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    (workers, switches)
}

/// For each worker thread: whether it is blocked in `epoll_wait`/`epoll_pwait` with an
/// infinite timeout (`-1`), or `epoll_pwait2` with none (a null timespec), as the kernel shows
/// it in `/proc/self/task/*/syscall` (x86_64 numbers; elsewhere the test names the syscall).
fn idle_waits() -> Vec<bool> {
    worker_tasks()
        .into_iter()
        .map(|t| {
            let line = std::fs::read_to_string(t.join("syscall")).unwrap_or_default();
            let fields: Vec<&str> = line.split_whitespace().collect();
            let arg = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
            };
            match fields.first().copied() {
                // epoll_wait, epoll_pwait: the timeout is an int, -1 for none.
                Some("232" | "281") => arg(4).is_some_and(|t| t as u32 == u32::MAX),
                // epoll_pwait2: a timespec pointer, null for none.
                Some("441") => arg(4) == Some(0),
                _ => false,
            }
        })
        .collect()
}

/// Whether every worker thread is asleep (state `S` in /proc: blocked in `epoll_wait`, the
/// only place a worker waits).
fn workers_sleeping() -> bool {
    worker_tasks().into_iter().all(|t| {
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
    })
}

/// `count` distinct UDP ports free on every address right now (held together while the
/// kernel picks them, so none repeats).
fn free_udp_ports(count: usize) -> Vec<u16> {
    let held: Vec<UdpSocket> = (0..count)
        .map(|_| UdpSocket::bind("[::]:0").unwrap())
        .collect();
    held.iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect()
}

#[test]
fn a_thousand_tenant_ports_are_served_by_one_worker_per_core_that_sleeps_when_idle() {
    let before = thread_count();
    let ports = free_udp_ports(TENANTS);
    let tenants = ports
        .iter()
        .enumerate()
        .map(|(i, port)| tenant(&format!("ns/t{i}"), *port, &["127.0.0.0/8"], false))
        .collect();
    let started = Instant::now();
    let server = start_server(default_workers(), &serving(tenants));
    let open_time = started.elapsed();
    let threads = thread_count();
    let rss_opened = rss_bytes();
    let workers = server.options().workers;
    let cores = default_workers();

    // Every port answers (one request each, sequentially: bounded in count and time).
    let client = "127.0.0.1".parse().unwrap();
    let unanswered: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|port| {
            ask(
                client,
                SocketAddr::from(([127, 0, 0, 1], *port)),
                Duration::from_secs(2),
            )
            .is_none()
        })
        .collect();
    assert!(
        unanswered.is_empty(),
        "ports without an answer: {unanswered:?}"
    );

    // Idle: no traffic for 5 s. The answers above may still be on their way out: wait until
    // every worker sleeps and their switch count holds still between two looks.
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let now = worker_switches();
            let settled = workers_sleeping() && last == Some(now);
            last = Some(now);
            settled
        }),
        "the workers never went back to sleep"
    );
    let (worker_threads, _) = worker_switches();
    let blocked = idle_waits();
    let rss = rss_bytes();
    eprintln!(
        "THREADS: {TENANTS} tenant ports, {workers} worker(s) on {cores} core(s): {threads} \
         threads in the process ({before} before the server); ports opened in {open_time:?}; \
         idle workers blocked in epoll_wait without a timeout: {}/{workers}; \
         RSS {} MiB with the ports open, {} MiB once each was asked (its tables made)",
        blocked.iter().filter(|w| **w).count(),
        rss_opened >> 20,
        rss >> 20
    );
    assert_eq!(
        worker_threads, workers,
        "one thread per worker, named ntp-worker-N"
    );
    // No timer can wake an idle worker: each is blocked in epoll_wait with no timeout, so only
    // a datagram or its eventfd does (read from the kernel, no time window needed).
    assert!(
        !blocked.is_empty() && blocked.iter().all(|w| *w),
        "idle workers wait with a timeout: {blocked:?}"
    );
    assert!(workers <= cores);
    // The test harness's own threads (main, this test) plus the workers; the old design had
    // `workers` threads per port (2004 for 1000 tenants on 2 cores).
    assert!(
        threads <= before + cores,
        "{threads} threads for {TENANTS} ports on {cores} cores (started with {before})"
    );
    drop(server);
    assert_eq!(
        thread_count(),
        before,
        "stopping the server ends its workers"
    );
}
