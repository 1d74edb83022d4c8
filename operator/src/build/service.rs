//! The tenant's selector-less NTP Service; its endpoints come from our EndpointSlices.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use stratum_api::TenantTimePolicy;
use stratum_api::tenant_time_policy::{Routing, ServiceType};

use super::tenant_meta;
use crate::error::Result;
use crate::names;

/// The tenant's Service: port 123/UDP named `ntp` (and 4460/TCP `nts-ke` with NTS). Routing `NodeLocal` uses
/// `internalTrafficPolicy: Local`; `Closest` uses `trafficDistribution: PreferSameNode` (the
/// agent on the client's node, else another), with node and zone hints on our EndpointSlices
/// since no EndpointSlice controller writes them for a selector-less Service. NodePort and
/// LoadBalancer Services use `externalTrafficPolicy: Local` so the agent sees the client's real
/// address, which its allow list needs.
pub fn build_service(tenant: &TenantTimePolicy, time_service: &str, port: u16) -> Result<Service> {
    let settings = &tenant.spec.service;
    let external = settings.type_ != ServiceType::ClusterIP;
    Ok(Service {
        metadata: tenant_meta(tenant, time_service, settings.name.clone())?,
        spec: Some(ServiceSpec {
            type_: Some(
                match settings.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            ports: Some(service_ports(tenant, port)),
            ip_family_policy: Some("PreferDualStack".into()),
            internal_traffic_policy: (settings.routing == Routing::NodeLocal)
                .then(|| "Local".into()),
            traffic_distribution: (settings.routing == Routing::Closest)
                .then(|| "PreferSameNode".into()),
            external_traffic_policy: external.then(|| "Local".into()),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// `ntp` 123/UDP, and for an NTS tenant `nts-ke` 4460/TCP, both to the agents' `port`. Target
/// ports are unused for a selector-less Service (the EndpointSlice ports are what proxies
/// use); they are the agent port so `kubectl describe` tells the truth.
fn service_ports(tenant: &TenantTimePolicy, port: u16) -> Vec<ServicePort> {
    let mut ports = vec![ServicePort {
        name: Some(names::NTP_PORT_NAME.into()),
        protocol: Some("UDP".into()),
        port: names::NTP_SERVICE_PORT,
        target_port: Some(IntOrString::Int(i32::from(port))),
        ..ServicePort::default()
    }];
    if tenant.spec.nts().is_some() {
        ports.push(ServicePort {
            name: Some(names::NTS_KE_PORT_NAME.into()),
            protocol: Some("TCP".into()),
            port: names::NTS_KE_SERVICE_PORT,
            target_port: Some(IntOrString::Int(i32::from(port))),
            ..ServicePort::default()
        });
    }
    ports
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn node_local_routing_uses_internal_traffic_policy_local_and_no_selector() {
        let tenant = fixtures::tenant("team-a", "policy", serde_json::json!({}));
        let svc = build_service(&tenant, "cluster", 12300).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("ntp"));
        assert_eq!(svc.metadata.namespace.as_deref(), Some("team-a"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector, None);
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.traffic_distribution, None);
        assert_eq!(spec.external_traffic_policy, None);
        let p = &spec.ports.unwrap()[0];
        assert_eq!(
            (p.port, p.protocol.as_deref(), p.name.as_deref()),
            (123, Some("UDP"), Some("ntp"))
        );
    }

    #[test]
    fn closest_routing_prefers_the_same_node_and_external_types_keep_client_addresses() {
        let tenant = fixtures::tenant(
            "team-a",
            "policy",
            serde_json::json!({ "service": { "name": "time", "type": "LoadBalancer", "routing": "Closest" } }),
        );
        let spec = build_service(&tenant, "cluster", 12300)
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.traffic_distribution.as_deref(), Some("PreferSameNode"));
        assert_eq!(spec.internal_traffic_policy, None);
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    }

    #[test]
    fn an_nts_tenant_gets_its_key_exchange_on_4460_tcp_to_the_same_agent_port() {
        let tenant = fixtures::tenant(
            "team-a",
            "policy",
            serde_json::json!({ "authentication": { "nts": true, "ntsCertificateSecret": "ntp-tls" } }),
        );
        let ports = build_service(&tenant, "cluster", 12300)
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap();
        let seen: Vec<_> = ports
            .iter()
            .map(|p| {
                (
                    p.name.as_deref(),
                    p.protocol.as_deref(),
                    p.port,
                    p.target_port.clone(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (Some("ntp"), Some("UDP"), 123, Some(IntOrString::Int(12300))),
                (
                    Some("nts-ke"),
                    Some("TCP"),
                    4460,
                    Some(IntOrString::Int(12300))
                ),
            ]
        );
    }
}
