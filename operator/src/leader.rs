//! Leader election over a `coordination.k8s.io/v1` Lease, so two replicas never both write.
//!
//! kube-runtime has none, so this is client-go's protocol in small, split as the rest of the
//! operator is: [`Campaign`] is a sans-IO state machine that takes what was read and the
//! current instant and returns what to write; [`Elector`] is the thin loop around it.
//!
//! Two rules keep it safe when node clocks disagree, which is this product's own failure case:
//! - **Expiry is observed locally.** Another replica's `renewTime` is written with *its* wall
//!   clock, so it is never compared with ours. A candidate remembers when, on its own monotonic
//!   clock, it last saw the Lease record change, and takes the Lease only after it has stayed
//!   unchanged for the whole lease duration. `renewTime` is still written, for people and for
//!   other tools, but no decision reads it.
//! - **A leader steps down before anyone may take over.** Each renewal has a deadline
//!   (`renew_deadline`, shorter than the lease duration), measured from the *start* of the last
//!   renewal that succeeded. A write can only land after its request started, so any candidate
//!   that saw that write waits a full lease duration from a later instant than the one the
//!   leader counts from: the leader has stopped before the Lease can be taken.
//!
//! On shutdown the leader releases the Lease (empty holder), so its successor need not wait
//! for the lease to run out.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// Timing of a campaign, as client-go names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease record must stay unchanged before a candidate may take it.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
}

impl Timing {
    /// client-go's proportions (15 s / 10 s / 2 s) scaled to `lease_duration`; the deadline is
    /// always shorter than the lease, which is what makes stepping down safe.
    pub fn for_lease(lease_duration: Duration) -> Timing {
        let lease_duration = lease_duration.max(Duration::from_secs(3));
        Timing {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration * 2 / 15).max(Duration::from_millis(500)),
        }
    }
}

/// The part of a Lease record whose change proves its holder is alive. Every write changes
/// `renew_time` (it is written with the writer's clock, which moves forward for the writer),
/// so comparing the record, not its time value against ours, detects renewals.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<Timestamp>,
    acquire_time: Option<Timestamp>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions,
        }
    }
}

/// What to do after a read.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Someone else holds the Lease (or may still): do nothing now.
    Wait,
    /// Write this spec (a compare-and-swap on the resourceVersion read); `acquire` says whether
    /// it starts a new term.
    Write { spec: LeaseSpec, acquire: bool },
}

/// One replica's campaign: what it has observed of the Lease and whether it leads.
#[derive(Clone, Debug)]
pub struct Campaign {
    identity: String,
    timing: Timing,
    /// The record last read and when (monotonic) it was first seen in that form.
    observed: Option<(Record, Instant)>,
    /// Start of the last attempt whose write succeeded while leading.
    renewed_at: Option<Instant>,
}

impl Campaign {
    /// A candidate that has seen nothing yet.
    pub fn new(identity: impl Into<String>, timing: Timing) -> Campaign {
        Campaign {
            identity: identity.into(),
            timing,
            observed: None,
            renewed_at: None,
        }
    }

    /// Whether this replica may act as leader at `now`: it won the Lease and its last
    /// successful renewal started less than `renew_deadline` ago.
    pub fn is_leading(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.timing.renew_deadline)
    }

    /// When leadership lapses unless a renewal succeeds first.
    pub fn deadline(&self) -> Option<Instant> {
        self.renewed_at.map(|at| at + self.timing.renew_deadline)
    }

    /// Decides from the Lease as read (`None`: it does not exist) at monotonic `now`; `wall`
    /// is only written into the record.
    pub fn on_read(&mut self, spec: Option<&LeaseSpec>, now: Instant, wall: Timestamp) -> Decision {
        let Some(spec) = spec else {
            return self.write(None, true, wall);
        };
        let record = Record::of(spec);
        if record.holder == self.identity {
            // Ours (a renewal, or a term we won but did not hear back about).
            self.observed = Some((record, now));
            return self.write(Some(spec), false, wall);
        }
        if record.holder.is_empty() {
            // Released by its last holder.
            return self.write(Some(spec), true, wall);
        }
        // Someone else's: only a record unchanged for a whole lease duration has expired.
        let first_seen = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.observed = Some((record, now));
                now
            }
        };
        // A leader that finds the Lease taken has lost it.
        self.renewed_at = None;
        // The holder promised to renew within the duration it wrote; ours if it wrote none.
        let lease_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(self.timing.lease_duration, Duration::from_secs);
        if now.saturating_duration_since(first_seen) >= lease_duration {
            self.write(Some(spec), true, wall)
        } else {
            Decision::Wait
        }
    }

    /// The write of the attempt that started at `started` succeeded.
    pub fn on_written(&mut self, written: &LeaseSpec, started: Instant) {
        self.observed = Some((Record::of(written), started));
        self.renewed_at = Some(started);
    }

    /// The spec that gives the Lease up (`None` when we do not hold it).
    pub fn release(&mut self, spec: Option<&LeaseSpec>, wall: Timestamp) -> Option<LeaseSpec> {
        let spec = spec?;
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return None;
        }
        self.renewed_at = None;
        let mut released = spec.clone();
        released.holder_identity = Some(String::new());
        released.lease_duration_seconds = Some(1);
        released.renew_time = Some(MicroTime(wall));
        Some(released)
    }

    fn write(&self, current: Option<&LeaseSpec>, acquire: bool, wall: Timestamp) -> Decision {
        let secs = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let mut spec = current.cloned().unwrap_or_default();
        if acquire {
            spec.acquire_time = Some(MicroTime(wall));
            spec.lease_transitions =
                Some(spec.lease_transitions.unwrap_or(0) + i32::from(current.is_some()));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(MicroTime(wall));
        Decision::Write { spec, acquire }
    }
}

/// The IO around a [`Campaign`]: one Lease in the operator's namespace.
#[derive(Clone, Debug)]
pub struct Elector {
    /// Lease API in the operator's namespace.
    pub api: Api<Lease>,
    /// Lease name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Lease timing.
    pub timing: Timing,
}

/// Why an attempt did not leave us holding the Lease.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("lease request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("lease request took longer than {0:?}")]
    Timeout(Duration),
}

impl Elector {
    /// Campaigns, then renews while leading. `leading` turns true when elected and false for
    /// good when leadership lapses; the loop ends then, or when `stop` turns true, after
    /// releasing the Lease if it was held.
    pub async fn run(self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut campaign = Campaign::new(self.identity.clone(), self.timing);
        loop {
            let started = Instant::now();
            // A renewal may not outlive the deadline; a candidate's attempt gets one retry period.
            let budget = campaign.deadline().map_or(self.timing.renew_deadline, |d| {
                d.saturating_duration_since(started)
            });
            let attempt = tokio::select! {
                result = tokio::time::timeout(budget, self.attempt(&mut campaign, started)) => {
                    result.unwrap_or(Err(AttemptError::Timeout(budget)))
                }
                _ = stop.wait_for(|s| *s) => break,
            };
            match attempt {
                Ok(true) if !*leading.borrow() => {
                    tracing::info!(identity = %self.identity, "became leader");
                    leading.send_replace(true);
                }
                Ok(_) => {}
                // Leadership lapses at the deadline unless a later attempt succeeds.
                Err(e) => tracing::warn!(error = %e, "leader lease attempt failed"),
            }
            if *leading.borrow() && !campaign.is_leading(Instant::now()) {
                tracing::error!("leader lease not renewed within its deadline; stepping down");
                leading.send_replace(false);
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(self.timing.retry_period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            match tokio::time::timeout(self.timing.retry_period, self.release(&mut campaign)).await
            {
                Ok(Ok(())) => tracing::info!("released the leader lease"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease"),
                Err(_) => tracing::warn!("releasing the leader lease timed out"),
            }
            leading.send_replace(false);
        }
    }

    /// One read and, when the campaign says so, one compare-and-swap write.
    async fn attempt(
        &self,
        campaign: &mut Campaign,
        started: Instant,
    ) -> Result<bool, AttemptError> {
        let current = self.api.get_opt(&self.name).await?;
        let decision = campaign.on_read(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            started,
            Timestamp::now(),
        );
        let Decision::Write { spec, acquire } = decision else {
            return Ok(false);
        };
        if acquire {
            tracing::info!(identity = %self.identity, "taking the leader lease");
        }
        let result = match current {
            Some(mut lease) => {
                // Replace carries the resourceVersion read: a concurrent writer makes it fail.
                lease.spec = Some(spec.clone());
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec.clone()),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => {
                campaign.on_written(&spec, started);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn release(&self, campaign: &mut Campaign) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        if let Some(spec) = campaign.release(lease.spec.as_ref(), Timestamp::now()) {
            lease.spec = Some(spec);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn timing() -> Timing {
        Timing::for_lease(LEASE)
    }

    fn wall(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn written(d: Decision) -> LeaseSpec {
        match d {
            Decision::Write { spec, .. } => spec,
            Decision::Wait => panic!("expected a write"),
        }
    }

    #[test]
    fn client_go_proportions_keep_the_deadline_inside_the_lease() {
        let t = Timing::for_lease(LEASE);
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert_eq!(t.retry_period, Duration::from_secs(2));
        let tiny = Timing::for_lease(Duration::from_secs(1));
        assert!(tiny.renew_deadline < tiny.lease_duration);
    }

    #[test]
    fn a_held_lease_is_taken_only_after_it_stays_unchanged_for_the_lease_duration() {
        let t0 = Instant::now();
        let mut a = Campaign::new("a", timing());
        let held = written(a.on_read(None, t0, wall(0)));
        a.on_written(&held, t0);

        let mut b = Campaign::new("b", timing());
        assert_eq!(b.on_read(Some(&held), t0, wall(0)), Decision::Wait);
        assert_eq!(
            b.on_read(Some(&held), t0 + LEASE - Duration::from_millis(1), wall(0)),
            Decision::Wait
        );
        // A renewal restarts b's count.
        let renewed = written(a.on_read(Some(&held), t0 + Duration::from_secs(5), wall(5)));
        assert_eq!(
            b.on_read(Some(&renewed), t0 + LEASE, wall(15)),
            Decision::Wait
        );
        match b.on_read(Some(&renewed), t0 + LEASE * 2, wall(30)) {
            Decision::Write { spec, acquire } => {
                assert!(acquire);
                assert_eq!(spec.holder_identity.as_deref(), Some("b"));
                assert_eq!(spec.lease_transitions, Some(1));
            }
            Decision::Wait => panic!("b should take an expired lease"),
        }
    }

    #[test]
    fn renew_time_far_in_the_past_or_future_decides_nothing() {
        // The holder's clock is 10 min behind or ahead: b still waits a full lease duration
        // from when it first saw the record, no more and no less.
        for skew in [-600, 600] {
            let t0 = Instant::now();
            let mut a = Campaign::new("a", timing());
            let held = written(a.on_read(None, t0, wall(skew)));
            let mut b = Campaign::new("b", timing());
            assert_eq!(b.on_read(Some(&held), t0, wall(0)), Decision::Wait);
            assert_eq!(
                b.on_read(Some(&held), t0 + LEASE / 2, wall(7)),
                Decision::Wait
            );
            assert!(matches!(
                b.on_read(Some(&held), t0 + LEASE, wall(15)),
                Decision::Write { acquire: true, .. }
            ));
        }
    }

    #[test]
    fn renewal_keeps_the_term_and_moves_renew_time() {
        let t0 = Instant::now();
        let mut a = Campaign::new("a", timing());
        let held = written(a.on_read(None, t0, wall(0)));
        match a.on_read(Some(&held), t0 + Duration::from_secs(2), wall(2)) {
            Decision::Write { spec, acquire } => {
                assert!(!acquire);
                assert_eq!(spec.acquire_time, held.acquire_time);
                assert_eq!(spec.lease_transitions, held.lease_transitions);
                assert_eq!(spec.renew_time, Some(MicroTime(wall(2))));
            }
            Decision::Wait => panic!("the holder renews"),
        }
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut a = Campaign::new("a", timing());
        let held = written(a.on_read(None, t0, wall(0)));
        a.on_written(&held, t0);
        assert!(a.is_leading(t0));
        let released = a.release(Some(&held), wall(1)).unwrap();
        assert!(!a.is_leading(t0));
        assert_eq!(released.holder_identity.as_deref(), Some(""));
        let mut b = Campaign::new("b", timing());
        assert!(matches!(
            b.on_read(Some(&released), t0 + Duration::from_secs(1), wall(1)),
            Decision::Write { acquire: true, .. }
        ));
        // Nobody else's Lease is released.
        assert_eq!(b.release(Some(&held), wall(2)), None);
    }

    #[test]
    fn a_leader_whose_renewals_fail_steps_down_at_the_deadline() {
        let t0 = Instant::now();
        let mut a = Campaign::new("a", timing());
        let held = written(a.on_read(None, t0, wall(0)));
        a.on_written(&held, t0);
        assert!(a.is_leading(t0 + timing().renew_deadline - Duration::from_millis(1)));
        assert!(!a.is_leading(t0 + timing().renew_deadline));
    }

    #[test]
    fn a_leader_that_finds_another_holder_stops_leading() {
        let t0 = Instant::now();
        let mut a = Campaign::new("a", timing());
        let held = written(a.on_read(None, t0, wall(0)));
        a.on_written(&held, t0);
        let mut other = held.clone();
        other.holder_identity = Some("b".into());
        assert_eq!(
            a.on_read(Some(&other), t0 + Duration::from_secs(1), wall(1)),
            Decision::Wait
        );
        assert!(!a.is_leading(t0 + Duration::from_secs(1)));
    }

    /// The shared Lease of the simulation: a record with a resourceVersion, written by
    /// compare-and-swap as the API server does.
    struct Store {
        spec: Option<LeaseSpec>,
        version: u64,
    }

    /// A replica in the simulation: its campaign, its wall clock's offset from true time, and
    /// whether its requests hang (a partition between it and the API server).
    struct Replica {
        campaign: Campaign,
        skew_secs: i64,
        hung: bool,
        next_attempt: Duration,
    }

    /// Runs two replicas with skewed wall clocks over simulated time, in steps of 100 ms, with
    /// one replica's requests hanging from `hang_from` on; returns the instants (ms) at which
    /// each replica led, after checking that both never lead at once.
    fn simulate(skews: [i64; 2], hang_from: Option<Duration>) -> [Vec<u64>; 2] {
        let t = timing();
        let t0 = Instant::now();
        let mut store = Store {
            spec: None,
            version: 0,
        };
        let mut replicas = [
            Replica {
                campaign: Campaign::new("a", t),
                skew_secs: skews[0],
                hung: false,
                next_attempt: Duration::ZERO,
            },
            Replica {
                campaign: Campaign::new("b", t),
                skew_secs: skews[1],
                hung: false,
                next_attempt: Duration::from_millis(300),
            },
        ];
        let mut led: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        let step = Duration::from_millis(100);
        let mut elapsed = Duration::ZERO;
        while elapsed < Duration::from_secs(120) {
            let now = t0 + elapsed;
            for r in &mut replicas {
                if let Some(h) = hang_from {
                    // Whoever leads when the partition starts is the one cut off.
                    if elapsed >= h && !r.hung && r.campaign.is_leading(now) {
                        r.hung = true;
                    }
                }
                if r.hung || elapsed < r.next_attempt {
                    continue;
                }
                r.next_attempt = elapsed + t.retry_period;
                let wall_now = wall(i64::try_from(elapsed.as_secs()).unwrap() + r.skew_secs);
                let read_version = store.version;
                if let Decision::Write { spec, .. } =
                    r.campaign.on_read(store.spec.as_ref(), now, wall_now)
                    && store.version == read_version
                {
                    store.spec = Some(spec.clone());
                    store.version += 1;
                    r.campaign.on_written(&spec, now);
                }
            }
            let leading: Vec<bool> = replicas
                .iter()
                .map(|r| r.campaign.is_leading(now))
                .collect();
            assert!(
                !(leading[0] && leading[1]),
                "both replicas lead at {elapsed:?} (skews {skews:?}, hang from {hang_from:?})"
            );
            for (i, l) in leading.iter().enumerate() {
                if *l {
                    led[i].push(u64::try_from(elapsed.as_millis()).unwrap());
                }
            }
            elapsed += step;
        }
        led
    }

    #[test]
    fn replicas_with_clocks_ten_minutes_apart_never_both_lead() {
        for skews in [[0, 600], [0, -600], [600, -600], [-600, 0]] {
            let led = simulate(skews, None);
            // Exactly one leads, from its first attempt to the end, and it is never usurped.
            assert!(!led[0].is_empty(), "a leads (skews {skews:?})");
            assert!(
                led[1].is_empty(),
                "b never takes a renewed lease (skews {skews:?})"
            );
        }
    }

    #[test]
    fn a_hung_leader_steps_down_before_the_other_replica_takes_over() {
        for skews in [[0, 600], [0, -600], [600, -600]] {
            let hang = Duration::from_secs(30);
            let led = simulate(skews, Some(hang));
            let a_last = *led[0].last().unwrap();
            let b_first = *led[1].first().unwrap();
            let hang_ms = u64::try_from(hang.as_millis()).unwrap();
            // a stops within its renew deadline of the hang, b leads after a lease duration
            // of an unchanged record, and never before a stopped.
            assert!(a_last < hang_ms + 10_000, "a stopped at {a_last} ms");
            assert!(
                b_first > a_last,
                "b led at {b_first} ms, a until {a_last} ms"
            );
            assert!(
                b_first <= hang_ms + 15_000 + 2_000,
                "b took over at {b_first} ms"
            );
        }
    }
}
