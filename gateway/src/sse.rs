//! Server-Sent Events: one task per connection drains the socket's queue into the response
//! body, batching whatever is ready into one write, and sends keep-alive comments on its own
//! timer (so an idle client never wakes its channel).
//!
//! A subscription served outside hyper ([`crate::conn::raw_sse`]) has its socket to itself
//! after the response head, so once the opening comment is out its events are written
//! directly, as a WebSocket's are ([`SubscriberWriter`]): by the thread that released them,
//! and by the task under the same lock when woken. The task still writes the keep-alives
//! and the closing control event, through
//! [`SerializedIo`](crate::conn::writer::SerializedIo), so nothing lands inside an event.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use dormouse_actors::channel::{Control, Start};
use dormouse_runtime::{Outbound, SocketReceiver, Transport};
use futures::Stream;
use serde::Deserialize;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use crate::auth::Principal;
use crate::channels::{self, ChannelName, Subscribing, check_channel, query};
use crate::config::SseSettings;
use crate::conn::expiry::{deadline, expired};
use crate::conn::{
    BodyWriter, Framing, RawSocket, StopWaiter, StreamCursor, SubscriberWriter, Writable,
};
use crate::connections::Registration;
use crate::cursor;
use crate::error::ApiError;
use crate::hooks::Route;
use crate::limits::ClientIp;
use crate::state::AppState;
use crate::telemetry::{ConnKind, Connection};
use crate::ws::with_connection_id;

/// Most bytes gathered into one body chunk from messages that are already queued.
const BATCH_BYTES: usize = 64 * 1024;

/// `GET /v1/channels/{channel}/events`
pub(crate) async fn subscribe(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    raw: Option<Extension<RawSocket>>,
    ChannelName(channel): ChannelName,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hook = state.hooks.for_channel(&channel).cloned();
    let (start, format) = cursor::from_request(
        &uri,
        &headers,
        hook.is_some(),
        state.settings.limits.max_history_page,
    )?;
    if format.is_some() && hook.is_none() {
        return Err(ApiError::bad_request(
            "bad_query",
            "format chooses how a WebSocket carries events; an event stream has one format",
        ));
    }
    let request = Request {
        principal: &principal,
        raw,
        uri: &uri,
        headers: &headers,
        ip,
        hook,
    };
    open(state, channel, start, request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompatQuery {
    channel: Option<String>,
    last_event_id: Option<String>,
    rewind: Option<String>,
    /// The credential, read by the auth middleware; allowed here so it is not refused.
    #[serde(rename = "access_token")]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// `GET /sub?channel=NAME`: the same stream, for clients of Redis-backed SSE proxies; with
/// several `channel` parameters, the stream of several channels (`GET /v1/events`).
pub(crate) async fn subscribe_compat(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    raw: Option<Extension<RawSocket>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let named = crate::auth::form_pairs(uri.query().unwrap_or(""))
        .iter()
        .filter(|(key, _)| key == "channel")
        .count();
    if named > 1 {
        let (principal, ip) = (Extension(principal), Extension(ClientIp(ip)));
        return subscribe_many(State(state), principal, ip, raw, uri, headers).await;
    }
    let CompatQuery {
        channel,
        last_event_id,
        rewind,
        ..
    } = query(&uri)?;
    let channel = channel.ok_or_else(|| {
        ApiError::bad_request("missing_channel", "the channel query parameter is required")
    })?;
    check_channel(&channel)?;
    let start = cursor::start(
        &headers,
        last_event_id.as_deref(),
        rewind.as_deref(),
        state.settings.limits.max_history_page,
    )?;
    let request = Request {
        principal: &principal,
        raw,
        uri: &uri,
        headers: &headers,
        ip,
        hook: state.hooks.for_channel(&channel).cloned(),
    };
    open(state, channel, start, request).await
}

/// `GET /v1/events?channel=a&channel=b[&last_event_id=..|&rewind=N]`: one event stream of
/// several channels, for browsers that may open only six connections to a server. Each
/// event's data is the WebSocket JSON message (it names the channel and its own id), and
/// its `id:` is a cursor of every channel's position in the URL's order, so the
/// `Last-Event-ID` an EventSource sends back when it reconnects resumes each channel
/// exactly. Each channel is checked as a subscription of its own; channels with a hook are
/// not taken (a hook admits connections one channel at a time).
pub(crate) async fn subscribe_many(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    raw: Option<Extension<RawSocket>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (mut channels, mut last_event_id, mut rewind) = (Vec::<String>::new(), None, None);
    for (key, value) in crate::auth::form_pairs(uri.query().unwrap_or("")) {
        match key.as_str() {
            "channel" => channels.push(value),
            "last_event_id" => last_event_id = Some(value),
            "rewind" => rewind = Some(value),
            // Read by the auth middleware.
            "access_token" => {}
            other => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!(
                        "unknown query parameter {other:?}; this route takes channel (one per \
                         channel), last_event_id and rewind"
                    ),
                ));
            }
        }
    }
    let limits = &state.settings.limits;
    if channels.is_empty() {
        return Err(ApiError::bad_request(
            "missing_channel",
            "name the channels to follow: ?channel=a&channel=b",
        ));
    }
    if channels.len() > limits.channels_per_connection() {
        return Err(ApiError::bad_request(
            "too_many_channels",
            format!(
                "{} channels asked for; one connection follows at most {} \
                 (limits.max_channels_per_connection)",
                channels.len(),
                limits.channels_per_connection()
            ),
        ));
    }
    for (i, channel) in channels.iter().enumerate() {
        if channels[..i].contains(channel) {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("channel {channel:?} is named twice"),
            ));
        }
        // A refusal of one channel names it: the client follows the others without it.
        check_channel(channel)
            .and_then(|()| principal.require(crate::auth::Need::Subscribe(channel)))
            .and_then(|()| state.hooks.may_add(channel))
            .map_err(|e| e.about(channel))?;
    }
    let starts = cursor::starts_of_many(
        &headers,
        last_event_id.as_deref(),
        rewind.as_deref(),
        channels.len(),
        limits.max_history_page,
    )?;
    let connected = channels::connect(
        &state,
        Subscribing {
            channel: &channels[0],
            transport: Transport::SseMulti,
            start: starts[0],
            principal: &principal,
            uri: &uri,
            headers: &headers,
            ip,
            hook: None,
        },
    )
    .await?;
    let mut positions = vec![connected.starts_after.map(|id| id.to_string())];
    for (channel, start) in channels.iter().zip(&starts).skip(1) {
        let socket = connected
            .receiver
            .socket()
            .ok_or_else(channels::unexpected)?;
        let starts_after = channels::subscribe(&state.publisher, channel, socket, *start).await?;
        positions.push(starts_after.map(|id| id.to_string()));
    }
    if let Some(registration) = connected.conn.registration() {
        registration.set_also(&channels[1..]);
    }
    let cursor = Box::new(StreamCursor::new(channels, positions));
    respond(&state, connected, raw, &principal, Some(cursor))
}

/// What both SSE routes take from their request.
struct Request<'a> {
    principal: &'a Principal,
    raw: Option<Extension<RawSocket>>,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    ip: Option<std::net::IpAddr>,
    /// The channel's hook, looked up once.
    hook: Option<Arc<Route>>,
}

async fn open(
    state: AppState,
    channel: String,
    start: Start,
    request: Request<'_>,
) -> Result<Response, ApiError> {
    let Request {
        principal,
        raw,
        uri,
        headers,
        ip,
        hook,
    } = request;
    let connected = channels::connect(
        &state,
        Subscribing {
            channel: &channel,
            transport: Transport::Sse,
            start,
            principal,
            uri,
            headers,
            ip,
            hook: hook.as_ref(),
        },
    )
    .await?;
    respond(&state, connected, raw, principal, None)
}

/// The event stream of a subscribed connection; `cursor` for one of several channels.
fn respond(
    state: &AppState,
    connected: channels::Connected,
    raw: Option<Extension<RawSocket>>,
    principal: &Principal,
    cursor: Option<Box<StreamCursor>>,
) -> Result<Response, ApiError> {
    let channels::Connected {
        conn,
        receiver,
        connection_id,
        starts_after,
        ..
    } = connected;
    // Where the stream starts, told first: a client that loses the stream before its first
    // event resumes from here, and misses nothing published meanwhile.
    let start = match &cursor {
        Some(cursor) => cursor.current(),
        None => starts_after.map(|id| id.to_string()),
    };
    // Only a response written outside hyper may have its body written around it.
    let direct = raw
        .filter(|Extension(raw)| raw.writable == Writable::ResponseBody)
        .map(|Extension(raw)| {
            SubscriberWriter::new(
                Some(raw.tcp),
                Arc::clone(&state.telemetry),
                Framing::EventStream,
            )
        });
    // The cursor goes where the events are written: the direct writer, or the task.
    let cursor = match (&direct, cursor) {
        (Some(direct), Some(cursor)) => {
            direct.keep_cursor(cursor);
            None
        }
        (_, cursor) => cursor,
    };
    let body = Body::from_stream(stream(
        conn,
        receiver,
        direct.clone(),
        &state.settings.sse,
        state.stopping.waiter(),
        principal.time_left().map(|left| Instant::now() + left),
        Begin { cursor, start },
    ));
    let mut response = with_connection_id(body.into_response(), &connection_id);
    if let Some(direct) = direct {
        response.extensions_mut().insert(BodyWriter(direct));
    }
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

struct EventStream {
    /// Counted while the stream lives; logs its end.
    conn: Connection,
    receiver: SocketReceiver,
    /// Writes events straight to the socket, once `direct_on`; `None` when the stream goes
    /// through hyper.
    direct: Option<Arc<SubscriberWriter>>,
    /// Set on the first turn after the opening comment: from then on, the response head
    /// and the opening are on the wire (or pending, under the lock) before any event.
    direct_on: bool,
    keepalive: Interval,
    /// Ready when the server starts shutting down.
    stopping: StopWaiter,
    /// Ends the stream when the subscriber's credential expires; `None` if it does not.
    expired: Option<Pin<Box<Sleep>>>,
    opening: Option<Bytes>,
    done: bool,
    /// A stream of several channels written by this task (not by a direct writer, which
    /// then keeps it): every channel's position, written as each event's id.
    cursor: Option<Box<StreamCursor>>,
}

/// Where a stream begins: the cursor of a stream of several channels, when its task
/// writes the events (a direct writer keeps it otherwise), and the position its first
/// event tells.
struct Begin {
    cursor: Option<Box<StreamCursor>>,
    start: Option<String>,
}

fn stream(
    conn: Connection,
    receiver: SocketReceiver,
    direct: Option<Arc<SubscriberWriter>>,
    settings: &SseSettings,
    stopping: StopWaiter,
    expires_at: Option<Instant>,
    begin: Begin,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + use<> {
    let Begin { cursor, start } = begin;
    let (keepalive, retry) = (settings.keepalive, settings.retry);
    let mut keepalive = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let hello = serde_json::json!({
        "type": "connected",
        "connection_id": conn.registration().map(Registration::id),
    });
    let conn = EventStream {
        conn,
        receiver,
        direct,
        direct_on: false,
        keepalive,
        stopping,
        expired: deadline(expires_at),
        // Sent at once, so the client (and any proxy) sees the stream open immediately,
        // with its connection id as the first event. Its id, when the stream has a
        // position, is where the stream starts: the cursor a client that saw no event yet
        // resumes from (an EventSource keeps it as its lastEventId).
        opening: Some(Bytes::from(format!(
            ": connected\nretry: {}\n\n{}event: dormouse.connected\ndata: {}\n\n",
            retry.as_millis(),
            start.map_or_else(String::new, |id| format!("id: {id}\n")),
            hello,
        ))),
        done: false,
        cursor,
    };
    futures::stream::unfold(conn, |mut conn| async move {
        if conn.done {
            return None;
        }
        if let Some(opening) = conn.opening.take() {
            return Some((Ok(opening), conn));
        }
        if let Some(direct) = conn.direct.as_ref().filter(|_| !conn.direct_on) {
            conn.receiver.write_on_release(Arc::clone(direct) as _);
            conn.direct_on = true;
        }
        let chunk = conn.next_chunk().await?;
        Some((Ok(chunk), conn))
    })
}

impl EventStream {
    /// The next bytes to write, or `None` to end the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        enum Wake {
            Shutdown,
            Expired,
            Message(Option<(Outbound, Option<std::time::Instant>)>),
            /// With direct writes: something is queued or pending (false: the channel let
            /// go of the socket).
            Ready(bool),
            KeepAlive,
        }
        let direct = self.direct.clone().filter(|_| self.direct_on);
        let receiver = &mut self.receiver;
        let outbound = async {
            let Some(direct) = &direct else {
                return Wake::Message(receiver.recv_stamped().await);
            };
            Wake::Ready(
                std::future::poll_fn(|cx| match receiver.poll_ready(cx) {
                    // Registered first, then checked: a direct write that leaves bytes
                    // behind sets them before it wakes this task.
                    Poll::Pending if direct.has_pending() => Poll::Ready(true),
                    poll => poll,
                })
                .await,
            )
        };
        let wake = tokio::select! {
            biased;
            () = self.stopping.stopped() => Wake::Shutdown,
            () = expired(&mut self.expired) => Wake::Expired,
            wake = outbound => wake,
            _ = self.keepalive.tick() => Wake::KeepAlive,
        };
        match wake {
            Wake::Shutdown => {
                self.done = true;
                self.conn.ending("shutdown");
                Some(reconnect(
                    "shutdown",
                    "the server is restarting; reconnect with your last event id",
                ))
            }
            Wake::Expired => {
                self.done = true;
                self.conn.ending("token_expired");
                Some(reconnect(
                    "token_expired",
                    "your credential expired; reconnect with a fresh one and your last event id",
                ))
            }
            Wake::Message(None) => {
                self.conn.ending("ended");
                None
            }
            Wake::Ready(more) => {
                let direct = direct?;
                if !more {
                    if direct.has_pending() {
                        // Flushed by the body's writer before the stream ends.
                        return Some(Bytes::new());
                    }
                    self.conn.ending("ended");
                    return None;
                }
                let written = direct.write_queued(&mut self.receiver);
                self.conn
                    .telemetry()
                    .delivered(ConnKind::Sse, written.messages, written.stamps);
                if written.failed {
                    // The socket refused the bytes: the client is gone (the reason the
                    // connection is logged with unless something else ended it).
                    return None;
                }
                match written.close {
                    Some((code, reason)) => Some(self.closing(code, &reason)),
                    // Empty: the body's writer flushes what the socket did not take.
                    None => Some(Bytes::new()),
                }
            }
            Wake::Message(Some((message, stamp))) => {
                let first = self.frame(message, stamp)?;
                Some(self.gather(first))
            }
            Wake::KeepAlive => Some(Bytes::from_static(b": keep-alive\n\n")),
        }
    }

    /// The bytes of one queued message; counts it as delivered, since it is written next.
    fn frame(&mut self, message: Outbound, stamp: Option<std::time::Instant>) -> Option<Bytes> {
        match message {
            Outbound::Text(bytes) => {
                self.conn.telemetry().delivered(ConnKind::Sse, 1, stamp);
                Some(match &mut self.cursor {
                    Some(cursor) => cursor.stamp(bytes),
                    None => bytes,
                })
            }
            // The object never sends binary frames to SSE; drop rather than corrupt.
            Outbound::Binary(_) => Some(Bytes::new()),
            Outbound::Close { code, reason } => Some(self.closing(code, &reason)),
        }
    }

    /// The control event that ends the stream: `dormouse.reconnect` for a slow consumer
    /// (resume from the last id), `dormouse.close` with the code and reason a backend
    /// closed the connection with (`POST /v1/connections/{id}/close`), which a client
    /// should take as "do not reconnect" unless the code says otherwise.
    fn closing(&mut self, code: u16, reason: &str) -> Bytes {
        self.done = true;
        if code == Outbound::SLOW_CONSUMER {
            self.conn.telemetry().slow_disconnect(ConnKind::Sse);
            self.conn.ending("slow_consumer");
            return reconnect("slow_consumer", reason);
        }
        self.conn.ending("closed");
        let close = serde_json::json!({"type": "close", "code": code, "reason": reason});
        Bytes::from(format!("event: dormouse.close\ndata: {close}\n\n"))
    }

    /// Appends whatever else is already queued (up to a bound), so a burst is one write.
    fn gather(&mut self, first: Bytes) -> Bytes {
        if self.done || first.len() >= BATCH_BYTES {
            return first;
        }
        let mut batch: Option<BytesMut> = None;
        while batch.as_ref().map_or(first.len(), BytesMut::len) < BATCH_BYTES {
            let Some((message, stamp)) = self.receiver.try_recv_stamped() else {
                break;
            };
            let Some(next) = self.frame(message, stamp) else {
                break;
            };
            batch
                .get_or_insert_with(|| BytesMut::from(&first[..]))
                .extend_from_slice(&next);
            if self.done {
                break;
            }
        }
        batch.map_or(first, BytesMut::freeze)
    }
}

impl Drop for EventStream {
    /// Lets go of the socket: the channel may still offer this subscriber's queue until it
    /// notices the subscriber left.
    fn drop(&mut self) {
        if let Some(direct) = &self.direct {
            direct.release_socket();
        }
    }
}

fn reconnect(reason: &'static str, message: &str) -> Bytes {
    let control = Control {
        r#type: "reconnect",
        reason,
        message: message.to_string(),
        channel: None,
        earliest_id: None,
        requested_id: None,
    };
    match control.frame(Transport::Sse) {
        Outbound::Text(bytes) => bytes,
        _ => Bytes::new(),
    }
}
