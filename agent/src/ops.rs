//! The agent's HTTP surfaces: the metrics port (`/metrics`, `/healthz`, `/readyz`), reachable
//! by Prometheus and the kubelet, and the status port (`/status`), bound to loopback for
//! `stratumctl` because it lists sources and clients (`/status`, `/serverstats`, `/clients`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::agent::Shared;

/// The loop is considered hung when it has not run for this long.
const LIVENESS_STALE: std::time::Duration = std::time::Duration::from_secs(30);

/// Routes of the metrics port.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

/// Routes of the status port.
pub fn status_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/serverstats", get(serverstats))
        .route("/clients", get(clients))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.server.export_metrics(&shared.metrics);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        shared.metrics.render(),
    )
}

/// Live while the run loop turns; independent of upstream reachability and of the API server
/// (the metrics port answers from process start, before any config).
async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.since_last_beat() {
        // Before the first config the loop has not turned; that is not a hang.
        Some(stalled) if stalled >= LIVENESS_STALE => {
            (StatusCode::SERVICE_UNAVAILABLE, "run loop stalled\n")
        }
        _ => (StatusCode::OK, "ok\n"),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready() {
        (StatusCode::OK, "synchronized\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synchronized\n")
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json((**shared.status.load()).clone())
}

async fn serverstats(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.server.stats())
}

/// Query of `/clients`.
#[derive(Debug, serde::Deserialize)]
pub struct ClientsQuery {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Rows per tenant.
    pub limit: Option<usize>,
}

/// Default rows per tenant of `/clients`.
const DEFAULT_CLIENTS: usize = 20;

async fn clients(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<ClientsQuery>,
) -> impl IntoResponse {
    Json(shared.server.clients(
        query.tenant.as_deref(),
        query.limit.unwrap_or(DEFAULT_CLIENTS).min(10_000),
    ))
}

/// Serves `router` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).await
}
