//! Waiting on real processes (the agent binary, chronyd, ntpd-rs) over real sockets, which no
//! simulated clock reaches: a condition polled until a deadline. Shared by `common` and
//! `server_common`.

use std::time::{Duration, Instant};

/// Polls `condition` until it holds, for at most `timeout`: how long that took, or `None`.
/// The interval doubles from 1 ms to 50 ms, so a condition that holds soon is seen soon and
/// one that takes seconds costs a few checks a second.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(1);
    loop {
        if condition() {
            return Some(start.elapsed());
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return None;
        }
        std::thread::sleep(interval.min(left));
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}
