//! Types shared by several kinds: Go-style durations, NetworkPolicy-style peers and the
//! condition helpers every status uses.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A non-negative Go-style duration ("500ms", "1.5s", "24h"), serialized as `metav1.Duration`.
///
/// A newtype over kube's duration only to bound its length in the schema: the API server
/// estimates CEL cost from maxLength, and an unbounded string makes the pattern rule too
/// expensive to admit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub kube::core::Duration);

impl Duration {
    /// The duration in seconds; negative values (refused by the schema) count as zero.
    pub fn as_secs_f64(&self) -> f64 {
        if self.0.is_negative() {
            0.0
        } else {
            std::time::Duration::from(self.0).as_secs_f64()
        }
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Self(d.into())
    }
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "maxLength": 64 })
    }
}

/// CEL rule every duration field carries. The Go-format pattern is matched first: CEL's `&&`
/// absorbs the error `duration()` raises on malformed text, so the user sees the field's
/// message instead of a parse error. The pattern admits no sign, so durations are never
/// negative. An optional bound adds `&& duration(self) <op> duration('...')`.
#[macro_export]
#[doc(hidden)]
macro_rules! duration_rule {
    ($what:literal) => {
        $crate::duration_rule!(
            $what,
            "",
            " must be a non-negative duration such as \"500ms\", \"30s\" or \"24h\""
        )
    };
    ($what:literal, $bound:literal, $message:literal) => {
        kube::core::Rule::new(concat!(
            "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$')",
            $bound
        ))
        .message(concat!($what, $message))
    };
}

/// One allowed source of clients, with the semantics of a NetworkPolicy peer:
/// `podSelector` alone selects pods in the policy's namespace, `namespaceSelector` alone every
/// pod in the selected namespaces, both together the matching pods in the matching namespaces,
/// and `ipBlock` a CIDR range minus its exceptions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = kube::core::Rule::new("has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)")
        .message("a peer needs at least one of podSelector, namespaceSelector or ipBlock"),
    validation = kube::core::Rule::new("!has(self.ipBlock) || (!has(self.podSelector) && !has(self.namespaceSelector))")
        .message("ipBlock cannot be combined with podSelector or namespaceSelector in the same peer")
)]
pub struct PolicyPeer {
    /// Pods selected by labels; in the policy's own namespace unless `namespaceSelector` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces selected by labels; an empty selector selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// A CIDR range of client addresses, minus exceptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// A label selector, as in `metav1.LabelSelector`.
pub type LabelSelector = k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A CIDR range with optional exceptions, as in `networking.k8s.io/v1` IPBlock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = kube::core::Rule::new("!has(self.except) || self.except.all(e, isCIDR(e) && isCIDR(self.cidr) && cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength())")
        .message("every except entry must be a CIDR strictly inside cidr")
)]
pub struct IpBlock {
    /// A CIDR such as "10.0.0.0/8" or "2001:db8::/32".
    #[x_kube(validation = kube::core::Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.0.0.0/24 or 2001:db8::/64"))]
    #[schemars(length(max = 43))]
    pub cidr: String,
    /// CIDRs inside `cidr` that are not included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 43)))]
    pub except: Vec<String>,
}

/// A standard Kubernetes condition.
pub type Condition = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
