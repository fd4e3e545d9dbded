//! The server-side connection API (docs/API.md, "Connections"): what a backend calls to
//! reach clients. Each handler turns its request into an [`Op`] and runs it where the
//! connections are: on this node, on the node an id names, or on every live node.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use futures::future::join_all;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{CloseRequest, Direct, MAX_LIST, Op, Outcome, parse_id};
use crate::channels::{ChannelName, header, query, read_body};
use crate::error::ApiError;
use crate::publisher::check_names;
use crate::state::AppState;

/// Largest close request body: a code and a reason of at most 123 bytes.
const MAX_CLOSE_BODY: u64 = 4096;

/// Listings return this many connections unless `?limit=` says otherwise.
const DEFAULT_LIST: usize = 1000;

/// The answer about one connection that is not there.
fn gone(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "connection_not_found",
        format!(
            "connection {id} is not connected: it closed, or the node that served it \
             restarted or left"
        ),
    )
}

/// Runs an operation on one connection, on the node that serves it.
async fn on_one(
    state: &AppState,
    id: &str,
    op: impl FnOnce(u64) -> Op,
) -> Result<Outcome, ApiError> {
    let parsed = parse_id(id)?;
    let op = op(parsed.seq);
    let table = &state.connections;
    if parsed.is_of(table.me()) {
        return Ok(table.apply(&op));
    }
    let Some(cluster) = &state.cluster else {
        // Another node's id, or this node's before a restart: nothing here answers to it.
        return Ok(Outcome::default());
    };
    cluster.fits(&op)?;
    match cluster.connection_node(&parsed) {
        Some(node) => cluster
            .connections_call(&node, &op)
            .await
            .map_err(ApiError::unavailable),
        None => Ok(Outcome::default()),
    }
}

/// Runs an operation on every live node's connections and adds the answers up; nodes that
/// did not answer are named, since what they hold may or may not have been reached. An
/// operation too large to reach other nodes is refused before it reaches any (413).
async fn on_all(
    state: &AppState,
    op: Op,
    limit: usize,
) -> Result<(Outcome, Vec<String>), ApiError> {
    if let Some(cluster) = &state.cluster {
        cluster.fits(&op)?;
    }
    let mut outcome = state.connections.apply(&op);
    let mut unreachable = Vec::new();
    if let Some(cluster) = &state.cluster {
        let others = cluster.other_nodes();
        let answers = join_all(
            others
                .iter()
                .map(|node| cluster.connections_call(node, &op)),
        )
        .await;
        for (node, answer) in others.iter().zip(answers) {
            match answer {
                Ok(answer) => outcome.add(answer, limit),
                Err(why) => {
                    tracing::warn!(node = %node.name, %why, "a node did not answer a connections call");
                    unreachable.push(node.name.clone());
                }
            }
        }
    }
    Ok((outcome, unreachable))
}

/// `GET /v1/connections/{id}`
pub(crate) async fn connection_info(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let outcome = on_one(&state, &id, |seq| Op::Info { seq }).await?;
    let info = outcome
        .connections
        .into_iter()
        .next()
        .ok_or_else(|| gone(&id))?;
    Ok(Json(serde_json::to_value(info).unwrap_or_default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendQuery {
    event: Option<String>,
}

/// A backend's message from a request: the body as is, its event type from `?event=` or
/// `X-Dormouse-Event` (checked as a publish's), `message` when none is given.
async fn direct(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Direct, ApiError> {
    let SendQuery { event } = query(uri)?;
    let event = match event {
        Some(event) => Some(event),
        None => header(headers, "x-dormouse-event")?,
    };
    check_names(event.as_deref(), None)?;
    let limit = state.settings.limits.max_message_size.0;
    let data = read_body(headers, body, limit, "the message").await?;
    Ok(Direct {
        event: event.unwrap_or_else(|| dormouse_actors::channel::DEFAULT_EVENT.to_string()),
        data,
    })
}

/// A close request's body: empty for a normal close, else `{"code","reason"}`.
async fn close_request(headers: &HeaderMap, body: Body) -> Result<CloseRequest, ApiError> {
    let bytes = read_body(headers, body, MAX_CLOSE_BODY, "the close request").await?;
    let close = if bytes.iter().all(u8::is_ascii_whitespace) {
        CloseRequest::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(
                "bad_json",
                format!("expected {{\"code\": 4000, \"reason\": \"...\"}} or no body: {e}"),
            )
        })?
    };
    close.check()?;
    Ok(close)
}

/// The 409 for a send that found the client too far behind: it is being closed, and will
/// resume from its last event when it reconnects; the message did not reach it.
fn slow(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "slow_consumer",
        format!(
            "{what} is too far behind to take more: it is being disconnected (it resumes \
             from its last event id when it reconnects) and did not get this message"
        ),
    )
}

/// `POST /v1/connections/{id}/messages`
pub(crate) async fn connection_send(
    State(state): State<AppState>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    // The id first: a malformed one is refused before the body is read.
    parse_id(&id)?;
    let message = direct(&state, &uri, &headers, body).await?;
    let outcome = on_one(&state, &id, |seq| Op::Send { seq, message }).await?;
    if outcome.slow > 0 {
        return Err(slow(&format!("connection {id}")));
    }
    if outcome.done == 0 {
        return Err(gone(&id));
    }
    Ok(Json(json!({"connection_id": id, "queued": true})))
}

/// `POST /v1/connections/{id}/close`
pub(crate) async fn connection_close(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    parse_id(&id)?;
    let close = close_request(&headers, body).await?;
    let outcome = on_one(&state, &id, |seq| Op::Close { seq, close }).await?;
    if outcome.done == 0 {
        return Err(gone(&id));
    }
    Ok(Json(json!({"connection_id": id, "closing": true})))
}

fn check_subject(subject: &str) -> Result<(), ApiError> {
    if subject.is_empty() || subject.len() > 256 {
        return Err(ApiError::bad_request(
            "bad_subject",
            format!(
                "a subject is 1 to 256 bytes (a credential's `sub`); got {} bytes",
                subject.len()
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
}

fn list_limit(uri: &Uri) -> Result<usize, ApiError> {
    let ListQuery { limit } = query(uri)?;
    match limit.unwrap_or(DEFAULT_LIST) {
        limit @ 1..=MAX_LIST => Ok(limit),
        other => Err(ApiError::bad_request(
            "bad_limit",
            format!("limit is {other}; it must be 1 to {MAX_LIST}"),
        )),
    }
}

fn listing(key: &str, name: String, outcome: Outcome, unreachable: Vec<String>) -> Json<Value> {
    let truncated = outcome.total > outcome.connections.len();
    let answer = json!({
        key: name,
        "connections": outcome.connections,
        "total": outcome.total,
        "truncated": truncated,
    });
    naming_unreachable(answer, unreachable)
}

/// `answer`, with the nodes that did not answer named when there are any: what they hold
/// may or may not have been reached.
fn naming_unreachable(mut answer: Value, unreachable: Vec<String>) -> Json<Value> {
    if !unreachable.is_empty() {
        answer["unreachable_nodes"] = json!(unreachable);
    }
    Json(answer)
}

/// `GET /v1/subjects/{subject}/connections`
pub(crate) async fn subject_list(
    State(state): State<AppState>,
    Path(subject): Path<String>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    check_subject(&subject)?;
    let limit = list_limit(&uri)?;
    let op = Op::ListSubject {
        subject: subject.clone(),
        limit,
    };
    let (outcome, unreachable) = on_all(&state, op, limit).await?;
    Ok(listing("subject", subject, outcome, unreachable))
}

/// `POST /v1/subjects/{subject}/messages`
pub(crate) async fn subject_send(
    State(state): State<AppState>,
    Path(subject): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    check_subject(&subject)?;
    let message = direct(&state, &uri, &headers, body).await?;
    let op = Op::SendSubject {
        subject: subject.clone(),
        message,
    };
    let (outcome, unreachable) = on_all(&state, op, 0).await?;
    let answer = json!({
        "subject": subject,
        "queued": outcome.done,
        "slow_consumers": outcome.slow,
    });
    Ok(naming_unreachable(answer, unreachable))
}

/// `POST /v1/subjects/{subject}/close`
pub(crate) async fn subject_close(
    State(state): State<AppState>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    check_subject(&subject)?;
    let close = close_request(&headers, body).await?;
    let op = Op::CloseSubject {
        subject: subject.clone(),
        close,
    };
    let (outcome, unreachable) = on_all(&state, op, 0).await?;
    let answer = json!({"subject": subject, "closing": outcome.done});
    Ok(naming_unreachable(answer, unreachable))
}

/// `GET /v1/channels/{channel}/connections`
pub(crate) async fn channel_connections(
    State(state): State<AppState>,
    ChannelName(channel): ChannelName,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let limit = list_limit(&uri)?;
    let op = Op::ListChannel {
        channel: channel.clone(),
        limit,
    };
    let (outcome, unreachable) = on_all(&state, op, limit).await?;
    Ok(listing("channel", channel, outcome, unreachable))
}
