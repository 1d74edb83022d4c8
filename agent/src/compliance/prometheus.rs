//! Accuracy over a period from Prometheus: the PromQL the report runs over the agents'
//! metrics (names in docs/contracts.md) and the reading of the HTTP API's answers. Pure: the
//! queries are strings, the answers bytes; `fetch` does the HTTP.
//!
//! Agent series carry no node label; `stratum_agent_info{node}` does, joined on
//! `job, instance` as the chart's dashboard does.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The agents' series joined to their node name; `version` (which changes on upgrade) is
/// dropped so an upgrade in the period does not make the join ambiguous.
fn info_over(window: &str) -> String {
    format!("max by (job, instance, node) (max_over_time(stratum_agent_info[{window}]))")
}

/// Per node, the largest |offset| over the window ending at the evaluation time, over every
/// raw sample: the larger of the window's maximum and its negated minimum (PromQL takes no
/// range of `abs(...)`, and a subquery's step could miss a short peak).
pub fn max_abs_offset_query(window_seconds: u64) -> String {
    let w = format!("{window_seconds}s");
    let (high, low) = (
        format!("max_over_time(stratum_agent_offset_seconds[{w}])"),
        format!("-min_over_time(stratum_agent_offset_seconds[{w}])"),
    );
    format!(
        "max by (node) ((({high} >= {low}) or {low}) * on(job, instance) group_left(node) {})",
        info_over(&w)
    )
}

/// Per node, an upper bound of the root distance over the window: the largest root delay / 2
/// plus the largest root dispersion (exact at each instant would need a subquery whose step
/// could miss short peaks).
pub fn max_root_distance_query(window_seconds: u64) -> String {
    let w = format!("{window_seconds}s");
    format!(
        "max by (node) ((max_over_time(stratum_agent_root_delay_seconds[{w}]) / 2 + max_over_time(stratum_agent_root_dispersion_seconds[{w}])) * on(job, instance) group_left(node) {})",
        info_over(&w)
    )
}

/// Per node, 1 while synchronized and 0 while not; run as a range query, so a missing point
/// is a step with no report.
pub fn synchronized_query() -> String {
    "max by (node) (stratum_agent_synchronized * on(job, instance) group_left(node) max by (job, instance, node) (stratum_agent_info))".to_owned()
}

/// Per tenant and outcome, packets in the window.
pub fn tenant_requests_query(window_seconds: u64) -> String {
    format!(
        "sum by (tenant, outcome) (increase(stratum_agent_tenant_requests_total[{window_seconds}s]))"
    )
}

/// Step of the synchronization range query: at least 15 s (a typical scrape interval), and
/// no more than 10,000 points (Prometheus refuses over 11,000).
pub fn range_step_seconds(window_seconds: u64) -> u64 {
    window_seconds.div_ceil(10_000).max(15)
}

/// An answer Prometheus could not give, or one this reader could not read.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    /// Not the HTTP API's JSON.
    #[error("Prometheus answered something that is not its API's JSON: {0}")]
    Decode(#[from] serde_json::Error),
    /// The API's error.
    #[error("Prometheus refused the query ({kind}): {message}")]
    Query {
        /// `errorType`.
        kind: String,
        /// `error`.
        message: String,
    },
    /// A result of another type than asked for.
    #[error("Prometheus answered a {got} where a {want} was expected")]
    ResultType {
        /// What came.
        got: String,
        /// What was asked for.
        want: &'static str,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

fn data(body: &[u8], want: &'static str) -> Result<Vec<Series>, PromError> {
    let envelope: Envelope = serde_json::from_slice(body)?;
    if envelope.status != "success" {
        return Err(PromError::Query {
            kind: envelope.error_type.unwrap_or_default(),
            message: envelope.error.unwrap_or_default(),
        });
    }
    let data = envelope.data.ok_or_else(|| PromError::ResultType {
        got: "answer without data".into(),
        want,
    })?;
    if data.result_type != want {
        return Err(PromError::ResultType {
            got: data.result_type,
            want,
        });
    }
    Ok(data.result)
}

/// An instant vector as `label value → sample`; samples that are not numbers (NaN, ±Inf
/// included) are left out, since no bound can be checked against them.
pub fn parse_vector(body: &[u8], label: &str) -> Result<BTreeMap<String, f64>, PromError> {
    Ok(data(body, "vector")?
        .into_iter()
        .filter_map(|s| {
            let key = s.metric.get(label)?.clone();
            let v: f64 = s.value?.1.parse().ok()?;
            v.is_finite().then_some((key, v))
        })
        .collect())
}

/// A vector by two labels (`tenant`, `outcome`).
pub fn parse_vector2(
    body: &[u8],
    first: &str,
    second: &str,
) -> Result<BTreeMap<(String, String), f64>, PromError> {
    Ok(data(body, "vector")?
        .into_iter()
        .filter_map(|s| {
            let key = (s.metric.get(first)?.clone(), s.metric.get(second)?.clone());
            let v: f64 = s.value?.1.parse().ok()?;
            v.is_finite().then_some((key, v))
        })
        .collect())
}

/// Time unsynchronized and time unreported per node, in seconds, from the synchronization
/// range query over `[start, end]` at `step`: each point stands for one step.
pub fn parse_sync_matrix(
    body: &[u8],
    start: i64,
    end: i64,
    step: u64,
) -> Result<BTreeMap<String, (f64, f64)>, PromError> {
    let step_i = i64::try_from(step.max(1)).unwrap_or(i64::MAX);
    let expected = (end.saturating_sub(start) / step_i)
        .saturating_add(1)
        .max(0) as u64;
    Ok(data(body, "matrix")?
        .into_iter()
        .filter_map(|s| {
            let node = s.metric.get("node")?.clone();
            let mut seen = 0u64;
            let mut unsynchronized = 0u64;
            for (_, v) in &s.values {
                seen += 1;
                if v.parse::<f64>().map_or(true, |v| v < 0.5) {
                    unsynchronized += 1;
                }
            }
            let unreported = expected.saturating_sub(seen);
            Some((
                node,
                ((unsynchronized * step) as f64, (unreported * step) as f64),
            ))
        })
        .collect())
}

/// Percent-encodes `text` for a URL query value (RFC 3986 unreserved characters stay).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_offset_query_takes_the_larger_of_the_windows_maximum_and_negated_minimum() {
        let q = max_abs_offset_query(86_400);
        assert!(
            q.contains("(max_over_time(stratum_agent_offset_seconds[86400s]) >= -min_over_time(stratum_agent_offset_seconds[86400s])) or -min_over_time(stratum_agent_offset_seconds[86400s])"),
            "{q}"
        );
        assert!(q.starts_with("max by (node) ("), "{q}");
    }

    #[test]
    fn a_vector_is_read_by_label_and_non_numbers_are_left_out() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"node":"a"},"value":[1700000000,"0.0012"]},
            {"metric":{"node":"b"},"value":[1700000000,"NaN"]},
            {"metric":{},"value":[1700000000,"1"]}]}}"#;
        let got = parse_vector(body, "node").unwrap();
        assert_eq!(got, BTreeMap::from([("a".to_owned(), 0.0012)]));
    }

    /// The report promises Prometheus' own figures, and SIEM pipelines read its JSON back:
    /// every value must survive Prometheus' text, the report's JSON and a JSON parser bit for
    /// bit. serde_json's default float parser is off by one ulp on values like this one (seen
    /// in e2e), hence its `float_roundtrip` feature in the workspace.
    #[test]
    fn a_figure_survives_prometheus_text_and_the_reports_json_bit_for_bit() {
        let text = "1.0097209886812359e-05";
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[
            {{"metric":{{"node":"a"}},"value":[1700000000,"{text}"]}}]}}}}"#
        );
        let read = parse_vector(body.as_bytes(), "node").unwrap()["a"];
        assert_eq!(read.to_bits(), text.parse::<f64>().unwrap().to_bits());
        let json = serde_json::to_string(&read).unwrap();
        let back: f64 = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_bits(), read.to_bits(), "{text} -> {json} -> {back}");
    }

    #[test]
    fn errors_and_wrong_result_types_are_typed() {
        let err = parse_vector(
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
            "node",
        )
        .unwrap_err();
        assert!(matches!(err, PromError::Query { .. }), "{err}");
        let err = parse_vector(
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
            "node",
        )
        .unwrap_err();
        assert!(matches!(err, PromError::ResultType { .. }), "{err}");
        assert!(parse_vector(b"<html>", "node").is_err());
    }

    #[test]
    fn unsynchronized_and_unreported_time_count_whole_steps() {
        // 0..=60 at 15 s: five points expected; one unsynchronized, one missing.
        let body = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"node":"a"},"values":[[0,"1"],[15,"0"],[30,"1"],[60,"1"]]}]}}"#;
        let got = parse_sync_matrix(body, 0, 60, 15).unwrap();
        assert_eq!(got["a"], (15.0, 15.0));
    }

    #[test]
    fn the_range_step_stays_under_prometheus_point_limit() {
        assert_eq!(range_step_seconds(3600), 15);
        assert_eq!(range_step_seconds(90 * 86_400), 778);
        assert!(90 * 86_400 / range_step_seconds(90 * 86_400) <= 10_000);
    }
}
