//! The index reconciles exactly what an event affects: nothing for unrelated pods or clock
//! heartbeats, the selecting tenants and their TimeService for a selected pod, and no
//! feedback loop from the operator's own status writes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use stratum_api::tenant_time_policy::TenantTimePolicyStatus;
use stratum_api::{NodeClock, NodeClockSpec, NodeClockStatus, TenantTimePolicy, TimeService};
use stratum_operator::index::{Index, Unserved};
use stratum_operator::model::NodeInfo;
use stratum_operator::plan::Planner;
use stratum_operator::selector::Labels;

fn ts(name: &str, created: i64, selector: Value) -> TimeService {
    let mut ts = TimeService::new(
        name,
        serde_json::from_value(
            json!({ "upstreams": [{ "host": "pool.ntp.org" }], "placement": { "nodeSelector": selector } }),
        )
        .unwrap(),
    );
    ts.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
    ts
}

fn tenant(ns: &str, name: &str, spec: Value) -> TenantTimePolicy {
    TenantTimePolicy {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            creation_timestamp: Some(Time(Timestamp::from_second(1_700_000_000).unwrap())),
            ..Default::default()
        },
        spec: serde_json::from_value(spec).unwrap(),
        status: None,
    }
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(serde_json::from_value(labels).unwrap()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("n1".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

fn clock(node: &str, synced: bool, dispersion_ms: i64, offset: i64) -> NodeClock {
    let mut c = NodeClock::new(
        node,
        NodeClockSpec {
            time_service: "cluster".into(),
        },
    );
    c.status = Some(NodeClockStatus {
        synchronized: synced,
        root_dispersion_nanos: dispersion_ms * 1_000_000,
        offset_nanos: offset,
        stratum: 3,
        ..Default::default()
    });
    c
}

fn node(labels: Value) -> NodeInfo {
    NodeInfo::from(serde_json::from_value::<Labels>(labels).unwrap())
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.into(), name.into())
}

fn setup() -> Index {
    let mut index = Index::new("stratum-system");
    let _ = index.apply_time_service(&ts("cluster", 1, json!({})));
    let _ = index.apply_tenant(&tenant(
        "vms",
        "t",
        json!({ "allowedClients": [{ "podSelector": { "matchLabels": { "app": "vm" } } }] }),
    ));
    let _ = index.apply_tenant(&tenant(
        "other",
        "t",
        json!({ "requirements": { "maxRootDistance": "50ms" } }),
    ));
    index
}

#[test]
fn a_pod_no_tenant_selects_triggers_nothing() {
    let mut index = setup();
    assert!(
        index
            .apply_pod(&pod("vms", "web", json!({ "app": "web" }), "10.0.0.9"))
            .is_empty()
    );
    assert!(
        index
            .apply_pod(&pod("elsewhere", "vm", json!({ "app": "vm" }), "10.0.0.8"))
            .is_empty()
    );
}

#[test]
fn a_selected_pod_triggers_its_tenant_and_time_service_once() {
    let mut index = setup();
    // Asked before the pod exists, so its cache has to learn of the pod from the index.
    let mut planner = Planner::new();
    assert!(planner.allowed(&index, &key("vms", "t")).is_empty());
    let t = index.apply_pod(&pod("vms", "vm-1", json!({ "app": "vm" }), "10.0.0.1"));
    assert_eq!(t.tenants, BTreeSet::from([key("vms", "t")]));
    assert_eq!(t.time_services, BTreeSet::from(["cluster".to_string()]));
    assert_eq!(planner.allowed(&index, &key("vms", "t")).len(), 1);
    // The same pod again (say, a status-only update) changes nothing.
    assert!(
        index
            .apply_pod(&pod("vms", "vm-1", json!({ "app": "vm" }), "10.0.0.1"))
            .is_empty()
    );
    let t = index.delete_pod("vms", "vm-1");
    assert_eq!(t.tenants, BTreeSet::from([key("vms", "t")]));
    assert!(planner.allowed(&index, &key("vms", "t")).is_empty());
}

#[test]
fn clock_heartbeats_trigger_nothing_and_crossing_a_requirement_triggers_only_that_tenant() {
    let mut index = setup();
    let first = index.apply_clock(&clock("n1", true, 10, 5));
    assert!(first.time_services.contains("cluster"));
    // Offset drifts, nothing else: no reconcile until the periodic resync.
    assert!(index.apply_clock(&clock("n1", true, 10, 7)).is_empty());
    // Root distance crosses "other"'s 50 ms requirement but not "vms" (no requirement).
    let crossed = index.apply_clock(&clock("n1", true, 80, 7));
    assert_eq!(crossed.tenants, BTreeSet::from([key("other", "t")]));
    assert!(crossed.time_services.is_empty());
}

#[test]
fn the_operators_own_status_port_write_does_not_retrigger_the_tenant() {
    let mut index = setup();
    let port = index.ports_of("cluster")[&key("vms", "t")].unwrap();
    let mut written = tenant(
        "vms",
        "t",
        json!({ "allowedClients": [{ "podSelector": { "matchLabels": { "app": "vm" } } }] }),
    );
    written.status = Some(TenantTimePolicyStatus {
        port: Some(i32::from(port)),
        ..Default::default()
    });
    assert!(index.apply_tenant(&written).is_empty());
}

#[test]
fn a_tenant_without_a_reference_needs_exactly_one_time_service() {
    let mut index = setup();
    let entry = index.tenants()[&key("vms", "t")].clone();
    assert_eq!(index.time_service_of(&entry).unwrap().name, "cluster");
    let t = index.apply_time_service(&ts("second", 2, json!({ "pool": "b" })));
    assert!(
        t.tenants.contains(&key("vms", "t")),
        "the tenant lost its TimeService and must say so"
    );
    assert_eq!(
        index.time_service_of(&entry).unwrap_err(),
        Unserved::Ambiguous
    );
}

#[test]
fn conflicts_go_to_the_younger_overlapping_time_service_and_chains_resolve_by_age() {
    let mut index = Index::new("stratum-system");
    for (name, labels) in [
        ("n1", json!({ "a": "1", "kubernetes.io/os": "linux" })),
        (
            "n2",
            json!({ "a": "1", "b": "1", "kubernetes.io/os": "linux" }),
        ),
        ("n3", json!({ "b": "1", "kubernetes.io/os": "linux" })),
        // Agents never run here, so it is no overlap.
        (
            "w1",
            json!({ "c": "1", "d": "1", "kubernetes.io/os": "windows" }),
        ),
    ] {
        let _ = index.apply_node(name, &node(labels));
    }
    let _ = index.apply_time_service(&ts("oldest", 1, json!({ "a": "1" })));
    let _ = index.apply_time_service(&ts("middle", 2, json!({ "b": "1" })));
    let _ = index.apply_time_service(&ts("youngest", 3, json!({ "c": "1" })));
    let _ = index.apply_time_service(&ts("youngest-too", 4, json!({ "d": "1" })));
    let conflicts = index.conflicts();
    assert_eq!(
        conflicts.get("middle").map(String::as_str),
        Some("oldest"),
        "n2 is shared"
    );
    assert!(!conflicts.contains_key("oldest"));
    assert!(
        !conflicts.contains_key("youngest") && !conflicts.contains_key("youngest-too"),
        "selecting no Linux node overlaps nothing"
    );
    // Removing the overlap (n2 loses label a) lifts the conflict.
    let _ = index.apply_node(
        "n2",
        &node(json!({ "b": "1", "kubernetes.io/os": "linux" })),
    );
    assert!(index.conflicts().is_empty());
}

#[test]
fn a_taint_change_triggers_every_time_service_and_a_status_heartbeat_nothing() {
    use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, Taint};

    let mut index = setup();
    let node = |taints: Vec<Taint>, heartbeat: i64| Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            labels: Some([("kubernetes.io/os".to_string(), "linux".to_string())].into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(taints),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_heartbeat_time: Some(Time(Timestamp::from_second(heartbeat).unwrap())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    };
    let taint = |effect: &str, added: i64| Taint {
        key: "dedicated".into(),
        value: Some("db".into()),
        effect: effect.into(),
        time_added: Some(Time(Timestamp::from_second(added).unwrap())),
    };
    let cluster: BTreeSet<String> = ["cluster".to_string()].into();
    let apply = |index: &mut Index, n: &Node| index.apply_node("n1", &NodeInfo::from_node(n));
    assert_eq!(apply(&mut index, &node(vec![], 1)).time_services, cluster);
    assert!(
        apply(&mut index, &node(vec![], 2)).is_empty(),
        "a heartbeat changes neither labels nor taints"
    );
    assert!(
        apply(&mut index, &node(vec![taint("PreferNoSchedule", 3)], 3)).is_empty(),
        "PreferNoSchedule keeps no daemon pod off a node"
    );
    assert_eq!(
        apply(&mut index, &node(vec![taint("NoExecute", 4)], 4)).time_services,
        cluster
    );
    assert!(
        apply(&mut index, &node(vec![taint("NoExecute", 5)], 5)).is_empty(),
        "timeAdded is not placement"
    );
}
