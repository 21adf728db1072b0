//! The HTTP API: `/healthz`, `/readyz`, `/status`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::status::Board;

pub fn router(board: Board) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(board)
}

async fn readyz(State(board): State<Board>) -> impl IntoResponse {
    let report = board.report();
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

async fn status(State(board): State<Board>) -> impl IntoResponse {
    Json(board.report())
}
