//! The controllers: thin reconcilers (plan from a read of the index, apply with server-side
//! apply, write status only when it changed) and the wiring of watches into the index and of
//! the index's triggers into the controllers. Only the wiring writes the index.

pub mod tenant;
pub mod time_service;
pub mod wiring;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stratum_api::{AgentConfig, TenantTimePolicy, TimeService};

use crate::build::OperatorSettings;
use crate::coalesce::Coalescer;
use crate::error::{Error, Result};
use crate::index::{Index, Triggers};
use crate::metrics::Metrics;
use crate::names;
use crate::owned::{ChildKind, ChildRef};
use crate::plan::Planner;

/// How often a reconciled object is revisited with no trigger: repairs drift of children and
/// refreshes offsets in status.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Where index triggers go.
#[derive(Clone, Debug)]
pub struct TriggerSenders {
    /// TimeService controller.
    pub time_services: UnboundedSender<ObjectRef<DeserializeGuard<TimeService>>>,
    /// Tenant controller.
    pub tenants: UnboundedSender<ObjectRef<DeserializeGuard<TenantTimePolicy>>>,
}

impl TriggerSenders {
    /// Sends every trigger; a closed channel means shutdown and is ignored.
    pub fn send(&self, triggers: Triggers) {
        for ts in triggers.time_services {
            let _ = self.time_services.unbounded_send(ObjectRef::new(&ts));
        }
        for (ns, name) in triggers.tenants {
            let _ = self
                .tenants
                .unbounded_send(ObjectRef::new(&name).within(&ns));
        }
    }
}

/// State shared by the reconcilers.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Operator deployment settings.
    pub settings: OperatorSettings,
    /// The index every reconcile reads and only the watch feed writes. A std mutex: never
    /// held across an await.
    pub index: Arc<Mutex<Index>>,
    /// Every planning cache. Locked before `index` whenever both are (one order, no deadlock);
    /// a TimeService plan holds it, not the index, while it encodes the agent config.
    pub planner: Mutex<Planner>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event recorder (`None` disables events, e.g. in API tests).
    pub recorder: Option<Recorder>,
    /// Agent config write coalescing.
    pub coalescer: Mutex<Coalescer>,
    /// Last agent config written per TimeService: the baseline of the audit trail.
    pub last_config: Mutex<HashMap<String, AgentConfig>>,
    /// Last `TZ` applied per tenant (`namespace/name`; `None`: unset): the baseline of its
    /// time zone Events.
    pub last_timezone: Mutex<HashMap<String, Option<String>>>,
    /// Revision written per TimeService and when, until every agent reports it.
    pub propagation: Mutex<HashMap<String, (String, Instant)>>,
    /// Consecutive transient failures per object, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// NetworkPolicies applied per TimeService, to delete the ones a smaller plan drops.
    pub network_policies: Mutex<HashMap<String, usize>>,
    /// Nodes off the designated sources per TimeService, as last planned: the baseline of
    /// their Events and the sum behind `stratum_operator_nodes_off_designated_sources`.
    pub off_designated: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// What became of each NTS tenant's certificate at the last key material write of its
    /// TimeService, per TimeService: read by the tenant reconcile for its `NTSReady`
    /// condition (a tenant not listed is still waiting for that write).
    pub nts_outcomes: Mutex<HashMap<String, NtsOutcomes>>,
    /// The same for each symmetric-key tenant's keys (its `SymmetricKeysReady` condition).
    pub key_outcomes: Mutex<HashMap<String, KeyOutcomes>>,
    /// Each TimeService's upstream key Secrets at its last key material write, by Secret
    /// name: the baseline of their Events.
    pub upstream_key_outcomes: Mutex<HashMap<String, UpstreamKeyOutcomes>>,
    /// Where a reconciler sends the triggers it causes (tenants a TimeService plan shed or
    /// took back); set once the wiring runs, unset in tests that call a reconciler directly.
    pub triggers: OnceLock<TriggerSenders>,
}

/// Each NTS tenant's certificate outcome at its TimeService's last key material write.
pub type NtsOutcomes = std::collections::BTreeMap<
    crate::ports::TenantKey,
    std::result::Result<(), crate::build::nts_material::CertificateProblem>,
>;

/// Each symmetric-key tenant's keys outcome at its TimeService's last key material write.
pub type KeyOutcomes = MaterialOutcomes<crate::build::nts_material::KeysProblem>;

/// Each upstream key Secret's outcome, by Secret name.
pub type UpstreamKeyOutcomes = std::collections::BTreeMap<
    String,
    std::result::Result<(), crate::build::nts_material::KeysProblem>,
>;

/// Each tenant's outcome of one kind of key material (`P`: what went wrong).
pub type MaterialOutcomes<P> =
    std::collections::BTreeMap<crate::ports::TenantKey, std::result::Result<(), P>>;

impl Context {
    /// A context with the default coalescing interval (1 s).
    pub fn new(
        client: Client,
        settings: OperatorSettings,
        index: Arc<Mutex<Index>>,
        metrics: Arc<Metrics>,
        recorder: Option<Recorder>,
    ) -> Self {
        Self {
            client,
            settings,
            index,
            planner: Mutex::new(Planner::new()),
            metrics,
            recorder,
            coalescer: Mutex::new(Coalescer::new(Duration::from_secs(1))),
            last_config: Mutex::new(HashMap::new()),
            last_timezone: Mutex::new(HashMap::new()),
            propagation: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            network_policies: Mutex::new(HashMap::new()),
            off_designated: Mutex::new(HashMap::new()),
            nts_outcomes: Mutex::new(HashMap::new()),
            key_outcomes: Mutex::new(HashMap::new()),
            upstream_key_outcomes: Mutex::new(HashMap::new()),
            triggers: OnceLock::new(),
        }
    }

    /// What to do after `error` on object `key`: user errors wait for a change; transient
    /// ones retry after 1 s, doubling per consecutive failure up to 5 minutes.
    pub fn error_action(&self, key: &str, error: &Error) -> Action {
        if error.is_user_error() {
            return Action::await_change();
        }
        let mut failures = lock(&self.failures);
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        Action::requeue(backoff(*n))
    }

    /// Forgets the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        lock(&self.failures).remove(key);
    }

    /// Publishes an event; failures are logged, never fail a reconcile.
    pub async fn event(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, reference).await {
            tracing::warn!(error = %e, reason, "publishing event failed");
        }
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the index is rebuilt
/// from watches anyway).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Server-side apply parameters: our field manager, taking ownership of conflicting fields.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(names::FIELD_MANAGER).force()
}

/// Applies a namespaced child.
pub async fn apply_namespaced<K>(client: &Client, obj: &K) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let ns = obj
        .meta()
        .namespace
        .as_deref()
        .ok_or(Error::MissingMetadata("child namespace"))?;
    let name = obj
        .meta()
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("child name"))?;
    Ok(Api::<K>::namespaced(client.clone(), ns)
        .patch(name, &apply_params(), &Patch::Apply(obj))
        .await?)
}

/// Applies a cluster-scoped child.
pub async fn apply_cluster<K>(client: &Client, obj: &K) -> Result<K>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = obj
        .meta()
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("child name"))?;
    Ok(Api::<K>::all(client.clone())
        .patch(name, &apply_params(), &Patch::Apply(obj))
        .await?)
}

/// Deletes a child the cache saw as Stratum's, only if it is still that object (its uid is
/// the precondition): an object someone else put in its place meanwhile is left alone. Gone
/// already is fine.
pub async fn delete_child(client: &Client, child: &ChildRef) -> Result<()> {
    let params = DeleteParams {
        preconditions: child.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    let ns = &child.namespace;
    let result = match child.kind {
        ChildKind::Service => Api::<Service>::namespaced(client.clone(), ns)
            .delete(&child.name, &params)
            .await
            .map(|_| ()),
        ChildKind::EndpointSlice => Api::<EndpointSlice>::namespaced(client.clone(), ns)
            .delete(&child.name, &params)
            .await
            .map(|_| ()),
        ChildKind::ConfigMap => Api::<ConfigMap>::namespaced(client.clone(), ns)
            .delete(&child.name, &params)
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => {
            tracing::info!(child = %child, "deleted a child its plan no longer has");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::info!(child = %child, "not deleted: it was replaced by another object");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Delay before retry number `n` (1-based): 1 s doubling, at most 5 minutes.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(MAX_RETRY)
}

/// Longest retry delay.
pub const MAX_RETRY: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_retries_back_off_exponentially_to_five_minutes() {
        let delays: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }
}
