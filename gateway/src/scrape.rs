//! `GET /metrics`: the server's figures as Prometheus text (rendered by `telemetry`).

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

/// `GET /metrics`
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.telemetry.render(&state.namespace_stats());
    if let Some(cluster) = &state.cluster {
        text.push_str(&cluster.render_metrics());
    }
    text.push_str(&state.hooks.render_metrics());
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
