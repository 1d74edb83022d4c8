//! The IO of `stratumctl report`: reads the evidence from the API server (the user's
//! kubeconfig), Prometheus and the audit log file into an [`Evidence`]. Evidence the user
//! cannot read (RBAC forbids it, Prometheus is down) becomes "missing, because …"; only the
//! Stratum objects themselves are required.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use stratum_api::{NodeClock, TenantTimePolicy, TimeService};

use super::audit_log;
use super::builder::{
    AgentPod, ChangeEvidence, ClusterNode, Evidence, Evidenced, MetricsEvidence, NodeSeries,
    TenantCounts,
};
use super::model::{Baseline, ChangeOutcome, ChangeRecord};
use super::prometheus::{self, PromError};
use super::rbac::RbacObjects;

/// Label of every agent pod (the operator's `names::agent_labels`).
const AGENT_POD_SELECTOR: &str = "app.kubernetes.io/name=stratum-agent";
/// Label naming an agent pod's TimeService.
const TIME_SERVICE_LABEL: &str = "stratum.io/time-service";
/// Longest a Prometheus query may take.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest Prometheus answer read.
const PROMETHEUS_MAX_BODY: usize = 64 * 1024 * 1024;

/// What the report is asked to cover and where its optional evidence is.
#[derive(Clone, Debug)]
pub struct Request {
    /// Start of the period.
    pub since: Timestamp,
    /// End of the period.
    pub until: Timestamp,
    /// Prometheus base URL (`http://host:9090`).
    pub prometheus: Option<String>,
    /// The API server's audit log (JSON lines).
    pub audit_log: Option<std::path::PathBuf>,
    /// Allowed unsynchronized time per node, seconds.
    pub allowed_unsynchronized_seconds: f64,
}

/// A failure that stops the report.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No usable kubeconfig or in-cluster config.
    #[error("connecting to the cluster (kubeconfig or in-cluster config)")]
    Client(#[source] kube::Error),
    /// A required list failed.
    #[error("listing {what} (the report needs to read Stratum's objects)")]
    List {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The audit log could not be opened.
    #[error("opening the audit log {path}")]
    AuditLog {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Gathers every piece of evidence. Fails only when the cluster or Stratum's objects cannot
/// be read, or the audit log named cannot be opened.
pub async fn gather(req: &Request) -> Result<Evidence, FetchError> {
    let client = Client::try_default().await.map_err(FetchError::Client)?;
    let lp = ListParams::default();
    let list = |what: &'static str| move |source| FetchError::List { what, source };
    let time_services = Api::<TimeService>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list("TimeServices"))?
        .items;
    let tenants = Api::<TenantTimePolicy>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list("TenantTimePolicies"))?
        .items;
    let node_clocks = Api::<NodeClock>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list("NodeClocks"))?
        .items;
    let agent_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(AGENT_POD_SELECTOR))
        .await
        .map_err(list("the agent pods"))?
        .items
        .into_iter()
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let time_service = p.labels().get(TIME_SERVICE_LABEL)?.clone();
            let ips = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
                .unwrap_or_default();
            Some(AgentPod {
                node,
                time_service,
                ips,
            })
        })
        .collect();
    let cluster_nodes =
        optional(Api::<Node>::all(client.clone()).list(&lp).await, "Nodes").map(|nodes| {
            nodes
                .into_iter()
                .map(|n| ClusterNode {
                    name: n.name_any(),
                    labels: n.metadata.labels.unwrap_or_default(),
                })
                .collect()
        });
    let rbac = rbac(&client).await;
    let changes = match &req.audit_log {
        Some(path) => read_audit_log(path)?,
        None => events(&client).await,
    };
    let metrics = match &req.prometheus {
        Some(url) => metrics(url, req.since, req.until)
            .await
            .map_err(|e| format!("Prometheus at {url} could not be queried: {e}")),
        None => Err("no Prometheus given (--prometheus URL)".to_owned()),
    };
    Ok(Evidence {
        generated_at: Timestamp::now(),
        since: req.since,
        until: req.until,
        time_services,
        tenants,
        node_clocks,
        agent_pods,
        cluster_nodes,
        rbac,
        changes,
        metrics,
        allowed_unsynchronized_seconds: req.allowed_unsynchronized_seconds,
    })
}

/// A list the report can do without: its failure becomes the reason it is missing.
fn optional<K>(r: Result<kube::core::ObjectList<K>, kube::Error>, what: &str) -> Evidenced<Vec<K>>
where
    K: Clone,
{
    r.map(|l| l.items).map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 403 => {
            format!("not allowed to list {what} ({})", s.message)
        }
        _ => format!("listing {what} failed: {e}"),
    })
}

async fn rbac(client: &Client) -> Evidenced<RbacObjects> {
    let lp = ListParams::default();
    Ok(RbacObjects {
        cluster_roles: optional(
            Api::<ClusterRole>::all(client.clone()).list(&lp).await,
            "ClusterRoles",
        )?,
        roles: optional(Api::<Role>::all(client.clone()).list(&lp).await, "Roles")?,
        cluster_role_bindings: optional(
            Api::<ClusterRoleBinding>::all(client.clone())
                .list(&lp)
                .await,
            "ClusterRoleBindings",
        )?,
        role_bindings: optional(
            Api::<RoleBinding>::all(client.clone()).list(&lp).await,
            "RoleBindings",
        )?,
    })
}

fn read_audit_log(path: &Path) -> Result<ChangeEvidence, FetchError> {
    let file = std::fs::File::open(path).map_err(|source| FetchError::AuditLog {
        path: path.display().to_string(),
        source,
    })?;
    Ok(ChangeEvidence::AuditLog {
        path: path.display().to_string(),
        log: audit_log::read(BufReader::new(file)),
    })
}

/// The Events about TimeServices and TenantTimePolicies, as change records without a user.
async fn events(client: &Client) -> ChangeEvidence {
    let mut records = Vec::new();
    for kind in ["TimeService", "TenantTimePolicy"] {
        let lp = ListParams::default().fields(&format!("involvedObject.kind={kind}"));
        let events = match optional(Api::<Event>::all(client.clone()).list(&lp).await, "Events") {
            Ok(e) => e,
            Err(why) => {
                return ChangeEvidence::Missing(format!("no audit log (--audit-log), and {why}"));
            }
        };
        records.extend(events.into_iter().filter_map(event_record));
    }
    records.sort_by(|a, b| a.time.cmp(&b.time));
    ChangeEvidence::Events(records)
}

/// An Event as a change record: who is not known, what is the Event's reason and note.
pub fn event_record(e: Event) -> Option<ChangeRecord> {
    let time = e
        .event_time
        .map(|t| t.0)
        .or(e.last_timestamp.map(|t| t.0))
        .or(e.first_timestamp.map(|t| t.0))
        .or(e.metadata.creation_timestamp.map(|t| t.0))?;
    let object = e.involved_object;
    Some(ChangeRecord {
        time: time.to_string(),
        user: String::new(),
        impersonated_user: None,
        verb: e.reason.unwrap_or_default(),
        kind: object.kind.unwrap_or_default(),
        namespace: object.namespace.filter(|n| !n.is_empty()),
        name: object.name.unwrap_or_default(),
        outcome: ChangeOutcome::Observed,
        baseline: Baseline::Unknown,
        fields: Vec::new(),
        fields_omitted: 0,
        note: e.message.map(|m| stratum_api::diff::cut(&m, 1000)),
        source_line: None,
        audit_id: None,
    })
}

/// Why a Prometheus query failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The URL is not one this client can use.
    #[error("{0}")]
    Url(String),
    /// HTTP failed.
    #[error("HTTP request failed: {0}")]
    Http(String),
    /// No answer in time.
    #[error("no answer within {PROMETHEUS_TIMEOUT:?}")]
    Timeout,
    /// The answer was not usable.
    #[error(transparent)]
    Answer(#[from] PromError),
}

async fn metrics(
    url: &str,
    since: Timestamp,
    until: Timestamp,
) -> Result<MetricsEvidence, MetricsError> {
    let base = url.trim_end_matches('/');
    if !base.starts_with("http://") {
        return Err(MetricsError::Url(format!(
            "{url}: only http:// URLs are supported (for HTTPS, reach Prometheus through kubectl port-forward)"
        )));
    }
    let window = u64::try_from(until.duration_since(since).as_secs())
        .unwrap_or(0)
        .max(1);
    let end = until.as_second();
    let start = since.as_second();
    let step = prometheus::range_step_seconds(window);
    let offset_q = prometheus::max_abs_offset_query(window);
    let distance_q = prometheus::max_root_distance_query(window);
    let sync_q = prometheus::synchronized_query();
    let tenants_q = prometheus::tenant_requests_query(window);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let get = |path: String| {
        let client = client.clone();
        async move {
            let uri: hyper::Uri = format!("{base}{path}")
                .parse()
                .map_err(|e| MetricsError::Url(format!("{url}: {e}")))?;
            let response = tokio::time::timeout(PROMETHEUS_TIMEOUT, client.get(uri))
                .await
                .map_err(|_| MetricsError::Timeout)?
                .map_err(|e| MetricsError::Http(e.to_string()))?;
            let status = response.status();
            let body = tokio::time::timeout(
                PROMETHEUS_TIMEOUT,
                Limited::new(response.into_body(), PROMETHEUS_MAX_BODY).collect(),
            )
            .await
            .map_err(|_| MetricsError::Timeout)?
            .map_err(|e| MetricsError::Http(e.to_string()))?
            .to_bytes();
            // Prometheus answers query errors with 4xx and a JSON body that says why.
            if !status.is_success() && !status.is_client_error() {
                return Err(MetricsError::Http(format!("HTTP status {status}")));
            }
            Ok::<Bytes, MetricsError>(body)
        }
    };
    let instant = |q: &str| {
        format!(
            "/api/v1/query?query={}&time={end}",
            prometheus::percent_encode(q)
        )
    };
    let offsets = prometheus::parse_vector(&get(instant(&offset_q)).await?, "node")?;
    let distances = prometheus::parse_vector(&get(instant(&distance_q)).await?, "node")?;
    let sync = prometheus::parse_sync_matrix(
        &get(format!(
            "/api/v1/query_range?query={}&start={start}&end={end}&step={step}",
            prometheus::percent_encode(&sync_q)
        ))
        .await?,
        start,
        end,
        step,
    )?;
    let requests =
        prometheus::parse_vector2(&get(instant(&tenants_q)).await?, "tenant", "outcome")?;
    let mut nodes: BTreeMap<String, NodeSeries> = BTreeMap::new();
    for (node, v) in offsets {
        nodes.entry(node).or_default().max_abs_offset = Some(v);
    }
    for (node, v) in distances {
        nodes.entry(node).or_default().max_root_distance = Some(v);
    }
    for (node, (unsync, unreported)) in sync {
        let n = nodes.entry(node).or_default();
        n.unsynchronized_seconds = Some(unsync);
        n.unreported_seconds = Some(unreported);
    }
    let mut tenants: BTreeMap<String, TenantCounts> = BTreeMap::new();
    for ((tenant, outcome), v) in requests {
        let c = tenants.entry(tenant).or_default();
        // increase() extrapolates to fractions; counts are whole.
        let n = v.round().max(0.0) as u64;
        match outcome.as_str() {
            "served" | "served_unsynchronized" => c.served += n,
            "denied" | "rate_limited" => c.refused += n,
            _ => {}
        }
    }
    Ok(MetricsEvidence {
        url: url.to_owned(),
        queries: vec![
            offset_q,
            distance_q,
            format!("{sync_q} (range {start}..{end}, step {step}s)"),
            tenants_q,
        ],
        nodes,
        tenants,
    })
}
