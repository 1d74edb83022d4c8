//! Resolution of a tenant's NetworkPolicy-style peers into the aggregated CIDRs its agents
//! allow, and of its deny list. Pure: it reads a [`Cluster`] and returns values.
//!
//! Semantics follow `networking.k8s.io/v1` NetworkPolicyPeer: `podSelector` alone selects pods
//! in the tenant's namespace; `namespaceSelector` alone every pod of the selected namespaces;
//! both together the selected pods of the selected namespaces; `ipBlock` its CIDR minus its
//! exceptions. No peer at all means the pods of the tenant's own namespace. A pod contributes
//! every address in `status.podIPs` (a host-network pod's addresses are its node's, and are
//! allowed as they are: that is what the agent sees as the source). Pods that finished
//! (Succeeded/Failed) contribute nothing, because their addresses may already be reused.

use std::net::IpAddr;

use ipnet::IpNet;
use stratum_api::common::{IpBlock, PolicyPeer};

use crate::index::Cluster;
use crate::selector::{Selector, SelectorError};

/// Why a tenant's peers cannot be resolved; the user has to fix the TenantTimePolicy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// A selector is malformed.
    #[error("{field}: {source}")]
    Selector {
        /// JSON path of the selector.
        field: String,
        /// What is wrong.
        #[source]
        source: SelectorError,
    },
    /// A CIDR does not parse.
    #[error("{field}: {value:?} is not a CIDR")]
    Cidr {
        /// JSON path of the CIDR.
        field: String,
        /// The text.
        value: String,
    },
}

/// Which namespaces a peer's pods come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// The tenant's own namespace.
    Own,
    /// Every namespace whose labels match.
    Selected(Selector),
}

/// A peer compiled for repeated evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompiledPeer {
    /// Pods selected by labels within a namespace scope.
    Pods {
        /// Where the pods live.
        namespaces: NamespaceScope,
        /// Which of their pods (empty selects all).
        pods: Selector,
    },
    /// Fixed address ranges (the CIDR minus its exceptions, already split).
    Block(Vec<IpNet>),
}

/// A tenant's allow and deny lists, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// The tenant's namespace.
    pub namespace: String,
    /// Allowed peers (never empty: no peer means the tenant's own namespace).
    pub allowed: Vec<CompiledPeer>,
    /// Denied ranges, aggregated.
    pub denied: Vec<IpNet>,
}

impl CompiledPolicy {
    /// Compiles a tenant's `allowedClients` and `deniedClients`.
    pub fn compile(
        namespace: &str,
        allowed: &[PolicyPeer],
        denied: &[IpBlock],
    ) -> Result<Self, ResolveError> {
        let mut peers = Vec::new();
        for (i, peer) in allowed.iter().enumerate() {
            peers.push(compile_peer(&format!("spec.allowedClients[{i}]"), peer)?);
        }
        if peers.is_empty() {
            peers.push(CompiledPeer::Pods {
                namespaces: NamespaceScope::Own,
                pods: Selector::default(),
            });
        }
        let mut denied_nets = Vec::new();
        for (i, block) in denied.iter().enumerate() {
            denied_nets.extend(block_cidrs(&format!("spec.deniedClients[{i}]"), block)?);
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            allowed: peers,
            denied: IpNet::aggregate(&denied_nets),
        })
    }

    /// Whether pods of namespace `ns` (with labels `ns_labels`) can be selected at all: the
    /// allow list depends on that namespace's pods.
    pub fn depends_on_namespace(&self, ns: &str, ns_labels: &crate::selector::Labels) -> bool {
        self.allowed.iter().any(|p| match p {
            CompiledPeer::Pods {
                namespaces: NamespaceScope::Own,
                ..
            } => ns == self.namespace,
            CompiledPeer::Pods {
                namespaces: NamespaceScope::Selected(s),
                ..
            } => s.matches(ns_labels),
            CompiledPeer::Block(_) => false,
        })
    }

    /// Whether the allow list depends on namespace labels (some peer has a namespaceSelector).
    pub fn selects_namespaces(&self) -> bool {
        self.allowed.iter().any(|p| {
            matches!(
                p,
                CompiledPeer::Pods {
                    namespaces: NamespaceScope::Selected(_),
                    ..
                }
            )
        })
    }

    /// The pod sets this policy's pod peers select in `cluster`: one per (namespace, pod
    /// selector), in peer order. Which sets these are depends on namespaces only, not on pods.
    pub fn pod_sets(&self, cluster: &Cluster) -> Vec<PodSet> {
        let mut sets = Vec::new();
        for peer in &self.allowed {
            match peer {
                CompiledPeer::Block(_) => {}
                CompiledPeer::Pods {
                    namespaces: NamespaceScope::Own,
                    pods,
                } => sets.push((self.namespace.clone(), pods.clone())),
                CompiledPeer::Pods {
                    namespaces: NamespaceScope::Selected(ns_selector),
                    pods,
                } => {
                    for (ns, labels) in cluster.namespaces() {
                        if ns_selector.matches(labels) {
                            sets.push((ns.to_owned(), pods.clone()));
                        }
                    }
                }
            }
        }
        sets.sort_unstable();
        sets.dedup();
        sets
    }

    /// The fixed ranges of the ipBlock peers, aggregated.
    pub fn blocks(&self) -> Vec<IpNet> {
        let nets: Vec<IpNet> = self
            .allowed
            .iter()
            .filter_map(|p| match p {
                CompiledPeer::Block(b) => Some(b.iter().copied()),
                CompiledPeer::Pods { .. } => None,
            })
            .flatten()
            .collect();
        IpNet::aggregate(&nets)
    }

    /// The aggregated CIDRs allowed by this policy in `cluster`: its blocks and the pods of
    /// its pod sets, resolved from scratch (the index keeps the sets resolved and shared).
    pub fn resolve_allowed(&self, cluster: &Cluster) -> Vec<IpNet> {
        let mut nets = self.blocks();
        for (ns, selector) in self.pod_sets(cluster) {
            push_pod_ips(&mut nets, cluster, &ns, &selector);
        }
        IpNet::aggregate(&nets)
    }
}

/// Pods of one namespace matching one selector: the unit of allow-list sharing and caching.
pub type PodSet = (String, Selector);

/// The aggregated addresses of the running pods of a pod set.
pub fn resolve_pod_set(cluster: &Cluster, (ns, selector): &PodSet) -> Vec<IpNet> {
    let mut nets = Vec::new();
    push_pod_ips(&mut nets, cluster, ns, selector);
    IpNet::aggregate(&nets)
}

fn push_pod_ips(nets: &mut Vec<IpNet>, cluster: &Cluster, ns: &str, selector: &Selector) {
    for pod in cluster.pods_in(ns) {
        if !pod.terminated && selector.matches(&pod.labels) {
            nets.extend(pod.ips.iter().map(|ip| host_net(*ip)));
        }
    }
}

/// The single-address prefix of `ip`.
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn compile_peer(field: &str, peer: &PolicyPeer) -> Result<CompiledPeer, ResolveError> {
    if let Some(block) = &peer.ip_block {
        return Ok(CompiledPeer::Block(block_cidrs(
            &format!("{field}.ipBlock"),
            block,
        )?));
    }
    let selector = |what: &str, s| {
        Selector::compile(s).map_err(|source| ResolveError::Selector {
            field: format!("{field}.{what}"),
            source,
        })
    };
    let pods = match &peer.pod_selector {
        Some(s) => selector("podSelector", s)?,
        None => Selector::default(),
    };
    let namespaces = match &peer.namespace_selector {
        Some(s) => NamespaceScope::Selected(selector("namespaceSelector", s)?),
        None => NamespaceScope::Own,
    };
    Ok(CompiledPeer::Pods { namespaces, pods })
}

fn parse_cidr(field: &str, text: &str) -> Result<IpNet, ResolveError> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| ResolveError::Cidr {
            field: field.to_owned(),
            value: text.to_owned(),
        })
}

/// An IpBlock as disjoint prefixes: `cidr` minus every exception.
pub fn block_cidrs(field: &str, block: &IpBlock) -> Result<Vec<IpNet>, ResolveError> {
    let cidr = parse_cidr(&format!("{field}.cidr"), &block.cidr)?;
    let mut except = Vec::new();
    for (i, e) in block.except.iter().enumerate() {
        except.push(parse_cidr(&format!("{field}.except[{i}]"), e)?);
    }
    Ok(subtract(cidr, &except))
}

/// `net` minus every prefix of `except`, as disjoint prefixes. Two prefixes are either nested or
/// disjoint, so it suffices to split `net` in halves until no exception lies strictly inside.
pub fn subtract(net: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    if except.iter().any(|e| e.contains(&net)) {
        return Vec::new();
    }
    if !except.iter().any(|e| net.contains(e)) {
        return vec![net];
    }
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        // Unreachable: a prefix strictly containing another is never a host prefix.
        return vec![net];
    };
    halves.flat_map(|half| subtract(half, except)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn except_blocks_are_carved_out_as_the_fewest_prefixes() {
        let got = subtract(
            "10.0.0.0/24".parse().unwrap(),
            &nets(&["10.0.0.0/26", "10.0.0.200/32"]),
        );
        assert_eq!(
            got,
            nets(&[
                "10.0.0.64/26",
                "10.0.0.128/26",
                "10.0.0.192/29",
                "10.0.0.201/32",
                "10.0.0.202/31",
                "10.0.0.204/30",
                "10.0.0.208/28",
                "10.0.0.224/27"
            ])
        );
        assert_eq!(
            IpNet::aggregate(&got),
            got,
            "already minimal: nothing left to merge"
        );
    }

    #[test]
    fn an_exception_covering_the_whole_block_leaves_nothing() {
        assert!(subtract("fd00::/64".parse().unwrap(), &nets(&["fd00::/48"])).is_empty());
    }

    #[test]
    fn cidrs_with_host_bits_are_truncated_like_the_api_server_accepts_them() {
        let block = IpBlock {
            cidr: "10.1.2.3/16".into(),
            except: vec![],
        };
        assert_eq!(block_cidrs("x", &block).unwrap(), nets(&["10.1.0.0/16"]));
    }

    #[test]
    fn malformed_cidrs_name_their_field() {
        let err = CompiledPolicy::compile(
            "a",
            &[],
            &[IpBlock {
                cidr: "10.0.0.0/8".into(),
                except: vec!["nope".into()],
            }],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.deniedClients[0].except[0]: \"nope\" is not a CIDR"
        );
    }
}
