//! Issue 16's NTS upstreams through the whole product: a TimeService names an NTS server and a
//! private CA (`spec.nts.caBundle`); the operator passes both to the agents; the agent on the
//! real node exchanges keys with chronyd's NTS-KE server (a CA and a certificate made by this
//! test with openssl) and polls it with authenticated NTP only. NodeClock shows the source at
//! the address the key exchange named, and the stack's Prometheus shows the key exchange and a
//! full cookie jar.
//!
//! chronyd runs `-x` (never adjusts a clock) without CAP_SYS_TIME in the real node's network
//! namespace, on that namespace's loopback, where the host-network agent reaches it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The agent's test PKI (openssl: a CA and a server certificate for 127.0.0.1), the same one
// its NTS tests use.
#[path = "../../agent/tests/pki/mod.rs"]
mod pki;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use stratum_api::node_clock::SourceState;
use stratum_api::{NodeClock, TimeService};
use stratum_e2e::harness::*;
use stratum_e2e::real_node::{chronyd_in_real_node, real_node};

/// NTS-KE and NTP ports of the test's chronyd: unprivileged, unused by the stack.
const KE_PORT: u16 = 24460;
const NTP_PORT: u16 = 24123;

/// chronyd serving NTS in the real node's network namespace; stopped on drop, and the shared
/// TimeService put back as every other test expects it.
struct Restore {
    chronyd: Child,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.chronyd.id().to_string()])
            .status();
        let _ = self.chronyd.wait();
    }
}

fn nts_chronyd(dir: &Path, cert: &str, key: &str) -> Child {
    let conf = dir.join("chrony.conf");
    std::fs::write(
        &conf,
        format!(
            "port {NTP_PORT}\nntsport {KE_PORT}\nbindaddress 127.0.0.1\ncmdport 0\n\
             local stratum 2\nallow 127.0.0.0/8\nntsserverkey {key}\nntsservercert {cert}\n\
             pidfile {}\ndriftfile {}\n",
            dir.join("chronyd.pid").display(),
            dir.join("chrony.drift").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("chronyd.log")).unwrap();
    chronyd_in_real_node(&conf, log)
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn the_real_nodes_agent_syncs_from_an_nts_server_through_the_time_services_ca_bundle() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let node = real_node();
    let prometheus = std::env::var("STRATUM_E2E_PROMETHEUS").expect("STRATUM_E2E_PROMETHEUS");
    let dir = run_dir().join("e2e-nts-upstream");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let made = pki::make_pki(&dir, "e2e");
    let ca = std::fs::read_to_string(&made.ca).unwrap();
    let (cert, key) = (
        made.cert.display().to_string(),
        made.key.display().to_string(),
    );
    let _restore = Restore {
        chronyd: nts_chronyd(&dir, &cert, &key),
    };

    // The shared TimeService with one more upstream: chronyd's NTS-KE server, trusted through
    // the test's CA. The NTP port is not in the spec: the key exchange names it.
    let mut spec = shared_time_service(&[]);
    spec["spec"]["upstreams"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "host": "127.0.0.1", "nts": true, "ntsPort": KE_PORT, "minPoll": 3, "maxPoll": 3
        }));
    spec["spec"]["nts"] = serde_json::json!({ "caBundle": ca });
    let time_services: Api<TimeService> = Api::all(client.clone());
    apply(&time_services, spec).await;

    // The agent's key exchange, then NTS polls at the address it named.
    let clocks: Api<NodeClock> = Api::all(client.clone());
    let expected = format!("127.0.0.1:{NTP_PORT}");
    let (source, took) = wait_for(
        Duration::from_secs(120),
        "the real node's NodeClock to list the NTS source as reachable and usable",
        || async {
            let status = clocks.get(&node).await.ok()?.status?;
            status
                .sources
                .into_iter()
                .find(|s| s.name == "127.0.0.1" && s.address == expected)
                .filter(|s| {
                    s.reach > 0
                        && matches!(
                            s.state,
                            SourceState::Selected | SourceState::Combined | SourceState::Candidate
                        )
                })
        },
    )
    .await;
    eprintln!(
        "NTS source usable on {node} after {:.1} s: {source:?}",
        took.as_secs_f64()
    );
    assert_eq!(
        source.stratum, 2,
        "chronyd's local stratum through NTS: {source:?}"
    );

    // The stack's Prometheus: the key exchange succeeded, and every reply refilled the jar.
    let (cookies, _) = wait_for(
        Duration::from_secs(90),
        "Prometheus to show the NTS key exchange and eight cookies on the real node",
        || async {
            // Only the real node's namespace has the server on its loopback; the other
            // agents' key exchanges fail, and they never poll it.
            let exchanged = prometheus_value(
                &prometheus,
                r#"sum(stratum_agent_nts_key_exchanges_total{source="127.0.0.1",result="ok"})"#,
            )?;
            let cookies = prometheus_value(
                &prometheus,
                r#"max(stratum_agent_nts_cookies{source="127.0.0.1"})"#,
            )?;
            (exchanged >= 1.0 && cookies == 8.0).then_some(cookies)
        },
    )
    .await;
    eprintln!("Prometheus: {cookies} cookies held for the NTS upstream");

    // The dashboard's NTS upstream panel shows the real node's NTS source in both queries.
    let queries = dashboard_queries("NTS upstreams: cookies and key exchanges");
    assert_eq!(queries.len(), 2, "{queries:?}");
    for query in &queries {
        let q = query
            .replace("$time_service", ".*")
            .replace("$node", ".*")
            .replace("$__rate_interval", "10m");
        let (series, _) = wait_for(
            Duration::from_secs(60),
            "the NTS upstream panel's data",
            || async {
                let v = prometheus_query(&prometheus, &q, None)?;
                let found = v["data"]["result"].as_array()?.iter().any(|s| {
                    s["metric"]["node"] == node.as_str() && s["metric"]["source"] == "127.0.0.1"
                });
                found.then_some(v)
            },
        )
        .await;
        eprintln!(
            "dashboard NTS upstream panel: {q}: {}",
            series["data"]["result"]
        );
    }

    // The TimeService is served, not refused, and its NetworkPolicy lets agents reach the
    // NTS-KE port it names.
    let ts = time_services.get(SHARED_TIME_SERVICE).await.unwrap();
    let conditions = ts.status.unwrap().conditions;
    assert!(
        conditions
            .iter()
            .all(|c| c.reason != "InvalidSpec" || c.status != "True"),
        "{conditions:?}"
    );
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    // The agents' NetworkPolicy carries the TimeService's agent name (`<name>-agent`).
    let policy = policies
        .get(&format!("{SHARED_TIME_SERVICE}-agent"))
        .await
        .expect("the shared TimeService's NetworkPolicy");
    let egress = serde_json::to_string(&policy.spec.unwrap().egress).unwrap();
    assert!(
        egress.contains(&format!(r#""port":{KE_PORT},"protocol":"TCP""#)),
        "{egress}"
    );

    // Back to the shared spec for the tests after this one.
    apply(&time_services, shared_time_service(&[])).await;
}
