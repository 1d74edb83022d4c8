//! Coalescing of agent config writes: pod churn must not rewrite a TimeService's ConfigMap more
//! than about once per interval. Pure decisions over caller-supplied instants, so tests drive
//! it with simulated time; the reconciler turns `WriteAt` into a requeue.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Whether a changed config may be written now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write now.
    WriteNow,
    /// Hold the change; reconcile again at this instant.
    WriteAt(Instant),
}

/// Last write per TimeService.
#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    last_write: HashMap<String, Instant>,
}

impl Coalescer {
    /// At most one write per `interval` per TimeService.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_write: HashMap::new(),
        }
    }

    /// Decides for a changed config of `key` at `now`, recording the write when allowed.
    pub fn decide(&mut self, key: &str, now: Instant) -> Decision {
        match self.last_write.get(key) {
            Some(last) if now.saturating_duration_since(*last) < self.interval => {
                Decision::WriteAt(*last + self.interval)
            }
            _ => {
                self.last_write.insert(key.to_owned(), now);
                Decision::WriteNow
            }
        }
    }

    /// Forgets a deleted TimeService.
    pub fn forget(&mut self, key: &str) {
        self.last_write.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_changes_yields_one_write_per_interval_and_the_last_change_is_written() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(1));
        let mut writes = 0;
        let mut pending_until = None;
        // 100 pod events, 50 ms apart: 5 simulated seconds of churn.
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(50 * i);
            match c.decide("ts", now) {
                Decision::WriteNow => {
                    writes += 1;
                    pending_until = None;
                }
                Decision::WriteAt(at) => {
                    assert!(at > now && at <= now + Duration::from_secs(1));
                    pending_until = Some(at);
                }
            }
        }
        assert_eq!(writes, 5, "one write per simulated second");
        // The requeue at the promised instant writes the last held change.
        let at = pending_until.unwrap_or(t0);
        assert_eq!(c.decide("ts", at), Decision::WriteNow);
    }

    #[test]
    fn time_services_are_coalesced_independently() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(1));
        assert_eq!(c.decide("a", t0), Decision::WriteNow);
        assert_eq!(c.decide("b", t0), Decision::WriteNow);
        assert!(matches!(
            c.decide("a", t0 + Duration::from_millis(10)),
            Decision::WriteAt(_)
        ));
    }
}
