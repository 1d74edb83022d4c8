//! NetworkPolicy-peer resolution against an independent brute-force oracle: for random
//! clusters and random peers, every candidate address is allowed by the resolved CIDRs exactly
//! when a naive reading of the NetworkPolicy rules allows it. And the incremental index, after
//! random churn, always equals a resolution from scratch, per tenant and as the shared pod sets
//! the agent config carries.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use stratum_api::TenantTimePolicy;
use stratum_api::common::{IpBlock, PolicyPeer};
use stratum_operator::index::Index;
use stratum_operator::model::{Cluster, PodInfo};
use stratum_operator::plan::Planner;
use stratum_operator::resolve::CompiledPolicy;

type Labels = BTreeMap<String, String>;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

const NAMESPACES: [&str; 5] = ["ns0", "ns1", "ns2", "ns3", "ns4"];

fn random_labels(rng: &mut Rng, keys: &[(&str, &[&str])]) -> Labels {
    let mut labels = Labels::new();
    for (k, values) in keys {
        if rng.chance(60) {
            labels.insert((*k).into(), (*rng.pick(values)).into());
        }
    }
    labels
}

fn v4(i: u64) -> IpAddr {
    IpAddr::from([10, 0, 0, (i % 64) as u8])
}
fn v6(i: u64) -> IpAddr {
    IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, (i % 64) as u16])
}

struct World {
    namespaces: BTreeMap<String, Labels>,
    pods: Vec<(String, PodInfo)>,
}

fn random_world(rng: &mut Rng) -> World {
    let mut namespaces = BTreeMap::new();
    for ns in NAMESPACES.iter().take(4) {
        // ns4 has pods but no Namespace object yet (watch ordering): selectable only by
        // podSelector-only peers of a tenant living there.
        namespaces.insert(
            (*ns).to_string(),
            random_labels(rng, &[("team", &["a", "b"]), ("env", &["prod", "dev"])]),
        );
    }
    let mut pods = Vec::new();
    for i in 0..(10 + rng.below(25)) {
        let ns = (*rng.pick(&NAMESPACES)).to_string();
        let mut ips = Vec::new();
        match rng.below(4) {
            0 => ips.push(v4(rng.below(64))),
            1 => ips.push(v6(rng.below(64))),
            2 => ips.extend([v4(rng.below(64)), v6(rng.below(64))]),
            _ => {}
        }
        pods.push((
            ns,
            PodInfo {
                name: format!("pod{i}"),
                labels: random_labels(rng, &[("app", &["web", "db", "vm"]), ("tier", &["1", "2"])]),
                ips,
                node_name: Some("n".into()),
                ready: true,
                terminated: rng.chance(10),
                terminating: false,
            },
        ));
    }
    World { namespaces, pods }
}

fn random_selector(rng: &mut Rng, keys: &[(&str, &[&str])]) -> LabelSelector {
    let mut selector = LabelSelector::default();
    if rng.chance(50) {
        let (k, values) = rng.pick(keys);
        selector.match_labels = Some([((*k).to_string(), (*rng.pick(values)).to_string())].into());
    }
    if rng.chance(50) {
        let (k, values) = rng.pick(keys);
        let op = *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
        let vals = match op {
            "In" | "NotIn" => Some(vec![
                (*rng.pick(values)).to_string(),
                (*rng.pick(values)).to_string(),
            ]),
            _ => None,
        };
        selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: (*k).into(),
            operator: op.into(),
            values: vals,
        }]);
    }
    selector
}

fn random_block(rng: &mut Rng) -> IpBlock {
    let v6_block = rng.chance(40);
    let prefix = if v6_block {
        122 + rng.below(5) as u8
    } else {
        26 + rng.below(5) as u8
    };
    let base = if v6_block {
        v6(rng.below(64))
    } else {
        v4(rng.below(64))
    };
    let net = IpNet::new(base, prefix).unwrap().trunc();
    let mut except = Vec::new();
    for _ in 0..rng.below(3) {
        let longer = (prefix + 1 + rng.below(3) as u8).min(net.max_prefix_len());
        let inside = match net {
            IpNet::V4(n) => {
                let span = 1u64 << (32 - n.prefix_len());
                IpAddr::from(std::net::Ipv4Addr::from(
                    u32::from(n.network()) + rng.below(span) as u32,
                ))
            }
            IpNet::V6(n) => {
                let span = 1u128 << (128 - n.prefix_len());
                IpAddr::from(std::net::Ipv6Addr::from(
                    u128::from(n.network()) + u128::from(rng.next()) % span,
                ))
            }
        };
        if longer > prefix {
            except.push(IpNet::new(inside, longer).unwrap().trunc().to_string());
        }
    }
    IpBlock {
        cidr: net.to_string(),
        except,
    }
}

fn random_peers(rng: &mut Rng) -> Vec<PolicyPeer> {
    let ns_keys: &[(&str, &[&str])] = &[("team", &["a", "b"]), ("env", &["prod", "dev"])];
    let pod_keys: &[(&str, &[&str])] = &[("app", &["web", "db", "vm"]), ("tier", &["1", "2"])];
    (0..rng.below(4))
        .map(|_| match rng.below(4) {
            0 => PolicyPeer {
                pod_selector: Some(random_selector(rng, pod_keys)),
                ..Default::default()
            },
            1 => PolicyPeer {
                namespace_selector: Some(random_selector(rng, ns_keys)),
                ..Default::default()
            },
            2 => PolicyPeer {
                pod_selector: Some(random_selector(rng, pod_keys)),
                namespace_selector: Some(random_selector(rng, ns_keys)),
                ..Default::default()
            },
            _ => PolicyPeer {
                ip_block: Some(random_block(rng)),
                ..Default::default()
            },
        })
        .collect()
}

// ---- the oracle: a literal reading of the rules, sharing no code with the operator ----

fn naive_selects(selector: &LabelSelector, labels: &Labels) -> bool {
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => labels
                .get(&e.key)
                .map(|v| values.contains(v))
                .unwrap_or(false),
            "NotIn" => !labels
                .get(&e.key)
                .map(|v| values.contains(v))
                .unwrap_or(false),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => unreachable!(),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a)) << 96),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn naive_in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (addr, len) = cidr.split_once('/').unwrap();
    let net: IpAddr = addr.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let (fam_a, a) = bits(ip);
    let (fam_b, b) = bits(net);
    if fam_a != fam_b {
        return false;
    }
    len == 0 || (a >> (128 - len)) == (b >> (128 - len))
}

fn oracle_allows(world: &World, tenant_ns: &str, peers: &[PolicyPeer], ip: IpAddr) -> bool {
    let pod_with_ip = |pred: &dyn Fn(&str, &PodInfo) -> bool| {
        world
            .pods
            .iter()
            .any(|(ns, p)| !p.terminated && p.ips.contains(&ip) && pred(ns, p))
    };
    if peers.is_empty() {
        return pod_with_ip(&|ns, _| ns == tenant_ns);
    }
    peers.iter().any(|peer| {
        if let Some(block) = &peer.ip_block {
            return naive_in_cidr(ip, &block.cidr)
                && !block.except.iter().any(|e| naive_in_cidr(ip, e));
        }
        pod_with_ip(&|ns, p| {
            let ns_ok = match &peer.namespace_selector {
                None => ns == tenant_ns,
                Some(sel) => world
                    .namespaces
                    .get(ns)
                    .is_some_and(|labels| naive_selects(sel, labels)),
            };
            let pod_ok = peer
                .pod_selector
                .as_ref()
                .is_none_or(|sel| naive_selects(sel, &p.labels));
            ns_ok && pod_ok
        })
    })
}

fn candidates() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (0..64).map(v4).chain((0..64).map(v6)).collect();
    out.extend(
        ["10.0.1.1", "192.168.0.1", "fd00::1:0", "fe80::1"].map(|s| s.parse::<IpAddr>().unwrap()),
    );
    out
}

fn cluster_of(world: &World) -> Cluster {
    let mut cluster = Cluster::default();
    for (ns, labels) in &world.namespaces {
        cluster.upsert_namespace(ns, labels.clone());
    }
    for (ns, pod) in &world.pods {
        cluster.upsert_pod(ns, pod.clone());
    }
    cluster
}

fn assert_aggregated(nets: &[IpNet]) {
    assert_eq!(
        IpNet::aggregate(&nets.to_vec()),
        nets,
        "resolved CIDRs are not minimal"
    );
}

#[test]
fn resolved_cidrs_allow_exactly_what_the_brute_force_oracle_allows() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for round in 0..400 {
        let world = random_world(&mut rng);
        let cluster = cluster_of(&world);
        let tenant_ns = *rng.pick(&NAMESPACES);
        let peers = random_peers(&mut rng);
        let policy = CompiledPolicy::compile(tenant_ns, &peers, &[]).unwrap();
        let resolved = policy.resolve_allowed(&cluster);
        assert_aggregated(&resolved);
        for ip in candidates() {
            let got = resolved.iter().any(|n| n.contains(&ip));
            let want = oracle_allows(&world, tenant_ns, &peers, ip);
            assert_eq!(
                got, want,
                "round {round}: {ip} in ns {tenant_ns} with peers {peers:#?}\nresolved {resolved:?}"
            );
        }
    }
}

#[test]
fn denied_blocks_resolve_to_their_cidrs_minus_exceptions() {
    let mut rng = Rng(0xdead_beef_0000_0042);
    for _ in 0..300 {
        let blocks: Vec<IpBlock> = (0..1 + rng.below(3))
            .map(|_| random_block(&mut rng))
            .collect();
        let policy = CompiledPolicy::compile("ns0", &[], &blocks).unwrap();
        assert_aggregated(&policy.denied);
        for ip in candidates() {
            let want = blocks.iter().any(|b| {
                naive_in_cidr(ip, &b.cidr) && !b.except.iter().any(|e| naive_in_cidr(ip, e))
            });
            assert_eq!(
                policy.denied.iter().any(|n| n.contains(&ip)),
                want,
                "{ip} {blocks:?}"
            );
        }
    }
}

fn pod_object(ns: &str, p: &PodInfo) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(ns.into()),
            labels: Some(p.labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: p.node_name.clone(),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(
                p.ips
                    .iter()
                    .map(|ip| PodIP { ip: ip.to_string() })
                    .collect(),
            ),
            phase: Some(if p.terminated { "Failed" } else { "Running" }.into()),
            ..Default::default()
        }),
    }
}

#[test]
fn the_incremental_index_always_equals_resolution_from_scratch() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut index = Index::new("stratum-system");
    // Carried through every step: its caches against resolution from scratch.
    let mut planner = Planner::new();
    let mut tenants = Vec::new();
    for i in 0..12 {
        let ns = *rng.pick(&NAMESPACES);
        let spec = serde_json::json!({ "allowedClients": random_peers(&mut rng) });
        let tenant = TenantTimePolicy {
            metadata: ObjectMeta {
                name: Some(format!("t{i}")),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: serde_json::from_value(spec).unwrap(),
            status: None,
        };
        let _ = index.apply_tenant(&tenant);
        tenants.push((ns.to_string(), format!("t{i}")));
    }
    let world = random_world(&mut rng);
    let mut live: Vec<(String, PodInfo)> = Vec::new();
    for step in 0..600 {
        match rng.below(10) {
            0..=4 => {
                let (ns, mut pod) = world.pods[rng.below(world.pods.len() as u64) as usize].clone();
                pod.name = format!("p{}", rng.below(40));
                let _ = index.apply_pod(&pod_object(&ns, &pod));
                live.retain(|(n, p)| !(n == &ns && p.name == pod.name));
                live.push((ns, pod));
            }
            5..=7 if !live.is_empty() => {
                let (ns, pod) = live.remove(rng.below(live.len() as u64) as usize);
                let _ = index.delete_pod(&ns, &pod.name);
            }
            _ => {
                let ns = *rng.pick(&NAMESPACES);
                let labels = random_labels(
                    &mut rng,
                    &[("team", &["a", "b"]), ("env", &["prod", "dev"])],
                );
                let _ = index.apply_namespace(ns, &labels);
            }
        }
        for key in &tenants {
            let cached = planner.allowed(&index, key);
            let policy = index.tenants()[key].policy.clone().unwrap();
            assert_eq!(
                *cached,
                policy.resolve_allowed(index.cluster()),
                "step {step}, tenant {key:?}"
            );
            // The agent config's form: own blocks plus cached shared pod sets, same addresses.
            let sets = planner.tenant_sets(&index, key);
            let mut shared = sets.blocks.clone();
            for set in &sets.pod_sets {
                shared.extend(planner.pod_set(&index, set).iter().copied());
            }
            assert_eq!(
                IpNet::aggregate(&shared),
                *cached,
                "step {step}, tenant {key:?}, as shared sets"
            );
        }
    }
}
