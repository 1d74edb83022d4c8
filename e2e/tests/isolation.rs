//! One tenant can never hurt another, on the real API server with real agents: a namespace
//! applies every kind of bad TenantTimePolicy it can (zero intervals and zero maxRootDistance
//! are refused at admission by the CRD's CEL rules; a prefix explosion and an unknown time zone
//! pass admission and are refused by the operator, each alone, saying why), while another
//! tenant's new pod is served within the usual 2 s and a new tenant becomes Ready and served.
//! Figures are printed, not asserted beyond generous bounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kube::api::Api;
use stratum_api::{TenantTimePolicy, TimeService};
use stratum_e2e::harness::*;

const BAD: &str = "e2e-iso-bad";
const GOOD: &str = "e2e-iso-good";
const NEW: &str = "e2e-iso-new";

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
    })
}

/// The Accepted condition's reason and message once the operator has judged the tenant.
async fn refusal(api: &Api<TenantTimePolicy>, name: &str) -> Option<(String, String)> {
    let status = api.get(name).await.ok()?.status?;
    let accepted = status.conditions.iter().find(|c| c.type_ == "Accepted")?;
    (accepted.status == "False").then(|| (accepted.reason.clone(), accepted.message.clone()))
}

/// Serves `namespace`'s client pod `name` on `node` and returns how long after its address
/// it was first answered.
async fn served_after_address(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    node: &str,
    port: u16,
    netns: &str,
) -> Duration {
    let agent: std::net::IpAddr = node_ip(client, node).await.parse().unwrap();
    let ip = tenant_pod(client, namespace, name, node).await;
    let _ns = PodNetns::new(netns, &ip);
    let started = Instant::now();
    wait_for(
        Duration::from_secs(30),
        &format!("{namespace}/{name} served"),
        || async {
            query_from_netns(netns, (agent, port).into()).filter(|a| a["kissCode"].is_null())
        },
    )
    .await;
    started.elapsed()
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn bad_tenants_are_refused_alone_while_others_are_served_and_new_ones_become_ready() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    for ns in [BAD, GOOD, NEW] {
        namespace(&client, ns, serde_json::json!({})).await;
    }
    apply_tenant(&client, GOOD, serde_json::json!({})).await;
    let good_port = tenant_port(&client, GOOD).await;

    // Admission refuses what the CEL rules catch, each with its own message.
    let bad: Api<TenantTimePolicy> = Api::namespaced(client.clone(), BAD);
    for (name, spec, message) in [
        (
            "zero-interval",
            serde_json::json!({"rateLimit": {"perClient": {"interval": "0s"}}}),
            "rateLimit.perClient.interval must be a duration of at least 1ms",
        ),
        (
            "zero-root-distance",
            serde_json::json!({"requirements": {"maxRootDistance": "0s"}}),
            "requirements.maxRootDistance must be a duration of at least 1ms",
        ),
    ] {
        let err = bad
            .create(
                &Default::default(),
                &serde_json::from_value(policy(BAD, name, spec)).unwrap(),
            )
            .await
            .expect_err("the API server accepted a zero duration");
        let text = err.to_string();
        assert!(text.contains(message), "{name}: {text}");
        eprintln!("{name}: refused at admission: {message}");
    }

    // What passes admission is refused by the operator, each tenant alone.
    let block = |i: u32| {
        serde_json::json!({"ipBlock": {
            "cidr": format!("fd{i:02x}::/16"),
            "except": (1..=64).map(|j| format!("fd{i:02x}:{j:x}::1/128")).collect::<Vec<_>>()
        }})
    };
    let applied_at = Instant::now();
    apply(
        &bad,
        policy(
            BAD,
            "prefix-explosion",
            serde_json::json!({"service": {"name": "ntp-explosion"},
                               "allowedClients": (1..=4).map(block).collect::<Vec<_>>()}),
        ),
    )
    .await;
    apply(
        &bad,
        policy(
            BAD,
            "bad-timezone",
            serde_json::json!({"service": {"name": "ntp-tz"}, "timezone": "Mars/Olympus_Mons"}),
        ),
    )
    .await;
    for (name, reason, field) in [
        (
            "prefix-explosion",
            "TooManyPrefixes",
            "spec.allowedClients[1].ipBlock",
        ),
        ("bad-timezone", "InvalidTimezone", "spec.timezone"),
    ] {
        let ((got, message), _) =
            wait_for(Duration::from_secs(30), &format!("{name} refused"), || {
                refusal(&bad, name)
            })
            .await;
        assert_eq!(got, reason, "{name}: {message}");
        assert!(message.contains(field), "{name}: {message}");
        eprintln!(
            "{name}: refused {:.2} s after apply: {reason}: {message}",
            applied_at.elapsed().as_secs_f64()
        );
    }

    // Meanwhile another tenant's new pod is served as fast as ever.
    let latency = served_after_address(
        &client,
        GOOD,
        "newcomer",
        "kwok-node-1",
        good_port,
        "e2e-t-iso-good",
    )
    .await;
    eprintln!(
        "{GOOD}: new pod served {:.2} s after it got its address, with bad tenants present (goal: 2 s)",
        latency.as_secs_f64()
    );
    assert!(latency < Duration::from_secs(10), "took {latency:?}");

    // A new tenant becomes Ready and served.
    let created = Instant::now();
    apply_tenant(&client, NEW, serde_json::json!({})).await;
    let new: Api<TenantTimePolicy> = Api::namespaced(client.clone(), NEW);
    let (new_port, ready_after) =
        wait_for(Duration::from_secs(60), "the new tenant Ready", || async {
            let s = new.get("ntp").await.ok()?.status?;
            let ready = s
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(s.port?)
        })
        .await;
    let new_latency = served_after_address(
        &client,
        NEW,
        "client",
        "kwok-node-2",
        new_port as u16,
        "e2e-t-iso-new",
    )
    .await;
    eprintln!(
        "{NEW}: Ready {:.2} s after apply; its pod served {:.2} s after its address ({:.2} s after apply)",
        ready_after.as_secs_f64(),
        new_latency.as_secs_f64(),
        created.elapsed().as_secs_f64()
    );
    assert!(
        new_latency < Duration::from_secs(10),
        "took {new_latency:?}"
    );

    // The TimeService is not degraded by any of it.
    let ts: Api<TimeService> = Api::all(client.clone());
    let status = ts.get(SHARED_TIME_SERVICE).await.unwrap().status.unwrap();
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "False", "{degraded:?}");

    for name in ["prefix-explosion", "bad-timezone"] {
        delete(&bad, name).await;
    }
}
