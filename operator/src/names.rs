//! The fixed names, labels and field manager of docs/contracts.md: every child the operator
//! creates is named and labelled here, so the agent, the chart and the e2e harness can rely on
//! them.

use std::collections::BTreeMap;

/// Field manager of every server-side apply the operator issues (spec of children, status of
/// TimeService and TenantTimePolicy).
pub const FIELD_MANAGER: &str = "stratum-operator";
/// `app.kubernetes.io/name` of agent children.
pub const AGENT_APP_NAME: &str = "stratum-agent";
/// `app.kubernetes.io/managed-by` of every child.
pub const MANAGED_BY: &str = "stratum-operator";
/// Label naming the TimeService a child belongs to.
pub const TIME_SERVICE_LABEL: &str = "stratum.io/time-service";
/// Label naming the TenantTimePolicy a tenant child belongs to.
pub const TENANT_LABEL: &str = "stratum.io/tenant";
/// `endpointslice.kubernetes.io/managed-by` of our EndpointSlices, so the EndpointSlice
/// controller leaves them alone. A label value: no '/' (the API server refuses it).
pub const ENDPOINT_SLICE_MANAGER: &str = "stratum-operator.stratum.io";
/// ConfigMap in the tenant's namespace telling workloads where NTP is and which TZ to use.
pub const TIME_CONFIG_NAME: &str = "time-config";
/// Port name of the NTP Service and EndpointSlices.
pub const NTP_PORT_NAME: &str = "ntp";
/// Port the tenant Service exposes.
pub const NTP_SERVICE_PORT: i32 = 123;
/// Port name of an NTS tenant's key exchange on its Service and EndpointSlices.
pub const NTS_KE_PORT_NAME: &str = "nts-ke";
/// TCP port an NTS tenant's Service exposes its key exchange on (RFC 8915's default).
pub const NTS_KE_SERVICE_PORT: i32 = 4460;

/// The Secret in the operator's namespace holding a TimeService's NTS key material (cookie
/// master keys, tenants' certificates), which its agents mount.
pub fn nts_secret_name(time_service: &str) -> String {
    format!("{}-nts", agent_name(time_service))
}
/// Agent metrics/health port (contract: `--metrics-addr 0.0.0.0:9123`).
pub const AGENT_METRICS_PORT: i32 = 9123;
/// Agent local status port (contract: `--status-addr 127.0.0.1:9124`).
pub const AGENT_STATUS_PORT: i32 = 9124;
/// Where the agent keeps its drift file (hostPath).
pub const AGENT_STATE_DIR: &str = "/var/lib/stratum";
/// Name of the operator's leader-election Lease.
pub const LEADER_LEASE_NAME: &str = "stratum-operator-leader";

/// DaemonSet, ServiceAccount, Role, RoleBinding and NetworkPolicy of a TimeService.
pub fn agent_name(time_service: &str) -> String {
    format!("{time_service}-agent")
}

/// The ConfigMap holding a TimeService's agent config.
pub fn agent_config_map_name(time_service: &str) -> String {
    format!("{time_service}-agent-config")
}

/// Labels every agent child carries; also the DaemonSet's pod selector.
pub fn agent_labels(time_service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            AGENT_APP_NAME.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (TIME_SERVICE_LABEL.to_owned(), time_service.to_owned()),
    ])
}

/// Labels every child of a tenant carries.
pub fn tenant_labels(time_service: &str, tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (TIME_SERVICE_LABEL.to_owned(), time_service.to_owned()),
        (TENANT_LABEL.to_owned(), tenant.to_owned()),
    ])
}

/// Stable tenant identity used in the agent config and in events: `namespace/name`.
pub fn tenant_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}
