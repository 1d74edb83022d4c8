//! EndpointSlices of a tenant's Service: the agents of its TimeService, one slice per address
//! family (an EndpointSlice holds one family), with honest conditions: an endpoint is ready
//! only where the agent pod is Ready and not terminating, its NodeClock is fresh (see
//! [`crate::freshness`]) and its clock is synchronized within the tenant's requirements.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use stratum_api::TenantTimePolicy;

use super::tenant_meta;
use crate::error::Result;
use crate::model::{ClockInfo, PodInfo};
use crate::names;

/// Zone label of nodes.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// One agent as an endpoint candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentEndpoint {
    /// The agent pod's addresses (with host networking, its node's).
    pub addresses: Vec<IpAddr>,
    /// The node it runs on.
    pub node: String,
    /// The node's zone, if labelled.
    pub zone: Option<String>,
    /// Whether the agent serves this tenant: its pod is Ready, its NodeClock fresh and
    /// synchronized within the tenant's maxRootDistance. Terminating or not, as the
    /// EndpointSlice `serving` condition means.
    pub serving: bool,
    /// The agent pod is being deleted.
    pub terminating: bool,
}

impl AgentEndpoint {
    /// Takes new clients: serving and not terminating (the EndpointSlice `ready` condition).
    pub fn ready(&self) -> bool {
        self.serving && !self.terminating
    }
}

/// The endpoints of one tenant: every agent pod with a node and an address; serving where the
/// pod is Ready and the node's NodeClock (of this TimeService) is in `fresh` and serves
/// `max_root_distance_nanos`.
pub fn agent_endpoints(
    agents: &[&PodInfo],
    clocks: &BTreeMap<String, ClockInfo>,
    fresh: &BTreeSet<String>,
    node_zones: &BTreeMap<String, Option<String>>,
    time_service: &str,
    max_root_distance_nanos: Option<i64>,
) -> Vec<AgentEndpoint> {
    let mut out: Vec<AgentEndpoint> = agents
        .iter()
        .filter(|p| !p.terminated && !p.ips.is_empty())
        .filter_map(|p| {
            let node = p.node_name.clone()?;
            let clock_serves = fresh.contains(&node)
                && clocks.get(&node).is_some_and(|c| {
                    c.time_service == time_service && c.serves(max_root_distance_nanos)
                });
            Some(AgentEndpoint {
                addresses: p.ips.clone(),
                zone: node_zones.get(&node).cloned().flatten(),
                node,
                serving: p.ready && clock_serves,
                terminating: p.terminating,
            })
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// Name of the slice of one family.
pub fn slice_name(service: &str, family: AddressFamily) -> String {
    format!("{service}-stratum-{}", family.suffix())
}

/// An EndpointSlice address type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl AddressFamily {
    fn suffix(self) -> &'static str {
        match self {
            AddressFamily::V4 => "ipv4",
            AddressFamily::V6 => "ipv6",
        }
    }
    fn address_type(self) -> &'static str {
        match self {
            AddressFamily::V4 => "IPv4",
            AddressFamily::V6 => "IPv6",
        }
    }
    fn holds(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (AddressFamily::V4, IpAddr::V4(_)) | (AddressFamily::V6, IpAddr::V6(_))
        )
    }
}

/// Both slices of a tenant's Service (IPv4 and IPv6, either possibly empty, so a family that
/// disappears is emptied rather than left stale). Endpoints carry node and zone hints for
/// `Closest` routing. One slice holds at most 1000 endpoints (the API limit): fleets beyond
/// 1000 nodes per family are truncated, in node-name order.
pub fn build_endpoint_slices(
    tenant: &TenantTimePolicy,
    time_service: &str,
    port: u16,
    endpoints: &[AgentEndpoint],
) -> Result<Vec<EndpointSlice>> {
    let service = &tenant.spec.service.name;
    let mut slices = Vec::new();
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let mut meta = tenant_meta(tenant, time_service, slice_name(service, family))?;
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.insert("kubernetes.io/service-name".into(), service.clone());
        labels.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            names::ENDPOINT_SLICE_MANAGER.into(),
        );
        let list: Vec<Endpoint> = endpoints
            .iter()
            .filter_map(|e| {
                let addr = e.addresses.iter().find(|ip| family.holds(ip))?;
                Some(Endpoint {
                    addresses: vec![addr.to_string()],
                    node_name: Some(e.node.clone()),
                    zone: e.zone.clone(),
                    conditions: Some(EndpointConditions {
                        ready: Some(e.ready()),
                        serving: Some(e.serving),
                        terminating: Some(e.terminating),
                    }),
                    hints: Some(EndpointHints {
                        for_nodes: Some(vec![ForNode {
                            name: e.node.clone(),
                        }]),
                        for_zones: e.zone.clone().map(|z| vec![ForZone { name: z }]),
                    }),
                    ..Endpoint::default()
                })
            })
            .take(1000)
            .collect();
        slices.push(EndpointSlice {
            metadata: meta,
            address_type: family.address_type().into(),
            endpoints: Some(list),
            ports: Some(endpoint_ports(tenant, port)),
        });
    }
    Ok(slices)
}

/// The slices' ports: NTP on UDP, and for an NTS tenant its key exchange on TCP at the same
/// port number (the agent listens on both).
fn endpoint_ports(tenant: &TenantTimePolicy, port: u16) -> Vec<EndpointPort> {
    let mut ports = vec![EndpointPort {
        name: Some(names::NTP_PORT_NAME.into()),
        protocol: Some("UDP".into()),
        port: Some(i32::from(port)),
        ..EndpointPort::default()
    }];
    if tenant.spec.nts().is_some() {
        ports.push(EndpointPort {
            name: Some(names::NTS_KE_PORT_NAME.into()),
            protocol: Some("TCP".into()),
            port: Some(i32::from(port)),
            ..EndpointPort::default()
        });
    }
    ports
}

/// Number of ready endpoints across slices.
pub fn ready_endpoints(slices: &[EndpointSlice]) -> i32 {
    let n = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count();
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    fn agent(node: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            name: format!("agent-{node}"),
            labels: names::agent_labels("cluster"),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            node_name: Some(node.into()),
            ready: true,
            terminated: false,
            terminating: false,
        }
    }

    fn clock(ts: &str, synced: bool, distance_ms: i64) -> ClockInfo {
        ClockInfo {
            node: String::new(),
            other_time_daemon: false,
            time_service: ts.into(),
            synchronized: synced,
            offset_nanos: 0,
            stratum: 3,
            root_distance_nanos: distance_ms * 1_000_000,
            config_revision: None,
            sources: vec![],
        }
    }

    fn fresh(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn endpoints_are_ready_only_where_the_agent_is_synchronized_within_the_tenants_distance() {
        let agents = [
            agent("n1", &["10.0.0.1"]),
            agent("n2", &["10.0.0.2"]),
            agent("n3", &["10.0.0.3"]),
            agent("n4", &[]),
        ];
        let refs: Vec<&PodInfo> = agents.iter().collect();
        let clocks = BTreeMap::from([
            ("n1".to_string(), clock("cluster", true, 5)),
            ("n2".to_string(), clock("cluster", true, 500)),
            ("n3".to_string(), clock("cluster", false, 1)),
        ]);
        let all = fresh(&["n1", "n2", "n3", "n4"]);
        let eps = agent_endpoints(
            &refs,
            &clocks,
            &all,
            &BTreeMap::new(),
            "cluster",
            Some(100_000_000),
        );
        let ready: Vec<_> = eps.iter().map(|e| (e.node.as_str(), e.ready())).collect();
        assert_eq!(
            ready,
            [("n1", true), ("n2", false), ("n3", false)],
            "n4 has no address yet"
        );
        let lenient = agent_endpoints(&refs, &clocks, &all, &BTreeMap::new(), "cluster", None);
        assert!(
            lenient[1].ready(),
            "without a requirement, synchronized is enough"
        );
        let other = agent_endpoints(&refs, &clocks, &all, &BTreeMap::new(), "other", None);
        assert!(
            other.iter().all(|e| !e.ready()),
            "a clock of another TimeService never counts"
        );
    }

    #[test]
    fn a_stale_clock_or_an_unready_agent_pod_is_never_a_ready_endpoint() {
        let mut unready = agent("n2", &["10.0.0.2"]);
        unready.ready = false;
        let agents = [
            agent("n1", &["10.0.0.1"]),
            unready,
            agent("n3", &["10.0.0.3"]),
        ];
        let refs: Vec<&PodInfo> = agents.iter().collect();
        let clocks: BTreeMap<String, ClockInfo> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| ((*n).to_owned(), clock("cluster", true, 1)))
            .collect();
        // n3's NodeClock was not renewed within its bound.
        let eps = agent_endpoints(
            &refs,
            &clocks,
            &fresh(&["n1", "n2"]),
            &BTreeMap::new(),
            "cluster",
            None,
        );
        let state: Vec<_> = eps
            .iter()
            .map(|e| (e.node.as_str(), e.ready(), e.serving))
            .collect();
        assert_eq!(
            state,
            [
                ("n1", true, true),
                ("n2", false, false),
                ("n3", false, false)
            ]
        );
    }

    #[test]
    fn a_terminating_agent_is_not_ready_but_still_serving_as_kube_proxy_expects() {
        let mut leaving = agent("n1", &["10.0.0.1"]);
        leaving.terminating = true;
        let mut leaving_unsynced = agent("n2", &["10.0.0.2"]);
        leaving_unsynced.terminating = true;
        let agents = [leaving, leaving_unsynced];
        let refs: Vec<&PodInfo> = agents.iter().collect();
        let clocks = BTreeMap::from([
            ("n1".to_string(), clock("cluster", true, 1)),
            ("n2".to_string(), clock("cluster", false, 1)),
        ]);
        let eps = agent_endpoints(
            &refs,
            &clocks,
            &fresh(&["n1", "n2"]),
            &BTreeMap::new(),
            "cluster",
            None,
        );
        let tenant = fixtures::tenant("team-a", "p", serde_json::json!({}));
        let slices = build_endpoint_slices(&tenant, "cluster", 12345, &eps).unwrap();
        let conditions: Vec<_> = slices[0]
            .endpoints
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (c.ready, c.serving, c.terminating)
            })
            .collect();
        assert_eq!(
            conditions,
            [
                (Some(false), Some(true), Some(true)),
                (Some(false), Some(false), Some(true))
            ],
            "ready=false while terminating; serving says whether it still answers"
        );
        assert_eq!(ready_endpoints(&slices), 0);
    }

    #[test]
    fn slices_split_families_carry_the_service_name_manager_and_tenant_port() {
        let tenant = fixtures::tenant("team-a", "p", serde_json::json!({}));
        let agents = [
            agent("n1", &["10.0.0.1", "fd00::1"]),
            agent("n2", &["10.0.0.2"]),
        ];
        let refs: Vec<&PodInfo> = agents.iter().collect();
        let clocks = BTreeMap::from([("n1".to_string(), clock("cluster", true, 1))]);
        let zones = BTreeMap::from([("n1".to_string(), Some("z1".to_string()))]);
        let eps = agent_endpoints(&refs, &clocks, &fresh(&["n1"]), &zones, "cluster", None);
        let slices = build_endpoint_slices(&tenant, "cluster", 12345, &eps).unwrap();
        assert_eq!(slices.len(), 2);
        let (v4, v6) = (&slices[0], &slices[1]);
        assert_eq!(v4.address_type, "IPv4");
        assert_eq!(v4.metadata.name.as_deref(), Some("ntp-stratum-ipv4"));
        let labels = v4.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "ntp");
        assert_eq!(
            labels["endpointslice.kubernetes.io/managed-by"],
            "stratum-operator.stratum.io"
        );
        let (v4e, v6e) = (
            v4.endpoints.as_ref().unwrap(),
            v6.endpoints.as_ref().unwrap(),
        );
        assert_eq!(v4e.len(), 2);
        assert_eq!(v4e[0].node_name.as_deref(), Some("n1"));
        assert_eq!(v4e[0].zone.as_deref(), Some("z1"));
        assert_eq!(v4.ports.as_ref().unwrap()[0].port, Some(12345));
        assert_eq!(v6.address_type, "IPv6");
        assert_eq!(v6e.len(), 1);
        assert_eq!(v6e[0].addresses, ["fd00::1"]);
        assert_eq!(ready_endpoints(&slices), 2, "n1 in both families");
        assert_eq!(v4.ports.as_ref().unwrap().len(), 1, "no NTS, no TCP port");
    }

    #[test]
    fn an_nts_tenants_slices_route_its_key_exchange_to_the_agent_port_over_tcp() {
        let tenant = fixtures::tenant(
            "team-a",
            "p",
            serde_json::json!({ "authentication": { "nts": true, "ntsCertificateSecret": "tls" } }),
        );
        let agents = [agent("n1", &["10.0.0.1"])];
        let refs: Vec<&PodInfo> = agents.iter().collect();
        let eps = agent_endpoints(
            &refs,
            &BTreeMap::new(),
            &fresh(&[]),
            &BTreeMap::new(),
            "cluster",
            None,
        );
        let slices = build_endpoint_slices(&tenant, "cluster", 12345, &eps).unwrap();
        let ports: Vec<_> = slices[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.protocol.as_deref(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("ntp"), Some("UDP"), Some(12345)),
                (Some("nts-ke"), Some("TCP"), Some(12345))
            ]
        );
    }
}
