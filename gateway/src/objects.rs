//! User-defined objects mounted under `/v1/objects/{namespace}/{name}/...`: HTTP requests go
//! to the object's `fetch`, WebSocket upgrades to its `websocket`, and accepted sockets'
//! messages and closes to `socket_message` and `socket_close` (waking it if it hibernated).

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use dormouse_runtime::{DynNamespace, Inbound, Transport};
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::channels::{check_channel, read_body};

/// The request header carrying the caller's identity (token `sub`, API key name, or
/// `anonymous`) to objects.
pub const SUBJECT_HEADER: &str = "x-dormouse-subject";
use crate::cluster::SocketLink;
use crate::conn::WsHandshake;
use crate::connections::Target;
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::ConnKind;
use crate::ws::{Mode, WsSession, with_connection_id};

/// `/v1/objects/{namespace}/{name}` and everything below it, any method.
pub(crate) async fn route(State(state): State<AppState>, request: Request) -> Response {
    match handle(state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: AppState, request: Request) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let principal = parts
        .extensions
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no caller"))?;
    // Objects learn who calls them from this header, which the gateway always sets, so a
    // client cannot claim to be someone else by sending it.
    let subject = HeaderValue::from_str(&principal.subject)
        .unwrap_or_else(|_| HeaderValue::from_static("unprintable"));
    parts.headers.insert(SUBJECT_HEADER, subject);
    let expires_at = principal
        .time_left()
        .map(|left| tokio::time::Instant::now() + left);
    let Path(segments) = Path::<Vec<(String, String)>>::from_request_parts(&mut parts, &state)
        .await
        .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))?;
    let get = |key: &str| {
        segments
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let namespace = get("namespace").unwrap_or_default();
    let name = get("name").unwrap_or_default();
    let rest = get("rest").unwrap_or_default();
    // The server's own namespaces (their names have a dot) are not for clients.
    let target = check_namespace_name(&namespace)
        .ok()
        .and_then(|()| state.object_namespace(&namespace))
        .ok_or_else(|| {
            ApiError::not_found(format!("no object namespace {namespace:?} is mounted"))
        })?;
    check_channel(&name).map_err(|e| {
        ApiError::bad_request(
            "bad_object_name",
            e.message.replace("channel names", "object names"),
        )
    })?;
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let uri: Uri = path_and_query
        .parse()
        .map_err(|_| ApiError::bad_request("bad_path", "the path is not a valid URI"))?;

    if is_websocket(&parts.headers) {
        let upgrade = WsHandshake::from_request_parts(&mut parts, &state)
            .await
            .map_err(|e| ApiError::new(e.status(), "websocket_upgrade_required", e.body_text()))?;
        let caller = Caller {
            subject: principal.subject.clone(),
            expires_at,
        };
        return connect(state, target, name, uri, parts, upgrade, caller).await;
    }

    let limit = state.settings.limits.max_message_size.0;
    let data = read_body(&parts.headers, Body::new(body), limit, "the request body").await?;
    let mut request = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(data)
        .map_err(|e| ApiError::bad_request("bad_request", e.to_string()))?;
    *request.headers_mut() = parts.headers.clone();
    let response = match &state.cluster {
        Some(cluster) => cluster.fetch(&target, &name, request).await?,
        None => target.fetch(&name, request).await?,
    };
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Whether `error` says another node owns the object now.
fn moved(error: &dormouse_runtime::Error) -> bool {
    matches!(error, dormouse_runtime::Error::Storage(inner)
        if matches!(**inner, dormouse_storage::Error::NotOwner { .. }))
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Who opened a WebSocket to an object, as the connection keeps it.
struct Caller {
    subject: Arc<str>,
    /// When the credential expires: the connection closes then.
    expires_at: Option<tokio::time::Instant>,
}

async fn connect(
    state: AppState,
    target: Arc<dyn DynNamespace>,
    name: String,
    uri: Uri,
    parts: axum::http::request::Parts,
    upgrade: WsHandshake,
    caller: Caller,
) -> Result<Response, ApiError> {
    let settings = state.settings.clone();
    let (mut socket, receiver) = state.client_socket(Transport::WebSocket);
    let socket_id = socket.id();
    // This connection delivers its close as an event (below), so the object sees it.
    socket.set_close_reported();
    let mut request = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(())
        .map_err(|e| ApiError::bad_request("bad_request", e.to_string()))?;
    *request.headers_mut() = parts.headers.clone();
    let (request_parts, ()) = request.into_parts();
    // In cluster mode the object may run on another node: it then holds a socket there
    // whose frames are relayed to this connection.
    let link = match &state.cluster {
        Some(cluster) => {
            cluster
                .connect(&target, &name, socket, request_parts)
                .await?
        }
        None => {
            target.connect(&name, socket, request_parts).await?;
            SocketLink::Here
        }
    };

    // Messages go to the object one at a time, in the order the client sent them; the close
    // goes last.
    let (forward, mut inbound) = mpsc::unbounded_channel::<Inbound>();
    let lost = Arc::new(tokio::sync::Notify::new());
    let forwarder = {
        let target = target.clone();
        let name = name.clone();
        let cluster = state.cluster.clone();
        let lost = lost.clone();
        async move {
            let mut gone = false;
            while let Some(message) = inbound.recv().await {
                if gone {
                    continue;
                }
                // Cluster mode: whether the object no longer has this socket where the
                // message went (its node died or restarted, or another node took the
                // object over while this one was paused or cut off).
                let (sent, lost_socket) = match (&link, &cluster) {
                    (SocketLink::Remote(remote), Some(cluster)) => {
                        match cluster.remote_message(remote, message).await {
                            Ok(()) => (Ok(()), false),
                            Err(failure) => (Err(failure.error), failure.lost),
                        }
                    }
                    _ => {
                        let sent = target.socket_message(&name, socket_id, message).await;
                        let moved = sent.as_ref().is_err_and(moved);
                        (sent, moved)
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(object = %name, error = %crate::logging::error_chain(&e), "socket message failed");
                }
                if lost_socket {
                    // The client reconnects, to wherever the object runs now.
                    lost.notify_one();
                    gone = true;
                }
            }
            let closed = match (link, &cluster) {
                (SocketLink::Remote(remote), Some(cluster)) => {
                    cluster.remote_closed(remote).await;
                    Ok(())
                }
                _ => target.socket_closed(&name, socket_id).await,
            };
            if let Err(e) = closed {
                tracing::debug!(object = %name, error = %crate::logging::error_chain(&e), "socket close not delivered");
            }
        }
    };
    let label = format!("{}/{name}", target.name());
    let mut tracked = state
        .telemetry
        .connection_opened(ConnKind::Ws, false, &label);
    let connection_id = tracked.register(
        &state.connections,
        caller.subject,
        Target::Object(Arc::from(label.as_str())),
        Transport::WebSocket,
        receiver.outlet(),
    );
    let mode = Mode::Object { forward, lost };
    let conn = WsSession::new(&state, tracked, caller.expires_at, mode, receiver);
    let max_message = settings.limits.max_message_size.0 as usize + 64 * 1024;
    let tasks = state.tasks.clone();
    let telemetry = state.telemetry.clone();
    let response = upgrade.accept(max_message, telemetry, true, move |ws, direct| {
        tasks.track_future(async move {
            let forwarding = tokio::spawn(forwarder);
            // Dropping the connection drops `forward`, which ends the forwarder after it
            // delivered everything, then the close.
            conn.run(ws, direct).await;
            let _ = forwarding.await;
        })
    });
    Ok(with_connection_id(response, &connection_id))
}

/// Namespace names appear in URLs and storage keys: keep them short and plain.
pub(crate) fn check_namespace_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "namespace names are 1 to 64 characters from A-Z a-z 0-9 _ -; got {name:?}"
        ));
    }
    Ok(())
}
