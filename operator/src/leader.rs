//! Leader election over a `coordination.k8s.io/v1` Lease, so two replicas never both write.
//! kube-runtime 5 has none, so this is the client-go protocol in small: read the Lease, take it
//! when free or expired, renew it while held, every write a compare-and-swap on
//! resourceVersion. A leader that cannot renew before its lease runs out stops leading (the
//! process exits and restarts as a candidate), so a partitioned leader never overlaps the next.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// What a candidate does with the Lease as it finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it (a new term).
    Acquire,
    /// Someone else holds it until about then.
    Wait(Timestamp),
}

/// Decides from the Lease spec at `now`.
pub fn decide(
    spec: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Step {
    let Some(spec) = spec else {
        return Step::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::Acquire;
    }
    let duration = spec
        .lease_duration_seconds
        .map(|s| SignedDuration::from_secs(i64::from(s)))
        .unwrap_or_else(|| {
            SignedDuration::try_from(default_duration).unwrap_or(SignedDuration::from_secs(15))
        });
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(at) if at + duration > now => Step::Wait(at + duration),
        _ => Step::Acquire,
    }
}

/// The Lease spec after `step` by `me` at `now`.
pub fn next_spec(
    current: Option<&LeaseSpec>,
    step: &Step,
    me: &str,
    now: Timestamp,
    duration: Duration,
) -> LeaseSpec {
    let secs = i32::try_from(duration.as_secs()).unwrap_or(15);
    let mut spec = current.cloned().unwrap_or_default();
    if *step == Step::Acquire {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions =
            Some(spec.lease_transitions.unwrap_or(0) + i32::from(current.is_some()));
    }
    spec.holder_identity = Some(me.to_owned());
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// Settings of the elector.
#[derive(Clone, Debug)]
pub struct Elector {
    /// Lease API in the operator's namespace.
    pub api: Api<Lease>,
    /// Lease name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
}

impl Elector {
    /// One attempt: returns whether we hold the Lease afterwards.
    pub async fn try_once(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let step = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
            self.duration,
        );
        if let Step::Wait(_) = step {
            return Ok(false);
        }
        let spec = next_spec(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &step,
            &self.identity,
            now,
            self.duration,
        );
        let result = match current {
            Some(mut lease) => {
                // Replace carries the resourceVersion we read: a concurrent writer makes it fail.
                lease.spec = Some(spec);
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
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Campaigns until leading, then keeps renewing; `leading` turns true when elected and
    /// false (for good) when the lease could not be renewed in time.
    pub async fn run(self, leading: watch::Sender<bool>) {
        let retry = self.duration / 5;
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            match self.try_once().await {
                Ok(true) => {
                    if last_renewal.is_none() {
                        tracing::info!(identity = %self.identity, "became leader");
                        leading.send_replace(true);
                    }
                    last_renewal = Some(tokio::time::Instant::now());
                }
                Ok(false) if last_renewal.is_some() => {
                    tracing::error!("lost the leader lease to another replica");
                    leading.send_replace(false);
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader lease request failed"),
            }
            if let Some(at) = last_renewal
                && at.elapsed() > self.duration * 2 / 3
            {
                tracing::error!("could not renew the leader lease in time; stepping down");
                leading.send_replace(false);
                return;
            }
            tokio::time::sleep(if last_renewal.is_some() {
                self.duration / 3
            } else {
                retry
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn a_held_lease_is_respected_until_it_expires_then_taken_over() {
        let held = next_spec(None, &Step::Acquire, "a", at(100), D);
        assert_eq!(decide(Some(&held), "b", at(110), D), Step::Wait(at(115)));
        assert_eq!(decide(Some(&held), "a", at(110), D), Step::Renew);
        assert_eq!(decide(Some(&held), "b", at(116), D), Step::Acquire);
        let taken = next_spec(Some(&held), &Step::Acquire, "b", at(116), D);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(decide(Some(&taken), "a", at(120), D), Step::Wait(at(131)));
    }

    #[test]
    fn renewal_keeps_the_term_and_moves_renew_time() {
        let held = next_spec(None, &Step::Acquire, "a", at(100), D);
        let renewed = next_spec(Some(&held), &Step::Renew, "a", at(105), D);
        assert_eq!(renewed.acquire_time, held.acquire_time);
        assert_eq!(renewed.lease_transitions, held.lease_transitions);
        assert_eq!(renewed.renew_time, Some(MicroTime(at(105))));
    }

    #[test]
    fn a_missing_or_released_lease_is_acquired() {
        assert_eq!(decide(None, "a", at(1), D), Step::Acquire);
        let released = LeaseSpec {
            holder_identity: Some(String::new()),
            ..LeaseSpec::default()
        };
        assert_eq!(decide(Some(&released), "a", at(1), D), Step::Acquire);
    }
}
