//! The agent config contract: what the operator writes into each TimeService's ConfigMap (key
//! [`AGENT_CONFIG_KEY`]) and every agent of that TimeService reads and hot-reloads.
//!
//! It is versioned ([`AGENT_CONFIG_VERSION`]) and strict: unknown fields are errors, so an
//! agent never silently ignores a setting an operator newer than itself meant. Durations are
//! plain seconds (`*Seconds`, JSON numbers) because both ends are programs. [`AgentConfig::validate`]
//! returns every problem at once, each with its JSON path, so a rejected config is reported
//! completely in one NodeClock condition.
//!
//! Version 2 keeps large clusters inside a ConfigMap's 1 MiB: client prefixes that several
//! tenants allow (the pods of one namespace matching one selector) are written once in
//! `serving.cidrSets` and referenced by index from `serving.tenants[].allowedSets`, and the
//! operator writes the compact JSON gzipped into `binaryData` ([`AGENT_CONFIG_GZIP_KEY`]).
//! Readers still accept version 1 and the plain `data` key ([`AgentConfig::from_config_map`]).

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::tenant_time_policy::TenantTimePolicySpec;

/// The version of the contract this build writes (and the newest it reads).
pub const AGENT_CONFIG_VERSION: u32 = 2;
/// The oldest version this build still reads: version 1 has no CIDR sets.
pub const AGENT_CONFIG_MIN_VERSION: u32 = 1;
/// ConfigMap `data` key holding a plain JSON document (version 1 operators, hand-written maps).
pub const AGENT_CONFIG_KEY: &str = "agent-config.json";
/// ConfigMap `binaryData` key holding the gzipped compact JSON document; preferred when present.
pub const AGENT_CONFIG_GZIP_KEY: &str = "agent-config.json.gz";
/// What the API server accepts as `data` plus `binaryData` of one ConfigMap.
pub const CONFIG_MAP_LIMIT_BYTES: usize = 1024 * 1024;
/// Largest decompressed document read: a bound against a compression bomb, far above any
/// config that fits a ConfigMap compressed.
pub const MAX_DOCUMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Everything an agent needs to discipline its node and serve its tenants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Contract version; must equal [`AGENT_CONFIG_VERSION`].
    pub version: u32,
    /// Opaque revision chosen by the operator; agents report the one they run.
    pub revision: String,
    /// Name of the TimeService this config belongs to.
    pub time_service: String,
    /// Which clock the agent drives.
    pub clock: ClockConfig,
    /// Upstream servers and pools (for egress agents only when `egress` is set).
    pub upstreams: Vec<UpstreamConfig>,
    /// The egress tier, when the TimeService has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressConfig>,
    /// Source selection.
    pub selection: SelectionConfig,
    /// Clock discipline.
    pub discipline: DisciplineConfig,
    /// Leap second handling.
    pub leap: LeapConfig,
    /// NodeClock reporting.
    pub reporting: ReportingConfig,
    /// Log verbosity.
    #[serde(default)]
    pub log_level: LogLevel,
    /// PEM certificates of the CAs that NTS-KE servers' certificates must chain to; the public
    /// web PKI (Mozilla's root program, built into the agent) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nts_ca_bundle: Option<String>,
    /// Serving tenants. Last, and `cidrSets` last within it, so a writer can append the
    /// (large, mostly unchanged) sets to the rest of the document without re-serializing them.
    pub serving: ServingConfig,
}

/// Clock backend selection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClockConfig {
    /// The backend.
    pub backend: ClockBackend,
}

/// The clock an agent measures and, for `system`, steers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockBackend {
    /// The node's kernel clock via clock_adjtime: the only backend that changes a clock.
    System,
    /// Measures the kernel clock and reports, never adjusts it.
    Readonly,
    /// A software clock with injected errors, for tests, benchmarks and demos.
    Simulated,
}

/// One configured upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name or IP address.
    pub host: String,
    /// One server or a pool of them.
    pub kind: UpstreamKind,
    /// UDP port.
    pub port: u16,
    /// Burst at start and after unreachability.
    pub iburst: bool,
    /// Minimum poll exponent (log2 seconds).
    pub min_poll: i8,
    /// Maximum poll exponent (log2 seconds).
    pub max_poll: i8,
    /// Most sources taken from a pool.
    pub max_sources: u8,
    /// Authenticate with NTS (RFC 8915): `host` is then the NTS-KE server, and the NTP
    /// address and port are the ones its key exchange names.
    #[serde(default)]
    pub nts: bool,
    /// NTS-KE TCP port; 4460 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nts_port: Option<u16>,
    /// Sign requests with a symmetric key and take only replies signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<UpstreamKeyConfig>,
}

/// The symmetric key an upstream is polled with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamKeyConfig {
    /// Key file (`ID TYPE HEX:...` lines) from the key material Secret; a path, never a key.
    pub keys_file: String,
    /// The key's id in it.
    pub key_id: u32,
}

/// Server or pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// One server.
    Server,
    /// A name resolving to several servers.
    Pool,
}

/// Egress tier: agents on `nodes` use `upstreams`; all others use `tierUpstreams`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressConfig {
    /// Names of the nodes in the egress tier.
    pub nodes: Vec<String>,
    /// The egress agents, as upstreams for every other agent.
    pub tier_upstreams: Vec<UpstreamConfig>,
    /// Non-egress agents also poll `upstreams` while no egress agent is usable (see
    /// [`AgentConfig::upstreams_for_node`]).
    pub fallback_to_upstreams: bool,
}

/// Selection settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectionConfig {
    /// Agreeing sources required before steering.
    pub min_sources: u8,
    /// Root distance above which a source is not selectable.
    pub max_distance_seconds: f64,
}

/// Discipline settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DisciplineConfig {
    /// Step threshold during the first `makeStepLimit` updates.
    pub make_step_threshold_seconds: f64,
    /// Number of initial updates during which stepping is allowed.
    pub make_step_limit: u32,
    /// Largest slew rate.
    pub max_slew_ppm: f64,
    /// Largest correction accepted during the first updates.
    pub panic_startup_seconds: f64,
    /// Largest correction accepted afterwards.
    pub panic_runtime_seconds: f64,
    /// Let the kernel keep the RTC in sync.
    pub rtc_sync: bool,
    /// Absolute path of the drift file.
    pub drift_file: String,
    /// Steer the system clock even beside another time daemon. Written only when set, so
    /// agents older than the field keep reading the documents of TimeServices without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub take_over: bool,
}

/// Leap settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeapConfig {
    /// How a leap second is applied.
    pub mode: LeapMode,
    /// Length of the linear smear.
    pub smear_window_seconds: f64,
}

/// How a leap second is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeapMode {
    /// Kernel insert/delete at the end of the UTC day.
    Kernel,
    /// Linear smear.
    Smear,
    /// Ignore announcements.
    Ignore,
}

/// Serving settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingConfig {
    /// How long to keep answering as synchronized after losing every source.
    pub holdover_seconds: f64,
    /// Stratum announced after holdover; none answers "unsynchronized".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_stratum: Option<u8>,
    /// Port on which egress agents answer the other agents of the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// Addresses of the fleet's agents, allowed on `peerPort`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_allowed: Vec<IpNet>,
    /// Tenants, each on its own port.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Client prefix sets shared by tenants (version 2), referenced by their index from
    /// `tenants[].allowedSets`: a set selected by many tenants is written once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_sets: Vec<Vec<IpNet>>,
    /// Request metrics per tenant (true), or totals over every tenant under `tenant="_all"`.
    /// Written only when false, so agents that predate it read every other config.
    #[serde(default = "per_tenant_metrics", skip_serializing_if = "is_true")]
    pub metrics_per_tenant: bool,
    /// File holding the TimeService's NTS cookie master keys (current and previous, JSON, see
    /// the agent's `nts_server` module), from the Secret the operator manages. Needed when a
    /// tenant has `nts`; a path and never the keys, so this config carries no key material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nts_cookie_keys_file: Option<String>,
}

fn per_tenant_metrics() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One tenant as an agent serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantConfig {
    /// Stable identity, `namespace/name` of the TenantTimePolicy; used as metric label.
    pub id: String,
    /// UDP port of this tenant.
    pub port: u16,
    /// Client prefixes allowed besides `allowedSets` (in version 1 all of them, aggregated).
    #[serde(default)]
    pub allowed: Vec<IpNet>,
    /// Indexes into `serving.cidrSets` whose prefixes are allowed too (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sets: Vec<u32>,
    /// Client prefixes never answered.
    #[serde(default)]
    pub denied: Vec<IpNet>,
    /// Rate limits.
    pub rate_limit: RateLimitConfig,
    /// Answer "unsynchronized" above this root distance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_root_distance_seconds: Option<f64>,
    /// NTS (RFC 8915) for this tenant: a key-exchange endpoint and authenticated NTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nts: Option<TenantNtsConfig>,
    /// Symmetric keys (RFC 8573, legacy SHA1/MD5) for this tenant's devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_keys: Option<TenantSymmetricKeysConfig>,
}

/// One tenant's symmetric keys on an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantSymmetricKeysConfig {
    /// Key file (`ID TYPE HEX:...` lines) from the Secret the operator gathers; a path and
    /// never the keys. A request whose MAC names an unknown key id or does not verify gets a
    /// crypto-NAK when `rateLimit.kissOfDeath` is set, else no answer.
    pub keys_file: String,
    /// What requests without a MAC get on the tenant's port (the same as `nts.unauthenticated`
    /// when the tenant has both).
    #[serde(default)]
    pub unauthenticated: Unauthenticated,
}

/// Where agents find the key material Secret the operator gathers for their TimeService
/// (`<timeService>-nts` in the operator's namespace, mounted read-only).
pub const NTS_MATERIAL_DIR: &str = "/etc/stratum/nts";
/// The Secret's member holding the cookie master keys (see `serving.ntsCookieKeysFile`).
pub const NTS_COOKIE_KEYS_KEY: &str = "cookie-keys.json";

/// The Secret's member holding the certificate chain of the tenant served on `port`: ports
/// are unique within a TimeService and, unlike namespace and name, always a valid key.
pub fn nts_certificate_key(port: u16) -> String {
    format!("tenant-{port}.crt")
}

/// The Secret's member holding the private key of the tenant served on `port`.
pub fn nts_private_key_key(port: u16) -> String {
    format!("tenant-{port}.key")
}

/// The Secret's member holding the symmetric keys of the tenant served on `port`.
pub fn symmetric_keys_key(port: u16) -> String {
    format!("tenant-{port}.keys")
}

/// The Secret's member holding the key file of upstream key Secret `secret` (a Secret name,
/// so always a valid member name).
pub fn upstream_keys_key(secret: &str) -> String {
    format!("upstream-{secret}.keys")
}

/// Where an agent reads the Secret's member `key`.
pub fn nts_material_path(key: &str) -> String {
    format!("{NTS_MATERIAL_DIR}/{key}")
}

/// One tenant's NTS endpoint on an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantNtsConfig {
    /// TCP port of the tenant's NTS-KE endpoint on the agent.
    pub ke_port: u16,
    /// PEM certificate chain of the endpoint (a file from the Secret the operator gathers).
    pub certificate_file: String,
    /// PEM private key of the endpoint.
    pub key_file: String,
    /// NTP server the key exchange hands out (the tenant's Service name); none: the host the
    /// client ran the key exchange with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntp_server: Option<String>,
    /// NTP port the key exchange hands out (the Service's); none: 123.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntp_port: Option<u16>,
    /// What requests without NTS get on the tenant's port.
    #[serde(default)]
    pub unauthenticated: Unauthenticated,
}

/// What an NTS tenant's port does with a request that carries no NTS fields.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Unauthenticated {
    /// Served as any request (NTS is offered, not required).
    #[default]
    Serve,
    /// Answered with a Kiss-o'-Death DENY.
    Deny,
    /// Not answered.
    Ignore,
}

/// Rate limits of one tenant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Minimum average interval between one client's requests.
    pub client_interval_seconds: f64,
    /// Back-to-back requests a client may send.
    pub client_burst: u32,
    /// Sustained requests per second for the tenant on this agent; none is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_requests_per_second: Option<u32>,
    /// Tenant burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_burst: Option<u32>,
    /// Reply with KoD RATE/DENY instead of dropping.
    pub kiss_of_death: bool,
}

/// Smallest per-client interval: the agent's rate table refills at most once per millisecond,
/// so a shorter interval would silently mean 1 ms (and zero, no limit at all).
pub const MIN_CLIENT_INTERVAL_SECONDS: f64 = 0.001;
/// Smallest maximum root distance a tenant may require. An agent's root distance grows by
/// PHI (15 µs/s, RFC 5905) between clock updates, so below a millisecond no agent polling at
/// ordinary intervals stays within it and the tenant would flap between ready and not.
pub const MIN_MAX_ROOT_DISTANCE_SECONDS: f64 = 0.001;

/// A field of one tenant entry, named both as the agent config has it and as the
/// TenantTimePolicy the operator builds it from, so one check serves both readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantField {
    /// `id` (the policy's `namespace/name`).
    Id,
    /// `port` (allocated by the operator, `status.port`).
    Port,
    /// `rateLimit.clientIntervalSeconds`.
    ClientInterval,
    /// `rateLimit.clientBurst`.
    ClientBurst,
    /// `rateLimit.tenantRequestsPerSecond`.
    TenantRequestsPerSecond,
    /// `rateLimit.tenantBurst`.
    TenantBurst,
    /// `maxRootDistanceSeconds`.
    MaxRootDistance,
    /// `allowedSets[i]`.
    AllowedSet(usize),
}

impl TenantField {
    /// The path inside one `serving.tenants[]` entry.
    pub fn config_path(self) -> String {
        match self {
            TenantField::Id => "id".into(),
            TenantField::Port => "port".into(),
            TenantField::ClientInterval => "rateLimit.clientIntervalSeconds".into(),
            TenantField::ClientBurst => "rateLimit.clientBurst".into(),
            TenantField::TenantRequestsPerSecond => "rateLimit.tenantRequestsPerSecond".into(),
            TenantField::TenantBurst => "rateLimit.tenantBurst".into(),
            TenantField::MaxRootDistance => "maxRootDistanceSeconds".into(),
            TenantField::AllowedSet(i) => format!("allowedSets[{i}]"),
        }
    }

    /// The TenantTimePolicy field this entry field is built from.
    pub fn policy_path(self) -> &'static str {
        match self {
            TenantField::Id => "metadata.name",
            TenantField::Port => "status.port",
            TenantField::ClientInterval => "spec.rateLimit.perClient.interval",
            TenantField::ClientBurst => "spec.rateLimit.perClient.burst",
            TenantField::TenantRequestsPerSecond => "spec.rateLimit.perTenant.requestsPerSecond",
            TenantField::TenantBurst => "spec.rateLimit.perTenant.burst",
            TenantField::MaxRootDistance => "spec.requirements.maxRootDistance",
            TenantField::AllowedSet(_) => "spec.allowedClients",
        }
    }
}

/// One problem of one tenant entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantProblem {
    /// The offending field.
    pub field: TenantField,
    /// What is wrong, for a human, in terms that fit both paths.
    pub message: String,
}

impl fmt::Display for TenantProblem {
    /// As the tenant's owner reads it: the TenantTimePolicy field, then why.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field.policy_path(), self.message)
    }
}

/// Every problem the agents would find in the entry of a tenant with this spec, in terms of
/// the spec's fields (see [`TenantProblem`]'s `Display`). The operator refuses such a tenant
/// alone instead of writing an entry that would make the agents refuse the whole config. The
/// port is a stand-in: ports are the operator's own, unique by construction.
pub fn policy_problems(spec: &TenantTimePolicySpec) -> Vec<TenantProblem> {
    TenantConfig::from_policy("policy".into(), u16::MAX, spec).problems(0)
}

impl TenantConfig {
    /// The entry of tenant `id` on `port` as its TenantTimePolicy spec makes it, with empty
    /// client lists (those come from resolved peers): the one mapping from every policy field
    /// an agent reads to the entry. Durations are seconds; integers out of range become 0,
    /// which [`TenantConfig::problems`] refuses, never a quietly valid value.
    pub fn from_policy(id: String, port: u16, spec: &TenantTimePolicySpec) -> Self {
        let rate = &spec.rate_limit;
        let count = |n: i32| u32::try_from(n).unwrap_or(0);
        TenantConfig {
            id,
            port,
            allowed: Vec::new(),
            allowed_sets: Vec::new(),
            denied: Vec::new(),
            rate_limit: RateLimitConfig {
                client_interval_seconds: rate.per_client.interval.as_secs_f64(),
                client_burst: count(rate.per_client.burst),
                tenant_requests_per_second: rate
                    .per_tenant
                    .as_ref()
                    .map(|r| count(r.requests_per_second)),
                tenant_burst: rate.per_tenant.as_ref().map(|r| count(r.burst)),
                kiss_of_death: rate.kiss_of_death,
            },
            max_root_distance_seconds: spec.requirements.max_root_distance.map(|d| d.as_secs_f64()),
            // The key exchange runs on TCP at the tenant's UDP port number (separate spaces,
            // and unique per agent by construction). It names no server or port: clients use
            // the address they reached the key exchange at, which is the tenant's Service
            // however they name it (cluster DNS, the VIP, a load balancer), and port 123.
            nts: spec.nts().map(|auth| TenantNtsConfig {
                ke_port: port,
                certificate_file: nts_material_path(&nts_certificate_key(port)),
                key_file: nts_material_path(&nts_private_key_key(port)),
                ntp_server: None,
                ntp_port: None,
                unauthenticated: auth.unauthenticated.unwrap_or_default(),
            }),
            symmetric_keys: spec.symmetric_keys().map(|auth| TenantSymmetricKeysConfig {
                keys_file: nts_material_path(&symmetric_keys_key(port)),
                unauthenticated: auth.unauthenticated.unwrap_or_default(),
            }),
        }
    }

    /// Every problem of this entry on its own, given that the document has `cidr_sets` shared
    /// sets. [`AgentConfig::validate`] runs it on each entry (adding what only the whole list
    /// shows: duplicate ids and ports); the operator runs it on each tenant before the tenant
    /// enters the shared config, so a tenant the agents would refuse is refused alone.
    ///
    /// Allocates nothing for a good entry: a config of a thousand tenants is validated on
    /// every change.
    pub fn problems(&self, cidr_sets: usize) -> Vec<TenantProblem> {
        let mut out = Vec::new();
        let mut add = |field, message: &str| {
            out.push(TenantProblem {
                field,
                message: message.to_owned(),
            })
        };
        if self.id.is_empty() {
            add(TenantField::Id, "must not be empty");
        }
        if self.port == 0 {
            add(TenantField::Port, "must not be 0");
        }
        let rate = &self.rate_limit;
        if !(rate.client_interval_seconds.is_finite()
            && rate.client_interval_seconds >= MIN_CLIENT_INTERVAL_SECONDS)
        {
            add(TenantField::ClientInterval, "must be at least 1ms");
        }
        if rate.client_burst == 0 {
            add(TenantField::ClientBurst, "must be at least 1");
        }
        match (rate.tenant_requests_per_second, rate.tenant_burst) {
            (Some(0), _) => add(TenantField::TenantRequestsPerSecond, "must be at least 1"),
            (Some(rps), Some(burst)) if burst < rps => add(
                TenantField::TenantBurst,
                "must be at least the requests per second",
            ),
            (None, Some(_)) => add(TenantField::TenantBurst, "needs requests per second"),
            _ => {}
        }
        if let Some(max) = self.max_root_distance_seconds
            && !(max.is_finite() && max >= MIN_MAX_ROOT_DISTANCE_SECONDS)
        {
            add(TenantField::MaxRootDistance, "must be at least 1ms");
        }
        for (j, set) in self.allowed_sets.iter().enumerate() {
            if *set as usize >= cidr_sets {
                out.push(TenantProblem {
                    field: TenantField::AllowedSet(j),
                    message: format!("no CIDR set {set}; serving.cidrSets has {cidr_sets}"),
                });
            }
        }
        out
    }
}

/// Reporting settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportingConfig {
    /// NodeClock heartbeat when nothing changed.
    pub heartbeat_seconds: f64,
}

/// Log verbosity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Normal operation.
    #[default]
    Info,
    /// Troubleshooting.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level as a tracing filter directive (`info`, `debug`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// One problem found in a config, with the JSON path of the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// JSON path, e.g. `serving.tenants[1].port`.
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config document was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON for this contract (syntax, type or unknown field).
    #[error("agent config is not valid JSON for contract version {AGENT_CONFIG_VERSION}: {0}")]
    Parse(#[source] serde_json::Error),
    /// The gzip stream is corrupt or truncated.
    #[error("agent config is not a valid gzip stream: {0}")]
    Gzip(#[source] std::io::Error),
    /// Decompressed, the document exceeds [`MAX_DOCUMENT_BYTES`].
    #[error("agent config decompresses to more than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    /// The ConfigMap holds neither key.
    #[error(
        "ConfigMap has neither binaryData key {AGENT_CONFIG_GZIP_KEY} nor data key {AGENT_CONFIG_KEY}"
    )]
    Missing,
    /// Well-formed but inconsistent.
    #[error("agent config is invalid: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigProblem>),
}

impl AgentConfig {
    /// Parses and validates a config document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text).map_err(ConfigError::Parse)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// Reads a document from bytes: gzip (by its magic number) or plain JSON.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.starts_with(&GZIP_MAGIC) {
            Self::from_json(&gunzip(bytes)?)
        } else {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                ConfigError::Parse(serde_json::Error::io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e,
                )))
            })?;
            Self::from_json(text)
        }
    }

    /// Reads the config of a ConfigMap: `binaryData` [`AGENT_CONFIG_GZIP_KEY`] when present
    /// (what this version's operator writes), else `data` [`AGENT_CONFIG_KEY`].
    pub fn from_config_map(
        cm: &k8s_openapi::api::core::v1::ConfigMap,
    ) -> Result<Self, ConfigError> {
        Self::from_bytes(&config_map_payload(cm).ok_or(ConfigError::Missing)?)
    }

    /// The canonical JSON form (pretty, for humans and files).
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings, numbers and IpNet cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The compact JSON form, gzipped: what the operator writes into `binaryData`.
    pub fn to_gzip(&self) -> Vec<u8> {
        gzip(serde_json::to_string(self).unwrap_or_default().as_bytes())
    }

    /// The prefixes tenant `t` allows: its own plus those of its sets, aggregated. Unknown set
    /// indexes (refused by [`AgentConfig::validate`]) contribute nothing.
    pub fn tenant_allowed(serving: &ServingConfig, t: &TenantConfig) -> Vec<IpNet> {
        if t.allowed_sets.is_empty() {
            return t.allowed.clone();
        }
        let mut all = t.allowed.clone();
        for i in &t.allowed_sets {
            if let Some(set) = serving.cidr_sets.get(*i as usize) {
                all.extend_from_slice(set);
            }
        }
        IpNet::aggregate(&all)
    }

    /// Every problem in this config, or `Ok` when there is none.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Problems::default();
        if !(AGENT_CONFIG_MIN_VERSION..=AGENT_CONFIG_VERSION).contains(&self.version) {
            p.add(
                "version",
                format!(
                    "unsupported version {}; this agent reads versions \
                     {AGENT_CONFIG_MIN_VERSION} to {AGENT_CONFIG_VERSION}",
                    self.version
                ),
            );
        }
        if self.version < 2 && !self.serving.cidr_sets.is_empty() {
            p.add("serving.cidrSets", "needs contract version 2");
        }
        if self.time_service.is_empty() {
            p.add("timeService", "must not be empty");
        }
        if self.upstreams.is_empty() && self.egress.is_none() {
            p.add("upstreams", "at least one upstream is required");
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            check_upstream(&mut p, &format!("upstreams[{i}]"), u);
        }
        if let Some(egress) = &self.egress {
            if egress.nodes.is_empty() {
                p.add("egress.nodes", "an egress tier needs at least one node");
            }
            if egress.fallback_to_upstreams && self.upstreams.is_empty() {
                p.add(
                    "egress.fallbackToUpstreams",
                    "fallback needs at least one upstream",
                );
            }
            for (i, u) in egress.tier_upstreams.iter().enumerate() {
                check_upstream(&mut p, &format!("egress.tierUpstreams[{i}]"), u);
            }
        }
        if self.selection.min_sources == 0 {
            p.add("selection.minSources", "must be at least 1");
        }
        p.positive(
            "selection.maxDistanceSeconds",
            self.selection.max_distance_seconds,
        );

        let d = &self.discipline;
        p.non_negative(
            "discipline.makeStepThresholdSeconds",
            d.make_step_threshold_seconds,
        );
        if !(d.max_slew_ppm.is_finite() && d.max_slew_ppm > 0.0 && d.max_slew_ppm <= 100_000.0) {
            p.add("discipline.maxSlewPpm", "must be in (0, 100000]");
        }
        p.positive("discipline.panicStartupSeconds", d.panic_startup_seconds);
        p.positive("discipline.panicRuntimeSeconds", d.panic_runtime_seconds);
        if d.panic_runtime_seconds.is_finite()
            && d.make_step_threshold_seconds > d.panic_runtime_seconds
        {
            p.add(
                "discipline.makeStepThresholdSeconds",
                "must not exceed panicRuntimeSeconds",
            );
        }
        if !d.drift_file.starts_with('/') {
            p.add("discipline.driftFile", "must be an absolute path");
        }
        if self.leap.mode == LeapMode::Smear
            && !(self.leap.smear_window_seconds >= 3600.0
                && self.leap.smear_window_seconds <= 172_800.0)
        {
            p.add(
                "leap.smearWindowSeconds",
                "must be between 3600 and 172800 in smear mode",
            );
        }

        let s = &self.serving;
        p.non_negative("serving.holdoverSeconds", s.holdover_seconds);
        if let Some(stratum) = s.local_stratum
            && !(1..=15).contains(&stratum)
        {
            p.add("serving.localStratum", "must be between 1 and 15");
        }
        let mut ports = PortSet::default();
        if let Some(port) = s.peer_port {
            if port == 0 {
                p.add("serving.peerPort", "must not be 0");
            }
            ports.insert(port);
        }
        // Ids in ascending order, as the operator writes them, are unique without a set.
        let ascending = s.tenants.windows(2).all(|w| w[0].id < w[1].id);
        let mut ids = BTreeSet::new();
        // NTS-KE ports are TCP: apart from the UDP ports, unique among themselves.
        let mut ke_ports = BTreeSet::new();
        for (i, t) in s.tenants.iter().enumerate() {
            let at = |field: &str| format!("serving.tenants[{i}].{field}");
            if !t.id.is_empty() && !ascending && !ids.insert(t.id.as_str()) {
                p.add(at("id"), format!("duplicate tenant id {:?}", t.id));
            }
            if t.port != 0 && !ports.insert(t.port) {
                p.add(
                    at("port"),
                    format!(
                        "port {} is already used by another tenant or the peer port",
                        t.port
                    ),
                );
            }
            // The entry on its own, as the operator checks it before writing it.
            for problem in t.problems(s.cidr_sets.len()) {
                p.add(at(&problem.field.config_path()), problem.message);
            }
            if let Some(nts) = &t.nts {
                if nts.ke_port == 0 {
                    p.add(at("nts.kePort"), "must not be 0");
                } else if !ke_ports.insert(nts.ke_port) {
                    p.add(
                        at("nts.kePort"),
                        format!("port {} is already another tenant's", nts.ke_port),
                    );
                }
                for (field, path) in [
                    ("nts.certificateFile", &nts.certificate_file),
                    ("nts.keyFile", &nts.key_file),
                ] {
                    if !path.starts_with('/') {
                        p.add(at(field), "must be an absolute path");
                    }
                }
                // RFC 8915 §4.1.7: an ASCII host name or address, which a DNS name fits.
                if let Some(server) = &nts.ntp_server
                    && !(1..=253).contains(&server.len())
                {
                    p.add(at("nts.ntpServer"), "must be 1 to 253 characters");
                }
                if nts.ntp_port == Some(0) {
                    p.add(at("nts.ntpPort"), "must not be 0");
                }
                if !s
                    .nts_cookie_keys_file
                    .as_deref()
                    .is_some_and(|f| f.starts_with('/'))
                {
                    p.add(
                        at("nts"),
                        "needs serving.ntsCookieKeysFile (an absolute path)",
                    );
                }
            }
        }
        p.positive(
            "reporting.heartbeatSeconds",
            self.reporting.heartbeat_seconds,
        );
        p.finish()
    }

    /// The upstreams the agent on `node` polls: the real upstreams on an egress node or without
    /// a tier; elsewhere the tier's agents, plus the real upstreams while `falling_back` (no
    /// egress agent usable, see [`AgentConfig::may_fall_back`]) when the tier allows it.
    pub fn upstreams_for_node(&self, node: &str, falling_back: bool) -> Vec<UpstreamConfig> {
        match &self.egress {
            Some(egress) if !egress.nodes.iter().any(|n| n == node) => {
                let mut list = egress.tier_upstreams.clone();
                if falling_back && egress.fallback_to_upstreams {
                    list.extend(self.upstreams.iter().cloned());
                }
                list
            }
            _ => self.upstreams.clone(),
        }
    }

    /// The sources an agent on `node` reports (`NodeClock` `sources[].name`, the configured
    /// host) that this config does not give that node: its upstreams, or its egress tier and,
    /// where the tier allows fallback, the upstreams. Host names compare without case and a
    /// trailing dot. Non-empty means the node takes (or may take) time from a server its
    /// TimeService does not designate: an agent run by hand, or with a config of its own.
    pub fn undesignated_sources<'a>(&self, node: &str, reported: &'a [String]) -> Vec<&'a str> {
        let normal = |h: &str| h.trim_end_matches('.').to_ascii_lowercase();
        let designated: std::collections::BTreeSet<String> = self
            .upstreams_for_node(node, true)
            .iter()
            .map(|u| normal(&u.host))
            .collect();
        reported
            .iter()
            .filter(|name| !designated.contains(&normal(name)))
            .map(String::as_str)
            .collect()
    }

    /// The tightest bound on the clock error of this config's nodes: `selection.maxDistance`
    /// and every tenant's `maxRootDistance`, the figure `stratumctl report` checks a node's
    /// largest |offset| against.
    pub fn offset_bound_seconds(&self) -> f64 {
        self.serving
            .tenants
            .iter()
            .filter_map(|t| t.max_root_distance_seconds)
            .fold(self.selection.max_distance_seconds, f64::min)
    }

    /// The egress agents the agent on `node` polls; empty on an egress node or without a tier.
    pub fn tier_for_node(&self, node: &str) -> &[UpstreamConfig] {
        match &self.egress {
            Some(egress) if !egress.nodes.iter().any(|n| n == node) => &egress.tier_upstreams,
            _ => &[],
        }
    }

    /// Whether the agent on `node` may fall back to the real upstreams when no egress agent is
    /// usable: it is outside the tier and the tier allows it.
    pub fn may_fall_back(&self, node: &str) -> bool {
        self.egress.as_ref().is_some_and(|egress| {
            egress.fallback_to_upstreams && !egress.nodes.iter().any(|n| n == node)
        })
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The raw document of a ConfigMap, by the precedence of [`AgentConfig::from_config_map`];
/// also what a watcher compares to skip unchanged updates.
pub fn config_map_payload(cm: &k8s_openapi::api::core::v1::ConfigMap) -> Option<Vec<u8>> {
    if let Some(bytes) = cm
        .binary_data
        .as_ref()
        .and_then(|b| b.get(AGENT_CONFIG_GZIP_KEY))
    {
        return Some(bytes.0.clone());
    }
    cm.data
        .as_ref()
        .and_then(|d| d.get(AGENT_CONFIG_KEY))
        .map(|text| text.as_bytes().to_vec())
}

/// Gzips a document as one member, at zlib's default level (flate2's zlib-rs backend, pure
/// Rust). The operator compresses only the parts of a config that changed (one member each,
/// see its `build::gzip`), so the better ratio costs little: at 1000 tenants and 10,000 pods
/// 46 KiB instead of 72 KiB at the fast level.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    gzip_member(bytes, &mut None)
}

/// Gzip header of every member: no name, no time (so equal input gives equal bytes), OS
/// unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// `bytes` as one gzip member (RFC 1952: header, raw deflate, CRC-32, length) at zlib's
/// default level, compressed with `deflate`, which is made on first use and reset after:
/// setting one up (zeroing its tables) costs more than compressing a small chunk, so a
/// writer of many members keeps one.
pub fn gzip_member(bytes: &[u8], deflate: &mut Option<flate2::Compress>) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let state = match deflate {
        Some(d) => {
            d.reset();
            d
        }
        None => deflate.insert(Compress::new(Compression::default(), false)),
    };
    let mut out = Vec::with_capacity(GZIP_HEADER.len() + bytes.len() / 3 + 64);
    out.extend_from_slice(&GZIP_HEADER);
    loop {
        let consumed = usize::try_from(state.total_in()).unwrap_or(usize::MAX);
        let rest = bytes.get(consumed..).unwrap_or_default();
        match state.compress_vec(rest, &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => break,
            // Out of room: give it more and go on.
            Ok(_) => out.reserve(out.capacity().max(1024)),
            // zlib refuses only misuse, which a reset state compressing a slice cannot be;
            // were it to happen, write the bytes stored rather than a broken member.
            Err(_) => {
                *deflate = None;
                out.truncate(GZIP_HEADER.len());
                stored_deflate(bytes, &mut out);
                break;
            }
        }
    }
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE is the length modulo 2^32.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out
}

/// `bytes` as deflate stored blocks (RFC 1951 3.2.4), uncompressed.
fn stored_deflate(bytes: &[u8], out: &mut Vec<u8>) {
    let mut blocks = bytes.chunks(usize::from(u16::MAX)).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let last = u8::from(blocks.peek().is_none());
        let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// Decompresses a gzip document (every member), refusing more than [`MAX_DOCUMENT_BYTES`].
fn gunzip(bytes: &[u8]) -> Result<String, ConfigError> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_DOCUMENT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(ConfigError::Gzip)?;
    if text.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(ConfigError::TooLarge);
    }
    Ok(text)
}

fn check_upstream(p: &mut Problems, at: &str, u: &UpstreamConfig) {
    if u.host.is_empty() {
        p.add(format!("{at}.host"), "must not be empty");
    }
    if u.port == 0 {
        p.add(format!("{at}.port"), "must not be 0");
    }
    for (name, value) in [("minPoll", u.min_poll), ("maxPoll", u.max_poll)] {
        if !(0..=17).contains(&value) {
            p.add(format!("{at}.{name}"), "must be between 0 and 17");
        }
    }
    if u.min_poll > u.max_poll {
        p.add(
            format!("{at}.minPoll"),
            "must be less than or equal to maxPoll",
        );
    }
    if u.max_sources == 0 {
        p.add(format!("{at}.maxSources"), "must be at least 1");
    }
    if u.nts_port == Some(0) {
        p.add(format!("{at}.ntsPort"), "must not be 0");
    }
    if let Some(key) = &u.key {
        if key.key_id == 0 {
            p.add(format!("{at}.key.keyId"), "must not be 0");
        }
        if u.nts {
            p.add(format!("{at}.key"), "an nts upstream takes no key");
        }
    }
}

/// Which ports are taken: one bit each.
struct PortSet(Box<[u64; 1024]>);

impl Default for PortSet {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl PortSet {
    /// Takes `port`; false when it was taken already.
    fn insert(&mut self, port: u16) -> bool {
        let (word, bit) = (usize::from(port / 64), port % 64);
        let taken = self.0[word] & (1 << bit) != 0;
        self.0[word] |= 1 << bit;
        !taken
    }
}

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }
    fn positive(&mut self, path: &str, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            self.add(path, "must be a positive number of seconds");
        }
    }
    fn non_negative(&mut self, path: &str, value: f64) {
        if !(value.is_finite() && value >= 0.0) {
            self.add(path, "must be a non-negative number of seconds");
        }
    }
    fn finish(self) -> Result<(), Vec<ConfigProblem>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The path of every problem `config.validate()` finds (it must find some).
    fn problem_paths(config: &AgentConfig) -> Vec<String> {
        config
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect()
    }

    #[test]
    fn sources_outside_the_nodes_upstreams_are_undesignated() {
        let mut config = sample();
        let reported = vec![
            "POOL.example.org.".to_owned(),
            "rogue.example.com".to_owned(),
            "10.0.0.9".to_owned(),
        ];
        assert_eq!(
            config.undesignated_sources("node-a", &reported),
            ["rogue.example.com", "10.0.0.9"]
        );
        // Behind a tier: the tier's agents are designated, the upstreams only where the tier
        // allows fallback, and the egress node itself polls the upstreams.
        let mut tier = config.upstreams[0].clone();
        tier.host = "10.0.0.9".into();
        config.egress = Some(EgressConfig {
            nodes: vec!["egress-0".into()],
            tier_upstreams: vec![tier],
            fallback_to_upstreams: false,
        });
        assert_eq!(
            config.undesignated_sources("node-a", &reported),
            ["POOL.example.org.", "rogue.example.com"]
        );
        assert_eq!(
            config.undesignated_sources("egress-0", &reported),
            ["rogue.example.com", "10.0.0.9"]
        );
        config.egress.as_mut().unwrap().fallback_to_upstreams = true;
        assert_eq!(
            config.undesignated_sources("node-a", &reported),
            ["rogue.example.com"]
        );
    }

    #[test]
    fn the_offset_bound_is_the_tightest_of_max_distance_and_the_tenants() {
        let mut config = sample();
        config.serving.tenants[0].max_root_distance_seconds = None;
        assert_eq!(config.offset_bound_seconds(), 1.5);
        config.serving.tenants[0].max_root_distance_seconds = Some(0.05);
        assert_eq!(config.offset_bound_seconds(), 0.05);
        config.serving.tenants[0].max_root_distance_seconds = Some(3.0);
        assert_eq!(config.offset_bound_seconds(), 1.5);
    }

    pub(crate) fn sample() -> AgentConfig {
        AgentConfig {
            version: AGENT_CONFIG_VERSION,
            revision: "r1".into(),
            time_service: "cluster-time".into(),
            clock: ClockConfig {
                backend: ClockBackend::Readonly,
            },
            upstreams: vec![UpstreamConfig {
                host: "pool.example.org".into(),
                kind: UpstreamKind::Pool,
                port: 123,
                iburst: true,
                min_poll: 6,
                max_poll: 10,
                max_sources: 4,
                nts: false,
                nts_port: None,
                key: None,
            }],
            egress: None,
            selection: SelectionConfig {
                min_sources: 3,
                max_distance_seconds: 1.5,
            },
            discipline: DisciplineConfig {
                make_step_threshold_seconds: 1.0,
                make_step_limit: 3,
                max_slew_ppm: 500.0,
                panic_startup_seconds: 86_400.0,
                panic_runtime_seconds: 1000.0,
                rtc_sync: true,
                drift_file: "/var/lib/stratum/drift".into(),
                take_over: false,
            },
            leap: LeapConfig {
                mode: LeapMode::Kernel,
                smear_window_seconds: 86_400.0,
            },
            serving: ServingConfig {
                holdover_seconds: 3600.0,
                local_stratum: None,
                peer_port: None,
                peer_allowed: vec![],
                tenants: vec![TenantConfig {
                    id: "team-a/ntp".into(),
                    port: 12300,
                    allowed: vec![
                        "10.244.1.0/24".parse().unwrap(),
                        "fd00::/64".parse().unwrap(),
                    ],
                    allowed_sets: vec![0],
                    denied: vec!["10.244.1.13/32".parse().unwrap()],
                    rate_limit: RateLimitConfig {
                        client_interval_seconds: 1.0,
                        client_burst: 16,
                        tenant_requests_per_second: Some(1000),
                        tenant_burst: Some(2000),
                        kiss_of_death: true,
                    },
                    max_root_distance_seconds: Some(0.1),
                    nts: None,
                    symmetric_keys: None,
                }],
                cidr_sets: vec![vec!["10.244.7.0/24".parse().unwrap()]],
                metrics_per_tenant: true,
                nts_cookie_keys_file: None,
            },
            reporting: ReportingConfig {
                heartbeat_seconds: 60.0,
            },
            log_level: LogLevel::Info,
            nts_ca_bundle: None,
        }
    }

    #[test]
    fn config_round_trips_through_json_unchanged() {
        let config = sample();
        let text = config.to_json();
        assert_eq!(AgentConfig::from_json(&text).unwrap(), config);
    }

    #[test]
    fn unknown_fields_are_rejected_at_any_depth() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["serving"]["tenants"][0]["colour"] = "blue".into();
        let err = AgentConfig::from_json(&value.to_string()).unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)));
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn a_newer_contract_version_is_refused_with_the_supported_one_named() {
        let mut config = sample();
        config.version = 3;
        let problems = config.validate().unwrap_err();
        assert_eq!(problems[0].path, "version");
        assert!(problems[0].message.contains("versions 1 to 2"));
    }

    #[test]
    fn a_version_1_document_without_sets_is_still_read() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["version"] = 1.into();
        value["serving"].as_object_mut().unwrap().remove("cidrSets");
        value["serving"]["tenants"][0]
            .as_object_mut()
            .unwrap()
            .remove("allowedSets");
        let config = AgentConfig::from_json(&value.to_string()).unwrap();
        let t = &config.serving.tenants[0];
        assert_eq!(AgentConfig::tenant_allowed(&config.serving, t), t.allowed);
        // Sets are a version 2 feature: a version 1 document cannot carry them.
        value["serving"]["cidrSets"] = serde_json::json!([["10.0.0.0/8"]]);
        let err = AgentConfig::from_json(&value.to_string()).unwrap_err();
        assert!(err.to_string().contains("serving.cidrSets"), "{err}");
    }

    #[test]
    fn a_tenant_allows_its_own_prefixes_and_those_of_its_sets() {
        let config = sample();
        let t = &config.serving.tenants[0];
        let got: Vec<String> = AgentConfig::tenant_allowed(&config.serving, t)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.244.1.0/24", "10.244.7.0/24", "fd00::/64"]);
    }

    #[test]
    fn a_reference_to_a_missing_set_is_refused_with_its_path() {
        let mut config = sample();
        config.serving.tenants[0].allowed_sets = vec![0, 5];
        let problems = config.validate().unwrap_err();
        assert_eq!(problems[0].path, "serving.tenants[0].allowedSets[1]");
        assert!(problems[0].message.contains("has 1"), "{}", problems[0]);
    }

    fn config_map(
        data: Option<&str>,
        gz: Option<Vec<u8>>,
    ) -> k8s_openapi::api::core::v1::ConfigMap {
        k8s_openapi::api::core::v1::ConfigMap {
            data: data.map(|d| [(AGENT_CONFIG_KEY.to_string(), d.to_string())].into()),
            binary_data: gz.map(|b| {
                [(
                    AGENT_CONFIG_GZIP_KEY.to_string(),
                    k8s_openapi::ByteString(b),
                )]
                .into()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_config_map_is_read_from_gzip_binary_data_first_then_plain_data() {
        let config = sample();
        let mut older = sample();
        older.revision = "older".into();
        let both = config_map(Some(&older.to_json()), Some(config.to_gzip()));
        assert_eq!(AgentConfig::from_config_map(&both).unwrap(), config);
        let plain = config_map(Some(&older.to_json()), None);
        assert_eq!(AgentConfig::from_config_map(&plain).unwrap(), older);
        let err = AgentConfig::from_config_map(&config_map(None, None)).unwrap_err();
        assert!(matches!(err, ConfigError::Missing), "{err}");
        // Files may hold either form.
        assert_eq!(AgentConfig::from_bytes(&config.to_gzip()).unwrap(), config);
        assert_eq!(
            AgentConfig::from_bytes(config.to_json().as_bytes()).unwrap(),
            config
        );
    }

    #[test]
    fn corrupt_or_truncated_gzip_is_refused_as_such() {
        let good = sample().to_gzip();
        let truncated = &good[..good.len() / 2];
        let err = AgentConfig::from_bytes(truncated).unwrap_err();
        assert!(matches!(err, ConfigError::Gzip(_)), "{err}");
        assert!(err.to_string().contains("gzip"), "{err}");
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(AgentConfig::from_bytes(&flipped).is_err());
    }

    #[test]
    fn a_compression_bomb_is_refused_without_inflating_it_all() {
        let zeros = vec![b' '; (MAX_DOCUMENT_BYTES + 10) as usize];
        let bomb = gzip(&zeros);
        let err = AgentConfig::from_bytes(&bomb).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge), "{err}");
    }

    #[test]
    fn members_from_a_shared_state_and_stored_blocks_both_read_back() {
        let text = "x".repeat(200_000) + &"{\"a\":[1,2,3]},".repeat(5000);
        let mut deflate = None;
        let mut both = gzip_member(text.as_bytes(), &mut deflate);
        both.extend(gzip_member(b"", &mut deflate));
        both.extend(gzip_member(text.as_bytes(), &mut deflate));
        assert_eq!(gunzip(&both).unwrap(), format!("{text}{text}"));
        assert_eq!(
            gzip(text.as_bytes()),
            gzip_member(text.as_bytes(), &mut None)
        );
        // The fallback, forced: the bytes stored in blocks of at most 65535.
        for input in [&b""[..], b"short", text.as_bytes()] {
            let mut member = GZIP_HEADER.to_vec();
            stored_deflate(input, &mut member);
            let mut crc = flate2::Crc::new();
            crc.update(input);
            member.extend_from_slice(&crc.sum().to_le_bytes());
            member.extend_from_slice(&(input.len() as u32).to_le_bytes());
            assert_eq!(gunzip(&member).unwrap().as_bytes(), input);
        }
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let mut config = sample();
        config.upstreams[0].min_poll = 11;
        config.selection.min_sources = 0;
        config.discipline.drift_file = "relative".into();
        let mut second = config.serving.tenants[0].clone();
        second.rate_limit.client_burst = 0;
        config.serving.tenants.push(second);
        let paths = problem_paths(&config);
        assert_eq!(
            paths,
            [
                "upstreams[0].minPoll",
                "selection.minSources",
                "discipline.driftFile",
                "serving.tenants[1].id",
                "serving.tenants[1].port",
                "serving.tenants[1].rateLimit.clientBurst",
            ]
        );
    }

    #[test]
    fn an_nts_upstream_is_valid_and_its_key_exchange_port_is_not_zero() {
        let mut config = sample();
        config.upstreams[0].nts = true;
        config.upstreams[0].nts_port = Some(0);
        assert_eq!(problem_paths(&config), ["upstreams[0].ntsPort"]);
        config.upstreams[0].nts_port = None;
        assert!(config.validate().is_ok(), "the agent speaks NTS");
    }

    #[test]
    fn a_tenants_nts_needs_its_files_the_key_file_and_a_port_of_its_own() {
        let mut config = sample();
        let nts = TenantNtsConfig {
            ke_port: 4460,
            certificate_file: "/nts/a.crt".into(),
            key_file: "/nts/a.key".into(),
            ntp_server: Some("ntp.team-a.svc".into()),
            ntp_port: Some(123),
            unauthenticated: Unauthenticated::Deny,
        };
        config.serving.tenants[0].nts = Some(nts.clone());
        assert_eq!(
            problem_paths(&config),
            ["serving.tenants[0].nts"],
            "no cookie key file"
        );
        config.serving.nts_cookie_keys_file = Some("/nts/cookie-keys.json".into());
        assert!(config.validate().is_ok());
        let mut second = config.serving.tenants[0].clone();
        second.id = "zz/other".into();
        second.port += 1;
        second.nts = Some(TenantNtsConfig {
            certificate_file: "relative.crt".into(),
            ntp_server: Some(String::new()),
            ntp_port: Some(0),
            ..nts
        });
        config.serving.tenants.push(second);
        assert_eq!(
            problem_paths(&config),
            [
                "serving.tenants[1].nts.kePort",
                "serving.tenants[1].nts.certificateFile",
                "serving.tenants[1].nts.ntpServer",
                "serving.tenants[1].nts.ntpPort",
            ]
        );
        // The document's JSON names the fields as this contract does; no key material.
        let json: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
        let entry = &json["serving"]["tenants"][0]["nts"];
        assert_eq!(
            (&entry["kePort"], &entry["unauthenticated"]),
            (&4460.into(), &"Deny".into())
        );
        assert_eq!(
            json["serving"]["ntsCookieKeysFile"],
            "/nts/cookie-keys.json"
        );
    }

    #[test]
    fn duplicate_ids_and_ports_are_found_in_any_order_and_at_any_port() {
        let mut config = sample();
        let template = config.serving.tenants[0].clone();
        let tenant = |id: &str, port: u16| TenantConfig {
            id: id.into(),
            port,
            ..template.clone()
        };
        config.serving.peer_port = Some(u16::MAX);
        config.serving.tenants = vec![
            tenant("b/t", 1),
            tenant("a/t", 2),
            tenant("c/t", u16::MAX),
            tenant("b/t", 3),
            tenant("d/t", 1),
        ];
        let problems = problem_paths(&config);
        assert_eq!(
            problems,
            [
                "serving.tenants[2].port",
                "serving.tenants[3].id",
                "serving.tenants[4].port",
            ]
        );
        // Ascending ids take the path without a set: still every port checked.
        config.serving.tenants = vec![tenant("a/t", 2), tenant("b/t", 2)];
        let problems: Vec<_> = config.validate().unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "serving.tenants[1].port");
    }

    fn policy(spec: serde_json::Value) -> TenantTimePolicySpec {
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn a_tenant_entry_is_checked_alone_and_each_problem_names_the_policy_field() {
        let zero = policy(serde_json::json!({
            "rateLimit": { "perClient": { "interval": "0s" } },
            "requirements": { "maxRootDistance": "0s" }
        }));
        let problems = policy_problems(&zero);
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "spec.rateLimit.perClient.interval: must be at least 1ms",
                "spec.requirements.maxRootDistance: must be at least 1ms",
            ]
        );
        let paths: Vec<String> = problems.iter().map(|p| p.field.config_path()).collect();
        assert_eq!(
            paths,
            ["rateLimit.clientIntervalSeconds", "maxRootDistanceSeconds"]
        );
        // Just below and at the bound.
        let tiny =
            policy(serde_json::json!({ "rateLimit": { "perClient": { "interval": "999us" } } }));
        assert_eq!(policy_problems(&tiny).len(), 1);
        let least = policy(serde_json::json!({
            "rateLimit": { "perClient": { "interval": "1ms" } },
            "requirements": { "maxRootDistance": "1ms" }
        }));
        assert!(policy_problems(&least).is_empty());
        assert!(policy_problems(&TenantTimePolicySpec::default()).is_empty());
    }

    #[test]
    fn out_of_range_integers_from_a_bypassed_admission_are_refused_not_repaired() {
        let negative = policy(serde_json::json!({
            "rateLimit": { "perClient": { "burst": -5 },
                           "perTenant": { "requestsPerSecond": -1, "burst": 10 } }
        }));
        let shown: Vec<String> = policy_problems(&negative)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "spec.rateLimit.perClient.burst: must be at least 1",
                "spec.rateLimit.perTenant.requestsPerSecond: must be at least 1",
            ]
        );
    }

    #[test]
    fn the_whole_config_check_runs_the_same_tenant_check() {
        let mut config = sample();
        let entry = TenantConfig::from_policy(
            "b/bad".into(),
            12301,
            &policy(serde_json::json!({ "requirements": { "maxRootDistance": "0s" } })),
        );
        assert_eq!(
            entry.problems(1).len(),
            policy_problems(&policy(
                serde_json::json!({ "requirements": { "maxRootDistance": "0s" } })
            ))
            .len()
        );
        config.serving.tenants.push(entry);
        assert_eq!(
            problem_paths(&config),
            ["serving.tenants[1].maxRootDistanceSeconds"]
        );
    }

    #[test]
    fn non_finite_and_negative_durations_are_rejected() {
        let mut config = sample();
        config.selection.max_distance_seconds = f64::NAN;
        config.serving.holdover_seconds = -1.0;
        let paths = problem_paths(&config);
        assert_eq!(
            paths,
            ["selection.maxDistanceSeconds", "serving.holdoverSeconds"]
        );
    }

    #[test]
    fn agents_outside_the_egress_tier_poll_the_tier_and_fall_back_only_when_allowed() {
        let mut config = sample();
        let tier = UpstreamConfig {
            host: "10.77.0.10".into(),
            kind: UpstreamKind::Server,
            ..config.upstreams[0].clone()
        };
        config.egress = Some(EgressConfig {
            nodes: vec!["edge-0".into()],
            tier_upstreams: vec![tier.clone()],
            fallback_to_upstreams: false,
        });
        for falling_back in [false, true] {
            assert_eq!(
                config.upstreams_for_node("edge-0", falling_back),
                config.upstreams
            );
            assert_eq!(
                config.upstreams_for_node("worker-1", falling_back),
                vec![tier.clone()],
                "no fallback unless the tier allows it"
            );
        }
        assert!(!config.may_fall_back("worker-1"));
        config.egress.as_mut().unwrap().fallback_to_upstreams = true;
        assert!(config.may_fall_back("worker-1") && !config.may_fall_back("edge-0"));
        assert_eq!(
            config.upstreams_for_node("worker-1", false),
            vec![tier.clone()],
            "the pools only while no egress agent is usable"
        );
        assert_eq!(
            config.upstreams_for_node("worker-1", true),
            vec![tier.clone(), config.upstreams[0].clone()]
        );
        assert_eq!(config.tier_for_node("worker-1"), [tier]);
        assert!(config.tier_for_node("edge-0").is_empty());
        assert!(config.validate().is_ok());
    }
}
