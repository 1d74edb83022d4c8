//! What a tenant's plan may touch and what it must take away: every child is labelled as
//! Stratum's; a refused, unserved or renamed tenant's children the plan no longer has are
//! pruned; an object of the chosen name that Stratum did not create is never applied over
//! (a `Conflict`); endpoints are ready only while the agent pod is Ready and not terminating
//! and its NodeClock is fresh, measured on an injected monotonic clock (no sleeps); and the
//! NodeClock of a Node gone longer than the grace is collected.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ManagedFieldsEntry, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use stratum_api::{NodeClock, NodeClockSpec, NodeClockStatus, TenantTimePolicy, TimeService};
use stratum_operator::build::OperatorSettings;
use stratum_operator::clock::MonotonicClock;
use stratum_operator::freshness::{NODE_GONE_GRACE, freshness_bound};
use stratum_operator::index::Index;
use stratum_operator::names;
use stratum_operator::owned::ChildKind;
use stratum_operator::plan::{Planner, TenantPlan};

const NS: &str = "stratum-system";
/// The shared TimeService's heartbeat (`reporting.interval`).
const HEARTBEAT: Duration = Duration::from_secs(10);

fn time_service() -> TimeService {
    let mut ts = TimeService::new(
        "cluster",
        serde_json::from_value(json!({
            "upstreams": [{ "host": "pool.ntp.org" }],
            "reporting": { "interval": "10s" }
        }))
        .unwrap(),
    );
    ts.metadata.uid = Some("uid-cluster".into());
    ts.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
    ts
}

fn tenant(ns: &str, name: &str, spec: Value) -> TenantTimePolicy {
    TenantTimePolicy {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(format!("uid-{ns}-{name}")),
            creation_timestamp: Some(Time(Timestamp::from_second(1_700_000_000).unwrap())),
            ..Default::default()
        },
        spec: serde_json::from_value(spec).unwrap(),
        status: None,
    }
}

fn agent_pod(node: &str, ip: &str, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("cluster-agent-{node}")),
            namespace: Some(NS.into()),
            labels: Some(names::agent_labels("cluster")),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A NodeClock as its agent writes it; `written` is its `lastUpdate` (seconds).
fn node_clock(node: &str, written: i64) -> NodeClock {
    let mut c = NodeClock::new(
        node,
        NodeClockSpec {
            time_service: "cluster".into(),
        },
    );
    c.metadata.uid = Some(format!("uid-clock-{node}"));
    c.status = Some(NodeClockStatus {
        synchronized: true,
        stratum: 3,
        last_update: Some(Time(
            Timestamp::from_second(1_700_000_000 + written).unwrap(),
        )),
        ..Default::default()
    });
    c
}

/// Metadata of an existing object: Stratum's (labelled for `tenant`) or a user's.
fn object(ns: &str, name: &str, stratums_tenant: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: Some(format!("uid-{ns}-{name}")),
        labels: stratums_tenant.map(|t| names::tenant_labels("cluster", t)),
        ..Default::default()
    }
}

/// What a tenant's first reconcile would have left behind, as the watches report it.
fn applied_children(index: &mut Index, ns: &str, tenant: &str, service: &str) {
    let _ = index.apply_child(ChildKind::Service, &object(ns, service, Some(tenant)));
    for family in ["ipv4", "ipv6"] {
        let _ = index.apply_child(
            ChildKind::EndpointSlice,
            &object(ns, &format!("{service}-stratum-{family}"), Some(tenant)),
        );
    }
    let _ = index.apply_child(
        ChildKind::ConfigMap,
        &object(ns, names::TIME_CONFIG_NAME, Some(tenant)),
    );
}

fn setup() -> (Index, MonotonicClock) {
    let clock = MonotonicClock::manual();
    let mut index = Index::with_clock(NS, clock.clone());
    let _ = index.apply_time_service(&time_service());
    for (node, ip) in [("n1", "10.0.0.1"), ("n2", "10.0.0.2")] {
        let _ = index.apply_node(node, &Default::default());
        let _ = index.apply_pod(&agent_pod(node, ip, true));
        let _ = index.apply_clock(&node_clock(node, 0));
    }
    (index, clock)
}

fn pruned(plan: &TenantPlan) -> Vec<String> {
    plan.prune.iter().map(ToString::to_string).collect()
}

#[test]
fn every_child_carries_stratums_labels_and_an_owner_reference() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    let tenant_plan = planner.plan_tenant(&index, &t).unwrap();
    let settings = OperatorSettings {
        namespace: NS.into(),
        agent_image: "stratum/agent:test".into(),
        agent_cluster_role: "stratum-agent".into(),
        agent_priority_class: "system-node-critical".into(),
        agent_image_pull_secrets: Vec::new(),
    };
    let ts_plan = planner
        .plan_time_service(&index, &time_service(), &settings)
        .unwrap();

    let mut metas: Vec<(&ObjectMeta, Option<&str>)> = vec![
        (&ts_plan.daemonset.as_ref().unwrap().metadata, None),
        (&ts_plan.rbac.service_account.metadata, None),
        (&ts_plan.rbac.role.metadata, None),
        (&ts_plan.rbac.role_binding.metadata, None),
        (&ts_plan.config_map.as_ref().unwrap().metadata, None),
        (&tenant_plan.service.as_ref().unwrap().metadata, Some("t")),
        (
            &tenant_plan.time_config.as_ref().unwrap().metadata,
            Some("t"),
        ),
    ];
    assert!(!ts_plan.network_policies.is_empty());
    metas.extend(ts_plan.network_policies.iter().map(|p| (&p.metadata, None)));
    metas.extend(tenant_plan.slices.iter().map(|s| (&s.metadata, Some("t"))));
    assert_eq!(
        metas.len(),
        7 + ts_plan.network_policies.len() + tenant_plan.slices.len()
    );
    // The agents' ClusterRoleBinding is the chart's: the operator sets only its subjects and
    // claims it with no label (see build::rbac).
    assert_eq!(ts_plan.rbac.cluster_role_binding.metadata.labels, None);
    for (meta, tenant) in metas {
        let labels = meta.labels.as_ref().unwrap();
        let what = meta.name.clone().unwrap();
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], "stratum-operator",
            "{what}"
        );
        assert_eq!(labels["stratum.io/time-service"], "cluster", "{what}");
        assert_eq!(
            labels.get("stratum.io/tenant").map(String::as_str),
            tenant,
            "{what}"
        );
        let owner: &OwnerReference = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.api_version, "stratum.io/v1alpha1", "{what}");
        assert_eq!(owner.controller, Some(true), "{what}");
        assert!(
            stratum_operator::owned::is_stratums(meta),
            "{what} is recognised as Stratum's"
        );
    }
}

#[test]
fn a_served_tenant_prunes_nothing_it_applies() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    applied_children(&mut index, "vms", "t", "ntp");
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert!(plan.refused.is_none());
    assert_eq!(plan.children().len(), 4);
    assert!(plan.prune.is_empty(), "{:?}", pruned(&plan));
}

#[test]
fn a_refused_tenant_keeps_no_service_slices_or_time_config() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    applied_children(&mut index, "vms", "t", "ntp");
    let refused = tenant("vms", "t", json!({ "timezone": "Europe/Atlantis" }));
    let _ = index.apply_tenant(&refused);
    let plan = planner.plan_tenant(&index, &refused).unwrap();
    assert_eq!(plan.refused.as_ref().unwrap().0, "InvalidTimezone");
    assert_eq!(
        pruned(&plan),
        [
            "Service vms/ntp",
            "EndpointSlice vms/ntp-stratum-ipv4",
            "EndpointSlice vms/ntp-stratum-ipv6",
            "ConfigMap vms/time-config",
        ]
    );
    assert_eq!(
        plan.prune[0].uid.as_deref(),
        Some("uid-vms-ntp"),
        "deletes carry the uid seen as a precondition"
    );
}

#[test]
fn a_tenant_that_loses_its_time_service_keeps_nothing() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    applied_children(&mut index, "vms", "t", "ntp");
    let triggers = index.delete_time_service("cluster");
    assert!(triggers.tenants.contains(&("vms".into(), "t".into())));
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert_eq!(plan.refused.as_ref().unwrap().0, "NoTimeService");
    assert_eq!(plan.prune.len(), 4, "{:?}", pruned(&plan));
}

#[test]
fn renaming_the_service_leaves_no_orphan_service_or_slices() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    applied_children(&mut index, "vms", "t", "ntp");
    let renamed = tenant("vms", "t", json!({ "service": { "name": "time" } }));
    let _ = index.apply_tenant(&renamed);
    let plan = planner.plan_tenant(&index, &renamed).unwrap();
    assert!(plan.refused.is_none());
    assert_eq!(
        plan.children(),
        BTreeSet::from([
            (ChildKind::Service, "time".to_owned()),
            (ChildKind::EndpointSlice, "time-stratum-ipv4".to_owned()),
            (ChildKind::EndpointSlice, "time-stratum-ipv6".to_owned()),
            (ChildKind::ConfigMap, "time-config".to_owned()),
        ])
    );
    assert_eq!(
        pruned(&plan),
        [
            "Service vms/ntp",
            "EndpointSlice vms/ntp-stratum-ipv4",
            "EndpointSlice vms/ntp-stratum-ipv6",
        ]
    );
}

#[test]
fn a_users_service_of_the_tenants_name_is_a_conflict_and_never_touched() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    // The user's Service exists first; the tenant's own children (from before the clash, under
    // another name) must go, the user's Service must not.
    let _ = index.apply_child(ChildKind::Service, &object("vms", "ntp", None));
    applied_children(&mut index, "vms", "t", "old");
    let t = tenant("vms", "t", json!({}));
    let triggers = index.apply_tenant(&t);
    assert!(triggers.tenants.contains(&("vms".into(), "t".into())));
    let plan = planner.plan_tenant(&index, &t).unwrap();
    let (reason, message) = plan.refused.clone().unwrap();
    assert_eq!(reason, "ServiceConflict");
    assert!(message.contains("Service vms/ntp"), "{message}");
    assert_eq!(
        plan.conflict.as_ref().map(ToString::to_string).as_deref(),
        Some("Service vms/ntp")
    );
    assert!(plan.service.is_none() && plan.slices.is_empty() && plan.time_config.is_none());
    assert!(
        plan.children().is_empty(),
        "nothing routes to the user's Service"
    );
    assert_eq!(
        pruned(&plan),
        [
            "Service vms/old",
            "EndpointSlice vms/old-stratum-ipv4",
            "EndpointSlice vms/old-stratum-ipv6",
            "ConfigMap vms/time-config",
        ],
        "only Stratum's own children of this tenant go"
    );

    // The user deletes their Service: the tenant is reconciled and takes the name.
    let triggers = index.delete_child(ChildKind::Service, "vms", "ntp");
    assert!(triggers.tenants.contains(&("vms".into(), "t".into())));
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert!(plan.refused.is_none() && plan.conflict.is_none());
    assert!(plan.service.is_some());
}

#[test]
fn a_users_time_config_is_a_conflict_but_the_tenant_is_still_served() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let _ = index.apply_child(
        ChildKind::ConfigMap,
        &object("vms", names::TIME_CONFIG_NAME, None),
    );
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert!(plan.refused.is_none());
    assert_eq!(
        plan.conflict.as_ref().map(ToString::to_string).as_deref(),
        Some("ConfigMap vms/time-config")
    );
    assert!(
        plan.time_config.is_none(),
        "the user's ConfigMap is left alone"
    );
    assert!(plan.service.is_some());
    assert!(plan.prune.is_empty());
}

#[test]
fn an_agent_that_stops_renewing_its_node_clock_leaves_the_ready_set_at_the_bound() {
    let (mut index, clock) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    let bound = freshness_bound(HEARTBEAT);
    assert_eq!(bound, Duration::from_secs(35));
    assert_eq!(planner.plan_tenant(&index, &t).unwrap().ready_endpoints, 2);

    // n1's agent keeps its heartbeat; n2's is stopped. Nothing else happens.
    let mut written = 0;
    let mut stale_after = None;
    let mut sweeps_with_triggers = 0;
    for step in 1..=20u64 {
        clock.advance(Duration::from_secs(5));
        if step % 2 == 0 {
            written += 10;
            assert!(
                index.apply_clock(&node_clock("n1", written)).is_empty(),
                "a heartbeat of a fresh clock reconciles nothing"
            );
        }
        let sweep = index.sweep();
        if !sweep.triggers.is_empty() {
            sweeps_with_triggers += 1;
            assert!(sweep.triggers.tenants.contains(&("vms".into(), "t".into())));
            assert!(sweep.triggers.time_services.contains("cluster"));
            stale_after.get_or_insert(step * 5);
        }
        if stale_after.is_none() {
            // The sweep asks to be woken no later than n2's expiry.
            let next = sweep.next.unwrap();
            assert!(next <= clock.now() + bound);
        }
    }
    assert_eq!(
        stale_after,
        Some(35),
        "stale exactly at the bound, not a heartbeat later"
    );
    assert_eq!(sweeps_with_triggers, 1, "an expiry triggers once");
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert_eq!(plan.ready_endpoints, 1);
    let v4 = &plan.slices[0];
    let n2 = v4
        .endpoints
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.node_name.as_deref() == Some("n2"))
        .unwrap();
    let c = n2.conditions.clone().unwrap();
    assert_eq!(
        (c.ready, c.serving, c.terminating),
        (Some(false), Some(false), Some(false))
    );

    // The stopped agent resumes: its next write renews it and reconciles the tenant.
    let triggers = index.apply_clock(&node_clock("n2", 999));
    assert!(triggers.tenants.contains(&("vms".into(), "t".into())));
    assert_eq!(planner.plan_tenant(&index, &t).unwrap().ready_endpoints, 2);
}

#[test]
fn a_relisted_node_clock_with_the_same_last_update_is_no_renewal() {
    let (mut index, clock) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    clock.advance(freshness_bound(HEARTBEAT) - Duration::from_secs(1));
    // A watch relist delivers both objects again, unchanged.
    let _ = index.apply_clock(&node_clock("n1", 0));
    let _ = index.apply_clock(&node_clock("n2", 0));
    clock.advance(Duration::from_secs(1));
    assert!(!index.sweep().triggers.is_empty());
    assert_eq!(planner.plan_tenant(&index, &t).unwrap().ready_endpoints, 0);
}

#[test]
fn an_unready_or_terminating_agent_pod_is_not_a_ready_endpoint() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    let triggers = index.apply_pod(&agent_pod("n1", "10.0.0.1", false));
    assert!(triggers.tenants.contains(&("vms".into(), "t".into())));
    assert_eq!(planner.plan_tenant(&index, &t).unwrap().ready_endpoints, 1);

    let mut leaving = agent_pod("n1", "10.0.0.1", true);
    leaving.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(5).unwrap()));
    let triggers = index.apply_pod(&leaving);
    assert!(triggers.tenants.contains(&("vms".into(), "t".into())));
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert_eq!(plan.ready_endpoints, 1);
    let n1 = plan.slices[0].endpoints.as_ref().unwrap()[0].clone();
    let c = n1.conditions.unwrap();
    assert_eq!(
        (c.ready, c.serving, c.terminating),
        (Some(false), Some(true), Some(true))
    );
}

#[test]
fn the_node_clock_of_a_node_gone_longer_than_the_grace_is_collected() {
    let (mut index, clock) = setup();
    let _ = index.delete_node("n2");
    assert!(index.sweep().collect.is_empty(), "not within the grace");
    clock.advance(NODE_GONE_GRACE - Duration::from_secs(1));
    assert!(index.sweep().collect.is_empty());
    clock.advance(Duration::from_secs(1));
    let sweep = index.sweep();
    assert_eq!(
        sweep.collect,
        [("n2".to_owned(), Some("uid-clock-n2".to_owned()))]
    );
    assert!(
        index.sweep().collect.is_empty(),
        "offered again only a grace later, not on every sweep"
    );

    // A node that comes back within the grace keeps its clock.
    let _ = index.delete_node("n1");
    clock.advance(Duration::from_secs(10));
    let _ = index.apply_node("n1", &Default::default());
    clock.advance(NODE_GONE_GRACE);
    let collect: Vec<_> = index.sweep().collect.into_iter().map(|(n, _)| n).collect();
    assert_eq!(collect, ["n2"], "n1 is back; n2 is offered again");
    // Once the NodeClock is deleted, nothing is left to collect.
    let _ = index.delete_clock("n2");
    clock.advance(NODE_GONE_GRACE);
    assert!(index.sweep().collect.is_empty());
}

#[test]
fn child_events_trigger_exactly_the_tenants_that_would_apply_own_or_prune_that_name() {
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let older = tenant("vms", "a", json!({}));
    let mut younger = tenant("vms", "b", json!({ "service": { "name": "ntp-b" } }));
    younger.metadata.creation_timestamp =
        Some(Time(Timestamp::from_second(1_700_000_100).unwrap()));
    let _ = index.apply_tenant(&older);
    let _ = index.apply_tenant(&younger);
    let a = ("vms".to_owned(), "a".to_owned());
    let b = ("vms".to_owned(), "b".to_owned());

    // A user's Service of an unrelated name, or in another namespace: nothing.
    assert!(
        index
            .apply_child(ChildKind::Service, &object("vms", "web", None))
            .is_empty()
    );
    assert!(
        index
            .apply_child(ChildKind::Service, &object("db", "ntp", None))
            .is_empty()
    );
    // A user's Service of b's name: b only.
    let t = index.apply_child(ChildKind::Service, &object("vms", "ntp-b", None));
    assert_eq!(t.tenants, BTreeSet::from([b.clone()]));
    // A time-config: every tenant of the namespace (one of them owns it).
    let t = index.apply_child(
        ChildKind::ConfigMap,
        &object("vms", names::TIME_CONFIG_NAME, None),
    );
    assert_eq!(t.tenants, BTreeSet::from([a.clone(), b.clone()]));
    // One of Stratum's slices: the tenant it is labelled for.
    let t = index.apply_child(
        ChildKind::EndpointSlice,
        &object("vms", "old-stratum-ipv4", Some("a")),
    );
    assert_eq!(t.tenants, BTreeSet::from([a.clone()]));
    assert!(
        index
            .apply_child(
                ChildKind::EndpointSlice,
                &object("vms", "old-stratum-ipv4", Some("a"))
            )
            .is_empty(),
        "our own re-apply of an unchanged object reconciles nothing"
    );

    // The older tenant goes: the younger one is reconciled and takes over time-config.
    assert!(
        planner
            .plan_tenant(&index, &younger)
            .unwrap()
            .time_config
            .is_none()
    );
    let t = index.delete_tenant("vms", "a");
    assert_eq!(t.tenants, BTreeSet::from([b.clone()]));
    let _ = index.delete_child(ChildKind::ConfigMap, "vms", names::TIME_CONFIG_NAME);
    let _ = index.delete_child(ChildKind::Service, "vms", "ntp-b");
    assert!(
        planner
            .plan_tenant(&index, &younger)
            .unwrap()
            .time_config
            .is_some()
    );
}

#[test]
fn a_users_service_that_points_at_the_tenant_or_bears_our_field_manager_is_still_the_users() {
    // A tenant who wants Stratum to adopt (and later delete) some Service of theirs adds an
    // owner reference to their TenantTimePolicy; one the old operator force-applied over
    // carries Stratum's field manager. Neither is Stratum's: only its managed-by label is.
    let (mut index, _) = setup();
    let mut planner = Planner::new();
    let mut users = object("vms", "ntp", None);
    users.owner_references = Some(vec![OwnerReference {
        api_version: "stratum.io/v1alpha1".into(),
        kind: "TenantTimePolicy".into(),
        name: "t".into(),
        uid: "uid-t".into(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    users.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some(names::FIELD_MANAGER.into()),
        operation: Some("Apply".into()),
        ..ManagedFieldsEntry::default()
    }]);
    let _ = index.apply_child(ChildKind::Service, &users);
    let t = tenant("vms", "t", json!({}));
    let _ = index.apply_tenant(&t);
    let plan = planner.plan_tenant(&index, &t).unwrap();
    assert_eq!(
        plan.refused.as_ref().map(|(reason, _)| *reason),
        Some("ServiceConflict")
    );
    assert!(
        plan.service.is_none(),
        "the user's Service is never applied over"
    );
    assert!(
        pruned(&plan).is_empty(),
        "the user's Service is never deleted: {:?}",
        pruned(&plan)
    );
}
