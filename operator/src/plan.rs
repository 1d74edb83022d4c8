//! Validate and build, per reconciled object, from the index alone: everything a reconcile
//! applies and reports, computed without IO. The controllers only apply what a plan holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use stratum_api::{AgentConfig, TenantTimePolicy, TimeService};

use crate::build::OperatorSettings;
use crate::build::agent_config::{
    FleetInput, TenantInput, build_agent_config_document, build_agent_config_map,
};
use crate::build::daemonset::{build_daemonset, needs_net_bind};
use crate::build::endpointslice::{
    ZONE_LABEL, agent_endpoints, build_endpoint_slices, ready_endpoints,
};
use crate::build::networkpolicy::{TenantRule, build_network_policy_cached};
use crate::build::rbac::{AgentRbac, build_rbac};
use crate::build::service::build_service;
use crate::build::status::Blocked;
use crate::build::time_config::{build_time_config, is_iana_timezone};
use crate::error::Result;
use crate::index::{ClockInfo, Index, TenantEntry};
use crate::names;
use crate::ports::TenantKey;

/// Largest agent config written (gzipped): a ConfigMap holds at most 1 MiB of data, and its
/// metadata needs room too.
pub const MAX_CONFIG_BYTES: usize = 1_000_000;

/// Why a tenant is not accepted: condition reason and message.
pub type Refusal = (&'static str, String);

/// Everything a TimeService reconcile applies and reports.
#[derive(Debug)]
pub struct TimeServicePlan {
    /// Why agents are not (fully) run as specified.
    pub blocked: Option<Blocked>,
    /// The DaemonSet; `None` under Conflict (and any existing one must go).
    pub daemonset: Option<DaemonSet>,
    /// Agent identity and permissions.
    pub rbac: AgentRbac,
    /// Admission of tenants' peers and agents' egress (shared with the index's cache).
    pub network_policy: Arc<NetworkPolicy>,
    /// The agent config; `None` when it would be invalid (the last good one stays).
    pub config: Option<AgentConfig>,
    /// The ConfigMap carrying `config`; `None` when there is none or it exceeds a ConfigMap's
    /// size limit (then `blocked` says so and the last good one stays).
    pub config_map: Option<ConfigMap>,
    /// Clocks of this TimeService's nodes.
    pub clocks: Vec<ClockInfo>,
    /// Served tenants: id → (namespace, name, uid), for audit events.
    pub tenants: BTreeMap<String, (String, String, Option<String>)>,
    /// Allow-list size of each served tenant.
    pub allow_list_sizes: Vec<usize>,
}

/// Age order of tenants: creationTimestamp (absent counts as newest), then name.
fn age(t: &TenantEntry) -> (bool, Option<k8s_openapi::jiff::Timestamp>, &str) {
    (t.created.is_none(), t.created, &t.name)
}

/// The oldest tenant of each `(namespace, service name)`: the one allowed to own that Service.
pub type ServiceOwners<'a> = HashMap<(&'a str, &'a str), &'a TenantEntry>;

/// Who owns each tenant Service name (the oldest claimant), in one pass over the tenants.
pub fn service_owners(index: &Index) -> ServiceOwners<'_> {
    let mut owners: ServiceOwners<'_> = HashMap::new();
    for t in index.tenants.values() {
        let slot = owners
            .entry((&t.namespace, &t.spec.service.name))
            .or_insert(t);
        if age(t) < age(slot) {
            *slot = t;
        }
    }
    owners
}

/// Why `tenant` cannot be served, if it cannot.
pub fn tenant_refusal(
    index: &Index,
    owners: &ServiceOwners,
    tenant: &TenantEntry,
    port: Option<u16>,
) -> Option<Refusal> {
    if let Err(e) = &tenant.policy {
        return Some(("InvalidClients", e.to_string()));
    }
    if let Err(unserved) = index.time_service_of(tenant) {
        return Some((unserved.reason(), unserved.message()));
    }
    if let Some(tz) = &tenant.spec.timezone
        && !is_iana_timezone(tz)
    {
        return Some((
            "InvalidTimezone",
            format!("{tz:?} is not a time zone of the IANA database"),
        ));
    }
    if let Some(auth) = &tenant.spec.authentication
        && (auth.nts || auth.symmetric_keys_secret.is_some())
    {
        return Some((
            "AuthenticationUnsupported",
            "client authentication (NTS, symmetric keys) is not supported by this version's agents"
                .into(),
        ));
    }
    if let Some(owner) = owners.get(&(tenant.namespace.as_str(), tenant.spec.service.name.as_str()))
        && (owner.namespace != tenant.namespace || owner.name != tenant.name)
    {
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

/// Whether `tenant` writes its namespace's `time-config` (one per namespace: the oldest).
fn owns_time_config(index: &Index, tenant: &TenantEntry) -> bool {
    !index
        .tenants
        .values()
        .any(|o| o.namespace == tenant.namespace && age(o) < age(tenant))
}

/// Plans a TimeService.
pub fn plan_time_service(
    index: &mut Index,
    ts: &TimeService,
    settings: &OperatorSettings,
) -> Result<TimeServicePlan> {
    let name = ts.name_any();
    let mut blocked = index
        .conflicts()
        .get(&name)
        .map(|with| Blocked::Conflict { with: with.clone() });
    let nodes = index.nodes_matching(&ts.spec.placement.node_selector);
    let peer_port = Index::peer_port(&ts.spec);

    struct Served {
        key: TenantKey,
        id: String,
        uid: Option<String>,
        port: u16,
        allowed_size: usize,
        tenant_sets: Arc<crate::index::TenantSets>,
        sets: Arc<[Arc<Vec<IpNet>>]>,
    }
    let mut served = Vec::new();
    let owners = service_owners(index);
    // Specs and deny lists are read in place below: cloning 1000 tenants costs milliseconds.
    for t in index.tenants_of(&name) {
        let port = index.ports_of(&name).get(&t.key()).copied().flatten();
        if tenant_refusal(index, &owners, t, port).is_some() {
            continue;
        }
        let (Some(port), Ok(_)) = (port, &t.policy) else {
            continue;
        };
        served.push(Served {
            key: t.key(),
            id: names::tenant_id(&t.namespace, &t.name),
            uid: t.uid.clone(),
            port,
            allowed_size: 0,
            tenant_sets: Arc::default(),
            sets: Arc::new([]),
        });
    }
    for s in &mut served {
        s.allowed_size = index.allowed(&s.key).len();
        (s.tenant_sets, s.sets) = index.tenant_set_list(&s.key);
    }

    let agents = index.agent_pods(&name);
    let agent_addresses: Vec<IpAddr> = agents.iter().flat_map(|p| p.ips.iter().copied()).collect();
    let mut fleet = FleetInput {
        agent_addresses,
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
            .collect();
        fleet.egress_nodes = egress_nodes.into_iter().collect();
    }
    // Taken out of the index while its tenants are borrowed, put back at the end.
    let mut cache = index.set_texts.remove(&name).unwrap_or_default();
    let mut policy_cache = index.network_policies.remove(&name).flatten();
    let entries: Vec<&TenantEntry> = served
        .iter()
        .filter_map(|s| index.tenants.get(&s.key))
        .collect();
    let inputs: Vec<TenantInput<'_>> = served
        .iter()
        .zip(&entries)
        .map(|(s, t)| TenantInput {
            id: s.id.clone(),
            port: s.port,
            allowed: &s.tenant_sets.blocks,
            sets: &s.sets,
            denied: t.policy.as_ref().map_or(&[][..], |p| &p.denied),
            spec: &t.spec,
        })
        .collect();
    let (config, document) =
        build_agent_config_document(&name, &ts.spec, peer_port, &inputs, &fleet, &mut cache);
    let config = match config.validate() {
        Ok(()) => Some(config),
        Err(problems) => {
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
    let config_map = config
        .as_ref()
        .map(|c| build_agent_config_map(ts, settings, c, &document))
        .transpose()?;
    let size = config_map.as_ref().map(config_map_bytes).unwrap_or(0);
    // Too large for one ConfigMap: keep the config for inspection, write nothing.
    let config_map = if size > MAX_CONFIG_BYTES {
        blocked.get_or_insert(Blocked::Invalid(format!(
            "the agent config is {size} bytes gzipped, over the ConfigMap limit of {MAX_CONFIG_BYTES}; \
             narrow tenants' allowedClients (ipBlocks aggregate better than many pods)"
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
        .zip(&entries)
        .map(|(s, t)| TenantRule {
            namespace: &s.key.0,
            peers: &t.spec.allowed_clients,
            port: s.port,
        })
        .collect();
    let network_policy =
        build_network_policy_cached(&mut policy_cache, ts, settings, &rules, peer_port)?;
    let clocks = index
        .clocks
        .iter()
        .filter(|(node, c)| c.time_service == name && nodes.contains(*node))
        .map(|(_, c)| c.clone())
        .collect();
    index.set_texts.insert(name.clone(), cache);
    index.network_policies.insert(name.clone(), policy_cache);
    Ok(TimeServicePlan {
        blocked,
        daemonset,
        rbac: build_rbac(ts, settings)?,
        network_policy,
        config,
        config_map,
        clocks,
        allow_list_sizes: served.iter().map(|s| s.allowed_size).collect(),
        tenants: served
            .into_iter()
            .map(|s| (s.id, (s.key.0, s.key.1, s.uid)))
            .collect(),
    })
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
}

/// Plans a tenant.
pub fn plan_tenant(index: &mut Index, tenant: &TenantTimePolicy) -> Result<TenantPlan> {
    let mut plan = TenantPlan {
        refused: None,
        time_service: None,
        port: None,
        service: None,
        slices: Vec::new(),
        time_config: None,
        ready_endpoints: 0,
        allow_list_size: 0,
    };
    // Plan from the object being reconciled, which may be newer than the index.
    let Some(entry) = TenantEntry::new(tenant) else {
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
    if let Some(refusal) = tenant_refusal(index, &service_owners(index), &entry, port) {
        plan.refused = Some(refusal);
        return Ok(plan);
    }
    let Some(port) = port else { return Ok(plan) };
    plan.allow_list_size = i32::try_from(index.allowed(&key).len()).unwrap_or(i32::MAX);
    let zones: BTreeMap<String, Option<String>> = index
        .nodes
        .iter()
        .map(|(n, l)| (n.clone(), l.get(ZONE_LABEL).cloned()))
        .collect();
    let agents = index.agent_pods(&ts);
    let endpoints = agent_endpoints(
        &agents,
        &index.clocks,
        &zones,
        &ts,
        entry.max_root_distance_nanos(),
    );
    plan.slices = build_endpoint_slices(tenant, &ts, port, &endpoints)?;
    plan.ready_endpoints = ready_endpoints(&plan.slices);
    plan.service = Some(build_service(tenant, &ts, port)?);
    if owns_time_config(index, &entry) {
        plan.time_config = Some(build_time_config(tenant, &ts)?);
    }
    Ok(plan)
}
