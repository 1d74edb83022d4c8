//! The Kubernetes API server's audit log (JSON lines of `audit.k8s.io/v1` Event objects) read
//! into the changes of TimeServices and TenantTimePolicies: who, when, what verb, whether the
//! API server refused it, and a field-level diff against the previous version of the same
//! object seen in the log.
//!
//! Hostile input is expected: every line that cannot be read is reported with its number,
//! lines are bounded in length, and everything not about Stratum's two configuration kinds is
//! counted as ignored, never silently lost.

use std::collections::BTreeMap;
use std::io::BufRead;

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use serde_json::Value;

use super::model::{Baseline, ChangeOutcome, ChangeRecord, LineProblem};
use stratum_api::diff;

/// Longest audit line read; longer ones are reported and skipped. An object of Stratum's kinds
/// is bounded by the API server's request limit (3 MiB) and, in practice, far smaller.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;
/// Most problems kept with their text; more are counted.
pub const MAX_PROBLEMS: usize = 100;

/// The API group whose changes are audited.
const GROUP: &str = stratum_api::GROUP;
/// The configuration kinds, by resource name.
const RESOURCES: [&str; 2] = ["timeservices", "tenanttimepolicies"];
/// Verbs that change an object.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// Everything read from one audit log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditLog {
    /// Changes (applied or refused) of TimeServices and TenantTimePolicies, oldest first.
    pub changes: Vec<ChangeRecord>,
    /// Lines that could not be read, with their numbers (the first [`MAX_PROBLEMS`]).
    pub problems: Vec<LineProblem>,
    /// Problems beyond [`MAX_PROBLEMS`].
    pub problems_omitted: usize,
    /// Lines read (including empty ones).
    pub lines: usize,
    /// Audit events about other groups, kinds, reads or subresources, or of an earlier stage.
    pub ignored: usize,
    /// Time of the earliest audit event in the log, of any kind: changes before it cannot
    /// appear.
    pub first_event: Option<Timestamp>,
}

impl AuditLog {
    fn problem(&mut self, line: usize, message: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(LineProblem {
                line,
                message: diff::cut(&message, 300),
            });
        } else {
            self.problems_omitted += 1;
        }
    }
}

/// The fields of an audit event this reader uses; everything else is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    kind: Option<String>,
    api_version: Option<String>,
    audit_id: Option<String>,
    stage: Option<String>,
    verb: Option<String>,
    user: Option<UserInfo>,
    impersonated_user: Option<UserInfo>,
    object_ref: Option<ObjectRef>,
    response_status: Option<Status>,
    request_object: Option<Value>,
    response_object: Option<Value>,
    stage_timestamp: Option<String>,
}

#[derive(Deserialize)]
struct UserInfo {
    username: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef {
    resource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    api_group: Option<String>,
    subresource: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    code: Option<i64>,
    reason: Option<String>,
    message: Option<String>,
}

/// One relevant event, before diffing.
struct Candidate {
    line: usize,
    time: Timestamp,
    event: AuditEvent,
    resource: String,
    namespace: Option<String>,
    name: String,
}

/// Reads an audit log. Never fails: unreadable lines become [`LineProblem`]s and a read error
/// ends the log with one.
pub fn read(mut reader: impl BufRead) -> AuditLog {
    let mut log = AuditLog::default();
    let mut candidates = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let line_no = log.lines + 1;
        match read_bounded_line(&mut reader, &mut buf) {
            Ok(LineRead::End) => break,
            Ok(LineRead::TooLong(len)) => {
                log.lines += 1;
                log.problem(
                    line_no,
                    format!("line of {len} bytes or more is longer than the {MAX_LINE_BYTES}-byte limit; skipped"),
                );
                continue;
            }
            Ok(LineRead::Line) => log.lines += 1,
            Err(e) => {
                log.problem(line_no, format!("reading stopped: {e}"));
                break;
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(&buf) {
            Ok(event) => {
                if let Some(t) = event
                    .stage_timestamp
                    .as_deref()
                    .and_then(|t| t.parse::<Timestamp>().ok())
                {
                    log.first_event = Some(log.first_event.map_or(t, |f| f.min(t)));
                }
                match classify(event, line_no) {
                    Ok(Some(c)) => candidates.push(c),
                    Ok(None) => log.ignored += 1,
                    Err(message) => log.problem(line_no, message),
                }
            }
            Err(message) => log.problem(line_no, message),
        }
    }
    // Audit backends write events as requests complete, which is nearly but not exactly in
    // time order; diffs need the order in which versions were written.
    candidates.sort_by_key(|c| (c.time, c.line));
    log.changes = to_changes(candidates);
    log
}

enum LineRead {
    End,
    Line,
    /// Skipped, with the bytes seen.
    TooLong(usize),
}

/// Reads one line into `buf` without ever holding more than [`MAX_LINE_BYTES`] of it.
fn read_bounded_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<LineRead> {
    let mut seen = 0usize;
    let mut too_long = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(match (seen, too_long) {
                (0, _) => LineRead::End,
                (n, true) => LineRead::TooLong(n),
                _ => LineRead::Line,
            });
        }
        let (take, done) = match memchr_newline(chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        seen += take;
        if !too_long && buf.len() + take <= MAX_LINE_BYTES + 1 {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            too_long = true;
            buf.clear();
        }
        reader.consume(take);
        if done {
            return Ok(if too_long {
                LineRead::TooLong(seen)
            } else {
                LineRead::Line
            });
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

fn parse_line(bytes: &[u8]) -> Result<AuditEvent, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let event: AuditEvent =
        serde_json::from_str(text.trim_end()).map_err(|e| format!("not a JSON object: {e}"))?;
    if event.kind.as_deref() != Some("Event")
        || !event
            .api_version
            .as_deref()
            .is_some_and(|v| v.starts_with("audit.k8s.io/"))
    {
        return Err(format!(
            "not an audit.k8s.io Event (kind {:?}, apiVersion {:?})",
            event.kind.as_deref().unwrap_or(""),
            event.api_version.as_deref().unwrap_or("")
        ));
    }
    Ok(event)
}

/// A change of a configuration kind (`Some`), anything else (`None`), or an event about a
/// configuration kind that lacks what a change record needs (`Err`).
fn classify(event: AuditEvent, line: usize) -> Result<Option<Candidate>, String> {
    let Some(object) = &event.object_ref else {
        return Ok(None);
    };
    let resource = object.resource.as_deref().unwrap_or("");
    let relevant = object.api_group.as_deref() == Some(GROUP)
        && RESOURCES.contains(&resource)
        // Status is written by the operator and agents; it is state, not configuration.
        && object.subresource.as_deref().is_none_or(str::is_empty)
        && event
            .verb
            .as_deref()
            .is_some_and(|v| WRITE_VERBS.contains(&v))
        // One record per request: the stage at which the outcome is known.
        && matches!(event.stage.as_deref(), Some("ResponseComplete") | Some("Panic"));
    if !relevant {
        return Ok(None);
    }
    let time = event
        .stage_timestamp
        .as_deref()
        .ok_or("audit event of a change has no stageTimestamp")?
        .parse::<Timestamp>()
        .map_err(|e| format!("stageTimestamp is not an RFC 3339 time: {e}"))?;
    if event
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .is_none()
    {
        return Err("audit event of a change names no user".into());
    }
    // deletecollection names no object: it is recorded against the collection.
    let name = object.name.clone().unwrap_or_else(|| "*".to_owned());
    Ok(Some(Candidate {
        line,
        time,
        resource: resource.to_owned(),
        namespace: object.namespace.clone().filter(|n| !n.is_empty()),
        name,
        event,
    }))
}

/// Diffs each change against the last version of the same object written before it.
fn to_changes(candidates: Vec<Candidate>) -> Vec<ChangeRecord> {
    type Key = (String, Option<String>, String);
    let mut last: BTreeMap<Key, Value> = BTreeMap::new();
    let mut out = Vec::with_capacity(candidates.len());
    for c in candidates {
        let key: Key = (c.resource.clone(), c.namespace.clone(), c.name.clone());
        let e = &c.event;
        let verb = e.verb.clone().unwrap_or_default();
        let code = e.response_status.as_ref().and_then(|s| s.code);
        let refused = e.stage.as_deref() == Some("Panic") || code.is_none_or(|c| c >= 400);
        let outcome = if refused {
            ChangeOutcome::Refused {
                code: code.unwrap_or(0),
                reason: e
                    .response_status
                    .as_ref()
                    .map(|s| {
                        diff::cut(
                            &[s.reason.as_deref(), s.message.as_deref()]
                                .into_iter()
                                .flatten()
                                .collect::<Vec<_>>()
                                .join(": "),
                            300,
                        )
                    })
                    .unwrap_or_else(|| "no response status recorded".to_owned()),
            }
        } else {
            ChangeOutcome::Applied
        };
        let previous = last.get(&key);
        // What the object became: the response on success; what the user sent otherwise.
        let after: Option<&Value> = match (&outcome, verb.as_str()) {
            (ChangeOutcome::Applied, "delete" | "deletecollection") => None,
            (ChangeOutcome::Applied, _) => e
                .response_object
                .as_ref()
                .filter(|v| v.is_object())
                .or(e.request_object.as_ref()),
            (ChangeOutcome::Refused { .. } | ChangeOutcome::Observed, _) => {
                e.request_object.as_ref()
            }
        };
        let (baseline, fields, omitted, note) = match (verb.as_str(), previous, after) {
            (_, _, None) if !matches!(verb.as_str(), "delete" | "deletecollection") => (
                Baseline::Unknown,
                Vec::new(),
                0,
                Some(
                    "the audit policy recorded no object for this request (level Metadata): fields unknown"
                        .to_owned(),
                ),
            ),
            ("create", None, Some(obj)) => {
                let d = diff::diff(None, Some(obj));
                (Baseline::Absent, d.fields, d.omitted, None)
            }
            // A patch body is partial: only what it names changed.
            ("patch", prev, Some(patch)) if !is_full_object(patch) || prev.is_none() => {
                let d = patch_fields(prev, patch);
                let baseline = if prev.is_some() {
                    Baseline::Previous
                } else {
                    Baseline::Unknown
                };
                (baseline, d.fields, d.omitted, None)
            }
            (_, Some(prev), obj) => {
                let d = diff::diff(Some(prev), obj);
                (Baseline::Previous, d.fields, d.omitted, None)
            }
            (_, None, obj) => {
                // The first version in the log is not a create: the one before is unknown.
                let d = diff::diff(None, obj);
                (Baseline::Unknown, d.fields, d.omitted, None)
            }
        };
        if outcome == ChangeOutcome::Applied {
            match after {
                Some(obj) if is_full_object(obj) => {
                    last.insert(key, obj.clone());
                }
                None if verb.starts_with("delete") => {
                    last.remove(&key);
                }
                _ => {}
            }
        }
        out.push(ChangeRecord {
            time: c.time.to_string(),
            user: e
                .user
                .as_ref()
                .and_then(|u| u.username.clone())
                .unwrap_or_default(),
            impersonated_user: e
                .impersonated_user
                .as_ref()
                .and_then(|u| u.username.clone()),
            verb,
            kind: kind_of(&c.resource).to_owned(),
            namespace: c.namespace,
            name: c.name,
            outcome,
            baseline,
            fields,
            fields_omitted: omitted,
            note,
            source_line: Some(c.line),
            audit_id: e.audit_id.clone(),
        });
    }
    out
}

/// Whether a request or response body is a whole object (rather than a patch).
fn is_full_object(v: &Value) -> bool {
    v.get("kind").is_some_and(Value::is_string) && v.get("spec").is_some()
}

/// The fields a patch body sets (merge or strategic merge patch: an object; JSON patch: an
/// array of operations), with their earlier values when the previous version is known.
fn patch_fields(previous: Option<&Value>, patch: &Value) -> diff::Diff {
    match patch {
        Value::Array(ops) => {
            // JSON patch: apply it to a copy of the previous version where possible.
            let mut fields = diff::Diff::default();
            for op in ops {
                let path = op.get("path").and_then(Value::as_str).unwrap_or("");
                let dotted = path.trim_start_matches('/').replace('/', ".");
                let old = previous.and_then(|p| p.pointer(path));
                let new = op.get("value");
                let removal = op.get("op").and_then(Value::as_str) == Some("remove");
                let sub = diff::diff(old, if removal { None } else { new });
                if sub.fields.is_empty() && sub.omitted == 0 {
                    continue;
                }
                for mut f in sub.fields {
                    let secret = dotted.split('.').any(diff::is_sensitive);
                    f.path = if f.path.is_empty() {
                        dotted.clone()
                    } else {
                        format!("{dotted}.{}", f.path)
                    };
                    if secret {
                        f.old = f.old.map(|_| diff::REDACTED.to_owned());
                        f.new = f.new.map(|_| diff::REDACTED.to_owned());
                    }
                    fields.fields.push(f);
                }
                fields.omitted += sub.omitted;
            }
            fields
        }
        _ => {
            // Merge patch: what it names, against the previous version (RFC 7386: null removes).
            let merged = previous.map(|p| merge(p.clone(), patch));
            match (previous, merged) {
                (Some(p), Some(m)) => diff::diff(Some(p), Some(&m)),
                _ => diff::diff(None, Some(&strip_nulls(patch))),
            }
        }
    }
}

fn merge(mut target: Value, patch: &Value) -> Value {
    match (patch, &mut target) {
        (Value::Object(p), Value::Object(t)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    let current = t.remove(k).unwrap_or(Value::Null);
                    t.insert(k.clone(), merge(current, v));
                }
            }
            target
        }
        (Value::Object(_), _) => merge(Value::Object(Default::default()), patch),
        _ => patch.clone(),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "timeservices" => "TimeService",
        _ => "TenantTimePolicy",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    // One positional line per audit event keeps the fixtures readable as a log.
    #[allow(clippy::too_many_arguments)]
    fn event(
        user: &str,
        verb: &str,
        resource: &str,
        ns: Option<&str>,
        name: &str,
        code: i64,
        time: &str,
        request: Option<Value>,
        response: Option<Value>,
    ) -> String {
        let mut e = json!({
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "RequestResponse",
            "auditID": format!("id-{time}"), "stage": "ResponseComplete", "verb": verb,
            "user": {"username": user, "groups": ["system:authenticated"]},
            "objectRef": {"resource": resource, "name": name, "apiGroup": "stratum.io", "apiVersion": "v1alpha1"},
            "responseStatus": {"metadata": {}, "code": code},
            "stageTimestamp": time,
        });
        if let Some(ns) = ns {
            e["objectRef"]["namespace"] = json!(ns);
        }
        if code >= 400 {
            e["responseStatus"]["reason"] = json!("Forbidden");
            e["responseStatus"]["message"] = json!("user cannot patch");
        }
        if let Some(r) = request {
            e["requestObject"] = r;
        }
        if let Some(r) = response {
            e["responseObject"] = r;
        }
        e.to_string()
    }

    fn tenant(allowed: &str, rv: &str) -> Value {
        json!({"apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy",
            "metadata": {"name": "p", "namespace": "a", "resourceVersion": rv},
            "spec": {"allowedClients": [{"ipBlock": {"cidr": allowed}}]},
            "status": {"port": 12300}})
    }

    fn fields(c: &ChangeRecord) -> Vec<(String, Option<String>, Option<String>)> {
        c.fields
            .iter()
            .map(|f| (f.path.clone(), f.old.clone(), f.new.clone()))
            .collect()
    }

    #[test]
    fn consecutive_versions_are_diffed_field_by_field_with_the_user_and_time() {
        let log = [
            event(
                "alice",
                "create",
                "tenanttimepolicies",
                Some("a"),
                "p",
                201,
                "2026-01-01T10:00:00Z",
                Some(tenant("10.0.0.0/24", "")),
                Some(tenant("10.0.0.0/24", "1")),
            ),
            event(
                "alice",
                "patch",
                "tenanttimepolicies",
                Some("a"),
                "p",
                200,
                "2026-01-01T11:00:00Z",
                Some(json!({"spec": {"allowedClients": [{"ipBlock": {"cidr": "10.1.0.0/24"}}]}})),
                Some(tenant("10.1.0.0/24", "2")),
            ),
        ]
        .join("\n");
        let got = read(log.as_bytes());
        assert!(got.problems.is_empty(), "{:?}", got.problems);
        assert_eq!(got.changes.len(), 2);
        let created = &got.changes[0];
        assert_eq!(created.baseline, Baseline::Absent);
        assert_eq!(
            fields(created),
            [
                ("metadata.name".into(), None, Some("\"p\"".into())),
                ("metadata.namespace".into(), None, Some("\"a\"".into())),
                (
                    "spec.allowedClients[0]".into(),
                    None,
                    Some("{\"ipBlock\":{\"cidr\":\"10.0.0.0/24\"}}".into())
                ),
            ]
        );
        let patched = &got.changes[1];
        assert_eq!(patched.user, "alice");
        assert_eq!(patched.time, "2026-01-01T11:00:00Z");
        assert_eq!(patched.verb, "patch");
        assert_eq!(patched.kind, "TenantTimePolicy");
        assert_eq!(patched.namespace.as_deref(), Some("a"));
        assert_eq!(patched.outcome, ChangeOutcome::Applied);
        assert_eq!(patched.baseline, Baseline::Previous);
        assert_eq!(
            fields(patched),
            [(
                "spec.allowedClients[0].ipBlock.cidr".into(),
                Some("\"10.0.0.0/24\"".into()),
                Some("\"10.1.0.0/24\"".into())
            )]
        );
        assert_eq!(patched.source_line, Some(2));
    }

    #[test]
    fn a_refused_request_is_listed_as_refused_with_what_was_attempted_and_changes_nothing() {
        let log = [
            event(
                "alice",
                "create",
                "timeservices",
                None,
                "c",
                201,
                "2026-01-01T10:00:00Z",
                None,
                Some(json!({"kind": "TimeService", "metadata": {"name": "c"},
                    "spec": {"upstreams": [{"host": "a.example"}]}})),
            ),
            event(
                "mallory",
                "patch",
                "timeservices",
                None,
                "c",
                403,
                "2026-01-01T10:30:00Z",
                Some(json!({"spec": {"upstreams": [{"host": "evil.example"}]}})),
                None,
            ),
            event(
                "alice",
                "patch",
                "timeservices",
                None,
                "c",
                200,
                "2026-01-01T11:00:00Z",
                Some(json!({"spec": {"upstreams": [{"host": "b.example"}]}})),
                Some(json!({"kind": "TimeService", "metadata": {"name": "c"},
                    "spec": {"upstreams": [{"host": "b.example"}]}})),
            ),
        ]
        .join("\n");
        let got = read(log.as_bytes());
        let refused = &got.changes[1];
        assert_eq!(refused.user, "mallory");
        assert_eq!(
            refused.outcome,
            ChangeOutcome::Refused {
                code: 403,
                reason: "Forbidden: user cannot patch".into()
            }
        );
        assert_eq!(
            fields(refused),
            [(
                "spec.upstreams[0].host".into(),
                Some("\"a.example\"".into()),
                Some("\"evil.example\"".into())
            )]
        );
        // The refused attempt is not a version: alice's change is diffed against her own.
        assert_eq!(
            fields(&got.changes[2]),
            [(
                "spec.upstreams[0].host".into(),
                Some("\"a.example\"".into()),
                Some("\"b.example\"".into())
            )]
        );
    }

    #[test]
    fn malformed_lines_are_reported_with_their_numbers_and_the_rest_is_read() {
        let good = event(
            "alice",
            "delete",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        );
        let log = format!(
            "{good}\nnot json\n\n{{\"kind\":\"Event\"}}\n[1,2]\n{}\n\u{0}\u{1}\n{good}",
            json!({"kind": "Event", "apiVersion": "audit.k8s.io/v1", "stage": "ResponseComplete",
                "verb": "patch", "objectRef": {"apiGroup": "stratum.io", "resource": "timeservices", "name": "c"},
                "responseStatus": {"code": 200}, "user": {"username": "x"}, "stageTimestamp": "yesterday"})
        );
        let mut bytes = log.into_bytes();
        bytes.extend_from_slice(b"\n\xff\xfe{}\n");
        let got = read(bytes.as_slice());
        let lines: Vec<usize> = got.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 4, 5, 6, 7, 9], "{:?}", got.problems);
        assert!(
            got.problems[3].message.contains("stageTimestamp"),
            "{:?}",
            got.problems[3]
        );
        assert_eq!(got.changes.len(), 2, "both good lines are read");
        assert_eq!(got.lines, 9);
    }

    #[test]
    fn a_huge_line_is_reported_and_skipped_without_being_held_in_memory() {
        let huge = format!(
            "{{\"kind\":\"Event\",\"pad\":\"{}\"}}",
            "x".repeat(MAX_LINE_BYTES + 10)
        );
        let good = event(
            "alice",
            "delete",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        );
        let log = format!("{huge}\n{good}\n{huge}");
        let got = read(log.as_bytes());
        assert_eq!(got.problems.len(), 2);
        assert_eq!(got.problems[0].line, 1);
        assert_eq!(got.problems[1].line, 3);
        assert!(
            got.problems[0].message.contains("longer than"),
            "{:?}",
            got.problems
        );
        assert_eq!(got.changes.len(), 1);
    }

    #[test]
    fn deeply_nested_json_is_a_problem_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let got = read(deep.as_bytes());
        assert_eq!(got.problems.len(), 1);
        assert!(got.changes.is_empty());
    }

    #[test]
    fn other_groups_reads_status_and_earlier_stages_are_ignored_and_counted() {
        let mut other_group = event(
            "alice",
            "patch",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        );
        other_group = other_group.replace("\"stratum.io\"", "\"evil.io\"");
        let secret = event(
            "alice",
            "update",
            "secrets",
            Some("a"),
            "keys",
            200,
            "2026-01-01T10:00:00Z",
            Some(json!({"kind": "Secret", "data": {"k": "c2VjcmV0"}, "spec": {}})),
            None,
        )
        .replace("\"stratum.io\"", "\"\"");
        let read_only = event(
            "alice",
            "get",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        );
        let status = event(
            "operator",
            "patch",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        )
        .replace(
            "\"name\":\"c\"",
            "\"name\":\"c\",\"subresource\":\"status\"",
        );
        let received = event(
            "alice",
            "patch",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        )
        .replace("ResponseComplete", "RequestReceived");
        let nodeclock = event(
            "agent",
            "patch",
            "nodeclocks",
            None,
            "n",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        );
        let log = [other_group, secret, read_only, status, received, nodeclock].join("\n");
        let got = read(log.as_bytes());
        assert!(got.changes.is_empty(), "{:?}", got.changes);
        assert!(got.problems.is_empty(), "{:?}", got.problems);
        assert_eq!(got.ignored, 6);
        assert!(!format!("{got:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn secret_fields_in_patches_and_objects_are_redacted() {
        let obj = |secret: &str| {
            json!({"kind": "TenantTimePolicy", "metadata": {"name": "p", "namespace": "a"},
            "spec": {"authentication": {"symmetricKeysSecret": secret}}})
        };
        let log = [
            event("alice", "create", "tenanttimepolicies", Some("a"), "p", 201, "2026-01-01T10:00:00Z", None, Some(obj("s1"))),
            event("alice", "patch", "tenanttimepolicies", Some("a"), "p", 403, "2026-01-01T10:01:00Z",
                Some(json!([{"op": "replace", "path": "/spec/authentication/symmetricKeysSecret", "value": "s2"}])), None),
            event("alice", "update", "tenanttimepolicies", Some("a"), "p", 200, "2026-01-01T10:02:00Z", Some(obj("s3")), Some(obj("s3"))),
        ]
        .join("\n");
        let got = read(log.as_bytes());
        assert_eq!(got.changes.len(), 3);
        for c in &got.changes {
            assert_eq!(
                c.fields
                    .iter()
                    .filter(|f| f.path.contains("symmetricKeysSecret"))
                    .count(),
                1,
                "{c:?}"
            );
        }
        let text = format!("{:?}", got.changes);
        for s in ["s1", "s2", "s3"] {
            assert!(
                !text.contains(&format!("\\\"{s}\\\"")),
                "{s} leaked: {text}"
            );
        }
    }

    #[test]
    fn a_metadata_level_record_says_its_fields_are_unknown() {
        let log = event(
            "alice",
            "patch",
            "timeservices",
            None,
            "c",
            200,
            "2026-01-01T10:00:00Z",
            None,
            None,
        );
        let got = read(log.as_bytes());
        assert_eq!(got.changes.len(), 1);
        assert_eq!(got.changes[0].baseline, Baseline::Unknown);
        assert!(
            got.changes[0]
                .note
                .as_deref()
                .unwrap()
                .contains("fields unknown")
        );
    }

    #[test]
    fn records_out_of_order_are_diffed_in_time_order() {
        let v = |host: &str| json!({"kind": "TimeService", "metadata": {"name": "c"}, "spec": {"upstreams": [{"host": host}]}});
        let log = [
            event(
                "bob",
                "update",
                "timeservices",
                None,
                "c",
                200,
                "2026-01-01T10:00:02Z",
                Some(v("b")),
                Some(v("b")),
            ),
            event(
                "alice",
                "create",
                "timeservices",
                None,
                "c",
                201,
                "2026-01-01T10:00:01Z",
                Some(v("a")),
                Some(v("a")),
            ),
        ]
        .join("\n");
        let got = read(log.as_bytes());
        assert_eq!(got.changes[0].user, "alice");
        assert_eq!(
            fields(&got.changes[1]),
            [(
                "spec.upstreams[0].host".into(),
                Some("\"a\"".into()),
                Some("\"b\"".into())
            )]
        );
        assert_eq!(got.first_event.unwrap().to_string(), "2026-01-01T10:00:01Z");
    }
}
