//! Ownership, pruning and honest endpoints on the real API server with real agents (issue 14):
//! refusing, unserving and renaming a tenant leaves no Service or EndpointSlice of Stratum's
//! behind; a user's own Service named like the tenant's is never touched (the tenant gets a
//! `Conflict` condition); an agent stopped with SIGSTOP, or cut off from the API server while it
//! keeps serving, leaves every tenant's ready set within the NodeClock freshness bound. Figures
//! are printed (`--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use stratum_api::TenantTimePolicy;
use stratum_e2e::harness::*;

const STRATUMS: &str = "app.kubernetes.io/managed-by=stratum-operator";
/// The shared TimeService reports every 10 s: fresh for 3 × 10 s + 5 s.
const FRESHNESS_BOUND: Duration = Duration::from_secs(35);

/// Names of Stratum's Services and EndpointSlices in `ns`, sorted.
async fn stratums_children(client: &kube::Client, ns: &str) -> Option<Vec<String>> {
    let lp = ListParams::default().labels(STRATUMS);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let mut out: Vec<String> = services
        .list(&lp)
        .await
        .ok()?
        .items
        .iter()
        .map(|s| format!("Service/{}", name_of(s)))
        .collect();
    out.extend(
        slices
            .list(&lp)
            .await
            .ok()?
            .items
            .iter()
            .map(|s| format!("EndpointSlice/{}", name_of(s))),
    );
    out.sort();
    Some(out)
}

/// The tenant's condition of `type_` as (status, reason, message).
async fn condition(
    client: &kube::Client,
    ns: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), ns);
    let status = ttp.get("ntp").await.ok()?.status?;
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the tenant says `Accepted=False` for `reason`.
async fn refused_with(client: &kube::Client, ns: &str, reason: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("Accepted=False, reason {reason}"),
        || async {
            let (status, why, _) = condition(client, ns, "Accepted").await?;
            (status == "False" && why == reason).then_some(())
        },
    )
    .await;
}

/// The user's Service exactly as they left it: same uid and resourceVersion (nobody wrote it),
/// none of Stratum's labels, owner references or fields.
async fn assert_users_service_untouched(client: &kube::Client, ns: &str, uid: &str, version: &str) {
    let svc: Api<Service> = Api::namespaced(client.clone(), ns);
    let now = svc
        .get("ntp")
        .await
        .expect("the user's Service still exists");
    assert_eq!(now.metadata.uid.as_deref(), Some(uid), "same object");
    assert_eq!(
        now.metadata.resource_version.as_deref(),
        Some(version),
        "nobody wrote the user's Service"
    );
    assert!(now.metadata.owner_references.is_none());
    assert!(
        !now.metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|m| m.manager.as_deref() == Some("stratum-operator"))
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn refusing_unserving_and_renaming_leave_nothing_behind_and_a_users_service_is_never_touched()
{
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ns = "e2e-ownership";
    namespace(&client, ns, serde_json::json!({})).await;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), ns);
    delete(&ttp, "ntp").await;

    // Before: the user's own Service named like the tenant's.
    let users = apply(
        &services,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ntp", "namespace": ns, "labels": {"app": "users-own"}},
            "spec": {"ports": [{"name": "ntp", "port": 123, "protocol": "UDP"}]}
        }),
    )
    .await;
    let uid = users.metadata.uid.clone().unwrap();
    let version = users.metadata.resource_version.clone().unwrap();

    // During: the tenant wants `ntp` too and gets a Conflict naming the user's Service.
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let (conflict, conflict_after) = wait_for(
        Duration::from_secs(60),
        "the tenant's Conflict condition",
        || async {
            condition(&client, ns, "Conflict")
                .await
                .filter(|(s, _, _)| s == "True")
        },
    )
    .await;
    assert!(
        conflict.2.contains(&format!("Service {ns}/ntp")),
        "{conflict:?}"
    );
    let accepted = condition(&client, ns, "Accepted").await.unwrap();
    assert_eq!(
        (accepted.0.as_str(), accepted.1.as_str()),
        ("False", "ServiceConflict")
    );
    assert_eq!(
        stratums_children(&client, ns).await.unwrap(),
        Vec::<String>::new(),
        "nothing of Stratum's routes to the user's Service"
    );
    assert_users_service_untouched(&client, ns, &uid, &version).await;
    eprintln!(
        "conflict: reported {:.1} s after the tenant was applied: {}",
        conflict_after.as_secs_f64(),
        conflict.2
    );

    // Renamed to a free name: served, Conflict lifted.
    let served = |service: &'static str| {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move {
                let children = stratums_children(&client, ns).await?;
                let want = vec![
                    format!("EndpointSlice/{service}-stratum-ipv4"),
                    format!("EndpointSlice/{service}-stratum-ipv6"),
                    format!("Service/{service}"),
                ];
                (children == want).then_some(())
            }
        }
    };
    apply_tenant(
        &client,
        ns,
        serde_json::json!({"service": {"name": "time"}}),
    )
    .await;
    wait_for(
        Duration::from_secs(60),
        "Service time and its slices",
        served("time"),
    )
    .await;
    let (no_conflict, _) = wait_for(Duration::from_secs(30), "Conflict False", || async {
        condition(&client, ns, "Conflict")
            .await
            .filter(|(s, _, _)| s == "False")
    })
    .await;
    assert_eq!(no_conflict.1, "NoConflict");

    // Renamed again: the old Service and slices go.
    apply_tenant(
        &client,
        ns,
        serde_json::json!({"service": {"name": "time2"}}),
    )
    .await;
    let (_, renamed_after) = wait_for(
        Duration::from_secs(60),
        "only Service time2 and its slices",
        served("time2"),
    )
    .await;

    // Refused (a time zone the IANA database does not know): nothing of Stratum's is left.
    let gone = || async {
        stratums_children(&client, ns)
            .await
            .filter(|c| c.is_empty())
    };
    apply_tenant(
        &client,
        ns,
        serde_json::json!({"service": {"name": "time2"}, "timezone": "Mars/Olympus_Mons"}),
    )
    .await;
    let (_, refused_after) = wait_for(Duration::from_secs(60), "no Stratum children", gone).await;
    // The children go before the status is written: wait for it rather than race it.
    refused_with(&client, ns, "InvalidTimezone").await;

    // Served again, then unserved (its TimeService does not exist): nothing is left.
    apply_tenant(
        &client,
        ns,
        serde_json::json!({"service": {"name": "time2"}}),
    )
    .await;
    wait_for(Duration::from_secs(60), "served again", served("time2")).await;
    apply_tenant(
        &client,
        ns,
        serde_json::json!({"service": {"name": "time2"}, "timeServiceRef": "e2e-absent"}),
    )
    .await;
    let (_, unserved_after) = wait_for(Duration::from_secs(60), "no Stratum children", gone).await;
    refused_with(&client, ns, "TimeServiceNotFound").await;
    assert_users_service_untouched(&client, ns, &uid, &version).await;

    // After: back to the clashing name, then the tenant is deleted; the user's Service stays.
    apply_tenant(&client, ns, serde_json::json!({})).await;
    wait_for(Duration::from_secs(60), "the Conflict again", || async {
        condition(&client, ns, "Conflict")
            .await
            .filter(|(s, _, _)| s == "True")
    })
    .await;
    delete(&ttp, "ntp").await;
    wait_for(Duration::from_secs(60), "the tenant gone", || async {
        ttp.get_opt("ntp").await.ok()?.is_none().then_some(())
    })
    .await;
    // Give the garbage collector a chance to act (it must find nothing of ours to collect):
    // wait until it has processed the tenant's deletion, i.e. nothing of Stratum's is left.
    wait_for(Duration::from_secs(30), "no Stratum children", gone).await;
    assert_users_service_untouched(&client, ns, &uid, &version).await;
    eprintln!(
        "pruning: renamed Service gone after {:.1} s, refused tenant's children after {:.1} s, \
         unserved tenant's after {:.1} s; the user's Service kept resourceVersion {version}",
        renamed_after.as_secs_f64(),
        refused_after.as_secs_f64(),
        unserved_after.as_secs_f64()
    );
    delete(&services, "ntp").await;
}

/// A stopped process, continued on drop (so a failing test never leaves an agent stopped).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal("-STOP", pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(which: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// The pid of the agent the kubelet stand-in runs for `node`.
fn agent_pid(node: &str) -> u32 {
    let path = stack_dir().join("agents").join(node).join("pid");
    let pid: u32 = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "stratum-agent",
        "pid {pid} is the agent itself"
    );
    pid
}

/// Cuts `node`'s agent off from the API server (a blackhole route to it in the node's network
/// namespace, where only the agent runs) until the guard is dropped; the agent keeps its
/// upstreams and serves on.
fn cut_api_server(node: &str) -> Blackhole {
    let host = std::env::var("E2E_HOST_IP").unwrap_or_else(|_| "10.77.255.254".into());
    Blackhole::new(node, &format!("{host}/32"))
}

/// Two tenants served by every node; `fault` is applied to `node`'s agent: every tenant's
/// ready set must lose that node, and only it, within the freshness bound, and get it back once
/// the fault (the guard `fault` returns) is dropped.
async fn a_faulty_agent_leaves_every_tenants_ready_set<G>(
    tenants: [&str; 2],
    node: &str,
    what: &str,
    fault: impl FnOnce() -> G,
) {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    for ns in tenants {
        namespace(&client, ns, serde_json::json!({})).await;
        apply_tenant(&client, ns, serde_json::json!({})).await;
    }
    let all_ready =
        |e: &Vec<(String, bool)>| e.len() == agent_nodes().len() && e.iter().all(|(_, r)| *r);
    for ns in tenants {
        wait_for(
            Duration::from_secs(60),
            "a ready endpoint per node",
            || async { endpoint_readiness(&client, ns).await.filter(all_ready) },
        )
        .await;
    }

    let guard = fault();
    let start = Instant::now();
    let mut left_after = Vec::new();
    for ns in tenants {
        wait_for(
            FRESHNESS_BOUND + Duration::from_secs(30),
            &format!("the endpoint of the agent ({what}) to turn not ready"),
            || async {
                endpoint_readiness(&client, ns)
                    .await
                    .filter(|e| e.iter().any(|(n, r)| n == node && !*r))
            },
        )
        .await;
        left_after.push(start.elapsed());
    }
    let worst = left_after.iter().max().copied().unwrap();
    for ns in tenants {
        let e = endpoint_readiness(&client, ns).await.unwrap();
        assert_eq!(
            e.iter().filter(|(_, r)| *r).count(),
            agent_nodes().len() - 1,
            "{ns}: only the agent on {node} left the ready set: {e:?}"
        );
    }
    eprintln!(
        "{what} of the agent on {node}: out of every tenant's ready set after {:.1} s \
         (per tenant: {}; freshness bound {} s)",
        worst.as_secs_f64(),
        left_after
            .iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        FRESHNESS_BOUND.as_secs()
    );
    // Its last renewal was at most one heartbeat before the fault; a small allowance covers
    // the reconcile, the EndpointSlice write and this test's 200 ms polling.
    assert!(
        worst <= FRESHNESS_BOUND + Duration::from_secs(3),
        "left the ready set after {worst:?}, beyond the bound"
    );

    drop(guard);
    let start = Instant::now();
    for ns in tenants {
        wait_for(
            Duration::from_secs(60),
            "ready again once the fault is gone",
            || async { endpoint_readiness(&client, ns).await.filter(all_ready) },
        )
        .await;
    }
    eprintln!(
        "{what} ended: back in every tenant's ready set after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for ns in tenants {
        let ttp: Api<TenantTimePolicy> = Api::namespaced(client.clone(), ns);
        delete(&ttp, "ntp").await;
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn a_stopped_agent_leaves_every_tenants_ready_set_within_the_freshness_bound() {
    let node = "kwok-node-1";
    a_faulty_agent_leaves_every_tenants_ready_set(
        ["e2e-fresh-a", "e2e-fresh-b"],
        node,
        "SIGSTOP",
        || Stopped::new(agent_pid(node)),
    )
    .await;
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn an_agent_cut_off_from_the_api_server_leaves_every_tenants_ready_set_within_the_bound() {
    a_faulty_agent_leaves_every_tenants_ready_set(
        ["e2e-cut-a", "e2e-cut-b"],
        "kwok-node-2",
        "API server cut-off",
        || cut_api_server("kwok-node-2"),
    )
    .await;
}
