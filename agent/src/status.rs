//! The agent's status as served on its local status endpoint and printed by `stratumctl`:
//! chrony-like `tracking` and `sources` views as plain data.

use serde::{Deserialize, Serialize};
use stratum_ntp::system::{SourceState, SystemState};

use crate::server::FailedPort;

/// Everything the local status endpoint returns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Node and config identity.
    pub identity: Identity,
    /// The system clock view.
    pub tracking: Tracking,
    /// Every source.
    pub sources: Vec<SourceView>,
    /// Configured tenant ports that are not served (bind failures being retried).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_ports: Vec<FailedPort>,
}

/// Who this agent is and what it runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Node name.
    pub node: String,
    /// TimeService name.
    pub time_service: String,
    /// Agent version.
    pub version: String,
    /// Clock backend in use.
    pub clock: String,
    /// Config revision in force.
    pub config_revision: String,
    /// Where that config came from: its source, or the cache of the last good config.
    #[serde(default)]
    pub config_source: crate::config_cache::ConfigOrigin,
    /// Last config problem, when the latest change was rejected.
    pub config_error: Option<String>,
}

/// chrony's `tracking`, in base units.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tracking {
    /// Synchronized with enough agreeing sources.
    pub synchronized: bool,
    /// Ready as `/readyz` reports it.
    pub ready: bool,
    /// Reference ID, printable.
    pub reference_id: String,
    /// The system peer's name and address.
    pub system_peer: Option<String>,
    /// Stratum served.
    pub stratum: u8,
    /// Offset of the node clock from true time (local − true), seconds.
    pub offset_seconds: f64,
    /// Frequency correction in force, ppm.
    pub frequency_ppm: f64,
    /// Estimated error of the frequency, ppm.
    pub frequency_error_ppm: f64,
    /// System jitter, seconds.
    pub jitter_seconds: f64,
    /// Root delay, seconds.
    pub root_delay_seconds: f64,
    /// Root dispersion, seconds.
    pub root_dispersion_seconds: f64,
    /// Root distance, seconds.
    pub root_distance_seconds: f64,
    /// Leap status: "none", "insert", "delete" or "unsynchronized".
    pub leap: String,
    /// Sources in the majority clique.
    pub agreeing_sources: usize,
    /// Configured minimum.
    pub min_sources: usize,
    /// Steps applied since start.
    pub steps: u32,
    /// Last step, seconds (positive: forward).
    pub last_step_seconds: Option<f64>,
    /// When it was made, nanoseconds since the Unix epoch on the served clock.
    #[serde(default)]
    pub last_step_unix_nanos: Option<i64>,
    /// Why the last correction was refused, if it was.
    pub refusal: Option<String>,
    /// Signs of another time daemon on the node, as a sentence; `None` when none was seen.
    #[serde(default)]
    pub other_time_daemon: Option<String>,
    /// Why the system clock is only observed (another daemon steers it), when it is.
    #[serde(default)]
    pub clock_yielded: Option<String>,
    /// Seconds since the last clock update.
    pub last_update_ago_seconds: Option<f64>,
    /// `simulated` backend only: the steered clock's actual error against true time (this
    /// host's clock), which no real node can know. For demos and `make bench`'s accuracy
    /// comparison; `offsetSeconds` is the agent's estimate of the same quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_error_seconds: Option<f64>,
}

/// chrony's `sources` plus `sourcestats`, one row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    /// Configured host.
    pub name: String,
    /// Address polled.
    pub address: String,
    /// Selection role: selected, combined, candidate, falseticker, unreachable, demobilized,
    /// initializing, unusable.
    pub state: String,
    /// Stratum of the source.
    pub stratum: Option<u8>,
    /// Poll exponent.
    pub poll: i8,
    /// Reachability register.
    pub reach: u8,
    /// Offset of the source (true − local as the source sees it), seconds.
    pub offset_seconds: Option<f64>,
    /// Round-trip delay, seconds.
    pub delay_seconds: Option<f64>,
    /// Jitter, seconds.
    pub jitter_seconds: Option<f64>,
    /// Frequency estimate relative to the local clock, ppm.
    pub frequency_ppm: Option<f64>,
    /// Skew (frequency error bound), ppm.
    pub skew_ppm: Option<f64>,
}

/// The lowercase name of a source state.
pub fn state_name(state: SourceState) -> &'static str {
    match state {
        SourceState::Selected => "selected",
        SourceState::Combined => "combined",
        SourceState::Candidate => "candidate",
        SourceState::Falseticker => "falseticker",
        SourceState::Unreachable => "unreachable",
        SourceState::Demobilized => "demobilized",
        SourceState::Initializing => "initializing",
        SourceState::Unusable => "unusable",
    }
}

/// Number of sources in the majority clique.
pub fn agreeing_sources(state: &SystemState) -> usize {
    state
        .sources
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                SourceState::Selected | SourceState::Combined | SourceState::Candidate
            )
        })
        .count()
}

/// Rows for every source of a snapshot.
pub fn source_views(state: &SystemState) -> Vec<SourceView> {
    state
        .sources
        .iter()
        .map(|s| SourceView {
            name: s.name.clone(),
            address: s.address.to_string(),
            state: state_name(s.state).into(),
            stratum: s.stratum,
            poll: s.poll,
            reach: s.reach,
            offset_seconds: s.offset,
            delay_seconds: s.delay,
            jitter_seconds: s.jitter,
            frequency_ppm: s.frequency_ppm,
            skew_ppm: s.skew_ppm,
        })
        .collect()
}

/// Formats seconds with a unit matching their size, signed: "+12.3us", "-1.50ms".
pub fn fmt_seconds(s: f64) -> String {
    stratum_api::node_clock::format_offset((s * 1e9).round() as i64)
}
