//! The operator keeps resolved pod sets, each tenant's set list, serialized tenant and set texts
//! and the NetworkPolicy between plans. After any churn of pods, namespaces and tenants, a plan
//! on that warm index must write exactly the bytes a fresh index, fed the same objects, writes.

#![allow(clippy::unwrap_used)]

#[path = "support/scale.rs"]
mod scale;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use stratum_api::{TenantTimePolicy, TimeService};
use stratum_operator::index::Index;
use stratum_operator::plan::{Planner, TimeServicePlan};

const NAMESPACES: u64 = 6;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// The objects the watches would have delivered, by name.
#[derive(Default)]
struct World {
    namespaces: BTreeMap<String, String>,
    pods: BTreeMap<(String, String), Pod>,
    tenants: BTreeMap<(String, String), TenantTimePolicy>,
    created: i64,
}

fn pod(rng: &mut Rng, ns: &str, name: &str) -> Pod {
    let mut ips = vec![PodIP {
        ip: format!(
            "10.{}.{}.{}",
            rng.below(3),
            rng.below(4),
            rng.below(250) + 1
        ),
    }];
    if rng.below(2) == 0 {
        ips.push(PodIP {
            ip: format!("fd00::{:x}", rng.below(4000) + 1),
        });
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(
                [
                    ("app".to_string(), format!("app-{}", rng.below(3))),
                    ("vm".to_string(), (rng.below(2) == 0).to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", rng.below(3))),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(ips),
            phase: Some(
                if rng.below(10) == 0 {
                    "Succeeded"
                } else {
                    "Running"
                }
                .into(),
            ),
            ..Default::default()
        }),
    }
}

fn tenant(rng: &mut Rng, ns: &str, name: &str, created: i64) -> TenantTimePolicy {
    let team = format!("t{}", rng.below(3));
    let peers = match rng.below(6) {
        0 => json!([]),
        1 => json!([{ "podSelector": { "matchLabels": { "vm": "true" } } }]),
        2 => json!([{ "namespaceSelector": { "matchLabels": { "team": team } } }]),
        3 => json!([{ "namespaceSelector": { "matchLabels": { "team": team } },
                      "podSelector": { "matchLabels": { "app": "app-1" } } }]),
        4 => json!([{ "ipBlock": { "cidr": "192.168.0.0/16", "except": ["192.168.7.0/24"] } },
                    { "podSelector": {} }]),
        _ => {
            json!([{ "podSelector": { "matchLabels": { "app": format!("app-{}", rng.below(3)) } } },
                    { "namespaceSelector": {}, "podSelector": { "matchLabels": { "vm": "false" } } }])
        }
    };
    let rate = 1 + rng.below(3);
    TenantTimePolicy {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            uid: Some(format!("uid-{ns}-{name}-{created}")),
            creation_timestamp: Some(Time(
                Timestamp::from_second(1_700_000_000 + created).unwrap(),
            )),
            ..Default::default()
        },
        spec: serde_json::from_value(json!({
            "allowedClients": peers,
            // Two tenants of a namespace may claim one Service: the younger is refused.
            "service": { "name": format!("ntp-{}", rng.below(3)) },
            "rateLimit": { "perClient": { "interval": format!("{rate}s"), "burst": 4 } }
        }))
        .unwrap(),
        status: None,
    }
}

impl World {
    /// One random event, applied to `index` as the watch would deliver it.
    fn churn(&mut self, rng: &mut Rng, index: &mut Index) {
        let ns = format!("ns-{}", rng.below(NAMESPACES));
        match rng.below(10) {
            // Pods come, change (labels, addresses, phase) and go most often.
            0..=4 => {
                let name = format!("pod-{}", rng.below(12));
                let key = (ns.clone(), name.clone());
                if rng.below(4) == 0 {
                    if self.pods.remove(&key).is_some() {
                        let _ = index.delete_pod(&ns, &name);
                    }
                } else {
                    let p = pod(rng, &ns, &name);
                    let _ = index.apply_pod(&p);
                    self.pods.insert(key, p);
                }
            }
            5 | 6 => {
                if rng.below(5) == 0 {
                    if self.namespaces.remove(&ns).is_some() {
                        let _ = index.delete_namespace(&ns);
                    }
                } else {
                    let team = format!("t{}", rng.below(3));
                    let _ =
                        index.apply_namespace(&ns, &[("team".to_string(), team.clone())].into());
                    self.namespaces.insert(ns, team);
                }
            }
            _ => {
                let name = format!("tenant-{}", rng.below(3));
                let key = (ns.clone(), name.clone());
                if rng.below(4) == 0 {
                    if self.tenants.remove(&key).is_some() {
                        let _ = index.delete_tenant(&ns, &name);
                    }
                } else {
                    // A change keeps the object's age; a new one is the youngest.
                    let created = match self.tenants.get(&key) {
                        Some(t) => {
                            t.metadata
                                .creation_timestamp
                                .as_ref()
                                .unwrap()
                                .0
                                .as_second()
                                - 1_700_000_000
                        }
                        None => {
                            self.created += 1;
                            self.created
                        }
                    };
                    let t = tenant(rng, &ns, &name, created);
                    let _ = index.apply_tenant(&t);
                    self.tenants.insert(key, t);
                }
            }
        }
    }

    /// A fresh index holding the same objects.
    fn index(&self, ts: &TimeService) -> Index {
        let mut index = Index::new("stratum-system");
        let _ = index.apply_time_service(ts);
        for (ns, team) in &self.namespaces {
            let _ = index.apply_namespace(ns, &[("team".to_string(), team.clone())].into());
        }
        for t in self.tenants.values() {
            let _ = index.apply_tenant(t);
        }
        for p in self.pods.values() {
            let _ = index.apply_pod(p);
        }
        index
    }
}

fn written(plan: &TimeServicePlan) -> (Option<Vec<u8>>, String) {
    let bytes = plan
        .config_map
        .as_ref()
        .and_then(|cm| cm.binary_data.as_ref())
        .and_then(|d| d.values().next())
        .map(|b| b.0.clone());
    (
        bytes,
        serde_json::to_string(&*plan.network_policies).unwrap(),
    )
}

#[test]
fn a_warm_index_writes_the_same_config_as_a_fresh_one_after_any_churn() {
    let ts = scale::time_service();
    let settings = scale::settings();
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut world = World::default();
        let mut index = Index::new("stratum-system");
        let _ = index.apply_time_service(&ts);
        // Carried from plan to plan, as in the operator: its caches are what is tested.
        let mut planner = Planner::new();
        for step in 0..300 {
            world.churn(&mut rng, &mut index);
            // Plan after most events (caches carried from plan to plan), sometimes only after
            // several (invalidations that pile up between plans).
            if rng.below(3) == 0 {
                continue;
            }
            let warm = planner.plan_time_service(&index, &ts, &settings).unwrap();
            let fresh = Planner::new()
                .plan_time_service(&world.index(&ts), &ts, &settings)
                .unwrap();
            assert_eq!(warm.config, fresh.config, "seed {seed}, step {step}");
            assert_eq!(
                written(&warm),
                written(&fresh),
                "seed {seed}, step {step}: written bytes differ"
            );
        }
        assert!(
            !world.tenants.is_empty() && !world.pods.is_empty(),
            "the churn must leave something to serve"
        );
    }
}
