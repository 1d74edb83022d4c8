//! The NetworkPolicy around a TimeService's agents: each tenant's peers may reach that tenant's
//! port; agents may reach their upstreams, DNS and the API server.
//!
//! NetworkPolicy binds only pods on the pod network. With host-network agents (the default) it
//! selects nothing enforceable, and the agent's own per-tenant allow list (the same peers,
//! resolved to CIDRs in the agent config) is the enforcement that always holds. With
//! `spec.agent.hostNetwork: false` both apply.

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::sync::Arc;

use stratum_api::common::PolicyPeer;
use stratum_api::{TimeService, TimeServiceSpec};

use super::{OperatorSettings, agent_meta};
use crate::error::{Error, Result};
use crate::names;

/// One tenant's admission rule.
#[derive(Clone, Debug)]
pub struct TenantRule<'a> {
    /// The tenant's namespace (peers without a namespaceSelector live there).
    pub namespace: &'a str,
    /// The tenant's allowedClients.
    pub peers: &'a [PolicyPeer],
    /// The tenant's port.
    pub port: u16,
    /// Whether the tenant has NTS: its key exchange listens on TCP at the same port number.
    pub nts: bool,
}

/// NTS key exchange (RFC 8915).
const NTS_KE_PORT: i32 = 4460;

fn port(protocol: &str, port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.to_owned()),
        port: Some(IntOrString::Int(port)),
        ..NetworkPolicyPort::default()
    }
}

fn namespace_is(ns: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some([("kubernetes.io/metadata.name".to_owned(), ns.to_owned())].into()),
        ..LabelSelector::default()
    }
}

/// A tenant peer as a NetworkPolicy peer of a policy living in the operator's namespace: a bare
/// podSelector is pinned to the tenant's namespace, because in this policy it would otherwise
/// mean the operator's.
pub fn to_network_peer(tenant_ns: &str, peer: &PolicyPeer) -> NetworkPolicyPeer {
    if let Some(block) = &peer.ip_block {
        return NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: block.cidr.clone(),
                except: (!block.except.is_empty()).then(|| block.except.clone()),
            }),
            ..NetworkPolicyPeer::default()
        };
    }
    NetworkPolicyPeer {
        namespace_selector: Some(
            peer.namespace_selector
                .clone()
                .unwrap_or_else(|| namespace_is(tenant_ns)),
        ),
        pod_selector: Some(peer.pod_selector.clone().unwrap_or_default()),
        ..NetworkPolicyPeer::default()
    }
}

/// Largest NetworkPolicy written, as JSON. The API server takes at most 1.5 MiB per object
/// (etcd's request limit), and server-side apply adds managed fields about as large as the
/// spec; past this the tenants' rules go on into further policies (see
/// [`build_network_policies`]), so no number of tenants can make the policy unwritable.
pub const MAX_POLICY_BYTES: usize = 512 * 1024;

/// Largest ingress rule of one tenant, as JSON. A tenant's rule is its allowedClients (at most
/// 64 peers) as NetworkPolicy peers; ordinary ones are a few hundred bytes, and only selectors
/// with thousands of labels come near this. A tenant over it is refused on its own
/// (`validate`), so every policy holds at least eight tenants.
pub const MAX_TENANT_RULE_BYTES: usize = 64 * 1024;

/// The ingress rule admitting one tenant's peers to its port (UDP, and TCP for NTS-KE).
pub fn tenant_rule(t: &TenantRule<'_>) -> NetworkPolicyIngressRule {
    let peers: Vec<NetworkPolicyPeer> = if t.peers.is_empty() {
        vec![to_network_peer(
            t.namespace,
            &PolicyPeer {
                pod_selector: Some(LabelSelector::default()),
                ..PolicyPeer::default()
            },
        )]
    } else {
        t.peers
            .iter()
            .map(|p| to_network_peer(t.namespace, p))
            .collect()
    };
    let mut ports = vec![port("UDP", i32::from(t.port))];
    if t.nts {
        ports.push(port("TCP", i32::from(t.port)));
    }
    NetworkPolicyIngressRule {
        from: Some(peers),
        ports: Some(ports),
    }
}

/// Size of a value as the compact JSON the API server receives.
pub fn json_bytes<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

/// Name of the `n`th (from 1) further policy holding tenants' rules.
pub fn overflow_policy_name(time_service: &str, n: usize) -> String {
    format!("{}-tenants-{n}", names::agent_name(time_service))
}

/// The last NetworkPolicy of a TimeService and everything it was built from (owner, spec,
/// settings, tenant rules, peer port). Pods never change it, so a pod event reuses it.
#[derive(Debug)]
pub struct PolicyCache {
    owner: (Option<String>, Option<String>),
    spec: TimeServiceSpec,
    settings: OperatorSettings,
    tenants: Vec<(String, Vec<PolicyPeer>, u16, bool)>,
    tenants_revision: Option<u64>,
    peer_port: Option<u16>,
    policies: Arc<[NetworkPolicy]>,
}

impl PolicyCache {
    fn built_from(
        &self,
        ts: &TimeService,
        settings: &OperatorSettings,
        tenants: &[TenantRule<'_>],
        tenants_revision: Option<u64>,
        peer_port: Option<u16>,
    ) -> bool {
        self.owner.0 == ts.metadata.name
            && self.owner.1 == ts.metadata.uid
            && self.peer_port == peer_port
            && self.spec == ts.spec
            && self.settings == *settings
            && (tenants_revision.is_some() && self.tenants_revision == tenants_revision
                || self.same_tenants(tenants))
    }

    fn same_tenants(&self, tenants: &[TenantRule<'_>]) -> bool {
        self.tenants.len() == tenants.len()
            && self
                .tenants
                .iter()
                .zip(tenants)
                .all(|((ns, peers, port, nts), t)| {
                    ns == t.namespace && peers == t.peers && *port == t.port && *nts == t.nts
                })
    }
}

/// [`build_network_policies`], reusing `cache` when built from the same inputs. The caller
/// promises that an equal `tenants_revision` means equal `tenants`, which are then not compared
/// (`None`: always compared).
pub fn build_network_policies_cached(
    cache: &mut Option<PolicyCache>,
    ts: &TimeService,
    settings: &OperatorSettings,
    tenants: &[TenantRule<'_>],
    tenants_revision: Option<u64>,
    peer_port: Option<u16>,
) -> Result<Arc<[NetworkPolicy]>> {
    if let Some(hit) = cache
        .as_ref()
        .filter(|c| c.built_from(ts, settings, tenants, tenants_revision, peer_port))
    {
        return Ok(hit.policies.clone());
    }
    let policy: Arc<[NetworkPolicy]> =
        build_network_policies(ts, settings, tenants, peer_port)?.into();
    *cache = Some(PolicyCache {
        owner: (ts.metadata.name.clone(), ts.metadata.uid.clone()),
        spec: ts.spec.clone(),
        settings: settings.clone(),
        tenants: tenants
            .iter()
            .map(|t| (t.namespace.to_owned(), t.peers.to_vec(), t.port, t.nts))
            .collect(),
        tenants_revision,
        peer_port,
        policies: policy.clone(),
    });
    Ok(policy)
}

/// The NetworkPolicies of `ts`: the first (`<ts>-agent`) with the agents' own rules (metrics,
/// peer port, egress) and the tenants' rules in order while it stays within
/// [`MAX_POLICY_BYTES`]; the rest of the tenants' rules in further ingress-only policies
/// (`<ts>-agent-tenants-<n>`), each within the bound too. Policies selecting the same pods
/// add up, so together they admit exactly what one would.
pub fn build_network_policies(
    ts: &TimeService,
    settings: &OperatorSettings,
    tenants: &[TenantRule<'_>],
    peer_port: Option<u16>,
) -> Result<Vec<NetworkPolicy>> {
    let name = ts
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("TimeService name"))?;
    let agents = LabelSelector {
        match_labels: Some(names::agent_labels(name)),
        ..LabelSelector::default()
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        // Metrics and probes: scraped by Prometheus, probed by the kubelet.
        from: None,
        ports: Some(vec![port("TCP", names::AGENT_METRICS_PORT)]),
    }];
    let own_agents = NetworkPolicyPeer {
        pod_selector: Some(agents.clone()),
        namespace_selector: Some(namespace_is(&settings.namespace)),
        ..NetworkPolicyPeer::default()
    };
    if let Some(peer) = peer_port {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![own_agents.clone()]),
            ports: Some(vec![port("UDP", i32::from(peer))]),
        });
    }
    // Upstreams may be DNS names, which a NetworkPolicy cannot express, so egress is limited by
    // port: NTP (and NTS-KE) to the configured upstream ports, DNS, and the API server.
    let mut upstream_ports: Vec<NetworkPolicyPort> = Vec::new();
    for u in &ts.spec.upstreams {
        let p = port("UDP", u.port);
        if !upstream_ports.contains(&p) {
            upstream_ports.push(p);
        }
        if u.nts {
            let ke = port("TCP", u.nts_port.unwrap_or(NTS_KE_PORT));
            if !upstream_ports.contains(&ke) {
                upstream_ports.push(ke);
            }
        }
    }
    let mut egress = vec![
        NetworkPolicyEgressRule {
            to: None,
            ports: Some(upstream_ports),
        },
        NetworkPolicyEgressRule {
            to: None,
            ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
        },
        NetworkPolicyEgressRule {
            to: None,
            ports: Some(vec![port("TCP", 443), port("TCP", 6443)]),
        },
    ];
    if let Some(peer) = peer_port {
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![own_agents]),
            ports: Some(vec![port("UDP", i32::from(peer))]),
        });
    }
    let mut policies = vec![NetworkPolicy {
        metadata: agent_meta(ts, names::agent_name(name), Some(&settings.namespace))?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(agents.clone()),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }];
    let mut size = json_bytes(&policies[0]);
    for t in tenants {
        let rule = tenant_rule(t);
        // The separating comma included.
        let bytes = json_bytes(&rule).saturating_add(1);
        if size.saturating_add(bytes) > MAX_POLICY_BYTES {
            let overflow = NetworkPolicy {
                metadata: agent_meta(
                    ts,
                    overflow_policy_name(name, policies.len()),
                    Some(&settings.namespace),
                )?,
                spec: Some(NetworkPolicySpec {
                    pod_selector: Some(agents.clone()),
                    policy_types: Some(vec!["Ingress".into()]),
                    ingress: Some(Vec::new()),
                    egress: None,
                }),
            };
            size = json_bytes(&overflow);
            policies.push(overflow);
        }
        size = size.saturating_add(bytes);
        if let Some(ingress) = policies
            .last_mut()
            .and_then(|p| p.spec.as_mut())
            .and_then(|s| s.ingress.as_mut())
        {
            ingress.push(rule);
        }
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn each_tenant_port_admits_exactly_that_tenants_peers() {
        let ts = fixtures::time_service("cluster");
        let vm_peers: Vec<PolicyPeer> = serde_json::from_value(serde_json::json!([
            { "podSelector": { "matchLabels": { "app": "vm" } } },
            { "namespaceSelector": { "matchLabels": { "team": "a" } }, "podSelector": { "matchLabels": { "x": "y" } } },
            { "ipBlock": { "cidr": "192.0.2.0/24", "except": ["192.0.2.1/32"] } }
        ]))
        .unwrap();
        let tenants = [
            TenantRule {
                namespace: "vms",
                peers: &vm_peers,
                port: 12300,
                nts: false,
            },
            TenantRule {
                namespace: "plain",
                peers: &[],
                port: 12301,
                nts: true,
            },
        ];
        let mut policies =
            build_network_policies(&ts, &fixtures::settings(), &tenants, None).unwrap();
        assert_eq!(policies.len(), 1);
        let spec = policies.remove(0).spec.unwrap();
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 3, "metrics plus one rule per tenant");
        let vms = &ingress[1];
        assert_eq!(
            vms.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(12300))
        );
        let from = vms.from.as_ref().unwrap();
        // A bare podSelector is pinned to the tenant's namespace.
        assert_eq!(from[0].namespace_selector, Some(namespace_is("vms")));
        assert_eq!(
            from[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["team"],
            "a"
        );
        assert_eq!(
            from[2].ip_block.as_ref().unwrap().except.as_deref(),
            Some(&["192.0.2.1/32".to_string()][..])
        );
        // No peers: every pod of the tenant's own namespace.
        let plain = &ingress[2].from.as_ref().unwrap()[0];
        assert_eq!(plain.namespace_selector, Some(namespace_is("plain")));
        assert_eq!(plain.pod_selector, Some(LabelSelector::default()));
        // The NTS tenant's peers reach its key exchange (TCP, same port number); the other
        // tenant opens UDP only.
        assert_eq!(
            ingress[2].ports.as_deref(),
            Some(&[port("UDP", 12301), port("TCP", 12301)][..])
        );
        assert_eq!(vms.ports.as_deref(), Some(&[port("UDP", 12300)][..]));
        let egress = spec.egress.unwrap();
        assert_eq!(egress[0].ports.as_ref().unwrap()[0], port("UDP", 123));
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap(),
            names::agent_labels("cluster")
        );
    }

    #[test]
    fn tenants_rules_past_the_size_bound_go_on_into_further_policies_each_within_it() {
        let ts = fixtures::time_service("cluster");
        // About 6 KiB of rule per tenant: 400 tenants need several policies.
        let labels: serde_json::Map<String, serde_json::Value> = (0..20)
            .map(|i| {
                (
                    format!("key-{i:02}-{}", "k".repeat(100)),
                    "v".repeat(60).into(),
                )
            })
            .collect();
        let peers: Vec<PolicyPeer> = serde_json::from_value(serde_json::json!(vec![
            serde_json::json!({ "podSelector": { "matchLabels": labels } });
            2
        ]))
        .unwrap();
        let namespaces: Vec<String> = (0..400).map(|i| format!("ns-{i}")).collect();
        let tenants: Vec<TenantRule<'_>> = namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| TenantRule {
                namespace: ns,
                peers: &peers,
                port: 20000 + i as u16,
                nts: false,
            })
            .collect();
        let policies =
            build_network_policies(&ts, &fixtures::settings(), &tenants, Some(29999)).unwrap();
        assert!(policies.len() > 2, "{} policies", policies.len());
        let mut ports = Vec::new();
        for (n, policy) in policies.iter().enumerate() {
            assert!(json_bytes(policy) <= MAX_POLICY_BYTES, "policy {n}");
            let spec = policy.spec.as_ref().unwrap();
            let name = policy.metadata.name.as_deref().unwrap();
            if n == 0 {
                assert_eq!(name, "cluster-agent");
                assert!(
                    spec.egress.is_some(),
                    "the agents' own rules stay in the first"
                );
            } else {
                assert_eq!(name, format!("cluster-agent-tenants-{n}"));
                assert_eq!(
                    spec.policy_types.as_deref(),
                    Some(&["Ingress".to_string()][..])
                );
                assert!(spec.egress.is_none());
            }
            assert_eq!(
                spec.pod_selector,
                Some(LabelSelector {
                    match_labels: Some(names::agent_labels("cluster")),
                    ..LabelSelector::default()
                })
            );
            for rule in spec.ingress.as_ref().unwrap() {
                if let Some(IntOrString::Int(p)) = rule.ports.as_ref().unwrap()[0].port
                    && (20000..29999).contains(&p)
                {
                    ports.push(p);
                }
            }
        }
        let expected: Vec<i32> = (20000..20400).collect();
        assert_eq!(ports, expected, "every tenant once, in order");
    }
}
