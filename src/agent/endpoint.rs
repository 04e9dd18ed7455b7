//! The agent's HTTP endpoint (axum), for probes and Prometheus:
//!
//! - `GET /healthz`: 200 while the process serves requests;
//! - `GET /readyz`: 200 when every pipeline streams and every target is up, else 503 with one
//!   reason per line;
//! - `GET /status`: the agent's status as JSON (see `status::AgentStatus`);
//! - `GET /metrics`: the Prometheus text format (see `metrics`).
//!
//! It serves until the shutdown signal, then stops accepting and lets requests in flight end.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Shared;

/// Serves `listener` until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(event = "endpoint_failed", error = %e);
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.board.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("\n")),
        ),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.board.snapshot())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}
