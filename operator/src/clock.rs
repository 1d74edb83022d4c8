//! The operator's monotonic clock, injected so that everything measured on it (NodeClock
//! freshness, the grace of a NodeClock whose Node is gone) is deterministic in tests: a test
//! steps a [`MonotonicClock::manual`] clock instead of sleeping. Wall clocks are never used
//! for these decisions: a node's clock being wrong is exactly what this product guards
//! against, so the operator compares only instants it observed itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A source of monotonic instants: the system's, or a manual one that tests advance.
#[derive(Clone, Debug, Default)]
pub struct MonotonicClock {
    manual: Option<Arc<Mutex<Instant>>>,
}

impl MonotonicClock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock standing still at "some instant" until [`MonotonicClock::advance`] moves it;
    /// clones share it.
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new(Instant::now()))),
        }
    }

    /// Now.
    pub fn now(&self) -> Instant {
        match &self.manual {
            Some(at) => *at.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            None => Instant::now(),
        }
    }

    /// Moves a manual clock forward (a system clock ignores it).
    pub fn advance(&self, by: Duration) {
        if let Some(at) = &self.manual {
            let mut at = at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *at += by;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let clock = MonotonicClock::manual();
        let copy = clock.clone();
        let start = clock.now();
        assert_eq!(copy.now(), start);
        copy.advance(Duration::from_secs(7));
        assert_eq!(clock.now() - start, Duration::from_secs(7));
    }
}
