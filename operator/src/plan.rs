//! The planner: validate and build, per reconciled object, from a read of the index:
//! everything a reconcile applies and reports, computed without IO. The controllers only apply
//! what a plan holds.
//!
//! [`Planner`] owns every planning cache: resolved pod sets, each tenant's sets and allow list,
//! the Service owners and each TimeService's last plan. Each is kept while the index's
//! generations and roster epoch say its inputs are unchanged, so a pod add re-resolves only the
//! sets and allow lists it touched. A TimeService plan is drafted under the index lock (what it
//! reads from the index is shared or small) and built, serialized and gzipped outside it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use stratum_api::{AgentConfig, TenantTimePolicy, TimeService};

use crate::build::OperatorSettings;
use crate::build::agent_config::{
    DocumentCache, FleetInput, TenantInput, build_agent_config_document, build_agent_config_map,
};
use crate::build::daemonset::{build_daemonset, needs_net_bind};
use crate::build::endpointslice::{
    ZONE_LABEL, agent_endpoints, build_endpoint_slices, ready_endpoints,
};
use crate::build::gzip::MemberCache;
use crate::build::networkpolicy::{PolicyCache, TenantRule, build_network_policies_cached};
use crate::build::nts_material::NtsTenant;
use crate::build::rbac::{AgentRbac, build_rbac};
use crate::build::service::build_service;
use crate::build::status::{Blocked, Uncovered};
use crate::build::time_config::build_time_config;
use crate::error::Result;
use crate::index::{Index, TenantEntry, Triggers};
use crate::model::{ClockInfo, TimeServiceEntry};
use crate::names;
use crate::owned::{ChildKind, ChildRef};
use crate::ports::TenantKey;
use crate::resolve::{PodSet, resolve_pod_set};
use crate::selector::Selector;
use crate::validate::prefix_refusal;

/// Largest agent config written (gzipped): a ConfigMap holds at most 1 MiB of data, and its
/// metadata needs room too.
pub const MAX_CONFIG_BYTES: usize = 1_000_000;

pub use crate::validate::Refusal;

/// Everything a TimeService reconcile applies and reports.
#[derive(Debug)]
pub struct TimeServicePlan {
    /// Why agents are not (fully) run as specified.
    pub blocked: Option<Blocked>,
    /// The DaemonSet; `None` under Conflict (and any existing one must go).
    pub daemonset: Option<DaemonSet>,
    /// Agent identity and permissions.
    pub rbac: AgentRbac,
    /// Admission of tenants' peers and agents' egress: `<ts>-agent`, then as many further
    /// policies as the tenants' rules need (shared with the planner's cache).
    pub network_policies: Arc<[NetworkPolicy]>,
    /// The agent config; `None` when it would be invalid (the last good one stays).
    pub config: Option<AgentConfig>,
    /// The ConfigMap carrying `config`; `None` when there is none or it exceeds a ConfigMap's
    /// size limit (then `blocked` says so and the last good one stays).
    pub config_map: Option<ConfigMap>,
    /// Clocks of this TimeService's nodes.
    pub clocks: Vec<ClockInfo>,
    /// Nodes whose fresh NodeClock names this TimeService and lists a source its config does
    /// not give that node (placed or not: an agent run by hand counts too). Empty without a
    /// valid config.
    pub off_designated: Vec<String>,
    /// Nodes the placement selects that run no agent.
    pub uncovered: Uncovered,
    /// Served tenants, for audit events.
    pub tenants: Arc<ServedTenants>,
    /// Tenants in the agent config with NTS or symmetric keys, oldest first: whose
    /// certificates and keys the key material Secret holds while they fit.
    pub nts_tenants: Vec<NtsTenant>,
    /// Allow-list size of each served tenant.
    pub allow_list_sizes: Vec<usize>,
}

/// Served tenants by id: (namespace, name, uid).
pub type ServedTenants = BTreeMap<String, (String, String, Option<String>)>;

/// Age order of tenants: creationTimestamp (absent counts as newest), then name.
fn age(t: &TenantEntry) -> (bool, Option<k8s_openapi::jiff::Timestamp>, &str) {
    (t.created.is_none(), t.created, &t.name)
}

/// The oldest tenant of each `(namespace, Service name)`, the one allowed to own that
/// Service, and of each namespace, the one that writes its `time-config`. Both change only
/// with tenants, so they are found in one pass and kept while the roster epoch stays: a
/// restart reconciling every tenant no longer scans all tenants for each.
#[derive(Debug)]
pub struct Owners {
    epoch: u64,
    services: HashMap<(String, String), Arc<TenantEntry>>,
    namespaces: HashMap<String, Arc<TenantEntry>>,
}

impl Owners {
    /// The owners among the index's tenants.
    fn find(index: &Index) -> Self {
        let mut services: HashMap<(String, String), Arc<TenantEntry>> = HashMap::new();
        let mut namespaces: HashMap<String, Arc<TenantEntry>> = HashMap::new();
        // An invalid tenant owns nothing: it would otherwise refuse a valid younger one.
        for t in index.tenants().values().filter(|t| t.invalid.is_none()) {
            let key = (t.namespace.clone(), t.spec.service.name.clone());
            for slot in [
                services.entry(key).or_insert_with(|| t.clone()),
                namespaces
                    .entry(t.namespace.clone())
                    .or_insert_with(|| t.clone()),
            ] {
                if age(t) < age(slot) {
                    *slot = t.clone();
                }
            }
        }
        Self {
            epoch: index.roster_epoch(),
            services,
            namespaces,
        }
    }

    /// The tenant owning `tenant`'s Service name, when another one does.
    fn service_taken(&self, tenant: &TenantEntry) -> Option<&TenantEntry> {
        let key = (tenant.namespace.clone(), tenant.spec.service.name.clone());
        self.services
            .get(&key)
            .map(Arc::as_ref)
            .filter(|o| o.namespace != tenant.namespace || o.name != tenant.name)
    }

    /// Whether `tenant` writes its namespace's `time-config`: no tenant there is older.
    fn owns_time_config(&self, tenant: &TenantEntry) -> bool {
        self.namespaces
            .get(&tenant.namespace)
            .is_none_or(|oldest| age(oldest) >= age(tenant))
    }
}

/// Why `tenant` cannot be served, if it cannot.
pub fn tenant_refusal(
    index: &Index,
    owners: &Owners,
    tenant: &TenantEntry,
    port: Option<u16>,
) -> Option<Refusal> {
    if index.namespace_closed(&tenant.namespace) {
        return Some((
            "NamespaceClosed",
            format!(
                "namespace {:?} is closed to tenants (the operator's --closed-tenant-namespace, \
                 the chart's tenantNamespaces.denied)",
                tenant.namespace
            ),
        ));
    }
    if let Some(invalid) = &tenant.invalid {
        return Some(invalid.clone());
    }
    if let Err(unserved) = index.time_service_of(tenant) {
        return Some((unserved.reason(), unserved.message()));
    }
    if let Some(owner) = owners.service_taken(tenant) {
        return Some((
            "ServiceNameTaken",
            format!(
                "TenantTimePolicy {:?} already uses Service {:?}",
                owner.name, tenant.spec.service.name
            ),
        ));
    }
    if port.is_none() {
        return Some((
            "PortRangeExhausted",
            "the TimeService's tenant port range has no free port".into(),
        ));
    }
    None
}

/// What a tenant allows, as the agent config shares it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantSets {
    /// Its ipBlock ranges, aggregated.
    pub blocks: Vec<IpNet>,
    /// The pod sets its pod peers select.
    pub pod_sets: Vec<PodSet>,
}

/// A tenant's [`TenantSets`] and its pod sets resolved, in the same order.
#[derive(Clone, Debug)]
pub struct SetList {
    /// What the tenant allows.
    pub sets: Arc<TenantSets>,
    /// `sets.pod_sets`, resolved.
    pub resolved: Arc<[Arc<Vec<IpNet>>]>,
    /// Everything the tenant allows, aggregated: its blocks and every resolved set.
    pub allowed: Arc<Vec<IpNet>>,
    /// Unique within the planner. A tenant's list is made anew whenever its entry or one of
    /// its sets changes, so an equal revision promises equal blocks, sets, spec and deny list.
    pub revision: u64,
}

/// What a TimeService's last plan built, kept by the planner for the next plan to reuse.
#[derive(Debug, Default)]
pub struct PlanCache {
    /// The TimeService's generation it was built for (see [`Index::time_service_generation`]):
    /// a TimeService deleted and made again starts afresh.
    generation: Option<u64>,
    roster: Option<Arc<Roster>>,
    document: DocumentCache,
    members: MemberCache,
    network_policy: Option<PolicyCache>,
    /// Tenants left out because the config would not fit a ConfigMap with them (youngest
    /// first); `plan_tenant` refuses them.
    shed: BTreeSet<TenantKey>,
}

/// The tenants a TimeService serves, in id order, with their ports. It depends only on
/// tenants, TimeServices and port allocations, so it is kept while the index's
/// [`Index::roster_epoch`] stays: pod, namespace, node and clock events reuse it.
#[derive(Debug)]
pub struct Roster {
    epoch: u64,
    served: Vec<ServedTenant>,
    tenants: Arc<ServedTenants>,
}

#[derive(Debug)]
struct ServedTenant {
    key: TenantKey,
    id: String,
    port: u16,
    entry: Arc<TenantEntry>,
}

impl ServedTenant {
    /// The tenant's resolved deny list.
    fn denied(&self) -> &[IpNet] {
        self.entry.policy.as_ref().map_or(&[][..], |p| &p.denied)
    }
}

impl Roster {
    /// Every tenant of TimeService `name` that is not refused.
    fn build(index: &Index, owners: &Owners, name: &str) -> Self {
        let ports = index.ports_of(name);
        let mut served = Vec::new();
        for t in index.tenants().values() {
            if !index.time_service_of(t).is_ok_and(|ts| ts.name == name) {
                continue;
            }
            let key = t.key();
            let port = ports.get(&key).copied().flatten();
            if tenant_refusal(index, owners, t, port).is_some() {
                continue;
            }
            let Some(port) = port else { continue };
            served.push(ServedTenant {
                id: names::tenant_id(&key.0, &key.1),
                key,
                port,
                entry: t.clone(),
            });
        }
        served.sort_by(|a, b| a.id.cmp(&b.id));
        let tenants = served
            .iter()
            .map(|s| {
                let (ns, name) = s.key.clone();
                (s.id.clone(), (ns, name, s.entry.uid.clone()))
            })
            .collect();
        Self {
            epoch: index.roster_epoch(),
            served,
            tenants: Arc::new(tenants),
        }
    }
}

/// A resolved pod set and the generation of its namespace's pods it was resolved at.
#[derive(Debug)]
struct CachedSet {
    pods: Option<u64>,
    nets: Arc<Vec<IpNet>>,
}

/// Every planning cache, each kept while the index says its inputs are unchanged. One planner
/// plans from one index: its caches are checked against that index's generations.
#[derive(Debug, Default)]
pub struct Planner {
    /// Resolved pod sets by namespace, then selector.
    pod_sets: HashMap<String, HashMap<Selector, CachedSet>>,
    /// The pod sets and blocks each tenant allows, by slot (see [`TenantEntry::slot`]), with
    /// the generation they were found at.
    tenant_sets: Vec<Option<(u64, Arc<TenantSets>)>>,
    /// Each tenant's sets with its pod sets resolved, in `TenantSets::pod_sets` order: a plan
    /// reads these instead of looking up every set by namespace and selector. Made anew
    /// whenever the tenant's list generation moves (its entry, sets or a pod it selects
    /// changed), so a list's revision stands for all of the tenant's inputs.
    set_lists: Vec<Option<(u64, SetList)>>,
    /// The last revision given to a set list.
    set_list_revision: u64,
    /// Service and time-config owners as of their roster epoch.
    owners: Option<Arc<Owners>>,
    /// What each TimeService's last plan built, for the next one to reuse.
    plan_caches: HashMap<String, PlanCache>,
    /// Each TimeService's shed tenants, as its last plan found them; kept apart from its
    /// `PlanCache` so that tenants are refused alike while a plan of it is being built.
    shed: HashMap<String, BTreeSet<TenantKey>>,
    /// The roster epoch at which caches of what the index no longer holds were last dropped.
    pruned_at: Option<u64>,
}

/// What a TimeService's plan reads from the index, taken under the index lock (all of it
/// shared or small), with its cache taken out of the planner: [`TimeServiceDraft::build`] needs
/// no index, and [`Planner::keep`] takes the cache back.
#[derive(Debug)]
pub struct TimeServiceDraft {
    name: String,
    blocked: Option<Blocked>,
    peer_port: Option<u16>,
    roster: Arc<Roster>,
    /// Served tenants within their prefix limit: their place in the roster and their list.
    lists: Vec<(usize, SetList)>,
    /// Pods took some tenant over its prefix limit.
    capped: bool,
    fleet: FleetInput,
    clocks: Vec<ClockInfo>,
    /// Every fresh clock naming this TimeService, placed or not: node and source hosts.
    reporting: Vec<(String, Vec<String>)>,
    uncovered: Uncovered,
    time_services: BTreeSet<String>,
    cache: PlanCache,
}

impl Planner {
    /// A planner with cold caches.
    pub fn new() -> Self {
        Self::default()
    }

    /// The allowed CIDRs of a tenant (cached); empty when its policy does not compile.
    ///
    /// The union of its blocks and pod sets, as the agents resolve it: pod sets are cached and
    /// shared, so a pod event resolves the one set it changed, not again the pods of every
    /// namespace each affected tenant selects (`CompiledPolicy::resolve_allowed`, to which
    /// `tests/resolve_oracle.rs` holds this).
    pub fn allowed(&mut self, index: &Index, key: &TenantKey) -> Arc<Vec<IpNet>> {
        self.tenant_set_list(index, key).allowed
    }

    /// The blocks and pod sets a tenant allows (cached); empty when its policy does not compile.
    pub fn tenant_sets(&mut self, index: &Index, key: &TenantKey) -> Arc<TenantSets> {
        self.sets_of(index, index.tenants().get(key).map(Arc::as_ref))
    }

    /// A tenant's sets and its pod sets resolved, in `pod_sets` order (cached).
    pub fn tenant_set_list(&mut self, index: &Index, key: &TenantKey) -> SetList {
        self.set_list_of(index, index.tenants().get(key).map(Arc::as_ref))
    }

    /// [`Planner::tenant_sets`] of the index's current entry of a tenant (`None`: no tenant).
    fn sets_of(&mut self, index: &Index, entry: Option<&TenantEntry>) -> Arc<TenantSets> {
        let slot = entry.and_then(|e| e.slot);
        let generation = slot.and_then(|s| index.slot_generations(s)).map(|g| g.sets);
        if let Some(hit) = cached(&self.tenant_sets, slot, generation) {
            return hit;
        }
        let sets = Arc::new(match entry.map(|e| &e.policy) {
            Some(Ok(policy)) => TenantSets {
                blocks: policy.blocks(),
                pod_sets: policy.pod_sets(index.cluster()),
            },
            _ => TenantSets::default(),
        });
        store(&mut self.tenant_sets, slot, generation, sets.clone());
        sets
    }

    /// [`Planner::tenant_set_list`] of the index's current entry of a tenant (`None`: no
    /// tenant). Looked up by slot: a plan asks for every served tenant's on every pod event.
    fn set_list_of(&mut self, index: &Index, entry: Option<&TenantEntry>) -> SetList {
        let slot = entry.and_then(|e| e.slot);
        let generation = slot.and_then(|s| index.slot_generations(s)).map(|g| g.list);
        if let Some(hit) = cached(&self.set_lists, slot, generation) {
            return hit;
        }
        let sets = self.sets_of(index, entry);
        let resolved: Arc<[Arc<Vec<IpNet>>]> = sets
            .pod_sets
            .iter()
            .map(|p| self.pod_set(index, p))
            .collect();
        let mut nets = sets.blocks.clone();
        for set in resolved.iter() {
            nets.extend_from_slice(set);
        }
        self.set_list_revision += 1;
        let list = SetList {
            allowed: Arc::new(IpNet::aggregate(&nets)),
            sets,
            resolved,
            revision: self.set_list_revision,
        };
        store(&mut self.set_lists, slot, generation, list.clone());
        list
    }

    /// The addresses of a pod set (cached).
    pub fn pod_set(&mut self, index: &Index, set: &PodSet) -> Arc<Vec<IpNet>> {
        let pods = index.pod_generation(&set.0);
        if let Some(cached) = self
            .pod_sets
            .get_mut(&set.0)
            .and_then(|m| m.get_mut(&set.1))
        {
            if cached.pods != pods {
                // Another pod of the namespace changed: the set may not have. Equal contents
                // keep their Arc, which the agent config shares sets by.
                let nets = resolve_pod_set(index.cluster(), set);
                if *cached.nets != nets {
                    cached.nets = Arc::new(nets);
                }
                cached.pods = pods;
            }
            return cached.nets.clone();
        }
        let nets = Arc::new(resolve_pod_set(index.cluster(), set));
        self.pod_sets.entry(set.0.clone()).or_default().insert(
            set.1.clone(),
            CachedSet {
                pods,
                nets: nets.clone(),
            },
        );
        nets
    }

    /// The Service and time-config owners as of the index's roster epoch (cached).
    fn owners(&mut self, index: &Index) -> Arc<Owners> {
        let epoch = index.roster_epoch();
        if let Some(hit) = self.owners.as_ref().filter(|o| o.epoch == epoch) {
            return hit.clone();
        }
        let owners = Arc::new(Owners::find(index));
        self.owners = Some(owners.clone());
        owners
    }

    /// Drops the caches of tenants, namespaces and TimeServices the index no longer holds.
    /// Deleting a tenant or TimeService moves the roster epoch, so this runs once per roster
    /// change, never per pod event.
    fn prune(&mut self, index: &Index) {
        let epoch = index.roster_epoch();
        if self.pruned_at == Some(epoch) {
            return;
        }
        self.pruned_at = Some(epoch);
        for (slot, cache) in self.tenant_sets.iter_mut().enumerate() {
            if index.slot_generations(slot).is_none() {
                *cache = None;
            }
        }
        for (slot, cache) in self.set_lists.iter_mut().enumerate() {
            if index.slot_generations(slot).is_none() {
                *cache = None;
            }
        }
        self.pod_sets
            .retain(|ns, _| index.pod_generation(ns).is_some());
        self.plan_caches
            .retain(|name, _| index.time_service_generation(name).is_some());
        self.shed
            .retain(|name, _| index.time_service_generation(name).is_some());
    }

    /// Plans a TimeService: [`Planner::draft_time_service`], [`TimeServiceDraft::build`] and
    /// [`Planner::keep`] in one (the controller runs the build outside the index lock).
    pub fn plan_time_service(
        &mut self,
        index: &Index,
        ts: &TimeService,
        settings: &OperatorSettings,
    ) -> Result<TimeServicePlan> {
        let mut draft = self.draft_time_service(index, ts);
        let plan = draft.build(ts, settings)?;
        // The caller plans its tenants itself (tests, benchmarks); the controller sends these.
        let _shed_changed = self.keep(draft);
        Ok(plan)
    }

    /// Takes from the index what a plan of `ts` needs. Only what an event can have changed is
    /// made again: the roster of served tenants when tenants or TimeServices changed, a
    /// tenant's set list when its generation moved. `ts` is planned as handed over, which may
    /// be newer than the index's copy (the feed brings that one, and triggers again).
    pub fn draft_time_service(&mut self, index: &Index, ts: &TimeService) -> TimeServiceDraft {
        self.prune(index);
        let name = ts.name_any();
        let planned = TimeServiceEntry {
            name: name.clone(),
            created: ts.metadata.creation_timestamp.as_ref().map(|t| t.0),
            spec: ts.spec.clone(),
        };
        let blocked = index
            .conflicts_with(Some(&planned))
            .remove(&name)
            .map(|with| Blocked::Conflict { with })
            .or_else(|| ts.spec.placement.problem().map(Blocked::Invalid));
        let nodes = index.nodes_matching(&ts.spec.placement.agent_node_selector());
        let generation = index.time_service_generation(&name);
        let mut cache = self
            .plan_caches
            .remove(&name)
            .filter(|c| c.generation == generation)
            .unwrap_or_else(|| PlanCache {
                generation,
                ..PlanCache::default()
            });
        let roster = match cache.roster.take() {
            Some(roster) if roster.epoch == index.roster_epoch() => roster,
            _ => Arc::new(Roster::build(index, &self.owners(index), &name)),
        };
        cache.roster = Some(roster.clone());
        // Pods can take a tenant over its prefix limit: refused alone, here as in `plan_tenant`.
        let mut capped = false;
        let mut lists = Vec::with_capacity(roster.served.len());
        for (i, served) in roster.served.iter().enumerate() {
            let list = self.set_list_of(index, Some(&served.entry));
            if prefix_refusal(list.allowed.len(), served.denied().len()).is_some() {
                capped = true;
            } else {
                lists.push((i, list));
            }
        }

        let agents = index.agent_pods(&name);
        let mut fleet = FleetInput {
            agent_addresses: agents.iter().flat_map(|p| p.ips.iter().copied()).collect(),
            ..FleetInput::default()
        };
        if let Some(tier) = &ts.spec.egress_tier {
            let egress_nodes: BTreeSet<String> = index
                .nodes_matching(&tier.node_selector)
                .intersection(&nodes)
                .cloned()
                .collect();
            fleet.egress_addresses = agents
                .iter()
                .filter(|p| {
                    p.node_name
                        .as_ref()
                        .is_some_and(|n| egress_nodes.contains(n))
                })
                .flat_map(|p| p.ips.iter().copied())
                .collect::<Vec<IpAddr>>();
            fleet.egress_nodes = egress_nodes.into_iter().collect();
        }
        // A stale clock (see `crate::freshness`) reports nothing trustworthy.
        let fresh = index.fresh_clocks();
        let clocks = index
            .clocks()
            .iter()
            .filter(|(node, c)| {
                c.time_service == name && nodes.contains(*node) && fresh.contains(*node)
            })
            .map(|(_, c)| c.clone())
            .collect();
        // An agent runs where its pod is ready, or where it reports (starting, unsynchronized:
        // readiness means synchronized).
        let running: BTreeSet<&str> = agents
            .iter()
            .filter(|p| p.ready && !p.terminated)
            .filter_map(|p| p.node_name.as_deref())
            .chain(
                index
                    .clocks()
                    .iter()
                    .filter(|(node, c)| c.time_service == name && fresh.contains(*node))
                    .map(|(node, _)| node.as_str()),
            )
            .collect();
        let uncovered = Uncovered::find(&index.placed_nodes(&ts.spec), &running);
        let reporting = index
            .clocks()
            .iter()
            .filter(|(node, c)| c.time_service == name && fresh.contains(*node))
            .map(|(node, c)| (node.clone(), c.sources.clone()))
            .collect();
        let mut time_services: BTreeSet<String> = index.time_services().keys().cloned().collect();
        time_services.insert(name.clone());
        TimeServiceDraft {
            name,
            blocked,
            peer_port: Index::peer_port(&ts.spec),
            roster,
            lists,
            capped,
            fleet,
            clocks,
            reporting,
            uncovered,
            time_services,
            cache,
        }
    }

    /// Takes back the cache of a built draft, for the next plan of its TimeService to reuse.
    /// Returns the tenants whose place in the agent config this plan gave or took
    /// (`AgentConfigFull`): their status changes now, not at their next resync.
    pub fn keep(&mut self, draft: TimeServiceDraft) -> Triggers {
        let before = self.shed.get(&draft.name);
        let now = &draft.cache.shed;
        let tenants: BTreeSet<TenantKey> = match before {
            Some(before) => before.symmetric_difference(now).cloned().collect(),
            None => now.clone(),
        };
        self.shed.insert(draft.name.clone(), now.clone());
        self.plan_caches.insert(draft.name, draft.cache);
        Triggers {
            tenants,
            ..Triggers::default()
        }
    }
}

impl TimeServiceDraft {
    /// Builds the plan: the agent config (a tenant's config and text again only when its set
    /// list or port changed), its ConfigMap (gzipped, only changed members again), the
    /// DaemonSet, RBAC and the NetworkPolicies (again only when the roster or the spec
    /// changed). Reads no index.
    pub fn build(
        &mut self,
        ts: &TimeService,
        settings: &OperatorSettings,
    ) -> Result<TimeServicePlan> {
        let TimeServiceDraft {
            name,
            blocked,
            peer_port,
            roster,
            lists,
            capped,
            fleet,
            clocks,
            reporting,
            uncovered,
            time_services,
            cache,
        } = self;
        let (name, peer_port, capped) = (name.as_str(), *peer_port, *capped);
        let mut blocked = blocked.clone();
        let served: Vec<&ServedTenant> = lists.iter().map(|(i, _)| &roster.served[*i]).collect();
        let allow_list_sizes = lists.iter().map(|(_, l)| l.allowed.len()).collect();
        let inputs: Vec<TenantInput<'_>> = served
            .iter()
            .zip(lists.iter())
            .map(|(s, (_, list))| TenantInput {
                id: &s.id,
                port: s.port,
                allowed: &list.sets.blocks,
                sets: &list.resolved,
                denied: s.denied(),
                spec: &s.entry.spec,
                revision: Some(list.revision),
            })
            .collect();
        let (mut config, mut document) = build_agent_config_document(
            name,
            &ts.spec,
            peer_port,
            &inputs,
            fleet,
            &mut cache.document,
        );
        let config_problems = crate::build::agent_config::validate_for_operator(&config).err();
        let mut config_map = match &config_problems {
            None => Some(build_agent_config_map(
                ts,
                settings,
                &config,
                &document,
                &mut cache.members,
            )?),
            Some(_) => None,
        };
        let mut size = config_map.as_ref().map(config_map_bytes).unwrap_or(0);
        // Too large for one ConfigMap: tenants are admitted oldest first while the config fits,
        // so tenants can only ever crowd out younger ones, never the TimeService.
        cache.shed.clear();
        if size > MAX_CONFIG_BYTES && config_problems.is_none() {
            let mut by_age: Vec<usize> = (0..inputs.len()).collect();
            by_age.sort_by_key(|i| age(&served[*i].entry));
            let fits = |kept: &[usize], cache: &mut PlanCache| -> Result<_> {
                let mut subset: Vec<TenantInput<'_>> =
                    kept.iter().map(|i| inputs[*i].clone()).collect();
                subset.sort_by(|a, b| a.id.cmp(b.id));
                let (config, document) = build_agent_config_document(
                    name,
                    &ts.spec,
                    peer_port,
                    &subset,
                    fleet,
                    &mut cache.document,
                );
                let cm =
                    build_agent_config_map(ts, settings, &config, &document, &mut cache.members)?;
                let size = config_map_bytes(&cm);
                Ok((size <= MAX_CONFIG_BYTES, (config, document, cm, size)))
            };
            // The most tenants, oldest first, whose config fits (more tenants, larger config).
            let (mut low, mut high) = (0, by_age.len().saturating_sub(1));
            let mut best = None;
            while low < high {
                let mid = (low + high).div_ceil(2);
                let (ok, built) = fits(&by_age[..mid], cache)?;
                if ok {
                    low = mid;
                    best = Some(built);
                } else {
                    high = mid - 1;
                }
            }
            let best = match best {
                Some(best) => Some(best),
                None => fits(&[], cache)?.1.into(),
            };
            if let Some((c, d, cm, sz)) = best {
                (config, document, config_map, size) = (c, d, Some(cm), sz);
            }
            cache.shed = by_age[low..]
                .iter()
                .map(|i| served[*i].key.clone())
                .collect();
        }
        let config = match config_problems {
            None => Some(config),
            Some(problems) => {
                let why = problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                blocked.get_or_insert(Blocked::Invalid(format!(
                    "the agent config would be invalid: {why}"
                )));
                None
            }
        };
        drop(document);
        // Too large even without tenants: the TimeService's own fault. Keep the config for
        // inspection, write nothing.
        let config_map = if size > MAX_CONFIG_BYTES {
            blocked.get_or_insert(Blocked::Invalid(format!(
                "the agent config is {size} bytes gzipped without any tenant, over the ConfigMap \
                 limit of {MAX_CONFIG_BYTES}"
            )));
            None
        } else {
            config_map
        };
        let net_bind = needs_net_bind(served.iter().map(|s| s.port).chain(peer_port));
        let daemonset = match blocked {
            Some(Blocked::Conflict { .. }) => None,
            _ => Some(build_daemonset(ts, settings, net_bind)?),
        };
        let rules: Vec<TenantRule<'_>> = served
            .iter()
            .map(|s| TenantRule {
                namespace: &s.key.0,
                peers: &s.entry.spec.allowed_clients,
                port: s.port,
                nts: s.entry.spec.nts().is_some(),
            })
            .collect();
        // The rules come from the roster alone (an unchanged roster, unchanged rules) unless pods
        // took a tenant over its limit: then they are compared.
        let network_policies = build_network_policies_cached(
            &mut cache.network_policy,
            ts,
            settings,
            &rules,
            (!capped).then_some(roster.epoch),
            peer_port,
        )?;
        let mut nts_served: Vec<&&ServedTenant> = served
            .iter()
            .filter(|s| {
                (s.entry.spec.nts().is_some() || s.entry.spec.symmetric_keys().is_some())
                    && !cache.shed.contains(&s.key)
            })
            .collect();
        nts_served.sort_by(|a, b| {
            age(&a.entry)
                .cmp(&age(&b.entry))
                .then_with(|| a.key.cmp(&b.key))
        });
        let nts_tenants = nts_served
            .into_iter()
            .map(|s| NtsTenant {
                key: s.key.clone(),
                port: s.port,
                certificate_secret: s
                    .entry
                    .spec
                    .nts()
                    .and_then(|a| a.nts_certificate_secret.clone()),
                keys_secret: s
                    .entry
                    .spec
                    .symmetric_keys()
                    .and_then(|a| a.symmetric_keys_secret.clone()),
            })
            .collect();
        let off_designated = config
            .as_ref()
            .map(|config| {
                reporting
                    .iter()
                    .filter(|(node, sources)| {
                        !config.undesignated_sources(node, sources).is_empty()
                    })
                    .map(|(node, _)| node.clone())
                    .collect()
            })
            .unwrap_or_default();
        Ok(TimeServicePlan {
            blocked,
            daemonset,
            rbac: build_rbac(ts, settings, time_services.iter().map(String::as_str))?,
            network_policies,
            config,
            config_map,
            clocks: clocks.clone(),
            off_designated,
            uncovered: uncovered.clone(),
            allow_list_sizes,
            tenants: roster.tenants.clone(),
            nts_tenants,
        })
    }
}

/// The value cached for `slot` if it was made at `generation`.
fn cached<T: Clone>(
    table: &[Option<(u64, T)>],
    slot: Option<usize>,
    generation: Option<u64>,
) -> Option<T> {
    match (table.get(slot?), generation) {
        (Some(Some((at, value))), Some(generation)) if *at == generation => Some(value.clone()),
        _ => None,
    }
}

/// Caches `value` for `slot`, made at `generation` (nothing without either).
fn store<T>(
    table: &mut Vec<Option<(u64, T)>>,
    slot: Option<usize>,
    generation: Option<u64>,
    value: T,
) {
    let (Some(slot), Some(generation)) = (slot, generation) else {
        return;
    };
    if table.len() <= slot {
        table.resize_with(slot + 1, || None);
    }
    table[slot] = Some((generation, value));
}

/// What counts against a ConfigMap's size limit: its data and binary data.
pub fn config_map_bytes(cm: &ConfigMap) -> usize {
    let data: usize = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    let binary: usize = cm
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.0.len())
        .sum();
    data + binary
}
/// Everything a tenant reconcile applies and reports.
#[derive(Debug)]
pub struct TenantPlan {
    /// Why the tenant is not served.
    pub refused: Option<Refusal>,
    /// The serving TimeService.
    pub time_service: Option<String>,
    /// Allocated port.
    pub port: Option<u16>,
    /// The Service.
    pub service: Option<Service>,
    /// The EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// `time-config`, when this tenant owns it in its namespace.
    pub time_config: Option<ConfigMap>,
    /// Ready endpoints in `slices`.
    pub ready_endpoints: i32,
    /// CIDRs in the allow list.
    pub allow_list_size: i32,
    /// An existing object that is not Stratum's where the plan would put one of its children:
    /// left alone and reported as the tenant's `Conflict` condition.
    pub conflict: Option<ChildRef>,
    /// Stratum's children of this tenant that the plan no longer has: deleted after the apply.
    pub prune: Vec<ChildRef>,
}

impl TenantPlan {
    /// The children this plan applies, by kind and name (nothing when refused).
    pub fn children(&self) -> BTreeSet<(ChildKind, String)> {
        if self.refused.is_some() {
            return BTreeSet::new();
        }
        let name = |m: &ObjectMeta| m.name.clone().unwrap_or_default();
        let services = self
            .service
            .iter()
            .map(|s| (ChildKind::Service, name(&s.metadata)));
        let slices = self
            .slices
            .iter()
            .map(|s| (ChildKind::EndpointSlice, name(&s.metadata)));
        let config = self
            .time_config
            .iter()
            .map(|c| (ChildKind::ConfigMap, name(&c.metadata)));
        services.chain(slices).chain(config).collect()
    }
}

impl Planner {
    /// Plans a tenant: what to apply, what clashes with objects Stratum does not own, and which
    /// of its children to delete afterwards. The plan is small (a Service, two EndpointSlices,
    /// a ConfigMap), so it is made in one step.
    pub fn plan_tenant(&mut self, index: &Index, tenant: &TenantTimePolicy) -> Result<TenantPlan> {
        self.prune(index);
        let mut plan = self.plan_tenant_objects(index, tenant)?;
        let ns = tenant.metadata.namespace.as_deref().unwrap_or_default();
        plan.prune = index
            .children()
            .orphans(ns, &tenant.name_any(), &plan.children());
        Ok(plan)
    }

    fn plan_tenant_objects(
        &mut self,
        index: &Index,
        tenant: &TenantTimePolicy,
    ) -> Result<TenantPlan> {
        let mut plan = TenantPlan {
            refused: None,
            time_service: None,
            port: None,
            service: None,
            slices: Vec::new(),
            time_config: None,
            ready_endpoints: 0,
            allow_list_size: 0,
            conflict: None,
            prune: Vec::new(),
        };
        // Plan from the object being reconciled, which may be newer than the index; the index's
        // entry saves compiling its peers again when it is the same.
        let entry = match index.held_tenant(tenant) {
            Some(held) => Some(held.clone()),
            None => TenantEntry::new(tenant, index.server_version()).map(Arc::new),
        };
        let Some(entry) = entry else {
            return Err(crate::error::Error::MissingMetadata(
                "TenantTimePolicy namespace or name",
            ));
        };
        let key = entry.key();
        let ts = match index.time_service_of(&entry) {
            Ok(ts) => ts.name.clone(),
            Err(unserved) => {
                plan.refused = Some((unserved.reason(), unserved.message()));
                return Ok(plan);
            }
        };
        let port = index.ports_of(&ts).get(&key).copied().flatten();
        plan.time_service = Some(ts.clone());
        plan.port = port;
        let owners = self.owners(index);
        if let Some(refusal) = tenant_refusal(index, &owners, &entry, port) {
            plan.refused = Some(refusal);
            return Ok(plan);
        }
        let Some(port) = port else { return Ok(plan) };
        // Never adopt: a Service of this name that Stratum did not create stays the user's, and
        // nothing of this tenant (EndpointSlices, time-config) may route to it.
        if let Some(clash) = index.children().foreign(
            ChildKind::Service,
            &entry.namespace,
            &entry.spec.service.name,
        ) {
            plan.refused = Some((
                "ServiceConflict",
                format!(
                    "{clash} exists and was not created by Stratum, which leaves it alone; \
                 set spec.service.name to a free name or remove that Service"
                ),
            ));
            plan.conflict = Some(clash);
            return Ok(plan);
        }
        let allowed = self.allowed(index, &key).len();
        plan.allow_list_size = i32::try_from(allowed).unwrap_or(i32::MAX);
        let denied = entry.policy.as_ref().map_or(0, |p| p.denied.len());
        if let Some(refusal) = prefix_refusal(allowed, denied) {
            plan.refused = Some(refusal);
            return Ok(plan);
        }
        if self.shed.get(&ts).is_some_and(|shed| shed.contains(&key)) {
            plan.refused = Some((
                "AgentConfigFull",
                format!(
                    "the agent config of TimeService {ts:?} holds no more tenants: with this one it \
                 would exceed the ConfigMap limit of {MAX_CONFIG_BYTES} bytes gzipped, and older \
                 tenants keep their place; narrow spec.allowedClients (ipBlocks aggregate better \
                 than many pods)"
                ),
            ));
            return Ok(plan);
        }
        let zones: BTreeMap<String, Option<String>> = index
            .nodes()
            .iter()
            .map(|(n, info)| (n.clone(), info.labels.get(ZONE_LABEL).cloned()))
            .collect();
        let agents = index.agent_pods(&ts);
        let endpoints = agent_endpoints(
            &agents,
            index.clocks(),
            &index.fresh_clocks(),
            &zones,
            &ts,
            entry.max_root_distance_nanos(),
        );
        plan.slices = build_endpoint_slices(tenant, &ts, port, &endpoints)?;
        plan.ready_endpoints = ready_endpoints(&plan.slices);
        plan.service = Some(build_service(tenant, &ts, port)?);
        if owners.owns_time_config(&entry) {
            match index.children().foreign(
                ChildKind::ConfigMap,
                &entry.namespace,
                names::TIME_CONFIG_NAME,
            ) {
                Some(clash) => plan.conflict = Some(clash),
                None => plan.time_config = Some(build_time_config(tenant, &ts)?),
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::build::fixtures;

    fn tenant(ns: &str, name: &str, service: &str, created: i64) -> TenantTimePolicy {
        let mut t = fixtures::tenant(
            ns,
            name,
            serde_json::json!({ "service": { "name": service } }),
        );
        t.metadata.creation_timestamp = Some(Time(
            Timestamp::from_second(1_700_000_000 + created).unwrap(),
        ));
        t
    }

    fn index_with(tenants: &[&TenantTimePolicy]) -> Index {
        let mut index = Index::new("stratum-system");
        let _ = index.apply_time_service(&fixtures::time_service("cluster"));
        for t in tenants {
            let _ = index.apply_tenant(t);
        }
        index
    }

    #[test]
    fn a_tenant_in_a_deleted_tenants_slot_never_gets_that_tenants_cached_allow_list() {
        let block =
            |cidr: &str| serde_json::json!({ "allowedClients": [{ "ipBlock": { "cidr": cidr } }] });
        let gone = fixtures::tenant("a", "gone", block("10.0.0.0/8"));
        let mut index = index_with(&[&gone]);
        let mut planner = Planner::new();
        let key = |ns: &str, name: &str| (ns.to_owned(), name.to_owned());
        let slot = |index: &Index, k: &TenantKey| index.tenants()[k].slot;
        assert_eq!(
            *planner.allowed(&index, &key("a", "gone")),
            ["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        let freed = slot(&index, &key("a", "gone"));
        let _ = index.delete_tenant("a", "gone");
        let _ = index.apply_tenant(&fixtures::tenant("b", "new", block("192.168.0.0/16")));
        assert_eq!(slot(&index, &key("b", "new")), freed, "the slot is reused");
        assert_eq!(
            *planner.allowed(&index, &key("b", "new")),
            ["192.168.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(planner.allowed(&index, &key("a", "gone")).is_empty());
    }

    #[test]
    fn the_oldest_claimant_owns_a_service_name_and_the_next_takes_it_when_it_goes() {
        let older = tenant("vms", "b-older", "ntp", 1);
        let younger = tenant("vms", "a-younger", "ntp", 2);
        let elsewhere = tenant("db", "c", "ntp", 3);
        let mut index = index_with(&[&older, &younger, &elsewhere]);
        let mut planner = Planner::new();
        assert!(
            planner
                .plan_tenant(&index, &older)
                .unwrap()
                .refused
                .is_none()
        );
        assert!(
            planner
                .plan_tenant(&index, &elsewhere)
                .unwrap()
                .refused
                .is_none()
        );
        let (reason, message) = planner
            .plan_tenant(&index, &younger)
            .unwrap()
            .refused
            .unwrap();
        assert_eq!(reason, "ServiceNameTaken");
        assert!(message.contains("b-older"), "{message}");
        let ts = fixtures::time_service("cluster");
        let settings = fixtures::settings();
        let served = planner
            .plan_time_service(&index, &ts, &settings)
            .unwrap()
            .tenants;
        assert_eq!(
            served.keys().collect::<Vec<_>>(),
            ["db/c", "vms/b-older"],
            "the refused tenant is not served"
        );

        let _ = index.delete_tenant("vms", "b-older");
        assert!(
            planner
                .plan_tenant(&index, &younger)
                .unwrap()
                .refused
                .is_none()
        );
        let served = planner
            .plan_time_service(&index, &ts, &settings)
            .unwrap()
            .tenants;
        assert_eq!(served.keys().collect::<Vec<_>>(), ["db/c", "vms/a-younger"]);
    }

    #[test]
    fn only_the_oldest_tenant_of_a_namespace_writes_its_time_config() {
        let older = tenant("vms", "b", "ntp-b", 1);
        let younger = tenant("vms", "a", "ntp-a", 2);
        let mut index = index_with(&[&younger, &older]);
        let mut planner = Planner::new();
        assert!(
            planner
                .plan_tenant(&index, &older)
                .unwrap()
                .time_config
                .is_some()
        );
        let plan = planner.plan_tenant(&index, &younger).unwrap();
        assert!(plan.refused.is_none());
        assert!(plan.time_config.is_none());
        let _ = index.delete_tenant("vms", "b");
        assert!(
            planner
                .plan_tenant(&index, &younger)
                .unwrap()
                .time_config
                .is_some()
        );
        // A newer tenant arriving later does not take it over.
        let newest = tenant("vms", "c", "ntp-c", 3);
        let _ = index.apply_tenant(&newest);
        assert!(
            planner
                .plan_tenant(&index, &newest)
                .unwrap()
                .time_config
                .is_none()
        );
        assert!(
            planner
                .plan_tenant(&index, &younger)
                .unwrap()
                .time_config
                .is_some()
        );
    }

    #[test]
    fn an_nts_upstream_reaches_agents_with_its_ca_bundle_and_a_bundle_without_certificates_blocks()
    {
        const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let index = index_with(&[]);
        let mut ts = fixtures::time_service("cluster");
        ts.spec.upstreams[0].nts = true;
        ts.spec.upstreams[0].nts_port = Some(4461);
        ts.spec.nts = Some(stratum_api::time_service::NtsSettings {
            ca_bundle: Some(CA.into()),
        });
        let plan = Planner::new()
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        assert!(plan.blocked.is_none(), "{:?}", plan.blocked);
        let config = plan.config.as_ref().unwrap();
        assert!(config.upstreams[0].nts);
        assert_eq!(config.upstreams[0].nts_port, Some(4461));
        assert_eq!(config.nts_ca_bundle.as_deref(), Some(CA));

        // A bundle agents could not use blocks the config: the last good one stays in force,
        // rather than every node losing its NTS upstreams.
        ts.spec.nts = Some(stratum_api::time_service::NtsSettings {
            ca_bundle: Some("not a certificate".into()),
        });
        let plan = Planner::new()
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        match &plan.blocked {
            Some(Blocked::Invalid(why)) => assert!(why.contains("nts.caBundle"), "{why}"),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
        assert!(plan.config.is_none());
        assert!(plan.config_map.is_none());

        // Without an nts upstream the bundle is not written at all.
        ts.spec.upstreams[0].nts = false;
        let plan = Planner::new()
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        assert!(plan.blocked.is_none(), "{:?}", plan.blocked);
        assert_eq!(plan.config.as_ref().unwrap().nts_ca_bundle, None);
    }

    #[test]
    fn nodes_reporting_sources_their_time_service_does_not_designate_are_named_for_it_alone() {
        use stratum_api::node_clock::{SourceState, SourceStatus};
        use stratum_api::{NodeClock, NodeClockSpec, NodeClockStatus};

        let mut index = index_with(&[]);
        let clock = |node: &str, ts: &str, sources: &[&str]| {
            let mut clock = NodeClock::new(
                node,
                NodeClockSpec {
                    time_service: ts.into(),
                },
            );
            clock.status = Some(NodeClockStatus {
                sources: sources
                    .iter()
                    .map(|name| SourceStatus {
                        name: (*name).into(),
                        address: "192.0.2.1:123".into(),
                        state: SourceState::Selected,
                        ..SourceStatus::default()
                    })
                    .collect(),
                ..NodeClockStatus::default()
            });
            clock
        };
        // The fixture designates pool.ntp.org. Node placement does not matter: an agent run
        // by hand on a node no TimeService selects counts too.
        let _ = index.apply_clock(&clock(
            "honest",
            "cluster",
            &["pool.ntp.org", "POOL.ntp.org."],
        ));
        let _ = index.apply_clock(&clock(
            "rogue",
            "cluster",
            &["pool.ntp.org", "ntp.rogue.example"],
        ));
        let _ = index.apply_clock(&clock("other", "another", &["ntp.rogue.example"]));
        let _ = index.apply_clock(&clock("silent", "cluster", &[]));

        let off_designated = |ts: &str| {
            Planner::new()
                .plan_time_service(&index, &fixtures::time_service(ts), &fixtures::settings())
                .unwrap()
                .off_designated
        };
        assert_eq!(
            off_designated("cluster"),
            ["rogue"],
            "another TimeService's node is its own business, never this one's"
        );
        assert_eq!(off_designated("another"), ["other"]);
    }

    #[test]
    fn nodes_without_agent_are_placed_nodes_with_neither_a_ready_agent_pod_nor_a_fresh_clock() {
        use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSpec, PodStatus, Taint};
        use stratum_api::{NodeClock, NodeClockSpec};

        use crate::model::NodeInfo;

        let mut index = index_with(&[]);
        let linux = |taints: Vec<Taint>| NodeInfo {
            labels: [("kubernetes.io/os".to_string(), "linux".to_string())].into(),
            taints,
        };
        let tainted = Taint {
            key: "dedicated".into(),
            value: Some("db".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        for name in ["ready-pod", "reporting", "pending", "crashing"] {
            let _ = index.apply_node(name, &linux(Vec::new()));
        }
        let _ = index.apply_node("control-plane", &linux(vec![tainted]));
        let windows = NodeInfo::from(crate::selector::Labels::from([(
            "kubernetes.io/os".to_string(),
            "windows".to_string(),
        )]));
        let _ = index.apply_node("windows", &windows);
        let agent = |name: &str, node: Option<&str>, ready: bool| Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("stratum-system".into()),
                labels: Some(names::agent_labels("cluster")),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        };
        let _ = index.apply_pod(&agent("a", Some("ready-pod"), true));
        let _ = index.apply_pod(&agent("b", Some("reporting"), false));
        let _ = index.apply_pod(&agent("c", None, false));
        let _ = index.apply_pod(&agent("d", Some("crashing"), false));
        let _ = index.apply_clock(&NodeClock::new(
            "reporting",
            NodeClockSpec {
                time_service: "cluster".into(),
            },
        ));
        let _ = index.apply_clock(&NodeClock::new(
            "crashing",
            NodeClockSpec {
                time_service: "another".into(),
            },
        ));

        let mut ts = fixtures::time_service("cluster");
        let plan = Planner::new()
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        assert_eq!(
            plan.uncovered,
            Uncovered {
                placed: 5,
                count: 3,
                first: vec!["control-plane".into(), "crashing".into(), "pending".into()],
            },
            "every taint tolerated by default; Windows never placed"
        );

        // Tolerations that leave out the control plane's taint leave out the node.
        ts.spec.placement.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }];
        let plan = Planner::new()
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        assert_eq!(plan.uncovered.placed, 4);
        assert_eq!(plan.uncovered.first, ["crashing", "pending"]);
    }

    #[test]
    fn closest_routing_on_an_api_server_older_than_1_34_refuses_that_tenant_alone() {
        use crate::model::ServerVersion;

        let closest = fixtures::tenant(
            "a",
            "ntp",
            serde_json::json!({ "service": { "routing": "Closest" } }),
        );
        let local = fixtures::tenant("b", "ntp", serde_json::json!({}));
        let plans = |minor: u32| {
            let mut index =
                Index::new("stratum-system").with_server_version(ServerVersion { major: 1, minor });
            let _ = index.apply_time_service(&fixtures::time_service("cluster"));
            let _ = index.apply_tenant(&closest);
            let _ = index.apply_tenant(&local);
            let mut planner = Planner::new();
            let a = planner.plan_tenant(&index, &closest).unwrap();
            let b = planner.plan_tenant(&index, &local).unwrap();
            let served = planner
                .plan_time_service(
                    &index,
                    &fixtures::time_service("cluster"),
                    &fixtures::settings(),
                )
                .unwrap();
            (a, b, served)
        };

        let (a, b, ts) = plans(33);
        let (reason, message) = a.refused.clone().unwrap();
        assert_eq!(reason, "UnsupportedByCluster");
        assert!(message.contains("API server is 1.33"), "{message}");
        assert!(
            a.port.is_none() && a.service.is_none() && a.slices.is_empty(),
            "no port, no Service"
        );
        assert!(
            b.refused.is_none() && b.service.is_some(),
            "{:?}",
            b.refused
        );
        assert!(ts.blocked.is_none(), "{:?}", ts.blocked);
        assert_eq!(ts.tenants.keys().collect::<Vec<_>>(), ["b/ntp"]);

        let (a, _, ts) = plans(34);
        assert!(a.refused.is_none(), "{:?}", a.refused);
        assert_eq!(
            a.service
                .unwrap()
                .spec
                .unwrap()
                .traffic_distribution
                .as_deref(),
            Some("PreferSameNode")
        );
        assert_eq!(ts.tenants.keys().collect::<Vec<_>>(), ["a/ntp", "b/ntp"]);
    }

    #[test]
    fn a_stored_non_linux_node_selector_is_reported_invalid_and_agents_stay_on_linux() {
        let index = index_with(&[]);
        let mut ts = fixtures::time_service("cluster");
        ts.spec
            .placement
            .node_selector
            .insert("kubernetes.io/os".into(), "windows".into());
        let plan = Planner::new()
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        match &plan.blocked {
            Some(Blocked::Invalid(why)) => assert!(
                why.starts_with("spec.placement.nodeSelector: ") && why.contains("\"windows\""),
                "{why}"
            ),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
        let pod = plan.daemonset.unwrap().spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["kubernetes.io/os"], "linux");
        assert!(
            plan.config_map.is_some(),
            "the agents' config is not held back"
        );
    }

    #[test]
    fn tenants_that_together_overflow_the_config_crowd_out_only_younger_ones() {
        // Each tenant well under its own prefix limit, together far over a ConfigMap.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tenants: Vec<TenantTimePolicy> = (0..48)
            .map(|i| {
                let cidr = format!("fd{:02x}::/16", i + 1);
                let except: Vec<String> = (0..64)
                    .map(|_| {
                        let r = next();
                        format!(
                            "fd{:02x}:{:x}:{:x}:{:x}::{:x}/128",
                            i + 1,
                            r & 0xffff,
                            (r >> 16) & 0xffff,
                            (r >> 32) & 0xffff,
                            r >> 48
                        )
                    })
                    .collect();
                let mut t = fixtures::tenant(
                    &format!("ns-{i:02}"),
                    "ntp",
                    serde_json::json!({ "allowedClients": [{ "ipBlock": { "cidr": cidr, "except": except } }] }),
                );
                t.metadata.creation_timestamp =
                    Some(Time(Timestamp::from_second(1_700_000_000 + i).unwrap()));
                t
            })
            .collect();
        let refs: Vec<&TenantTimePolicy> = tenants.iter().collect();
        let mut index = index_with(&refs);
        let mut planner = Planner::new();
        let ts = fixtures::time_service("cluster");
        let plan = planner
            .plan_time_service(&index, &ts, &fixtures::settings())
            .unwrap();
        assert!(plan.blocked.is_none(), "{:?}", plan.blocked);
        let cm = plan.config_map.as_ref().unwrap();
        assert!(config_map_bytes(cm) <= MAX_CONFIG_BYTES);
        let served: Vec<String> = plan
            .config
            .as_ref()
            .unwrap()
            .serving
            .tenants
            .iter()
            .map(|t| t.id.clone())
            .collect();
        assert!(
            (1..48).contains(&served.len()),
            "{} of 48 tenants fit",
            served.len()
        );
        // The oldest ones, every one of them.
        let expected: Vec<String> = (0..served.len())
            .map(|i| format!("ns-{i:02}/ntp"))
            .collect();
        assert_eq!(served, expected);
        let kept = planner.plan_tenant(&index, &tenants[0]).unwrap();
        assert!(kept.refused.is_none(), "{:?}", kept.refused);
        let (reason, message) = planner
            .plan_tenant(&index, &tenants[47])
            .unwrap()
            .refused
            .unwrap();
        assert_eq!(reason, "AgentConfigFull");
        assert!(
            message.contains("older tenants keep their place"),
            "{message}"
        );

        // The plan that sheds tenants names them for a reconcile; one that changes nothing
        // names none; one that takes them back in names them again.
        let shed: BTreeSet<TenantKey> = (served.len()..48)
            .map(|i| (format!("ns-{i:02}"), "ntp".to_string()))
            .collect();
        let mut fresh = Planner::new();
        let draft = |planner: &mut Planner, index: &Index| {
            let mut draft = planner.draft_time_service(index, &ts);
            draft.build(&ts, &fixtures::settings()).unwrap();
            planner.keep(draft)
        };
        assert_eq!(draft(&mut fresh, &index).tenants, shed);
        assert!(draft(&mut fresh, &index).is_empty());
        // All but the youngest gone: it fits again, and every tenant that was shed (deleted
        // or taken back in) is named.
        for t in &tenants[..47] {
            let _ = index.delete_tenant(t.metadata.namespace.as_deref().unwrap(), "ntp");
        }
        assert_eq!(draft(&mut fresh, &index).tenants, shed);
    }
}
