//! The agent config of one TimeService (the `stratum_api::agent_config` contract) and the
//! ConfigMap carrying it. The revision is a hash of the content, so unchanged inputs produce a
//! byte-identical ConfigMap and agents can report which content they run.
//!
//! Prefixes several tenants allow (pod sets) are written once, in `serving.cidrSets`, and the
//! document is gzipped into `binaryData`: together they keep thousands of tenants and tens of
//! thousands of pods well inside a ConfigMap (see `docs/contracts.md`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use stratum_api::agent_config::{
    AGENT_CONFIG_GZIP_KEY, AGENT_CONFIG_VERSION, ClockBackend, ClockConfig, ConfigProblem,
    DisciplineConfig, EgressConfig, LeapConfig, LeapMode, LogLevel, NTS_COOKIE_KEYS_KEY,
    ReportingConfig, SelectionConfig, ServingConfig, TenantConfig, UpstreamConfig,
    UpstreamKeyConfig, UpstreamKind, nts_material_path, upstream_keys_key,
};
use stratum_api::tenant_time_policy::TenantTimePolicySpec;
use stratum_api::time_service::{self as ts_api, ClockSource, DisciplineMode};
use stratum_api::{AgentConfig, TimeService, TimeServiceSpec};

use super::gzip::{MemberCache, gzip_members};
use super::{OperatorSettings, agent_meta};
use crate::error::Result;
use crate::names;

/// One tenant as the agents serve it.
#[derive(Clone, Debug)]
pub struct TenantInput<'a> {
    /// `namespace/name`.
    pub id: &'a str,
    /// Allocated port.
    pub port: u16,
    /// Allowed ranges of its own (ipBlocks), aggregated.
    pub allowed: &'a [IpNet],
    /// Allowed pod sets, resolved (shared with other tenants where equal).
    pub sets: &'a [Arc<Vec<IpNet>>],
    /// Resolved, aggregated deny list.
    pub denied: &'a [IpNet],
    /// The tenant's spec (rate limits and requirements).
    pub spec: &'a TenantTimePolicySpec,
    /// Stands for everything above but `id`, `port` and where `sets` land in the shared list:
    /// the caller promises that an equal revision means equal blocks, sets, deny list and spec,
    /// and the cached config and text of the tenant are then reused without building them to
    /// compare. `None` always builds and compares.
    pub revision: Option<u64>,
}

/// The fleet's own addresses, for the egress tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetInput {
    /// Nodes in the egress tier.
    pub egress_nodes: Vec<String>,
    /// Addresses of the agents on those nodes.
    pub egress_addresses: Vec<IpAddr>,
    /// Addresses of every agent of the fleet.
    pub agent_addresses: Vec<IpAddr>,
}

/// Poll range agents use towards the egress tier: close by and cheap to ask.
const TIER_MIN_POLL: i8 = 4;
const TIER_MAX_POLL: i8 = 6;

/// The agent config for TimeService `name`. `peer_port` is set when the spec has an egress tier.
pub fn build_agent_config(
    name: &str,
    spec: &TimeServiceSpec,
    peer_port: Option<u16>,
    tenants: &[TenantInput<'_>],
    fleet: &FleetInput,
) -> AgentConfig {
    build_agent_config_document(
        name,
        spec,
        peer_port,
        tenants,
        fleet,
        &mut DocumentCache::default(),
    )
    .0
}

fn build_agent_config_unrevised(
    name: &str,
    spec: &TimeServiceSpec,
    peer_port: Option<u16>,
    tenants: &[TenantInput<'_>],
    fleet: &FleetInput,
    cache: &mut DocumentCache,
) -> (AgentConfig, Vec<usize>) {
    let mut order: Vec<&TenantInput<'_>> = tenants.iter().collect();
    order.sort_by(|a, b| a.id.cmp(b.id));
    let mut numbering = SetNumbering::new(std::mem::take(&mut cache.sets));
    // Both in id order: one walk pairs each tenant with its cached config and text.
    let mut cached = std::mem::take(&mut cache.tenants).into_iter().peekable();
    let mut tenant_texts = Vec::with_capacity(order.len());
    let mut tenant_configs = Vec::with_capacity(order.len());
    for t in &order {
        let mut numbers: Vec<u32> = t
            .sets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|set| numbering.number(set))
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        while cached.next_if(|c| c.config.id.as_str() < t.id).is_some() {}
        let entry = TenantText::reuse_or_build(t, numbers, cached.next_if(|c| c.config.id == t.id));
        tenant_configs.push(entry.config.clone());
        tenant_texts.push(entry);
    }
    // Texts of sets and tenants no longer used are dropped here.
    let has_nts = tenant_configs.iter().any(|t| t.nts.is_some());
    let (cidr_sets, addresses, texts) = numbering.finish();
    cache.sets = texts;
    cache.tenants = tenant_texts;
    let egress = spec.egress_tier.as_ref().map(|tier| {
        let mut nodes = fleet.egress_nodes.clone();
        nodes.sort();
        let mut addresses = fleet.egress_addresses.clone();
        addresses.sort();
        addresses.dedup();
        EgressConfig {
            nodes,
            tier_upstreams: addresses
                .iter()
                .map(|ip| UpstreamConfig {
                    host: ip.to_string(),
                    kind: UpstreamKind::Server,
                    port: peer_port.unwrap_or(names::NTP_SERVICE_PORT as u16),
                    iburst: true,
                    min_poll: TIER_MIN_POLL,
                    max_poll: TIER_MAX_POLL,
                    max_sources: 1,
                    nts: false,
                    nts_port: None,
                    key: None,
                })
                .collect(),
            fallback_to_upstreams: tier.fallback_to_upstreams,
        }
    });
    let peer_allowed = match peer_port {
        Some(_) => IpNet::aggregate(
            &fleet
                .agent_addresses
                .iter()
                .map(|ip| IpNet::from(*ip))
                .collect(),
        ),
        None => Vec::new(),
    };
    let config = AgentConfig {
        version: AGENT_CONFIG_VERSION,
        revision: String::new(),
        time_service: name.to_owned(),
        clock: ClockConfig {
            backend: match (spec.discipline.clock, spec.discipline.mode) {
                (Some(ClockSource::Simulated), _) => ClockBackend::Simulated,
                // Monitor never steers, whatever the clock says (CEL refuses the pair).
                (Some(ClockSource::Readonly), _) | (_, DisciplineMode::Monitor) => {
                    ClockBackend::Readonly
                }
                (Some(ClockSource::System) | None, DisciplineMode::Discipline) => {
                    ClockBackend::System
                }
            },
        },
        upstreams: spec.upstreams.iter().map(upstream_config).collect(),
        egress,
        selection: SelectionConfig {
            min_sources: clamp_u8(spec.selection.min_sources),
            max_distance_seconds: spec.selection.max_distance.as_secs_f64(),
        },
        discipline: DisciplineConfig {
            make_step_threshold_seconds: spec.discipline.make_step.threshold.as_secs_f64(),
            make_step_limit: u32::try_from(spec.discipline.make_step.limit).unwrap_or(0),
            max_slew_ppm: f64::from(spec.discipline.max_slew_ppm),
            panic_startup_seconds: spec.discipline.panic_threshold.startup.as_secs_f64(),
            panic_runtime_seconds: spec.discipline.panic_threshold.runtime.as_secs_f64(),
            rtc_sync: spec.discipline.rtc_sync,
            // The drift directory is the host path; agents see it mounted at the state dir.
            drift_file: format!("{}/drift", names::AGENT_STATE_DIR),
            take_over: spec.discipline.take_over,
        },
        leap: LeapConfig {
            mode: match spec.leap.mode {
                ts_api::LeapMode::Kernel => LeapMode::Kernel,
                ts_api::LeapMode::Smear => LeapMode::Smear,
                ts_api::LeapMode::Ignore => LeapMode::Ignore,
            },
            smear_window_seconds: spec.leap.smear_window.as_secs_f64(),
        },
        serving: ServingConfig {
            holdover_seconds: spec.serving.holdover.as_secs_f64(),
            local_stratum: spec.serving.local_stratum.map(clamp_u8),
            peer_port,
            peer_allowed,
            tenants: tenant_configs,
            cidr_sets,
            metrics_per_tenant: spec.serving.metrics_per_tenant(),
            // The member of the key material Secret every agent mounts; named only when a
            // tenant has NTS, so configs without it read as before.
            nts_cookie_keys_file: has_nts.then(|| nts_material_path(NTS_COOKIE_KEYS_KEY)),
        },
        reporting: ReportingConfig {
            heartbeat_seconds: spec.reporting.interval.as_secs_f64(),
        },
        log_level: match spec.agent.log_level {
            ts_api::LogLevel::Error => LogLevel::Error,
            ts_api::LogLevel::Warn => LogLevel::Warn,
            ts_api::LogLevel::Info => LogLevel::Info,
            ts_api::LogLevel::Debug => LogLevel::Debug,
            ts_api::LogLevel::Trace => LogLevel::Trace,
        },
        // Written only when some upstream uses it: the bundle may be large.
        nts_ca_bundle: spec
            .nts
            .as_ref()
            .and_then(|n| n.ca_bundle.clone())
            .filter(|_| spec.upstreams.iter().any(|u| u.nts)),
    };
    (config, addresses)
}

/// The agent config as `build_agent_config` makes it, and its document (compact JSON, the
/// revision included), serialized once: the revision is the hash of the document without it.
pub fn build_agent_config_document(
    name: &str,
    spec: &TimeServiceSpec,
    peer_port: Option<u16>,
    tenants: &[TenantInput<'_>],
    fleet: &FleetInput,
    cache: &mut DocumentCache,
) -> (AgentConfig, String) {
    let (mut config, addresses) =
        build_agent_config_unrevised(name, spec, peer_port, tenants, fleet, cache);
    let unrevised = document_with(&mut config, &addresses, cache);
    config.revision = content_hash(&unrevised);
    // `revision` is the second field and serde writes fields in order, so its empty value is
    // the first `"revision":""` (quotes inside strings are escaped).
    let marker = "\"revision\":\"\"";
    let text = match unrevised.find(marker) {
        Some(at) => {
            let mut text = String::with_capacity(unrevised.len() + config.revision.len());
            text.push_str(&unrevised[..at]);
            text.push_str("\"revision\":\"");
            text.push_str(&config.revision);
            text.push('"');
            text.push_str(&unrevised[at + marker.len()..]);
            text
        }
        None => document(&config),
    };
    (config, text)
}

/// The JSON text of each tenant and each shared set, kept while in use: a pod event changes a
/// few sets and the tenants referring to them, and only those are serialized again.
#[derive(Debug, Default)]
pub struct DocumentCache {
    /// By the set's address; holding the `Arc` keeps that address from being reused.
    sets: ByAddress<SetText>,
    /// In id order, as last built.
    tenants: Vec<TenantText>,
}

/// A tenant's config, its JSON text, and the input revision they were made from.
#[derive(Debug)]
struct TenantText {
    revision: Option<u64>,
    config: TenantConfig,
    text: String,
}

impl TenantText {
    /// `t` with set numbers `numbers`: `previous` (its last build) as it is when the caller's
    /// revision and everything the builder adds are unchanged, its text when an equal config
    /// is built, a new build otherwise.
    fn reuse_or_build(t: &TenantInput<'_>, numbers: Vec<u32>, previous: Option<Self>) -> Self {
        match previous {
            Some(p)
                if p.revision.is_some()
                    && p.revision == t.revision
                    && p.config.port == t.port
                    && p.config.allowed_sets == numbers =>
            {
                p
            }
            previous => {
                let mut config = tenant_config(t);
                config.allowed_sets = numbers;
                let text = match previous {
                    Some(p) if p.config == config => p.text,
                    _ => serde_json::to_string(&config).unwrap_or_default(),
                };
                Self {
                    revision: t.revision,
                    config,
                    text,
                }
            }
        }
    }
}

/// Numbers the shared sets of one build: by first use in tenant order, equal content once, so
/// the numbering is deterministic. Most repeats are the same cached set and are found by
/// address; contents are compared only for sets whose texts hash alike.
struct SetNumbering {
    /// The last build's set texts, taken over as sets are met again.
    previous: ByAddress<SetText>,
    /// This build's set texts, by address.
    texts: ByAddress<SetText>,
    /// The sets by number, and the address of each (to find its text).
    sets: Vec<Vec<IpNet>>,
    addresses: Vec<usize>,
    by_address: ByAddress<u32>,
    /// The first set of each text hash (a hash already: the address hasher is enough), and
    /// sets of other content under a taken hash (hardly ever) in `collided`.
    by_content: ByAddress<u32>,
    collided: Vec<(u64, u32)>,
}

impl SetNumbering {
    fn new(previous: ByAddress<SetText>) -> Self {
        let expected = previous.len();
        Self {
            texts: ByAddress::with_capacity_and_hasher(expected, Default::default()),
            by_address: ByAddress::with_capacity_and_hasher(expected, Default::default()),
            by_content: ByAddress::with_capacity_and_hasher(expected, Default::default()),
            previous,
            sets: Vec::new(),
            addresses: Vec::new(),
            collided: Vec::new(),
        }
    }

    /// The number of `set` (not empty), numbering it if it is new.
    fn number(&mut self, set: &Arc<Vec<IpNet>>) -> u32 {
        let address = Arc::as_ptr(set) as usize;
        if let Some(n) = self.by_address.get(&address) {
            return *n;
        }
        let text = self
            .previous
            .remove(&address)
            .unwrap_or_else(|| SetText::new(set));
        let n = self.by_content(set, text.hash).unwrap_or_else(|| {
            let n = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
            match self.by_content.entry(text.hash as usize) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(n);
                }
                std::collections::hash_map::Entry::Occupied(_) => {
                    self.collided.push((text.hash, n));
                }
            }
            self.sets.push(set.to_vec());
            self.addresses.push(address);
            n
        });
        self.texts.insert(address, text);
        self.by_address.insert(address, n);
        n
    }

    /// The number of an already numbered set with the contents of `set`.
    fn by_content(&self, set: &[IpNet], hash: u64) -> Option<u32> {
        let same = |n: &u32| self.sets[*n as usize] == *set;
        match self.by_content.get(&(hash as usize)) {
            Some(first) if same(first) => Some(*first),
            Some(_) => self
                .collided
                .iter()
                .find(|(h, n)| *h == hash && same(n))
                .map(|(_, n)| *n),
            None => None,
        }
    }

    /// The numbered sets, their addresses, and the texts of the sets in use.
    fn finish(self) -> (Vec<Vec<IpNet>>, Vec<usize>, ByAddress<SetText>) {
        (self.sets, self.addresses, self.texts)
    }
}

/// Hashes a set's address: one multiplication, the product's high half folded onto the low
/// (aligned addresses have zero low bits), instead of SipHash for thousands of lookups.
#[derive(Clone, Copy, Debug, Default)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let p = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = p ^ (p >> 32);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type ByAddress<V> = HashMap<usize, V, std::hash::BuildHasherDefault<AddressHasher>>;

/// A shared set, its JSON text, and a hash of the text to find sets of equal content by.
#[derive(Debug)]
struct SetText {
    _set: Arc<Vec<IpNet>>,
    text: String,
    hash: u64,
}

impl SetText {
    fn new(set: &Arc<Vec<IpNet>>) -> Self {
        let text = serde_json::to_string(set.as_slice()).unwrap_or_default();
        Self {
            _set: set.clone(),
            hash: fingerprint(text.as_bytes()),
            text,
        }
    }
}

/// `document(config)`, with the tenants' and sets' text from `cache`. `addresses` holds the
/// addresses of the sets of `config.serving.cidrSets` in order, each with a text in `cache`,
/// and `cache.tenants` the texts of `config.serving.tenants` in order.
fn document_with(config: &mut AgentConfig, addresses: &[usize], cache: &DocumentCache) -> String {
    let set_texts: Option<Vec<&str>> = addresses
        .iter()
        .map(|a| cache.sets.get(a).map(|t| t.text.as_str()))
        .collect();
    let Some(set_texts) = set_texts.filter(|t| t.len() == config.serving.cidr_sets.len()) else {
        return document(config);
    };
    if cache.tenants.len() != config.serving.tenants.len() {
        return document(config);
    }
    // `serving` is the last field, `tenants` and `cidrSets` its last two: without them the
    // document ends with an empty tenant list and the two closing braces.
    let tenants = std::mem::take(&mut config.serving.tenants);
    let sets = std::mem::take(&mut config.serving.cidr_sets);
    let mut text = document(config);
    config.serving.tenants = tenants;
    config.serving.cidr_sets = sets;
    if !text.ends_with("\"tenants\":[]}}") {
        return document(config);
    }
    text.truncate(text.len() - "]}}".len());
    let length: usize = cache
        .tenants
        .iter()
        .map(|t| t.text.len() + 1)
        .sum::<usize>()
        + set_texts.iter().map(|t| t.len() + 1).sum::<usize>();
    text.reserve(length + 32);
    for (i, tenant) in cache.tenants.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&tenant.text);
    }
    text.push(']');
    if !set_texts.is_empty() {
        text.push_str(",\"cidrSets\":[");
        for (i, set) in set_texts.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(set);
        }
        text.push(']');
    }
    text.push_str("}}");
    text
}

/// The compact JSON document of a config.
pub fn document(config: &AgentConfig) -> String {
    // Serializing plain structs of strings, numbers and IpNet cannot fail.
    serde_json::to_string(config).unwrap_or_default()
}

fn content_hash(text: &str) -> String {
    format!("{:016x}", fingerprint(text.as_bytes()))
}

/// FNV-1a taken eight bytes at a time (then the tail byte by byte): a stable 64-bit hash, fast
/// enough for the whole document on every change.
pub(crate) fn fingerprint(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        hash ^= u64::from_le_bytes(w);
        hash = hash.wrapping_mul(PRIME);
    }
    for byte in words.remainder() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    // Fold the high bits down so every input bit reaches the low ones too.
    hash ^ (hash >> 29)
}

/// [`AgentConfig::validate`], and what only the operator can check: that the NTS CA bundle
/// holds certificates. A bundle agents could not parse would leave every NTS upstream without
/// keys on every node, so it is refused here, where the admin sees it on the TimeService.
pub fn validate_for_operator(config: &AgentConfig) -> std::result::Result<(), Vec<ConfigProblem>> {
    let mut problems = config.validate().err().unwrap_or_default();
    if let Some(bundle) = &config.nts_ca_bundle
        && let Some(why) = ca_bundle_problem(bundle)
    {
        problems.push(ConfigProblem {
            path: "nts.caBundle".into(),
            message: why,
        });
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Why a PEM CA bundle is unusable: not PEM, or no certificate in it.
fn ca_bundle_problem(bundle: &str) -> Option<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut certificates = 0;
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        match cert {
            Ok(_) => certificates += 1,
            Err(e) => return Some(format!("not valid PEM: {e}")),
        }
    }
    (certificates == 0).then(|| "holds no PEM certificate".to_owned())
}

fn clamp_u8(v: i32) -> u8 {
    u8::try_from(v.clamp(0, 255)).unwrap_or(u8::MAX)
}

fn clamp_i8(v: i32) -> i8 {
    i8::try_from(v.clamp(0, 127)).unwrap_or(i8::MAX)
}

fn upstream_config(u: &ts_api::Upstream) -> UpstreamConfig {
    UpstreamConfig {
        host: u.host.clone(),
        kind: match u.kind {
            ts_api::UpstreamKind::Server => UpstreamKind::Server,
            ts_api::UpstreamKind::Pool => UpstreamKind::Pool,
        },
        port: u16::try_from(u.port).unwrap_or(0),
        iburst: u.iburst,
        min_poll: clamp_i8(u.min_poll),
        max_poll: clamp_i8(u.max_poll),
        max_sources: match u.kind {
            ts_api::UpstreamKind::Server => 1,
            ts_api::UpstreamKind::Pool => clamp_u8(u.max_sources),
        },
        nts: u.nts,
        nts_port: u
            .nts_port
            .filter(|_| u.nts)
            .map(|p| u16::try_from(p).unwrap_or(0)),
        key: u
            .key
            .as_ref()
            .filter(|_| !u.nts)
            .map(|k| UpstreamKeyConfig {
                keys_file: nts_material_path(&upstream_keys_key(&k.secret_name)),
                key_id: u32::try_from(k.id).unwrap_or(0),
            }),
    }
}

fn tenant_config(t: &TenantInput<'_>) -> TenantConfig {
    TenantConfig {
        allowed: t.allowed.to_vec(),
        denied: t.denied.to_vec(),
        ..TenantConfig::from_policy(t.id.to_owned(), t.port, t.spec)
    }
}

/// A stable hash of everything but the revision itself (`fingerprint` of the compact JSON):
/// equal content, equal revision, across operator restarts.
pub fn revision_of(config: &AgentConfig) -> String {
    let mut unrevised = config.clone();
    unrevised.revision = String::new();
    content_hash(&document(&unrevised))
}

/// The ConfigMap holding a config's `document` gzipped, in the operator's namespace: as
/// gzip members, reusing from `members` those of the parts that did not change (see `gzip`).
pub fn build_agent_config_map(
    ts: &TimeService,
    settings: &OperatorSettings,
    config: &AgentConfig,
    document: &str,
    members: &mut MemberCache,
) -> Result<ConfigMap> {
    let name = names::agent_config_map_name(&config.time_service);
    Ok(ConfigMap {
        metadata: agent_meta(ts, name, Some(&settings.namespace))?,
        binary_data: Some(BTreeMap::from([(
            AGENT_CONFIG_GZIP_KEY.to_owned(),
            ByteString(gzip_members(document.as_bytes(), members)),
        )])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn agent_config_lists_every_tenant_sorted_with_its_port_lists_and_limits() {
        let ts = fixtures::time_service("cluster");
        let b = fixtures::tenant(
            "b",
            "ntp",
            serde_json::json!({
                "rateLimit": { "perClient": { "interval": "2s", "burst": 4 },
                               "perTenant": { "requestsPerSecond": 100, "burst": 200 }, "kissOfDeath": true },
                "requirements": { "maxRootDistance": "100ms" }
            }),
        );
        let a = fixtures::tenant("a", "ntp", serde_json::json!({}));
        let (allowed, denied) = (nets(&["10.0.0.0/24", "fd00::/64"]), nets(&["10.0.0.7/32"]));
        let inputs = [
            TenantInput {
                id: "b/ntp",
                port: 12301,
                allowed: &allowed,
                sets: &[],
                denied: &[],
                spec: &b.spec,
                revision: None,
            },
            TenantInput {
                id: "a/ntp",
                port: 12300,
                allowed: &allowed,
                sets: &[],
                denied: &denied,
                spec: &a.spec,
                revision: None,
            },
        ];
        let config = build_agent_config("cluster", &ts.spec, None, &inputs, &FleetInput::default());
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        let ids: Vec<_> = config
            .serving
            .tenants
            .iter()
            .map(|t| t.id.as_str())
            .collect();
        assert_eq!(ids, ["a/ntp", "b/ntp"]);
        let tb = &config.serving.tenants[1];
        assert_eq!(tb.port, 12301);
        assert_eq!(tb.rate_limit.client_interval_seconds, 2.0);
        assert_eq!(tb.rate_limit.client_burst, 4);
        assert_eq!(tb.rate_limit.tenant_requests_per_second, Some(100));
        assert!(tb.rate_limit.kiss_of_death);
        assert_eq!(tb.max_root_distance_seconds, Some(0.1));
        assert_eq!(config.serving.tenants[0].denied, denied);
        assert_eq!(config.clock.backend, ClockBackend::System);
        assert_eq!(config.upstreams[0].kind, UpstreamKind::Pool);
        assert_eq!(config.discipline.drift_file, "/var/lib/stratum/drift");
    }

    #[test]
    fn equal_pod_sets_are_written_once_and_the_cached_document_is_the_real_one() {
        let ts = fixtures::time_service("cluster");
        let spec = fixtures::tenant("a", "ntp", serde_json::json!({})).spec;
        let team = Arc::new(nets(&["10.1.0.0/24", "fd00:1::/64"]));
        let same_team = Arc::new(team.to_vec());
        let own = Arc::new(nets(&["10.2.0.7/32"]));
        let block = nets(&["192.168.0.0/16"]);
        let (a_sets, b_sets) = (
            [team.clone(), own.clone()],
            [same_team, Arc::new(Vec::new())],
        );
        let inputs = |a: &'static str| {
            [
                TenantInput {
                    id: "b/ntp",
                    port: 12301,
                    allowed: &[],
                    sets: &b_sets,
                    denied: &[],
                    spec: &spec,
                    revision: None,
                },
                TenantInput {
                    id: a,
                    port: 12300,
                    allowed: &block,
                    sets: &a_sets,
                    denied: &[],
                    spec: &spec,
                    revision: None,
                },
            ]
        };
        let mut cache = DocumentCache::default();
        let fleet = FleetInput::default();
        let (config, text) = build_agent_config_document(
            "cluster",
            &ts.spec,
            None,
            &inputs("a/ntp"),
            &fleet,
            &mut cache,
        );
        assert_eq!(config.serving.cidr_sets, [team.to_vec(), own.to_vec()]);
        let refs: Vec<_> = config
            .serving
            .tenants
            .iter()
            .map(|t| t.allowed_sets.clone())
            .collect();
        assert_eq!(
            refs,
            [vec![0, 1], vec![0]],
            "equal contents share one set; empty ones none"
        );
        assert_eq!(config.serving.tenants[0].allowed, block);
        assert_eq!(text, document(&config));
        assert_eq!(config.revision, revision_of(&config));
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        // Again with the cache filled and other content: still exactly the document.
        let (again, text) = build_agent_config_document(
            "cluster",
            &ts.spec,
            None,
            &inputs("c/ntp"),
            &fleet,
            &mut cache,
        );
        assert_eq!(text, document(&again));
        assert_eq!(AgentConfig::from_json(&text).unwrap(), again);
        assert_ne!(again.revision, config.revision);
    }

    #[test]
    fn an_unchanged_revision_reuses_the_tenant_and_a_new_one_or_new_set_numbers_rebuild_it() {
        let ts = fixtures::time_service("cluster");
        let slow = fixtures::tenant(
            "a",
            "ntp",
            serde_json::json!({ "rateLimit": { "perClient": { "interval": "8s", "burst": 1 } } }),
        )
        .spec;
        let fast = fixtures::tenant("a", "ntp", serde_json::json!({})).spec;
        let first = Arc::new(nets(&["10.1.0.0/24"]));
        let second = Arc::new(nets(&["10.2.0.0/24"]));
        let build = |spec, sets: &[Arc<Vec<IpNet>>], revision, cache: &mut DocumentCache| {
            let input = TenantInput {
                id: "a/ntp",
                port: 12300,
                allowed: &[],
                sets,
                denied: &[],
                spec,
                revision: Some(revision),
            };
            let (config, text) = build_agent_config_document(
                "cluster",
                &ts.spec,
                None,
                &[input],
                &FleetInput::default(),
                cache,
            );
            assert_eq!(text, document(&config));
            config.serving.tenants[0].clone()
        };
        let mut cache = DocumentCache::default();
        let sets = [first.clone()];
        assert_eq!(
            build(&slow, &sets, 1, &mut cache)
                .rate_limit
                .client_interval_seconds,
            8.0
        );
        // The caller broke its promise on purpose: the same revision with another spec shows
        // that the cached tenant is reused without building it again.
        assert_eq!(
            build(&fast, &sets, 1, &mut cache)
                .rate_limit
                .client_interval_seconds,
            8.0
        );
        assert_eq!(
            build(&fast, &sets, 2, &mut cache)
                .rate_limit
                .client_interval_seconds,
            1.0
        );
        // Set numbers are the builder's own: a set ahead of it renumbers a cached tenant.
        let other = build(&fast, &[second.clone(), first.clone()], 2, &mut cache);
        assert_eq!(other.allowed_sets, [0, 1]);
    }

    #[test]
    fn the_agents_log_level_reaches_their_config() {
        let mut ts = fixtures::time_service("cluster");
        let config = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        assert_eq!(config.log_level, LogLevel::Info);
        ts.spec.agent.log_level = ts_api::LogLevel::Debug;
        let config = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.log_level.as_str(), "debug");
    }

    #[test]
    fn per_tenant_metrics_are_the_default_and_totals_only_reach_the_agent_config() {
        let mut ts = fixtures::time_service("cluster");
        let config = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        assert!(config.serving.metrics_per_tenant);
        // Left out when true, so agents that predate the field read the config.
        assert!(!config.to_json().contains("metricsPerTenant"));
        ts.spec.serving.metrics = Some(ts_api::ServingMetrics {
            per_tenant: Some(false),
        });
        let config = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        assert!(!config.serving.metrics_per_tenant);
        assert!(config.to_json().contains(r#""metricsPerTenant": false"#));
        let back = AgentConfig::from_json(&config.to_json()).unwrap();
        assert!(!back.serving.metrics_per_tenant);
    }

    #[test]
    fn monitor_mode_uses_the_readonly_clock() {
        let mut ts = fixtures::time_service("cluster");
        ts.spec.discipline.mode = DisciplineMode::Monitor;
        let config = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        assert_eq!(config.clock.backend, ClockBackend::Readonly);
    }

    #[test]
    fn the_time_services_clock_picks_the_backend_and_monitor_never_steers() {
        use ClockSource::*;
        use DisciplineMode::*;
        for (mode, clock, want) in [
            (Discipline, None, ClockBackend::System),
            (Discipline, Some(System), ClockBackend::System),
            (Discipline, Some(Readonly), ClockBackend::Readonly),
            (Discipline, Some(Simulated), ClockBackend::Simulated),
            (Monitor, None, ClockBackend::Readonly),
            (Monitor, Some(System), ClockBackend::Readonly),
            (Monitor, Some(Readonly), ClockBackend::Readonly),
            (Monitor, Some(Simulated), ClockBackend::Simulated),
        ] {
            let mut ts = fixtures::time_service("cluster");
            ts.spec.discipline.mode = mode;
            ts.spec.discipline.clock = clock;
            let config = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
            assert_eq!(config.clock.backend, want, "{mode:?} with {clock:?}");
        }
    }

    #[test]
    fn the_revision_depends_only_on_content() {
        let ts = fixtures::time_service("cluster");
        let one = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        let two = build_agent_config("cluster", &ts.spec, None, &[], &FleetInput::default());
        assert_eq!(one.revision, two.revision);
        assert_eq!(one.revision, revision_of(&one));
        let mut changed = ts.spec.clone();
        changed.discipline.max_slew_ppm = 100;
        let three = build_agent_config("cluster", &changed, None, &[], &FleetInput::default());
        assert_ne!(one.revision, three.revision);
    }

    #[test]
    fn agents_outside_the_egress_tier_get_the_egress_agents_as_upstreams() {
        let mut ts = fixtures::time_service("cluster");
        ts.spec.egress_tier = Some(
            serde_json::from_value(
                serde_json::json!({ "nodeSelector": { "edge": "true" }, "fallbackToUpstreams": true }),
            )
            .unwrap(),
        );
        let fleet = FleetInput {
            egress_nodes: vec!["edge-1".into(), "edge-0".into()],
            egress_addresses: vec!["10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            agent_addresses: vec![
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                "10.0.0.3".parse().unwrap(),
            ],
        };
        let config = build_agent_config("cluster", &ts.spec, Some(12799), &[], &fleet);
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        let egress = config.egress.as_ref().unwrap();
        assert_eq!(egress.nodes, ["edge-0", "edge-1"]);
        let hosts: Vec<_> = egress
            .tier_upstreams
            .iter()
            .map(|u| (u.host.as_str(), u.port))
            .collect();
        assert_eq!(hosts, [("10.0.0.1", 12799), ("10.0.0.2", 12799)]);
        assert_eq!(config.serving.peer_port, Some(12799));
        assert_eq!(
            config.serving.peer_allowed,
            nets(&["10.0.0.1/32", "10.0.0.2/31"])
        );
        assert_eq!(
            config.upstreams_for_node("worker-0", false).len(),
            2,
            "the two tier agents while one is usable"
        );
        assert_eq!(
            config.upstreams_for_node("worker-0", true).len(),
            3,
            "then the pool as fallback"
        );
        assert!(config.may_fall_back("worker-0"));
        assert_eq!(config.upstreams_for_node("edge-0", true), config.upstreams);
    }

    #[test]
    fn config_map_carries_the_json_under_the_contract_key_with_owner_and_labels() {
        let ts = fixtures::time_service("cluster");
        let (config, text) = build_agent_config_document(
            "cluster",
            &ts.spec,
            None,
            &[],
            &FleetInput::default(),
            &mut DocumentCache::default(),
        );
        let cm = build_agent_config_map(
            &ts,
            &fixtures::settings(),
            &config,
            &text,
            &mut MemberCache::default(),
        )
        .unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("cluster-agent-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("stratum-system"));
        assert_eq!(
            cm.metadata.labels.as_ref().unwrap()["stratum.io/time-service"],
            "cluster"
        );
        assert_eq!(
            cm.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-cluster"
        );
        assert!(
            cm.data.is_none(),
            "the plain key is only read, never written"
        );
        assert_eq!(AgentConfig::from_config_map(&cm).unwrap(), config);
        assert_eq!(
            text,
            document(&config),
            "the spliced revision is the real one"
        );
        assert_eq!(config.revision, revision_of(&config));
    }
}
