//! The operator's view of the cluster: pure, synchronous indexes fed by watch events (the
//! [`crate::model`] facts, plus tenants, port allocations, NodeClock freshness and tenant
//! children) and read by every plan. Its state is private: reads take `&self`, and each write
//! (`apply_*`, `delete_*`, [`Index::sweep`]) returns the [`Triggers`] it causes: the
//! TimeServices and tenants whose output may have changed, so a pod event reconciles only what
//! it affects. Only the watch feed writes it (see `controller::wiring`).
//!
//! It keeps no cache of what plans derive (the planner of the `plan` module owns those), but
//! tells a cache what it may keep: a write bumps the generation of each namespace whose pods
//! changed and of each tenant whose allow list may have (see [`TenantGenerations`]), exactly
//! where it triggers, so a pod add re-resolves only the sets and allow lists it touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use stratum_api::{
    NodeClock, TenantTimePolicy, TenantTimePolicySpec, TimeService, TimeServiceSpec,
};

use crate::clock::MonotonicClock;
use crate::freshness::{self, NODE_GONE_GRACE, Renewal};
use crate::model::{
    ClockInfo, Cluster, NodeInfo, PodInfo, ServerVersion, TimeServiceEntry, is_agent_of,
};
use crate::names;
use crate::owned::{ChildKind, ChildMeta, Children};
use crate::placement::AgentPlacement;
use crate::ports::{Allocation, PortClaim, TenantKey};
use crate::resolve::{CompiledPolicy, ResolveError};
use crate::selector::{Labels, Selector};
use crate::validate::{Refusal, cluster_refusal, spec_refusal};

/// A TenantTimePolicy as indexed.
#[derive(Clone, Debug)]
pub struct TenantEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid, for events.
    pub uid: Option<String>,
    /// creationTimestamp.
    pub created: Option<Timestamp>,
    /// The spec.
    pub spec: TenantTimePolicySpec,
    /// `status.port` as last written.
    pub status_port: Option<i32>,
    /// Compiled peers, or why they do not compile.
    pub policy: Result<CompiledPolicy, ResolveError>,
    /// Why this tenant cannot be served whatever else exists (its own faults, or what it asks
    /// of the API server that this one does not serve; see [`crate::validate`]). Such a
    /// tenant claims no port and no Service name.
    pub invalid: Option<Refusal>,
    /// Its place in the index's per-tenant tables while the index holds it (see
    /// [`Index::slot_generations`]), kept across its changes and given to another tenant only
    /// after it is deleted; `None` for an entry made outside the index.
    pub slot: Option<usize>,
}

impl TenantEntry {
    /// Indexes a TenantTimePolicy, for a cluster whose API server serves `server` (`None`:
    /// unknown).
    pub fn new(tenant: &TenantTimePolicy, server: Option<ServerVersion>) -> Option<Self> {
        let namespace = tenant.metadata.namespace.clone()?;
        let name = tenant.metadata.name.clone()?;
        let policy = CompiledPolicy::compile(
            &namespace,
            &tenant.spec.allowed_clients,
            &tenant.spec.denied_clients,
        );
        let invalid =
            spec_refusal(&policy, &tenant.spec).or_else(|| cluster_refusal(&tenant.spec, server));
        Some(Self {
            invalid,
            slot: None,
            uid: tenant.metadata.uid.clone(),
            created: tenant.metadata.creation_timestamp.as_ref().map(|t| t.0),
            status_port: tenant.status.as_ref().and_then(|s| s.port),
            spec: tenant.spec.clone(),
            policy,
            namespace,
            name,
        })
    }

    /// `(namespace, name)`.
    pub fn key(&self) -> TenantKey {
        (self.namespace.clone(), self.name.clone())
    }

    /// The TimeService whose port range this tenant claims a port of: none while it is
    /// invalid or in a closed namespace, so such a tenant never moves another tenant's port.
    fn claims_port_of<'a>(&self, index: &'a Index) -> Option<&'a TimeServiceEntry> {
        if self.invalid.is_some() || index.namespace_closed(&self.namespace) {
            return None;
        }
        index.time_service_of(self).ok()
    }

    /// What port allocation needs of it.
    pub fn claim(&self) -> PortClaim {
        PortClaim {
            key: self.key(),
            created: self.created,
            current: self.status_port,
        }
    }

    /// The tenant's maximum root distance in nanoseconds.
    pub fn max_root_distance_nanos(&self) -> Option<i64> {
        self.spec.requirements.max_root_distance.map(|d| {
            i64::try_from(std::time::Duration::from_secs_f64(d.as_secs_f64()).as_nanos())
                .unwrap_or(i64::MAX)
        })
    }
}

/// Why a tenant is not served by any TimeService.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unserved {
    /// `timeServiceRef` names a TimeService that does not exist.
    NotFound(String),
    /// No reference and no TimeService exists.
    NoTimeService,
    /// No reference and several TimeServices exist.
    Ambiguous,
}

impl Unserved {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Unserved::NotFound(_) => "TimeServiceNotFound",
            Unserved::NoTimeService => "NoTimeService",
            Unserved::Ambiguous => "AmbiguousTimeService",
        }
    }

    /// Condition message.
    pub fn message(&self) -> String {
        match self {
            Unserved::NotFound(name) => format!("TimeService {name:?} does not exist"),
            Unserved::NoTimeService => {
                "no TimeService exists; create one or set spec.timeServiceRef".into()
            }
            Unserved::Ambiguous => {
                "several TimeServices exist; set spec.timeServiceRef to choose one".into()
            }
        }
    }
}

/// What an index change requires reconciling: dropping it would leave objects unreconciled.
#[must_use = "every index change must reach the controllers it triggers"]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Triggers {
    /// TimeServices (agent children, config, status).
    pub time_services: BTreeSet<String>,
    /// Tenants (Service, EndpointSlices, time-config, status).
    pub tenants: BTreeSet<TenantKey>,
}

impl Triggers {
    /// Adds another set of triggers.
    pub fn extend(&mut self, other: Triggers) {
        self.time_services.extend(other.time_services);
        self.tenants.extend(other.tenants);
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.time_services.is_empty() && self.tenants.is_empty()
    }
}

/// Everything the plans read.
#[derive(Debug, Default)]
pub struct Index {
    /// Where agent children and agent pods live.
    operator_namespace: String,
    /// Namespaces closed to tenants (the system ones, by the operator's default): a tenant
    /// there is refused, and the chart's admission policy keeps the operator from writing there.
    closed_namespaces: BTreeSet<String>,
    /// The API server's version, read once at start (`None`: unknown, nothing is refused for
    /// it).
    server_version: Option<ServerVersion>,
    /// Namespaces and pods.
    cluster: Cluster,
    /// Node labels and taints.
    nodes: BTreeMap<String, NodeInfo>,
    /// NodeClocks by node.
    clocks: BTreeMap<String, ClockInfo>,
    /// TimeServices by name.
    time_services: BTreeMap<String, TimeServiceEntry>,
    /// Tenants by `(namespace, name)`; shared so that a plan can keep the ones it serves.
    tenants: BTreeMap<TenantKey, Arc<TenantEntry>>,
    /// Changes whenever a tenant or a TimeService is added, changed or deleted: which tenants
    /// a TimeService serves, on which ports, can change only then (see [`Index::roster_epoch`]).
    roster_epoch: u64,
    /// The last generation handed out; generations only grow, so one is never reused.
    generation: u64,
    /// The generation of each namespace's last pod change (none once it has no pods).
    pod_generations: HashMap<String, u64>,
    /// What each tenant's allow list was last invalidated at, by [`TenantEntry::slot`]: a plan
    /// checks every served tenant's on every pod event, without hashing its key.
    tenant_generations: Vec<Option<TenantGenerations>>,
    /// Slots of deleted tenants, for new ones.
    free_slots: Vec<usize>,
    /// The generation each TimeService was created at (a new one of the same name gets another).
    time_service_generations: HashMap<String, u64>,
    /// Port allocation per TimeService, kept up to date tenant by tenant.
    allocations: HashMap<String, Allocation>,
    /// The operator's monotonic clock (injected: tests step it).
    clock: MonotonicClock,
    /// When each NodeClock was last seen renewed (see [`crate::freshness`]).
    renewals: HashMap<String, Renewal>,
    /// NodeClocks whose Node is gone, since when (monotonic).
    nodes_gone: HashMap<String, Instant>,
    /// Existing Services, Stratum's EndpointSlices and `time-config` ConfigMaps: what tenants
    /// own, may not touch, or must prune (see [`crate::owned`]).
    children: Children,
}

/// When a tenant's derived allow list was last invalidated: a cache made at these generations
/// is good while they stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantGenerations {
    /// Which pod sets and blocks it allows may have changed: its peers, or the labels of a
    /// namespace they select.
    pub sets: u64,
    /// Anything its allow list derives from may have: its sets, a pod it selects, its entry
    /// (spec, deny list).
    pub list: u64,
}

/// What a freshness sweep found (see [`Index::sweep`]).
#[must_use = "stale clocks trigger their tenants, and gone nodes' NodeClocks wait for deletion"]
#[derive(Debug, Default)]
pub struct Sweep {
    /// Tenants and TimeServices whose endpoints or status changed with a clock going stale.
    pub triggers: Triggers,
    /// NodeClocks (name, uid) whose Node has been gone longer than the grace: delete them.
    pub collect: Vec<(String, Option<String>)>,
    /// The earliest instant at which another clock goes stale or another NodeClock is due for
    /// collection, if any.
    pub next: Option<Instant>,
}

static NO_PORTS: BTreeMap<TenantKey, Option<u16>> = BTreeMap::new();

impl Index {
    /// An empty index for an operator running in `operator_namespace`.
    pub fn new(operator_namespace: impl Into<String>) -> Self {
        Self::with_clock(operator_namespace, MonotonicClock::system())
    }

    /// An empty index timing NodeClock freshness on `clock`.
    pub fn with_clock(operator_namespace: impl Into<String>, clock: MonotonicClock) -> Self {
        Self {
            operator_namespace: operator_namespace.into(),
            clock,
            ..Self::default()
        }
    }

    /// The same index, refusing tenants in `namespaces`.
    #[must_use]
    pub fn with_closed_namespaces(mut self, namespaces: impl IntoIterator<Item = String>) -> Self {
        self.closed_namespaces = namespaces.into_iter().filter(|n| !n.is_empty()).collect();
        self
    }

    /// The same index, for a cluster whose API server serves `version`: tenants asking for
    /// what it does not serve are refused (see [`crate::validate::cluster_refusal`]). Set
    /// before any tenant is indexed.
    #[must_use]
    pub fn with_server_version(mut self, version: ServerVersion) -> Self {
        self.server_version = Some(version);
        self
    }

    /// The API server's version, when known.
    pub fn server_version(&self) -> Option<ServerVersion> {
        self.server_version
    }

    /// Whether tenants of namespace `ns` are refused.
    pub fn namespace_closed(&self, ns: &str) -> bool {
        self.closed_namespaces.contains(ns)
    }

    /// The index's monotonic clock.
    pub fn clock(&self) -> &MonotonicClock {
        &self.clock
    }

    // ---- reads ----

    /// The TimeService serving a tenant.
    pub fn time_service_of(&self, tenant: &TenantEntry) -> Result<&TimeServiceEntry, Unserved> {
        match &tenant.spec.time_service_ref {
            Some(name) => self
                .time_services
                .get(name)
                .ok_or_else(|| Unserved::NotFound(name.clone())),
            None => {
                let mut all = self.time_services.values();
                match (all.next(), all.next()) {
                    (Some(only), None) => Ok(only),
                    (None, _) => Err(Unserved::NoTimeService),
                    _ => Err(Unserved::Ambiguous),
                }
            }
        }
    }

    /// Whether the index holds this TenantTimePolicy as it is (spec and age): until it does,
    /// the watch feed has not caught up with it, and will trigger it when it does.
    pub fn holds_tenant(&self, tenant: &TenantTimePolicy) -> bool {
        self.held_tenant(tenant).is_some()
    }

    /// The index's entry of this TenantTimePolicy, if it holds it as it is.
    pub fn held_tenant(&self, tenant: &TenantTimePolicy) -> Option<&Arc<TenantEntry>> {
        let (Some(ns), Some(name)) = (&tenant.metadata.namespace, &tenant.metadata.name) else {
            return None;
        };
        self.tenants
            .get(&(ns.clone(), name.clone()))
            .filter(|entry| {
                entry.spec == tenant.spec
                    && entry.created == tenant.metadata.creation_timestamp.as_ref().map(|t| t.0)
            })
    }

    /// Tenants served by `time_service`, in key order.
    pub fn tenants_of(&self, time_service: &str) -> Vec<&TenantEntry> {
        self.tenants
            .values()
            .map(Arc::as_ref)
            .filter(|t| {
                self.time_service_of(t)
                    .is_ok_and(|ts| ts.name == time_service)
            })
            .collect()
    }

    /// Keys of the tenants of namespace `ns`.
    fn tenants_in(&self, ns: &str) -> Vec<TenantKey> {
        self.tenants
            .range((ns.to_owned(), String::new())..)
            .take_while(|((tns, _), _)| tns == ns)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The port reserved for agent-to-agent (egress tier) traffic, if the TimeService has a tier:
    /// the last port of its tenant range.
    pub fn peer_port(spec: &TimeServiceSpec) -> Option<u16> {
        spec.egress_tier
            .as_ref()
            .and_then(|_| u16::try_from(spec.serving.tenant_ports.end).ok())
    }

    /// Port of every tenant of `time_service` (`None`: the range is exhausted).
    pub fn ports_of(&self, time_service: &str) -> &BTreeMap<TenantKey, Option<u16>> {
        self.allocations
            .get(time_service)
            .map_or(&NO_PORTS, Allocation::ports)
    }

    /// Recomputes every TimeService's allocation (their set or ranges changed).
    fn reallocate_all(&mut self) {
        let mut allocations = HashMap::new();
        for (name, ts) in &self.time_services {
            let claims: Vec<PortClaim> = self
                .tenants
                .values()
                .filter(|t| t.claims_port_of(self).is_some_and(|ts| ts.name == *name))
                .map(|t| t.claim())
                .collect();
            let range = &ts.spec.serving.tenant_ports;
            allocations.insert(
                name.clone(),
                Allocation::with_claims(range.start, range.end, Self::peer_port(&ts.spec), &claims),
            );
        }
        self.allocations = allocations;
    }

    /// Updates the allocations for one tenant that was added, changed (`old` is its previous
    /// entry) or deleted; triggers those whose port or TimeService changed.
    fn reallocate(&mut self, key: &TenantKey, old: Option<&TenantEntry>) -> Triggers {
        let old_ts = old
            .and_then(|o| o.claims_port_of(self))
            .map(|ts| ts.name.clone());
        let new = self.tenants.get(key).map(Arc::as_ref);
        let new_ts = new
            .and_then(|t| t.claims_port_of(self))
            .map(|ts| ts.name.clone());
        let claim = new.map(TenantEntry::claim);
        let mut triggers = Triggers::default();
        let mut changed = BTreeSet::new();
        if old_ts != new_ts {
            if let Some(ts) = old_ts
                && let Some(allocation) = self.allocations.get_mut(&ts)
            {
                changed.extend(allocation.remove(key));
                triggers.time_services.insert(ts);
            }
            changed.insert(key.clone());
        }
        if let (Some(ts), Some(claim)) = (new_ts, claim)
            && let Some(allocation) = self.allocations.get_mut(&ts)
        {
            let moved = allocation.upsert(&claim);
            if !moved.is_empty() {
                triggers.time_services.insert(ts);
            }
            changed.extend(moved);
        }
        triggers
            .tenants
            .extend(changed.into_iter().filter(|k| self.tenants.contains_key(k)));
        triggers
    }

    /// Which tenants each TimeService serves, on which ports, and which of them own their
    /// Service names: all of it stays as it is while this number does.
    pub fn roster_epoch(&self) -> u64 {
        self.roster_epoch
    }

    /// Invalidates what derives from a tenant's allow list; with `sets`, also which sets it
    /// allows (its peers, or the namespaces they select, changed).
    fn tenant_changed(&mut self, key: &TenantKey, sets: bool) {
        self.bump_tenant(self.tenants.get(key).and_then(|t| t.slot), sets);
    }

    /// [`Index::tenant_changed`] of the tenant in `slot`.
    fn bump_tenant(&mut self, slot: Option<usize>, sets: bool) {
        let Some(cell) = slot.and_then(|slot| self.tenant_generations.get_mut(slot)) else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        match cell {
            Some(generations) => {
                generations.list = generation;
                if sets {
                    generations.sets = generation;
                }
            }
            None => {
                *cell = Some(TenantGenerations {
                    sets: generation,
                    list: generation,
                });
            }
        }
    }

    /// The generations of a tenant's allow list; `None` for a tenant the index does not hold.
    pub fn tenant_generations(&self, key: &TenantKey) -> Option<TenantGenerations> {
        self.slot_generations(self.tenants.get(key)?.slot?)
    }

    /// The generations of the tenant in `slot` (see [`TenantEntry::slot`]); `None` for a free
    /// slot. A slot passes to another tenant with fresh generations, never with its old ones.
    pub fn slot_generations(&self, slot: usize) -> Option<TenantGenerations> {
        self.tenant_generations.get(slot).copied().flatten()
    }

    /// The generation of the last pod change in namespace `ns`; `None` while it has no pods.
    /// The pods of `ns` are as they were while this stays.
    pub fn pod_generation(&self, ns: &str) -> Option<u64> {
        self.pod_generations.get(ns).copied()
    }

    /// The generation TimeService `name` was created at; `None` when there is none.
    pub fn time_service_generation(&self, name: &str) -> Option<u64> {
        self.time_service_generations.get(name).copied()
    }

    /// Nodes selected by a label map (empty selects every node).
    pub fn nodes_matching(&self, selector: &BTreeMap<String, String>) -> BTreeSet<String> {
        let selector = Selector::from_labels(selector);
        self.nodes
            .iter()
            .filter(|(_, n)| selector.matches(&n.labels))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Nodes an agent of a TimeService with `spec` belongs on: its Linux node selector matches
    /// and its tolerations tolerate every taint (see [`crate::placement`]).
    pub fn placed_nodes(&self, spec: &TimeServiceSpec) -> BTreeSet<String> {
        let placement = AgentPlacement::of(spec);
        self.nodes
            .iter()
            .filter(|(_, n)| placement.admits(n))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// TimeServices that may run agents, oldest first claiming their nodes: a TimeService whose
    /// nodes overlap an older active one's is in conflict with it. Returns name → the older
    /// TimeService it conflicts with.
    pub fn conflicts(&self) -> BTreeMap<String, String> {
        self.conflicts_with(None)
    }

    /// [`Index::conflicts`] as if `planned` were indexed in place of its namesake: a reconcile
    /// plans the object it was handed, which may be newer than the index's copy.
    pub fn conflicts_with(&self, planned: Option<&TimeServiceEntry>) -> BTreeMap<String, String> {
        let mut order: Vec<&TimeServiceEntry> = self
            .time_services
            .values()
            .filter(|ts| planned.is_none_or(|p| p.name != ts.name))
            .chain(planned)
            .collect();
        order.sort_by(|a, b| {
            (a.created.is_none(), a.created, &a.name).cmp(&(
                b.created.is_none(),
                b.created,
                &b.name,
            ))
        });
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        let mut conflicts = BTreeMap::new();
        for ts in order {
            let nodes = self.nodes_matching(&ts.spec.placement.agent_node_selector());
            if let Some(owner) = nodes.iter().find_map(|n| claimed.get(n)) {
                conflicts.insert(ts.name.clone(), owner.clone());
                continue;
            }
            for node in nodes {
                claimed.insert(node, ts.name.clone());
            }
        }
        conflicts
    }

    /// Agent pods of a TimeService (in the operator's namespace, by the contract's labels).
    pub fn agent_pods(&self, time_service: &str) -> Vec<&PodInfo> {
        self.cluster
            .pods_in(&self.operator_namespace)
            .filter(|p| is_agent_of(&p.labels, time_service))
            .collect()
    }

    /// How long a NodeClock of `time_service` stays fresh after a renewal (see
    /// [`crate::freshness`]).
    pub fn freshness_bound(&self, time_service: &str) -> Duration {
        let heartbeat = self
            .time_services
            .get(time_service)
            .and_then(|ts| {
                Duration::try_from_secs_f64(ts.spec.reporting.interval.as_secs_f64()).ok()
            })
            .unwrap_or(freshness::DEFAULT_HEARTBEAT);
        freshness::freshness_bound(heartbeat)
    }

    /// Whether `node`'s NodeClock was renewed within its freshness bound at `now`.
    pub fn clock_fresh(&self, node: &str, now: Instant) -> bool {
        match (self.clocks.get(node), self.renewals.get(node)) {
            (Some(clock), Some(renewal)) => {
                renewal.fresh(now, self.freshness_bound(&clock.time_service))
            }
            _ => false,
        }
    }

    /// Nodes whose NodeClock is fresh now.
    pub fn fresh_clocks(&self) -> BTreeSet<String> {
        let now = self.clock.now();
        self.clocks
            .keys()
            .filter(|node| self.clock_fresh(node, now))
            .cloned()
            .collect()
    }

    /// Existing tenant children and whose they are.
    pub fn children(&self) -> &Children {
        &self.children
    }

    /// Where agent children and agent pods live.
    pub fn operator_namespace(&self) -> &str {
        &self.operator_namespace
    }

    /// Namespaces and pods.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Node labels and taints by node.
    pub fn nodes(&self) -> &BTreeMap<String, NodeInfo> {
        &self.nodes
    }

    /// NodeClocks by node.
    pub fn clocks(&self) -> &BTreeMap<String, ClockInfo> {
        &self.clocks
    }

    /// TimeServices by name.
    pub fn time_services(&self) -> &BTreeMap<String, TimeServiceEntry> {
        &self.time_services
    }

    /// Tenants by `(namespace, name)`.
    pub fn tenants(&self) -> &BTreeMap<TenantKey, Arc<TenantEntry>> {
        &self.tenants
    }

    // ---- writes ----

    /// A pod was added or changed.
    pub fn apply_pod(&mut self, pod: &Pod) -> Triggers {
        let Some((ns, info)) = PodInfo::from_pod(pod) else {
            return Triggers::default();
        };
        let new = info.clone();
        match self.cluster.upsert_pod(&ns, info) {
            None => Triggers::default(),
            Some(old) => self.pod_changed(&ns, old.as_ref(), Some(&new)),
        }
    }

    /// A pod was deleted.
    pub fn delete_pod(&mut self, ns: &str, name: &str) -> Triggers {
        match self.cluster.remove_pod(ns, name) {
            None => Triggers::default(),
            Some(old) => self.pod_changed(ns, Some(&old), None),
        }
    }

    fn pod_changed(&mut self, ns: &str, old: Option<&PodInfo>, new: Option<&PodInfo>) -> Triggers {
        let mut triggers = Triggers::default();
        if self.cluster.pods_in(ns).next().is_some() {
            self.generation += 1;
            match self.pod_generations.get_mut(ns) {
                Some(generation) => *generation = self.generation,
                None => {
                    self.pod_generations.insert(ns.to_owned(), self.generation);
                }
            }
        } else {
            self.pod_generations.remove(ns);
        }
        if ns == self.operator_namespace {
            for pod in [old, new].into_iter().flatten() {
                if let Some(ts) = pod.labels.get(names::TIME_SERVICE_LABEL)
                    && is_agent_of(&pod.labels, ts)
                {
                    triggers.time_services.insert(ts.clone());
                    triggers
                        .tenants
                        .extend(self.tenants_of(ts).into_iter().map(TenantEntry::key));
                }
            }
        }
        // Triggered and invalidated in one pass over the tenants, by slot: a pod event touches
        // many tenants, and looking each up again by key showed in the scale benchmark.
        let empty = Labels::new();
        let ns_labels = self.cluster.namespace_labels(ns).unwrap_or(&empty);
        let mut affected = Vec::new();
        for t in self.tenants.values() {
            let selects = t.policy.as_ref().is_ok_and(|p| {
                [old, new]
                    .into_iter()
                    .flatten()
                    .any(|pod| selects_pod(p, ns, ns_labels, &pod.labels))
            });
            if selects {
                affected.push(t.slot);
                triggers.tenants.insert(t.key());
                if let Ok(ts) = self.time_service_of(t) {
                    triggers.time_services.insert(ts.name.clone());
                }
            }
        }
        // Resolution is lazy: a burst of pod events (an initial list, a rollout) costs one
        // resolution per tenant at the next plan, not one per event.
        for slot in affected {
            self.bump_tenant(slot, false);
        }
        triggers
    }

    fn tenant_and_service(&self, key: &TenantKey) -> Triggers {
        let mut triggers = Triggers::default();
        if let Some(tenant) = self.tenants.get(key) {
            triggers.tenants.insert(key.clone());
            if let Ok(ts) = self.time_service_of(tenant) {
                triggers.time_services.insert(ts.name.clone());
            }
        }
        triggers
    }

    /// A namespace was added or its labels changed.
    pub fn apply_namespace(&mut self, name: &str, labels: &Labels) -> Triggers {
        match self.cluster.upsert_namespace(name, labels.clone()) {
            None => Triggers::default(),
            Some(old) => self.namespace_changed(name, old, Some(labels.clone())),
        }
    }

    /// A namespace was deleted.
    pub fn delete_namespace(&mut self, name: &str) -> Triggers {
        let old = self.cluster.remove_namespace(name);
        self.namespace_changed(name, old, None)
    }

    fn namespace_changed(
        &mut self,
        ns: &str,
        old: Option<Labels>,
        new: Option<Labels>,
    ) -> Triggers {
        let affected: Vec<TenantKey> = self
            .tenants
            .values()
            .filter(|t| {
                t.policy.as_ref().is_ok_and(|p| {
                    p.selects_namespaces()
                        && [&old, &new]
                            .into_iter()
                            .flatten()
                            .any(|labels| p.depends_on_namespace(ns, labels))
                })
            })
            .map(|t| t.key())
            .collect();
        let mut triggers = Triggers::default();
        for key in affected {
            self.tenant_changed(&key, true);
            triggers.extend(self.tenant_and_service(&key));
        }
        triggers
    }

    /// A node was added or its labels or taints changed: placement, conflicts and egress tiers
    /// may change.
    pub fn apply_node(&mut self, name: &str, node: &NodeInfo) -> Triggers {
        self.nodes_gone.remove(name);
        if self.nodes.get(name) == Some(node) {
            return Triggers::default();
        }
        self.nodes.insert(name.to_owned(), node.clone());
        self.all_time_services()
    }

    /// A node was deleted.
    pub fn delete_node(&mut self, name: &str) -> Triggers {
        if self.nodes.remove(name).is_none() {
            return Triggers::default();
        }
        if self.clocks.contains_key(name) {
            self.nodes_gone.insert(name.to_owned(), self.clock.now());
        }
        self.all_time_services()
    }

    fn all_time_services(&self) -> Triggers {
        Triggers {
            time_services: self.time_services.keys().cloned().collect(),
            tenants: BTreeSet::new(),
        }
    }

    /// A NodeClock was added or changed. A new `status.lastUpdate` renews it (see
    /// [`crate::freshness`]).
    pub fn apply_clock(&mut self, clock: &NodeClock) -> Triggers {
        let node = clock.name_any();
        let now = self.clock.now();
        let was_fresh = self.clock_fresh(&node, now);
        let last_update = clock.status.as_ref().and_then(|s| s.last_update.clone());
        let renewal = self.renewals.entry(node.clone()).or_insert(Renewal {
            last_update: None,
            at: now,
            uid: None,
            expired: false,
        });
        renewal.uid.clone_from(&clock.metadata.uid);
        if renewal.last_update != last_update {
            *renewal = Renewal {
                last_update,
                at: now,
                uid: clock.metadata.uid.clone(),
                expired: false,
            };
        }
        if self.nodes.contains_key(&node) {
            self.nodes_gone.remove(&node);
        } else {
            self.nodes_gone.entry(node.clone()).or_insert(now);
        }
        let info = ClockInfo::from_node_clock(clock);
        let old = self.clocks.insert(node.clone(), info.clone());
        let is_fresh = self.clock_fresh(&node, now);
        if old.as_ref() == Some(&info) && was_fresh == is_fresh {
            return Triggers::default();
        }
        self.clock_changed(old.as_ref(), was_fresh, Some(&info), is_fresh)
    }

    /// A NodeClock was deleted.
    pub fn delete_clock(&mut self, node: &str) -> Triggers {
        let was_fresh = self.clock_fresh(node, self.clock.now());
        self.renewals.remove(node);
        self.nodes_gone.remove(node);
        let old = self.clocks.remove(node);
        self.clock_changed(old.as_ref(), was_fresh, None, false)
    }

    /// What a clock's change (its report, or its freshness) requires reconciling. A stale
    /// clock counts as neither synchronized nor serving.
    fn clock_changed(
        &self,
        old: Option<&ClockInfo>,
        old_fresh: bool,
        new: Option<&ClockInfo>,
        new_fresh: bool,
    ) -> Triggers {
        let mut triggers = Triggers::default();
        let old = old.filter(|_| old_fresh);
        let new = new.filter(|_| new_fresh);
        if old.map(ClockInfo::summary) != new.map(ClockInfo::summary) {
            for c in [old, new].into_iter().flatten() {
                triggers.time_services.insert(c.time_service.clone());
            }
        }
        // Endpoint readiness of a tenant flips only when the clock crosses its requirement.
        for c in [old, new].into_iter().flatten() {
            for tenant in self.tenants_of(&c.time_service) {
                let max = tenant.max_root_distance_nanos();
                if old.is_some_and(|o| o.serves(max)) != new.is_some_and(|n| n.serves(max))
                    || old.map(|o| &o.time_service) != new.map(|n| &n.time_service)
                {
                    triggers.tenants.insert(tenant.key());
                }
            }
        }
        triggers
    }

    /// Acts on time passing: every NodeClock that went stale since the last sweep triggers
    /// the tenants whose endpoint on its node was ready (and its TimeService), once; NodeClocks
    /// whose Node has been gone for [`NODE_GONE_GRACE`] are handed back for deletion (and
    /// offered again one grace later if they are still there). `next` says when to sweep
    /// again; see [`freshness::max_sweep_interval`] for the longest sleep that misses nothing.
    pub fn sweep(&mut self) -> Sweep {
        let now = self.clock.now();
        let mut sweep = Sweep::default();
        let mut expired = Vec::new();
        for (node, renewal) in &self.renewals {
            let Some(clock) = self.clocks.get(node) else {
                continue;
            };
            let bound = self.freshness_bound(&clock.time_service);
            if renewal.fresh(now, bound) {
                let at = renewal.at + bound;
                sweep.next = Some(sweep.next.map_or(at, |n| n.min(at)));
            } else if !renewal.expired {
                expired.push(node.clone());
            }
        }
        for node in expired {
            if let Some(renewal) = self.renewals.get_mut(&node) {
                renewal.expired = true;
            }
            let clock = self.clocks.get(&node);
            sweep
                .triggers
                .extend(self.clock_changed(clock, true, clock, false));
        }
        for (node, since) in &mut self.nodes_gone {
            if now.saturating_duration_since(*since) >= NODE_GONE_GRACE {
                let uid = self.renewals.get(node).and_then(|r| r.uid.clone());
                sweep.collect.push((node.clone(), uid));
                *since = now;
            }
            let at = *since + NODE_GONE_GRACE;
            sweep.next = Some(sweep.next.map_or(at, |n| n.min(at)));
        }
        sweep.collect.sort();
        sweep
    }

    /// A Service, Stratum EndpointSlice or `time-config` ConfigMap was added or changed:
    /// triggers the tenants of its namespace that would apply, own or prune an object of this
    /// name.
    pub fn apply_child(&mut self, kind: ChildKind, meta: &ObjectMeta) -> Triggers {
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return Triggers::default();
        };
        match self
            .children
            .upsert(kind, ns, name, ChildMeta::from_meta(meta))
        {
            None => Triggers::default(),
            Some(old) => {
                let new = self.children.get(kind, ns, name).cloned();
                self.child_changed(kind, ns, name, [old, new])
            }
        }
    }

    /// A tenant child was deleted.
    pub fn delete_child(&mut self, kind: ChildKind, ns: &str, name: &str) -> Triggers {
        match self.children.remove(kind, ns, name) {
            None => Triggers::default(),
            Some(old) => self.child_changed(kind, ns, name, [Some(old), None]),
        }
    }

    fn child_changed(
        &self,
        kind: ChildKind,
        ns: &str,
        name: &str,
        versions: [Option<ChildMeta>; 2],
    ) -> Triggers {
        let labelled: BTreeSet<&str> = versions
            .iter()
            .flatten()
            .filter_map(|m| m.tenant.as_deref())
            .collect();
        let from = (ns.to_owned(), String::new());
        let tenants = self
            .tenants
            .range(from..)
            .take_while(|((tns, _), _)| tns == ns)
            .map(|(_, t)| t)
            .filter(|t| {
                labelled.contains(t.name.as_str())
                    || match kind {
                        ChildKind::Service => t.spec.service.name == name,
                        ChildKind::EndpointSlice => false,
                        ChildKind::ConfigMap => name == names::TIME_CONFIG_NAME,
                    }
            })
            .map(|t| t.key());
        Triggers {
            time_services: BTreeSet::new(),
            tenants: tenants.collect(),
        }
    }

    /// A TenantTimePolicy was added or changed.
    pub fn apply_tenant(&mut self, tenant: &TenantTimePolicy) -> Triggers {
        let Some(mut entry) = TenantEntry::new(tenant, self.server_version) else {
            return Triggers::default();
        };
        let key = entry.key();
        if let Some(old) = self.tenants.get(&key)
            && old.spec == entry.spec
            && old.status_port == entry.status_port
            && old.created == entry.created
        {
            return Triggers::default();
        }
        entry.slot = Some(match self.tenants.get(&key).and_then(|o| o.slot) {
            Some(slot) => slot,
            None => self.free_slots.pop().unwrap_or_else(|| {
                self.tenant_generations.push(None);
                self.tenant_generations.len() - 1
            }),
        });
        let old = self.tenants.insert(key.clone(), Arc::new(entry));
        self.roster_epoch += 1;
        // A plan's allow list stands for the entry too (spec, deny list).
        self.tenant_changed(&key, false);
        let mut triggers = Triggers::default();
        if old
            .as_ref()
            .is_none_or(|o| o.spec.service.name != tenant.spec.service.name)
        {
            // Which tenant of the namespace owns a Service name may have changed.
            triggers.tenants.extend(self.tenants_in(&key.0));
        }
        if old.as_ref().is_none_or(|o| o.spec != tenant.spec) {
            if old
                .as_ref()
                .is_none_or(|o| o.spec.allowed_clients != tenant.spec.allowed_clients)
            {
                self.tenant_changed(&key, true);
            }
            triggers.extend(self.tenant_and_service(&key));
            if let Some(old) = &old
                && let Ok(ts) = self.time_service_of(old)
            {
                triggers.time_services.insert(ts.name.clone());
            }
        }
        triggers.extend(self.reallocate(&key, old.as_deref()));
        triggers
    }

    /// A TenantTimePolicy was deleted.
    pub fn delete_tenant(&mut self, ns: &str, name: &str) -> Triggers {
        let key = (ns.to_owned(), name.to_owned());
        if !self.tenants.contains_key(&key) {
            return Triggers::default();
        }
        let mut triggers = self.tenant_and_service(&key);
        // Its Service name and the namespace's `time-config` may pass to another tenant.
        triggers.tenants.extend(self.tenants_in(ns));
        let old = self.tenants.remove(&key);
        self.roster_epoch += 1;
        if let Some(slot) = old.as_ref().and_then(|o| o.slot)
            && let Some(cell) = self.tenant_generations.get_mut(slot)
        {
            *cell = None;
            self.free_slots.push(slot);
        }
        triggers.extend(self.reallocate(&key, old.as_deref()));
        triggers.tenants.remove(&key);
        triggers
    }

    /// A TimeService was added or changed.
    pub fn apply_time_service(&mut self, ts: &TimeService) -> Triggers {
        let name = ts.name_any();
        let entry = TimeServiceEntry {
            name: name.clone(),
            created: ts.metadata.creation_timestamp.as_ref().map(|t| t.0),
            spec: ts.spec.clone(),
        };
        if self
            .time_services
            .get(&name)
            .is_some_and(|old| old.created == entry.created && old.spec == entry.spec)
        {
            return Triggers::default();
        }
        let before = self.assignment_snapshot();
        if self.time_services.insert(name.clone(), entry).is_none() {
            self.generation += 1;
            self.time_service_generations
                .insert(name.clone(), self.generation);
        }
        self.roster_epoch += 1;
        self.reallocate_all();
        let mut triggers = self.all_time_services();
        triggers
            .tenants
            .extend(self.tenants_of(&name).into_iter().map(TenantEntry::key));
        triggers.extend(self.assignment_changes(before));
        triggers
    }

    /// A TimeService was deleted.
    pub fn delete_time_service(&mut self, name: &str) -> Triggers {
        if !self.time_services.contains_key(name) {
            return Triggers::default();
        }
        let before = self.assignment_snapshot();
        let name = name.to_owned();
        let mut triggers = Triggers::default();
        triggers
            .tenants
            .extend(self.tenants_of(&name).into_iter().map(TenantEntry::key));
        self.time_services.remove(&name);
        self.time_service_generations.remove(&name);
        self.roster_epoch += 1;
        self.reallocate_all();
        triggers.extend(self.all_time_services());
        triggers.extend(self.assignment_changes(before));
        triggers
    }

    /// Which TimeService and port each tenant has.
    fn assignment_snapshot(&self) -> BTreeMap<TenantKey, (Option<String>, Option<u16>)> {
        let mut out = BTreeMap::new();
        for ts in self.time_services.keys() {
            for (key, port) in self.ports_of(ts) {
                out.insert(key.clone(), (Some(ts.clone()), *port));
            }
        }
        for key in self.tenants.keys() {
            out.entry(key.clone()).or_insert((None, None));
        }
        out
    }

    /// Tenants whose TimeService or port changed since `before`, and those TimeServices.
    fn assignment_changes(
        &self,
        before: BTreeMap<TenantKey, (Option<String>, Option<u16>)>,
    ) -> Triggers {
        let after = self.assignment_snapshot();
        let mut triggers = Triggers::default();
        for key in before.keys().chain(after.keys()) {
            let (b, a) = (before.get(key), after.get(key));
            if b != a {
                if after.contains_key(key) {
                    triggers.tenants.insert(key.clone());
                }
                for ts in [b, a]
                    .into_iter()
                    .flatten()
                    .filter_map(|(ts, _)| ts.clone())
                {
                    triggers.time_services.insert(ts);
                }
            }
        }
        triggers
    }
}

/// Whether a policy's peers select a pod with `pod_labels` in namespace `ns`.
fn selects_pod(policy: &CompiledPolicy, ns: &str, ns_labels: &Labels, pod_labels: &Labels) -> bool {
    use crate::resolve::{CompiledPeer, NamespaceScope};
    policy.allowed.iter().any(|peer| match peer {
        CompiledPeer::Block(_) => false,
        CompiledPeer::Pods { namespaces, pods } => {
            let in_scope = match namespaces {
                NamespaceScope::Own => ns == policy.namespace,
                NamespaceScope::Selected(s) => s.matches(ns_labels),
            };
            in_scope && pods.matches(pod_labels)
        }
    })
}
