//! Issue 18, must-show 1, on the real API server, which runs with the chart's audit policy
//! (`e2e/scripts/cluster.sh`): one user changes a tenant's allow list and then a
//! TimeService's upstreams, another user is refused, and `stratumctl report --audit-log`
//! lists both changes with the right user and the field diff, and the refused attempt as
//! refused. The users are ServiceAccounts with tokens from the TokenRequest API: real
//! authentication, not impersonation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use stratum_api::{TenantTimePolicy, TimeService};
use stratum_e2e::harness::*;

const NS: &str = "e2e-audit";
/// A TimeService on no node: its changes are audited, and it overlaps nobody.
const TS: &str = "e2e-audit";
const EDITOR: &str = "e2e-audit-editor";

/// A token for ServiceAccount `name` in [`NS`], created if missing.
async fn token_for(client: &Client, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    apply(
        &accounts,
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                           "metadata": {"name": name, "namespace": NS}}),
    )
    .await;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(600),
            bound_object_ref: None,
        }),
        ..Default::default()
    };
    let response: TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    response.status.and_then(|s| s.token).expect("a token")
}

/// A client for the same API server that authenticates with `token` only.
async fn client_as(token: &str) -> Client {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG from e2e/stack.sh env");
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let users = doc["users"]
        .as_sequence_mut()
        .expect("users in the kubeconfig");
    for user in users.iter_mut() {
        user["user"] = serde_yaml::to_value(serde_json::json!({ "token": token })).unwrap();
    }
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(&serde_yaml::to_string(&doc).unwrap()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Deletes this test's TimeService and RBAC objects when the test ends, passed or failed: a
/// second TimeService makes every tenant without a `timeServiceRef` ambiguous, so the tests
/// after this one would find their tenants unserved. Blocking, so it also runs while a failed
/// assertion unwinds.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (kind, name) in [
            ("timeservice", TS),
            ("clusterrolebinding", EDITOR),
            ("clusterrole", EDITOR),
        ] {
            let _ = std::process::Command::new("kubectl")
                .args(["delete", kind, name, "--ignore-not-found", "--wait=true"])
                .args(["--timeout=60s"])
                .status();
        }
    }
}

fn merge(value: serde_json::Value) -> Patch<serde_json::Value> {
    Patch::Merge(value)
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn the_report_names_who_changed_what_and_the_refused_attempt_from_the_audit_log() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    // Whole seconds: the report's period is RFC 3339, and the API server stamps microseconds.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1;
    namespace(&client, NS, serde_json::json!({})).await;
    apply_tenant(
        &client,
        NS,
        serde_json::json!({"timeServiceRef": SHARED_TIME_SERVICE,
                           "allowedClients": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}),
    )
    .await;
    let _cleanup = Cleanup;
    let time_services: Api<TimeService> = Api::all(client.clone());
    apply(
        &time_services,
        serde_json::json!({
            "apiVersion": "stratum.io/v1alpha1", "kind": "TimeService",
            "metadata": {"name": TS},
            "spec": {
                "upstreams": [{"host": "ntp-a.invalid", "kind": "Server"}],
                "placement": {"nodeSelector": {"stratum.io/e2e-audit": "no-such-node"}}
            }
        }),
    )
    .await;

    // alice may edit Stratum's objects; bob may not.
    let roles: Api<ClusterRole> = Api::all(client.clone());
    apply(
        &roles,
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": EDITOR},
            "rules": [{"apiGroups": ["stratum.io"],
                       "resources": ["timeservices", "tenanttimepolicies"],
                       "verbs": ["get", "list", "watch", "patch", "update"]}]
        }),
    )
    .await;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    apply(
        &bindings,
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": EDITOR},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": EDITOR},
            "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": NS}]
        }),
    )
    .await;
    let alice = client_as(&token_for(&client, "alice").await).await;
    let bob = client_as(&token_for(&client, "bob").await).await;
    let alice_name = format!("system:serviceaccount:{NS}:alice");
    let bob_name = format!("system:serviceaccount:{NS}:bob");

    // RBAC takes a moment to reach the authorizer's cache: retry alice's first change.
    let tenants_as_alice: Api<TenantTimePolicy> = Api::namespaced(alice.clone(), NS);
    let allow = merge(serde_json::json!({"spec": {"allowedClients":
        [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}}));
    wait_for(
        Duration::from_secs(30),
        "alice may patch the tenant",
        || async {
            tenants_as_alice
                .patch("ntp", &PatchParams::default(), &allow)
                .await
                .ok()
        },
    )
    .await;
    let time_services_as_alice: Api<TimeService> = Api::all(alice);
    time_services_as_alice
        .patch(
            TS,
            &PatchParams::default(),
            &merge(serde_json::json!({"spec": {"upstreams":
                [{"host": "ntp-b.invalid", "kind": "Server"}]}})),
        )
        .await
        .expect("alice changes the upstreams");
    let tenants_as_bob: Api<TenantTimePolicy> = Api::namespaced(bob, NS);
    let refused = tenants_as_bob
        .patch(
            "ntp",
            &PatchParams::default(),
            &merge(serde_json::json!({"spec": {"allowedClients":
                [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}})),
        )
        .await
        .expect_err("bob may not patch the tenant");
    assert!(refused.to_string().contains("forbidden"), "{refused}");

    // The log backend writes each event as the request completes; wait for bob's.
    let audit_log = run_dir().join("logs/audit.log");
    wait_for(
        Duration::from_secs(20),
        "bob's attempt in the audit log",
        || async {
            std::fs::read_to_string(&audit_log)
                .ok()?
                .contains(&bob_name)
                .then_some(())
        },
    )
    .await;

    let target = std::env::var("STRATUM_E2E_TARGET").expect("STRATUM_E2E_TARGET");
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    let rfc3339 = |secs: u64| {
        k8s_openapi::jiff::Timestamp::from_second(secs as i64)
            .unwrap()
            .to_string()
    };
    let out = std::process::Command::new(format!("{target}/stratumctl"))
        .args([
            "report",
            "--since",
            &rfc3339(since),
            "--until",
            &rfc3339(until),
            "--audit-log",
            audit_log.to_str().unwrap(),
            "-o",
            "json",
        ])
        .output()
        .expect("stratumctl report runs");
    assert!(
        out.status.success(),
        "stratumctl report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let records = report["changes"]["records"].as_array().expect("records");
    let ours = |user: &str, kind: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r["user"] == user && r["kind"] == kind)
            .filter(|r| r["name"] == "ntp" || r["name"] == TS)
            .collect()
    };
    let fields = |r: &serde_json::Value| -> String { r["fields"].to_string() };

    // alice's first tries may have been refused while RBAC reached the authorizer.
    let allow_change: Vec<_> = ours(&alice_name, "TenantTimePolicy")
        .into_iter()
        .filter(|r| r["outcome"]["result"] == "applied")
        .collect();
    assert_eq!(allow_change.len(), 1, "{records:#?}");
    let allow_change = allow_change[0];
    assert_eq!(allow_change["namespace"], NS);
    assert_eq!(
        allow_change["outcome"]["result"], "applied",
        "{allow_change}"
    );
    assert!(
        fields(allow_change).contains("192.0.2.0/24")
            && fields(allow_change).contains("198.51.100.0/24"),
        "the allow-list diff names the old and the new CIDR: {allow_change}"
    );

    let upstream_change = ours(&alice_name, "TimeService");
    assert_eq!(upstream_change.len(), 1, "{records:#?}");
    let upstream_change = upstream_change[0];
    assert!(
        fields(upstream_change).contains("ntp-a.invalid")
            && fields(upstream_change).contains("ntp-b.invalid"),
        "the upstream diff names the old and the new host: {upstream_change}"
    );
    assert!(
        allow_change["time"].as_str() < upstream_change["time"].as_str(),
        "the allow list changed first"
    );

    let attempt = ours(&bob_name, "TenantTimePolicy");
    assert_eq!(attempt.len(), 1, "{records:#?}");
    assert_eq!(attempt[0]["outcome"]["result"], "refused", "{}", attempt[0]);
    assert_eq!(attempt[0]["outcome"]["code"], 403, "{}", attempt[0]);
    eprintln!(
        "report: alice's allow list {} then upstreams {}; bob refused at {}",
        allow_change["time"], upstream_change["time"], attempt[0]["time"]
    );
}
