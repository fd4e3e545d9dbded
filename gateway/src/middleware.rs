//! The middleware every request passes, outermost first: `count_rejections` (every JSON
//! error counted by its code), `guard` (request size, overload shedding, the client's
//! address), and on API routes `require` (authentication and what the route needs).
//! Each is HTTP glue over a service below it (telemetry, limits, auth).

use axum::extract::rejection::{MatchedPathRejection, RawPathParamsRejection};
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{Need, Principal, form_pairs, with_challenge};
use crate::conn::PeerAddr;
use crate::error::ErrorCode;
use crate::limits::ClientIp;
use crate::routes;
use crate::state::AppState;

/// Outermost middleware: counts every JSON error answered, by its code (set by
/// `ApiError::into_response`, so whatever refused the request, it is counted the same way).
pub(crate) async fn count_rejections(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        state.telemetry.rejected(code);
    }
    response
}

/// Before routing: refuses oversized request targets (414) and headers (431), and sheds
/// requests beyond `max_inflight_requests` with 503 so overload turns into fast, retryable
/// answers instead of a growing queue. Streams count only until their response starts, so
/// existing subscribers are never shed.
pub(crate) async fn guard(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let limits = &state.limits;
    let ip = request
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map(|c| c.0.0.ip());
    request.extensions_mut().insert(ClientIp(ip));
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if let Err(e) = limits.check_request_size(target, headers) {
        return e.into_response();
    }
    let _inflight = match limits.admit() {
        Ok(guard) => guard,
        Err(e) => return e.into_response(),
    };
    next.run(request).await
}

/// The middleware on every authenticated route: authenticates, checks what the route needs,
/// and leaves the [`Principal`](crate::Principal) for the handler.
pub(crate) async fn require(
    State(state): State<AppState>,
    matched: Result<MatchedPath, MatchedPathRejection>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    // Looked up in place: a route has at most three parameters, not worth a map per request.
    let param = |name: &str| -> &str {
        params
            .as_ref()
            .ok()
            .and_then(|p| p.iter().find(|(key, _)| *key == name).map(|(_, v)| v))
            .unwrap_or("")
    };
    let route = matched.as_ref().map_or("", MatchedPath::as_str);
    let compat_channel;
    let need = match (request.method(), route) {
        (_, routes::CHANNELS | routes::ADMIN_STATS) => Need::Admin,
        (_, routes::METRICS) => Need::Metrics,
        (
            _,
            routes::CHANNEL_CONNECTIONS
            | routes::CONNECTION
            | routes::CONNECTION_MESSAGES
            | routes::CONNECTION_CLOSE
            | routes::SUBJECT_CONNECTIONS
            | routes::SUBJECT_MESSAGES
            | routes::SUBJECT_CLOSE,
        ) => Need::Connections,
        (&Method::DELETE, routes::CHANNEL) => Need::Admin,
        (_, routes::CHANNEL) => Need::Describe(param("channel")),
        (&Method::POST, routes::CHANNEL_MESSAGES | routes::COMPAT_PUBLISH) => {
            Need::Publish(param("channel"))
        }
        (_, routes::CHANNEL_MESSAGES) => Need::History(param("channel")),
        (_, routes::CHANNEL_EVENTS | routes::CHANNEL_WS | routes::CHANNEL_PRESENCE) => {
            Need::Subscribe(param("channel"))
        }
        (_, routes::COMPAT_SUBSCRIBE) => {
            compat_channel = form_pairs(request.uri().query().unwrap_or(""))
                .into_iter()
                .find(|(k, _)| k == "channel")
                .map(|(_, v)| v)
                .unwrap_or_default();
            Need::Subscribe(&compat_channel)
        }
        (_, routes::OBJECT | routes::OBJECT_REST) => Need::Object {
            namespace: param("namespace"),
            name: param("name"),
        },
        // A stream of several channels checks each itself.
        (_, routes::EVENTS) => Need::Credential,
        // Batch publish (checked per channel by the handler) and anything added later:
        // a credential at least, never open by omission.
        _ => Need::Credential,
    };
    // A hook that takes `connect` decides who may open its WebSocket: a client with no
    // credential comes in as nobody in particular (a credential it does send must be valid).
    let hook_decides = route == routes::HOOK_WS
        && state
            .hooks
            .named(param("name"))
            .is_some_and(|hook| hook.takes("connect"));
    let principal = match state
        .auth
        .authenticate(request.method(), request.headers(), request.uri().query())
        .and_then(|p| p.require(need).map(|()| p))
    {
        Ok(p) => p,
        Err(e) if hook_decides && e.code == "missing_credential" => Principal::nobody(),
        Err(e) => return with_challenge(e),
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}
