//! Status as a value: TimeService and TenantTimePolicy status computed from what was built and
//! observed. A condition keeps its lastTransitionTime while its status stays the same, so an
//! unchanged world yields an identical status and no write.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use stratum_api::node_clock::format_offset;
use stratum_api::tenant_time_policy::TenantTimePolicyStatus;
use stratum_api::time_service::{NodeCounts, StratumRange, TimeServiceStatus};

use std::collections::BTreeMap;

use crate::build::nts_material::{CertificateProblem, KeysProblem};
use crate::model::ClockInfo;

/// A condition to set: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    /// Condition type.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human message.
    pub message: String,
}

impl Cond {
    /// A condition.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Conditions `wanted`, keeping each one's lastTransitionTime from `current` while its status
/// is unchanged.
pub fn conditions(
    current: &[Condition],
    wanted: Vec<Cond>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    wanted
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" }.to_owned();
            let since = current
                .iter()
                .find(|old| old.type_ == c.type_ && old.status == status)
                .map(|old| old.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_owned(),
                status,
                reason: c.reason.to_owned(),
                message: c.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// What the DaemonSet reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonSetCounts {
    /// desiredNumberScheduled.
    pub desired: i32,
    /// numberReady.
    pub ready: i32,
    /// updatedNumberScheduled.
    pub updated: i32,
}

/// How many nodes without an agent status names.
pub const UNCOVERED_NAMED: usize = 5;

/// Nodes where an agent belongs (see [`crate::placement`]) but none runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uncovered {
    /// Nodes the placement selects.
    pub placed: usize,
    /// How many of them run no agent.
    pub count: usize,
    /// The first [`UNCOVERED_NAMED`] of those, by name.
    pub first: Vec<String>,
}

impl Uncovered {
    /// The nodes of `placed` not in `running`.
    pub fn find(placed: &BTreeSet<String>, running: &BTreeSet<&str>) -> Self {
        let mut missing = placed.iter().filter(|n| !running.contains(n.as_str()));
        let first: Vec<String> = missing.by_ref().take(UNCOVERED_NAMED).cloned().collect();
        Self {
            placed: placed.len(),
            count: first.len() + missing.count(),
            first,
        }
    }

    fn message(&self) -> String {
        format!(
            "{} of {} nodes the placement selects run no agent (no ready agent pod, no fresh \
             NodeClock): {}",
            self.count,
            self.placed,
            name_a_few(&self.first, self.count)
        )
    }
}

/// "a, b, c" of `count` names, the first [`UNCOVERED_NAMED`] given, and "and 2 more".
fn name_a_few<S: AsRef<str>>(first: &[S], count: usize) -> String {
    let shown: Vec<&str> = first
        .iter()
        .take(UNCOVERED_NAMED)
        .map(AsRef::as_ref)
        .collect();
    let more = count.saturating_sub(shown.len());
    let mut text = shown.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// The TimeService's `OtherTimeDaemon` condition: True, naming a few, when any of its agents
/// sees another time daemon on its node (from their NodeClocks' condition of that name).
fn other_time_daemon_condition(clocks: &[&ClockInfo]) -> Cond {
    let nodes: Vec<&str> = clocks
        .iter()
        .filter(|c| c.other_time_daemon)
        .map(|c| c.node.as_str())
        .collect();
    if nodes.is_empty() {
        return Cond::new(
            "OtherTimeDaemon",
            false,
            "NoneDetected",
            format!(
                "none of the {} reporting agents sees another time daemon on its node",
                clocks.len()
            ),
        );
    }
    Cond::new(
        "OtherTimeDaemon",
        true,
        "Detected",
        format!(
            "{} of {} reporting agents see another time daemon on their node: {}. Expected \
             while migrating in mode Monitor: compare (stratumctl tracking, kubectl get \
             nodeclocks -o wide), stop the daemon, then switch to Discipline. Under Discipline \
             these agents only observe the clock until it stops, unless \
             spec.discipline.takeOver is set",
            nodes.len(),
            clocks.len(),
            name_a_few(&nodes, nodes.len())
        ),
    )
}

/// Why a TimeService runs no agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Its nodes overlap those of an older TimeService.
    Conflict {
        /// The older TimeService.
        with: String,
    },
    /// The spec cannot be served (e.g. an egress tier without nodes).
    Invalid(String),
}

/// TimeService status from the DaemonSet's counts, the clocks of its nodes and the nodes that
/// run no agent (`uncovered`; not counted under a Conflict, where no agent is meant to run).
pub fn time_service_status(
    current: Option<&TimeServiceStatus>,
    generation: Option<i64>,
    blocked: Option<&Blocked>,
    daemonset: Option<DaemonSetCounts>,
    clocks: &[&ClockInfo],
    uncovered: &Uncovered,
    now: &Time,
) -> TimeServiceStatus {
    let ds = daemonset.unwrap_or_default();
    let synced: Vec<&ClockInfo> = clocks.iter().copied().filter(|c| c.synchronized).collect();
    let synchronized = i32::try_from(synced.len()).unwrap_or(i32::MAX);
    let mut offsets: Vec<i64> = synced.iter().map(|c| c.offset_nanos).collect();
    offsets.sort_unstable();
    let worst = offsets.iter().copied().max_by_key(|o| o.unsigned_abs());
    let median = (!offsets.is_empty()).then(|| {
        let mid = offsets.len() / 2;
        if offsets.len() % 2 == 1 {
            offsets[mid]
        } else {
            offsets[mid - 1] / 2 + offsets[mid] / 2
        }
    });
    let stratum_range =
        synced
            .iter()
            .map(|c| c.stratum)
            .fold(None, |acc: Option<StratumRange>, s| {
                Some(match acc {
                    None => StratumRange { min: s, max: s },
                    Some(r) => StratumRange {
                        min: r.min.min(s),
                        max: r.max.max(s),
                    },
                })
            });

    let mut wanted = Vec::new();
    let mut without_agent = uncovered.count;
    match blocked {
        Some(Blocked::Conflict { with }) => {
            let msg = format!(
                "its nodes overlap those of the older TimeService {with:?}; no agents are run"
            );
            wanted.push(Cond::new("Ready", false, "Conflict", msg.clone()));
            wanted.push(Cond::new("Progressing", false, "Conflict", msg.clone()));
            wanted.push(Cond::new("Degraded", true, "Conflict", msg.clone()));
            wanted.push(Cond::new("Conflict", true, "NodesOverlap", msg));
            without_agent = 0;
        }
        Some(Blocked::Invalid(why)) => {
            wanted.push(Cond::new("Ready", false, "InvalidSpec", why.clone()));
            wanted.push(Cond::new("Progressing", false, "InvalidSpec", why.clone()));
            wanted.push(Cond::new("Degraded", true, "InvalidSpec", why.clone()));
            wanted.push(Cond::new(
                "Conflict",
                false,
                "NoOverlap",
                "no other TimeService selects these nodes",
            ));
        }
        None => {
            let counts = format!(
                "{synchronized}/{} agents synchronized, {}/{} ready",
                ds.desired, ds.ready, ds.desired
            );
            let all_synced = ds.desired > 0 && synchronized >= ds.desired;
            let uncovered_now = uncovered.count > 0;
            wanted.push(if uncovered_now {
                Cond::new("Ready", false, "NodesWithoutAgent", uncovered.message())
            } else if ds.desired == 0 {
                Cond::new("Ready", false, "NoNodes", "no node matches the placement")
            } else if all_synced {
                Cond::new("Ready", true, "AllSynchronized", counts.clone())
            } else {
                Cond::new("Ready", false, "NotAllSynchronized", counts.clone())
            });
            let rolling = ds.updated < ds.desired || ds.ready < ds.desired;
            wanted.push(if rolling {
                Cond::new("Progressing", true, "RollingOut", counts.clone())
            } else {
                Cond::new("Progressing", false, "RolledOut", counts.clone())
            });
            // Once the DaemonSet has an up-to-date pod for every node, a node still without an
            // agent is one its pod cannot run on (pending, crashing), not a rollout step.
            wanted.push(
                if uncovered_now && ds.desired > 0 && ds.updated >= ds.desired {
                    Cond::new("Degraded", true, "NodesWithoutAgent", uncovered.message())
                } else if ds.desired > 0 && !all_synced && !rolling {
                    Cond::new("Degraded", true, "Unsynchronized", counts)
                } else {
                    Cond::new("Degraded", false, "AsExpected", counts)
                },
            );
            wanted.push(Cond::new(
                "Conflict",
                false,
                "NoOverlap",
                "no other TimeService selects these nodes",
            ));
        }
    }
    wanted.push(other_time_daemon_condition(clocks));
    let existing = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
    TimeServiceStatus {
        conditions: conditions(existing, wanted, generation, now),
        observed_generation: generation,
        nodes: NodeCounts {
            desired: ds.desired,
            ready: ds.ready,
            synchronized,
            without_agent: i32::try_from(without_agent).unwrap_or(i32::MAX),
        },
        worst_offset: worst.map(format_offset),
        worst_offset_nanos: worst,
        median_offset_nanos: median,
        stratum_range,
    }
}

/// Adds the `UpstreamKeysReady` condition to a TimeService's `status` when it has upstreams
/// with a symmetric key (`outcomes`: each key Secret's at the last key material write, `None`
/// before the first): `KeysDistributed`, or the first problem's reason with every problem in
/// the message. The agents do not poll those upstreams while it is False.
pub fn add_upstream_keys_condition(
    status: &mut TimeServiceStatus,
    current: Option<&TimeServiceStatus>,
    outcomes: Option<&BTreeMap<String, Result<(), KeysProblem>>>,
    generation: Option<i64>,
    now: &Time,
) {
    let Some(outcomes) = outcomes.filter(|o| !o.is_empty()) else {
        return;
    };
    let problems: Vec<&KeysProblem> = outcomes.values().filter_map(|o| o.as_ref().err()).collect();
    let wanted = match problems.first() {
        None => Cond::new(
            "UpstreamKeysReady",
            true,
            "KeysDistributed",
            format!(
                "the keys of {} upstream key Secret(s) are with the agents",
                outcomes.len()
            ),
        ),
        Some(first) => Cond::new(
            "UpstreamKeysReady",
            false,
            first.reason(),
            format!(
                "{}; upstreams signed with these keys are not polled",
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
    };
    let existing = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
    status
        .conditions
        .extend(conditions(existing, vec![wanted], generation, now));
}

/// What a tenant reconcile observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantObservation {
    /// The serving TimeService.
    pub time_service: Option<String>,
    /// Allocated port.
    pub port: Option<u16>,
    /// ClusterIPs of the Service.
    pub service_ips: Vec<String>,
    /// Ready endpoints.
    pub ready_endpoints: i32,
    /// CIDRs in the resolved allow list.
    pub allow_list_size: i32,
    /// An object where a child would go that Stratum did not create (`Kind namespace/name`).
    pub conflict: Option<String>,
    /// For a tenant with NTS: its certificate's outcome at the TimeService's last key
    /// material write (`None` inside: not written yet).
    pub nts: Option<Option<std::result::Result<(), CertificateProblem>>>,
    /// For a tenant with symmetric keys: their outcome at the same write.
    pub symmetric_keys: Option<Option<std::result::Result<(), KeysProblem>>>,
}

/// TenantTimePolicy status; `refused` carries the Accepted=False reason and message.
pub fn tenant_status(
    current: Option<&TenantTimePolicyStatus>,
    generation: Option<i64>,
    refused: Option<(&'static str, String)>,
    seen: TenantObservation,
    now: &Time,
) -> TenantTimePolicyStatus {
    let conflict = match &seen.conflict {
        Some(object) => Cond::new(
            "Conflict",
            true,
            "ObjectExists",
            format!("{object} exists and was not created by Stratum, which leaves it alone"),
        ),
        None => Cond::new(
            "Conflict",
            false,
            "NoConflict",
            "no object of another owner stands where this tenant's children go",
        ),
    };
    let mut wanted = match &refused {
        Some((reason, message)) => vec![
            Cond::new("Accepted", false, reason, message.clone()),
            Cond::new("Ready", false, "NotAccepted", message.clone()),
        ],
        None => vec![
            Cond::new(
                "Accepted",
                true,
                "Accepted",
                format!("served on port {}", seen.port.unwrap_or_default()),
            ),
            if seen.ready_endpoints > 0 {
                Cond::new(
                    "Ready",
                    true,
                    "EndpointsReady",
                    format!("{} agents serve this tenant", seen.ready_endpoints),
                )
            } else {
                Cond::new(
                    "Ready",
                    false,
                    "NoReadyEndpoints",
                    "no agent is synchronized within this tenant's requirements",
                )
            },
        ],
    };
    wanted.push(conflict);
    if refused.is_none()
        && let Some(nts) = &seen.nts
    {
        wanted.push(match nts {
            None => Cond::new(
                "NTSReady",
                false,
                "Pending",
                "waiting for the TimeService to copy the key exchange certificate to its agents",
            ),
            Some(Ok(())) => Cond::new(
                "NTSReady",
                true,
                "CertificateDistributed",
                "the key exchange certificate is with the agents; NTS-KE on the Service's TCP \
                 port 4460",
            ),
            Some(Err(problem)) => {
                Cond::new("NTSReady", false, problem.reason(), problem.to_string())
            }
        });
    }
    if refused.is_none()
        && let Some(keys) = &seen.symmetric_keys
    {
        wanted.push(match keys {
            None => Cond::new(
                "SymmetricKeysReady",
                false,
                "Pending",
                "waiting for the TimeService to copy the keys to its agents",
            ),
            Some(Ok(())) => Cond::new(
                "SymmetricKeysReady",
                true,
                "KeysDistributed",
                "the keys are with the agents; requests signed with them are answered signed",
            ),
            Some(Err(problem)) => Cond::new(
                "SymmetricKeysReady",
                false,
                problem.reason(),
                problem.to_string(),
            ),
        });
    }
    let existing = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
    TenantTimePolicyStatus {
        conditions: conditions(existing, wanted, generation, now),
        observed_generation: generation,
        time_service: seen.time_service,
        port: seen.port.map(i32::from),
        service_ips: seen.service_ips,
        ready_endpoints: seen.ready_endpoints,
        allow_list_size: seen.allow_list_size,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn clock(synced: bool, offset: i64, stratum: i32) -> ClockInfo {
        ClockInfo {
            node: format!("n-{offset}"),
            other_time_daemon: false,
            time_service: "ts".into(),
            synchronized: synced,
            offset_nanos: offset,
            stratum,
            root_distance_nanos: 0,
            config_revision: None,
            sources: vec![],
        }
    }

    fn cond<'a>(s: &'a TimeServiceStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn fleet_status_aggregates_counts_worst_and_median_offset_and_stratum_range() {
        let clocks = [
            clock(true, -3_000, 2),
            clock(true, 1_000, 3),
            clock(true, 2_000, 4),
            clock(false, 9_999_999, 16),
        ];
        let refs: Vec<&ClockInfo> = clocks.iter().collect();
        let ds = DaemonSetCounts {
            desired: 4,
            ready: 4,
            updated: 4,
        };
        let s = time_service_status(
            None,
            Some(2),
            None,
            Some(ds),
            &refs,
            &Uncovered::default(),
            &at(10),
        );
        assert_eq!(
            s.nodes,
            NodeCounts {
                desired: 4,
                ready: 4,
                synchronized: 3,
                without_agent: 0,
            }
        );
        assert_eq!(
            s.worst_offset_nanos,
            Some(-3_000),
            "the largest magnitude, unsynchronized nodes excluded"
        );
        assert_eq!(s.worst_offset.as_deref(), Some("-3.0µs"));
        assert_eq!(s.median_offset_nanos, Some(1_000));
        assert_eq!(s.stratum_range, Some(StratumRange { min: 2, max: 4 }));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "True");
        assert_eq!(cond(&s, "Ready").observed_generation, Some(2));
    }

    #[test]
    fn an_unchanged_world_yields_an_identical_status_later() {
        let clocks = [clock(true, 1, 2)];
        let refs: Vec<&ClockInfo> = clocks.iter().collect();
        let ds = Some(DaemonSetCounts {
            desired: 1,
            ready: 1,
            updated: 1,
        });
        let none = Uncovered::default();
        let first = time_service_status(None, Some(1), None, ds, &refs, &none, &at(10));
        let second = time_service_status(Some(&first), Some(1), None, ds, &refs, &none, &at(99));
        assert_eq!(first, second);
        assert_eq!(cond(&first, "Ready").status, "True");
        // A real transition moves lastTransitionTime.
        let third = time_service_status(Some(&second), Some(1), None, ds, &[], &none, &at(200));
        assert_eq!(cond(&third, "Ready").last_transition_time, at(200));
        assert_eq!(cond(&third, "Conflict").last_transition_time, at(10));
    }

    #[test]
    fn a_conflicting_time_service_says_which_older_one_it_yields_to() {
        let blocked = Blocked::Conflict {
            with: "first".into(),
        };
        let placed: BTreeSet<String> = ["n1".to_string()].into();
        let uncovered = Uncovered::find(&placed, &BTreeSet::new());
        let s = time_service_status(None, Some(1), Some(&blocked), None, &[], &uncovered, &at(1));
        assert_eq!(cond(&s, "Conflict").status, "True");
        assert!(cond(&s, "Conflict").message.contains("\"first\""));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            s.nodes.without_agent, 0,
            "the older TimeService's agents run there"
        );
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn nodes_without_an_agent_are_counted_and_the_first_five_named_in_order() {
        let placed = nodes(&["n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"]);
        let running: BTreeSet<&str> = ["n2", "n9"].into();
        let uncovered = Uncovered::find(&placed, &running);
        assert_eq!(uncovered.count, 7);
        assert_eq!(uncovered.first, ["n1", "n3", "n4", "n5", "n6"]);
        assert_eq!(
            Uncovered::find(&placed, &placed.iter().map(String::as_str).collect()),
            Uncovered {
                placed: 9,
                count: 0,
                first: Vec::new()
            }
        );
    }

    #[test]
    fn a_node_whose_agent_cannot_run_keeps_the_time_service_from_ready_and_is_named() {
        // Every up-to-date pod scheduled, one of them pending on n3: the rollout is over, the
        // node still has no agent.
        let clocks = [clock(true, 1, 2), clock(true, 1, 2)];
        let refs: Vec<&ClockInfo> = clocks.iter().collect();
        let ds = Some(DaemonSetCounts {
            desired: 3,
            ready: 2,
            updated: 3,
        });
        let uncovered = Uncovered::find(&nodes(&["n1", "n2", "n3"]), &["n1", "n2"].into());
        let s = time_service_status(None, Some(1), None, ds, &refs, &uncovered, &at(1));
        assert_eq!(s.nodes.without_agent, 1);
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NodesWithoutAgent")
        );
        assert!(
            ready
                .message
                .starts_with("1 of 3 nodes the placement selects run no agent")
                && ready.message.ends_with(": n3"),
            "{}",
            ready.message
        );
        let degraded = cond(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "NodesWithoutAgent")
        );

        // Mid-rollout (pods not all updated) the same gap is not yet Degraded.
        let rolling = Some(DaemonSetCounts {
            desired: 3,
            ready: 2,
            updated: 2,
        });
        let s = time_service_status(None, Some(1), None, rolling, &refs, &uncovered, &at(1));
        assert_eq!(cond(&s, "Ready").reason, "NodesWithoutAgent");
        assert_eq!(cond(&s, "Degraded").status, "False");

        // Many: five named, the rest counted.
        let placed = nodes(&["a", "b", "c", "d", "e", "f", "g"]);
        let many = Uncovered::find(&placed, &BTreeSet::new());
        let s = time_service_status(None, Some(1), None, ds, &[], &many, &at(1));
        assert!(
            cond(&s, "Ready")
                .message
                .ends_with(": a, b, c, d, e and 2 more"),
            "{}",
            cond(&s, "Ready").message
        );
    }

    #[test]
    fn agents_that_see_another_time_daemon_are_counted_and_named_in_a_condition() {
        let ds = Some(DaemonSetCounts {
            desired: 7,
            ready: 7,
            updated: 7,
        });
        let clocks: Vec<ClockInfo> = (1..=7)
            .map(|i| ClockInfo {
                other_time_daemon: i != 4,
                ..clock(true, i, 2)
            })
            .collect();
        let refs: Vec<&ClockInfo> = clocks.iter().collect();
        let none = Uncovered::default();
        let s = time_service_status(None, Some(1), None, ds, &refs, &none, &at(1));
        let c = cond(&s, "OtherTimeDaemon");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Detected"));
        assert!(
            c.message.starts_with(
                "6 of 7 reporting agents see another time daemon on their node: \
                 n-1, n-2, n-3, n-5, n-6 and 1 more. Expected while migrating in mode Monitor"
            ),
            "{}",
            c.message
        );
        // Another daemon is a migration step, not a failure: Ready and Degraded ignore it.
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Degraded").status, "False");

        // Once every daemon is stopped, the condition turns False.
        let quiet: Vec<ClockInfo> = (1..=7).map(|i| clock(true, i, 2)).collect();
        let refs: Vec<&ClockInfo> = quiet.iter().collect();
        let later = time_service_status(Some(&s), Some(1), None, ds, &refs, &none, &at(2));
        let c = cond(&later, "OtherTimeDaemon");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoneDetected")
        );
        assert_eq!(c.last_transition_time, at(2));
    }

    #[test]
    fn tenant_ready_needs_acceptance_and_a_ready_endpoint() {
        let seen = TenantObservation {
            port: Some(12300),
            ready_endpoints: 2,
            ..Default::default()
        };
        let ok = tenant_status(None, Some(1), None, seen.clone(), &at(1));
        assert_eq!(ok.conditions[0].status, "True");
        assert_eq!(ok.conditions[1].status, "True");
        assert_eq!(ok.port, Some(12300));
        let refused = tenant_status(
            Some(&ok),
            Some(2),
            Some(("InvalidTimezone", "no".into())),
            seen,
            &at(5),
        );
        assert_eq!(refused.conditions[0].reason, "InvalidTimezone");
        assert_eq!(refused.conditions[1].status, "False");
        assert_eq!(refused.conditions[2].type_, "Conflict");
        assert_eq!(refused.conditions[2].status, "False");
    }

    #[test]
    fn a_clash_with_a_users_object_is_a_conflict_condition_naming_it() {
        let seen = TenantObservation {
            port: Some(12300),
            conflict: Some("Service team-a/ntp".into()),
            ..Default::default()
        };
        let s = tenant_status(
            None,
            Some(1),
            Some(("ServiceConflict", "taken".into())),
            seen,
            &at(1),
        );
        let conflict = s.conditions.iter().find(|c| c.type_ == "Conflict").unwrap();
        assert_eq!(conflict.status, "True");
        assert_eq!(conflict.reason, "ObjectExists");
        assert!(
            conflict.message.contains("Service team-a/ntp"),
            "{}",
            conflict.message
        );
    }

    #[test]
    fn an_nts_tenant_says_whether_its_certificate_reached_the_agents() {
        let nts = |outcome| TenantObservation {
            port: Some(12300),
            nts: Some(outcome),
            ..Default::default()
        };
        let find = |s: &TenantTimePolicyStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "NTSReady")
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        let pending = tenant_status(None, Some(1), None, nts(None), &at(1));
        assert_eq!(find(&pending).unwrap().1, "Pending");
        let ready = tenant_status(None, Some(1), None, nts(Some(Ok(()))), &at(1));
        assert_eq!(find(&ready).unwrap().0, "True");
        let missing = CertificateProblem::Missing {
            secret: "ntp-tls".into(),
        };
        let (status, reason, message) = find(&tenant_status(
            None,
            Some(1),
            None,
            nts(Some(Err(missing))),
            &at(1),
        ))
        .unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "CertificateSecretMissing")
        );
        assert!(message.contains("ntp-tls"), "{message}");
        // No NTS, no condition; refused, no condition either (Accepted says why).
        let plain = TenantObservation::default();
        assert_eq!(
            find(&tenant_status(None, Some(1), None, plain, &at(1))),
            None
        );
        let refused = tenant_status(
            None,
            Some(1),
            Some(("InvalidSpec", "x".into())),
            nts(None),
            &at(1),
        );
        assert_eq!(find(&refused), None);
    }

    #[test]
    fn a_symmetric_key_tenant_says_whether_its_keys_reached_the_agents() {
        let keys = |outcome| TenantObservation {
            port: Some(12300),
            symmetric_keys: Some(outcome),
            ..Default::default()
        };
        let find = |s: &TenantTimePolicyStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "SymmetricKeysReady")
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        let pending = tenant_status(None, Some(1), None, keys(None), &at(1));
        assert_eq!(find(&pending).unwrap().1, "Pending");
        let ready = tenant_status(None, Some(1), None, keys(Some(Ok(()))), &at(1));
        assert_eq!(find(&ready).unwrap().0, "True");
        let invalid = KeysProblem::Invalid {
            secret: "device-keys".into(),
            error: stratum_ntp::symmetric::KeyFileError::Type { line: 3 },
        };
        let (status, reason, message) = find(&tenant_status(
            None,
            Some(1),
            None,
            keys(Some(Err(invalid))),
            &at(1),
        ))
        .unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "KeysSecretInvalid")
        );
        assert!(
            message.contains("device-keys") && message.contains("line 3"),
            "{message}"
        );
        let plain = TenantObservation::default();
        assert_eq!(
            find(&tenant_status(None, Some(1), None, plain, &at(1))),
            None
        );
    }

    #[test]
    fn upstream_keys_get_a_condition_only_when_an_upstream_has_one() {
        let mut status = TimeServiceStatus::default();
        add_upstream_keys_condition(&mut status, None, None, Some(1), &at(1));
        add_upstream_keys_condition(&mut status, None, Some(&BTreeMap::new()), Some(1), &at(1));
        assert!(status.conditions.is_empty());
        let ok = BTreeMap::from([("upstream-keys".to_owned(), Ok(()))]);
        add_upstream_keys_condition(&mut status, None, Some(&ok), Some(1), &at(1));
        assert_eq!(status.conditions[0].status, "True");
        let bad = BTreeMap::from([
            ("upstream-keys".to_owned(), Ok(())),
            (
                "gone".to_owned(),
                Err(KeysProblem::Missing {
                    secret: "gone".into(),
                }),
            ),
        ]);
        let mut next = TimeServiceStatus::default();
        add_upstream_keys_condition(&mut next, Some(&status), Some(&bad), Some(2), &at(5));
        let c = &next.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("UpstreamKeysReady", "False", "KeysSecretMissing")
        );
        assert!(
            c.message.contains("Secret gone") && c.message.contains("not polled"),
            "{}",
            c.message
        );
        assert_eq!(c.last_transition_time, at(5));
    }
}
