//! The reporter against a mock API server (tower-test): the NodeClock is server-side applied
//! with the agent's field manager (object, then status subresource), and Events land on the
//! Node. The real API server and its admission policy are covered by e2e.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use stratum_agent::report::{self, AgentEvent};
use stratum_agent::status::{AgentStatus, Identity, SourceView, Tracking};
use tokio::sync::{mpsc, watch};

fn status() -> AgentStatus {
    AgentStatus {
        identity: Identity {
            node: "worker-1".into(),
            time_service: "cluster-time".into(),
            version: "0.1.0".into(),
            clock: "simulated".into(),
            config_revision: "rev-7".into(),
            config_source: Default::default(),
            config_error: None,
        },
        tracking: Tracking {
            synchronized: true,
            ready: true,
            reference_id: "10.0.0.1".into(),
            stratum: 3,
            offset_seconds: 12e-6,
            leap: "none".into(),
            ..Default::default()
        },
        sources: vec![SourceView {
            name: "ntp-a".into(),
            address: "10.0.0.1:123".into(),
            state: "selected".into(),
            reach: 255,
            ..Default::default()
        }],
        failed_ports: vec![],
    }
}

async fn next_request(
    handle: &mut tower_test::mock::Handle<Request<Body>, Response<Body>>,
) -> (
    http::Method,
    String,
    serde_json::Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the reporter made no request in time")
        .expect("service closed");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (method, uri, json, send)
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, body: serde_json::Value) {
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

/// What the API server answers a patch of worker-1's NodeClock with: the whole object.
fn whole_object(mut body: serde_json::Value) -> serde_json::Value {
    body["metadata"] = serde_json::json!({"name": "worker-1"});
    body["spec"] = serde_json::json!({"timeService": "cluster-time"});
    body
}

/// `report::run` for node worker-1 against a mock API server, with the channels that feed it.
struct Reporter {
    handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    snapshots: watch::Sender<AgentStatus>,
    events: mpsc::Sender<AgentEvent>,
    _heartbeat: watch::Sender<Duration>,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    fn start() -> Self {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (heartbeat, hb_rx) = watch::channel(Duration::from_secs(60));
        let (snapshots, snap_rx) = watch::channel(AgentStatus::default());
        let (events, ev_rx) = mpsc::channel(4);
        let task = tokio::spawn(report::run(
            client,
            "worker-1".into(),
            String::new(),
            hb_rx,
            snap_rx,
            ev_rx,
        ));
        Reporter {
            handle,
            snapshots,
            events,
            _heartbeat: heartbeat,
            task,
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn node_clock_is_applied_with_the_agent_field_manager_then_its_status() {
    let mut r = Reporter::start();
    let (handle, snap_tx) = (&mut r.handle, &r.snapshots);
    snap_tx.send(status()).unwrap();

    let (method, uri, body, send) = next_request(handle).await;
    assert_eq!(method, http::Method::PATCH);
    assert!(
        uri.starts_with("/apis/stratum.io/v1alpha1/nodeclocks/worker-1?"),
        "{uri}"
    );
    assert!(
        uri.contains("fieldManager=stratum-agent") && uri.contains("force=true"),
        "{uri}"
    );
    assert_eq!(body["kind"], "NodeClock");
    assert_eq!(body["spec"]["timeService"], "cluster-time");
    respond(send, body.clone());

    let (method, uri, body, send) = next_request(handle).await;
    assert_eq!(method, http::Method::PATCH);
    assert!(
        uri.starts_with("/apis/stratum.io/v1alpha1/nodeclocks/worker-1/status?"),
        "{uri}"
    );
    assert!(uri.contains("fieldManager=stratum-agent"), "{uri}");
    assert_eq!(body["status"]["synchronized"], true);
    assert_eq!(body["status"]["offsetNanos"], 12_000);
    assert_eq!(body["status"]["configRevision"], "rev-7");
    assert_eq!(body["status"]["sources"][0]["state"], "Selected");
    // The API server answers with the whole object.
    let mut object = body.clone();
    object["metadata"] = serde_json::json!({"name": "worker-1"});
    object["spec"] = serde_json::json!({"timeService": "cluster-time"});
    respond(send, object);

    // An unchanged status is not written again before the heartbeat.
    snap_tx.send(status()).unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(1500), handle.next_request()).await;
    assert!(
        quiet.is_err(),
        "the reporter rewrote an unchanged NodeClock"
    );
}

#[tokio::test]
async fn events_are_published_on_the_node() {
    let mut r = Reporter::start();
    let (handle, ev_tx) = (&mut r.handle, &r.events);
    ev_tx
        .send(AgentEvent::ConfigRejected {
            reason: "serving.tenants[0].port: must not be 0".into(),
        })
        .await
        .unwrap();

    let (method, uri, body, send) = next_request(handle).await;
    assert_eq!(method, http::Method::POST);
    assert!(
        uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"),
        "{uri}"
    );
    assert_eq!(body["reason"], "ConfigRejected");
    assert_eq!(body["type"], "Warning");
    assert_eq!(body["regarding"]["kind"], "Node");
    assert_eq!(body["regarding"]["name"], "worker-1");
    assert_eq!(body["reportingController"], "stratum-agent");
    assert_eq!(body["reportingInstance"], "worker-1");
    assert!(body["note"].as_str().unwrap().contains("must not be 0"));
    respond(send, body);
}

#[tokio::test]
async fn the_last_status_is_written_at_once_when_the_agent_stops_and_then_the_reporter_ends() {
    let mut r = Reporter::start();
    let mut first = status();
    first.tracking.last_step_seconds = Some(-0.25);
    first.tracking.last_step_unix_nanos = Some(1_790_000_000_123_000_000);
    r.snapshots.send(first).unwrap();
    let (_, _, body, send) = next_request(&mut r.handle).await;
    respond(send, whole_object(body));
    let (_, _, body, send) = next_request(&mut r.handle).await;
    assert_eq!(body["status"]["lastStep"]["amountNanos"], -250_000_000);
    assert_eq!(
        body["status"]["lastStep"]["time"],
        "2026-09-21T14:13:20Z", // metav1.Time: whole seconds
        "{body}"
    );
    respond(send, whole_object(body));

    // The loop stops well inside the minimum write interval: its last word (unsynchronized)
    // is written anyway, because the node's endpoints must drop before the agent is gone.
    let mut stopping = status();
    stopping.tracking.synchronized = false;
    stopping.tracking.ready = false;
    r.snapshots.send(stopping).unwrap();
    let Reporter {
        handle,
        snapshots,
        events,
        task,
        ..
    } = &mut r;
    let (snapshots, events) = (
        std::mem::replace(snapshots, watch::channel(AgentStatus::default()).0),
        std::mem::replace(events, mpsc::channel(1).0),
    );
    drop((snapshots, events));
    let (_, uri, body, send) = next_request(handle).await;
    assert!(uri.contains("/nodeclocks/worker-1/status"), "{uri}");
    assert_eq!(body["status"]["synchronized"], false);
    respond(send, whole_object(body));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the reporter did not end after its last write")
        .unwrap();
}
