//! Field-level differences between two versions of a Kubernetes object or of the agent config,
//! as a reviewer reads them (`spec.upstreams[0].host: "a" → "b"`), with secrets redacted and
//! bookkeeping fields (status, managedFields, resourceVersion, …) left out: they change on
//! every write and say nothing about who changed what.
//!
//! One notation for the whole audit trail: the operator's change Events and `stratumctl
//! report`'s diffs of audit log records both use it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest rendering of one value; longer ones are cut (the cut is marked).
pub const MAX_VALUE_CHARS: usize = 256;
/// Most field changes listed for one change; the rest are counted, never silently dropped.
pub const MAX_FIELDS: usize = 200;

/// Shown instead of any value whose field name looks secret.
pub const REDACTED: &str = "<redacted>";

/// One changed field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldChange {
    /// Dotted path with array indexes: `spec.allowedClients[1].ipBlock.cidr`.
    pub path: String,
    /// The value before as compact JSON; absent when the field did not exist (or the earlier
    /// version is unknown, see the change's `baseline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// The value after as compact JSON; absent when the field was removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
}

/// The changed fields between two versions, at most [`MAX_FIELDS`], and how many more there
/// were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Changed fields, keys in sorted order (serde_json's maps are sorted), array items in
    /// order.
    pub fields: Vec<FieldChange>,
    /// Changed fields beyond [`MAX_FIELDS`].
    pub omitted: usize,
}

impl Diff {
    fn push(&mut self, change: FieldChange) {
        if self.fields.len() < MAX_FIELDS {
            self.fields.push(change);
        } else {
            self.omitted += 1;
        }
    }
}

/// Whether a field name suggests secret material. Deliberately broad: a redacted harmless
/// value costs a reviewer a look at the object; a leaked key costs a rotation.
pub fn is_sensitive(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["key", "secret", "token", "password", "passwd", "credential"]
        .iter()
        .any(|word| lower.contains(word))
}

/// One step of a path: an object key or an array index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// The last-applied annotation holds the whole object as one string: diffing it would repeat
/// every change (and any secret-named field's value) outside the redaction.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Paths whose changes are bookkeeping, not configuration.
fn ignored(path: &[Segment<'_>]) -> bool {
    use Segment::Key;
    match path {
        [Key("status"), ..] | [Key("apiVersion")] | [Key("kind")] => true,
        [Key("metadata"), Key("annotations"), Key(LAST_APPLIED)] => true,
        [Key("metadata"), Key(field), ..] => matches!(
            *field,
            "managedFields"
                | "resourceVersion"
                | "generation"
                | "uid"
                | "creationTimestamp"
                | "selfLink"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
        ),
        _ => false,
    }
}

/// Every field that differs from `old` to `new`. `None` on either side is an absent object
/// (a create or a delete): each of the other side's leaves is listed.
pub fn diff(old: Option<&Value>, new: Option<&Value>) -> Diff {
    let mut out = Diff::default();
    let mut path = Vec::new();
    walk(&mut path, old, new, false, &mut out);
    out
}

fn walk<'a>(
    path: &mut Vec<Segment<'a>>,
    old: Option<&'a Value>,
    new: Option<&'a Value>,
    secret: bool,
    out: &mut Diff,
) {
    if old == new || ignored(path) {
        return;
    }
    // An array element that appears or goes is one change with its whole (redacted) value:
    // `upstreams[2]: {"host":"c.example",...}` reads better than each of its leaves.
    if matches!(path.last(), Some(Segment::Index(_))) && (old.is_none() || new.is_none()) {
        out.push(FieldChange {
            path: render_path(path),
            old: old.map(|v| render_value(v, secret)),
            new: new.map(|v| render_value(v, secret)),
        });
        return;
    }
    let mut descend = |path: &mut Vec<Segment<'a>>, seg, o, n, secret| {
        path.push(seg);
        walk(path, o, n, secret, out);
        path.pop();
    };
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            for (k, v) in a {
                descend(
                    path,
                    Segment::Key(k),
                    Some(v),
                    b.get(k),
                    secret || is_sensitive(k),
                );
            }
            for (k, v) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                descend(
                    path,
                    Segment::Key(k),
                    None,
                    Some(v),
                    secret || is_sensitive(k),
                );
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => {
            for i in 0..a.len().max(b.len()) {
                descend(path, Segment::Index(i), a.get(i), b.get(i), secret);
            }
        }
        // A whole object or array appeared or went: list its leaves.
        (Some(Value::Object(a)), None) | (None, Some(Value::Object(a))) if !a.is_empty() => {
            let removed = new.is_none();
            for (k, v) in a {
                let (o, n) = if removed {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                descend(path, Segment::Key(k), o, n, secret || is_sensitive(k));
            }
        }
        (Some(Value::Array(a)), None) | (None, Some(Value::Array(a))) if !a.is_empty() => {
            let removed = new.is_none();
            for (i, v) in a.iter().enumerate() {
                let (o, n) = if removed {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                descend(path, Segment::Index(i), o, n, secret);
            }
        }
        _ => out.push(FieldChange {
            path: render_path(path),
            old: old.map(|v| render_value(v, secret)),
            new: new.map(|v| render_value(v, secret)),
        }),
    }
}

/// `spec.upstreams[1].host`; keys that are not plain identifiers are quoted
/// (`metadata.labels["app.kubernetes.io/name"]`).
fn render_path(path: &[Segment<'_>]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
            Segment::Key(k)
                if !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Key(k) => {
                out.push('[');
                out.push_str(&Value::String((*k).to_owned()).to_string());
                out.push(']');
            }
        }
    }
    out
}

/// Compact JSON of a value, redacted when secret (and, inside it, under every secret-looking
/// key), cut at [`MAX_VALUE_CHARS`].
pub fn render_value(value: &Value, secret: bool) -> String {
    if secret {
        return REDACTED.to_owned();
    }
    let text = redacted(value).to_string();
    cut(&text, MAX_VALUE_CHARS)
}

/// `value` with the value of every secret-looking key replaced by [`REDACTED`].
pub fn redacted(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if is_sensitive(k) {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redacted(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redacted).collect()),
        other => other.clone(),
    }
}

/// `text` cut to at most `max` characters, the cut marked with how much was left out.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((at, _)) => format!("{}… ({} bytes in all)", &text[..at], text.len()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn paths(d: &Diff) -> Vec<(&str, Option<&str>, Option<&str>)> {
        d.fields
            .iter()
            .map(|f| (f.path.as_str(), f.old.as_deref(), f.new.as_deref()))
            .collect()
    }

    #[test]
    fn changed_added_and_removed_leaves_are_listed_with_old_and_new_values() {
        let old = json!({"spec": {"upstreams": [{"host": "a", "port": 123}], "gone": true}});
        let new = json!({"spec": {"upstreams": [{"host": "b", "port": 123}, {"host": "c"}]}});
        let d = diff(Some(&old), Some(&new));
        assert_eq!(
            paths(&d),
            [
                ("spec.gone", Some("true"), None),
                ("spec.upstreams[0].host", Some("\"a\""), Some("\"b\"")),
                ("spec.upstreams[1]", None, Some("{\"host\":\"c\"}")),
            ]
        );
    }

    #[test]
    fn bookkeeping_fields_and_the_last_applied_annotation_are_not_changes() {
        let old = json!({"metadata": {"resourceVersion": "1", "generation": 1,
            "managedFields": [{"manager": "x"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"password\":\"p1\"}"}},
            "status": {"port": 1}});
        let new = json!({"metadata": {"resourceVersion": "2", "generation": 2,
            "managedFields": [{"manager": "y"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"password\":\"p2\"}"}},
            "status": {"port": 2}});
        assert_eq!(diff(Some(&old), Some(&new)), Diff::default());
    }

    #[test]
    fn values_under_secret_looking_names_are_redacted_at_any_depth() {
        let old = json!({"spec": {"authentication": {"symmetricKeysSecret": "k1"},
            "x": {"apiToken": {"inner": "t1"}}, "list": [{"password": "p1"}]}});
        let new = json!({"spec": {"authentication": {"symmetricKeysSecret": "k2"},
            "x": {"apiToken": {"inner": "t2"}}, "list": [{"password": "p2"}]}});
        let d = diff(Some(&old), Some(&new));
        assert_eq!(d.fields.len(), 3);
        for f in &d.fields {
            assert_eq!(f.old.as_deref(), Some(REDACTED), "{f:?}");
            assert_eq!(f.new.as_deref(), Some(REDACTED), "{f:?}");
        }
        let text = serde_json::to_string(&d.fields).unwrap();
        for secret in ["k1", "k2", "t1", "t2", "p1", "p2"] {
            assert!(
                !text.contains(&format!("\"{secret}")),
                "{secret} leaked: {text}"
            );
        }
    }

    #[test]
    fn a_whole_array_element_is_shown_with_its_secrets_redacted() {
        let old = json!({"spec": {"peers": []}});
        let new = json!({"spec": {"peers": [{"host": "a", "auth": {"keyData": "hunter2"}}]}});
        let d = diff(Some(&old), Some(&new));
        assert_eq!(
            paths(&d),
            [(
                "spec.peers[0]",
                None,
                Some("{\"auth\":{\"keyData\":\"<redacted>\"},\"host\":\"a\"}")
            )]
        );
    }

    #[test]
    fn odd_keys_are_quoted_and_large_values_cut() {
        let old = json!({"metadata": {"labels": {"app.kubernetes.io/name": "a"}}});
        let new = json!({"metadata": {"labels": {"app.kubernetes.io/name": "x".repeat(5000)}}});
        let d = diff(Some(&old), Some(&new));
        assert_eq!(
            d.fields[0].path,
            "metadata.labels[\"app.kubernetes.io/name\"]"
        );
        let shown = d.fields[0].new.as_deref().unwrap();
        assert!(shown.chars().count() < MAX_VALUE_CHARS + 40, "{shown}");
        assert!(shown.ends_with("(5002 bytes in all)"), "{shown}");
    }

    #[test]
    fn a_huge_change_lists_the_first_fields_and_counts_the_rest() {
        let old = json!({"spec": {"list": (0..500).collect::<Vec<_>>()}});
        let new = json!({"spec": {"list": (1..501).collect::<Vec<_>>()}});
        let d = diff(Some(&old), Some(&new));
        assert_eq!(d.fields.len(), MAX_FIELDS);
        assert_eq!(d.omitted, 500 - MAX_FIELDS);
        assert_eq!(d.fields[20].path, "spec.list[20]");
    }
}
