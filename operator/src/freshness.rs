//! How long a NodeClock stays trustworthy without a renewal, and how long a NodeClock of a
//! vanished Node is kept.
//!
//! An agent writes its NodeClock on every significant change and at least once per heartbeat
//! (the TimeService's `reporting.interval`, checked on a 1 s tick). The operator counts a
//! NodeClock as renewed when a watch event brings a new `status.lastUpdate`, and times it on its
//! own monotonic clock at the moment it saw the event: never by comparing `lastUpdate` with its
//! wall clock, since a node's wrong clock is what Stratum guards against. A clock not renewed for
//! [`freshness_bound`] (three heartbeats plus [`FRESHNESS_MARGIN`]: two lost writes are
//! tolerated, a hung, stopped or partitioned agent is not) is stale, and its node's endpoints
//! stop being ready in every tenant's EndpointSlices. After an operator restart every clock counts
//! as renewed when first listed, so a stale agent can stay ready for one more bound.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Heartbeats a NodeClock may miss before it is stale, less one.
pub const FRESHNESS_HEARTBEATS: u32 = 3;
/// Added to the heartbeats: the agent's 1 s tick, API latency and watch delivery.
pub const FRESHNESS_MARGIN: Duration = Duration::from_secs(5);
/// The shortest heartbeat the TimeService's CEL rule admits (`reporting.interval >= 5s`).
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(5);
/// The heartbeat assumed for a clock whose TimeService is unknown (the API's default).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);
/// How long a NodeClock outlives its Node before the operator deletes it: long enough for a
/// node that re-registers (or a relist that briefly misses it) to keep its clock.
pub const NODE_GONE_GRACE: Duration = Duration::from_secs(60);

/// How long a NodeClock with this heartbeat stays fresh after a renewal.
pub fn freshness_bound(heartbeat: Duration) -> Duration {
    heartbeat.max(MIN_HEARTBEAT) * FRESHNESS_HEARTBEATS + FRESHNESS_MARGIN
}

/// The longest the freshness sweep may sleep: a clock seen after a sweep expires no earlier
/// than this after it, so waking this often (or at the earliest known expiry) misses none.
pub fn max_sweep_interval() -> Duration {
    freshness_bound(MIN_HEARTBEAT)
}

/// When the operator last saw a NodeClock renewed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// `status.lastUpdate` of that event: a later event with the same value (a relist, a
    /// spec-only change) is no renewal.
    pub last_update: Option<Time>,
    /// The operator's monotonic time of the event.
    pub at: Instant,
    /// uid of the NodeClock, the precondition of its deletion.
    pub uid: Option<String>,
    /// Its expiry has been acted on (triggers sent), so a sweep does not repeat them.
    pub expired: bool,
}

impl Renewal {
    /// Whether the clock is fresh at `now` under `bound`.
    pub fn fresh(&self, now: Instant, bound: Duration) -> bool {
        now < self.at + bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_three_heartbeats_and_a_margin_and_never_below_the_minimum_heartbeat() {
        assert_eq!(
            freshness_bound(Duration::from_secs(10)),
            Duration::from_secs(35)
        );
        assert_eq!(
            freshness_bound(Duration::from_secs(60)),
            Duration::from_secs(185)
        );
        assert_eq!(freshness_bound(Duration::ZERO), max_sweep_interval());
        assert_eq!(max_sweep_interval(), Duration::from_secs(20));
    }
}
