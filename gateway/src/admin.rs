//! The admin dashboard: one self-contained HTML page compiled into the binary (no CDN, no
//! build step) that polls [`stats`] every second, plus the JSON it polls. The channel
//! inspector and the test-publish form on the page use the ordinary channel routes, with the
//! same credential, so the page can do nothing its token could not do anyway.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::busiest::WINDOW;
use crate::state::AppState;

/// The page; its script and styles are inline so it works offline and behind any proxy.
const PAGE: &str = include_str!("admin/dashboard.html");

/// How many of the busiest channels the page lists.
const BUSIEST_SHOWN: usize = 10;

/// `GET /admin`
pub(crate) async fn page() -> Response {
    let mut response = PAGE.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Only its own inline script and same-origin requests; never framed (clickjacking);
    // the token lives in sessionStorage and is never sent in a Referer.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /admin/api/stats`: everything the page shows except the channel inspector.
pub(crate) async fn stats(State(state): State<AppState>) -> Json<Value> {
    let t = &state.telemetry;
    let namespaces: Vec<Value> = state
        .namespace_stats()
        .into_iter()
        .map(|(name, s)| {
            json!({
                "namespace": name,
                "active": s.active,
                "hibernated": s.hibernated,
                "activations_total": s.activations_total,
                "wakes_total": s.wakes_total,
                "hibernations_total": s.hibernations_total,
                "failures_total": s.failures_total,
                "requests_total": s.requests_total,
            })
        })
        .collect();
    let busiest = t
        .busiest()
        .map(|b| b.top(BUSIEST_SHOWN))
        .unwrap_or_default();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": t.uptime().as_secs(),
        "auth": state.auth.enabled(),
        "durability": state.runtime.storage().durability().to_string(),
        "figures": t.figures(),
        "namespaces": namespaces,
        "busiest": busiest,
        "busiest_window_seconds": WINDOW,
        "max_history_page": state.settings.limits.max_history_page,
        "series": t.series(),
        // A node of a cluster: its view of the cluster (absent on one node).
        "cluster": state.cluster.as_ref().map(|c| c.admin_stats()),
    }))
}
