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
//! The second test shows the shared cookie master keys behind the Service: a tenant with
//! Closest routing gets its cookies through the real node's agent; with that agent cut off
//! from its upstreams (not ready), kube-proxy sends the same pod to a kwok node's agent
//! (whose key material the stand-in kubelet mounts from the same Secret), and chronyd's
//! saved cookies authenticate there without a new key exchange. Then a cookie key rotation
//! asked of the operator (the TimeService annotation `stratum.io/rotate-cookie-keys`): the
//! same saved cookies still authenticate after one rotation, and after a second get the NTS
//! NAK, on which chronyd runs a fresh key exchange and is authenticated again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The agent's test PKI (openssl: a CA and a server certificate it signed).
#[path = "../../agent/tests/pki/mod.rs"]
mod pki;

use std::collections::BTreeMap;
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
    assert!(
        !saved_cookies(&dir).is_empty(),
        "chronyd dumped no NTS cookies in {dir:?}"
    );
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
    // Tenant B names A's key Secret as its own: it is looked up in B's namespace, where there
    // is none. B's policy says so, B's Service does not sign with A's key, and A is untouched.
    apply_tenant(
        &client,
        b,
        serde_json::json!({
            "authentication": {"symmetricKeysSecret": "device-keys"},
            "rateLimit": {"kissOfDeath": true}
        }),
    )
    .await;
    let b_policies: Api<TenantTimePolicy> = Api::namespaced(client.clone(), b);
    let (b_keys, _) = wait_for(
        Duration::from_secs(60),
        "tenant B's SymmetricKeysReady=False KeysSecretMissing",
        || async {
            condition(&b_policies.get("ntp").await.ok()?, "SymmetricKeysReady")
                .filter(|(status, reason, _)| status == "False" && reason == "KeysSecretMissing")
        },
    )
    .await;
    eprintln!("tenant B naming A's key Secret: SymmetricKeysReady {b_keys:?}");
    let server_b = format!("server ntp.{b}.svc.cluster.local key 1 iburst maxsamples 4");
    assert_eq!(
        pod_b.chronyd_query(&[&right, &server_b]),
        None,
        "tenant B's Service signed with A's key"
    );
    let (offset, _) = wait_for(
        Duration::from_secs(60),
        "tenant A still served with its key",
        || async { pod_a.chronyd_query(&[&right, &server]) },
    )
    .await;
    assert!(offset.abs() < 0.05, "chronyd measured {offset} s");

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

/// One agent's counter for `tenant` from its own /metrics, summed over the other labels
/// that `extra` (e.g. `result="ok"`) allows; 0 when it has none.
fn tenant_counter(metrics: &str, family: &str, tenant: &str, extra: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| l.contains(&format!("tenant=\"{tenant}\"")) && l.contains(extra))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v) // not sum(): an empty f64 sum is -0
}

/// Each agent's `/metrics` page by node (`None` where it did not answer), read once for
/// every figure taken from it.
async fn agent_metrics(client: &kube::Client) -> BTreeMap<String, Option<String>> {
    let mut pages = BTreeMap::new();
    for node in agent_nodes() {
        let ip = node_ip(client, &node).await;
        pages.insert(node, http_get(&format!("http://{ip}:9123/metrics")));
    }
    pages
}

/// The page of an agent that must have answered.
fn page<'a>(node: &str, page: &'a Option<String>) -> &'a str {
    page.as_deref()
        .unwrap_or_else(|| panic!("{node}'s agent metrics"))
}

/// Per agent: `tenant`'s successful key exchanges and authenticated replies.
fn nts_counts_in(
    pages: &BTreeMap<String, Option<String>>,
    tenant: &str,
) -> BTreeMap<String, (f64, f64)> {
    pages
        .iter()
        .map(|(node, metrics)| {
            let page = page(node, metrics);
            let exchanges = tenant_counter(
                page,
                "stratum_agent_tenant_nts_key_exchanges_total",
                tenant,
                "result=\"ok\"",
            );
            let authenticated = tenant_counter(
                page,
                "stratum_agent_tenant_nts_authenticated_total",
                tenant,
                "",
            );
            (node.clone(), (exchanges, authenticated))
        })
        .collect()
}

/// [`nts_counts_in`] of the agents' pages now.
async fn nts_counts(client: &kube::Client, tenant: &str) -> BTreeMap<String, (f64, f64)> {
    nts_counts_in(&agent_metrics(client).await, tenant)
}

/// `stratum_agent_tenant_requests_total{outcome="nts_nak"}` of `tenant`, summed over the
/// agents.
fn nts_naks_in(pages: &BTreeMap<String, Option<String>>, tenant: &str) -> f64 {
    pages
        .iter()
        .map(|(node, metrics)| {
            tenant_counter(
                page(node, metrics),
                "stratum_agent_tenant_requests_total",
                tenant,
                "outcome=\"nts_nak\"",
            )
        })
        .fold(0.0, |sum, v| sum + v)
}

/// The cookie master key id each agent seals with (`stratum_agent_nts_cookie_key_id`).
async fn cookie_key_ids(client: &kube::Client) -> BTreeMap<String, Option<f64>> {
    agent_metrics(client)
        .await
        .into_iter()
        .map(|(node, page)| {
            let id = page
                .as_deref()
                .and_then(|p| {
                    p.lines()
                        .find(|l| l.starts_with("stratum_agent_nts_cookie_key_id "))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok());
            (node, id)
        })
        .collect()
}

/// Asks the operator to rotate the shared TimeService's cookie keys now, as an admin would
/// (`kubectl annotate timeservice e2e stratum.io/rotate-cookie-keys=<time> --overwrite`), and
/// waits until every agent seals with the key after `from`.
async fn rotate_cookie_keys(client: &kube::Client, request: &str, from: f64) -> Duration {
    use kube::api::{Patch, PatchParams};
    let api: Api<stratum_api::TimeService> = Api::all(client.clone());
    api.patch(
        SHARED_TIME_SERVICE,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "metadata": {"annotations": {"stratum.io/rotate-cookie-keys": request}}
        })),
    )
    .await
    .unwrap();
    // The real kubelet refreshes Secret volumes about once a minute; the stand-in every 3 s.
    let ((), took) = wait_for(
        Duration::from_secs(240),
        "every agent sealing with the rotated cookie key",
        || async {
            let ids = cookie_key_ids(client).await;
            ids.values().all(|id| *id == Some(from + 1.0)).then_some(())
        },
    )
    .await;
    took
}

/// When the operator last rotated the shared TimeService's cookie keys (the key material
/// Secret's `stratum.io/cookie-keys-rotated-at`).
async fn cookie_keys_rotated_at(client: &kube::Client) -> k8s_openapi::jiff::Timestamp {
    let secret = Api::<Secret>::namespaced(client.clone(), AGENT_NAMESPACE)
        .get(&format!("{SHARED_TIME_SERVICE}-agent-nts"))
        .await
        .expect("the TimeService's key material Secret");
    secret
        .metadata
        .annotations
        .and_then(|a| a.get("stratum.io/cookie-keys-rotated-at")?.parse().ok())
        .expect("the rotation time on the key material Secret")
}

/// Messages of the Events with `reason` on the shared TimeService.
async fn time_service_events(client: &kube::Client, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    events
        .list(&kube::api::ListParams::default().fields(&format!("reason={reason}")))
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(SHARED_TIME_SERVICE))
        .filter_map(|e| e.message)
        .collect()
}

/// chronyd's saved NTS state (cookies and keys, one file per server) in `dir`.
fn saved_cookies(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "nts"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn cookies_from_one_agent_authenticate_at_another_behind_the_service() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ns = "e2e-nts-cross";
    namespace(&client, ns, serde_json::json!({})).await;
    let name = format!("ntp.{ns}.svc.cluster.local");
    let dir = run_dir().join("e2e-nts-cross");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let made = pki::make_pki_for(&dir, "tenant", &format!("DNS:{name}"));
    apply(
        &Api::<Secret>::namespaced(client.clone(), ns),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "ntp-tls", "namespace": ns},
            "stringData": {
                "tls.crt": std::fs::read_to_string(&made.cert).unwrap(),
                "tls.key": std::fs::read_to_string(&made.key).unwrap(),
            }
        }),
    )
    .await;
    // NTS offered, not required: a plain probe then shows which agent kube-proxy picks (an
    // unsynchronized one answers with leap 3). chronyd with `nts` never takes plain time.
    apply_tenant(
        &client,
        ns,
        serde_json::json!({
            "authentication": {"nts": true, "ntsCertificateSecret": "ntp-tls"},
            "service": {"routing": "Closest"}
        }),
    )
    .await;
    let policies: Api<TenantTimePolicy> = Api::namespaced(client.clone(), ns);
    wait_for(Duration::from_secs(60), "NTSReady=True", || async {
        condition(&policies.get("ntp").await.ok()?, "NTSReady")
            .filter(|(status, _, _)| status == "True")
    })
    .await;
    let tenant = format!("{ns}/ntp");
    let node = real_node();
    let pod = real_pod(&client, ns, "client").await;
    let recipe = nts_recipe(ns, &made.ca, &dir);
    let recipe: Vec<&str> = recipe.iter().map(String::as_str).collect();

    // Closest with every agent ready: the real node's own agent runs the key exchange and
    // answers; chronyd keeps the cookies it was given in its dump directory.
    let (offset, took) = wait_for(
        Duration::from_secs(180),
        "chronyd -Q nts through the local agent",
        || async { pod.chronyd_query(&recipe) },
    )
    .await;
    eprintln!(
        "chronyd -Q nts {name}: offset {offset:+.6} s ({:.1} s to the first)",
        took.as_secs_f64()
    );
    let before = nts_counts(&client, &tenant).await;
    eprintln!("per agent (key exchanges, authenticated replies) for {tenant}: {before:?}");
    assert!(
        before[&node].0 >= 1.0,
        "the local agent ran the key exchange: {before:?}"
    );
    assert!(
        before[&node].1 >= 1.0,
        "the local agent authenticated: {before:?}"
    );

    // The local agent loses its upstreams: unsynchronized, not ready, and Closest sends the
    // pod's requests to another node's agent.
    let cut = cut_upstreams(&node);
    let vip = cluster_ip(&client, ns, "ntp").await;
    let (_, moved_after) = wait_for(
        Duration::from_secs(240),
        "a synchronized answer through the VIP with the local agent not ready",
        || async {
            let local_ready = endpoint_readiness(&client, ns)
                .await?
                .iter()
                .any(|(n, ready)| *n == node && *ready);
            let answer = pod.probe(&vip, 123)?;
            let synchronized = answer["leap"].as_u64() == Some(0) && answer["kissCode"].is_null();
            (!local_ready && synchronized).then_some(())
        },
    )
    .await;
    eprintln!(
        "{node}'s agent cut off: another agent answers through the VIP after {:.1} s",
        moved_after.as_secs_f64()
    );
    let cut_at = nts_counts(&client, &tenant).await;

    // The saved cookies, issued by the local agent, authenticate at the other one.
    let (offset, _) = wait_for(
        Duration::from_secs(60),
        "chronyd -Q nts with the saved cookies through another agent",
        || async { pod.chronyd_query(&recipe) },
    )
    .await;
    let after = nts_counts(&client, &tenant).await;
    eprintln!("per agent (key exchanges, authenticated replies) after: {after:?}");
    let exchanges =
        |c: &BTreeMap<String, (f64, f64)>| c.values().map(|v| v.0).fold(0.0, |s, v| s + v);
    assert_eq!(
        exchanges(&after),
        exchanges(&cut_at),
        "no new key exchange: the local agent's cookies were used"
    );
    let elsewhere: Vec<(&String, f64)> = after
        .iter()
        .filter(|(n, _)| **n != node)
        .map(|(n, (_, authenticated))| (n, authenticated - cut_at[n].1))
        .filter(|(_, served)| *served >= 1.0)
        .collect();
    assert!(
        !elsewhere.is_empty(),
        "no other agent authenticated the local agent's cookies: {cut_at:?} -> {after:?}"
    );
    assert!(offset.abs() < 0.05, "chronyd measured {offset} s");
    eprintln!(
        "cookies from {node}'s agent authenticated at {elsewhere:?} (offset {offset:+.6} s), \
         with no key exchange"
    );

    // Back: the local agent resynchronizes, for the tests after this one.
    drop(cut);
    wait_for(
        Duration::from_secs(180),
        "the real node's endpoint ready again",
        || async {
            endpoint_readiness(&client, ns)
                .await?
                .iter()
                .any(|(n, ready)| *n == node && *ready)
                .then_some(())
        },
    )
    .await;

    // A rotation asked of the operator: the cookies chronyd holds now (sealed with the
    // current key) still open through the Service after one rotation, with no key exchange.
    let held = saved_cookies(&dir);
    assert!(!held.is_empty(), "chronyd saved no NTS cookies in {dir:?}");
    let ids = cookie_key_ids(&client).await;
    let sealing = ids.values().flatten().copied().fold(0.0, f64::max);
    assert!(
        sealing >= 1.0 && ids.values().all(|id| *id == Some(sealing)),
        "every agent seals with one key before the rotation: {ids:?}"
    );
    // Unique per run, as `kubectl annotate ... =$(date +%s%N)` would be.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let took = rotate_cookie_keys(&client, &format!("{stamp}-1"), sealing).await;
    let first_rotation = cookie_keys_rotated_at(&client).await;
    assert!(
        time_service_events(&client, "NtsCookieKeysRotated")
            .await
            .iter()
            .any(|m| m.contains("rotated on request")),
        "the rotation's Event says it was asked for"
    );
    eprintln!(
        "rotation requested: every agent seals with key {} after {:.1} s",
        sealing + 1.0,
        took.as_secs_f64()
    );
    let restore = || {
        for (path, bytes) in &held {
            std::fs::write(path, bytes).unwrap();
        }
    };
    restore();
    let before = nts_counts(&client, &tenant).await;
    let (offset, _) = wait_for(
        Duration::from_secs(60),
        "chronyd -Q nts with cookies of the previous key",
        || async { pod.chronyd_query(&recipe) },
    )
    .await;
    let after = nts_counts(&client, &tenant).await;
    assert_eq!(
        exchanges(&after),
        exchanges(&before),
        "cookies of the previous key opened: no key exchange"
    );
    let authenticated =
        |c: &BTreeMap<String, (f64, f64)>| c.values().map(|v| v.1).fold(0.0, |s, v| s + v);
    assert!(authenticated(&after) > authenticated(&before));
    eprintln!("after one rotation the old cookies authenticate (offset {offset:+.6} s)");

    // A second rotation drops their key: the same cookies get the NTS NAK, and chronyd runs a
    // fresh key exchange and is authenticated again, never served plain time. It comes no
    // sooner than 2 minutes after the first, so every agent already holds the key it makes
    // current; asked sooner, the operator says when it will be.
    let asked_at = k8s_openapi::jiff::Timestamp::now();
    let took = rotate_cookie_keys(&client, &format!("{stamp}-2"), sealing + 1.0).await;
    let second_rotation = cookie_keys_rotated_at(&client).await;
    let spacing = second_rotation.duration_since(first_rotation);
    assert!(
        spacing >= k8s_openapi::jiff::SignedDuration::from_secs(120),
        "rotations {spacing} apart"
    );
    if asked_at.duration_since(first_rotation) < k8s_openapi::jiff::SignedDuration::from_secs(115) {
        let waiting = time_service_events(&client, "NtsCookieKeyRotationWaiting").await;
        // The time it names is the first rotation's plus the spacing, exactly.
        let due = first_rotation + k8s_openapi::jiff::SignedDuration::from_secs(120);
        assert!(
            waiting.iter().any(|m| m.contains(&due.to_string())),
            "asked {} after the first rotation: an Event says the second happens at {due}: \
             {waiting:?}",
            asked_at.duration_since(first_rotation)
        );
    }
    eprintln!(
        "second rotation: every agent seals with key {} after {:.1} s",
        sealing + 2.0,
        took.as_secs_f64()
    );
    restore();
    let pages = agent_metrics(&client).await;
    let (before, naks_before) = (nts_counts_in(&pages, &tenant), nts_naks_in(&pages, &tenant));
    let (offset, _) = wait_for(
        Duration::from_secs(90),
        "chronyd -Q nts re-keyed after its cookies were refused",
        || async { pod.chronyd_query(&recipe) },
    )
    .await;
    let pages = agent_metrics(&client).await;
    let (after, naks_after) = (nts_counts_in(&pages, &tenant), nts_naks_in(&pages, &tenant));
    assert!(
        naks_after > naks_before,
        "cookies two rotations old get the NTS NAK ({naks_before} -> {naks_after})"
    );
    assert!(
        exchanges(&after) > exchanges(&before),
        "chronyd ran a new key exchange: {before:?} -> {after:?}"
    );
    assert!(offset.abs() < 0.05, "chronyd measured {offset} s");
    eprintln!(
        "after two rotations: {} NTS NAKs, a new key exchange, authenticated time again \
         (offset {offset:+.6} s)",
        naks_after - naks_before
    );
}
