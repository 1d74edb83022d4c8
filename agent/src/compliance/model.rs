//! The compliance report as one value: what the JSON output is (field for field, see
//! docs/report.schema.json) and what the Markdown renders.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use stratum_api::diff::FieldChange;

/// Version of the report's JSON shape; bumped on any incompatible change.
pub const REPORT_VERSION: u32 = 1;

/// A compliance report of time synchronization for one period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    /// Version of this shape.
    pub report_version: u32,
    /// When the report was made (RFC 3339).
    pub generated_at: String,
    /// The period reported on.
    pub period: Period,
    /// Each kind of evidence: used, or missing and why.
    pub evidence: Vec<EvidenceStatus>,
    /// Where time comes from, and every node's path to it.
    pub sources: Sources,
    /// How good each node's time was.
    pub accuracy: Accuracy,
    /// How each tenant is served.
    pub tenants: Vec<TenantRow>,
    /// Who may change the time configuration.
    pub access: Access,
    /// Who changed it, when, and what.
    pub changes: Changes,
    /// One verdict per control.
    pub controls: Vec<ControlResult>,
}

/// A period, both ends RFC 3339.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Period {
    /// Start (inclusive).
    pub since: String,
    /// End (inclusive).
    pub until: String,
}

/// The kinds of evidence a report draws on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum EvidenceKind {
    /// TimeServices, TenantTimePolicies and NodeClocks from the API server.
    ClusterState,
    /// The cluster's Node list (to find nodes without an agent).
    Nodes,
    /// Accuracy over the period from Prometheus.
    Metrics,
    /// Roles and bindings.
    Rbac,
    /// The API server's audit log.
    AuditLog,
    /// The operator's change Events (when there is no audit log).
    Events,
}

/// Whether one kind of evidence was available.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvidenceStatus {
    /// Which evidence.
    pub kind: EvidenceKind,
    /// Whether the report used it.
    pub available: bool,
    /// Where it came from, or what is missing and why.
    pub detail: String,
}

/// Designated sources and each node's trace to them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sources {
    /// Per TimeService, its designated upstreams and egress tier.
    pub designated: Vec<DesignatedSources>,
    /// Per node with an agent, where its time comes from.
    pub nodes: Vec<NodeTrace>,
    /// Nodes that take time from a source that is not designated, or whose chain could not be
    /// traced to one.
    pub not_designated: Vec<String>,
    /// Nodes whose sources are all designated but whose chain could not be traced (the node
    /// is unsynchronized, its NodeClock is stale, or its egress node's chain is broken).
    pub untraced: Vec<String>,
    /// Cluster nodes with no Stratum agent (no NodeClock); empty when the Node list was not
    /// readable (see `evidence`).
    pub without_agent: Vec<String>,
}

/// One TimeService's designated sources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DesignatedSources {
    /// The TimeService.
    pub time_service: String,
    /// Its upstreams, `host:port`.
    pub upstreams: Vec<String>,
    /// Nodes of its egress tier (the designated central time servers); empty without a tier.
    pub egress_nodes: Vec<String>,
    /// Whether other agents may poll the upstreams while no egress agent is usable.
    pub fallback_to_upstreams: bool,
}

/// One node's reference chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeTrace {
    /// Node name.
    pub node: String,
    /// The TimeService its agent belongs to.
    pub time_service: String,
    /// Whether the chain reaches a designated upstream through designated sources only.
    pub traced: bool,
    /// The chain, node first: `node-a → egress node edge-0 (10.0.0.1) → upstream
    /// time.example.org`.
    pub chain: Vec<String>,
    /// Sources this node polls that are not designated, as `name (address, state)`.
    pub undesignated_sources: Vec<String>,
    /// Why the chain is not traced, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Where the accuracy figures come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AccuracyBasis {
    /// Prometheus, over the whole period.
    Period,
    /// The NodeClocks as they are now: says nothing about the rest of the period.
    PointInTime,
}

/// Accuracy per node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Accuracy {
    /// Period figures or a point in time.
    pub basis: AccuracyBasis,
    /// Where the figures come from (the Prometheus URL, or "NodeClock status").
    pub source: String,
    /// The PromQL queries used, evaluated at the period's end.
    pub queries: Vec<String>,
    /// Longest time a node may have been unsynchronized in the period and still pass, seconds.
    pub allowed_unsynchronized_seconds: f64,
    /// One row per node.
    pub nodes: Vec<NodeAccuracy>,
}

/// One node's accuracy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAccuracy {
    /// Node name.
    pub node: String,
    /// The TimeService of its agent.
    pub time_service: String,
    /// Largest |offset| of the node clock, seconds (at the point in time: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_offset_seconds: Option<f64>,
    /// Largest root distance (root delay / 2 + root dispersion), seconds; over a period an
    /// upper bound (the largest delay and the largest dispersion need not coincide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_root_distance_seconds: Option<f64>,
    /// Time the node was unsynchronized in the period, seconds (period basis only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsynchronized_seconds: Option<f64>,
    /// Time in the period with no report from the node's agent, seconds (period basis only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreported_seconds: Option<f64>,
    /// The bound both figures are checked against, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_seconds: Option<f64>,
    /// Where the bound comes from.
    pub bound_from: String,
    /// The result of the check.
    pub check: Check,
    /// Why the check has this result.
    pub reason: String,
}

/// The result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// Within its bounds.
    Within,
    /// Outside its bounds.
    Exceeded,
    /// Not enough evidence to tell.
    Unknown,
}

/// One tenant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantRow {
    /// `namespace/name`.
    pub tenant: String,
    /// Its TimeService (from status, else spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_service: Option<String>,
    /// Its Service, `namespace/name`.
    pub service: String,
    /// Its port on the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// CIDRs in its resolved allow list.
    pub allow_list_size: i32,
    /// Agents ready to serve it.
    pub ready_endpoints: i32,
    /// Its accuracy requirement, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_root_distance_seconds: Option<f64>,
    /// Client authentication: `none`, `NTS (required)` or `NTS (offered)` (whether requests
    /// without it are still answered), `symmetric keys`.
    pub authentication: String,
    /// Requests answered in the period (from Prometheus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<u64>,
    /// Requests refused in the period: denied or rate limited (from Prometheus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
}

/// Who may change the time configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Access {
    /// Whether roles and bindings were readable.
    pub evidenced: bool,
    /// One entry per principal, sorted by kind and name.
    pub principals: Vec<PrincipalAccess>,
    /// What a reviewer should know beyond the list.
    pub notes: Vec<String>,
}

/// One principal's rights over TimeServices and TenantTimePolicies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrincipalAccess {
    /// `User`, `Group` or `ServiceAccount`.
    pub kind: String,
    /// Its name; service accounts as `namespace/name`.
    pub name: String,
    /// What it may do, and through which binding.
    pub grants: Vec<Grant>,
}

/// One right.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grant {
    /// `timeservices` or `tenanttimepolicies`.
    pub resource: String,
    /// Write verbs granted (`create`, `update`, `patch`, `delete`, `deletecollection`).
    pub verbs: Vec<String>,
    /// `cluster` or `namespace NAME`.
    pub scope: String,
    /// Only these objects, when the rule names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    /// The binding and role: `ClusterRoleBinding x → ClusterRole y`.
    pub via: String,
}

/// Where change records come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ChangeSource {
    /// The API server's audit log: every request, with its user.
    AuditLog,
    /// The operator's Events: no user, and Events expire (an hour by default).
    Events,
    /// Neither was available.
    None,
}

/// Changes in the period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Changes {
    /// Where the records come from.
    pub source: ChangeSource,
    /// Changes in the period, oldest first.
    pub records: Vec<ChangeRecord>,
    /// Audit log lines that could not be read.
    pub problems: Vec<LineProblem>,
    /// Unreadable lines beyond those listed.
    pub problems_omitted: usize,
    /// Audit log lines read.
    pub lines_read: usize,
    /// Audit events about other kinds, reads, status or earlier stages.
    pub ignored: usize,
    /// Changes of the log outside the period.
    pub outside_period: usize,
}

/// Whether the API server carried out a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum ChangeOutcome {
    /// Carried out.
    Applied,
    /// Refused (HTTP status 400 or more).
    Refused {
        /// HTTP status code (0 when none was recorded).
        code: i64,
        /// The API server's reason and message.
        reason: String,
    },
    /// Recorded by the operator after the fact (an Event): the request is not known.
    Observed,
}

/// What the diff of a change is against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Baseline {
    /// The previous version of the object in the log.
    Previous,
    /// Nothing: the object was created.
    Absent,
    /// Not known: no earlier version in the log; old values are absent.
    Unknown,
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeRecord {
    /// When the API server completed the request (or the Event was recorded), RFC 3339.
    pub time: String,
    /// Who: the authenticated user (empty for Events, which name no actor).
    pub user: String,
    /// The user the request impersonated, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonated_user: Option<String>,
    /// `create`, `update`, `patch`, `delete`, `deletecollection`; for Events, their reason.
    pub verb: String,
    /// `TimeService` or `TenantTimePolicy`.
    pub kind: String,
    /// The object's namespace (TenantTimePolicies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The object's name (`*` for a deletecollection).
    pub name: String,
    /// Carried out or refused.
    pub outcome: ChangeOutcome,
    /// What the diff is against.
    pub baseline: Baseline,
    /// Changed (or, when refused, attempted) fields; secrets are redacted.
    pub fields: Vec<FieldChange>,
    /// Changed fields beyond those listed.
    pub fields_omitted: usize,
    /// Anything a reviewer should know about this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Line of the audit log it comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_line: Option<usize>,
    /// The audit ID, to find the full record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_id: Option<String>,
}

/// An audit log line that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LineProblem {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// A control's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// Every check passed on evidence that covers the period.
    Pass,
    /// At least one check failed.
    Fail,
    /// No check failed, but evidence is missing.
    NotEvidenced,
}

impl Verdict {
    /// As printed: `pass`, `fail`, `not evidenced`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NotEvidenced => "not evidenced",
        }
    }
}

/// One control's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlResult {
    /// `PCI DSS 10.6.1`, `PCI DSS 10.6.2`, `PCI DSS 10.6.3`, `ISO 27001:2022 A.8.17`.
    pub control: String,
    /// What the control asks.
    pub requirement: String,
    /// Pass, fail or not evidenced.
    pub verdict: Verdict,
    /// Why: every failed check and every missing piece of evidence (or what passed).
    pub reasons: Vec<String>,
    /// The evidence the checks used.
    pub evidence: Vec<EvidenceKind>,
}
