//! `TimeService`: one agent fleet — where its time comes from, how it disciplines node
//! clocks, where its agents run and how they serve tenants.

// Several `printcolumn(...)` entries repeat `type_ = "..."`, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Duration};
use crate::duration_rule;

/// Specification of a TimeService. Cluster-scoped: a TimeService owns the clocks of the nodes
/// it selects, and two TimeServices must never select the same node.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "stratum.io",
    version = "v1alpha1",
    kind = "TimeService",
    plural = "timeservices",
    shortname = "tsvc",
    category = "stratum",
    status = "TimeServiceStatus",
    cel,
    doc = "A fleet of Stratum agents that discipline node clocks from upstream NTP servers and serve tenants.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.nodes.desired"
    ),
    printcolumn(
        name = "Synced",
        type_ = "integer",
        json_path = ".status.nodes.synchronized"
    ),
    printcolumn(
        name = "Worst-Offset",
        type_ = "string",
        json_path = ".status.worstOffset"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TimeServiceSpec {
    /// NTP servers and pools the agents synchronize from (the egress tier's agents only, when
    /// one is configured).
    #[x_kube(validation = kube::core::Rule::new("self.size() >= 1").message("at least one upstream server or pool is required"))]
    #[schemars(length(max = 32))]
    pub upstreams: Vec<Upstream>,
    /// How sources are combined into one time.
    #[serde(default)]
    pub selection: Selection,
    /// How the node clock is steered.
    #[serde(default)]
    pub discipline: Discipline,
    /// How leap seconds are applied.
    #[serde(default)]
    pub leap: Leap,
    /// Which nodes run an agent.
    #[serde(default)]
    pub placement: Placement,
    /// The agent container.
    #[serde(default)]
    pub agent: AgentSettings,
    /// How agents serve tenants.
    #[serde(default)]
    pub serving: Serving,
    /// How often agents report their NodeClock when nothing changed.
    #[serde(default)]
    pub reporting: Reporting,
    /// Optional controlled exit point: only the agents on these nodes reach the upstreams; every
    /// other agent synchronizes from them, one stratum lower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_tier: Option<EgressTier>,
    /// Network Time Security for the upstreams marked `nts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nts: Option<NtsSettings>,
}

/// One upstream: a single server, or a pool name that resolves to several servers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = kube::core::Rule::new("self.minPoll <= self.maxPoll").message("minPoll must be less than or equal to maxPoll"),
    validation = kube::core::Rule::new("!self.nts || !has(self.key)").message("an upstream authenticates with nts or with a key, not both")
)]
pub struct Upstream {
    /// Host name or IP address of the server or pool.
    #[x_kube(validation = kube::core::Rule::new("self.size() > 0 && self.size() <= 253 && (isIP(self) || self.matches('^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\\\\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*\\\\.?$'))").message("host must be an IP address or a DNS name"))]
    #[schemars(length(max = 253))]
    pub host: String,
    /// `Server` is one source; `Pool` resolves the name into up to `maxSources` sources and
    /// replaces members that become unreachable or falsetickers.
    #[serde(default)]
    pub kind: UpstreamKind,
    /// UDP port of the server.
    #[serde(default = "default_ntp_port")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: i32,
    /// Send a burst of requests at start and after unreachability, for a fast first sync.
    #[serde(default = "default_true")]
    pub iburst: bool,
    /// Minimum poll interval as a power of two in seconds (4 = 16 s).
    #[serde(default = "default_min_poll")]
    #[x_kube(validation = kube::core::Rule::new("self >= 0 && self <= 17").message("minPoll must be between 0 (1 s) and 17 (36 h)"))]
    pub min_poll: i32,
    /// Maximum poll interval as a power of two in seconds (10 = 1024 s).
    #[serde(default = "default_max_poll")]
    #[x_kube(validation = kube::core::Rule::new("self >= 0 && self <= 17").message("maxPoll must be between 0 (1 s) and 17 (36 h)"))]
    pub max_poll: i32,
    /// Largest number of servers taken from a pool.
    #[serde(default = "default_pool_sources")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 16").message("maxSources must be between 1 and 16"))]
    pub max_sources: i32,
    /// Authenticate this upstream with Network Time Security (RFC 8915). `host` is then the
    /// NTS-KE server (TCP `ntsPort`), whose key exchange names the NTP server and port; `port`
    /// is not used. Agents never poll it unauthenticated: until a key exchange succeeds (its
    /// certificate chaining to `spec.nts.caBundle`, or to the public web PKI), it is not polled.
    #[serde(default)]
    pub nts: bool,
    /// NTS-KE TCP port of an `nts` upstream (4460 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 65535").message("ntsPort must be between 1 and 65535"))]
    pub nts_port: Option<i32>,
    /// Authenticate this upstream with a symmetric key (RFC 8573 AES-CMAC, or SHA1/MD5 for a
    /// server that knows nothing newer): every request is signed with it and a reply counts
    /// only if signed with it too. Agents never poll it unauthenticated: while the key is not
    /// with them, it is not polled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<UpstreamKey>,
}

/// A symmetric key of an upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamKey {
    /// Secret in the operator's namespace whose `keys` member is a key file (one key per
    /// line, `ID TYPE KEY`, as chrony's keyfile and ntpd's `ntp.keys`). The operator copies it
    /// to the agents with the rest of their key material.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$')").message("upstreams[].key.secretName must be a Secret name: lowercase letters, digits, '-' and '.', at most 253 characters"))]
    #[schemars(length(max = 253))]
    pub secret_name: String,
    /// The key's id in that file (and on the server).
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 4294967295").message("upstreams[].key.id must be between 1 and 4294967295"))]
    pub id: i64,
}

/// Network Time Security settings shared by a TimeService's `nts` upstreams.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NtsSettings {
    /// PEM certificates of the CAs that the NTS-KE servers' certificates must chain to, inline
    /// as in Kubernetes' own `caBundle` fields (cert-manager's CA injector can fill it). CA
    /// certificates are public: the operator copies them into the agents' config. Without it,
    /// agents trust the public web PKI (Mozilla's root program, built into the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub ca_bundle: Option<String>,
}

/// Whether an upstream names one server or a pool of servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpstreamKind {
    /// A single server.
    #[default]
    Server,
    /// A DNS name resolving to several servers.
    Pool,
}

/// Source selection settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    /// Sources that must agree before the clock is steered.
    #[serde(default = "default_min_sources")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 16").message("minSources must be between 1 and 16"))]
    pub min_sources: i32,
    /// Sources whose root distance exceeds this are not selectable.
    /// At least 1ms: below that hardly any real source is ever selectable, and at zero none is.
    #[serde(default = "default_max_distance")]
    #[x_kube(validation = duration_rule!("maxDistance", " && duration(self) >= duration('1ms')", " must be a duration of at least 1ms, such as \"1.5s\""))]
    pub max_distance: Duration,
}

impl Default for Selection {
    fn default() -> Self {
        Self {
            min_sources: default_min_sources(),
            max_distance: default_max_distance(),
        }
    }
}

/// Clock discipline settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.clock) || self.clock != 'System' || !has(self.mode) || self.mode != 'Monitor'").message("clock System steers the node clock, which mode Monitor never does: use mode Discipline, or clock Readonly"))]
pub struct Discipline {
    /// `Discipline` steers node clocks; `Monitor` only measures and reports.
    #[serde(default)]
    pub mode: DisciplineMode,
    /// The clock the agents work on (see [`ClockSource`]); the pods stay the same whichever
    /// it is, so a trial on a simulated clock runs the pods production will.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockSource>,
    /// When the clock may be stepped instead of slewed.
    #[serde(default)]
    pub make_step: MakeStep,
    /// Largest frequency correction applied while slewing, in parts per million.
    #[serde(default = "default_max_slew_ppm")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 100000").message("maxSlewPpm must be between 1 and 100000"))]
    pub max_slew_ppm: i32,
    /// Offsets beyond which the agent refuses to correct and raises an alarm.
    #[serde(default)]
    pub panic_threshold: PanicThreshold,
    /// Let the kernel copy system time to the RTC every 11 minutes while synchronized.
    #[serde(default = "default_true")]
    pub rtc_sync: bool,
    /// Host directory where each agent keeps its drift file.
    #[serde(default = "default_drift_dir")]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/')").message("driftDirectory must be an absolute path"))]
    #[schemars(length(max = 4096))]
    pub drift_directory: String,
    /// Steer the clock even where another time daemon (chronyd, ntpd, ntpd-rs,
    /// systemd-timesyncd) seems to run. Without it an agent that finds one only observes the
    /// clock (condition `OtherTimeDaemon` on its NodeClock) until the daemon is stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub take_over: bool,
}

impl Default for Discipline {
    fn default() -> Self {
        Self {
            mode: DisciplineMode::default(),
            clock: None,
            make_step: MakeStep::default(),
            max_slew_ppm: default_max_slew_ppm(),
            panic_threshold: PanicThreshold::default(),
            rtc_sync: true,
            drift_directory: default_drift_dir(),
            take_over: false,
        }
    }
}

/// Whether agents adjust the clock or only observe it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DisciplineMode {
    /// Steer the node clock.
    #[default]
    Discipline,
    /// Measure and report only; never adjust the clock.
    Monitor,
}

/// The clock the agents work on. Omitted: the node's clock, steered (`System`) under
/// `Discipline`, only read (`Readonly`) under `Monitor`. `Simulated` gives each agent a software
/// clock and never touches the node's: for trials, demos and CI on machines whose clock must not
/// move. The agent pods keep the mode's spec (SYS_TIME under `Discipline`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ClockSource {
    /// The node's clock, steered with `clock_adjtime` (needs mode `Discipline`).
    System,
    /// The node's clock, measured and never adjusted.
    Readonly,
    /// A software clock per agent; the node's clock is never adjusted.
    Simulated,
}

/// Step instead of slewing only during the first `limit` clock updates, and only when the
/// offset exceeds `threshold` (chrony's `makestep`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MakeStep {
    /// Offset above which the clock is stepped during the first updates.
    #[serde(default = "default_make_step_threshold")]
    #[x_kube(validation = duration_rule!("makeStep.threshold"))]
    pub threshold: Duration,
    /// Number of initial clock updates during which a step is allowed.
    #[serde(default = "default_make_step_limit")]
    #[x_kube(validation = kube::core::Rule::new("self >= 0 && self <= 100").message("makeStep.limit must be between 0 and 100"))]
    pub limit: i32,
}

impl Default for MakeStep {
    fn default() -> Self {
        Self {
            threshold: default_make_step_threshold(),
            limit: default_make_step_limit(),
        }
    }
}

/// Offsets beyond which a correction is refused (reported, never applied).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PanicThreshold {
    /// Largest correction accepted during the first updates after start.
    /// At least 1ms: zero would refuse every correction.
    #[serde(default = "default_panic_startup")]
    #[x_kube(validation = duration_rule!("panicThreshold.startup", " && duration(self) >= duration('1ms')", " must be a duration of at least 1ms, such as \"1000s\""))]
    pub startup: Duration,
    /// Largest correction accepted afterwards.
    /// At least 1ms: zero would refuse every correction.
    #[serde(default = "default_panic_runtime")]
    #[x_kube(validation = duration_rule!("panicThreshold.runtime", " && duration(self) >= duration('1ms')", " must be a duration of at least 1ms, such as \"1000s\""))]
    pub runtime: Duration,
}

impl Default for PanicThreshold {
    fn default() -> Self {
        Self {
            startup: default_panic_startup(),
            runtime: default_panic_runtime(),
        }
    }
}

/// Leap second handling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Leap {
    /// `Kernel` inserts or deletes the second at midnight UTC; `Smear` spreads it linearly over
    /// `smearWindow` (never mix smearing and non-smearing servers); `Ignore` does nothing.
    #[serde(default)]
    pub mode: LeapMode,
    /// Length of the linear smear, centred on the leap second.
    #[serde(default = "default_smear_window")]
    #[x_kube(validation = duration_rule!("smearWindow", " && duration(self) >= duration('1h') && duration(self) <= duration('48h')", " must be a duration between 1h and 48h"))]
    pub smear_window: Duration,
}

impl Default for Leap {
    fn default() -> Self {
        Self {
            mode: LeapMode::default(),
            smear_window: default_smear_window(),
        }
    }
}

/// How a leap second reaches the node clock and tenants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LeapMode {
    /// The kernel inserts or deletes the second at the end of the UTC day.
    #[default]
    Kernel,
    /// The clock is slewed linearly over the smear window; replies carry no leap indicator.
    Smear,
    /// Leap announcements are ignored.
    Ignore,
}

/// The node label naming a node's operating system. Agents are Linux binaries: their pods always
/// select `kubernetes.io/os: linux`.
pub const OS_LABEL: &str = "kubernetes.io/os";
/// The only value of [`OS_LABEL`] agents run on.
pub const LINUX: &str = "linux";

/// Where agents run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Linux nodes must also carry these labels to run an agent; empty selects every Linux
    /// node. `kubernetes.io/os: linux` is always added (agents are Linux binaries), so that
    /// label may be left out, and any other value of it is refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("!('kubernetes.io/os' in self) || self['kubernetes.io/os'] == 'linux'").message("placement.nodeSelector: agents run only on Linux nodes; kubernetes.io/os must be linux or left out"))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the agent pods. Empty (the default) tolerates every taint, as
    /// node-exporter does: every node's clock needs its agent, control-plane and tainted
    /// nodes too. When set, the agent pods get exactly these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Priority class of the agent pods. Omitted: the operator's default (`--agent-priority-class`,
    /// the chart's `agent.priorityClassName`), `system-node-critical` unless changed there;
    /// `""` for none. Some providers admit `system-node-critical` outside `kube-system` only
    /// with a ResourceQuota for it in the agents' namespace (docs/placement.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
}

impl Placement {
    /// The agent pods' node selector: the user's labels plus `kubernetes.io/os: linux`, which
    /// wins over any other value of that label (the CEL rule refuses one at admission).
    pub fn agent_node_selector(&self) -> BTreeMap<String, String> {
        let mut selector = self.node_selector.clone();
        selector.insert(OS_LABEL.to_owned(), LINUX.to_owned());
        selector
    }

    /// The agent pods' tolerations: the user's when set, otherwise one that tolerates every
    /// taint (`operator: Exists` without key or effect).
    pub fn agent_tolerations(&self) -> Vec<Toleration> {
        if self.tolerations.is_empty() {
            vec![Toleration {
                operator: Some("Exists".to_owned()),
                ..Toleration::default()
            }]
        } else {
            self.tolerations.clone()
        }
    }

    /// Why this placement cannot be served, if it cannot: a node selector asking for another
    /// operating system (an object stored before the CEL rule existed).
    pub fn problem(&self) -> Option<String> {
        self.node_selector
            .get(OS_LABEL)
            .filter(|os| os.as_str() != LINUX)
            .map(|os| {
                format!(
                    "spec.placement.nodeSelector: agents run only on Linux nodes, but \
                     {OS_LABEL} is {os:?}; set it to linux or leave it out"
                )
            })
    }
}

/// The agent container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// Run agents in the node's network namespace (the default): tenants' clients then reach
    /// the agent at the node's addresses, and the agent's own allow list is the enforcement
    /// (NetworkPolicy does not bind host-network pods). `false` runs agents on the pod network,
    /// where the operator's NetworkPolicy applies as well.
    #[serde(default = "default_true")]
    pub host_network: bool,
    /// Agent image; defaults to the operator's own version of the agent image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Names of Secrets (type `kubernetes.io/dockerconfigjson`) in the operator's namespace
    /// that the agent pods pull their image with. Omitted: the operator's defaults
    /// (`--agent-image-pull-secret`, the chart's `agent.imagePullSecrets`); `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(
            length(min = 1, max = 253),
            pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        )
    )]
    pub image_pull_secrets: Option<Vec<String>>,
    /// Resource requests and limits of the agent container, used exactly as given (`{}` for
    /// none). Omitted: requests of 10m CPU and 64Mi memory and a 384Mi memory limit, from the
    /// agent's measured use (docs/placement.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Log verbosity of the agents, applied through their config without a restart; `RUST_LOG`
    /// in the agent's environment overrides it.
    #[serde(default)]
    pub log_level: LogLevel,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            host_network: true,
            image: None,
            image_pull_policy: None,
            image_pull_secrets: None,
            resources: None,
            log_level: LogLevel::default(),
        }
    }
}

/// Container image pull policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when the image is not present.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// Log verbosity of agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    /// Everything, including per-packet detail.
    Trace,
}

/// How agents serve tenants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Serving {
    /// Ports assigned to tenants, one each.
    #[serde(default)]
    pub tenant_ports: PortRange,
    /// How long an agent that lost all sources (no clock update since) keeps answering as
    /// synchronized, while its root dispersion grows; never less than four of the slowest
    /// upstream's maxPoll intervals. After it the agent is unsynchronized: not ready in tenants'
    /// EndpointSlices, and answering LI=3 stratum 16, or localStratum when set.
    #[serde(default = "default_holdover")]
    #[x_kube(validation = duration_rule!("holdover"))]
    pub holdover: Duration,
    /// Stratum announced once holdover has expired (the free-running clock keeps being served,
    /// with reference LOCL); unset answers "unsynchronized" (LI=3, stratum 16). Either way
    /// the agent is not ready in EndpointSlices then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 15").message("localStratum must be between 1 and 15"))]
    pub local_stratum: Option<i32>,
    /// How the agents' request metrics break down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ServingMetrics>,
    /// How often the NTS cookie master keys shared by the agents are rotated (24h when
    /// unset). A cookie opens while its key is current or previous, so for one to two periods.
    /// At least 5m: each new key is published one period before it seals, which covers a
    /// Secret volume reaching the agents at different times. To rotate now, annotate the
    /// TimeService `stratum.io/rotate-cookie-keys` with a new value (the time, say): it rotates
    /// at once, or 2m after the last rotation if that is sooner, and the period starts over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_rule!("serving.ntsCookieKeyRotation", " && duration(self) >= duration('5m')", " must be a duration of at least 5m, such as \"24h\""))]
    pub nts_cookie_key_rotation: Option<Duration>,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            tenant_ports: PortRange::default(),
            holdover: default_holdover(),
            local_stratum: None,
            metrics: None,
            nts_cookie_key_rotation: None,
        }
    }
}

/// The agents' request metrics (`stratum_agent_tenant_requests_total`,
/// `stratum_agent_tenant_kod_sent_total`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingMetrics {
    /// One series per tenant (the default), or, when false, totals over every tenant under
    /// `tenant="_all"`: 8 series per node instead of 8 per tenant and node, for clusters with
    /// many tenants. `stratumctl serverstats` keeps the per-tenant counts either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_tenant: Option<bool>,
}

/// Cookie master key rotation period when `serving.ntsCookieKeyRotation` is unset.
pub const DEFAULT_NTS_COOKIE_KEY_ROTATION: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

/// Shortest cookie master key rotation period (see `serving.ntsCookieKeyRotation`).
pub const MIN_NTS_COOKIE_KEY_ROTATION: std::time::Duration = std::time::Duration::from_secs(300);

impl Serving {
    /// The cookie master key rotation period, never under [`MIN_NTS_COOKIE_KEY_ROTATION`]
    /// (the schema's bound, held here too for objects stored before it).
    pub fn nts_cookie_key_rotation(&self) -> std::time::Duration {
        self.nts_cookie_key_rotation
            .as_ref()
            .map_or(DEFAULT_NTS_COOKIE_KEY_ROTATION, |d| {
                std::time::Duration::from_secs_f64(d.as_secs_f64())
            })
            .max(MIN_NTS_COOKIE_KEY_ROTATION)
    }

    /// Whether request metrics carry one series per tenant.
    pub fn metrics_per_tenant(&self) -> bool {
        self.metrics
            .as_ref()
            .and_then(|m| m.per_tenant)
            .unwrap_or(true)
    }
}

/// An inclusive UDP port range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = kube::core::Rule::new("self.start <= self.end").message("tenantPorts.start must be less than or equal to tenantPorts.end")
)]
pub struct PortRange {
    /// First port.
    #[serde(default = "default_port_start")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub start: i32,
    /// Last port.
    #[serde(default = "default_port_end")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub end: i32,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            start: default_port_start(),
            end: default_port_end(),
        }
    }
}

/// Status reporting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reporting {
    /// Heartbeat interval of NodeClock updates when nothing changed.
    #[serde(default = "default_report_interval")]
    #[x_kube(validation = duration_rule!("reporting.interval", " && duration(self) >= duration('5s')", " must be a duration of at least 5s"))]
    pub interval: Duration,
}

impl Default for Reporting {
    fn default() -> Self {
        Self {
            interval: default_report_interval(),
        }
    }
}

/// The egress tier: the only nodes whose agents talk to the upstreams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressTier {
    /// Labels selecting the egress nodes.
    #[x_kube(validation = kube::core::Rule::new("self.size() >= 1").message("egressTier.nodeSelector needs at least one label"))]
    pub node_selector: BTreeMap<String, String>,
    /// Let other agents poll the upstreams too while no egress agent has been usable for 30 s
    /// (none answers, or only unsynchronized or falseticking ones); they go back to the tier
    /// alone as soon as one is.
    #[serde(default)]
    pub fallback_to_upstreams: bool,
}

/// Observed state of a TimeService.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeServiceStatus {
    /// Ready, Progressing, Degraded, Conflict and OtherTimeDaemon (agents that see another time
    /// daemon on their node, named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node counts.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Largest absolute offset among synchronized nodes, for display ("+1.2ms").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_offset: Option<String>,
    /// Largest absolute offset among synchronized nodes, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_offset_nanos: Option<i64>,
    /// Median offset among synchronized nodes, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median_offset_nanos: Option<i64>,
    /// Lowest and highest stratum among synchronized nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratum_range: Option<StratumRange>,
}

/// Agent node counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes that should run an agent.
    pub desired: i32,
    /// Agents whose pod is ready.
    pub ready: i32,
    /// Agents reporting a synchronized clock.
    pub synchronized: i32,
    /// Nodes the placement selects (node selector and tolerations) where no agent runs: no
    /// ready agent pod and no fresh NodeClock of this TimeService. The Ready condition names
    /// the first few.
    #[serde(default)]
    pub without_agent: i32,
}

/// A closed stratum interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StratumRange {
    /// Lowest stratum.
    pub min: i32,
    /// Highest stratum.
    pub max: i32,
}

fn default_true() -> bool {
    true
}
fn default_ntp_port() -> i32 {
    123
}
fn default_min_poll() -> i32 {
    6
}
fn default_max_poll() -> i32 {
    10
}
fn default_pool_sources() -> i32 {
    4
}
fn default_min_sources() -> i32 {
    3
}
fn default_max_slew_ppm() -> i32 {
    500
}
fn default_make_step_limit() -> i32 {
    3
}
fn default_port_start() -> i32 {
    12300
}
fn default_port_end() -> i32 {
    12799
}
fn default_drift_dir() -> String {
    "/var/lib/stratum".into()
}
fn secs(s: u64) -> Duration {
    std::time::Duration::from_secs(s).into()
}
fn default_max_distance() -> Duration {
    std::time::Duration::from_millis(1500).into()
}
fn default_make_step_threshold() -> Duration {
    secs(1)
}
fn default_panic_startup() -> Duration {
    secs(86_400)
}
fn default_panic_runtime() -> Duration {
    secs(1000)
}
fn default_smear_window() -> Duration {
    secs(86_400)
}
fn default_holdover() -> Duration {
    secs(3600)
}
fn default_report_interval() -> Duration {
    secs(60)
}
