//! `NodeClock`: one node's clock as its agent sees it. Cluster-scoped, named after the node,
//! written only by that node's agent (the chart's admission policy enforces it) and read by
//! the operator to aggregate TimeService status and endpoint readiness.

// Several `printcolumn(...)` entries repeat `type_ = "..."`, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// Which TimeService this node's agent belongs to. The name of the object is the node name.
#[derive(CustomResource, JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "stratum.io",
    version = "v1alpha1",
    kind = "NodeClock",
    plural = "nodeclocks",
    shortname = "nc",
    category = "stratum",
    status = "NodeClockStatus",
    doc = "The clock of one node, as reported by the Stratum agent running there.",
    printcolumn(name = "Synced", type_ = "boolean", json_path = ".status.synchronized"),
    printcolumn(name = "Offset", type_ = "string", json_path = ".status.offset"),
    printcolumn(name = "Stratum", type_ = "integer", json_path = ".status.stratum"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.systemPeer"),
    printcolumn(
        name = "TimeService",
        type_ = "string",
        json_path = ".spec.timeService"
    ),
    // While migrating: the host daemon's own view beside the agent's (`-o wide`).
    printcolumn(
        name = "Daemon",
        type_ = "string",
        json_path = ".status.hostDaemon.daemon",
        priority = 1
    ),
    printcolumn(
        name = "Daemon Offset",
        type_ = "string",
        json_path = ".status.hostDaemon.offset",
        priority = 1
    ),
    // How long ago the agent last wrote: a stale agent's NodeClock looks healthy otherwise.
    printcolumn(name = "Updated", type_ = "date", json_path = ".status.lastUpdate"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeClockSpec {
    /// The TimeService whose agent runs on this node.
    pub time_service: String,
}

/// The node clock's state as of `lastUpdate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeClockStatus {
    /// The clock follows enough agreeing sources and is within its distance limit.
    #[serde(default)]
    pub synchronized: bool,
    /// Estimated offset of the node clock from true time, for display ("-12.3µs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
    /// Estimated offset of the node clock from true time, in nanoseconds (positive: ahead).
    #[serde(default)]
    pub offset_nanos: i64,
    /// Frequency correction applied to the clock, in parts per million.
    #[serde(default)]
    pub frequency_ppm: f64,
    /// NTP stratum this node serves (16 = unsynchronized).
    #[serde(default = "unsynchronized_stratum")]
    pub stratum: i32,
    /// Reference ID: the system peer's IPv4 address, a hash of its IPv6 address, or a code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_id: Option<String>,
    /// Name of the source the clock follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_peer: Option<String>,
    /// Round-trip delay to the primary reference, in nanoseconds.
    #[serde(default)]
    pub root_delay_nanos: i64,
    /// Dispersion relative to the primary reference, in nanoseconds.
    #[serde(default)]
    pub root_dispersion_nanos: i64,
    /// Leap second state.
    #[serde(default)]
    pub leap: LeapStatus,
    /// The most recent step of the clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step: Option<ClockStep>,
    /// Every source the agent uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceStatus>,
    /// Revision of the agent config the agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<String>,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// When the agent last wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<Time>,
    /// The node clock as another time daemon on the node sees it, when one runs: its own
    /// estimate beside the agent's (`offsetNanos`), to compare before handing the clock over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_daemon: Option<HostDaemonClock>,
    /// Conditions: ConfigValid, ClockControl, OtherTimeDaemon (another time daemon seen on the
    /// node) and TenantPorts (every tenant port bound).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The node clock as another time daemon sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostDaemonClock {
    /// `chronyd` (asked on its command port, as `chronyc tracking` asks) or `kernel` (what
    /// ntpd or systemd-timesyncd left in the kernel's clock discipline).
    pub daemon: String,
    /// The daemon's estimate of the node clock's offset, for display ("-12.3µs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
    /// The same, in nanoseconds (positive: ahead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_nanos: Option<i64>,
    /// The daemon's bound on its clock's error, in nanoseconds (chronyd: its root distance;
    /// kernel: the estimated error the daemon set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_bound_nanos: Option<i64>,
    /// The daemon claims to be synchronized.
    #[serde(default)]
    pub synchronized: bool,
    /// The daemon's reference: chronyd's selected source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Why the daemon's view could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn unsynchronized_stratum() -> i32 {
    16
}

/// Leap indicator of the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LeapStatus {
    /// No leap second pending.
    #[default]
    None,
    /// A second will be inserted at the end of the UTC day.
    Insert,
    /// A second will be deleted at the end of the UTC day.
    Delete,
    /// The clock is not synchronized.
    Unsynchronized,
}

/// One step of the clock.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClockStep {
    /// When the step happened.
    pub time: Option<Time>,
    /// Size of the step, in nanoseconds (positive: forward).
    pub amount_nanos: i64,
}

/// One source as the agent sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The configured host the source came from.
    pub name: String,
    /// Address and port polled.
    pub address: String,
    /// Role of the source in the last selection.
    pub state: SourceState,
    /// Reachability register: the last eight polls, newest in the lowest bit.
    pub reach: i32,
    /// Stratum of the source.
    #[serde(default)]
    pub stratum: i32,
    /// Offset of the source, in nanoseconds.
    #[serde(default)]
    pub offset_nanos: i64,
    /// Round-trip delay, in nanoseconds.
    #[serde(default)]
    pub delay_nanos: i64,
    /// Jitter, in nanoseconds.
    #[serde(default)]
    pub jitter_nanos: i64,
}

/// Role of a source in selection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SourceState {
    /// The system peer: the source the clock follows.
    Selected,
    /// A survivor whose offset is combined into the estimate.
    Combined,
    /// Agrees with the majority but was pruned from the combination.
    Candidate,
    /// Disagrees with the majority and is never used.
    Falseticker,
    /// No reply to the last eight polls.
    #[default]
    Unreachable,
    /// Refused us (KoD DENY/RSTR) and is no longer polled.
    Demobilized,
}

/// Formats nanoseconds for display with a unit suited to its size: "+512ns", "-12.3µs",
/// "+1.50ms", "+2.000s".
pub fn format_offset(nanos: i64) -> String {
    let sign = if nanos < 0 { '-' } else { '+' };
    let abs = nanos.unsigned_abs() as f64;
    if abs < 1e3 {
        format!("{sign}{abs:.0}ns")
    } else if abs < 1e6 {
        format!("{sign}{:.1}µs", abs / 1e3)
    } else if abs < 1e9 {
        format!("{sign}{:.2}ms", abs / 1e6)
    } else {
        format!("{sign}{:.3}s", abs / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::format_offset;

    #[test]
    fn offsets_are_displayed_with_a_unit_matching_their_size() {
        assert_eq!(format_offset(0), "+0ns");
        assert_eq!(format_offset(-512), "-512ns");
        assert_eq!(format_offset(12_345), "+12.3µs");
        assert_eq!(format_offset(-1_500_000), "-1.50ms");
        assert_eq!(format_offset(2_000_000_000), "+2.000s");
    }
}
