//! Reconcile against a mock API server (tower-test): every child is written by server-side
//! apply under our field manager with force, to the contract's URIs, with complete bodies
//! (apiVersion and kind included), and status is written only when it changed.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::{Client, Resource};
use serde_json::{Value, json};
use stratum_api::{TenantTimePolicy, TimeService};
use stratum_operator::build::OperatorSettings;
use stratum_operator::controller::{Context, tenant, time_service};
use stratum_operator::index::Index;
use stratum_operator::metrics::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "stratum-system";

fn context(client: Client, index: Index) -> Arc<Context> {
    Arc::new(Context::new(
        client,
        OperatorSettings {
            namespace: NS.into(),
            agent_image: "stratum/agent:test".into(),
            agent_image_pull_secrets: Vec::new(),
            agent_cluster_role: "stratum-agent".into(),
            agent_priority_class: "system-node-critical".into(),
        },
        Arc::new(Mutex::new(index)),
        Arc::new(Metrics::new().unwrap()),
        None,
    ))
}

fn time_service(name: &str, created: i64, node_selector: Value) -> TimeService {
    let spec = serde_json::from_value(json!({
        "upstreams": [{ "host": "pool.ntp.org", "kind": "Pool" }],
        "placement": { "nodeSelector": node_selector }
    }))
    .unwrap();
    let mut ts = TimeService::new(name, spec);
    ts.metadata.uid = Some(format!("uid-{name}"));
    ts.metadata.generation = Some(1);
    ts.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
    ts
}

fn tenant_policy(ns: &str, name: &str, spec: Value) -> TenantTimePolicy {
    TenantTimePolicy {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(3),
            creation_timestamp: Some(Time(Timestamp::from_second(1_700_000_000).unwrap())),
            ..Default::default()
        },
        spec: serde_json::from_value(spec).unwrap(),
        status: None,
    }
}

fn node(index: &mut Index, name: &str) {
    let _ = index.apply_node(
        name,
        &stratum_operator::model::NodeInfo::from(std::collections::BTreeMap::from([(
            "kubernetes.io/os".to_string(),
            "linux".to_string(),
        )])),
    );
}

/// One expected request: checks it and answers.
struct Verifier {
    handle: Handle,
}

impl Verifier {
    async fn next(
        &mut self,
    ) -> (
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
            .await
            .expect("reconcile stopped issuing requests")
            .expect("service not called")
    }

    /// Expects a server-side apply of `path` and answers with the applied body (plus `extra`
    /// merged into it). Returns the body.
    async fn expect_apply(&mut self, path: &str, extra: Value) -> Value {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::PATCH, "{}", request.uri());
        assert_eq!(request.uri().path(), path);
        let query = request.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains("fieldManager=stratum-operator"),
            "{path}: {query}"
        );
        assert!(query.contains("force=true"), "{path}: {query}");
        assert_eq!(
            request.headers().get(http::header::CONTENT_TYPE).unwrap(),
            "application/apply-patch+yaml"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let mut body: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            body["apiVersion"].is_string() && body["kind"].is_string(),
            "{path}: SSA needs apiVersion and kind"
        );
        let answer = {
            let mut a = body.clone();
            merge(&mut a, extra);
            a
        };
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        if let Some(obj) = body.as_object_mut() {
            obj.remove("apiVersion");
        }
        body
    }

    async fn expect_get_not_found(&mut self, path: &str) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), path);
        send.send_response(not_found());
    }
}

fn not_found() -> Response<Body> {
    let status = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found" });
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

fn merge(into: &mut Value, extra: Value) {
    match (into, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// The object as the API server would return it around an applied status.
fn whole<K: serde::Serialize>(obj: &K) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v.as_object_mut().unwrap().remove("status");
    v
}

fn mock() -> (Client, Verifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), Verifier { handle })
}

const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";

async fn expect_agent_rbac(v: &mut Verifier, ts: &str) {
    v.expect_apply(
        &format!("/api/v1/namespaces/{NS}/serviceaccounts/{ts}-agent"),
        json!({}),
    )
    .await;
    v.expect_apply(
        &format!("{RBAC}/namespaces/{NS}/roles/{ts}-agent"),
        json!({}),
    )
    .await;
    v.expect_apply(
        &format!("{RBAC}/namespaces/{NS}/rolebindings/{ts}-agent"),
        json!({}),
    )
    .await;
    let binding = v
        .expect_apply(
            &format!("{RBAC}/clusterrolebindings/stratum-agent"),
            json!({}),
        )
        .await;
    assert_eq!(
        binding["roleRef"]["name"], "stratum-agent",
        "agents are bound to the chart's static ClusterRole, never a new one"
    );
    assert!(
        binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == format!("{ts}-agent")),
        "the chart's one binding lists this TimeService's agents: {binding}"
    );
    assert_eq!(
        binding["metadata"].get("labels"),
        None,
        "the chart owns the binding; the operator applies only its subjects"
    );
}

#[tokio::test]
async fn time_service_children_are_applied_then_status_once_and_not_again_when_unchanged() {
    let (client, mut v) = mock();
    let mut index = Index::new(NS);
    node(&mut index, "n1");
    let ctx = context(client, index);
    let mut ts = time_service("cluster", 1_700_000_000, json!({}));
    let ts_json = whole(&ts);

    let verifier = tokio::spawn(async move {
        expect_agent_rbac(&mut v, "cluster").await;
        // The NTS key material Secret, before the config that names its files: read for the
        // cookie keys' age, then applied (cookie keys only: no tenant asks for NTS).
        v.expect_get_not_found(&format!(
            "/api/v1/namespaces/{NS}/secrets/cluster-agent-nts"
        ))
        .await;
        let secret = v
            .expect_apply(
                &format!("/api/v1/namespaces/{NS}/secrets/cluster-agent-nts"),
                json!({}),
            )
            .await;
        let members: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
        assert_eq!(members, ["cookie-keys.json"]);
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["uid"],
            "uid-cluster"
        );
        v.expect_get_not_found(&format!(
            "/api/v1/namespaces/{NS}/configmaps/cluster-agent-config"
        ))
        .await;
        let cm = v
            .expect_apply(
                &format!("/api/v1/namespaces/{NS}/configmaps/cluster-agent-config"),
                json!({}),
            )
            .await;
        // Written gzipped into binaryData, base64 on the wire.
        let config =
            stratum_api::AgentConfig::from_config_map(&serde_json::from_value(cm.clone()).unwrap())
                .unwrap();
        assert_eq!(config.time_service, "cluster");
        assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "uid-cluster");
        let ds = v
            .expect_apply(
                &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/cluster-agent"),
                json!({ "status": { "desiredNumberScheduled": 1, "numberReady": 1, "updatedNumberScheduled": 1,
                                    "currentNumberScheduled": 1, "numberMisscheduled": 0 } }),
            )
            .await;
        assert_eq!(ds["kind"], "DaemonSet");
        // The NetworkPolicy after the DaemonSet: it can never hold the agents back.
        v.expect_apply(
            &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/cluster-agent"),
            json!({}),
        )
        .await;
        let status = v
            .expect_apply(
                "/apis/stratum.io/v1alpha1/timeservices/cluster/status",
                ts_json,
            )
            .await;
        (v, status)
    });
    time_service::reconcile(Arc::new(DeserializeGuard(Ok(ts.clone()))), ctx.clone())
        .await
        .unwrap();
    let (mut v, status) = verifier.await.unwrap();
    assert_eq!(status["kind"], "TimeService");
    assert_eq!(status["status"]["nodes"]["desired"], 1);
    assert_eq!(status["status"]["observedGeneration"], 1);

    // Second pass with the written status: the same children are applied (SSA is idempotent),
    // the unchanged config is not rewritten, and no status write follows.
    ts.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    let verifier = tokio::spawn(async move {
        expect_agent_rbac(&mut v, "cluster").await;
        v.expect_get_not_found(&format!(
            "/api/v1/namespaces/{NS}/secrets/cluster-agent-nts"
        ))
        .await;
        v.expect_apply(
            &format!("/api/v1/namespaces/{NS}/secrets/cluster-agent-nts"),
            json!({}),
        )
        .await;
        v.expect_apply(
            &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/cluster-agent"),
            json!({ "status": { "desiredNumberScheduled": 1, "numberReady": 1, "updatedNumberScheduled": 1,
                                "currentNumberScheduled": 1, "numberMisscheduled": 0 } }),
        )
        .await;
        v.expect_apply(
            &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/cluster-agent"),
            json!({}),
        )
        .await;
        v
    });
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        time_service::reconcile(Arc::new(DeserializeGuard(Ok(ts))), ctx.clone()),
    )
    .await
    .expect("reconcile issued a request nobody expected (a status write?)");
    result.unwrap();
    verifier.await.unwrap();
    assert!(
        stratum_operator::controller::lock(&ctx.index)
            .time_services()
            .is_empty(),
        "a reconcile plans the object it was handed and leaves the index to the watch feed"
    );
}

#[tokio::test]
async fn a_younger_overlapping_time_service_gets_conflict_and_no_daemonset() {
    let (client, mut v) = mock();
    let mut index = Index::new(NS);
    node(&mut index, "n1");
    let older = time_service("first", 1_600_000_000, json!({}));
    let _ = index.apply_time_service(&older);
    let ctx = context(client, index);
    let younger = time_service(
        "second",
        1_700_000_000,
        json!({ "kubernetes.io/os": "linux" }),
    );
    let younger_json = whole(&younger);

    let verifier = tokio::spawn(async move {
        expect_agent_rbac(&mut v, "second").await;
        v.expect_get_not_found(&format!(
            "/api/v1/namespaces/{NS}/configmaps/second-agent-config"
        ))
        .await;
        v.expect_apply(
            &format!("/api/v1/namespaces/{NS}/configmaps/second-agent-config"),
            json!({}),
        )
        .await;
        v.expect_get_not_found(&format!(
            "/apis/apps/v1/namespaces/{NS}/daemonsets/second-agent"
        ))
        .await;
        v.expect_apply(
            &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/second-agent"),
            json!({}),
        )
        .await;
        v.expect_apply(
            "/apis/stratum.io/v1alpha1/timeservices/second/status",
            younger_json,
        )
        .await
    });
    time_service::reconcile(Arc::new(DeserializeGuard(Ok(younger))), ctx)
        .await
        .unwrap();
    let status = verifier.await.unwrap();
    let conflict = status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Conflict")
        .unwrap();
    assert_eq!(conflict["status"], "True");
    assert!(conflict["message"].as_str().unwrap().contains("\"first\""));
}

#[tokio::test]
async fn tenant_service_slices_and_time_config_are_applied_in_its_namespace_with_status() {
    let (client, mut v) = mock();
    let mut index = Index::new(NS);
    let _ = index.apply_time_service(&time_service("cluster", 1_600_000_000, json!({})));
    let tenant = tenant_policy("team-a", "policy", json!({ "timezone": "Europe/Berlin" }));
    // As the watch feed would have: a reconcile plans only what the index holds.
    let _ = index.apply_tenant(&tenant);
    let ctx = context(client, index);
    let tenant_json = whole(&tenant);

    let verifier = tokio::spawn(async move {
        let svc = v
            .expect_apply(
                "/api/v1/namespaces/team-a/services/ntp",
                json!({ "spec": { "clusterIPs": ["10.96.0.10"] } }),
            )
            .await;
        assert!(
            svc["spec"].get("selector").is_none(),
            "the Service must be selector-less"
        );
        let v4 = v
            .expect_apply(
                "/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices/ntp-stratum-ipv4",
                json!({}),
            )
            .await;
        assert_eq!(v4["addressType"], "IPv4");
        assert_eq!(v4["ports"][0]["port"], 12300);
        v.expect_apply(
            "/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices/ntp-stratum-ipv6",
            json!({}),
        )
        .await;
        // The first pass reads the time zone in force: the baseline of TimezoneChanged Events.
        v.expect_get_not_found("/api/v1/namespaces/team-a/configmaps/time-config")
            .await;
        let cm = v
            .expect_apply(
                "/api/v1/namespaces/team-a/configmaps/time-config",
                json!({}),
            )
            .await;
        assert_eq!(cm["data"]["TZ"], "Europe/Berlin");
        v.expect_apply(
            "/apis/stratum.io/v1alpha1/namespaces/team-a/tenanttimepolicies/policy/status",
            tenant_json,
        )
        .await
    });
    tenant::reconcile(Arc::new(DeserializeGuard(Ok(tenant))), ctx)
        .await
        .unwrap();
    let status = verifier.await.unwrap();
    assert_eq!(status["kind"], "TenantTimePolicy");
    assert_eq!(status["status"]["port"], 12300);
    assert_eq!(status["status"]["serviceIps"], json!(["10.96.0.10"]));
    assert_eq!(status["status"]["timeService"], "cluster");
    assert_eq!(status["status"]["observedGeneration"], 3);
}

#[tokio::test]
async fn a_refused_tenant_only_gets_a_status_saying_why() {
    let (client, mut v) = mock();
    let mut index = Index::new(NS);
    let _ = index.apply_time_service(&time_service("cluster", 1_600_000_000, json!({})));
    let tenant = tenant_policy(
        "team-a",
        "policy",
        json!({ "timezone": "Mars/Olympus_Mons" }),
    );
    // As the watch feed would have: a reconcile plans only what the index holds.
    let _ = index.apply_tenant(&tenant);
    let ctx = context(client, index);
    let tenant_json = whole(&tenant);
    let verifier = tokio::spawn(async move {
        v.expect_apply(
            "/apis/stratum.io/v1alpha1/namespaces/team-a/tenanttimepolicies/policy/status",
            tenant_json,
        )
        .await
    });
    let action = tenant::reconcile(Arc::new(DeserializeGuard(Ok(tenant))), ctx)
        .await
        .unwrap();
    let status = verifier.await.unwrap();
    let accepted = &status["status"]["conditions"][0];
    assert_eq!(accepted["type"], "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "InvalidTimezone");
    assert_eq!(
        action,
        kube::runtime::controller::Action::await_change(),
        "a user error waits for a change"
    );
    let _ = TenantTimePolicy::kind(&());
}

#[tokio::test]
async fn a_refused_tenants_children_are_deleted_by_uid_after_the_apply_and_a_users_service_is_not()
{
    use stratum_operator::owned::ChildKind;
    let (client, mut v) = mock();
    let mut index = Index::new(NS);
    let _ = index.apply_time_service(&time_service("cluster", 1_600_000_000, json!({})));
    let labels = stratum_operator::names::tenant_labels("cluster", "policy");
    for (kind, name, labels) in [
        (
            ChildKind::EndpointSlice,
            "ntp-stratum-ipv4",
            Some(labels.clone()),
        ),
        (ChildKind::Service, "ntp", Some(labels)),
        (ChildKind::Service, "users-own", None),
    ] {
        let _ = index.apply_child(
            kind,
            &ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team-a".into()),
                uid: Some(format!("uid-{name}")),
                labels,
                ..Default::default()
            },
        );
    }
    let tenant = tenant_policy(
        "team-a",
        "policy",
        json!({ "timezone": "Mars/Olympus_Mons" }),
    );
    // As the watch feed would have: a reconcile plans only what the index holds.
    let _ = index.apply_tenant(&tenant);
    let ctx = context(client, index);
    let tenant_json = whole(&tenant);
    let verifier = tokio::spawn(async move {
        for (path, uid) in [
            ("/api/v1/namespaces/team-a/services/ntp", "uid-ntp"),
            (
                "/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices/ntp-stratum-ipv4",
                "uid-ntp-stratum-ipv4",
            ),
        ] {
            let (request, send) = v.next().await;
            assert_eq!(request.method(), Method::DELETE, "{}", request.uri());
            assert_eq!(request.uri().path(), path);
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                body["preconditions"]["uid"], uid,
                "a delete names the object it saw as Stratum's"
            );
            send.send_response(not_found());
        }
        v.expect_apply(
            "/apis/stratum.io/v1alpha1/namespaces/team-a/tenanttimepolicies/policy/status",
            tenant_json,
        )
        .await
    });
    tenant::reconcile(Arc::new(DeserializeGuard(Ok(tenant))), ctx)
        .await
        .unwrap();
    let status = verifier.await.unwrap();
    assert_eq!(
        status["status"]["conditions"][0]["reason"],
        "InvalidTimezone"
    );
}

#[tokio::test]
async fn a_tenant_the_index_does_not_hold_yet_waits_for_the_feed_and_writes_nothing() {
    let (client, _v) = mock();
    let mut index = Index::new(NS);
    let _ = index.apply_time_service(&time_service("cluster", 1_600_000_000, json!({})));
    let indexed = tenant_policy("team-a", "policy", json!({}));
    let _ = index.apply_tenant(&indexed);
    let ctx = context(client, index);
    // Not yet in the index, and a newer spec than the index's: either way it would be planned
    // without the port and owners the index gives it.
    let unknown = tenant_policy("team-b", "policy", json!({}));
    let newer = tenant_policy("team-a", "policy", json!({ "timezone": "Europe/Berlin" }));
    for tenant in [unknown, newer] {
        let action = tokio::time::timeout(
            Duration::from_secs(5),
            tenant::reconcile(Arc::new(DeserializeGuard(Ok(tenant))), ctx.clone()),
        )
        .await
        .expect("no request may be made: nobody answers")
        .unwrap();
        assert_eq!(action, kube::runtime::controller::Action::await_change());
    }
    assert_eq!(
        stratum_operator::controller::lock(&ctx.index)
            .tenants()
            .len(),
        1,
        "the reconcile left the index alone"
    );
}
