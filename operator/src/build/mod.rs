//! Pure builders: typed input in, typed Kubernetes object out. They hold the operator's
//! knowledge of what every child looks like and most of its tests; nothing here does IO.

pub mod agent_config;
pub mod audit;
pub mod daemonset;
pub mod endpointslice;
pub mod gzip;
pub mod networkpolicy;
pub mod nts_material;
pub mod rbac;
pub mod service;
pub mod status;
pub mod time_config;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use stratum_api::{TenantTimePolicy, TimeService};

use crate::error::{Error, Result};
use crate::names;

/// Settings of this operator deployment that shape the children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSettings {
    /// Namespace of the agent children and of the operator.
    pub namespace: String,
    /// Agent image when the TimeService names none.
    pub agent_image: String,
    /// Pull secrets (names in `namespace`) of agent pods whose TimeService names none.
    pub agent_image_pull_secrets: Vec<String>,
    /// The static ClusterRole of every agent (shipped by the chart) that each TimeService's
    /// agents are bound to; the operator binds it, never creates or widens it.
    pub agent_cluster_role: String,
    /// Priority class of agent pods whose TimeService names none; empty for none.
    pub agent_priority_class: String,
}

/// Owner reference making `ts` the controller of a child, so deleting it deletes the child.
pub fn time_service_owner(ts: &TimeService) -> Result<OwnerReference> {
    ts.controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("TimeService name or uid"))
}

/// Owner reference making `tenant` the controller of a child in its namespace.
pub fn tenant_owner(tenant: &TenantTimePolicy) -> Result<OwnerReference> {
    tenant
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("TenantTimePolicy name or uid"))
}

/// Metadata of an agent child in the operator's namespace.
pub fn agent_meta(ts: &TimeService, name: String, namespace: Option<&str>) -> Result<ObjectMeta> {
    let ts_name = ts
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("TimeService name"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: namespace.map(str::to_owned),
        labels: Some(names::agent_labels(ts_name)),
        owner_references: Some(vec![time_service_owner(ts)?]),
        ..ObjectMeta::default()
    })
}

/// Metadata of a tenant child in the tenant's namespace.
pub fn tenant_meta(
    tenant: &TenantTimePolicy,
    time_service: &str,
    name: String,
) -> Result<ObjectMeta> {
    let tenant_name = tenant
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("TenantTimePolicy name"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: tenant.metadata.namespace.clone(),
        labels: Some(names::tenant_labels(time_service, tenant_name)),
        owner_references: Some(vec![tenant_owner(tenant)?]),
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Tiny builders shared by the builder tests.
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;
    use stratum_api::time_service::{Upstream, UpstreamKind};
    use stratum_api::{TenantTimePolicy, TenantTimePolicySpec, TimeService, TimeServiceSpec};

    use super::OperatorSettings;

    pub fn settings() -> OperatorSettings {
        OperatorSettings {
            namespace: "stratum-system".into(),
            agent_image: "stratum/agent:test".into(),
            agent_image_pull_secrets: Vec::new(),
            agent_cluster_role: "stratum-agent".into(),
            agent_priority_class: "system-node-critical".into(),
        }
    }

    pub fn upstream(host: &str) -> Upstream {
        serde_json::from_value(serde_json::json!({ "host": host, "kind": "Pool" })).unwrap()
    }

    pub fn time_service(name: &str) -> TimeService {
        let spec: TimeServiceSpec = serde_json::from_value(
            serde_json::json!({ "upstreams": [{ "host": "pool.ntp.org", "kind": "Pool" }] }),
        )
        .unwrap();
        let mut ts = TimeService::new(name, spec);
        ts.metadata.uid = Some(format!("uid-{name}"));
        ts.metadata.generation = Some(1);
        ts.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_700_000_000).unwrap()));
        assert_eq!(ts.spec.upstreams[0].kind, UpstreamKind::Pool);
        ts
    }

    pub fn tenant(ns: &str, name: &str, spec: serde_json::Value) -> TenantTimePolicy {
        let spec: TenantTimePolicySpec = serde_json::from_value(spec).unwrap();
        TenantTimePolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(format!("uid-{ns}-{name}")),
                generation: Some(1),
                creation_timestamp: Some(Time(Timestamp::from_second(1_700_000_100).unwrap())),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }
}
