//! Issue 16's tenant NTS through the whole product: a TenantTimePolicy asks for NTS with a
//! `kubernetes.io/tls` Secret in its namespace (made here with openssl, as cert-manager would
//! write it) and requires it (`unauthenticated: Deny`). The operator copies the certificate
//! into the TimeService's key material Secret with the cookie master keys; the real kubelet
//! mounts it into the real node's agent; a real NTS client, `chronyd -Q` with the recipe
//! `examples/clients/chrony-nts.conf`, in a real pod resolves the tenant's Service by name and gets authenticated time through the
//! ClusterIP: key exchange on TCP 4460, NTP on UDP 123, both DNATed by kube-proxy to the
//! agent's tenant port. A request without NTS gets DENY; another tenant's pod is refused at
//! the key exchange and at NTP. Then symmetric keys on the same tenant: a key Secret the
//! operator copies, `chronyd -Q` with a keyfile served signed through the Service, a wrong key
//! and another tenant's pod not. The stack's Prometheus shows the authenticated requests.
//!
//! Only the real node's agent has a kubelet that mounts Secrets (the kwok nodes' agents are
//! processes of the stand-in, with hostPath volumes only), so the tenant uses NodeLocal
//! routing: the real pod reaches the real node's agent. Cookies crossing agents are shown by
//! the agent's own test (`a_cookie_from_one_agent_works_at_another_...`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The agent's test PKI (openssl: a CA and a server certificate it signed).
#[path = "../../agent/tests/pki/mod.rs"]
mod pki;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::Api;
use stratum_api::TenantTimePolicy;
use stratum_e2e::harness::*;
use stratum_e2e::real_node::*;

/// `examples/clients/chrony-nts.conf` for tenant `namespace`, its directives one per item,
/// with the test's CA and a run directory of its own for cookies and drift.
fn nts_recipe(namespace: &str, ca: &std::path::Path, dir: &std::path::Path) -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/clients/chrony-nts.conf"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let recipe: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.replace("team-a", namespace)
                .replace("/etc/chrony/ntp-ca.crt", &ca.display().to_string())
                .replace("/var/lib/chrony", &dir.display().to_string())
        })
        .collect();
    assert!(
        recipe
            .iter()
            .any(|l| l.starts_with("server ") && l.contains(" nts")),
        "{recipe:?}"
    );
    recipe
}

fn condition(t: &TenantTimePolicy, type_: &str) -> Option<(String, String, String)> {
    condition_of(&t.status.as_ref()?.conditions, type_)
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn a_real_pod_gets_nts_time_from_its_tenants_service_and_others_are_refused() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let prometheus = std::env::var("STRATUM_E2E_PROMETHEUS").expect("STRATUM_E2E_PROMETHEUS");
    let (a, b) = ("e2e-nts-a", "e2e-nts-b");
    namespace(&client, a, serde_json::json!({})).await;
    namespace(&client, b, serde_json::json!({})).await;
    let name = format!("ntp.{a}.svc.cluster.local");
    let dir = run_dir().join("e2e-nts-tenant");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let made = pki::make_pki_for(&dir, "tenant", &format!("DNS:{name}"));
    let (cert, key) = (
        std::fs::read_to_string(&made.cert).unwrap(),
        std::fs::read_to_string(&made.key).unwrap(),
    );

    // Tenant A asks for NTS before its Secret exists: accepted, waiting for the certificate.
    let policies: Api<TenantTimePolicy> = Api::namespaced(client.clone(), a);
    apply_tenant(
        &client,
        a,
        serde_json::json!({
            "authentication": {"nts": true, "ntsCertificateSecret": "ntp-tls", "unauthenticated": "Deny"},
            "rateLimit": {"kissOfDeath": true}
        }),
    )
    .await;
    apply_tenant(
        &client,
        b,
        serde_json::json!({"rateLimit": {"kissOfDeath": true}}),
    )
    .await;
    let (missing, _) = wait_for(
        Duration::from_secs(60),
        "NTSReady=False CertificateSecretMissing",
        || async {
            condition(&policies.get("ntp").await.ok()?, "NTSReady").filter(|(status, reason, _)| {
                status == "False" && reason == "CertificateSecretMissing"
            })
        },
    )
    .await;
    eprintln!("before its Secret: NTSReady {missing:?}");

    // The Secret, as cert-manager writes it. While a certificate is missing the operator
    // looks again every 15 s, so nothing needs to be touched.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), a);
    apply(
        &secrets,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "ntp-tls", "namespace": a},
            "stringData": {"tls.crt": cert, "tls.key": key}
        }),
    )
    .await;
    let (ready, took) = wait_for(Duration::from_secs(60), "NTSReady=True", || async {
        condition(&policies.get("ntp").await.ok()?, "NTSReady")
            .filter(|(status, _, _)| status == "True")
    })
    .await;
    eprintln!(
        "NTSReady {ready:?} {:.1} s after the Secret",
        took.as_secs_f64()
    );

    // The Service gained the key exchange; the key material Secret holds the copy and the
    // cookie keys; the agents' ConfigMap holds paths, never key material.
    let service = Api::<Service>::namespaced(client.clone(), a)
        .get("ntp")
        .await
        .unwrap();
    let ports: Vec<_> = service
        .spec
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .map(|p| {
            (
                p.name.unwrap_or_default(),
                p.protocol.unwrap_or_default(),
                p.port,
            )
        })
        .collect();
    assert!(
        ports.contains(&("nts-ke".into(), "TCP".into(), 4460)),
        "{ports:?}"
    );
    let material = Api::<Secret>::namespaced(client.clone(), AGENT_NAMESPACE)
        .get(&format!("{SHARED_TIME_SERVICE}-agent-nts"))
        .await
        .expect("the TimeService's key material Secret");
    let members = material.data.unwrap_or_default();
    assert!(
        members.contains_key("cookie-keys.json"),
        "{:?}",
        members.keys()
    );
    assert!(
        members.values().any(|v| v.0 == key.as_bytes()),
        "the tenant's key was copied"
    );
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), AGENT_NAMESPACE)
        .get(&format!("{SHARED_TIME_SERVICE}-agent-config"))
        .await
        .unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let config_text = serde_json::to_string(&config_map).unwrap();
    assert!(
        !config_text.contains(&key_body[..40]),
        "key material in the agent ConfigMap"
    );

    let pod_a = real_pod(&client, a, "client").await;
    let pod_b = real_pod(&client, b, "client").await;
    let recipe = nts_recipe(a, &made.ca, &dir);
    let recipe: Vec<&str> = recipe.iter().map(String::as_str).collect();

    // chronyd with the NTS client recipe (trusting the test CA), resolving the Service by
    // name: authenticated time, once the kubelet has written the Secret's new members into
    // the agent's volume (it does at its next pod sync, within about a minute). The tenant denies requests without NTS, and chronyd never
    // falls back to them, so any time it gets is NTS time.
    let (offset, took) = wait_for(
        Duration::from_secs(180),
        "chronyd -Q nts in tenant A's pod",
        || async { pod_a.chronyd_query(&recipe) },
    )
    .await;
    eprintln!(
        "chronyd -Q nts {name} from a real pod: offset {offset:+.6} s ({:.1} s to the first)",
        took.as_secs_f64()
    );
    assert!(offset.abs() < 0.05, "chronyd measured {offset} s");

    // Without NTS, tenant A's own pod gets DENY: the tenant requires it.
    let vip = cluster_ip(&client, a, "ntp").await;
    let plain = pod_a.probe(&vip, 123).expect("a reply to a plain request");
    assert_eq!(plain["kissCode"], "DENY", "{plain}");

    // Tenant B's pod with A's cookies (the recipe's ntsdumpdir, where A's chronyd left them:
    // stolen cookies, valid ones): chronyd skips the key exchange and sends NTS requests that
    // would authenticate, but the allow list comes first. No time.
    let dump = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".nts"))
        .collect::<Vec<_>>();
    assert!(!dump.is_empty(), "chronyd dumped no NTS cookies in {dir:?}");
    assert_eq!(
        pod_b.chronyd_query(&recipe),
        None,
        "tenant B's pod got NTS time from A's Service with A's cookies"
    );
    // With a dump directory of its own it runs the key exchange, and is refused there
    // (closed before TLS), then at NTP.
    let dir_b = dir.join("tenant-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let recipe_b = nts_recipe(a, &made.ca, &dir_b);
    let recipe_b: Vec<&str> = recipe_b.iter().map(String::as_str).collect();
    assert_eq!(
        pod_b.chronyd_query(&recipe_b),
        None,
        "tenant B's pod got NTS time from A's Service"
    );
    let b_on_a = pod_b.probe(&vip, 123).expect("KoD for tenant B's pod");
    assert_eq!(b_on_a["kissCode"], "DENY", "{b_on_a}");

    // Symmetric keys on the same tenant, for its devices: a key Secret in its namespace, the
    // policy naming it. The operator checks the key file and copies it next to the
    // certificate; the agent answers chronyd's signed requests signed with the same key.
    let keys = "# the lab's switches\n1 AES128 HEX:5a1e0c3b9d8f7e6a5b4c3d2e1f001122\n";
    apply(
        &secrets,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "device-keys", "namespace": a},
            "stringData": {"keys": keys}
        }),
    )
    .await;
    apply_tenant(
        &client,
        a,
        serde_json::json!({
            "authentication": {"nts": true, "ntsCertificateSecret": "ntp-tls",
                               "symmetricKeysSecret": "device-keys", "unauthenticated": "Deny"},
            "rateLimit": {"kissOfDeath": true}
        }),
    )
    .await;
    let (keys_ready, took) = wait_for(
        Duration::from_secs(60),
        "SymmetricKeysReady=True",
        || async {
            condition(&policies.get("ntp").await.ok()?, "SymmetricKeysReady")
                .filter(|(status, _, _)| status == "True")
        },
    )
    .await;
    eprintln!(
        "SymmetricKeysReady {keys_ready:?} {:.1} s after the policy named the keys",
        took.as_secs_f64()
    );
    let material = Api::<Secret>::namespaced(client.clone(), AGENT_NAMESPACE)
        .get(&format!("{SHARED_TIME_SERVICE}-agent-nts"))
        .await
        .unwrap();
    assert!(
        material
            .data
            .unwrap_or_default()
            .iter()
            .any(|(member, v)| member.ends_with(".keys")
                && v.0.ends_with(b"HEX:5a1e0c3b9d8f7e6a5b4c3d2e1f001122\n")),
        "the tenant's keys were copied"
    );
    let config_text = serde_json::to_string(
        &Api::<ConfigMap>::namespaced(client.clone(), AGENT_NAMESPACE)
            .get(&format!("{SHARED_TIME_SERVICE}-agent-config"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        !config_text.contains("5a1e0c3b9d8f"),
        "key material in the agent ConfigMap"
    );
    let keyfile = |tag: &str, text: &str| {
        let path = dir.join(format!("chrony-{tag}.keys"));
        std::fs::write(&path, text).unwrap();
        format!("keyfile {}", path.display())
    };
    let server = format!("server {name} key 1 iburst maxsamples 4");
    let right = keyfile("right", keys);
    let (offset, took) = wait_for(
        Duration::from_secs(180),
        "chronyd -Q with the tenant's key in tenant A's pod",
        || async { pod_a.chronyd_query(&[&right, &server]) },
    )
    .await;
    eprintln!(
        "chronyd -Q key 1 (AES128) {name} from a real pod: offset {offset:+.6} s ({:.1} s to the first)",
        took.as_secs_f64()
    );
    assert!(offset.abs() < 0.05, "chronyd measured {offset} s");
    let wrong = keyfile("wrong", "1 AES128 HEX:5a1e0c3b9d8f7e6a5b4c3d2e1f001123\n");
    assert_eq!(
        pod_a.chronyd_query(&[&wrong, &server]),
        None,
        "a wrong key got time"
    );
    assert_eq!(
        pod_b.chronyd_query(&[&right, &server]),
        None,
        "tenant B's pod got time from A's Service with A's key"
    );

    // The agent counted the authenticated requests and the key exchanges it served.
    let tenant = format!("{a}/ntp");
    let (signed, _) = wait_for(
        Duration::from_secs(90),
        "signed replies in Prometheus",
        || async {
            prometheus_value(
                &prometheus,
                &format!(
                    r#"sum(stratum_agent_tenant_symmetric_authenticated_total{{tenant="{tenant}"}})"#
                ),
            )
            .filter(|n| *n >= 1.0)
        },
    )
    .await;
    let (naks, _) = wait_for(
        Duration::from_secs(90),
        "the wrong key's crypto-NAKs in Prometheus",
        || async {
            prometheus_value(
                &prometheus,
                &format!(
                    r#"sum(stratum_agent_tenant_requests_total{{tenant="{tenant}",outcome="mac_nak"}})"#
                ),
            )
            .filter(|n| *n >= 1.0)
        },
    )
    .await;
    eprintln!("Prometheus for {tenant}: {signed} signed replies, {naks} crypto-NAKs");
    let (authenticated, _) = wait_for(
        Duration::from_secs(90),
        "authenticated requests in Prometheus",
        || async {
            prometheus_value(
                &prometheus,
                &format!(
                    r#"sum(stratum_agent_tenant_nts_authenticated_total{{tenant="{tenant}"}})"#
                ),
            )
            .filter(|n| *n >= 1.0)
        },
    )
    .await;
    let exchanges = |result: &str| {
        prometheus_value(
            &prometheus,
            &format!(
                r#"sum(stratum_agent_tenant_nts_key_exchanges_total{{tenant="{tenant}",result="{result}"}})"#
            ),
        )
    };
    let (refused, _) = wait_for(
        Duration::from_secs(90),
        "tenant B's key exchange counted as not allowed",
        || async { exchanges("not_allowed").filter(|n| *n >= 1.0) },
    )
    .await;
    let ok = exchanges("ok").unwrap_or_default();
    assert!(ok >= 1.0, "no successful key exchange counted");
    eprintln!(
        "Prometheus for {tenant}: {authenticated} authenticated replies, {ok} key exchanges, \
         {refused} refused as not allowed"
    );

    // The dashboard's authentication panel shows this tenant in each of its queries.
    let queries =
        dashboard_queries("Authenticated replies (NTS, symmetric keys) and NTS key exchanges");
    assert_eq!(queries.len(), 3, "{queries:?}");
    for query in &queries {
        // Over the whole run: the panel's rate window stands for Grafana's.
        let q = query
            .replace("$tenant", ".*")
            .replace("$__rate_interval", "10m");
        let (series, _) = wait_for(Duration::from_secs(60), "the NTS panel's data", || async {
            let v = prometheus_query(&prometheus, &q, None)?;
            let found = v["data"]["result"]
                .as_array()?
                .iter()
                .any(|s| s["metric"]["tenant"] == tenant.as_str());
            found.then_some(v)
        })
        .await;
        eprintln!("dashboard NTS panel: {q}: {}", series["data"]["result"]);
    }
}
