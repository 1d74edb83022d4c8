//! Scale benchmark (not a test): an index holding 1000 tenants and 10,000 pods, timing full
//! resolution of every allow list plus the agent config, then one pod add until the new agent
//! config is built, and the process's memory. Run:
//!
//! ```text
//! cargo run -p stratum-operator --release --example scale
//! ```

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use stratum_api::{TenantTimePolicy, TimeService};
use stratum_operator::build::OperatorSettings;
use stratum_operator::index::Index;
use stratum_operator::plan::plan_time_service;

const NAMESPACES: usize = 500;
const PODS_PER_NAMESPACE: usize = 20;
const TENANTS_PER_NAMESPACE: usize = 2;
const TEAMS: usize = 25;

fn pod(ns: usize, i: usize) -> Pod {
    let n = ns * PODS_PER_NAMESPACE + i;
    let v4 = format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255);
    let v6 = format!("fd00:10::{:x}", n);
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
            node_name: Some(format!("node-{}", n % 100)),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(vec![PodIP { ip: v4 }, PodIP { ip: v6 }]),
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

fn tenant(ns: usize, j: usize) -> TenantTimePolicy {
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

fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let settings = OperatorSettings {
        namespace: "stratum-system".into(),
        agent_image: "stratum-agent:bench".into(),
        agent_cluster_role: "stratum-agent".into(),
    };
    let mut ts = TimeService::new(
        "cluster",
        serde_json::from_value(json!({
            "upstreams": [{ "host": "pool.ntp.org", "kind": "Pool" }],
            "serving": { "tenantPorts": { "start": 20000, "end": 29999 } }
        }))
        .unwrap(),
    );
    ts.metadata.uid = Some("uid-cluster".into());

    let start = Instant::now();
    let mut index = Index::new("stratum-system");
    index.apply_time_service(&ts);
    for ns in 0..NAMESPACES {
        index.apply_namespace(
            &format!("ns-{ns}"),
            &[("team".to_string(), format!("t{}", ns % TEAMS))].into(),
        );
    }
    for ns in 0..NAMESPACES {
        for j in 0..TENANTS_PER_NAMESPACE {
            index.apply_tenant(&tenant(ns, j));
        }
    }
    for ns in 0..NAMESPACES {
        for i in 0..PODS_PER_NAMESPACE {
            index.apply_pod(&pod(ns, i));
        }
    }
    let load = start.elapsed();
    println!(
        "index: {} tenants, {} pods, {} namespaces (loaded with per-event triggers in {:.0} ms)",
        index.tenants.len(),
        index.cluster.pod_count(),
        NAMESPACES,
        ms(load)
    );

    // Full resolution: every allow list from a cold cache, then the whole agent config.
    let mut cold = Index::new("stratum-system");
    std::mem::swap(&mut cold, &mut index);
    let keys: Vec<_> = cold.tenants.keys().cloned().collect();
    let t = Instant::now();
    let mut cidrs = 0;
    for key in &keys {
        let policy = cold.tenants[key].policy.clone().unwrap();
        cidrs += policy.resolve_allowed(&cold.cluster).len();
    }
    let full_resolve = t.elapsed();
    let t = Instant::now();
    let plan = plan_time_service(&mut cold, &ts, &settings).unwrap();
    let full_plan = t.elapsed();
    let Some(config) = plan.config else {
        panic!("no agent config: {:?}", plan.blocked);
    };
    let refused = plan
        .config_map
        .is_none()
        .then(|| format!("{:?}", plan.blocked));
    let json_bytes = config.to_json().len();
    let compact_bytes = serde_json::to_string(&config).unwrap().len();
    index = cold;

    // Incremental: one pod add, through the index's re-resolution, to the new agent config.
    let mut samples = Vec::new();
    let mut resolve_samples = Vec::new();
    let mut revision = config.revision.clone();
    for k in 0..200 {
        let ns = (k * 7) % NAMESPACES;
        let mut p = pod(ns, 0);
        p.metadata.name = Some(format!("new-{k}"));
        p.status.as_mut().unwrap().pod_ips = Some(vec![PodIP {
            ip: format!("10.200.{}.{}", k / 250, k % 250 + 1),
        }]);
        let t = Instant::now();
        let triggers = index.apply_pod(&p);
        assert!(
            triggers.time_services.contains("cluster"),
            "a selected pod must trigger its TimeService"
        );
        for key in &triggers.tenants {
            index.allowed(key);
        }
        resolve_samples.push(t.elapsed());
        // The plan renders the ConfigMap text too (the JSON that would be written).
        let plan = plan_time_service(&mut index, &ts, &settings).unwrap();
        let new = plan.config.unwrap();
        samples.push(t.elapsed());
        assert_ne!(new.revision, revision, "the new pod must change the config");
        revision = new.revision;
    }
    samples.sort();
    resolve_samples.sort();
    let (rss, hwm) = memory();

    println!();
    println!("| measurement                                   | value        |");
    println!("|-----------------------------------------------|--------------|");
    println!(
        "| full resolution, 1000 allow lists (cold)      | {:>9.1} ms |",
        ms(full_resolve)
    );
    println!(
        "| full agent config build (plan, cached lists)  | {:>9.1} ms |",
        ms(full_plan)
    );
    println!(
        "| resolved CIDRs (all tenants)                  | {:>12} |",
        cidrs
    );
    println!(
        "| agent config JSON (pretty, as written)        | {:>9.0} KiB |",
        json_bytes as f64 / 1024.0
    );
    println!(
        "| agent config JSON (compact)                   | {:>9.0} KiB |",
        compact_bytes as f64 / 1024.0
    );
    let pct = |v: &[Duration], q: usize| ms(v[v.len() * q / 100]);
    println!(
        "| one pod add -> affected allow lists, median   | {:>9.2} ms |",
        pct(&resolve_samples, 50)
    );
    println!(
        "| one pod add -> affected allow lists, p99      | {:>9.2} ms |",
        pct(&resolve_samples, 99)
    );
    println!(
        "| one pod add -> new agent config, median       | {:>9.2} ms |",
        ms(samples[samples.len() / 2])
    );
    println!(
        "| one pod add -> new agent config, p99          | {:>9.2} ms |",
        ms(samples[samples.len() * 99 / 100])
    );
    println!(
        "| RSS now / peak (VmRSS / VmHWM)                | {:>4} / {:>4} MiB |",
        rss / 1024,
        hwm / 1024
    );
    if let Some(why) = refused {
        println!("NOTE: the operator would refuse to write this config: {why}");
    }
    println!();
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "goals: incremental < 10 ms: {}; RSS < 200 MiB: {}",
        if p99 < Duration::from_millis(10) {
            "met"
        } else {
            "MISSED"
        },
        if hwm < 200 * 1024 { "met" } else { "MISSED" }
    );
}
