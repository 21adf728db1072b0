//! The HTTP API: health, readiness, status, metrics, and POSTs to sync, roll back and unpin.
//!
//! POSTs need `Authorization: Bearer <token_file contents>` whenever a token is configured
//! (always, when `listen` is not a loopback address).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::daemon::{Daemon, Triggered};

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/sync", post(sync_all))
        .route("/targets/{name}/sync", post(sync_one))
        .route("/targets/{name}/rollback", post(rollback))
        .route("/targets/{name}/unpin", post(unpin))
        .with_state(daemon)
}

async fn readyz(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    let report = d.board().report();
    let waiting: Vec<&str> = report
        .targets
        .iter()
        .filter(|t| t.published.is_none())
        .map(|t| t.name.as_str())
        .collect();
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no published version yet for {}\n",
                waiting.join(", ")
            ),
        )
    }
}

async fn status(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    Json(d.board().report())
}

async fn metrics(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    (
        // prometheus-client writes the OpenMetrics text format.
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        d.metrics().encode(),
    )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Checks the bearer token when one is configured (compared in constant time); returns the
/// response to send when the request is not authorized.
fn unauthorized(d: &Daemon, headers: &HeaderMap) -> Option<Response> {
    let token = d.context().settings.api_token.clone()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (a, b) = (given.as_bytes(), token.0.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    (!same).then(|| error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"))
}

/// The checks a POST about one target makes first: the token, then that the target exists.
fn refuse(d: &Daemon, headers: &HeaderMap, name: &str) -> Option<Response> {
    unauthorized(d, headers).or_else(|| {
        d.context()
            .settings
            .target(name)
            .is_none()
            .then(|| error(StatusCode::NOT_FOUND, format!("no target {name:?}")))
    })
}

async fn sync_all(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&d, &headers) {
        return r;
    }
    let mut started = Vec::new();
    let mut busy = Vec::new();
    for name in d.target_names() {
        match d.trigger(&name) {
            Triggered::Started => started.push(name),
            Triggered::Busy => busy.push(name),
            Triggered::Unknown => {}
        }
    }
    let code = if started.is_empty() && !busy.is_empty() {
        StatusCode::CONFLICT
    } else {
        StatusCode::ACCEPTED
    };
    (
        code,
        Json(json!({ "started": started, "already_running": busy })),
    )
        .into_response()
}

async fn sync_one(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized(&d, &headers) {
        return r;
    }
    match d.trigger(&name) {
        Triggered::Started => {
            (StatusCode::ACCEPTED, Json(json!({ "started": [name] }))).into_response()
        }
        Triggered::Busy => error(StatusCode::CONFLICT, format!("a sync of {name} is running")),
        Triggered::Unknown => error(StatusCode::NOT_FOUND, format!("no target {name:?}")),
    }
}

#[derive(Debug, Default, Deserialize)]
struct RollbackRequest {
    to: Option<String>,
}

async fn rollback(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Option<Json<RollbackRequest>>,
) -> Response {
    if let Some(r) = refuse(&d, &headers, &name) {
        return r;
    }
    let to = body.and_then(|Json(b)| b.to);
    match d.rollback(&name, to).await {
        Ok(m) => {
            tracing::warn!(target = %name, digest = %m.digest, "rolled back and pinned (API)");
            (
                StatusCode::OK,
                Json(json!({ "target": name, "digest": m.digest, "pinned": true })),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn unpin(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refuse(&d, &headers, &name) {
        return r;
    }
    match d.unpin(&name).await {
        Ok(was) => (
            StatusCode::OK,
            Json(json!({ "target": name, "was_pinned": was })),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
