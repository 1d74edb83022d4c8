//! `TenantTimePolicy`: how one tenant is served — its Service, who may ask, how often, and
//! what accuracy it requires. Lives in the tenant's namespace.

// Several `printcolumn(...)` entries repeat `type_ = "..."`, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent_config::Unauthenticated;
use crate::common::{Condition, Duration, IpBlock, PolicyPeer};
use crate::duration_rule;

/// Specification of a TenantTimePolicy.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "stratum.io",
    version = "v1alpha1",
    kind = "TenantTimePolicy",
    plural = "tenanttimepolicies",
    shortname = "ttp",
    category = "stratum",
    namespaced,
    status = "TenantTimePolicyStatus",
    cel,
    doc = "How one tenant namespace is served NTP by a TimeService: its Service, allowed clients, rate limits and accuracy requirements.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.port"),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.readyEndpoints"
    ),
    printcolumn(
        name = "Allowed-CIDRs",
        type_ = "integer",
        json_path = ".status.allowListSize"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantTimePolicySpec {
    /// The TimeService serving this tenant; may be omitted when exactly one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub time_service_ref: Option<String>,
    /// The tenant's NTP Service.
    #[serde(default)]
    pub service: ServiceSettings,
    /// Clients that may query, as NetworkPolicy peers. Empty allows the pods of this namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_clients: Vec<PolicyPeer>,
    /// Addresses never answered, even when allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub denied_clients: Vec<IpBlock>,
    /// Request rate limits.
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// Accuracy this tenant requires.
    #[serde(default)]
    pub requirements: Requirements,
    /// Authentication of clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// IANA time zone published to workloads in the `time-config` ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.size() > 0").message("timezone must not be empty when set; use an IANA name such as Europe/Berlin"))]
    #[schemars(length(max = 64))]
    pub timezone: Option<String>,
}

/// The tenant's Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSettings {
    /// Service name in the tenant's namespace.
    #[serde(default = "default_service_name")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')").message("service.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter, at most 63 characters"))]
    #[schemars(length(max = 63))]
    pub name: String,
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// `NodeLocal` answers from the agent on the client's node; `Closest` prefers it but may
    /// use another node's agent, and needs Kubernetes 1.34 or newer (older API servers get the
    /// tenant refused with reason `UnsupportedByCluster`).
    #[serde(default)]
    pub routing: Routing,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            name: default_service_name(),
            type_: ServiceType::default(),
            routing: Routing::default(),
        }
    }
}

fn default_service_name() -> String {
    "ntp".into()
}

/// Kubernetes Service type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// A cluster-internal virtual IP.
    #[default]
    ClusterIP,
    /// Also reachable on every node's port.
    NodePort,
    /// Also reachable through a load balancer.
    LoadBalancer,
}

/// Traffic routing preference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Routing {
    /// Only the agent on the client's own node answers (internalTrafficPolicy: Local).
    #[default]
    NodeLocal,
    /// The agent on the client's node when it is ready, else another one
    /// (trafficDistribution: PreferSameNode, Kubernetes 1.34 or newer).
    Closest,
}

/// Rate limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Limit for each client address.
    #[serde(default)]
    pub per_client: ClientRate,
    /// Limit for the whole tenant on each agent; unset is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_tenant: Option<TenantRate>,
    /// Answer limited or denied clients with a Kiss-o'-Death packet instead of silence.
    #[serde(default)]
    pub kiss_of_death: bool,
}

/// Per-client rate: on average one request per `interval`, with bursts up to `burst`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientRate {
    /// Minimum average interval between requests of one client.
    /// At least 1ms: the agents' rate table refills at most once a millisecond, and zero would
    /// mean no limit at all.
    #[serde(default = "default_client_interval")]
    #[x_kube(validation = duration_rule!("rateLimit.perClient.interval", " && duration(self) >= duration('1ms')", " must be a duration of at least 1ms, such as \"500ms\" or \"8s\""))]
    pub interval: Duration,
    /// Requests a client may send back to back.
    #[serde(default = "default_client_burst")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 1024").message("rateLimit.perClient.burst must be between 1 and 1024"))]
    pub burst: i32,
}

impl Default for ClientRate {
    fn default() -> Self {
        Self {
            interval: default_client_interval(),
            burst: default_client_burst(),
        }
    }
}

fn default_client_interval() -> Duration {
    std::time::Duration::from_secs(1).into()
}
fn default_client_burst() -> i32 {
    16
}

/// Per-tenant rate on each agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = kube::core::Rule::new("self.burst >= self.requestsPerSecond").message("rateLimit.perTenant.burst must be at least requestsPerSecond")
)]
pub struct TenantRate {
    /// Sustained requests per second.
    #[x_kube(validation = kube::core::Rule::new("self >= 1").message("rateLimit.perTenant.requestsPerSecond must be at least 1"))]
    pub requests_per_second: i32,
    /// Requests accepted back to back.
    pub burst: i32,
}

/// Accuracy requirements.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requirements {
    /// Above this root distance the tenant is answered "unsynchronized" and the agent's
    /// endpoint for this tenant is not ready.
    /// At least 1ms: an agent's root distance grows by 15 µs every second between clock updates
    /// (RFC 5905's PHI), so a tighter bound makes every endpoint flap, and zero is never met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_rule!("requirements.maxRootDistance", " && duration(self) >= duration('1ms')", " must be a duration of at least 1ms, such as \"50ms\""))]
    pub max_root_distance: Option<Duration>,
}

/// Client authentication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = kube::core::Rule::new("!self.nts || has(self.ntsCertificateSecret)").message("authentication.ntsCertificateSecret must name the kubernetes.io/tls Secret of the NTS-KE endpoint when nts is true"),
    validation = kube::core::Rule::new("!has(self.unauthenticated) || self.unauthenticated == 'Serve' || self.nts || has(self.symmetricKeysSecret)").message("authentication.unauthenticated: Deny and Ignore need an authentication method (nts or symmetricKeysSecret)")
)]
pub struct Authentication {
    /// Offer Network Time Security (RFC 8915): an NTS-KE endpoint on the tenant's Service
    /// (TCP 4460) and authenticated NTP on its UDP port.
    #[serde(default)]
    pub nts: bool,
    /// Name of a `kubernetes.io/tls` Secret in this namespace with the NTS-KE endpoint's
    /// certificate chain (`tls.crt`) and key (`tls.key`), usually written by a cert-manager
    /// Certificate for the Service's DNS name. The operator copies it into its own namespace
    /// for the agents, which never read tenant namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$')").message("authentication.ntsCertificateSecret must be a Secret name: lowercase letters, digits, '-' and '.', at most 253 characters"))]
    #[schemars(length(max = 253))]
    pub nts_certificate_secret: Option<String>,
    /// What a request without authentication gets on the tenant's UDP port: `Serve` (the
    /// default: authentication is offered, not required), `Deny` (a Kiss-o'-Death DENY) or
    /// `Ignore` (no answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<Unauthenticated>,
    /// Name of a Secret in this namespace whose `keys` member is a key file, one key per line
    /// `ID TYPE KEY`: `TYPE` is `AES128` (AES-CMAC, RFC 8573; the one to use) or, for devices
    /// that know nothing newer, `SHA1` or `MD5`; `KEY` is `HEX:<hex>`, `ASCII:<text>` or bare
    /// as ntpd reads it. Requests signed with one of these keys are answered signed with it;
    /// a MAC with an unknown key id or that does not verify gets a crypto-NAK when
    /// `rateLimit.kissOfDeath` is set, else no answer. The operator copies the keys into its own
    /// namespace for the agents, which never read tenant namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$')").message("authentication.symmetricKeysSecret must be a Secret name: lowercase letters, digits, '-' and '.', at most 253 characters"))]
    #[schemars(length(max = 253))]
    pub symmetric_keys_secret: Option<String>,
}

impl TenantTimePolicySpec {
    /// The NTS settings when the tenant asks for NTS.
    pub fn nts(&self) -> Option<&Authentication> {
        self.authentication.as_ref().filter(|a| a.nts)
    }

    /// The authentication settings when the tenant names a symmetric key Secret.
    pub fn symmetric_keys(&self) -> Option<&Authentication> {
        self.authentication
            .as_ref()
            .filter(|a| a.symmetric_keys_secret.is_some())
    }
}

/// Observed state of a TenantTimePolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantTimePolicyStatus {
    /// Accepted and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The TimeService serving this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_service: Option<String>,
    /// UDP port the agents serve this tenant on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Cluster IPs of the tenant's Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_ips: Vec<String>,
    /// Agents ready to serve this tenant.
    #[serde(default)]
    pub ready_endpoints: i32,
    /// Number of CIDRs in the resolved allow list.
    #[serde(default)]
    pub allow_list_size: i32,
}
