//! The channel routes: publish one message, read history, describe, list and delete.

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::{Extension, Json};
use bytes::Bytes;
use dormouse_actors::channel::{
    ChannelRequest, ChannelResponse, Direction, EventId, NAMESPACE, NewMessage, Range, Start,
    validate_channel_name,
};
use std::net::IpAddr;
use std::sync::Arc;

use dormouse_runtime::{ObjectState, Socket, SocketReceiver, Transport};
use dormouse_storage::ObjectId;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::connections::Target;
use crate::error::ApiError;
use crate::hooks::{Connecting, Route};
use crate::limits::ClientIp;
use crate::publisher::{Client, Publisher, check_names};
use crate::state::AppState;
use crate::telemetry::{ConnKind, Connection};

/// A channel name taken from the path and validated, so handlers never see a bad one.
#[derive(Debug)]
pub(crate) struct ChannelName(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for ChannelName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))?;
        check_channel(&name)?;
        Ok(Self(name))
    }
}

pub(crate) fn check_channel(name: &str) -> Result<(), ApiError> {
    validate_channel_name(name).map_err(|m| ApiError::bad_request("bad_channel_name", m))
}

/// Parses the query string into `T`, answering a JSON 400 that names the problem.
pub(crate) fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    let raw = uri.query().unwrap_or("");
    serde_urlencoded_from_str(raw)
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(raw: &str) -> Result<T, ApiError> {
    let uri: Uri = format!("/?{raw}")
        .parse()
        .map_err(|_| ApiError::bad_request("bad_query", "the query string is not valid"))?;
    axum::extract::Query::<T>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request("bad_query", e.body_text()))
}

/// Parses an event id given by a client, as a 400 when malformed (never a silent restart).
pub(crate) fn parse_id(raw: &str, what: &str) -> Result<EventId, ApiError> {
    raw.parse::<EventId>()
        .map_err(|e| ApiError::bad_request("bad_event_id", format!("{what}: {e}")))
}

/// Reads a body of at most `limit` bytes, refusing a larger one as soon as it shows.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    what: &str,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(format!(
            "{what} is larger than the limit of {} bytes",
            limit
        ))
    };
    if let Some(length) = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|e| {
            let inner = e.into_inner();
            if inner.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad_request("bad_body", format!("could not read the body: {inner}"))
            }
        })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishQuery {
    event: Option<String>,
}

/// `POST /v1/channels/{channel}/messages`: the body is the message.
pub(crate) async fn publish(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    ChannelName(channel): ChannelName,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let PublishQuery { event } = query(&uri)?;
    let publisher = &state.publisher;
    let client = Client {
        principal: &principal,
        ip,
    };
    // Before the body is read: a publisher that may not, or is over its rate, costs us as
    // little as possible.
    publisher.authorize(client, &channel)?;
    publisher.charge(client, 1)?;
    let event = match event {
        Some(e) => Some(e),
        None => header(&headers, "x-dormouse-event")?,
    };
    let idempotency_key = header(&headers, "idempotency-key")?;
    check_names(event.as_deref(), idempotency_key.as_deref())?;
    let limit = publisher.max_message_size() as u64;
    let data = read_body(&headers, body, limit, "the message").await?;
    let message = NewMessage {
        event,
        data,
        idempotency_key,
    };
    // The names were checked above and the size while reading: `Publisher::check` in two
    // steps, the first before the body is read. The channel's hook, if it screens
    // publishes, may refuse or rewrite it.
    let message = state
        .hooks
        .screen(
            &channel,
            &principal.subject,
            None,
            message,
            publisher.max_message_size(),
        )
        .await?;
    let mut results = publisher.publish(&channel, vec![message]).await?;
    let published = results.pop().ok_or_else(unexpected)?;
    let status = if published.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(json!({"id": published.id, "channel": channel, "duplicate": published.duplicate})),
    ))
}

/// A request header as text, `None` when absent; 400 `bad_header` when it is not ASCII.
pub(crate) fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map(str::to_string).map_err(|_| {
                ApiError::bad_request("bad_header", format!("header {name} must be ASCII text"))
            })
        })
        .transpose()
}

/// Who is subscribing, and how, as a subscription handler saw the request.
#[derive(Debug)]
pub(crate) struct Subscribing<'a> {
    pub(crate) channel: &'a str,
    pub(crate) transport: Transport,
    pub(crate) start: Start,
    pub(crate) principal: &'a Principal,
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) ip: Option<IpAddr>,
    /// The channel's hook (looked up once, by the handler, which also needs it).
    pub(crate) hook: Option<&'a Arc<Route>>,
}

/// A subscriber as [`connect`] made it.
pub(crate) struct Connected {
    /// The connection's guard: counted, in the connection table, owed its hook's calls.
    pub(crate) conn: Connection,
    /// Its side of the socket.
    pub(crate) receiver: SocketReceiver,
    pub(crate) connection_id: String,
    /// Where its stream starts (see `ChannelResponse::Subscribed`).
    pub(crate) starts_after: Option<EventId>,
    /// Channels its hook's `connect` answer subscribed it to as well.
    pub(crate) more: Vec<String>,
}

/// A new subscriber: counted, entered in the connection table, put through its channel's
/// hook (the `connect` decision and the disconnect record), then subscribed. Every SSE and
/// WebSocket subscription comes through here, so none skips its hook.
pub(crate) async fn connect(state: &AppState, how: Subscribing<'_>) -> Result<Connected, ApiError> {
    let (socket, receiver) = state.client_socket(how.transport);
    let kind = match how.transport {
        Transport::WebSocket | Transport::WebSocketBinary => ConnKind::Ws,
        Transport::Sse | Transport::SseMulti => ConnKind::Sse,
    };
    let mut conn = state.telemetry.connection_opened(kind, true, &how.channel);
    let mut more = Vec::new();
    let connection_id = conn.register(
        &state.connections,
        how.principal.subject.clone(),
        Target::Channel(Arc::from(how.channel)),
        how.transport,
        receiver.outlet(),
    );
    if let Some(route) = how.hook {
        let connecting = Connecting {
            subject: &how.principal.subject,
            channel: Some(how.channel),
            transport: match how.transport {
                Transport::WebSocket | Transport::WebSocketBinary => "websocket",
                Transport::Sse | Transport::SseMulti => "sse",
            },
            query: how.uri.query(),
            headers: how.headers,
            ip: how.ip,
        };
        // The reason a guard dropped on the way out logs (and, once admitted, tells the
        // hook in the disconnect).
        conn.ending("refused");
        let admitted = state.hooks.admit(route, &mut conn, connecting).await?;
        let subject = admitted
            .subject
            .as_deref()
            .unwrap_or(&how.principal.subject);
        let attachment = admitted.attachment.as_ref();
        (state.hooks)
            .may_subscribe(route, &connection_id, subject, how.channel, attachment)
            .await?;
        state.identify(
            &socket,
            subject,
            admitted.info.or(how.principal.info().cloned()),
        );
        more = admitted.channels;
        if !more.is_empty() && !how.transport.is_websocket() {
            let why = "a connect answer picks channels for WebSocket connections only (an \
                       event stream follows the channels its URL names)";
            return Err(route.bad_answer(why).to_api_error());
        }
    } else {
        state.identify(
            &socket,
            &how.principal.subject,
            how.principal.info().cloned(),
        );
    }
    conn.ending("subscribe_failed");
    let starts_after = subscribe(&state.publisher, how.channel, socket, how.start).await?;
    if let Some(route) = how.hook {
        conn.occupying(state.hooks.occupy(route, how.channel));
        let occupants = follow_picked(state, route, &receiver, how.channel, &more).await?;
        conn.occupying(occupants);
    }
    conn.ending("client_left");
    Ok(Connected {
        conn,
        receiver,
        connection_id,
        starts_after,
        more,
    })
}

/// Subscribes a connection that `route` admitted to the `channels` its `connect` answer
/// picked (from now on), besides `opened_for` (its own channel, if any). Each must be a
/// channel of that hook or of none: another hook did not admit the connection. Answers the
/// occupancy places to keep while the connection lives.
pub(crate) async fn follow_picked(
    state: &AppState,
    route: &Arc<Route>,
    receiver: &SocketReceiver,
    opened_for: &str,
    channels: &[String],
) -> Result<Vec<crate::hooks::occupancy::Occupant>, ApiError> {
    let most = state.settings.limits.channels_per_connection();
    let picked = channels.iter().filter(|c| *c != opened_for).count();
    let total = picked + usize::from(!opened_for.is_empty());
    if total > most {
        let why = format!(
            "\"channels\" names {picked} channels, {total} with the connection's own; a \
             connection follows at most {most} (limits.max_channels_per_connection)"
        );
        return Err(route.bad_answer(why).to_api_error());
    }
    let mut occupants = Vec::new();
    for channel in channels.iter().filter(|c| *c != opened_for) {
        let hook = state.hooks.for_channel(channel);
        if let Some(other) = hook.filter(|other| other.name() != route.name()) {
            let why = format!(
                "\"channels\" names {channel:?}, which goes through hook {}",
                other.name()
            );
            return Err(route.bad_answer(why).to_api_error());
        }
        let socket = receiver.socket().ok_or_else(unexpected)?;
        subscribe(&state.publisher, channel, socket, Start::Live).await?;
        if hook.is_some() {
            occupants.extend(state.hooks.occupy(route, channel));
        }
    }
    Ok(occupants)
}

/// Subscribes `socket` to `channel` from `start`. The channel sends the backlog and adds
/// the socket in one step; answers where the subscriber's stream starts.
pub(crate) async fn subscribe(
    publisher: &Publisher,
    channel: &str,
    socket: Socket,
    start: Start,
) -> Result<Option<EventId>, ApiError> {
    let watch = publisher.keeps_presence(channel).then(|| socket.clone());
    let reply = publisher.call(channel, ChannelRequest::Subscribe { socket, start });
    // Registered once the subscribe is queued (calls to a channel keep their order, so
    // the unsubscribe comes after it) and before waiting for its answer, so a caller that
    // gives up waiting (its client left) still leaves.
    if let Some(watch) = watch {
        leave_on_close(publisher, channel, &watch);
    }
    match reply.await? {
        ChannelResponse::Subscribed { starts_after } => Ok(starts_after),
        ChannelResponse::Full { limit } => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "channel_full",
            format!(
                "channel {channel:?} has its maximum of {limit} subscribers \
                 (limits.max_subscribers_per_channel); retry later"
            ),
        )
        .retry_after(CHANNEL_FULL_RETRY_AFTER_SECS)),
        _ => Err(unexpected()),
    }
}

/// Unsubscribes a member from `channel` once its connection ends (at once if it already
/// did): the channel does not prune a member's socket silently, so it can tell the others
/// who left, and this is how it hears. One watcher per channel of a connection.
fn leave_on_close(publisher: &Publisher, channel: &str, socket: &Socket) {
    let (publisher, id) = (publisher.clone(), socket.id());
    let key = channel;
    let channel = channel.to_string();
    socket.when_closed(key, move || {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let request = ChannelRequest::Unsubscribe { socket: id };
            if let Err(e) = publisher.call(&channel, request).await {
                // The channel looks for closed members itself before its next presence
                // page, so this leave is late, not lost.
                tracing::debug!(channel, error = %e, "a member's unsubscribe on close failed");
            }
        });
    });
}

/// `Retry-After` for a subscriber refused by a full channel: places free up as clients leave.
const CHANNEL_FULL_RETRY_AFTER_SECS: u64 = 5;

pub(crate) fn unexpected() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the channel answered with an unexpected response",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    after: Option<String>,
    before: Option<String>,
    direction: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    /// The credential, read by the auth middleware; allowed here so it is not refused.
    #[serde(rename = "access_token")]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// A time bound of a history query: milliseconds since the Unix epoch, or an RFC 3339
/// time (`2026-12-07T18:00:00Z`).
fn parse_time(raw: &str, name: &str) -> Result<u64, ApiError> {
    if let Ok(ms) = raw.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(raw)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "bad_time",
                format!(
                    "{name} must be milliseconds since the Unix epoch or an RFC 3339 time \
                     such as 2026-12-07T18:00:00Z; got {raw:?}"
                ),
            )
        })
}

/// `GET /v1/channels/{channel}/messages`: a page of stored events as JSON. Forward (oldest
/// first) from the oldest or `after=ID`; backward (newest first) with `direction=backward`
/// or `before=ID`; either within `since` and `until`.
pub(crate) async fn history(
    State(state): State<AppState>,
    ChannelName(channel): ChannelName,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let q: HistoryQuery = query(&uri)?;
    let max = state.settings.limits.max_history_page;
    let limit = q.limit.unwrap_or(100.min(max));
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(
            "bad_limit",
            format!("limit must be between 1 and {max}"),
        ));
    }
    let backward = match (q.direction.as_deref(), &q.after, &q.before) {
        (Some("forward") | None, _, None) => false,
        (Some("backward") | None, None, _) => true,
        (Some("forward"), _, Some(_))
        | (Some("backward"), Some(_), _)
        | (None, Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "bad_range",
                "after pages forward and before pages backward: give one, and a direction \
                 that agrees with it",
            ));
        }
        (Some(other), _, _) => {
            return Err(ApiError::bad_request(
                "bad_direction",
                format!("direction must be forward or backward; got {other:?}"),
            ));
        }
    };
    let since_ms = q
        .since
        .as_deref()
        .map(|t| parse_time(t, "since"))
        .transpose()?;
    let until_ms = q
        .until
        .as_deref()
        .map(|t| parse_time(t, "until"))
        .transpose()?;
    if let (Some(since), Some(until)) = (since_ms, until_ms)
        && since >= until
    {
        return Err(ApiError::bad_request(
            "bad_range",
            "since must be earlier than until",
        ));
    }
    let direction = if backward {
        Direction::Backward(
            q.before
                .as_deref()
                .map(|raw| parse_id(raw, "before"))
                .transpose()?,
        )
    } else {
        Direction::Forward(match &q.after {
            Some(raw) => Start::After(parse_id(raw, "after")?),
            None => Start::Oldest,
        })
    };
    let range = Range {
        direction,
        since_ms,
        until_ms,
    };
    let response = state
        .publisher
        .call(&channel, ChannelRequest::History { range, limit })
        .await?;
    let ChannelResponse::History(page) = response else {
        return Err(unexpected());
    };
    let events: Vec<Value> = page.events.iter().map(|e| e.json()).collect();
    let last = page.events.last().map(|e| e.id.to_string());
    let mut body = json!({
        "channel": channel,
        "direction": if backward { "backward" } else { "forward" },
        "events": events,
        "gap": page.gap,
    });
    if backward {
        // Nothing older is left once a page comes back short.
        body["next_before"] = json!(last.filter(|_| page.events.len() == limit));
    } else {
        body["next_after"] = json!(last);
    }
    Ok(Json(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// The credential, read by the auth middleware; allowed here so it is not refused.
    #[serde(rename = "access_token")]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// Most members one presence page lists.
const MAX_PRESENCE_PAGE: usize = 1000;

/// `GET /v1/channels/{channel}/presence?after=SUBJECT&limit=N`: the channel's members in
/// subject order, each with its info and its number of connections, plus the totals. Asks
/// the channel, which wakes if it sleeps: its members are its parked sockets.
pub(crate) async fn presence(
    State(state): State<AppState>,
    ChannelName(channel): ChannelName,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let PresenceQuery { after, limit, .. } = query(&uri)?;
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PRESENCE_PAGE {
        return Err(ApiError::bad_request(
            "bad_limit",
            format!("limit must be between 1 and {MAX_PRESENCE_PAGE}"),
        ));
    }
    if !state.publisher.keeps_presence(&channel) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "presence_not_enabled",
            format!(
                "channel {channel:?} keeps no presence: set presence = true in [channels] or \
                 in a [[channels.prefix]] entry that matches it"
            ),
        ));
    }
    let response = state
        .publisher
        .call(&channel, ChannelRequest::Presence { after, limit })
        .await?;
    let ChannelResponse::Presence(Some(page)) = response else {
        return Err(unexpected());
    };
    let members: Vec<Value> = page
        .members
        .iter()
        .map(|m| {
            json!({
                "subject": m.subject,
                // JSON the server checked when the connection came in.
                "info": m.info.as_ref().and_then(|i| serde_json::from_slice::<Value>(i).ok()),
                "connections": m.connections,
            })
        })
        .collect();
    Ok(Json(json!({
        "channel": channel,
        "members": members,
        "subjects": page.subjects,
        "connections": page.connections,
        "next_after": page.next_after,
    })))
}

/// `GET /v1/channels/{channel}`: what the channel holds, without waking it if it sleeps.
pub(crate) async fn info(
    State(state): State<AppState>,
    ChannelName(channel): ChannelName,
) -> Result<Json<Value>, ApiError> {
    if let Some(cluster) = &state.cluster {
        // The owner answers (it may be another node); subscribers are counted on this
        // node, where they are served from its copy of the channel.
        let response = state.publisher.call(&channel, ChannelRequest::Info).await?;
        let ChannelResponse::Info(info) = response else {
            return Err(unexpected());
        };
        let subscribers = cluster.subscribers_here(&channel).await;
        if info.last_id.is_none() && info.events == 0 && subscribers == 0 {
            return Err(ApiError::not_found(format!(
                "channel {channel:?} has no events and no subscribers"
            )));
        }
        return Ok(Json(json!({
            "channel": channel,
            "state": "active",
            "last_id": info.last_id,
            "earliest_id": info.earliest_id,
            "events": info.events,
            "bytes": info.bytes,
            "subscribers": subscribers,
            "node": cluster.me().name,
        })));
    }
    let object_state = state.channels.state(&channel);
    if object_state == ObjectState::Active {
        let response = state.channels.call(&channel, ChannelRequest::Info).await?;
        let ChannelResponse::Info(info) = response else {
            return Err(unexpected());
        };
        return Ok(Json(json!({
            "channel": channel,
            "state": "active",
            "last_id": info.last_id,
            "earliest_id": info.earliest_id,
            "events": info.events,
            "bytes": info.bytes,
            "subscribers": info.subscribers,
        })));
    }
    let stored = stored_info(&state, &channel)?;
    let subscribers = state.channels.parked_sockets(&channel).unwrap_or(0);
    if stored.is_none() && subscribers == 0 {
        return Err(ApiError::not_found(format!(
            "channel {channel:?} has no events and no subscribers"
        )));
    }
    let stored =
        stored.unwrap_or(json!({"last_id": null, "earliest_id": null, "events": 0, "bytes": 0}));
    Ok(Json(json!({
        "channel": channel,
        "state": "hibernated",
        "last_id": stored["last_id"],
        "earliest_id": stored["earliest_id"],
        "events": stored["events"],
        "bytes": stored["bytes"],
        "subscribers": subscribers,
    })))
}

/// The channel's log bounds read straight from storage (no activation).
fn stored_info(state: &AppState, channel: &str) -> Result<Option<Value>, ApiError> {
    let meta = state
        .runtime
        .storage()
        .log_meta(&ObjectId::new(NAMESPACE, channel))
        .map_err(dormouse_runtime::Error::from)?;
    Ok(meta.map(|m| {
        let id = |seq| {
            EventId {
                epoch: m.epoch,
                seq,
            }
            .to_string()
        };
        json!({
            "last_id": (m.last_seq > 0).then(|| id(m.last_seq)),
            "earliest_id": (m.count > 0).then(|| id(m.first_seq)),
            "events": m.count,
            "bytes": m.bytes,
        })
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// The credential, read by the auth middleware; allowed here so it is not refused.
    #[serde(rename = "access_token")]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// `GET /v1/channels?after=NAME&limit=N`: channels with a log, a page at a time, plus counts.
pub(crate) async fn list(State(state): State<AppState>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let ListQuery { after, limit, .. } = query(&uri)?;
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request(
            "bad_limit",
            "limit must be between 1 and 1000",
        ));
    }
    if let Some(after) = &after {
        check_channel(after)?;
    }
    if let Some(cluster) = &state.cluster {
        return list_in_cluster(&state, cluster, after.as_deref(), limit).await;
    }
    let names = state
        .runtime
        .storage()
        .list_logs(NAMESPACE, after.as_deref(), limit)
        .map_err(dormouse_runtime::Error::from)?;
    let mut channels = Vec::with_capacity(names.len());
    for name in &names {
        let stored = stored_info(&state, name)?.unwrap_or(Value::Null);
        let object_state = match state.channels.state(name) {
            ObjectState::Active => "active",
            ObjectState::Hibernated | ObjectState::Dormant => "hibernated",
        };
        channels.push(json!({
            "channel": name,
            "state": object_state,
            "last_id": stored["last_id"],
            "events": stored["events"],
        }));
    }
    let stats = state.channels.stats();
    let next_after = (names.len() == limit)
        .then(|| names.last().cloned())
        .flatten();
    Ok(Json(json!({
        "channels": channels,
        "next_after": next_after,
        "active": stats.active,
        "hibernated": stats.hibernated,
    })))
}

/// `GET /v1/channels` on a node of a cluster: the names come from the cluster's index of
/// channels with a log, and each channel's figures from the channel itself, through its
/// owner (which wakes a hibernated one: a page costs up to `limit` wake-ups, 8 at a time).
/// `state` says whether a node held the channel before the listing asked it.
async fn list_in_cluster(
    state: &AppState,
    cluster: &std::sync::Arc<crate::cluster::ClusterNode>,
    after: Option<&str>,
    limit: usize,
) -> Result<Json<Value>, ApiError> {
    use futures::StreamExt as _;
    let names = cluster
        .storage()
        .list_logs_indexed(NAMESPACE, after, limit)
        .await
        .map_err(dormouse_runtime::Error::from)?;
    let described: Vec<Result<Value, ApiError>> = futures::stream::iter(names.clone())
        .map(|name| {
            let (state, cluster) = (state.clone(), cluster.clone());
            async move { describe(&state, &cluster, name).await }
        })
        .buffered(8)
        .collect()
        .await;
    let channels = described.into_iter().collect::<Result<Vec<_>, _>>()?;
    let next_after = (names.len() == limit)
        .then(|| names.last().cloned())
        .flatten();
    let stats = state.channels.stats();
    Ok(Json(json!({
        "channels": channels,
        "next_after": next_after,
        "active": stats.active,
        "hibernated": stats.hibernated,
    })))
}

/// One channel of a cluster listing.
async fn describe(
    state: &AppState,
    cluster: &crate::cluster::ClusterNode,
    name: String,
) -> Result<Value, ApiError> {
    let held = cluster.held_anywhere(&name).await;
    let response = state.publisher.call(&name, ChannelRequest::Info).await?;
    let ChannelResponse::Info(info) = response else {
        return Err(unexpected());
    };
    Ok(json!({
        "channel": name,
        "state": if held { "active" } else { "hibernated" },
        "last_id": info.last_id,
        "events": info.events,
    }))
}

/// `DELETE /v1/channels/{channel}`: drops the history; the next publish starts a new epoch,
/// so old cursors get a gap event instead of pointing into the new history.
pub(crate) async fn delete(
    State(state): State<AppState>,
    ChannelName(channel): ChannelName,
) -> Result<Json<Value>, ApiError> {
    let response = state
        .publisher
        .call(&channel, ChannelRequest::Delete)
        .await?;
    let ChannelResponse::Deleted = response else {
        return Err(unexpected());
    };
    Ok(Json(json!({"channel": channel, "deleted": true})))
}
