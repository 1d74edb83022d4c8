//! The Helm chart on the real API server (issue 7's must-shows 1 and 4): its rendering passes
//! server-side dry-run, the stack's `helm install` runs the operator from its pods with the
//! chart's ServiceAccount and RBAC, the live `/metrics` pass `promtool check metrics`, and a
//! real Prometheus, configured from the installed monitors and rules, scrapes agents and
//! operator until every dashboard query returns data. `make e2e` runs these against the same
//! stack as e2e.rs (`--ignored --test-threads=1`); waits have deadlines, figures are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, PostParams};
use stratum_e2e::harness::*;

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn chart() -> PathBuf {
    repo().join("charts/stratum")
}

fn tool(name: &str) -> PathBuf {
    PathBuf::from(std::env::var("STRATUM_E2E_BIN").expect("STRATUM_E2E_BIN from e2e/stack.sh env"))
        .join(name)
}

fn release() -> String {
    std::env::var("STRATUM_E2E_RELEASE").unwrap_or_else(|_| "stratum".into())
}

fn prometheus() -> String {
    std::env::var("STRATUM_E2E_PROMETHEUS").unwrap_or_else(|_| "http://127.0.0.1:19090".into())
}

/// Runs a command, feeding `stdin`; panics when it cannot start.
fn run(program: &PathBuf, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Pods of `app.kubernetes.io/name=<name>` in the release namespace, with their IPs.
async fn pods(client: &kube::Client, name: &str) -> Vec<(String, String)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    api.list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?)))
        .collect()
}

/// An instant query through Prometheus' HTTP API: the result vector.
fn prom_query(query: &str) -> Option<Vec<serde_json::Value>> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", "-G"])
        .arg(format!("{}/api/v1/query", prometheus()))
        .args(["--data-urlencode", &format!("query={query}")])
        .output()
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (body["status"] == "success").then(|| body["data"]["result"].as_array().cloned())?
}

/// `{label value: sample value}` of an instant query whose series differ in `label`.
fn prom_by(query: &str, label: &str) -> Option<Vec<(String, f64)>> {
    Some(
        prom_query(query)?
            .iter()
            .filter_map(|s| {
                Some((
                    s["metric"][label].as_str()?.to_string(),
                    s["value"][1].as_str()?.parse().ok()?,
                ))
            })
            .collect(),
    )
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn helm_template_with_default_and_full_values_passes_server_side_dry_run() {
    let helm = tool("helm");
    let kubectl = tool("kubectl");
    let full = chart().join("ci/full-values.yaml");
    for (label, extra) in [
        ("default", vec![]),
        ("full", vec!["-f", full.to_str().unwrap()]),
    ] {
        let chart = chart();
        let mut args = vec![
            "template",
            "stratum",
            chart.to_str().unwrap(),
            "--namespace",
            AGENT_NAMESPACE,
            "--include-crds",
        ];
        args.extend(extra);
        let rendered = run(&helm, &args, None);
        assert!(
            rendered.status.success(),
            "helm template ({label}): {}",
            text(&rendered.stderr)
        );
        let objects = serde_yaml::Deserializer::from_slice(&rendered.stdout)
            .filter_map(|d| serde::Deserialize::deserialize(d).ok())
            .filter(|v: &serde_json::Value| v.is_object())
            .count();
        let started = Instant::now();
        let applied = run(
            &kubectl,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&rendered.stdout),
        );
        let out = text(&applied.stdout);
        assert!(
            applied.status.success(),
            "server-side dry-run ({label}) refused:\n{}\n{out}",
            text(&applied.stderr)
        );
        let accepted = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(accepted, objects, "every object accepted ({label}):\n{out}");
        eprintln!(
            "{label} values: {objects} objects accepted by server-side dry-run in {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// Runs one of the chart's own cluster checks (`charts/stratum/tests/*-e2e.sh`, which users
/// can run against their clusters too) against the installed release; each prints a line per
/// check and fails when any check does.
fn chart_check_script(script: &str, args: &[&str]) {
    let path = chart().join("tests").join(script);
    let out = run(&path, args, None);
    eprintln!("{}", text(&out.stdout));
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(" passed, 0 failed"),
        "{script} ran no checks:\n{}",
        text(&out.stdout)
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn the_charts_rbac_and_admission_policies_refuse_what_the_design_forbids() {
    // RBAC (impersonating the operator and an agent), and the operator-writes policy: no
    // system namespace, no adopting, patching or deleting a user's Service or ConfigMap.
    chart_check_script(
        "rbac-e2e.sh",
        &["--namespace", AGENT_NAMESPACE, "--release", &release()],
    );
    // NodeClocks and Events only about the agent's own node, with real pod-bound tokens.
    chart_check_script(
        "vap-e2e.sh",
        // Made-up node names: the script deletes the NodeClocks it wrote, which must not be
        // the running agents' (the API server puts a pod's node in its token either way).
        &[
            "--namespace",
            AGENT_NAMESPACE,
            "--no-setup",
            "vap-node-a",
            "vap-node-b",
        ],
    );
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn helm_install_runs_every_operator_pod_with_the_charts_service_account_and_rbac() {
    let client = client().await;
    let status = run(
        &tool("helm"),
        &[
            "status",
            &release(),
            "--namespace",
            AGENT_NAMESPACE,
            "-o",
            "json",
        ],
        None,
    );
    assert!(status.status.success(), "{}", text(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["info"]["status"], "deployed");
    let install_ms =
        std::fs::read_to_string(stack_dir().join("helm-install.ms")).unwrap_or_default();
    eprintln!("helm install took {} ms", install_ms.trim());

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let deployment = deployments
        .get(&format!("{}-operator", release()))
        .await
        .unwrap();
    let replicas = deployment.spec.unwrap().replicas.unwrap_or(1);
    let (operators, _) = wait_for(
        Duration::from_secs(60),
        "every operator replica running and ready",
        || async {
            let pods = pods(&client, "stratum-operator").await;
            let ready = pods.len() == replicas as usize
                && pods.iter().all(|(name, ip)| {
                    operator_pid(name).is_some()
                        && http_get(&format!("http://{ip}:8080/readyz")).is_some()
                });
            ready.then_some(pods)
        },
    )
    .await;

    // Exactly the Lease holder says it leads (after a restart it may take a moment to agree).
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let (leader, _) = wait_for(
        Duration::from_secs(60),
        "one operator pod holding the Lease and saying so in its metrics",
        || async {
            let holder = leases
                .get("stratum-operator-leader")
                .await
                .ok()?
                .spec?
                .holder_identity?;
            let leading: Vec<&String> = operators
                .iter()
                .filter(|(_, ip)| {
                    http_get(&format!("http://{ip}:8080/metrics"))
                        .is_some_and(|m| m.lines().any(|l| l.trim() == "stratum_operator_leader 1"))
                })
                .map(|(name, _)| name)
                .collect();
            (leading == [&holder]).then_some(holder)
        },
    )
    .await;

    for (name, ip) in &operators {
        // The process is the pod's: its args, its security context's user.
        let pid = operator_pid(name).unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            args.iter().any(|a| a == "--namespace=stratum-system")
                && args.iter().any(|a| a == "--leader-election=true"),
            "{args:?}"
        );
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uid.split_whitespace().nth(1),
            Some("65532"),
            "runAsUser of the chart ({uid})"
        );
        // Its credentials: a token for the chart's ServiceAccount, bound to this pod.
        let kubeconfig = kube::config::Kubeconfig::read_from(
            stack_dir().join("pods").join(name).join("kubeconfig"),
        )
        .unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let operator = kube::Client::try_from(config).unwrap();
        let review: SelfSubjectReview = Api::<SelfSubjectReview>::all(operator.clone())
            .create(&PostParams::default(), &Default::default())
            .await
            .unwrap();
        let user = review.status.unwrap().user_info.unwrap();
        assert_eq!(
            user.username.as_deref(),
            Some(&*format!(
                "system:serviceaccount:{AGENT_NAMESPACE}:{}-operator",
                release()
            ))
        );
        let bound_pod = user
            .extra
            .unwrap_or_default()
            .get("authentication.kubernetes.io/pod-name")
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            bound_pod,
            std::slice::from_ref(name),
            "token bound to the pod"
        );

        // Least privilege, as the API server decides for this token.
        let reviews: Api<SelfSubjectAccessReview> = Api::all(operator);
        let mut verdicts = Vec::new();
        for (verb, group, resource, want) in [
            ("watch", "stratum.io", "timeservices", true),
            ("patch", "stratum.io", "timeservices/status", true),
            ("create", "discovery.k8s.io", "endpointslices", true),
            ("create", "stratum.io", "nodeclocks", false),
            ("delete", "stratum.io", "nodeclocks", true),
            ("update", "stratum.io", "timeservices", false),
            // NTS tenants' certificates are read by name, never listed.
            ("get", "", "secrets", true),
            ("list", "", "secrets", false),
            ("create", "rbac.authorization.k8s.io", "clusterroles", false),
        ] {
            let (resource, subresource) = match resource.split_once('/') {
                Some((r, s)) => (r, Some(s.to_string())),
                None => (resource, None),
            };
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        subresource,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let allowed = reviews
                .create(&PostParams::default(), &review)
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed;
            assert_eq!(allowed, want, "{name} may {verb} {group}/{resource}");
            verdicts.push(format!("{verb} {resource}: {allowed}"));
        }
        eprintln!(
            "operator pod {name} ({ip}, pid {pid}, uid 65532{}): {}",
            if *name == leader { ", leader" } else { "" },
            verdicts.join(", ")
        );
    }
}

/// Metrics addresses of every agent (node IP, hostNetwork) and every operator pod.
async fn metrics_targets(client: &kube::Client) -> Vec<String> {
    let mut urls: Vec<String> = pods(client, "stratum-agent")
        .await
        .into_iter()
        .map(|(_, ip)| format!("http://{ip}:9123/metrics"))
        .collect();
    urls.extend(
        pods(client, "stratum-operator")
            .await
            .into_iter()
            .map(|(_, ip)| format!("http://{ip}:8080/metrics")),
    );
    urls
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn promtool_check_metrics_passes_on_every_live_agent_and_operator() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let urls = metrics_targets(&client).await;
    assert_eq!(
        urls.len(),
        agent_nodes().len() + 2,
        "an agent per node and 2 operator replicas: {urls:?}"
    );
    let args: Vec<&str> = std::iter::once("metrics")
        .chain(urls.iter().map(String::as_str))
        .collect();
    let out = run(&repo().join("scripts/chart-check.sh"), &args, None);
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "promtool check metrics:\n{report}\n{}",
        text(&out.stderr)
    );
    eprintln!("{report}");
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn prometheus_scrapes_agents_and_operators_and_every_dashboard_query_returns_data() {
    let client = client().await;
    ensure_shared_time_service(&client).await;

    // Tenant traffic, for the per-tenant panels: a client pod served on its tenant's port.
    namespace(&client, "e2e-prometheus", serde_json::json!({})).await;
    apply_tenant(
        &client,
        "e2e-prometheus",
        serde_json::json!({"rateLimit": {"kissOfDeath": true}}),
    )
    .await;
    let ip = tenant_pod(&client, "e2e-prometheus", "client", "kwok-node-1").await;
    let port = tenant_port(&client, "e2e-prometheus").await;
    let agent: std::net::IpAddr = node_ip(&client, "kwok-node-1").await.parse().unwrap();
    let _netns = PodNetns::new("e2e-t-prometheus", &ip);
    wait_for(
        Duration::from_secs(30),
        "the tenant's client served",
        || async {
            query_from_netns("e2e-t-prometheus", (agent, port).into())
                .filter(|a| a["kissCode"].is_null())
        },
    )
    .await;

    // The targets come from the installed PodMonitor and ServiceMonitor.
    let (up, took) = wait_for(
        Duration::from_secs(90),
        "an agent per node and 2 operators up in Prometheus, each scraped at least 3 times",
        || async {
            let up = prom_by("count by (job) (up == 1)", "job")?;
            let scraped = prom_by(
                "count by (job) (count_over_time(up[2m]) >= 3 and up == 1)",
                "job",
            )?;
            let want = [
                ("stratum-agent".to_string(), agent_nodes().len() as f64),
                ("stratum-operator".to_string(), 2.0),
            ];
            let mut up = up;
            up.sort_by(|a, b| a.0.cmp(&b.0));
            let mut scraped = scraped;
            scraped.sort_by(|a, b| a.0.cmp(&b.0));
            (up == want && scraped == want).then_some(up)
        },
    )
    .await;
    eprintln!(
        "Prometheus targets up: {up:?} ({:.1} s)",
        took.as_secs_f64()
    );

    // The installed PrometheusRule is Prometheus' rule file: every rule loads and evaluates.
    let rules: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{}/api/v1/rules", prometheus())).unwrap())
            .unwrap();
    let all: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let alerts = all.iter().filter(|r| r["type"] == "alerting").count();
    assert!(alerts >= 8, "the chart's alerts are loaded: {alerts}");
    let bad: Vec<_> = all
        .iter()
        .filter(|r| r["health"] != "ok" && r["health"] != "unknown")
        .map(|r| (r["name"].clone(), r["lastError"].clone()))
        .collect();
    assert!(bad.is_empty(), "rules failing to evaluate: {bad:?}");

    // The dashboard as installed (the chart's ConfigMap), every query through the HTTP API.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let dashboards = maps
        .list(&ListParams::default().labels("grafana_dashboard=1"))
        .await
        .unwrap();
    assert_eq!(dashboards.items.len(), 1, "one dashboard ConfigMap");
    let json = dashboards.items[0]
        .data
        .as_ref()
        .and_then(|d| d.get("stratum.json"))
        .expect("stratum.json in the dashboard ConfigMap")
        .clone();
    let dashboard = stack_dir().join("prometheus/dashboard.json");
    std::fs::write(&dashboard, json).unwrap();
    let tools = chart().join("tests/chart_tools.py");
    let python = PathBuf::from("python3");
    // Polled: rate() panels need two samples after the tenant's first packet.
    let started = Instant::now();
    let report = loop {
        let out = run(
            &python,
            &[
                tools.to_str().unwrap(),
                "dashboard-check",
                dashboard.to_str().unwrap(),
                &prometheus(),
                // Only where a host daemon runs beside an agent: the migration test runs one
                // and checks this query there.
                "--may-be-empty",
                "panel 'Offset (and the host daemon's own view)' B",
                // Only with authenticated tenant traffic: the nts_tenant test makes some and
                // checks every query there.
                "--may-be-empty",
                "panel 'Authenticated replies (NTS, symmetric keys) and NTS key exchanges' A",
                "--may-be-empty",
                "panel 'Authenticated replies (NTS, symmetric keys) and NTS key exchanges' B",
                "--may-be-empty",
                "panel 'Authenticated replies (NTS, symmetric keys) and NTS key exchanges' C",
                // Only with an NTS upstream: the nts_upstream test has one and checks both.
                "--may-be-empty",
                "panel 'NTS upstreams: cookies and key exchanges' A",
                "--may-be-empty",
                "panel 'NTS upstreams: cookies and key exchanges' B",
            ],
            None,
        );
        let report = text(&out.stdout);
        if out.status.success() {
            break report;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "dashboard queries without data after 120 s:\n{report}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let took = started.elapsed();
    eprintln!("{report}");
    eprintln!(
        "every dashboard query returned data {:.1} s after the targets were up",
        took.as_secs_f64()
    );
    let scrapes = prom_by("sum by (job) (count_over_time(up[1h]))", "job").unwrap();
    let samples = prom_by(
        "sum by (job) (sum_over_time(scrape_samples_scraped[1h]))",
        "job",
    )
    .unwrap();
    eprintln!("scrapes so far by job: {scrapes:?}; samples: {samples:?}");
}

#[tokio::test]
#[ignore = "needs the e2e cluster: make e2e"]
async fn kubectl_get_stratum_lists_every_kind_and_node_clocks_show_owner_and_freshness() {
    let client = client().await;
    ensure_shared_time_service(&client).await;
    let ns = "e2e-category";
    namespace(&client, ns, serde_json::json!({})).await;
    apply_tenant(&client, ns, serde_json::json!({})).await;
    let kubectl = tool("kubectl");
    let listed = run(
        &kubectl,
        &["get", "stratum", "--all-namespaces", "-o", "name"],
        None,
    );
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let names = text(&listed.stdout);
    for wanted in [
        format!("timeservice.stratum.io/{SHARED_TIME_SERVICE}"),
        "tenanttimepolicy.stratum.io/ntp".to_string(),
        format!(
            "nodeclock.stratum.io/{}",
            stratum_e2e::real_node::real_node()
        ),
    ] {
        assert!(
            names.lines().any(|l| l == wanted),
            "{wanted} not in:\n{names}"
        );
    }
    let table = run(&kubectl, &["get", "nodeclocks"], None);
    let header = text(&table.stdout);
    let header = header.lines().next().unwrap_or_default();
    for column in ["TIMESERVICE", "UPDATED"] {
        assert!(header.contains(column), "{column} not in {header:?}");
    }
    eprintln!(
        "kubectl get stratum: {} objects of 3 kinds",
        names.lines().count()
    );
}
