//! The pure builder: typed evidence in, one [`Report`] out. Every verdict is decided here, so
//! its tests pin what passes, what fails and what is not evidenced.
//!
//! A control passes only on evidence that covers the period; missing evidence makes it "not
//! evidenced" with a statement of what is missing, and any failed check makes it fail,
//! whatever else is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use stratum_api::node_clock::SourceState;
use stratum_api::time_service::{ClockSource, DisciplineMode};
use stratum_api::{NodeClock, TenantTimePolicy, TimeService};

use super::audit_log::AuditLog;
use super::model::*;
use super::rbac::{self, RbacObjects};

/// Evidence that may be missing: `Err` says what is missing and why.
pub type Evidenced<T> = Result<T, String>;

/// A node of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNode {
    /// Name.
    pub name: String,
    /// Labels (to place the egress tier).
    pub labels: BTreeMap<String, String>,
}

/// An agent pod: which node it runs on and its addresses (what other agents poll when it is
/// in the egress tier).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    /// Its node.
    pub node: String,
    /// Its TimeService.
    pub time_service: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
}

/// Accuracy over the period, per node, from Prometheus.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsEvidence {
    /// The Prometheus queried.
    pub url: String,
    /// The queries, as run.
    pub queries: Vec<String>,
    /// Per node.
    pub nodes: BTreeMap<String, NodeSeries>,
    /// Per tenant id (`namespace/name`).
    pub tenants: BTreeMap<String, TenantCounts>,
}

/// One node's figures over the period; `None` where Prometheus had no samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeSeries {
    /// Largest |offset|, seconds.
    pub max_abs_offset: Option<f64>,
    /// Largest root distance (upper bound), seconds.
    pub max_root_distance: Option<f64>,
    /// Seconds unsynchronized.
    pub unsynchronized_seconds: Option<f64>,
    /// Seconds without a report.
    pub unreported_seconds: Option<f64>,
}

/// A tenant's requests in the period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantCounts {
    /// Answered.
    pub served: u64,
    /// Denied or rate limited.
    pub refused: u64,
}

/// Where change records come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ChangeEvidence {
    /// The API server's audit log, read from `path`.
    AuditLog {
        /// The file.
        path: String,
        /// What was read.
        log: AuditLog,
    },
    /// The operator's Events about TimeServices and TenantTimePolicies, as records.
    Events(Vec<ChangeRecord>),
    /// Neither: why.
    Missing(String),
}

/// Everything a report is built from.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// When the report is made.
    pub generated_at: Timestamp,
    /// Start of the period.
    pub since: Timestamp,
    /// End of the period.
    pub until: Timestamp,
    /// Every TimeService.
    pub time_services: Vec<TimeService>,
    /// Every TenantTimePolicy.
    pub tenants: Vec<TenantTimePolicy>,
    /// Every NodeClock.
    pub node_clocks: Vec<NodeClock>,
    /// Every agent pod.
    pub agent_pods: Vec<AgentPod>,
    /// The cluster's nodes.
    pub cluster_nodes: Evidenced<Vec<ClusterNode>>,
    /// Roles and bindings.
    pub rbac: Evidenced<RbacObjects>,
    /// Change records.
    pub changes: ChangeEvidence,
    /// Accuracy over the period.
    pub metrics: Evidenced<MetricsEvidence>,
    /// Longest a node may be unsynchronized (or unreported) in the period and still pass.
    pub allowed_unsynchronized_seconds: f64,
}

/// A NodeClock older than this many reporting intervals describes an agent that may be gone.
const STALE_INTERVALS: f64 = 3.0;

/// Builds the report.
pub fn build(ev: &Evidence) -> Report {
    let time_services: BTreeMap<String, &TimeService> =
        ev.time_services.iter().map(|t| (t.name_any(), t)).collect();
    let egress = egress_nodes(ev, &time_services);
    let (sources, stale) = sources(ev, &time_services, &egress);
    let accuracy = accuracy(ev, &time_services, &stale);
    let tenants = tenant_rows(ev, &time_services);
    let access = access(ev);
    let changes = changes(ev);
    let controls = controls(ev, &sources, &accuracy, &access, &changes);
    Report {
        report_version: REPORT_VERSION,
        generated_at: ev.generated_at.to_string(),
        period: Period {
            since: ev.since.to_string(),
            until: ev.until.to_string(),
        },
        evidence: evidence_statuses(ev),
        sources,
        accuracy,
        tenants,
        access,
        changes,
        controls,
    }
}

fn evidence_statuses(ev: &Evidence) -> Vec<EvidenceStatus> {
    let status = |kind, r: Result<String, &String>| EvidenceStatus {
        kind,
        available: r.is_ok(),
        detail: r.unwrap_or_else(Clone::clone),
    };
    let mut out = vec![
        status(
            EvidenceKind::ClusterState,
            Ok(format!(
                "{} TimeService(s), {} TenantTimePolicy(ies), {} NodeClock(s) read from the API server",
                ev.time_services.len(),
                ev.tenants.len(),
                ev.node_clocks.len()
            )),
        ),
        status(
            EvidenceKind::Nodes,
            ev.cluster_nodes
                .as_ref()
                .map(|n| format!("{} node(s) listed", n.len())),
        ),
        status(
            EvidenceKind::Metrics,
            ev.metrics
                .as_ref()
                .map(|m| format!("Prometheus at {}", m.url)),
        ),
        status(
            EvidenceKind::Rbac,
            ev.rbac.as_ref().map(|r| {
                format!(
                    "{} ClusterRole(s), {} Role(s), {} ClusterRoleBinding(s), {} RoleBinding(s)",
                    r.cluster_roles.len(),
                    r.roles.len(),
                    r.cluster_role_bindings.len(),
                    r.role_bindings.len()
                )
            }),
        ),
    ];
    match &ev.changes {
        ChangeEvidence::AuditLog { path, log } => {
            out.push(status(
                EvidenceKind::AuditLog,
                Ok(format!("{path}: {} line(s)", log.lines)),
            ));
        }
        ChangeEvidence::Events(records) => {
            out.push(status(
                EvidenceKind::AuditLog,
                Err(&"no audit log given (--audit-log): changes come from the operator's Events, which name no user and expire".to_owned()),
            ));
            out.push(status(
                EvidenceKind::Events,
                Ok(format!(
                    "{} Event(s) about TimeServices and TenantTimePolicies",
                    records.len()
                )),
            ));
        }
        ChangeEvidence::Missing(why) => {
            out.push(status(EvidenceKind::AuditLog, Err(why)));
        }
    }
    out
}

/// Per TimeService with an egress tier, its egress nodes (`None`: unknown, the Node list was
/// not readable).
fn egress_nodes(
    ev: &Evidence,
    time_services: &BTreeMap<String, &TimeService>,
) -> BTreeMap<String, Option<BTreeSet<String>>> {
    time_services
        .iter()
        .filter_map(|(name, ts)| {
            let tier = ts.spec.egress_tier.as_ref()?;
            let nodes = ev.cluster_nodes.as_ref().ok().map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| {
                        tier.node_selector
                            .iter()
                            .all(|(k, v)| n.labels.get(k) == Some(v))
                    })
                    .map(|n| n.name.clone())
                    .collect()
            });
            Some((name.clone(), nodes))
        })
        .collect()
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// What one source of a node is.
enum SourceKind {
    /// A designated upstream of the node's TimeService.
    Upstream(String),
    /// An egress agent of the same TimeService, on this node.
    Tier(String, IpAddr),
    /// Anything else.
    Other,
}

fn sources(
    ev: &Evidence,
    time_services: &BTreeMap<String, &TimeService>,
    egress: &BTreeMap<String, Option<BTreeSet<String>>>,
) -> (Sources, BTreeMap<String, String>) {
    let designated = time_services
        .iter()
        .map(|(name, ts)| DesignatedSources {
            time_service: name.clone(),
            upstreams: ts
                .spec
                .upstreams
                .iter()
                .map(|u| format!("{}:{}", u.host, u.port))
                .collect(),
            egress_nodes: egress
                .get(name)
                .and_then(|n| n.as_ref())
                .map(|n| n.iter().cloned().collect())
                .unwrap_or_default(),
            fallback_to_upstreams: ts
                .spec
                .egress_tier
                .as_ref()
                .is_some_and(|t| t.fallback_to_upstreams),
        })
        .collect();
    let pod_ips: BTreeMap<(String, IpAddr), String> = ev
        .agent_pods
        .iter()
        .flat_map(|p| {
            p.ips
                .iter()
                .map(|ip| ((p.time_service.clone(), *ip), p.node.clone()))
        })
        .collect();
    let clocks: BTreeMap<String, &NodeClock> =
        ev.node_clocks.iter().map(|c| (c.name_any(), c)).collect();
    let mut stale = BTreeMap::new();
    for (node, clock) in &clocks {
        if let Some(why) = staleness(ev, clock, time_services) {
            stale.insert(node.clone(), why);
        }
    }
    let classify = |node: &str, ts_name: &str, name: &str, address: &str| -> SourceKind {
        let Some(ts) = time_services.get(ts_name) else {
            return SourceKind::Other;
        };
        let host = normalize_host(name);
        if let Some(u) = ts
            .spec
            .upstreams
            .iter()
            .find(|u| normalize_host(&u.host) == host)
        {
            return SourceKind::Upstream(format!("{}:{}", u.host, u.port));
        }
        if ts.spec.egress_tier.is_some() {
            let ip = address
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .or_else(|_| address.parse::<IpAddr>())
                .or_else(|_| name.parse::<IpAddr>());
            if let Ok(ip) = ip
                && let Some(peer) = pod_ips.get(&(ts_name.to_owned(), ip))
                && peer != node
                && egress
                    .get(ts_name)
                    .and_then(|e| e.as_ref())
                    .is_none_or(|e| e.contains(peer))
            {
                return SourceKind::Tier(peer.clone(), ip);
            }
        }
        SourceKind::Other
    };
    let mut nodes = Vec::new();
    let mut not_designated = Vec::new();
    let mut untraced = Vec::new();
    for (node, clock) in &clocks {
        let ts_name = clock.spec.time_service.clone();
        let ts = time_services.get(&ts_name);
        let is_egress = egress
            .get(&ts_name)
            .and_then(|e| e.as_ref())
            .is_some_and(|e| e.contains(node));
        let tier = ts.and_then(|t| t.spec.egress_tier.as_ref());
        let status = clock.status.clone().unwrap_or_default();
        let mut undesignated = Vec::new();
        let mut chain = vec![node.clone()];
        let mut problem = None;
        for s in &status.sources {
            let describe = || format!("{} ({}, {:?})", s.name, s.address, s.state);
            match classify(node, &ts_name, &s.name, &s.address) {
                // Behind an egress tier, only its agents (and, when allowed, the fallback)
                // may reach external sources.
                SourceKind::Upstream(_)
                    if tier.is_some_and(|t| !t.fallback_to_upstreams) && !is_egress =>
                {
                    undesignated.push(format!(
                        "{} (polls an upstream directly, bypassing the egress tier)",
                        describe()
                    ));
                }
                SourceKind::Other => undesignated.push(describe()),
                _ => {}
            }
        }
        let followed = status
            .sources
            .iter()
            .find(|s| s.state == SourceState::Selected)
            .or_else(|| {
                status
                    .sources
                    .iter()
                    .find(|s| s.state == SourceState::Combined)
            });
        if ts.is_none() {
            problem = Some(format!("its TimeService {ts_name} does not exist"));
        } else if let Some(why) = stale.get(node) {
            problem = Some(why.clone());
        } else if let Some(s) = followed {
            match classify(node, &ts_name, &s.name, &s.address) {
                SourceKind::Upstream(h) => chain.push(format!("upstream {h}")),
                SourceKind::Tier(peer, ip) => {
                    chain.push(format!("egress node {peer} ({ip})"));
                    // The egress agent's own choice completes the chain.
                    let up = clocks.get(&peer).and_then(|c| {
                        let st = c.status.as_ref()?;
                        let s = st
                            .sources
                            .iter()
                            .find(|s| s.state == SourceState::Selected)?;
                        match classify(&peer, &ts_name, &s.name, &s.address) {
                            SourceKind::Upstream(h) => Some(h),
                            _ => None,
                        }
                    });
                    match up {
                        Some(h) => chain.push(format!("upstream {h}")),
                        None => {
                            problem = Some(format!(
                                "egress node {peer} does not follow a designated upstream"
                            ))
                        }
                    }
                }
                SourceKind::Other => {
                    chain.push(format!("{} ({})", s.name, s.address));
                    problem = Some(format!("follows {} which is not designated", s.name));
                }
            }
        } else {
            problem = Some(if status.synchronized {
                "synchronized but reports no selected source".to_owned()
            } else {
                "not synchronized: follows no source now".to_owned()
            });
        }
        let traced = problem.is_none() && undesignated.is_empty();
        if !undesignated.is_empty() {
            not_designated.push(node.clone());
        } else if !traced {
            untraced.push(node.clone());
        }
        nodes.push(NodeTrace {
            node: node.clone(),
            time_service: ts_name,
            traced,
            chain,
            undesignated_sources: undesignated,
            problem,
        });
    }
    let without_agent = ev
        .cluster_nodes
        .as_ref()
        .map(|all| {
            all.iter()
                .filter(|n| !clocks.contains_key(&n.name))
                .map(|n| n.name.clone())
                .collect()
        })
        .unwrap_or_default();
    (
        Sources {
            designated,
            nodes,
            not_designated,
            untraced,
            without_agent,
        },
        stale,
    )
}

/// Why a NodeClock cannot be trusted as current, if it cannot.
fn staleness(
    ev: &Evidence,
    clock: &NodeClock,
    time_services: &BTreeMap<String, &TimeService>,
) -> Option<String> {
    let interval = time_services
        .get(&clock.spec.time_service)
        .map_or(30.0, |t| t.spec.reporting.interval.as_secs_f64());
    let last = clock.status.as_ref().and_then(|s| s.last_update.as_ref());
    let Some(last) = last else {
        return Some("its agent has never reported".to_owned());
    };
    let age = ev.generated_at.duration_since(last.0).as_secs_f64();
    (age > STALE_INTERVALS * interval).then(|| {
        format!(
            "its NodeClock was last updated {age:.0} s ago (more than {STALE_INTERVALS} reporting intervals): its agent may be down"
        )
    })
}

/// The tenant's TimeService: status, else spec, else the only one.
fn tenant_time_service(
    t: &TenantTimePolicy,
    time_services: &BTreeMap<String, &TimeService>,
) -> Option<String> {
    t.status
        .as_ref()
        .and_then(|s| s.time_service.clone())
        .or_else(|| t.spec.time_service_ref.clone())
        .or_else(|| {
            (time_services.len() == 1)
                .then(|| time_services.keys().next().cloned())
                .flatten()
        })
}

/// The tightest bound on a node of `ts`: the TimeService's selection.maxDistance and the
/// requirements.maxRootDistance of the tenants it serves (status with a port): a refused
/// tenant's demand binds no node, and each agent's `stratum_agent_offset_bound_seconds` is
/// this same figure from its config.
fn bound(
    ev: &Evidence,
    ts_name: &str,
    time_services: &BTreeMap<String, &TimeService>,
) -> Option<(f64, String)> {
    let mut best: Option<(f64, String)> = time_services.get(ts_name).map(|ts| {
        (
            ts.spec.selection.max_distance.as_secs_f64(),
            format!("TimeService {ts_name} selection.maxDistance"),
        )
    });
    for t in &ev.tenants {
        if tenant_time_service(t, time_services).as_deref() != Some(ts_name)
            || t.status.as_ref().and_then(|s| s.port).is_none()
        {
            continue;
        }
        if let Some(d) = &t.spec.requirements.max_root_distance {
            let v = d.as_secs_f64();
            if best.as_ref().is_none_or(|(b, _)| v < *b) {
                best = Some((
                    v,
                    format!(
                        "tenant {}/{} requirements.maxRootDistance",
                        t.namespace().unwrap_or_default(),
                        t.name_any()
                    ),
                ));
            }
        }
    }
    best
}

fn accuracy(
    ev: &Evidence,
    time_services: &BTreeMap<String, &TimeService>,
    stale: &BTreeMap<String, String>,
) -> Accuracy {
    let clocks: BTreeMap<String, &NodeClock> =
        ev.node_clocks.iter().map(|c| (c.name_any(), c)).collect();
    let allowed = ev.allowed_unsynchronized_seconds;
    let ts_of = |node: &str| -> String {
        clocks
            .get(node)
            .map(|c| c.spec.time_service.clone())
            .or_else(|| {
                (time_services.len() == 1)
                    .then(|| time_services.keys().next().cloned())
                    .flatten()
            })
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    match &ev.metrics {
        Ok(m) => {
            // Nodes gone since still count: they were part of the period.
            let names: BTreeSet<&String> = clocks.keys().chain(m.nodes.keys()).collect();
            for node in names {
                let ts = ts_of(node);
                let (bound_seconds, bound_from) = split_bound(bound(ev, &ts, time_services));
                let s = m.nodes.get(node).cloned().unwrap_or_default();
                let (check, reason) = period_check(&s, bound_seconds, allowed);
                rows.push(NodeAccuracy {
                    node: node.clone(),
                    time_service: ts,
                    max_abs_offset_seconds: s.max_abs_offset,
                    max_root_distance_seconds: s.max_root_distance,
                    unsynchronized_seconds: s.unsynchronized_seconds,
                    unreported_seconds: s.unreported_seconds,
                    bound_seconds,
                    bound_from,
                    check,
                    reason,
                });
            }
        }
        Err(_) => {
            for (node, clock) in &clocks {
                let ts = clock.spec.time_service.clone();
                let (bound_seconds, bound_from) = split_bound(bound(ev, &ts, time_services));
                let status = clock.status.clone().unwrap_or_default();
                let offset = status.offset_nanos.unsigned_abs() as f64 * 1e-9;
                let distance = status.root_delay_nanos as f64 * 0.5e-9
                    + status.root_dispersion_nanos as f64 * 1e-9;
                let (check, reason) = if let Some(why) = stale.get(node) {
                    (Check::Unknown, why.clone())
                } else if !status.synchronized {
                    (
                        Check::Exceeded,
                        "unsynchronized at this point in time".to_owned(),
                    )
                } else {
                    match exceeded(offset, distance, bound_seconds) {
                        Some(why) => (Check::Exceeded, format!("{why}, at this point in time")),
                        None => (
                            Check::Within,
                            "within bounds at this point in time only; the rest of the period is not evidenced".to_owned(),
                        ),
                    }
                };
                rows.push(NodeAccuracy {
                    node: node.clone(),
                    time_service: ts,
                    max_abs_offset_seconds: Some(offset),
                    max_root_distance_seconds: Some(distance),
                    unsynchronized_seconds: None,
                    unreported_seconds: None,
                    bound_seconds,
                    bound_from,
                    check,
                    reason,
                });
            }
        }
    }
    let (basis, source, queries) = match &ev.metrics {
        Ok(m) => (
            AccuracyBasis::Period,
            format!("Prometheus at {}", m.url),
            m.queries.clone(),
        ),
        Err(_) => (
            AccuracyBasis::PointInTime,
            "NodeClock status (point in time)".to_owned(),
            Vec::new(),
        ),
    };
    Accuracy {
        basis,
        source,
        queries,
        allowed_unsynchronized_seconds: allowed,
        nodes: rows,
    }
}

fn split_bound(b: Option<(f64, String)>) -> (Option<f64>, String) {
    match b {
        Some((v, from)) => (Some(v), from),
        None => (
            None,
            "no TimeService bound (its TimeService does not exist)".to_owned(),
        ),
    }
}

fn exceeded(offset: f64, distance: f64, bound: Option<f64>) -> Option<String> {
    let b = bound?;
    if offset > b {
        Some(format!(
            "|offset| {} exceeds the bound {}",
            secs(offset),
            secs(b)
        ))
    } else if distance > b {
        Some(format!(
            "root distance {} exceeds the bound {}",
            secs(distance),
            secs(b)
        ))
    } else {
        None
    }
}

fn period_check(s: &NodeSeries, bound: Option<f64>, allowed: f64) -> (Check, String) {
    let (Some(offset), Some(distance)) = (s.max_abs_offset, s.max_root_distance) else {
        return (
            Check::Unknown,
            "Prometheus has no offset or root distance samples of this node in the period".into(),
        );
    };
    if let Some(why) = exceeded(offset, distance, bound) {
        return (Check::Exceeded, why);
    }
    match (s.unsynchronized_seconds, s.unreported_seconds) {
        (Some(u), _) if u > allowed => (
            Check::Exceeded,
            format!("unsynchronized for {} (allowed {})", secs(u), secs(allowed)),
        ),
        (None, _) | (_, None) => (
            Check::Unknown,
            "Prometheus has no synchronization samples of this node in the period".into(),
        ),
        (_, Some(r)) if r > allowed => (
            Check::Unknown,
            format!(
                "no reports for {} of the period (allowed {})",
                secs(r),
                secs(allowed)
            ),
        ),
        _ => (Check::Within, "within bounds for the whole period".into()),
    }
}

/// Seconds for people: "1.5 ms", "2.000 s".
pub fn secs(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0 s".into()
    } else if a < 1e-3 {
        format!("{:.1} µs", v * 1e6)
    } else if a < 1.0 {
        format!("{:.3} ms", v * 1e3)
    } else {
        format!("{v:.3} s")
    }
}

fn tenant_rows(ev: &Evidence, time_services: &BTreeMap<String, &TimeService>) -> Vec<TenantRow> {
    let counts = ev.metrics.as_ref().ok().map(|m| &m.tenants);
    let mut rows: Vec<TenantRow> = ev
        .tenants
        .iter()
        .map(|t| {
            let ns = t.namespace().unwrap_or_default();
            let id = format!("{ns}/{}", t.name_any());
            let status = t.status.clone().unwrap_or_default();
            let auth = t.spec.authentication.as_ref();
            let mut methods = Vec::new();
            // Whether time without authentication is still served matters to an auditor.
            let required = auth.is_some_and(|a| {
                a.unauthenticated
                    .is_some_and(|u| u != stratum_api::agent_config::Unauthenticated::Serve)
            });
            if auth.is_some_and(|a| a.nts) {
                methods.push(if required {
                    "NTS (required)"
                } else {
                    "NTS (offered)"
                });
            }
            if auth.is_some_and(|a| a.symmetric_keys_secret.is_some()) {
                methods.push("symmetric keys");
            }
            let c = counts.map(|c| c.get(&id).copied().unwrap_or_default());
            TenantRow {
                time_service: tenant_time_service(t, time_services),
                service: format!("{ns}/{}", t.spec.service.name),
                port: status.port,
                allow_list_size: status.allow_list_size,
                ready_endpoints: status.ready_endpoints,
                max_root_distance_seconds: t
                    .spec
                    .requirements
                    .max_root_distance
                    .map(|d| d.as_secs_f64()),
                authentication: if methods.is_empty() {
                    "none".into()
                } else {
                    methods.join(", ")
                },
                served: c.map(|c| c.served),
                refused: c.map(|c| c.refused),
                tenant: id,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    rows
}

fn access(ev: &Evidence) -> Access {
    match &ev.rbac {
        Ok(objects) => {
            let principals = rbac::principals(objects);
            let mut notes = vec![
                "members of the group system:masters bypass RBAC and may change everything; they are not listed".to_owned(),
                "anyone who may create or change RoleBindings or ClusterRoleBindings (or impersonate) may grant themselves these rights".to_owned(),
            ];
            for p in &principals {
                if is_everyone(p) {
                    notes.push(format!(
                        "{} {} is everyone: any user may change the time configuration",
                        p.kind, p.name
                    ));
                }
            }
            Access {
                evidenced: true,
                principals,
                notes,
            }
        }
        Err(why) => Access {
            evidenced: false,
            principals: Vec::new(),
            notes: vec![why.clone()],
        },
    }
}

fn is_everyone(p: &PrincipalAccess) -> bool {
    (p.kind == "Group" && rbac::EVERYONE_GROUPS.contains(&p.name.as_str()))
        || (p.kind == "User" && p.name == "system:anonymous")
}

fn changes(ev: &Evidence) -> Changes {
    let in_period = |r: &ChangeRecord| {
        r.time
            .parse::<Timestamp>()
            .is_ok_and(|t| t >= ev.since && t <= ev.until)
    };
    match &ev.changes {
        ChangeEvidence::AuditLog { log, .. } => {
            let (records, outside): (Vec<_>, Vec<_>) =
                log.changes.iter().cloned().partition(|r| in_period(r));
            Changes {
                source: ChangeSource::AuditLog,
                records,
                problems: log.problems.clone(),
                problems_omitted: log.problems_omitted,
                lines_read: log.lines,
                ignored: log.ignored,
                outside_period: outside.len(),
            }
        }
        ChangeEvidence::Events(all) => {
            let (records, outside): (Vec<_>, Vec<_>) =
                all.iter().cloned().partition(|r| in_period(r));
            Changes {
                source: ChangeSource::Events,
                records,
                problems: Vec::new(),
                problems_omitted: 0,
                lines_read: 0,
                ignored: 0,
                outside_period: outside.len(),
            }
        }
        ChangeEvidence::Missing(_) => Changes {
            source: ChangeSource::None,
            records: Vec::new(),
            problems: Vec::new(),
            problems_omitted: 0,
            lines_read: 0,
            ignored: 0,
            outside_period: 0,
        },
    }
}

/// Checks of one control.
#[derive(Default)]
struct Findings {
    failed: Vec<String>,
    missing: Vec<String>,
    passed: Vec<String>,
}

impl Findings {
    fn result(
        self,
        control: &str,
        requirement: &str,
        evidence: Vec<EvidenceKind>,
    ) -> ControlResult {
        let verdict = if !self.failed.is_empty() {
            Verdict::Fail
        } else if !self.missing.is_empty() {
            Verdict::NotEvidenced
        } else {
            Verdict::Pass
        };
        let mut reasons: Vec<String> = self
            .failed
            .into_iter()
            .map(|r| format!("FAILED: {r}"))
            .collect();
        reasons.extend(
            self.missing
                .into_iter()
                .map(|r| format!("NOT EVIDENCED: {r}")),
        );
        reasons.extend(self.passed.into_iter().map(|r| format!("ok: {r}")));
        ControlResult {
            control: control.to_owned(),
            requirement: requirement.to_owned(),
            verdict,
            reasons,
            evidence,
        }
    }
}

fn names(list: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text = list
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOWN {
        text.push_str(&format!(" and {} more", list.len() - SHOWN));
    }
    text
}

/// Synchronization checks (10.6.1, A.8.17).
fn synchronization(ev: &Evidence, sources: &Sources, accuracy: &Accuracy, f: &mut Findings) {
    if ev.time_services.is_empty() {
        f.failed
            .push("no TimeService exists: nothing synchronizes the node clocks".into());
    }
    for ts in &ev.time_services {
        let d = &ts.spec.discipline;
        if d.mode == DisciplineMode::Monitor {
            f.failed.push(format!(
                "TimeService {} is in mode Monitor: its agents measure the clocks but never correct them",
                ts.name_any()
            ));
        } else if matches!(
            d.clock,
            Some(ClockSource::Readonly) | Some(ClockSource::Simulated)
        ) {
            f.failed.push(format!(
                "TimeService {} uses clock {:?}: node clocks are not corrected",
                ts.name_any(),
                d.clock.unwrap_or(ClockSource::System)
            ));
        }
    }
    match &ev.cluster_nodes {
        Ok(_) if !sources.without_agent.is_empty() => f.missing.push(format!(
            "nodes without a Stratum agent (nothing shows their clocks are synchronized): {}",
            names(&sources.without_agent)
        )),
        Ok(all) => f.passed.push(format!(
            "every one of the {} node(s) runs a Stratum agent",
            all.len()
        )),
        Err(why) => f
            .missing
            .push(format!("nodes without an agent cannot be found: {why}")),
    }
    let unsynchronized: Vec<String> = accuracy
        .nodes
        .iter()
        .filter(|n| n.check == Check::Exceeded && (n.reason.starts_with("unsynchronized")))
        .map(|n| format!("{} ({})", n.node, n.reason))
        .collect();
    if !unsynchronized.is_empty() {
        f.failed.push(format!(
            "nodes not synchronized: {}",
            names(&unsynchronized)
        ));
    }
    period_evidence(ev, accuracy, f);
}

/// What the accuracy rows leave unknown, and whether they cover the period.
fn period_evidence(ev: &Evidence, accuracy: &Accuracy, f: &mut Findings) {
    let unknown: Vec<String> = accuracy
        .nodes
        .iter()
        .filter(|n| n.check == Check::Unknown)
        .map(|n| format!("{} ({})", n.node, n.reason))
        .collect();
    if !unknown.is_empty() {
        f.missing
            .push(format!("no figures for: {}", names(&unknown)));
    }
    match &ev.metrics {
        Err(why) => f.missing.push(format!(
            "the period is not evidenced: {why}; the NodeClocks show only the present"
        )),
        Ok(_) if accuracy.nodes.is_empty() => {
            f.missing
                .push("Prometheus has no agent series in the period".into());
        }
        Ok(_) => {
            let within = accuracy
                .nodes
                .iter()
                .filter(|n| n.check == Check::Within)
                .count();
            f.passed.push(format!(
                "{within} of {} node(s) synchronized and within bounds for the whole period (allowed unsynchronized {})",
                accuracy.nodes.len(),
                secs(accuracy.allowed_unsynchronized_seconds)
            ));
        }
    }
}

/// Source checks (10.6.2, A.8.17).
fn designation(sources: &Sources, f: &mut Findings) {
    if sources.designated.iter().all(|d| d.upstreams.is_empty()) {
        f.failed
            .push("no designated upstreams: no TimeService names any".into());
    }
    for n in &sources.nodes {
        if !n.undesignated_sources.is_empty() {
            f.failed.push(format!(
                "node {} takes time from sources that are not designated: {}",
                n.node,
                n.undesignated_sources.join("; ")
            ));
        }
    }
    let untraced: Vec<String> = sources
        .nodes
        .iter()
        .filter(|n| sources.untraced.contains(&n.node))
        .map(|n| {
            format!(
                "{} ({})",
                n.node,
                n.problem.as_deref().unwrap_or("not traced")
            )
        })
        .collect();
    if !untraced.is_empty() {
        f.missing.push(format!(
            "reference chain not traced to a designated upstream: {}",
            names(&untraced)
        ));
    }
    let traced = sources.nodes.iter().filter(|n| n.traced).count();
    if traced > 0 {
        f.passed.push(format!(
            "{traced} node(s) trace their time to a designated upstream: {}",
            sources
                .designated
                .iter()
                .flat_map(|d| d.upstreams.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

fn controls(
    ev: &Evidence,
    sources: &Sources,
    accuracy: &Accuracy,
    access: &Access,
    changes: &Changes,
) -> Vec<ControlResult> {
    let mut c1 = Findings::default();
    synchronization(ev, sources, accuracy, &mut c1);

    let mut c2 = Findings::default();
    designation(sources, &mut c2);
    let out_of_bounds: Vec<String> = accuracy
        .nodes
        .iter()
        .filter(|n| n.check == Check::Exceeded && !n.reason.starts_with("unsynchronized"))
        .map(|n| format!("{} ({}; bound from {})", n.node, n.reason, n.bound_from))
        .collect();
    if !out_of_bounds.is_empty() {
        c2.failed.push(format!(
            "time outside its bounds: {}",
            names(&out_of_bounds)
        ));
    }
    period_evidence(ev, accuracy, &mut c2);

    let mut c3 = Findings::default();
    if access.evidenced {
        let everyone: Vec<String> = access
            .principals
            .iter()
            .filter(|p| is_everyone(p))
            .map(|p| format!("{} {}", p.kind, p.name))
            .collect();
        if everyone.is_empty() {
            c3.passed.push(format!(
                "{} principal(s) may change TimeServices or TenantTimePolicies, listed under Access for review",
                access.principals.len()
            ));
        } else {
            c3.failed.push(format!(
                "every user may change the time configuration through {}",
                everyone.join(", ")
            ));
        }
    } else {
        c3.missing.push(format!(
            "who may change the time configuration is unknown: {}",
            access.notes.join("; ")
        ));
    }
    let refused = changes
        .records
        .iter()
        .filter(|r| matches!(r.outcome, ChangeOutcome::Refused { .. }))
        .count();
    match (&ev.changes, changes.source) {
        (ChangeEvidence::AuditLog { log, .. }, _) => {
            c3.passed.push(format!(
                "the API server's audit log records {} change(s) in the period with their users ({refused} refused)",
                changes.records.len()
            ));
            let unreadable = changes.problems.len() + changes.problems_omitted;
            if unreadable > 0 {
                c3.missing.push(format!(
                    "{unreadable} audit log line(s) could not be read: changes on them are not evidenced"
                ));
            }
            if let Some(first) = log.first_event
                && first > ev.since
            {
                c3.missing.push(format!(
                    "the audit log begins at {first}, after the period's start: earlier changes are not evidenced"
                ));
            }
        }
        (ChangeEvidence::Events(_), _) => c3.missing.push(
            "no audit log (--audit-log): the operator's Events name no user and expire after about an hour, so who changed what is not evidenced".into(),
        ),
        (ChangeEvidence::Missing(why), _) => c3.missing.push(format!("no record of changes: {why}")),
    }

    let mut c4 = Findings::default();
    designation(sources, &mut c4);
    synchronization(ev, sources, accuracy, &mut c4);
    if !out_of_bounds.is_empty() {
        c4.failed.push(format!(
            "time outside its bounds: {}",
            names(&out_of_bounds)
        ));
    }

    use EvidenceKind::*;
    let change_kind = match changes.source {
        ChangeSource::Events => Events,
        _ => AuditLog,
    };
    vec![
        c1.result(
            "PCI DSS 10.6.1",
            "System clocks and time are synchronized using time-synchronization technology.",
            vec![ClusterState, Nodes, Metrics],
        ),
        c2.result(
            "PCI DSS 10.6.2",
            "Systems are configured to the correct and consistent time: designated time servers are in use and internal systems receive time only from them.",
            vec![ClusterState, Metrics],
        ),
        c3.result(
            "PCI DSS 10.6.3",
            "Time synchronization settings and data are protected: access is restricted and changes are logged for review.",
            vec![Rbac, change_kind],
        ),
        c4.result(
            "ISO 27001:2022 A.8.17",
            "Clocks of information processing systems are synchronized to approved time sources.",
            vec![ClusterState, Nodes, Metrics],
        ),
    ]
}
