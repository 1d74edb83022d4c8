//! Reporting to the API server: the node's `NodeClock` (server-side apply, field manager
//! `stratum-agent`, written on significant change plus a bounded heartbeat) and Events on the
//! Node for steps, sync changes, falsetickers, refusals and config rejections.
//!
//! What to write is decided by pure functions ([`node_clock_status`], [`significant`],
//! [`WritePolicy`]); [`run`] is the thin IO around them.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use stratum_api::node_clock::{
    ClockStep, HostDaemonClock, LeapStatus, NodeClock, NodeClockStatus,
    SourceState as ApiSourceState, SourceStatus, format_offset,
};
use tokio::sync::{mpsc, watch};

use crate::status::AgentStatus;

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "stratum-agent";
/// Shortest interval between two NodeClock writes, however often things change.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest an API write may take. The operator counts a NodeClock stale after three missed
/// heartbeats, so one hung request (the client's own read timeout is minutes) must not
/// silence the reports: give up, and try again at the next tick.
const API_DEADLINE: Duration = Duration::from_secs(5);

/// Something worth an Event on the Node.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentEvent {
    /// The clock was stepped.
    Stepped {
        /// Size, seconds.
        seconds: f64,
    },
    /// Synchronization was reached.
    SyncRegained,
    /// Synchronization was lost.
    SyncLost { why: String },
    /// A source was marked falseticker.
    FalsetickerRejected {
        /// The source's address.
        source: String,
    },
    /// A correction was refused.
    CorrectionRefused {
        /// Why.
        reason: String,
    },
    /// A config change was rejected; the previous config stays in force.
    ConfigRejected {
        /// Every problem.
        reason: String,
    },
    /// Another process disciplines this clock; the agent does not fight it.
    OtherDiscipliner {
        /// What was found.
        detail: String,
    },
}

impl AgentEvent {
    /// The Kubernetes Event for this.
    pub fn to_event(&self) -> Event {
        let (type_, reason, note, action) = match self {
            AgentEvent::Stepped { seconds } => (
                EventType::Normal,
                "ClockStepped",
                format!("clock stepped by {}", format_offset((seconds * 1e9) as i64)),
                "Step",
            ),
            AgentEvent::SyncRegained => (
                EventType::Normal,
                "Synchronized",
                "clock synchronized".into(),
                "Discipline",
            ),
            AgentEvent::SyncLost { why } => (
                EventType::Warning,
                "SyncLost",
                format!("clock lost synchronization: {why}"),
                "Discipline",
            ),
            AgentEvent::FalsetickerRejected { source } => (
                EventType::Warning,
                "FalsetickerRejected",
                format!("source {source} disagrees with the majority and is not used"),
                "Select",
            ),
            AgentEvent::CorrectionRefused { reason } => (
                EventType::Warning,
                "CorrectionRefused",
                reason.clone(),
                "Discipline",
            ),
            AgentEvent::ConfigRejected { reason } => (
                EventType::Warning,
                "ConfigRejected",
                reason.clone(),
                "Reload",
            ),
            AgentEvent::OtherDiscipliner { detail } => (
                EventType::Warning,
                "OtherDiscipliner",
                detail.clone(),
                "Discipline",
            ),
        };
        // The API server limits notes to 1 KiB.
        let note: String = note.chars().take(1000).collect();
        Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        }
    }
}

/// The NodeClock status for an agent status, with conditions for config validity and clock
/// control.
pub fn node_clock_status(status: &AgentStatus, now: Time) -> NodeClockStatus {
    let t = &status.tracking;
    let offset_nanos = (t.offset_seconds * 1e9).round() as i64;
    let nanos = |s: f64| (s * 1e9).round() as i64;
    let leap = match t.leap.as_str() {
        "insert" => LeapStatus::Insert,
        "delete" => LeapStatus::Delete,
        "unsynchronized" => LeapStatus::Unsynchronized,
        _ => LeapStatus::None,
    };
    let sources = status
        .sources
        .iter()
        .map(|s| SourceStatus {
            name: s.name.clone(),
            address: s.address.clone(),
            state: match s.state.as_str() {
                "selected" => ApiSourceState::Selected,
                "combined" => ApiSourceState::Combined,
                "candidate" => ApiSourceState::Candidate,
                "falseticker" => ApiSourceState::Falseticker,
                "demobilized" => ApiSourceState::Demobilized,
                _ => ApiSourceState::Unreachable,
            },
            reach: i32::from(s.reach),
            stratum: s.stratum.map_or(0, i32::from),
            offset_nanos: s.offset_seconds.map_or(0, nanos),
            delay_nanos: s.delay_seconds.map_or(0, nanos),
            jitter_nanos: s.jitter_seconds.map_or(0, nanos),
        })
        .collect();
    let transition = now.clone();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: transition.clone(),
        observed_generation: None,
    };
    let config_ok = status.identity.config_error.is_none();
    let control_ok = t.refusal.is_none();
    NodeClockStatus {
        synchronized: t.synchronized,
        offset: Some(format_offset(offset_nanos)),
        offset_nanos,
        frequency_ppm: (t.frequency_ppm * 1000.0).round() / 1000.0,
        stratum: i32::from(t.stratum),
        reference_id: Some(t.reference_id.clone()),
        system_peer: t.system_peer.clone(),
        root_delay_nanos: nanos(t.root_delay_seconds),
        root_dispersion_nanos: nanos(t.root_dispersion_seconds),
        leap,
        last_step: t.last_step_seconds.map(|s| ClockStep {
            time: t
                .last_step_unix_nanos
                .and_then(|n| k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(n)).ok())
                .map(Time),
            amount_nanos: nanos(s),
        }),
        sources,
        config_revision: Some(status.identity.config_revision.clone()),
        agent_version: Some(status.identity.version.clone()),
        last_update: Some(now.clone()),
        host_daemon: t.host_daemon.as_ref().map(|d| HostDaemonClock {
            daemon: d.daemon.clone(),
            offset: d.offset_seconds.map(|s| format_offset(nanos(s))),
            offset_nanos: d.offset_seconds.map(nanos),
            error_bound_nanos: d.error_bound_seconds.map(nanos),
            synchronized: d.synchronized,
            reference: d.reference.clone(),
            error: d.error.clone(),
        }),
        conditions: vec![
            condition(
                "ConfigValid",
                config_ok,
                if config_ok { "Applied" } else { "Rejected" },
                status
                    .identity
                    .config_error
                    .clone()
                    .unwrap_or_else(|| "config in force".into()),
            ),
            match &t.clock_yielded {
                Some(why) => condition("ClockControl", false, "YieldedToOtherDaemon", why.clone()),
                None => condition(
                    "ClockControl",
                    control_ok,
                    if control_ok {
                        "Disciplining"
                    } else {
                        "Refused"
                    },
                    t.refusal
                        .clone()
                        .unwrap_or_else(|| format!("clock backend {}", status.identity.clock)),
                ),
            },
            condition(
                "OtherTimeDaemon",
                t.other_time_daemon.is_some(),
                if t.other_time_daemon.is_some() {
                    "Detected"
                } else {
                    "NoneDetected"
                },
                t.other_time_daemon.clone().unwrap_or_else(|| {
                    "no kernel PLL/FLL, chronyd command port or foreign NTP port seen".into()
                }),
            ),
            condition(
                "TenantPorts",
                status.failed_ports.is_empty(),
                if status.failed_ports.is_empty() {
                    "Bound"
                } else {
                    "BindFailed"
                },
                failed_ports_message(&status.failed_ports),
            ),
        ],
    }
}

/// Ports listed in the TenantPorts condition; the rest are counted (status stays small).
const FAILED_PORTS_LISTED: usize = 5;

fn failed_ports_message(failed: &[crate::server::FailedPort]) -> String {
    if failed.is_empty() {
        return "every configured tenant port is bound".into();
    }
    let mut listed: Vec<String> = failed
        .iter()
        .take(FAILED_PORTS_LISTED)
        .map(|f| format!("port {} ({}): {}", f.port, f.tenant, f.error))
        .collect();
    if failed.len() > FAILED_PORTS_LISTED {
        listed.push(format!("and {} more", failed.len() - FAILED_PORTS_LISTED));
    }
    format!("not served, retrying: {}", listed.join("; "))
}

/// The part of a status whose change is worth an immediate write; measured values (offset,
/// delay, dispersion) change every poll and are refreshed by the heartbeat instead.
pub fn significant(status: &NodeClockStatus) -> impl PartialEq + use<> {
    (
        status.synchronized,
        status.stratum,
        status.reference_id.clone(),
        status.system_peer.clone(),
        status.leap,
        status.last_step.as_ref().map(|s| s.amount_nanos),
        status
            .sources
            .iter()
            .map(|s| (s.address.clone(), s.state, s.reach == 0))
            .collect::<Vec<_>>(),
        status.config_revision.clone(),
        status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.message.clone()))
            .collect::<Vec<_>>(),
    )
}

/// Keeps each condition's lastTransitionTime from `previous` while its status is unchanged, so
/// the time says when the condition last flipped, not when the agent last wrote.
pub fn carry_transition_times(status: &mut NodeClockStatus, previous: Option<&NodeClockStatus>) {
    let Some(previous) = previous else { return };
    for condition in &mut status.conditions {
        if let Some(before) = previous
            .conditions
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = before.last_transition_time.clone();
        }
    }
}

/// When to write: on a significant change (at most every [`MIN_WRITE_INTERVAL`]) or when the
/// heartbeat is due.
#[derive(Debug)]
pub struct WritePolicy {
    heartbeat: Duration,
    last_write: Option<Instant>,
}

impl WritePolicy {
    /// A policy with this heartbeat.
    pub fn new(heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            last_write: None,
        }
    }

    /// Whether to write now.
    pub fn should_write(&self, changed: bool, now: Instant) -> bool {
        match self.last_write {
            None => true,
            Some(last) => {
                let since = now.saturating_duration_since(last);
                (changed && since >= MIN_WRITE_INTERVAL) || since >= self.heartbeat
            }
        }
    }

    /// Records a successful write.
    pub fn wrote(&mut self, now: Instant) {
        self.last_write = Some(now);
    }
}

/// Writes the NodeClock of `node` from `snapshots`, and Events from `events`, until both close.
pub async fn run(
    client: kube::Client,
    node: String,
    time_service: String,
    heartbeat: watch::Receiver<Duration>,
    mut snapshots: watch::Receiver<AgentStatus>,
    mut events: mpsc::Receiver<AgentEvent>,
) {
    let api: kube::Api<NodeClock> = kube::Api::all(client.clone());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(node.clone()),
        },
    );
    let node_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.clone()),
        ..Default::default()
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut policy = WritePolicy::new(*heartbeat.borrow());
    let mut last_significant = None;
    let mut last_written: Option<NodeClockStatus> = None;
    let mut object_applied_for: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut events_open = true;
    // The loop has stopped: the last status (unsynchronized, see `agent::run`) is written at
    // once, whatever the write policy says, and then the reporter ends.
    let mut closing = false;
    loop {
        tokio::select! {
            event = events.recv(), if events_open => match event {
                Some(event) => {
                    match tokio::time::timeout(API_DEADLINE, recorder.publish(&event.to_event(), &node_ref)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "publishing event failed"),
                        Err(_) => tracing::warn!(deadline = ?API_DEADLINE, "publishing event timed out"),
                    }
                }
                None => events_open = false,
            },
            _ = tick.tick() => {}
            changed = snapshots.changed() => closing = changed.is_err(),
        }
        let status = snapshots.borrow().clone();
        if status.identity.config_revision.is_empty() {
            if closing {
                return;
            }
            continue; // no config applied yet: nothing meaningful to report
        }
        let time_service = if status.identity.time_service.is_empty() {
            time_service.clone()
        } else {
            status.identity.time_service.clone()
        };
        let now = Instant::now();
        let mut value = node_clock_status(&status, Time(k8s_openapi::jiff::Timestamp::now()));
        carry_transition_times(&mut value, last_written.as_ref());
        let sig = significant(&value);
        let changed = last_significant.as_ref() != Some(&sig);
        policy = WritePolicy {
            heartbeat: *heartbeat.borrow(),
            ..policy
        };
        if closing && !changed {
            return;
        }
        if !closing && !policy.should_write(changed, now) {
            continue;
        }
        if object_applied_for.as_deref() != Some(time_service.as_str()) {
            let object = serde_json::json!({
                "apiVersion": "stratum.io/v1alpha1", "kind": "NodeClock",
                "metadata": {"name": node}, "spec": {"timeService": time_service},
            });
            match tokio::time::timeout(
                API_DEADLINE,
                api.patch(&node, &params, &Patch::Apply(object)),
            )
            .await
            {
                Ok(Ok(_)) => object_applied_for = Some(time_service.clone()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "applying NodeClock failed");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(deadline = ?API_DEADLINE, "applying NodeClock timed out");
                    continue;
                }
            }
        }
        let body = serde_json::json!({"apiVersion": "stratum.io/v1alpha1", "kind": "NodeClock", "status": &value});
        match tokio::time::timeout(
            API_DEADLINE,
            api.patch_status(&node, &params, &Patch::Apply(body)),
        )
        .await
        {
            Ok(Ok(_)) => {
                policy.wrote(now);
                last_significant = Some(sig);
                last_written = Some(value);
            }
            // Deleted under us (an admin, or the operator collecting a vanished node's):
            // create it again before the next status write.
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
                tracing::warn!("NodeClock {node} is gone; creating it again");
                object_applied_for = None;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "writing NodeClock status failed"),
            Err(_) => {
                tracing::warn!(deadline = ?API_DEADLINE, "writing NodeClock status timed out")
            }
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::status::{Identity, SourceView, Tracking};

    fn status(synchronized: bool, offset: f64) -> AgentStatus {
        AgentStatus {
            identity: Identity {
                node: "n1".into(),
                config_revision: "r1".into(),
                clock: "simulated".into(),
                ..Default::default()
            },
            tracking: Tracking {
                synchronized,
                offset_seconds: offset,
                stratum: 2,
                reference_id: "127.0.0.1".into(),
                leap: "none".into(),
                ..Default::default()
            },
            sources: vec![SourceView {
                name: "a".into(),
                address: "127.0.0.1:123".into(),
                state: "selected".into(),
                reach: 255,
                ..Default::default()
            }],
            failed_ports: vec![],
        }
    }

    fn at() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn another_daemon_is_a_condition_and_a_yielded_clock_says_why_it_is_not_controlled() {
        let cond = |s: &NodeClockStatus, t: &str| {
            let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let quiet = node_clock_status(&status(true, 0.0), at());
        assert_eq!(cond(&quiet, "OtherTimeDaemon").1, "NoneDetected");
        assert_eq!(cond(&quiet, "OtherTimeDaemon").0, "False");
        assert_eq!(cond(&quiet, "ClockControl").1, "Disciplining");

        let mut beside = status(true, 0.0);
        beside.tracking.other_time_daemon = Some("the kernel PLL is on".into());
        beside.tracking.clock_yielded = Some("only observing".into());
        let s = node_clock_status(&beside, at());
        assert_eq!(
            cond(&s, "OtherTimeDaemon"),
            (
                "True".into(),
                "Detected".into(),
                "the kernel PLL is on".into()
            )
        );
        assert_eq!(
            cond(&s, "ClockControl"),
            (
                "False".into(),
                "YieldedToOtherDaemon".into(),
                "only observing".into()
            )
        );
    }

    #[test]
    fn tenant_ports_that_cannot_be_bound_show_as_a_false_condition_listing_them() {
        let bound = node_clock_status(&status(true, 0.0), at());
        let condition = |s: &NodeClockStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "TenantPorts")
                .cloned()
                .unwrap()
        };
        assert_eq!(condition(&bound).status, "True");
        let mut failing = status(true, 0.0);
        failing.failed_ports = (0..7)
            .map(|i| crate::server::FailedPort {
                port: 12300 + i,
                tenant: format!("ns/t{i}"),
                error: "Address in use (os error 98)".into(),
                attempts: 1,
            })
            .collect();
        let failed = condition(&node_clock_status(&failing, at()));
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("False", "BindFailed")
        );
        assert!(
            failed
                .message
                .starts_with("not served, retrying: port 12300 (ns/t0): Address in use"),
            "{}",
            failed.message
        );
        assert!(failed.message.ends_with("and 2 more"), "{}", failed.message);
        assert!(
            significant(&node_clock_status(&failing, at()))
                != significant(&node_clock_status(&status(true, 0.0), at())),
            "a port failing is worth an immediate write"
        );
    }

    #[test]
    fn condition_transition_times_move_only_when_the_status_flips() {
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(3600).unwrap());
        let first = node_clock_status(&status(true, 0.0), at());
        let mut same = node_clock_status(&status(true, 1e-6), later.clone());
        carry_transition_times(&mut same, Some(&first));
        assert!(
            same.conditions
                .iter()
                .all(|c| c.last_transition_time == at())
        );

        let mut flipped = status(true, 0.0);
        flipped.identity.config_error = Some("bad".into());
        let mut flipped = node_clock_status(&flipped, later.clone());
        carry_transition_times(&mut flipped, Some(&first));
        let time_of = |type_: &str| {
            flipped
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .unwrap()
                .last_transition_time
                .clone()
        };
        assert_eq!(time_of("ConfigValid"), later);
        assert_eq!(time_of("ClockControl"), at());
    }

    #[test]
    fn node_clock_status_carries_offset_for_display_and_in_nanoseconds() {
        let s = node_clock_status(&status(true, -12.34e-6), at());
        assert_eq!(s.offset.as_deref(), Some("-12.3µs"));
        assert_eq!(s.offset_nanos, -12_340);
        assert_eq!(s.sources[0].state, ApiSourceState::Selected);
        assert_eq!(
            s.conditions
                .iter()
                .map(|c| c.status.as_str())
                .collect::<Vec<_>>(),
            ["True", "True", "False", "True"],
            "ConfigValid, ClockControl, OtherTimeDaemon, TenantPorts"
        );
    }

    #[test]
    fn a_rejected_config_shows_as_a_false_condition_with_the_reason() {
        let mut st = status(true, 0.0);
        st.identity.config_error = Some("serving.tenants[0].port: must not be 0".into());
        let s = node_clock_status(&st, at());
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigValid")
            .expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Rejected")
        );
        assert!(c.message.contains("must not be 0"));
    }

    #[test]
    fn offset_changes_alone_are_not_significant_but_sync_changes_are() {
        let base = significant(&node_clock_status(&status(true, 1e-6), at()));
        assert!(base == significant(&node_clock_status(&status(true, 9e-6), at())));
        assert!(base != significant(&node_clock_status(&status(false, 1e-6), at())));
    }

    #[test]
    fn writes_are_bounded_by_the_minimum_interval_and_refreshed_by_the_heartbeat() {
        let start = Instant::now();
        let mut p = WritePolicy::new(Duration::from_secs(60));
        assert!(p.should_write(false, start), "first write always happens");
        p.wrote(start);
        assert!(
            !p.should_write(true, start + Duration::from_millis(500)),
            "changes within 1 s wait"
        );
        assert!(p.should_write(true, start + Duration::from_secs(1)));
        assert!(!p.should_write(false, start + Duration::from_secs(59)));
        assert!(
            p.should_write(false, start + Duration::from_secs(60)),
            "heartbeat"
        );
    }

    #[test]
    fn events_have_reasons_and_bounded_notes() {
        let e = AgentEvent::ConfigRejected {
            reason: "x".repeat(5000),
        }
        .to_event();
        assert_eq!(e.reason, "ConfigRejected");
        assert!(e.note.map_or(0, |n| n.len()) <= 1000);
        assert_eq!(
            AgentEvent::Stepped { seconds: 0.5 }
                .to_event()
                .note
                .as_deref(),
            Some("clock stepped by +500.00ms")
        );
    }
}
