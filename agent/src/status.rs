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
    /// The node clock as the other time daemon sees it, when one is seen: its own estimate
    /// beside `offsetSeconds`, for comparing while migrating in `Monitor` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_daemon: Option<HostDaemonClock>,
    /// Seconds since the last clock update.
    pub last_update_ago_seconds: Option<f64>,
    /// `simulated` backend only: the steered clock's actual error against true time (this
    /// host's clock), which no real node can know. For demos and `make bench`'s accuracy
    /// comparison; `offsetSeconds` is the agent's estimate of the same quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_error_seconds: Option<f64>,
}

/// The node clock as another time daemon on the node sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostDaemonClock {
    /// `chronyd` (asked on its command port) or `kernel` (what ntpd or systemd-timesyncd left
    /// in the kernel's discipline).
    pub daemon: String,
    /// The daemon's estimate of the clock's offset (local − its time), seconds.
    pub offset_seconds: Option<f64>,
    /// The daemon's bound on its error, seconds: chronyd's root distance, or the kernel's
    /// estimated error.
    pub error_bound_seconds: Option<f64>,
    /// The daemon claims to be synchronized.
    pub synchronized: bool,
    /// chronyd's selected source.
    pub reference: Option<String>,
    /// Why the daemon could not be read.
    pub error: Option<String>,
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
    /// Samples in the source's regression (chronyc's NP).
    #[serde(default)]
    pub samples: usize,
    /// Runs of residuals of one sign (chronyc's NR): few for many samples, the line no
    /// longer fits.
    #[serde(default)]
    pub residual_runs: Option<usize>,
    /// Seconds the regression spans.
    #[serde(default)]
    pub span_seconds: Option<f64>,
    /// How the source's time is authenticated: `NTS`, `SymmetricKey`, or absent for plain NTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<String>,
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
            samples: s.samples,
            residual_runs: s.residual_runs,
            span_seconds: s.span,
            authentication: None,
        })
        .collect()
}

/// Marks the sources of NTS and keyed upstreams (by configured name, `upstreams` and the
/// egress tier's): the agent polls those only authenticated, so their time is.
pub fn mark_authentication(views: &mut [SourceView], config: &stratum_api::AgentConfig) {
    let methods: std::collections::BTreeMap<&str, &str> = config
        .upstreams
        .iter()
        .chain(config.egress.iter().flat_map(|e| &e.tier_upstreams))
        .filter_map(|u| match (u.nts, &u.key) {
            (true, _) => Some((u.host.as_str(), "NTS")),
            (false, Some(_)) => Some((u.host.as_str(), "SymmetricKey")),
            (false, None) => None,
        })
        .collect();
    for view in views {
        if let Some(method) = methods.get(view.name.as_str()) {
            view.authentication = Some((*method).into());
        }
    }
}

/// `stratumctl sourcestats`: each source's regression as chronyc shows it. `Freq` is what the
/// source says the frequency correction should change by (its estimate minus the applied
/// `frequency_ppm`), `Skew` that estimate's standard error, `Std Dev` the samples' RMS residual.
/// `stratumctl sources`: chronyc's marks (`*` selected, `+` combined, `-` candidate, `x`
/// falseticker, `?` unreachable) followed by `A` for a source authenticated with NTS, role,
/// stratum, poll, reach (octal), offset, delay, jitter.
/// `wide` gives the configured name and the address their own columns and adds the
/// regression's samples, frequency and skew.
pub fn sources_table(sources: &[SourceView], wide: bool) -> String {
    let seconds = |v: Option<f64>| v.map_or_else(|| "-".into(), fmt_seconds);
    let mut out = if wide {
        format!(
            "{:<2} {:<24} {:<28} {:<12} {:>3} {:>4} {:>5} {:>12} {:>12} {:>12} {:>3} {:>10} {:>10}\n",
            "",
            "Name",
            "Address",
            "State",
            "St",
            "Poll",
            "Reach",
            "Offset",
            "Delay",
            "Jitter",
            "NP",
            "Freq ppm",
            "Skew ppm"
        )
    } else {
        format!(
            "{:<2} {:<28} {:<12} {:>3} {:>4} {:>5} {:>12} {:>12} {:>12}\n",
            "", "Source", "State", "St", "Poll", "Reach", "Offset", "Delay", "Jitter"
        )
    };
    let ppm = |v: Option<f64>| {
        v.filter(|v| v.is_finite())
            .map_or_else(|| "-".into(), |v| format!("{v:.3}"))
    };
    for src in sources {
        let mark = match src.state.as_str() {
            "selected" => "*",
            "combined" => "+",
            "candidate" => "-",
            "falseticker" => "x",
            "unreachable" => "?",
            _ => " ",
        };
        // chronyc's second column: here `A` for an authenticated (NTS) source.
        let mark = format!(
            "{mark}{}",
            if src.authentication.is_some() {
                "A"
            } else {
                ""
            }
        );
        let stratum = src.stratum.map_or("-".into(), |s| s.to_string());
        let (offset, delay, jitter) = (
            seconds(src.offset_seconds),
            seconds(src.delay_seconds),
            seconds(src.jitter_seconds),
        );
        out += &if wide {
            format!(
                "{mark:<2} {:<24} {:<28} {:<12} {:>3} {:>4} {:>5o} {offset:>12} {delay:>12} {jitter:>12} {:>3} {:>10} {:>10}\n",
                src.name,
                src.address,
                src.state,
                stratum,
                src.poll,
                src.reach,
                src.samples,
                ppm(src.frequency_ppm),
                ppm(src.skew_ppm),
            )
        } else {
            format!(
                "{mark:<2} {:<28} {:<12} {:>3} {:>4} {:>5o} {offset:>12} {delay:>12} {jitter:>12}\n",
                format!("{} {}", src.name, src.address),
                src.state,
                stratum,
                src.poll,
                src.reach,
            )
        };
    }
    out
}

pub fn sourcestats_table(sources: &[SourceView], applied_frequency_ppm: f64) -> String {
    let mut out = format!(
        "{:<32} {:>3} {:>3} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
        "Source", "NP", "NR", "Span", "Freq ppm", "Skew ppm", "Offset", "Std Dev"
    );
    let seconds = |v: Option<f64>| v.map_or_else(|| "-".into(), fmt_seconds);
    let ppm = |v: Option<f64>| {
        v.filter(|v| v.is_finite())
            .map_or_else(|| "-".into(), |v| format!("{v:.3}"))
    };
    for source in sources {
        out += &format!(
            "{:<32} {:>3} {:>3} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
            format!("{} {}", source.name, source.address),
            source.samples,
            source
                .residual_runs
                .map_or_else(|| "-".into(), |r| r.to_string()),
            source.span_seconds.map_or_else(|| "-".into(), fmt_span),
            ppm(source.frequency_ppm.map(|f| f - applied_frequency_ppm)),
            ppm(source.skew_ppm),
            seconds(source.offset_seconds),
            seconds(source.jitter_seconds).trim_start_matches('+'),
        );
    }
    out
}

/// A span as chronyc prints it: seconds, minutes, hours or days, whichever fits.
fn fmt_span(seconds: f64) -> String {
    let s = seconds.max(0.0).round();
    if s < 600.0 {
        format!("{s:.0}s")
    } else if s < 36_000.0 {
        format!("{:.0}m", s / 60.0)
    } else if s < 864_000.0 {
        format!("{:.0}h", s / 3600.0)
    } else {
        format!("{:.0}d", s / 86_400.0)
    }
}

/// `stratumctl tracking`'s line for another time daemon on the node: its view of the clock
/// beside the agent's, and what the agent measures minus what the daemon believes (the gap an
/// admin checks before handing the clock over); `None` when no daemon is seen.
pub fn host_daemon_line(t: &Tracking) -> Option<String> {
    let Some(d) = &t.host_daemon else {
        return t
            .other_time_daemon
            .as_ref()
            .map(|seen| format!("seen, its view not readable ({seen})"));
    };
    let Some(offset) = d.offset_seconds else {
        let why = d.error.as_deref().unwrap_or("no figures");
        return Some(format!("{}, its view not readable: {why}", d.daemon));
    };
    let mut line = format!("{} says {}", d.daemon, fmt_seconds(offset));
    if let Some(bound) = d.error_bound_seconds {
        line.push_str(&format!(
            " (± {})",
            fmt_seconds(bound).trim_start_matches('+')
        ));
    }
    if let Some(reference) = &d.reference {
        line.push_str(&format!(", following {reference}"));
    }
    if !d.synchronized {
        line.push_str(", unsynchronized");
    }
    line.push_str(&format!(
        "; agent − {}: {}",
        d.daemon,
        fmt_seconds(t.offset_seconds - offset)
    ));
    Some(line)
}

/// Formats seconds with a unit matching their size, signed: "+12.3us", "-1.50ms".
pub fn fmt_seconds(s: f64) -> String {
    stratum_api::node_clock::format_offset((s * 1e9).round() as i64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn source(name: &str, frequency_ppm: Option<f64>) -> SourceView {
        SourceView {
            name: name.into(),
            address: "192.0.2.1:123".into(),
            state: "selected".into(),
            offset_seconds: Some(-12e-6),
            jitter_seconds: Some(3e-6),
            frequency_ppm,
            skew_ppm: Some(0.05),
            samples: 12,
            residual_runs: Some(7),
            span_seconds: Some(3.0 * 3600.0 + 5.0),
            ..SourceView::default()
        }
    }

    #[test]
    fn the_host_daemon_line_sets_its_view_beside_the_agents_with_the_difference() {
        let mut t = Tracking {
            offset_seconds: 15e-6,
            ..Tracking::default()
        };
        assert_eq!(host_daemon_line(&t), None, "no daemon, no line");
        t.other_time_daemon = Some("UDP 0.0.0.0:123 is bound by another program".into());
        assert_eq!(
            host_daemon_line(&t).unwrap(),
            "seen, its view not readable (UDP 0.0.0.0:123 is bound by another program)"
        );
        t.host_daemon = Some(HostDaemonClock {
            daemon: "chronyd".into(),
            offset_seconds: Some(12e-6),
            error_bound_seconds: Some(4.2e-6),
            synchronized: true,
            reference: Some("192.0.2.1".into()),
            error: None,
        });
        assert_eq!(
            host_daemon_line(&t).unwrap(),
            "chronyd says +12.0µs (± 4.2µs), following 192.0.2.1; agent − chronyd: +3.0µs"
        );
        t.host_daemon = Some(HostDaemonClock {
            daemon: "chronyd".into(),
            error: Some("asking chronyd on 127.0.0.1:323: no answer within 500 ms".into()),
            ..HostDaemonClock::default()
        });
        assert_eq!(
            host_daemon_line(&t).unwrap(),
            "chronyd, its view not readable: asking chronyd on 127.0.0.1:323: no answer within 500 ms"
        );
    }

    #[test]
    fn the_sources_table_marks_roles_and_wide_adds_the_regression() {
        let mut unreachable = source("ntp2", None);
        unreachable.state = "unreachable".into();
        unreachable.offset_seconds = None;
        let sources = [source("ntp1", Some(-48.75)), unreachable];
        let rows = |t: String| -> Vec<Vec<String>> {
            t.lines()
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect()
        };
        let text = rows(sources_table(&sources, false));
        assert_eq!(
            text[0],
            [
                "Source", "State", "St", "Poll", "Reach", "Offset", "Delay", "Jitter"
            ]
        );
        assert_eq!(text[1][..3], ["*", "ntp1", "192.0.2.1:123"]);
        assert_eq!(text[2][..4], ["?", "ntp2", "192.0.2.1:123", "unreachable"]);
        assert_eq!(text[2][8], "-", "no offset: {:?}", text[2]);
        let wide = rows(sources_table(&sources, true));
        assert_eq!(wide[0].len(), 14, "{:?}", wide[0]);
        assert_eq!(wide[0][9..], ["NP", "Freq", "ppm", "Skew", "ppm"]);
        assert_eq!(wide[1][0..3], ["*", "ntp1", "192.0.2.1:123"]);
        assert_eq!(wide[1][10..], ["12", "-48.750", "0.050"]);
        assert_eq!(wide[2][10..], ["12", "-", "0.050"]);
    }

    #[test]
    fn sources_of_nts_upstreams_are_marked_authenticated_by_configured_name() {
        let config: stratum_api::AgentConfig = serde_json::from_value(serde_json::json!({
            "version": 1, "revision": "r", "timeService": "ts",
            "clock": {"backend": "simulated"},
            "upstreams": [
                {"host": "nts.example", "kind": "server", "port": 123, "iburst": true,
                 "minPoll": 4, "maxPoll": 6, "maxSources": 1, "nts": true},
                {"host": "ntp1", "kind": "server", "port": 123, "iburst": true,
                 "minPoll": 4, "maxPoll": 6, "maxSources": 1}
            ],
            "selection": {"minSources": 1, "maxDistanceSeconds": 1.5},
            "discipline": {"makeStepThresholdSeconds": 0.1, "makeStepLimit": 3, "maxSlewPpm": 500,
                "panicStartupSeconds": 86400, "panicRuntimeSeconds": 1000, "rtcSync": false,
                "driftFile": "/d.json"},
            "leap": {"mode": "kernel", "smearWindowSeconds": 86400},
            "serving": {"holdoverSeconds": 0, "tenants": []},
            "reporting": {"heartbeatSeconds": 30}
        }))
        .unwrap();
        let mut views = [source("nts.example", None), source("ntp1", None)];
        mark_authentication(&mut views, &config);
        assert_eq!(views[0].authentication.as_deref(), Some("NTS"));
        assert_eq!(views[1].authentication, None);
        let table = sources_table(&views, false);
        let marks: Vec<&str> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(marks, ["*A", "*"], "{table}");
        // JSON names it only when there is one.
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!(json[0]["authentication"], "NTS");
        assert!(json[1].get("authentication").is_none());
    }

    #[test]
    fn sourcestats_shows_each_regression_relative_to_the_applied_frequency() {
        let table = sourcestats_table(&[source("ntp1", Some(-48.75)), source("ntp2", None)], -50.0);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "Source", "NP", "NR", "Span", "Freq", "ppm", "Skew", "ppm", "Offset", "Std", "Dev"
            ]
        );
        // Name, address, NP, NR, span, residual frequency, skew, offset, standard deviation.
        assert_eq!(
            rows[1],
            [
                "ntp1",
                "192.0.2.1:123",
                "12",
                "7",
                "180m",
                "1.250",
                "0.050",
                "-12.0µs",
                "3.0µs"
            ]
        );
        // No estimate yet: a dash, never a made-up zero.
        assert_eq!(rows[2][5], "-");
    }

    #[test]
    fn spans_are_printed_in_the_largest_unit_that_keeps_them_readable() {
        assert_eq!(fmt_span(42.4), "42s");
        assert_eq!(fmt_span(1200.0), "20m");
        assert_eq!(fmt_span(7.0 * 3600.0), "420m");
        assert_eq!(fmt_span(20.0 * 3600.0), "20h");
        assert_eq!(fmt_span(12.0 * 86_400.0), "12d");
    }
}
