//! The scale scenario shared by `examples/scale.rs` (the benchmark) and `tests/config_size.rs`:
//! 1000 tenants in 500 namespaces of 25 teams, 10,000 dual-stack pods.

#![allow(clippy::unwrap_used, dead_code)]

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use stratum_api::{TenantTimePolicy, TimeService};
use stratum_operator::build::OperatorSettings;
use stratum_operator::index::Index;

pub const NAMESPACES: usize = 500;
pub const PODS_PER_NAMESPACE: usize = 20;
pub const TENANTS_PER_NAMESPACE: usize = 2;
pub const TEAMS: usize = 25;
pub const NODES: usize = 100;

/// How pod addresses are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Consecutive by namespace: a namespace's pods aggregate into few prefixes (the
    /// benchmark's original, flattering layout).
    Sequential,
    /// From each node's pod CIDR, as kube-controller-manager hands them out: a namespace's pods
    /// are spread over the nodes and hardly aggregate.
    PerNode,
}

pub fn pod(addressing: Addressing, ns: usize, i: usize) -> Pod {
    let n = ns * PODS_PER_NAMESPACE + i;
    let node = n % NODES;
    let (v4, v6) = match addressing {
        Addressing::Sequential => (
            format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255),
            format!("fd00:10::{n:x}"),
        ),
        Addressing::PerNode => {
            let k = n / NODES + 2;
            (
                format!("10.244.{node}.{k}"),
                format!("fd00:10:244:{node:x}::{k:x}"),
            )
        }
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{i}")),
            namespace: Some(format!("ns-{ns}")),
            labels: Some(
                [
                    ("app".to_string(), format!("app-{}", i % 4)),
                    ("vm".to_string(), i.is_multiple_of(2).to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{node}")),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(vec![PodIP { ip: v4 }, PodIP { ip: v6 }]),
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

pub fn tenant(ns: usize, j: usize) -> TenantTimePolicy {
    // A mix of peer shapes: own namespace (empty), podSelector, namespaceSelector (a team of
    // 20 namespaces), both, and ipBlock with exceptions.
    let peers = match (ns * TENANTS_PER_NAMESPACE + j) % 5 {
        0 => json!([]),
        1 => json!([{ "podSelector": { "matchLabels": { "vm": "true" } } }]),
        2 => {
            json!([{ "namespaceSelector": { "matchLabels": { "team": format!("t{}", ns % TEAMS) } } }])
        }
        3 => {
            json!([{ "namespaceSelector": { "matchExpressions": [{ "key": "team", "operator": "In", "values": [format!("t{}", ns % TEAMS)] }] },
                      "podSelector": { "matchLabels": { "app": "app-1" } } }])
        }
        _ => {
            json!([{ "ipBlock": { "cidr": "192.168.0.0/16", "except": ["192.168.7.0/24", "192.168.9.128/25"] } },
                    { "podSelector": {} }])
        }
    };
    TenantTimePolicy {
        metadata: ObjectMeta {
            name: Some(format!("tenant-{j}")),
            namespace: Some(format!("ns-{ns}")),
            uid: Some(format!("uid-{ns}-{j}")),
            creation_timestamp: Some(Time(
                Timestamp::from_second(1_700_000_000 + (ns * 10 + j) as i64).unwrap(),
            )),
            ..Default::default()
        },
        spec: serde_json::from_value(
            json!({ "allowedClients": peers, "service": { "name": format!("ntp-{j}") } }),
        )
        .unwrap(),
        status: None,
    }
}

pub fn settings() -> OperatorSettings {
    OperatorSettings {
        namespace: "stratum-system".into(),
        agent_image: "stratum-agent:bench".into(),
        agent_image_pull_secrets: Vec::new(),
        agent_cluster_role: "stratum-agent".into(),
        agent_priority_class: "system-node-critical".into(),
    }
}

pub fn time_service() -> TimeService {
    let mut ts = TimeService::new(
        "cluster",
        serde_json::from_value(json!({
            "upstreams": [{ "host": "pool.ntp.org", "kind": "Pool" }],
            "serving": { "tenantPorts": { "start": 20000, "end": 29999 } }
        }))
        .unwrap(),
    );
    ts.metadata.uid = Some("uid-cluster".into());
    ts
}

/// An index holding the whole scenario, fed event by event as the watches would.
pub fn index(addressing: Addressing, ts: &TimeService) -> Index {
    let mut index = Index::new("stratum-system");
    let _ = index.apply_time_service(ts);
    for ns in 0..NAMESPACES {
        let _ = index.apply_namespace(
            &format!("ns-{ns}"),
            &[("team".to_string(), format!("t{}", ns % TEAMS))].into(),
        );
    }
    for ns in 0..NAMESPACES {
        for j in 0..TENANTS_PER_NAMESPACE {
            let _ = index.apply_tenant(&tenant(ns, j));
        }
    }
    for ns in 0..NAMESPACES {
        for i in 0..PODS_PER_NAMESPACE {
            let _ = index.apply_pod(&pod(addressing, ns, i));
        }
    }
    index
}
