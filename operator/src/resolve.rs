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
use std::ops::ControlFlow;

use ipnet::IpNet;
use stratum_api::common::{IpBlock, PolicyPeer};

use crate::model::Cluster;
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
    /// The ipBlocks, their exceptions carved out, come to more prefixes than one tenant may
    /// have; counted before any is made.
    #[error(
        "{field}: minus its except list this ipBlock alone expands to more than {left} prefixes, \
         which with the tenant's other ipBlocks is over the limit of {MAX_TENANT_PREFIXES} \
         prefixes per tenant; use fewer or wider exceptions"
    )]
    TooManyPrefixes {
        /// JSON path of the ipBlock.
        field: String,
        /// What was left of the limit when this block was counted.
        left: usize,
    },
}

impl ResolveError {
    /// Condition reason of a tenant refused for this.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::Selector { .. } | ResolveError::Cidr { .. } => "InvalidClients",
            ResolveError::TooManyPrefixes { .. } => "TooManyPrefixes",
        }
    }
}

/// Most prefixes one tenant's allow and deny lists may hold, counted as the agents load them
/// (its ipBlocks minus their exceptions and its pods' addresses, aggregated, plus its deny
/// list). Ten thousand is far above what a tenant needs (a 5000-pod dual-stack namespace
/// selector, or a few dozen ipBlocks with exceptions) and keeps any one tenant to about a
/// twentieth of the agent config's 1 MB: its lookup trie stays small, and one namespace cannot
/// fill the config or the operator's memory (a few ipBlocks with 64 exceptions each expand to
/// hundreds of thousands of prefixes). A tenant over it is refused on its own.
pub const MAX_TENANT_PREFIXES: usize = 10_000;

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
        // Every ipBlock, allowed and denied, counted against one limit before any is made.
        let mut budget = MAX_TENANT_PREFIXES;
        let allowed_blocks = allowed.iter().enumerate().filter_map(|(i, peer)| {
            let block = peer.ip_block.as_ref()?;
            Some((format!("spec.allowedClients[{i}].ipBlock"), block))
        });
        let denied_blocks = denied
            .iter()
            .enumerate()
            .map(|(i, block)| (format!("spec.deniedClients[{i}]"), block));
        for (field, block) in allowed_blocks.chain(denied_blocks) {
            count_block(&field, block, &mut budget)?;
        }
        let mut budget = MAX_TENANT_PREFIXES;
        let mut peers = Vec::new();
        for (i, peer) in allowed.iter().enumerate() {
            peers.push(compile_peer(
                &format!("spec.allowedClients[{i}]"),
                peer,
                &mut budget,
            )?);
        }
        if peers.is_empty() {
            peers.push(CompiledPeer::Pods {
                namespaces: NamespaceScope::Own,
                pods: Selector::default(),
            });
        }
        let mut denied_nets = Vec::new();
        for (i, block) in denied.iter().enumerate() {
            denied_nets.extend(block_cidrs(
                &format!("spec.deniedClients[{i}]"),
                block,
                &mut budget,
            )?);
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
    /// its pod sets, resolved from scratch (the planner keeps the sets resolved and shared).
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

fn compile_peer(
    field: &str,
    peer: &PolicyPeer,
    budget: &mut usize,
) -> Result<CompiledPeer, ResolveError> {
    if let Some(block) = &peer.ip_block {
        return Ok(CompiledPeer::Block(block_cidrs(
            &format!("{field}.ipBlock"),
            block,
            budget,
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

/// An IpBlock as disjoint prefixes: `cidr` minus every exception. At most `budget` prefixes
/// are made, counted first (without making them); `budget` is reduced by those made.
pub fn block_cidrs(
    field: &str,
    block: &IpBlock,
    budget: &mut usize,
) -> Result<Vec<IpNet>, ResolveError> {
    let (cidr, except) = parse_block(field, block)?;
    let Some(except) = carving(cidr, &except) else {
        return Ok(Vec::new());
    };
    let count = count_within(field, cidr, &except, budget)?;
    let mut nets = Vec::with_capacity(count);
    let _ = carve(cidr, &except, &mut |n| {
        nets.push(n);
        ControlFlow::Continue(())
    });
    Ok(nets)
}

/// Counts the prefixes of an IpBlock against `budget`, reducing it, without making them.
fn count_block(field: &str, block: &IpBlock, budget: &mut usize) -> Result<(), ResolveError> {
    let (cidr, except) = parse_block(field, block)?;
    if let Some(except) = carving(cidr, &except) {
        count_within(field, cidr, &except, budget)?;
    }
    Ok(())
}

fn parse_block(field: &str, block: &IpBlock) -> Result<(IpNet, Vec<IpNet>), ResolveError> {
    let cidr = parse_cidr(&format!("{field}.cidr"), &block.cidr)?;
    let mut except = Vec::new();
    for (i, e) in block.except.iter().enumerate() {
        except.push(parse_cidr(&format!("{field}.except[{i}]"), e)?);
    }
    Ok((cidr, except))
}

/// How many prefixes `net` minus `except` (from [`carving`]) makes, when at most `budget`;
/// `budget` is reduced by them.
fn count_within(
    field: &str,
    net: IpNet,
    except: &[IpNet],
    budget: &mut usize,
) -> Result<usize, ResolveError> {
    let mut count = 0;
    let counted = carve(net, except, &mut |_| {
        count += 1;
        if count > *budget {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if counted.is_break() {
        return Err(ResolveError::TooManyPrefixes {
            field: field.to_owned(),
            left: *budget,
        });
    }
    *budget -= count;
    Ok(count)
}

/// `net` minus every prefix of `except`, as the fewest disjoint prefixes.
pub fn subtract(net: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    let Some(except) = carving(net, except) else {
        return Vec::new();
    };
    let mut nets = Vec::new();
    let _ = carve(net, &except, &mut |n| {
        nets.push(n);
        ControlFlow::Continue(())
    });
    nets
}

/// The exceptions that matter for carving `net`: those inside it, outermost only (two
/// prefixes are nested or disjoint), sorted by address. `None` when one covers all of `net`.
fn carving(net: IpNet, except: &[IpNet]) -> Option<Vec<IpNet>> {
    if except.iter().any(|e| e.contains(&net)) {
        return None;
    }
    let mut inside: Vec<IpNet> = except.iter().copied().filter(|e| net.contains(e)).collect();
    inside.sort_unstable_by_key(|e| (e.network(), e.prefix_len()));
    let mut outermost: Vec<IpNet> = Vec::with_capacity(inside.len());
    for e in inside {
        if outermost.last().is_none_or(|last| !last.contains(&e)) {
            outermost.push(e);
        }
    }
    Some(outermost)
}

/// Hands `out` the prefixes of `net` minus `except` (from [`carving`]: disjoint, sorted,
/// strictly inside `net`) in address order, until it breaks. Only halves holding an exception
/// are split, so the work is bounded by the exceptions times the address width, however many
/// prefixes come out, and a count can stop at any limit.
fn carve(
    net: IpNet,
    except: &[IpNet],
    out: &mut impl FnMut(IpNet) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match except {
        [] => out(net),
        [only] if *only == net => ControlFlow::Continue(()),
        _ => {
            let halves = net.subnets(net.prefix_len() + 1).ok();
            let mut halves = halves.into_iter().flatten();
            let (Some(low), Some(high)) = (halves.next(), halves.next()) else {
                // Unreachable: a prefix strictly containing another is never a host prefix.
                return out(net);
            };
            let mid = except.partition_point(|e| e.network() < high.network());
            carve(low, &except[..mid], out)?;
            carve(high, &except[mid..], out)
        }
    }
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

    /// The obvious carving, for comparison: split until no exception lies strictly inside.
    fn naive_subtract(net: IpNet, except: &[IpNet]) -> Vec<IpNet> {
        if except.iter().any(|e| e.contains(&net)) {
            return Vec::new();
        }
        if !except.iter().any(|e| net.contains(e)) {
            return vec![net];
        }
        net.subnets(net.prefix_len() + 1)
            .unwrap()
            .flat_map(|half| naive_subtract(half, except))
            .collect()
    }

    #[test]
    fn carving_equals_the_obvious_splitting_for_nested_and_unsorted_exceptions() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let net: IpNet = format!("10.{}.0.0/16", next(4)).parse().unwrap();
            let except: Vec<IpNet> = (0..next(12))
                .map(|_| {
                    let len = 17 + next(16) as u8;
                    let addr = std::net::Ipv4Addr::new(
                        10,
                        next(5) as u8,
                        next(256) as u8,
                        next(256) as u8,
                    );
                    IpNet::new(addr.into(), len).unwrap().trunc()
                })
                .collect();
            assert_eq!(
                subtract(net, &except),
                naive_subtract(net, &except),
                "{net} - {except:?}"
            );
        }
    }

    #[test]
    fn an_exploding_except_list_is_refused_by_count_before_any_prefix_is_made() {
        // 64 single addresses spread over a /16 of IPv6: about 64 × 97 prefixes per block.
        let block = |i: u16| IpBlock {
            cidr: format!("fd{i:02x}::/16"),
            except: (1..=64)
                .map(|j| format!("fd{i:02x}:{j:x}::1/128"))
                .collect(),
        };
        let one = CompiledPolicy::compile(
            "a",
            &[PolicyPeer {
                ip_block: Some(block(1)),
                ..PolicyPeer::default()
            }],
            &[],
        )
        .unwrap();
        let made = one.blocks().len();
        assert!((6000..MAX_TENANT_PREFIXES).contains(&made), "{made}");
        let started = std::time::Instant::now();
        let peers: Vec<PolicyPeer> = (1..=40)
            .map(|i| PolicyPeer {
                ip_block: Some(block(i)),
                ..PolicyPeer::default()
            })
            .collect();
        let err = CompiledPolicy::compile("a", &peers, &[]).unwrap_err();
        assert_eq!(err.reason(), "TooManyPrefixes");
        assert!(
            err.to_string()
                .starts_with("spec.allowedClients[1].ipBlock: "),
            "{err}"
        );
        assert!(
            err.to_string().contains("10000 prefixes per tenant"),
            "{err}"
        );
        // Denied blocks count against the same limit.
        let err = CompiledPolicy::compile("a", &peers[..1], &[block(2)]).unwrap_err();
        assert!(
            err.to_string().starts_with("spec.deniedClients[0]: "),
            "{err}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "counting is bounded by the exceptions, not the prefixes"
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
        assert_eq!(
            block_cidrs("x", &block, &mut 10).unwrap(),
            nets(&["10.1.0.0/16"])
        );
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
