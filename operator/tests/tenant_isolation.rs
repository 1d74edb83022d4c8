//! One tenant can never hurt another. Random sequences of tenant, pod and namespace events,
//! with tenants that are invalid in every way the operator knows (values the agents refuse,
//! prefix explosions, unknown time zones, broken selectors, NTS without its certificate Secret),
//! among valid ones with NTS, symmetric keys or both, are
//! fed to two indexes: one gets every event, the other the same run with the invalid tenants
//! removed. Every valid tenant's output (its agent-config entry and allow list, its port, its
//! Service, EndpointSlices and time-config) and everything shared (the agent config, the
//! NetworkPolicy, the TimeService's health) must be the same in both, and each invalid tenant
//! is refused alone, naming what is wrong. At the end the warm index plans exactly what a fresh
//! index fed the final objects plans.

#![allow(clippy::unwrap_used)]

#[path = "support/scale.rs"]
mod scale;

#[path = "support/rng.rs"]
mod rng;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use rng::Rng;
use serde_json::{Value, json};
use stratum_api::agent_config::TenantConfig;
use stratum_api::{AgentConfig, NodeClock, NodeClockSpec, NodeClockStatus, TenantTimePolicy};
use stratum_operator::index::Index;
use stratum_operator::model::NodeInfo;
use stratum_operator::plan::{Planner, TenantPlan, TimeServicePlan};
use stratum_operator::selector::Labels;

const NAMESPACES: u64 = 5;
const OPERATOR_NS: &str = "stratum-system";

/// Ways a tenant is invalid, each with the refusal reason and a part of the message that must
/// name what is wrong.
fn invalid_spec(kind: u64, rng: &mut Rng) -> (Value, &'static str, &'static str) {
    let service = json!({ "name": format!("ntp-{}", rng.below(3)) });
    match kind % 8 {
        0 => (
            json!({ "service": service, "rateLimit": { "perClient": { "interval": "0s" } } }),
            "InvalidSpec",
            "spec.rateLimit.perClient.interval: must be at least 1ms",
        ),
        1 => (
            json!({ "service": service, "requirements": { "maxRootDistance": "0s" } }),
            "InvalidSpec",
            "spec.requirements.maxRootDistance: must be at least 1ms",
        ),
        2 => {
            let block = |i: u64| {
                json!({ "ipBlock": {
                    "cidr": format!("fd{i:02x}::/16"),
                    "except": (1..=64).map(|j| format!("fd{i:02x}:{j:x}::1/128")).collect::<Vec<_>>()
                } })
            };
            (
                json!({ "service": service, "allowedClients": [block(1), block(2)] }),
                "TooManyPrefixes",
                "spec.allowedClients[1].ipBlock",
            )
        }
        3 => (
            json!({ "service": service, "timezone": "Mars/Olympus_Mons" }),
            "InvalidTimezone",
            "spec.timezone",
        ),
        4 => (
            json!({ "service": service, "allowedClients": [{ "podSelector": { "matchExpressions": [
                { "key": "app", "operator": "Near", "values": ["x"] }] } }] }),
            "InvalidClients",
            "spec.allowedClients[0].podSelector",
        ),
        5 => (
            json!({ "service": service, "authentication": { "nts": true } }),
            "InvalidSpec",
            "spec.authentication.ntsCertificateSecret",
        ),
        6 => (
            json!({ "service": service, "rateLimit": { "perClient": { "burst": -3 } } }),
            "InvalidSpec",
            "spec.rateLimit.perClient.burst: must be at least 1",
        ),
        _ => (
            json!({ "service": service, "rateLimit": { "perClient": { "interval": "500us" } },
                    "requirements": { "maxRootDistance": "10us" } }),
            "InvalidSpec",
            "spec.rateLimit.perClient.interval: must be at least 1ms; spec.requirements.maxRootDistance",
        ),
    }
}

fn valid_spec(rng: &mut Rng) -> Value {
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
            json!([{ "podSelector": { "matchLabels": { "app": format!("app-{}", rng.below(3)) } } }])
        }
    };
    let mut spec = json!({
        "allowedClients": peers,
        "service": { "name": format!("ntp-{}", rng.below(3)) },
        "rateLimit": { "perClient": { "interval": format!("{}s", 1 + rng.below(3)), "burst": 4 } },
        "timezone": "Europe/Berlin",
    });
    if rng.chance(40) {
        spec["requirements"] = json!({ "maxRootDistance": format!("{}ms", 5 + 10 * rng.below(3)) });
    }
    if rng.chance(30) {
        let unauthenticated = ["Serve", "Deny", "Ignore"][rng.below(3) as usize];
        spec["authentication"] = json!({ "nts": true, "ntsCertificateSecret": "ntp-tls",
                                         "unauthenticated": unauthenticated });
    }
    if rng.chance(20) {
        spec["authentication"]["symmetricKeysSecret"] = json!("device-keys");
    }
    spec
}

fn tenant(ns: &str, name: &str, created: i64, spec: Value) -> TenantTimePolicy {
    TenantTimePolicy {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            uid: Some(format!("uid-{ns}-{name}")),
            creation_timestamp: Some(Time(
                Timestamp::from_second(1_700_000_000 + created).unwrap(),
            )),
            ..Default::default()
        },
        spec: serde_json::from_value(spec).unwrap(),
        status: None,
    }
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
    if rng.chance(50) {
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
                    ("vm".to_string(), rng.chance(50).to_string()),
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
                if rng.chance(10) {
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

/// The agents of the TimeService: one per node, ready, with clocks of different quality so
/// that tenants' requirements split them.
fn agents(index: &mut Index) {
    for n in 0..3 {
        let node = format!("node-{n}");
        let labels = [("zone".to_string(), format!("z{n}"))];
        let _ = index.apply_node(&node, &NodeInfo::from(Labels::from(labels)));
        let _ = index.apply_pod(&Pod {
            metadata: ObjectMeta {
                name: Some(format!("agent-{n}")),
                namespace: Some(OPERATOR_NS.into()),
                labels: Some(stratum_operator::names::agent_labels("cluster")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.clone()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(vec![PodIP {
                    ip: format!("10.99.0.{}", n + 1),
                }]),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        });
        let mut clock = NodeClock::new(
            &node,
            NodeClockSpec {
                time_service: "cluster".into(),
            },
        );
        clock.status = Some(NodeClockStatus {
            synchronized: true,
            root_dispersion_nanos: (3 + 10 * n) * 1_000_000,
            stratum: 3,
            ..Default::default()
        });
        let _ = index.apply_clock(&clock);
    }
}

/// The objects the watches delivered, by name; `valid` holds the keys whose current spec is
/// valid (what the second index has).
#[derive(Default)]
struct World {
    namespaces: BTreeMap<String, String>,
    pods: BTreeMap<(String, String), Pod>,
    tenants: BTreeMap<(String, String), TenantTimePolicy>,
    /// Expected refusal (reason, message part) of each invalid tenant.
    invalid: BTreeMap<(String, String), (&'static str, &'static str)>,
    created: i64,
}

impl World {
    /// One random event, given to `all` and, unless it concerns an invalid tenant, to `valid`
    /// (an invalid tenant is absent there: a change to invalid deletes it).
    fn churn(&mut self, rng: &mut Rng, all: &mut Index, valid: &mut Index) {
        let ns = format!("ns-{}", rng.below(NAMESPACES));
        match rng.below(10) {
            0..=3 => {
                let name = format!("pod-{}", rng.below(10));
                let key = (ns.clone(), name.clone());
                if rng.chance(25) {
                    if self.pods.remove(&key).is_some() {
                        let _ = all.delete_pod(&ns, &name);
                        let _ = valid.delete_pod(&ns, &name);
                    }
                } else {
                    let p = pod(rng, &ns, &name);
                    let _ = all.apply_pod(&p);
                    let _ = valid.apply_pod(&p);
                    self.pods.insert(key, p);
                }
            }
            4 => {
                if rng.chance(20) {
                    if self.namespaces.remove(&ns).is_some() {
                        let _ = all.delete_namespace(&ns);
                        let _ = valid.delete_namespace(&ns);
                    }
                } else {
                    let team = format!("t{}", rng.below(3));
                    let labels = [("team".to_string(), team.clone())].into();
                    let _ = all.apply_namespace(&ns, &labels);
                    let _ = valid.apply_namespace(&ns, &labels);
                    self.namespaces.insert(ns, team);
                }
            }
            _ => {
                let name = format!("tenant-{}", rng.below(4));
                let key = (ns.clone(), name.clone());
                if rng.chance(20) {
                    if self.tenants.remove(&key).is_some() {
                        let _ = all.delete_tenant(&ns, &name);
                        let _ = valid.delete_tenant(&ns, &name);
                        self.invalid.remove(&key);
                    }
                    return;
                }
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
                let t = if rng.chance(35) {
                    let (spec, reason, message) = invalid_spec(rng.below(8), rng);
                    self.invalid.insert(key.clone(), (reason, message));
                    let t = tenant(&ns, &name, created, spec);
                    let _ = valid.delete_tenant(&ns, &name);
                    t
                } else {
                    self.invalid.remove(&key);
                    let t = tenant(&ns, &name, created, valid_spec(rng));
                    let _ = valid.apply_tenant(&t);
                    t
                };
                let _ = all.apply_tenant(&t);
                self.tenants.insert(key, t);
            }
        }
    }

    /// A fresh index holding every object.
    fn fresh(&self) -> Index {
        let mut index = Index::new(OPERATOR_NS);
        let _ = index.apply_time_service(&scale::time_service());
        agents(&mut index);
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

/// A tenant's entry with its shared sets resolved into its allow list: what the agents serve
/// it, independent of how the document numbers the sets.
fn served_entries(config: &AgentConfig) -> BTreeMap<String, TenantConfig> {
    config
        .serving
        .tenants
        .iter()
        .map(|t| {
            let mut entry = t.clone();
            entry.allowed = AgentConfig::tenant_allowed(&config.serving, t);
            entry.allowed_sets.clear();
            (t.id.clone(), entry)
        })
        .collect()
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

/// Everything a tenant reconcile would apply and report, comparable.
fn tenant_output(plan: &TenantPlan) -> String {
    serde_json::to_string(&json!({
        "refused": plan.refused.as_ref().map(|(r, m)| format!("{r}: {m}")),
        "timeService": plan.time_service,
        "port": plan.port,
        "service": plan.service,
        "slices": plan.slices,
        "timeConfig": plan.time_config,
        "ready": plan.ready_endpoints,
        "allowed": plan.allow_list_size,
    }))
    .unwrap()
}

#[test]
fn no_valid_tenants_output_depends_on_another_tenants_validity() {
    let ts = scale::time_service();
    let settings = scale::settings();
    let mut refusals_seen = BTreeMap::new();
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut world = World::default();
        let mut all = Index::new(OPERATOR_NS);
        let mut valid = Index::new(OPERATOR_NS);
        // One planner per index, carried through the run: warm caches are what is tested.
        let (mut plans_all, mut plans_valid) = (Planner::new(), Planner::new());
        for index in [&mut all, &mut valid] {
            let _ = index.apply_time_service(&ts);
            agents(index);
        }
        for step in 0..200 {
            world.churn(&mut rng, &mut all, &mut valid);
            if rng.chance(40) {
                continue;
            }
            let at = format!("seed {seed}, step {step}");
            let with = plans_all.plan_time_service(&all, &ts, &settings).unwrap();
            let without = plans_valid
                .plan_time_service(&valid, &ts, &settings)
                .unwrap();
            assert_eq!(
                with.blocked, None,
                "{at}: tenants never degrade the TimeService"
            );
            assert_eq!(without.blocked, None, "{at}");
            let (with_config, without_config) = (
                with.config.as_ref().unwrap(),
                without.config.as_ref().unwrap(),
            );
            assert_eq!(
                served_entries(with_config),
                served_entries(without_config),
                "{at}: the valid tenants' entries and allow lists"
            );
            assert_eq!(with_config, without_config, "{at}: the whole agent config");
            assert_eq!(written(&with), written(&without), "{at}: written bytes");
            for (key, t) in &world.tenants {
                let with_plan = plans_all.plan_tenant(&all, t).unwrap();
                match world.invalid.get(key) {
                    Some((reason, message)) => {
                        let (got, why) = with_plan.refused.as_ref().unwrap();
                        assert_eq!(got, reason, "{at}: {key:?}: {why}");
                        assert!(why.contains(message), "{at}: {key:?}: {why}");
                        assert!(with_plan.service.is_none() && with_plan.slices.is_empty());
                        assert!(with_plan.port.is_none(), "{at}: {key:?} holds no port");
                        *refusals_seen.entry(*reason).or_insert(0) += 1;
                    }
                    None => {
                        let without_plan = plans_valid.plan_tenant(&valid, t).unwrap();
                        assert_eq!(
                            tenant_output(&with_plan),
                            tenant_output(&without_plan),
                            "{at}: {key:?}"
                        );
                    }
                }
            }
        }
        // The warm index plans what a fresh one does.
        let fresh = world.fresh();
        let mut plans_fresh = Planner::new();
        let warm_plan = plans_all.plan_time_service(&all, &ts, &settings).unwrap();
        let fresh_plan = plans_fresh
            .plan_time_service(&fresh, &ts, &settings)
            .unwrap();
        assert_eq!(warm_plan.config, fresh_plan.config, "seed {seed}");
        assert_eq!(written(&warm_plan), written(&fresh_plan), "seed {seed}");
        for t in world.tenants.values() {
            assert_eq!(
                tenant_output(&plans_all.plan_tenant(&all, t).unwrap()),
                tenant_output(&plans_fresh.plan_tenant(&fresh, t).unwrap()),
                "seed {seed}"
            );
        }
        assert!(
            world.tenants.len() > world.invalid.len(),
            "seed {seed}: the run must end with valid tenants to compare"
        );
    }
    // Every kind of invalid tenant was met, many times.
    for reason in [
        "InvalidSpec",
        "TooManyPrefixes",
        "InvalidTimezone",
        "InvalidClients",
    ] {
        assert!(
            refusals_seen.get(reason).copied().unwrap_or(0) > 10,
            "{reason}: {refusals_seen:?}"
        );
    }
}

#[test]
fn a_tenant_in_a_closed_namespace_is_refused_alone_and_holds_nothing() {
    let ts = scale::time_service();
    let settings = scale::settings();
    let mut index =
        Index::new(OPERATOR_NS).with_closed_namespaces(["kube-system".to_string(), String::new()]);
    let _ = index.apply_time_service(&ts);
    agents(&mut index);
    let closed = tenant("kube-system", "ntp", 0, json!({}));
    let open = tenant("team-a", "ntp", 1, json!({}));
    let _ = index.apply_tenant(&closed);
    let _ = index.apply_tenant(&open);

    let mut planner = Planner::new();
    let refused = planner.plan_tenant(&index, &closed).unwrap();
    let (reason, why) = refused.refused.as_ref().unwrap();
    assert_eq!(*reason, "NamespaceClosed");
    assert!(why.contains("\"kube-system\""), "{why}");
    assert!(refused.port.is_none() && refused.service.is_none() && refused.slices.is_empty());
    assert!(refused.time_config.is_none());

    let served = planner.plan_tenant(&index, &open).unwrap();
    assert_eq!(served.refused, None);
    let plan = planner.plan_time_service(&index, &ts, &settings).unwrap();
    assert_eq!(plan.blocked, None);
    let ids: Vec<_> = plan
        .config
        .as_ref()
        .unwrap()
        .serving
        .tenants
        .iter()
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "only the open namespace's tenant is served: {ids:?}"
    );
    // An empty name (what an empty chart list renders) closes nothing.
    assert!(!index.namespace_closed(""));
}
