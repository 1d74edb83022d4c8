//! `stratumctl report`'s builder and renderers on fixed evidence: which controls pass, fail or
//! are not evidenced, that the JSON matches docs/report.schema.json, and that the Markdown
//! carries the same facts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use stratum_agent::compliance::audit_log;
use stratum_agent::compliance::builder::{
    AgentPod, ChangeEvidence, ClusterNode, Evidence, MetricsEvidence, NodeSeries, TenantCounts,
};
use stratum_agent::compliance::model::{AccuracyBasis, Check, Report, Verdict};
use stratum_agent::compliance::rbac::RbacObjects;
use stratum_agent::compliance::{build, json_schema};
use stratum_agent::compliance::{markdown, prometheus};

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

const NOW: &str = "2026-01-02T00:00:00Z";

fn time_service(extra: Value) -> stratum_api::TimeService {
    let mut spec =
        json!({"upstreams": [{"host": "time.example.org"}, {"host": "ntp.example.net"}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    from(
        json!({"apiVersion": "stratum.io/v1alpha1", "kind": "TimeService",
        "metadata": {"name": "cluster"}, "spec": spec}),
    )
}

fn clock(node: &str, sources: Value) -> stratum_api::NodeClock {
    from(
        json!({"apiVersion": "stratum.io/v1alpha1", "kind": "NodeClock",
        "metadata": {"name": node}, "spec": {"timeService": "cluster"},
        "status": {"synchronized": true, "offsetNanos": -20_000, "stratum": 3,
            "rootDelayNanos": 2_000_000, "rootDispersionNanos": 1_000_000,
            "lastUpdate": "2026-01-01T23:59:50Z", "sources": sources}}),
    )
}

fn source(name: &str, address: &str, state: &str) -> Value {
    json!({"name": name, "address": address, "state": state, "reach": 255})
}

fn tenant(ns: &str, name: &str, max_root_distance: Option<&str>) -> stratum_api::TenantTimePolicy {
    let mut spec = json!({"allowedClients": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]});
    if let Some(d) = max_root_distance {
        spec["requirements"] = json!({"maxRootDistance": d});
    }
    from(
        json!({"apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
        "status": {"timeService": "cluster", "port": 12300, "allowListSize": 3, "readyEndpoints": 2}}),
    )
}

fn rbac() -> RbacObjects {
    RbacObjects {
        cluster_roles: vec![from(json!({"metadata": {"name": "time-admin"},
            "rules": [{"apiGroups": ["stratum.io"], "resources": ["*"], "verbs": ["*"]}]}))],
        cluster_role_bindings: vec![from(json!({"metadata": {"name": "time-admins"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "time-admin"},
            "subjects": [{"kind": "User", "name": "alice"}]}))],
        ..RbacObjects::default()
    }
}

fn audit_line(
    user: &str,
    verb: &str,
    code: i64,
    time: &str,
    request: Value,
    response: Option<Value>,
) -> String {
    let mut e = json!({"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "RequestResponse",
        "auditID": format!("a-{time}"), "stage": "ResponseComplete", "verb": verb,
        "user": {"username": user},
        "objectRef": {"resource": "tenanttimepolicies", "namespace": "team-a", "name": "ntp",
            "apiGroup": "stratum.io", "apiVersion": "v1alpha1"},
        "responseStatus": {"code": code}, "requestObject": request, "stageTimestamp": time});
    if let Some(r) = response {
        e["responseObject"] = r;
    }
    e.to_string()
}

fn tenant_object(cidr: &str) -> Value {
    json!({"apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy",
        "metadata": {"name": "ntp", "namespace": "team-a"},
        "spec": {"allowedClients": [{"ipBlock": {"cidr": cidr}}]}})
}

fn audit_log_text() -> String {
    [
        audit_line(
            "alice",
            "create",
            201,
            "2026-01-01T00:00:00Z",
            tenant_object("10.0.0.0/24"),
            Some(tenant_object("10.0.0.0/24")),
        ),
        audit_line(
            "alice",
            "patch",
            200,
            "2026-01-01T12:00:00Z",
            json!({"spec": {"allowedClients": [{"ipBlock": {"cidr": "10.9.0.0/24"}}]}}),
            Some(tenant_object("10.9.0.0/24")),
        ),
        audit_line(
            "mallory",
            "patch",
            403,
            "2026-01-01T13:00:00Z",
            json!({"spec": {"allowedClients": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}}),
            None,
        ),
    ]
    .join("\n")
}

fn metrics(nodes: &[(&str, f64, f64, f64)]) -> MetricsEvidence {
    MetricsEvidence {
        url: "http://prometheus:9090".into(),
        queries: vec![prometheus::max_abs_offset_query(86_400)],
        nodes: nodes
            .iter()
            .map(|(n, off, dist, unsync)| {
                (
                    (*n).to_owned(),
                    NodeSeries {
                        max_abs_offset: Some(*off),
                        max_root_distance: Some(*dist),
                        unsynchronized_seconds: Some(*unsync),
                        unreported_seconds: Some(0.0),
                    },
                )
            })
            .collect(),
        tenants: BTreeMap::from([(
            "team-a/ntp".to_owned(),
            TenantCounts {
                served: 1000,
                refused: 7,
            },
        )]),
    }
}

/// Everything evidenced and in order: the baseline each test breaks one way.
fn good() -> Evidence {
    Evidence {
        generated_at: NOW.parse().unwrap(),
        since: "2026-01-01T00:00:00Z".parse().unwrap(),
        until: "2026-01-02T00:00:00Z".parse().unwrap(),
        time_services: vec![time_service(json!({}))],
        tenants: vec![tenant("team-a", "ntp", Some("50ms"))],
        node_clocks: vec![
            clock(
                "node-a",
                json!([
                    source("time.example.org", "192.0.2.1:123", "Selected"),
                    source("ntp.example.net", "192.0.2.2:123", "Combined")
                ]),
            ),
            clock(
                "node-b",
                json!([source("ntp.example.net", "192.0.2.2:123", "Selected")]),
            ),
        ],
        agent_pods: Vec::new(),
        cluster_nodes: Ok(vec![
            ClusterNode {
                name: "node-a".into(),
                labels: BTreeMap::new(),
            },
            ClusterNode {
                name: "node-b".into(),
                labels: BTreeMap::new(),
            },
        ]),
        rbac: Ok(rbac()),
        changes: ChangeEvidence::AuditLog {
            path: "/var/log/audit.log".into(),
            log: audit_log::read(audit_log_text().as_bytes()),
        },
        metrics: Ok(metrics(&[
            ("node-a", 0.0002, 0.004, 0.0),
            ("node-b", 0.0003, 0.005, 0.0),
        ])),
        allowed_unsynchronized_seconds: 0.0,
    }
}

fn verdict(r: &Report, control: &str) -> (Verdict, String) {
    let c = r.controls.iter().find(|c| c.control == control).unwrap();
    (c.verdict, c.reasons.join("\n"))
}

const CONTROLS: [&str; 4] = [
    "PCI DSS 10.6.1",
    "PCI DSS 10.6.2",
    "PCI DSS 10.6.3",
    "ISO 27001:2022 A.8.17",
];

#[test]
fn complete_evidence_in_order_passes_every_control() {
    let r = build(&good());
    for c in CONTROLS {
        let (v, why) = verdict(&r, c);
        assert_eq!(v, Verdict::Pass, "{c}: {why}");
    }
    assert_eq!(r.accuracy.basis, AccuracyBasis::Period);
    assert_eq!(
        r.sources.nodes[0].chain,
        ["node-a", "upstream time.example.org:123"]
    );
    assert_eq!(r.tenants[0].served, Some(1000));
    assert_eq!(r.tenants[0].refused, Some(7));
}

#[test]
fn a_node_on_a_non_designated_upstream_fails_10_6_2_and_is_named() {
    let mut ev = good();
    ev.node_clocks[1] = clock(
        "node-b",
        json!([source("rogue.example.com", "203.0.113.9:123", "Selected")]),
    );
    let r = build(&ev);
    let (v, why) = verdict(&r, "PCI DSS 10.6.2");
    assert_eq!(v, Verdict::Fail);
    assert!(
        why.contains("node node-b") && why.contains("rogue.example.com"),
        "{why}"
    );
    assert!(!why.contains("node node-a"), "{why}");
    assert_eq!(r.sources.not_designated, ["node-b"]);
    assert_eq!(verdict(&r, "ISO 27001:2022 A.8.17").0, Verdict::Fail);
    // Polled but not followed counts too: the node still receives time from it.
    let mut ev = good();
    ev.node_clocks[0] = clock(
        "node-a",
        json!([
            source("time.example.org", "192.0.2.1:123", "Selected"),
            source("10.1.2.3", "10.1.2.3:123", "Falseticker")
        ]),
    );
    let r = build(&ev);
    assert_eq!(r.sources.not_designated, ["node-a"]);
    assert_eq!(verdict(&r, "PCI DSS 10.6.2").0, Verdict::Fail);
}

#[test]
fn without_prometheus_or_audit_log_nothing_passes_and_the_missing_evidence_is_named() {
    let mut ev = good();
    ev.metrics = Err("no Prometheus given (--prometheus URL)".into());
    ev.changes = ChangeEvidence::Events(Vec::new());
    let r = build(&ev);
    for c in CONTROLS {
        let (v, why) = verdict(&r, c);
        assert_eq!(v, Verdict::NotEvidenced, "{c}: {why}");
    }
    let (_, why) = verdict(&r, "PCI DSS 10.6.1");
    assert!(
        why.contains("NOT EVIDENCED: the period is not evidenced: no Prometheus given"),
        "{why}"
    );
    let (_, why) = verdict(&r, "PCI DSS 10.6.3");
    assert!(
        why.contains("NOT EVIDENCED: no audit log (--audit-log)"),
        "{why}"
    );
    assert_eq!(r.accuracy.basis, AccuracyBasis::PointInTime);
    assert!(
        r.accuracy
            .nodes
            .iter()
            .all(|n| n.reason.contains("point in time")),
        "{:?}",
        r.accuracy.nodes
    );
    assert!(
        r.evidence
            .iter()
            .any(|e| !e.available && e.detail.contains("--prometheus"))
    );
    let md = markdown::render(&r);
    assert!(md.contains("**Point in time**"), "{md}");

    let mut ev = good();
    ev.changes = ChangeEvidence::Missing("no audit log, and not allowed to list Events".into());
    ev.rbac = Err("not allowed to list ClusterRoles".into());
    let (v, why) = verdict(&build(&ev), "PCI DSS 10.6.3");
    assert_eq!(v, Verdict::NotEvidenced);
    assert!(
        why.contains("not allowed to list ClusterRoles")
            && why.contains("not allowed to list Events"),
        "{why}"
    );
}

#[test]
fn a_point_in_time_failure_still_fails() {
    let mut ev = good();
    ev.metrics = Err("no Prometheus given".into());
    let mut c = clock(
        "node-b",
        json!([source("ntp.example.net", "192.0.2.2:123", "Selected")]),
    );
    c.status.as_mut().unwrap().offset_nanos = 80_000_000;
    ev.node_clocks[1] = c;
    let r = build(&ev);
    let (v, why) = verdict(&r, "PCI DSS 10.6.2");
    assert_eq!(v, Verdict::Fail, "{why}");
    assert!(
        why.contains(
            "node-b (|offset| 80.000 ms exceeds the bound 50.000 ms, at this point in time"
        ),
        "{why}"
    );
}

#[test]
fn accuracy_is_checked_against_the_tightest_tenant_bound() {
    let mut ev = good();
    ev.tenants.push(tenant("team-b", "strict", Some("3ms")));
    let r = build(&ev);
    let b = r
        .accuracy
        .nodes
        .iter()
        .find(|n| n.node == "node-b")
        .unwrap();
    assert_eq!(b.bound_seconds, Some(0.003));
    assert_eq!(
        b.bound_from,
        "tenant team-b/strict requirements.maxRootDistance"
    );
    assert_eq!(b.check, Check::Exceeded, "{b:?}");
    let (v, why) = verdict(&r, "PCI DSS 10.6.2");
    assert_eq!(v, Verdict::Fail);
    assert!(
        why.contains("root distance 4.000 ms exceeds the bound 3.000 ms")
            || why.contains("node-b (root distance 5.000 ms"),
        "{why}"
    );
    // A refused tenant (no port in its status) is served nowhere: its demand binds no node,
    // as it is in no agent's config.
    let mut ev = good();
    let mut refused = tenant("team-c", "refused", Some("1ms"));
    refused.status.as_mut().unwrap().port = None;
    ev.tenants.push(refused);
    let r = build(&ev);
    assert!(
        r.accuracy
            .nodes
            .iter()
            .all(|n| !n.bound_from.contains("team-c")),
        "{:?}",
        r.accuracy.nodes
    );
    // Without tenant bounds, the TimeService's maxDistance (default 1.5 s) applies.
    let mut ev = good();
    ev.tenants.clear();
    let r = build(&ev);
    assert_eq!(
        r.accuracy.nodes[0].bound_from,
        "TimeService cluster selection.maxDistance"
    );
}

#[test]
fn unsynchronized_time_beyond_the_allowance_fails_10_6_1() {
    let mut ev = good();
    ev.metrics = Ok(metrics(&[
        ("node-a", 0.0002, 0.004, 0.0),
        ("node-b", 0.0003, 0.005, 120.0),
    ]));
    let (v, why) = verdict(&build(&ev), "PCI DSS 10.6.1");
    assert_eq!(v, Verdict::Fail);
    assert!(
        why.contains("node-b (unsynchronized for 120.000 s (allowed 0 s))"),
        "{why}"
    );
    ev.allowed_unsynchronized_seconds = 300.0;
    assert_eq!(verdict(&build(&ev), "PCI DSS 10.6.1").0, Verdict::Pass);
}

#[test]
fn a_node_gone_since_still_counts_from_its_metrics() {
    let mut ev = good();
    ev.metrics = Ok(metrics(&[
        ("node-a", 0.0002, 0.004, 0.0),
        ("node-b", 0.0003, 0.005, 0.0),
        ("node-old", 2.0, 0.004, 0.0),
    ]));
    let r = build(&ev);
    assert!(
        r.accuracy
            .nodes
            .iter()
            .any(|n| n.node == "node-old" && n.check == Check::Exceeded)
    );
    assert_eq!(verdict(&r, "PCI DSS 10.6.2").0, Verdict::Fail);
}

#[test]
fn nodes_without_an_agent_and_stale_clocks_are_named_as_not_evidenced() {
    let mut ev = good();
    if let Ok(nodes) = &mut ev.cluster_nodes {
        nodes.push(ClusterNode {
            name: "node-c".into(),
            labels: BTreeMap::new(),
        });
    }
    ev.node_clocks[1].status.as_mut().unwrap().last_update =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T20:00:00Z".parse().unwrap(),
        ));
    let r = build(&ev);
    assert_eq!(r.sources.without_agent, ["node-c"]);
    assert_eq!(r.sources.untraced, ["node-b"]);
    let (v, why) = verdict(&r, "PCI DSS 10.6.1");
    assert_eq!(v, Verdict::NotEvidenced, "{why}");
    assert!(
        why.contains("nodes without a Stratum agent") && why.contains("node-c"),
        "{why}"
    );
    let (v, why) = verdict(&r, "PCI DSS 10.6.2");
    assert_eq!(v, Verdict::NotEvidenced, "{why}");
    assert!(
        why.contains("node-b (its NodeClock was last updated"),
        "{why}"
    );
}

#[test]
fn behind_an_egress_tier_nodes_trace_through_it_and_direct_upstream_polls_fail() {
    let mut ev = good();
    ev.time_services = vec![time_service(
        json!({"egressTier": {"nodeSelector": {"edge": "true"}}}),
    )];
    ev.cluster_nodes = Ok(vec![
        ClusterNode {
            name: "node-a".into(),
            labels: BTreeMap::from([("edge".into(), "true".into())]),
        },
        ClusterNode {
            name: "node-b".into(),
            labels: BTreeMap::new(),
        },
    ]);
    ev.agent_pods = vec![
        AgentPod {
            node: "node-a".into(),
            time_service: "cluster".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        },
        AgentPod {
            node: "node-b".into(),
            time_service: "cluster".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        },
    ];
    ev.node_clocks[1] = clock(
        "node-b",
        json!([source("10.0.0.1", "10.0.0.1:123", "Selected")]),
    );
    let r = build(&ev);
    let b = r.sources.nodes.iter().find(|n| n.node == "node-b").unwrap();
    assert!(b.traced, "{b:?}");
    assert_eq!(
        b.chain,
        [
            "node-b",
            "egress node node-a (10.0.0.1)",
            "upstream time.example.org:123"
        ]
    );
    assert_eq!(r.sources.designated[0].egress_nodes, ["node-a"]);
    assert_eq!(verdict(&r, "PCI DSS 10.6.2").0, Verdict::Pass);

    ev.node_clocks[1] = clock(
        "node-b",
        json!([
            source("10.0.0.1", "10.0.0.1:123", "Selected"),
            source("time.example.org", "192.0.2.1:123", "Candidate")
        ]),
    );
    let r = build(&ev);
    let (v, why) = verdict(&r, "PCI DSS 10.6.2");
    assert_eq!(v, Verdict::Fail);
    assert!(
        why.contains("node node-b") && why.contains("bypassing the egress tier"),
        "{why}"
    );
}

#[test]
fn write_access_for_every_user_fails_10_6_3() {
    let mut ev = good();
    let mut objects = rbac();
    objects.cluster_role_bindings.push(from(json!({"metadata": {"name": "oops"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "time-admin"},
        "subjects": [{"kind": "Group", "name": "system:authenticated"}]})));
    ev.rbac = Ok(objects);
    let (v, why) = verdict(&build(&ev), "PCI DSS 10.6.3");
    assert_eq!(v, Verdict::Fail);
    assert!(why.contains("Group system:authenticated"), "{why}");
}

#[test]
fn changes_come_with_user_time_field_diff_and_refusals_only_from_the_period() {
    let mut ev = good();
    ev.since = "2026-01-01T06:00:00Z".parse().unwrap();
    let r = build(&ev);
    let c = &r.changes;
    assert_eq!(c.outside_period, 1, "the create is before the period");
    assert_eq!(c.records.len(), 2);
    assert_eq!(c.records[0].user, "alice");
    assert_eq!(
        c.records[0].fields[0].path,
        "spec.allowedClients[0].ipBlock.cidr"
    );
    assert_eq!(
        c.records[0].fields[0].old.as_deref(),
        Some("\"10.0.0.0/24\"")
    );
    assert_eq!(
        c.records[0].fields[0].new.as_deref(),
        Some("\"10.9.0.0/24\"")
    );
    assert_eq!(c.records[1].user, "mallory");
    let md = markdown::render(&r);
    let row = md.lines().find(|l| l.contains("mallory")).unwrap();
    assert!(row.contains("**REFUSED** 403"), "{row}");
    assert!(row.contains("0.0.0.0/0"), "{row}");
}

#[test]
fn unreadable_audit_lines_leave_10_6_3_not_evidenced() {
    let mut ev = good();
    let text = format!("{}\n{{broken", audit_log_text());
    ev.changes = ChangeEvidence::AuditLog {
        path: "a.log".into(),
        log: audit_log::read(text.as_bytes()),
    };
    let (v, why) = verdict(&build(&ev), "PCI DSS 10.6.3");
    assert_eq!(v, Verdict::NotEvidenced);
    assert!(
        why.contains("1 audit log line(s) could not be read"),
        "{why}"
    );
    // A log that starts after the period's start cannot show the changes before it.
    let mut ev = good();
    ev.since = "2025-12-31T00:00:00Z".parse().unwrap();
    let (v, why) = verdict(&build(&ev), "PCI DSS 10.6.3");
    assert_eq!(v, Verdict::NotEvidenced);
    assert!(
        why.contains("the audit log begins at 2026-01-01T00:00:00Z"),
        "{why}"
    );
}

#[test]
fn hostile_text_cannot_break_the_markdown_tables() {
    let mut ev = good();
    let evil = "evil-eve|<script>x</script>\n| forged | row |";
    ev.changes = ChangeEvidence::AuditLog {
        path: "a.log".into(),
        log: audit_log::read(
            audit_line(
                evil,
                "patch",
                200,
                "2026-01-01T12:00:00Z",
                json!({"spec": {"timezone": "a|b\nc"}}),
                None,
            )
            .as_bytes(),
        ),
    };
    let md = markdown::render(&build(&ev));
    assert!(!md.contains("<script>"), "{md}");
    assert!(!md.lines().any(|l| l.starts_with("| forged")), "{md}");
    let row = md
        .lines()
        .find(|l| l.starts_with("| ") && l.contains("evil-eve"))
        .unwrap();
    // Eight columns, every '|' of the data escaped.
    let separators = row.replace("\\|", "").matches('|').count();
    assert_eq!(separators, 9, "{row}");
}

// ---- the JSON Schema ----------------------------------------------------------------------

fn schema_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/report.schema.json")
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    assert!(
        committed == json_schema(),
        "docs/report.schema.json is out of date: run `cargo run -p stratum-agent --bin stratumctl -- report --schema > docs/report.schema.json`"
    );
}

fn validate(report: &Report) -> Result<(), String> {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("report.schema.json", schema).unwrap();
    let index = compiler
        .compile("report.schema.json", &mut schemas)
        .unwrap();
    let instance = serde_json::to_value(report).unwrap();
    schemas
        .validate(&instance, index)
        .map_err(|e| format!("{e:#}"))
}

fn variants() -> Vec<Report> {
    let mut no_evidence = good();
    no_evidence.metrics = Err("none".into());
    no_evidence.rbac = Err("none".into());
    no_evidence.cluster_nodes = Err("none".into());
    no_evidence.changes = ChangeEvidence::Missing("none".into());
    let mut events = good();
    events.changes = ChangeEvidence::Events(vec![from(
        json!({"time": NOW, "user": "", "verb": "AllowListChanged",
        "kind": "TenantTimePolicy", "namespace": "team-a", "name": "ntp", "outcome": {"result": "observed"},
        "baseline": "unknown", "fields": [], "fieldsOmitted": 0, "note": "tenant team-a/ntp: allow list now 1 CIDRs"}),
    )]);
    let mut failing = good();
    failing.node_clocks[1] = clock(
        "node-b",
        json!([source("rogue.example.com", "203.0.113.9:123", "Selected")]),
    );
    vec![
        build(&good()),
        build(&no_evidence),
        build(&events),
        build(&failing),
    ]
}

#[test]
fn every_report_validates_against_the_committed_schema() {
    for r in variants() {
        validate(&r).unwrap();
    }
}

#[test]
fn the_schema_rejects_what_the_report_never_is() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("report.schema.json", schema).unwrap();
    let index = compiler
        .compile("report.schema.json", &mut schemas)
        .unwrap();
    let mut bad = serde_json::to_value(build(&good())).unwrap();
    bad["controls"][0]["verdict"] = json!("probably");
    assert!(
        schemas.validate(&bad, index).is_err(),
        "an unknown verdict must not validate"
    );
    let mut bad = serde_json::to_value(build(&good())).unwrap();
    bad["accuracy"].as_object_mut().unwrap().remove("basis");
    assert!(
        schemas.validate(&bad, index).is_err(),
        "a missing basis must not validate"
    );
}

// ---- Markdown and JSON say the same -------------------------------------------------------

/// Every fact a reviewer checks, as it appears in the JSON: cells that must stand side by
/// side in one Markdown line.
fn facts(r: &Report) -> Vec<Vec<String>> {
    let one = |s: &str| vec![s.to_owned()];
    let mut out = Vec::new();
    for c in &r.controls {
        out.push(vec![
            c.control.clone(),
            format!("**{}**", c.verdict.label()),
        ]);
        out.extend(c.reasons.iter().map(|s| one(s)));
    }
    for n in &r.sources.nodes {
        out.push(vec![n.node.clone(), n.time_service.clone()]);
        out.push(one(&n.chain.join(" → ")));
        out.extend(n.undesignated_sources.iter().map(|s| one(s)));
    }
    out.extend(
        r.sources
            .not_designated
            .iter()
            .map(|n| one(&format!("- {n}"))),
    );
    out.extend(
        r.sources
            .without_agent
            .iter()
            .map(|n| one(&format!("- {n}"))),
    );
    for n in &r.accuracy.nodes {
        out.push(vec![n.node.clone(), n.time_service.clone()]);
        out.push(vec![
            n.bound_from.clone(),
            check_label(n.check).to_owned(),
            n.reason.clone(),
        ]);
    }
    for t in &r.tenants {
        out.push(vec![
            t.tenant.clone(),
            t.time_service.clone().unwrap_or_default(),
            t.service.clone(),
        ]);
    }
    for p in &r.access.principals {
        for g in &p.grants {
            out.push(vec![
                p.name.clone(),
                p.kind.clone(),
                g.resource.clone(),
                g.verbs.join(", "),
                g.scope.clone(),
            ]);
        }
    }
    for c in &r.changes.records {
        let mut row = vec![c.time.clone()];
        if !c.user.is_empty() {
            row.push(c.user.clone());
        }
        out.push(row);
        for f in &c.fields {
            let mut cells = vec![f.path.clone()];
            if let Some(old) = &f.old {
                cells.push(old.clone());
                cells.extend(f.new.iter().cloned());
            }
            out.push(cells);
        }
    }
    for p in &r.changes.problems {
        out.push(vec![p.line.to_string(), p.message.clone()]);
    }
    out
}

fn check_label(c: Check) -> &'static str {
    match c {
        Check::Within => "within",
        Check::Exceeded => "EXCEEDED",
        Check::Unknown => "unknown",
    }
}

#[test]
fn the_markdown_renders_every_fact_of_the_json() {
    let mut broken_log = good();
    let text = format!("{}\n{{broken", audit_log_text());
    broken_log.changes = ChangeEvidence::AuditLog {
        path: "a.log".into(),
        log: audit_log::read(text.as_bytes()),
    };
    let mut reports = variants();
    reports.push(build(&broken_log));
    for r in reports {
        // The facts are read back from the JSON, as a SIEM would see them.
        let json = serde_json::to_string(&r).unwrap();
        let parsed: Report = serde_json::from_str(&json).unwrap();
        let md = markdown::render(&parsed);
        let facts = facts(&parsed);
        assert!(facts.len() > 20, "too few facts to mean anything");
        for cells in facts {
            let shown = cells
                .iter()
                .map(|c| markdown::escape(c))
                .collect::<Vec<_>>()
                .join(" | ");
            assert!(
                md.lines().any(|l| l.contains(&shown)),
                "the Markdown lacks {shown:?}:\n{md}"
            );
        }
    }
}

#[test]
fn the_report_time_fields_are_rfc3339() {
    let r = build(&good());
    for t in [&r.generated_at, &r.period.since, &r.period.until] {
        t.parse::<Timestamp>().unwrap();
    }
}

// ---- the chart's audit policy -------------------------------------------------------------

/// One request as an audit policy sees it.
struct Req<'a> {
    user: &'a str,
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    namespace: &'a str,
    name: &'a str,
}

/// The level the policy's first matching rule gives `r` (the API server's semantics: empty
/// lists match everything; a GroupResources without resources matches the whole group).
fn level(policy: &Value, r: &Req) -> String {
    let has = |list: &Value, v: &str| {
        list.as_array()
            .is_none_or(|l| l.is_empty() || l.iter().any(|x| x == v))
    };
    for rule in policy["rules"].as_array().unwrap() {
        let resources_match = rule["resources"].as_array().is_none_or(|gs| {
            gs.iter().any(|g| {
                g["group"].as_str().unwrap_or("") == r.group
                    && has(&g["resources"], r.resource)
                    && has(&g["resourceNames"], r.name)
            })
        });
        if has(&rule["users"], r.user)
            && has(&rule["verbs"], r.verb)
            && has(&rule["namespaces"], r.namespace)
            && resources_match
        {
            return rule["level"].as_str().unwrap().to_owned();
        }
    }
    "None".to_owned()
}

#[test]
fn the_chart_audit_policy_records_time_configuration_and_never_secret_content() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/stratum/files/audit-policy.yaml");
    let policy: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(policy["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(policy["kind"], "Policy");
    assert!(
        policy["omitStages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "RequestReceived")
    );
    let operator = "system:serviceaccount:stratum-system:stratum-operator";
    let req = |user, verb, group, resource, namespace, name| Req {
        user,
        verb,
        group,
        resource,
        namespace,
        name,
    };
    let cases = [
        // The configuration, by anyone, with the objects: what `report --audit-log` diffs.
        (
            req(
                "alice",
                "patch",
                "stratum.io",
                "timeservices",
                "",
                "cluster",
            ),
            "RequestResponse",
        ),
        (
            req(
                "bob",
                "create",
                "stratum.io",
                "tenanttimepolicies",
                "team-a",
                "ntp",
            ),
            "RequestResponse",
        ),
        (
            req(
                "mallory",
                "update",
                "stratum.io",
                "tenanttimepolicies",
                "team-a",
                "ntp",
            ),
            "RequestResponse",
        ),
        (
            req(
                "alice",
                "delete",
                "stratum.io",
                "timeservices",
                "",
                "cluster",
            ),
            "RequestResponse",
        ),
        // The operator's children in its namespace, whoever writes them.
        (
            req(
                operator,
                "patch",
                "apps",
                "daemonsets",
                "stratum-system",
                "cluster-agent",
            ),
            "RequestResponse",
        ),
        (
            req(
                "alice",
                "update",
                "",
                "configmaps",
                "stratum-system",
                "cluster-agent-config",
            ),
            "RequestResponse",
        ),
        (
            req(operator, "patch", "", "services", "team-a", "ntp"),
            "RequestResponse",
        ),
        (
            req(
                operator,
                "patch",
                "networking.k8s.io",
                "networkpolicies",
                "stratum-system",
                "x",
            ),
            "RequestResponse",
        ),
        (
            req("alice", "patch", "", "configmaps", "team-a", "time-config"),
            "RequestResponse",
        ),
        (
            req(
                "alice",
                "patch",
                "rbac.authorization.k8s.io",
                "clusterrolebindings",
                "",
                "x",
            ),
            "RequestResponse",
        ),
        // Churn: who and when only.
        (
            req(
                operator,
                "patch",
                "discovery.k8s.io",
                "endpointslices",
                "team-a",
                "ntp-stratum-ipv4",
            ),
            "Metadata",
        ),
        // Secrets: never their content.
        (
            req("alice", "update", "", "secrets", "team-a", "ntp-keys"),
            "Metadata",
        ),
        (
            req("alice", "get", "", "secrets", "team-a", "ntp-keys"),
            "None",
        ),
        // Noise and state.
        (
            req(
                "system:serviceaccount:stratum-system:cluster-agent",
                "patch",
                "stratum.io",
                "nodeclocks/status",
                "",
                "node-a",
            ),
            "None",
        ),
        (
            req(
                operator,
                "patch",
                "stratum.io",
                "timeservices/status",
                "",
                "cluster",
            ),
            "None",
        ),
        (
            req(
                operator,
                "create",
                "events.k8s.io",
                "events",
                "default",
                "x",
            ),
            "None",
        ),
        (
            req(
                operator,
                "update",
                "coordination.k8s.io",
                "leases",
                "stratum-system",
                "stratum-operator-leader",
            ),
            "None",
        ),
        (
            req("alice", "list", "stratum.io", "timeservices", "", ""),
            "None",
        ),
        (
            req("alice", "watch", "", "configmaps", "stratum-system", ""),
            "None",
        ),
        // Other people's objects.
        (
            req("carol", "patch", "", "configmaps", "team-b", "app-config"),
            "None",
        ),
    ];
    for (r, want) in cases {
        assert_eq!(
            level(&policy, &r),
            want,
            "{} {} {}/{} {}/{}",
            r.user,
            r.verb,
            r.group,
            r.resource,
            r.namespace,
            r.name
        );
    }
}

/// Every query the report sends parses as PromQL, by Prometheus' own parser (`promtool check
/// rules`, from `make deps`): the string tests above cannot tell valid PromQL from not.
#[test]
fn every_report_query_is_promql_that_prometheus_parses() {
    let window = 86_400;
    let queries = [
        prometheus::max_abs_offset_query(window),
        prometheus::max_root_distance_query(window),
        prometheus::synchronized_query(),
        prometheus::tenant_requests_query(window),
    ];
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| json!({"record": format!("report:query_{i}"), "expr": q}))
        .collect();
    let path = std::env::temp_dir().join(format!(
        "stratum-report-queries-{}.yaml",
        std::process::id()
    ));
    std::fs::write(
        &path,
        serde_json::to_string(&json!({"groups": [{"name": "report", "rules": rules}]})).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool (make deps installs Debian's prometheus package)");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
