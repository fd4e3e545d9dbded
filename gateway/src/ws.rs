//! WebSocket subscribers (and publishers). One task per connection selects over the socket's
//! outbound queue, the client's frames, a ping timer and the shutdown signal. Outbound
//! messages already queued are written together, each as a frame header and its shared
//! payload, in one vectored write, usually by the thread that released them
//! ([`SubscriberWriter`]),
//! else by this task; tungstenite reads the client's frames and writes the control frames
//! (pings, pongs, closes) and answers.
//!
//! Framing (documented in docs/API.md): server to client, JSON text messages
//! `{"type":"message","id","event","data"|"data_base64"}`, `{"type":"gap",...}`,
//! `{"type":"ack","id","ref"}`, `{"type":"error","code","message","ref"}`; client to server,
//! `{"type":"publish","event"?,"data"|"data_base64","idempotency_key"?,"ref"?}` as text, or a
//! binary frame whose bytes are published as is.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use dormouse_actors::channel::NewMessage;
use dormouse_runtime::{Inbound, Outbound, SocketReceiver, Transport};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::{Auth, Need, Principal};
use crate::channels::{self, ChannelName, Subscribing};
use crate::config::Settings;
use crate::conn::expiry::{deadline, expired};
use crate::conn::{StopWaiter, SubscriberWriter, WsHandshake, WsStream};
use crate::connections::Target;
use crate::cursor;
use crate::error::ApiError;
use crate::hooks::{Connecting, Hooks, Route};
use crate::limits::ClientIp;
use crate::publisher::{Client, Publisher, Reply};
use crate::state::AppState;
use crate::telemetry::{ConnKind, Connection};

/// Close codes, documented for clients.
mod close {
    /// The server is restarting; reconnect with your last id.
    pub(super) const RESTART: u16 = 1012;
    /// The client fell too far behind; reconnect with your last id.
    pub(super) const SLOW_CONSUMER: u16 = dormouse_runtime::Outbound::SLOW_CONSUMER;
    /// Nothing (not even a pong) arrived within the idle timeout.
    pub(super) const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// The client's credential expired and was not refreshed; reconnect with a fresh one.
    pub(super) const TOKEN_EXPIRED: u16 = 4001;
}

/// The subprotocol a client offers to read events as binary frames, like `?format=binary`
/// (a browser's `new WebSocket(url, ["dormouse.binary"])`).
pub(crate) const BINARY_PROTOCOL: &str = "dormouse.binary";

/// `GET /v1/channels/{channel}/ws`
pub(crate) async fn subscribe(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    ChannelName(channel): ChannelName,
    uri: Uri,
    headers: HeaderMap,
    upgrade: Result<WsHandshake, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let hook = state.hooks.for_channel(&channel);
    // The query is checked before the handshake: a plain GET of a WebSocket URL answers
    // what is wrong with it (a browser's WebSocket cannot read a refused handshake, so the
    // JavaScript client asks this way), and `websocket_upgrade_required` only when nothing
    // else is.
    let (start, format) = cursor::from_request(
        &uri,
        &headers,
        hook.is_some(),
        state.settings.limits.max_history_page,
    )?;
    // A hooked channel's query is its hook's too: a format of its own is not ours.
    if let Some(other) = format.as_deref()
        && !matches!(other, "binary" | "json")
        && hook.is_none()
    {
        return Err(ApiError::bad_request(
            "bad_format",
            format!("format must be json (the default) or binary; got {other:?}"),
        ));
    }
    let mut upgrade = upgrade.map_err(upgrade_required)?;
    let binary = match format.as_deref() {
        Some("binary") => true,
        Some("json") => false,
        _ => upgrade.offers(BINARY_PROTOCOL),
    };
    if binary {
        upgrade.choose(BINARY_PROTOCOL);
    }
    let settings = state.settings.clone();
    let channels::Connected {
        conn: tracked,
        receiver,
        connection_id,
        mut more,
        starts_after,
    } = channels::connect(
        &state,
        Subscribing {
            channel: &channel,
            transport: if binary {
                Transport::WebSocketBinary
            } else {
                Transport::WebSocket
            },
            start,
            principal: &principal,
            uri: &uri,
            headers: &headers,
            ip,
            hook,
        },
    )
    .await?;
    // Base64 in JSON inflates a payload by 4/3; leave room for it and the envelope.
    let max_message = settings.limits.max_message_size.0 as usize / 3 * 4 + 64 * 1024;
    let expires_at = principal.time_left().map(|left| Instant::now() + left);
    let screened = hook
        .filter(|route| route.takes("publish"))
        .map(|_| Screened::new(state.hooks.clone(), connection_id.clone()));
    more.retain(|c| *c != channel);
    let picked = more.len();
    let mode = Mode::Channel {
        channel,
        publisher: state.publisher.clone(),
        client_publish: settings.websocket.client_publish,
        auth: state.auth.clone(),
        principal,
        ip,
        screened,
        more,
        picked,
        subscribing: Vec::new(),
        starts_after: starts_after.map(|id| id.to_string()),
        hooks: state.hooks.clone(),
        settings: settings.clone(),
    };
    let conn = WsSession::new(&state, tracked, expires_at, mode, receiver);
    let tasks = state.tasks.clone();
    let telemetry = state.telemetry.clone();
    let response = upgrade.accept(max_message, telemetry, false, move |ws, direct| {
        tasks.track_future(conn.run(ws, direct))
    });
    Ok(with_connection_id(response, &connection_id))
}

/// `GET /v1/hooks/{name}/ws`: a WebSocket whose every message goes to the hook `name`
/// (docs/HOOKS.md), as API Gateway's WebSocket APIs send theirs to a backend.
pub(crate) async fn hooked(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: Result<WsHandshake, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let route = state
        .hooks
        .named(&name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no hook named {name:?} is configured")))?;
    let upgrade = upgrade.map_err(upgrade_required)?;
    let settings = state.settings.clone();
    let (socket, receiver) = state.client_socket(Transport::WebSocket);
    let mut tracked =
        state
            .telemetry
            .connection_opened(ConnKind::Ws, false, &format!("hooks/{name}"));
    let connection_id = tracked.register(
        &state.connections,
        principal.subject.clone(),
        Target::Hook(Arc::from(name.as_str())),
        Transport::WebSocket,
        receiver.outlet(),
    );
    tracked.ending("refused");
    let admitted = state
        .hooks
        .admit(
            &route,
            &mut tracked,
            Connecting {
                subject: &principal.subject,
                channel: None,
                transport: "websocket",
                query: uri.query(),
                headers: &headers,
                ip,
            },
        )
        .await?;
    let subject = admitted
        .subject
        .map_or_else(|| principal.subject.clone(), |s| Arc::from(s.as_str()));
    state.identify(
        &socket,
        &subject,
        admitted.info.or(principal.info().cloned()),
    );
    // The channels the hook picked: their events come on this WebSocket too.
    tracked.ending("subscribe_failed");
    let occupants =
        channels::follow_picked(&state, &route, &receiver, "", &admitted.channels).await?;
    tracked.occupying(occupants);
    tracked.ending("client_left");
    let mode = Mode::Hooked(Box::new(Hooked {
        hooks: state.hooks.clone(),
        route,
        connection_id: connection_id.clone(),
        subject,
        attachment: admitted.attachment,
        sent: 0,
        _socket: socket,
    }));
    let expires_at = principal.time_left().map(|left| Instant::now() + left);
    let conn = WsSession::new(&state, tracked, expires_at, mode, receiver);
    let max_message = settings.limits.max_message_size.0 as usize + 64 * 1024;
    let tasks = state.tasks.clone();
    let telemetry = state.telemetry.clone();
    let response = upgrade.accept(max_message, telemetry, true, move |ws, direct| {
        tasks.track_future(conn.run(ws, direct))
    });
    Ok(with_connection_id(response, &connection_id))
}

/// A request to a WebSocket route that is not a WebSocket handshake.
fn upgrade_required(e: WebSocketUpgradeRejection) -> ApiError {
    ApiError::new(
        e.status(),
        "websocket_upgrade_required",
        format!("{}: connect with a WebSocket client", e.body_text()),
    )
}

/// The header that tells a client (or a proxy's log) its connection id before any frame
/// does; a browser's WebSocket and EventSource cannot read it, hence the first frame too.
pub(crate) const CONNECTION_ID_HEADER: &str = "dormouse-connection-id";

/// `response` with the [`CONNECTION_ID_HEADER`].
pub(crate) fn with_connection_id(mut response: Response, id: &str) -> Response {
    if let Ok(value) = axum::http::HeaderValue::from_str(id) {
        response.headers_mut().insert(CONNECTION_ID_HEADER, value);
    }
    response
}

/// One WebSocket connection's task state.
pub(crate) struct WsSession {
    /// Counted while the connection lives; logs its end with the reason.
    pub(crate) tracked: Connection,
    /// When the client's credential expires: the connection closes then (code 4001) unless
    /// the client sent a fresh one (`{"type":"auth","token":...}`, channel sockets only).
    pub(crate) expires_at: Option<Instant>,
    pub(crate) mode: Mode,
    pub(crate) receiver: SocketReceiver,
    pub(crate) stopping: StopWaiter,
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
}

/// Where the client's own messages go.
pub(crate) enum Mode {
    /// A channel subscriber, who may publish to the channel.
    Channel {
        channel: String,
        /// Checks and carries the client's publishes, as for every other way of publishing.
        publisher: Publisher,
        client_publish: bool,
        /// Verifies refreshed credentials.
        auth: Auth,
        /// Who is connected; decides whether the client may publish.
        principal: Principal,
        /// Where the client connects from, for the publish rate per address.
        ip: Option<IpAddr>,
        /// Set when the channel's hook screens publishes.
        screened: Option<Arc<Screened>>,
        /// The channels the connection follows besides `channel`: first the ones its hook's
        /// `connect` answer picked, then those the client added with `subscribe` messages.
        more: Vec<String>,
        /// How many of `more` the hook picked: followed until the connection closes, and
        /// not the client's credential's to grant.
        picked: usize,
        /// Channels of `subscribe` messages not answered yet, one entry per message: a
        /// refused one is forgotten from `more` only when no later `subscribe` to the same
        /// channel is on its way (the client may unsubscribe and subscribe again before
        /// the first answer).
        subscribing: Vec<String>,
        /// Where the connection's own channel starts (see `Frame::Subscribed`), told in its
        /// `connected` frame.
        starts_after: Option<String>,
        /// What a `subscribe` message needs: the hooks (a hooked channel is not added to a
        /// connection) and the limits.
        hooks: Arc<Hooks>,
        settings: Arc<Settings>,
    },
    /// A hook's own WebSocket (`/v1/hooks/{name}/ws`): each message goes to the hook's
    /// `message` call, and what it answers goes back, in the order the client sent them.
    Hooked(Box<Hooked>),
    /// A socket accepted by a user object: messages are forwarded, in order, to the object.
    Object {
        forward: mpsc::UnboundedSender<Inbound>,
        /// Notified when the object is no longer reachable through this socket (cluster
        /// mode: its node died or restarted, or another node took it over): the client is
        /// closed with 1012 to reconnect.
        lost: Arc<tokio::sync::Notify>,
    },
}

/// What a hook's WebSocket keeps.
pub(crate) struct Hooked {
    hooks: Arc<Hooks>,
    route: Arc<Route>,
    connection_id: String,
    subject: Arc<str>,
    /// What the `connect` answer asked to keep, sent with every message.
    attachment: Option<Value>,
    /// Messages sent to the hook so far: the next one's number.
    sent: u64,
    /// Keeps the connection's queue open: nothing else sends to it but backends, through
    /// the connection table.
    _socket: dormouse_runtime::Socket,
}

/// A text message a channel subscriber may send (see the module doc for the framing).
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `{"type":"publish","channel"?,"event"?,"data"|"data_base64","idempotency_key"?,"ref"?}`
    Publish {
        /// One of the channels the connection follows; the one it was opened for when
        /// absent.
        channel: Option<String>,
        /// The event name, not yet validated.
        event: Option<String>,
        /// The payload, decoded from base64 when given as `data_base64`.
        data: Bytes,
        /// Not yet validated.
        idempotency_key: Option<String>,
        /// Echoed in the answer.
        r#ref: Option<Value>,
    },
    /// `{"type":"auth","token":"...","ref"?}`: a fresh credential for this connection.
    Auth {
        /// The token, not yet verified.
        token: String,
        /// Echoed in the answer.
        r#ref: Option<Value>,
    },
    /// `{"type":"subscribe","channel","last_event_id"?,"rewind"?,"ref"?}`: follow one more
    /// channel on this connection, from a cursor (or the newest `rewind` events, or live).
    Subscribe {
        /// Not yet validated.
        channel: String,
        /// Not yet parsed.
        last_event_id: Option<String>,
        /// Not yet bounded.
        rewind: Option<u64>,
        /// Echoed in the answer.
        r#ref: Option<Value>,
    },
    /// `{"type":"unsubscribe","channel","ref"?}`: stop following a channel added with
    /// `subscribe`.
    Unsubscribe {
        /// Not yet validated.
        channel: String,
        /// Echoed in the answer.
        r#ref: Option<Value>,
    },
}

/// Parses a client's text message, or says what is wrong with it (with the `ref` it
/// carried, when it could be read). Public so the fuzz target can drive it; it never
/// panics, whatever the input.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, (ApiError, Option<Value>)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        r#type: String,
        channel: Option<String>,
        last_event_id: Option<String>,
        rewind: Option<u64>,
        token: Option<String>,
        event: Option<String>,
        data: Option<String>,
        data_base64: Option<String>,
        idempotency_key: Option<String>,
        r#ref: Option<Value>,
    }
    let bad = |message: String| ApiError::bad_request("bad_message", message);
    let raw: Raw = serde_json::from_str(text).map_err(|e| {
        (
            bad(format!(
                "expected {{\"type\":\"publish\",\"data\":...}}: {e}"
            )),
            None,
        )
    })?;
    match raw.r#type.as_str() {
        "auth" => match raw.token {
            Some(token) => Ok(ClientMessage::Auth {
                token,
                r#ref: raw.r#ref,
            }),
            None => Err((
                bad("an auth message needs a \"token\"".to_string()),
                raw.r#ref,
            )),
        },
        "publish" => {
            let data = match (raw.data, raw.data_base64) {
                (Some(text), None) => Bytes::from(text),
                (None, Some(b64)) => match BASE64.decode(b64.as_bytes()) {
                    Ok(bytes) => Bytes::from(bytes),
                    Err(e) => {
                        return Err((bad(format!("data_base64 is not base64: {e}")), raw.r#ref));
                    }
                },
                _ => {
                    return Err((
                        bad("give exactly one of data and data_base64".to_string()),
                        raw.r#ref,
                    ));
                }
            };
            Ok(ClientMessage::Publish {
                channel: raw.channel,
                event: raw.event,
                data,
                idempotency_key: raw.idempotency_key,
                r#ref: raw.r#ref,
            })
        }
        "subscribe" | "unsubscribe" => {
            let Some(channel) = raw.channel else {
                return Err((
                    bad(format!("a {} message needs a \"channel\"", raw.r#type)),
                    raw.r#ref,
                ));
            };
            if raw.r#type == "subscribe" {
                Ok(ClientMessage::Subscribe {
                    channel,
                    last_event_id: raw.last_event_id,
                    rewind: raw.rewind,
                    r#ref: raw.r#ref,
                })
            } else {
                Ok(ClientMessage::Unsubscribe {
                    channel,
                    r#ref: raw.r#ref,
                })
            }
        }
        other => Err((
            bad(format!(
                "unknown message type {other:?}; clients may send \"publish\", \"subscribe\", \"unsubscribe\" or \"auth\""
            )),
            raw.r#ref,
        )),
    }
}

/// The refusal of a message about a channel the connection does not follow.
fn not_following(channel: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "not_subscribed",
        format!("this connection does not follow channel {channel:?}; subscribe to it first"),
    )
}

/// Why a connection ended, for the log line.
#[derive(Debug)]
enum End {
    ClientLeft,
    Closed(u16),
    WriteFailed,
}

impl WsSession {
    /// A session with the server's WebSocket settings (pings, idle timeout) and its stop
    /// signal.
    pub(crate) fn new(
        state: &AppState,
        tracked: Connection,
        expires_at: Option<Instant>,
        mode: Mode,
        receiver: SocketReceiver,
    ) -> Self {
        let settings = &state.settings.websocket;
        Self {
            tracked,
            expires_at,
            mode,
            receiver,
            stopping: state.stopping.waiter(),
            ping_interval: settings.ping_interval,
            idle_timeout: settings.idle_timeout,
        }
    }

    /// Serves the connection to its end. Not an `async fn`: an idle connection's task is
    /// mostly this future, and an `async fn` keeps each by-value argument twice (as it was
    /// passed and as the local it is moved to: ~600 more bytes for the stream and `self`),
    /// where an `async move` block uses what it captured in place.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` would keep its by-value arguments twice"
    )]
    pub(crate) fn run(
        mut self,
        mut ws: WsStream,
        direct: Arc<SubscriberWriter>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            // Listed under the channels its hook picked too.
            self.list_under_its_channels();
            // A channel's client learns its connection id first, before anything the
            // channel queued (nothing is written for it until the writer is registered
            // below). An object's client speaks the object's protocol: it gets the header.
            if let (Mode::Channel { starts_after, .. }, Some(registration)) =
                (&self.mode, self.tracked.registration())
            {
                // "type" first, as in every other frame (a `json!` object sorts its keys),
                // so a client may tell frames apart by their first bytes.
                let start = starts_after.as_ref().map_or_else(String::new, |id| {
                    format!(r#","starts_after":{}"#, Value::String(id.clone()))
                });
                let hello = format!(
                    r#"{{"type":"connected","connection_id":{}{start}}}"#,
                    Value::String(registration.id().to_string())
                );
                let sent = match direct.write_first(Outbound::Text(Bytes::from(hello.clone()))) {
                    Some(sent) => sent,
                    None => ws.send(Message::text(hello)).await.is_ok(),
                };
                if !sent {
                    direct.release_socket();
                    self.end(End::WriteFailed);
                    return;
                }
            }
            let direct_writes = direct.writes_directly();
            if direct_writes {
                self.receiver.write_on_release(direct.clone());
            }
            let end = self.serve(&mut ws, &direct, direct_writes).await;
            // Lets go of the shared socket, so it closes with the connection.
            direct.release_socket();
            self.end(end);
        }
    }

    fn end(&mut self, end: End) {
        self.tracked.ending(match end {
            End::ClientLeft => "client_left",
            End::WriteFailed => "write_failed",
            End::Closed(close::RESTART) => "shutdown",
            End::Closed(close::SLOW_CONSUMER) => "slow_consumer",
            End::Closed(close::HEARTBEAT_TIMEOUT) => "heartbeat_timeout",
            End::Closed(close::TOKEN_EXPIRED) => "token_expired",
            End::Closed(_) => "closed",
        });
    }

    async fn serve(
        &mut self,
        ws: &mut WsStream,
        direct: &SubscriberWriter,
        direct_writes: bool,
    ) -> End {
        // Answers to the client's own messages, in the order it sent them; created on its
        // first message (and boxed), since most subscribers never publish and an idle
        // connection should cost little.
        let mut answers: Option<Box<FuturesOrdered<Answer>>> = None;
        let mut ping =
            tokio::time::interval_at(Instant::now() + self.ping_interval, self.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        // The expiry timer is made once (re-armed when the client sends a fresh credential),
        // not per turn of the loop, and boxed only when there is an expiry; the stop signal
        // is registered once (`stopping::StopWaiter`).
        let mut armed_for = self.expires_at;
        let mut expiry = deadline(armed_for);
        let lost = match &self.mode {
            Mode::Object { lost, .. } => Some(lost.clone()),
            Mode::Channel { .. } | Mode::Hooked(_) => None,
        };
        // Each message on a hook's WebSocket is an HTTP call to the backend, held until it
        // answers: far fewer may wait than a channel's publishes, which merge.
        let max_unanswered = match &self.mode {
            Mode::Hooked(_) => MAX_HOOK_CALLS,
            _ => MAX_UNANSWERED,
        };
        loop {
            if self.expires_at != armed_for {
                armed_for = self.expires_at;
                expiry = deadline(armed_for);
            }
            enum Wake {
                Shutdown,
                Lost,
                Expired,
                /// False when the object let go of the socket.
                Outbound(bool),
                Answer(Answered),
                Incoming(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
                Ping,
            }
            let wake = tokio::select! {
                biased;
                () = self.stopping.stopped() => Wake::Shutdown,
                () = async {
                    match &lost {
                        Some(lost) => lost.notified().await,
                        None => std::future::pending().await,
                    }
                } => Wake::Lost,
                () = expired(&mut expiry) => Wake::Expired,
                more = std::future::poll_fn(|cx| match self.receiver.poll_ready(cx) {
                    // Registered first, then checked: a direct write that leaves bytes
                    // behind sets them before it wakes this task.
                    Poll::Pending if direct_writes && direct.has_pending() => Poll::Ready(true),
                    poll => poll,
                }) => Wake::Outbound(more),
                Some(answered) = async {
                    match answers.as_mut() {
                        Some(waiting) if !waiting.is_empty() => waiting.next().await,
                        _ => std::future::pending().await,
                    }
                } => Wake::Answer(answered),
                // A client that sends faster than its answers come back waits (TCP pushes
                // back) once MAX_UNANSWERED are pending: what one connection queues is bounded.
                incoming = ws.next(), if answers.as_ref().is_none_or(|a| a.len() < max_unanswered) => {
                    Wake::Incoming(incoming)
                }
                _ = ping.tick() => Wake::Ping,
            };
            match wake {
                Wake::Shutdown => {
                    return close_with(ws, close::RESTART, "service restart").await;
                }
                Wake::Lost => {
                    return close_with(
                        ws,
                        close::RESTART,
                        "the object is no longer reachable here; reconnect",
                    )
                    .await;
                }
                Wake::Expired => {
                    return close_with(ws, close::TOKEN_EXPIRED, "token expired").await;
                }
                Wake::Outbound(false) => {
                    // Not 1000, which clients take as a backend's final word (an object that
                    // does not accept a socket says so with a close of its own): a channel,
                    // hook or object that let go, or a cluster relay that ended, asks for a
                    // reconnect, which finds out what became of it.
                    return close_with(ws, 1011, "the server let go of the connection; reconnect")
                        .await;
                }
                Wake::Outbound(true) => {
                    // Boxed, as they are the loop's largest steps and a future is as large
                    // as its largest step for the connection's whole life, mostly idle. A
                    // directly written connection comes here only when bytes were left
                    // over (or a close was queued).
                    if let Some(end) =
                        Box::pin(self.write_outbound(ws, direct, direct_writes)).await
                    {
                        return end;
                    }
                }
                Wake::Answer(answered) => {
                    // The answers already there go out in the same write: a client that
                    // pipelines its publishes gets a merged call's acks together, not one
                    // write each.
                    let mut next = Some(answered);
                    let mut fed = 0;
                    while let Some(Answered {
                        frame,
                        rejected,
                        subscribe_of,
                    }) = next
                    {
                        if let Some(code) = rejected {
                            self.tracked.telemetry().rejected(code);
                        }
                        if let (
                            Some((channel, followed)),
                            Mode::Channel {
                                more, subscribing, ..
                            },
                        ) = (subscribe_of, &mut self.mode)
                        {
                            if let Some(at) = subscribing.iter().position(|c| *c == channel) {
                                subscribing.remove(at);
                            }
                            if !followed && !subscribing.contains(&channel) {
                                more.retain(|c| *c != channel);
                                self.list_under_its_channels();
                            }
                        }
                        if let Some(frame) = frame
                            && ws.feed(frame).await.is_err()
                        {
                            return End::WriteFailed;
                        }
                        fed += 1;
                        next = answers
                            .as_mut()
                            .filter(|waiting| fed < ACKS_PER_WRITE && !waiting.is_empty())
                            .and_then(|waiting| waiting.next().now_or_never().flatten());
                    }
                    if ws.flush().await.is_err() {
                        return End::WriteFailed;
                    }
                }
                Wake::Incoming(incoming) => {
                    last_heard = Instant::now();
                    match incoming {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                            return End::ClientLeft;
                        }
                        Some(Ok(Message::Text(text))) => match &self.mode {
                            Mode::Channel { .. } => {
                                let answer = self.on_text(text.as_str());
                                answers.get_or_insert_default().push_back(answer);
                            }
                            Mode::Object { forward, .. } => {
                                let _ = forward.send(Inbound::Text(text.as_str().to_string()));
                            }
                            Mode::Hooked(_) => {
                                let answer = self.on_hook_message(Bytes::from(text));
                                answers.get_or_insert_default().push_back(answer);
                            }
                        },
                        Some(Ok(Message::Binary(data))) => match &self.mode {
                            Mode::Channel { .. } => {
                                let message = NewMessage {
                                    event: None,
                                    data,
                                    idempotency_key: None,
                                };
                                let answer = self.on_publish(None, message, None);
                                answers.get_or_insert_default().push_back(answer);
                            }
                            Mode::Object { forward, .. } => {
                                let _ = forward.send(Inbound::Binary(data));
                            }
                            Mode::Hooked(_) => {
                                let answer = self.on_hook_message(data);
                                answers.get_or_insert_default().push_back(answer);
                            }
                        },
                        // tungstenite answers pings itself; a pong only proves liveness; raw
                        // frames are never yielded by a read.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    }
                }
                Wake::Ping => {
                    if last_heard.elapsed() > self.idle_timeout {
                        return close_with(ws, close::HEARTBEAT_TIMEOUT, "heartbeat timeout").await;
                    }
                    if ws.send(Message::Ping(Bytes::new())).await.is_err() {
                        return End::WriteFailed;
                    }
                }
            }
        }
    }

    /// Tells the connection table which channels this connection follows besides the one
    /// it was opened for, so listing a channel's connections finds it under each.
    fn list_under_its_channels(&self) {
        if let (Some(registration), Mode::Channel { more, .. }) =
            (self.tracked.registration(), &self.mode)
        {
            registration.set_also(more);
        }
    }

    /// Writes what the socket has queued (up to a bound) in one vectored write: each
    /// message's frame header, then its payload, the bytes the channel encoded once and
    /// shares with every subscriber. With `direct_writes`, as the releasing thread does:
    /// taken and written without blocking under the writer's lock, and what the socket does
    /// not take now is flushed here, with the listener's write timeout. Counts what was
    /// written as delivered.
    async fn write_outbound(
        &mut self,
        ws: &mut WsStream,
        writer: &SubscriberWriter,
        direct_writes: bool,
    ) -> Option<End> {
        let drained = if direct_writes {
            writer.write_queued(&mut self.receiver)
        } else {
            // A control frame tungstenite still holds (an automatic pong) goes out first
            // and whole: a frame written here must never land inside one of its frames.
            if ws.flush().await.is_err() {
                return Some(End::WriteFailed);
            }
            writer
                .write_queued_through(&mut self.receiver, ws.get_mut())
                .await
        };
        self.tracked
            .telemetry()
            .delivered(ConnKind::Ws, drained.messages, drained.stamps);
        // Also sends the bytes a direct write left pending, then any control frame
        // tungstenite holds.
        if drained.failed || ws.flush().await.is_err() {
            return Some(End::WriteFailed);
        }
        self.close_after(ws, drained.close).await
    }

    /// Sends a close the object queued, if any.
    async fn close_after(
        &mut self,
        ws: &mut WsStream,
        close: Option<(u16, String)>,
    ) -> Option<End> {
        let (code, reason) = close?;
        let code = if code == close::SLOW_CONSUMER {
            self.tracked.telemetry().slow_disconnect(ConnKind::Ws);
            close::SLOW_CONSUMER
        } else {
            code
        };
        Some(close_with(ws, code, &reason).await)
    }

    /// Answers a client's text message: a publish waits for its channel, anything else is
    /// answered at once.
    fn on_text(&mut self, text: &str) -> Answer {
        match parse_client_message(text) {
            Ok(ClientMessage::Auth { token, r#ref }) => self.on_auth(&token, r#ref),
            Ok(ClientMessage::Publish {
                channel,
                event,
                data,
                idempotency_key,
                r#ref,
            }) => self.on_publish(
                channel.as_deref(),
                NewMessage {
                    event,
                    data,
                    idempotency_key,
                },
                r#ref,
            ),
            Ok(ClientMessage::Subscribe {
                channel,
                last_event_id,
                rewind,
                r#ref,
            }) => self.on_subscribe(channel, last_event_id, rewind, r#ref),
            Ok(ClientMessage::Unsubscribe { channel, r#ref }) => {
                self.on_unsubscribe(channel, r#ref)
            }
            Err((e, r#ref)) => Answer::failed(&e, r#ref),
        }
    }

    /// Replaces the connection's credential with a fresh one that still grants this
    /// channel, pushing back its expiry; a refused one leaves the old one in force.
    fn on_auth(&mut self, token: &str, r#ref: Option<Value>) -> Answer {
        let Mode::Channel {
            channel,
            auth,
            principal,
            more,
            picked,
            ..
        } = &mut self.mode
        else {
            // Only channel sockets read client messages.
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        // The fresh credential must grant every channel the connection follows by its own
        // right (not those its hook picked).
        let fresh = auth.verify(token).and_then(|p| {
            std::iter::once(&*channel)
                .chain(more[*picked..].iter())
                .try_for_each(|c| p.require(Need::Subscribe(c)))
                .map(|()| p)
        });
        match fresh {
            Ok(fresh) => {
                self.expires_at = fresh.time_left().map(|left| Instant::now() + left);
                let expires_at = fresh
                    .expires
                    .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                if let Some(registration) = self.tracked.registration() {
                    registration.set_subject(&fresh.subject);
                }
                *principal = fresh;
                Answer::ready(Frame::AuthOk {
                    expires_at,
                    r#ref: &r#ref,
                })
            }
            Err(e) => Answer::failed(&e, r#ref),
        }
    }

    /// Sends a client's message on a hook's WebSocket to the hook's `message` call; its
    /// answer (`{"reply"}` as text, `{"reply_base64"}` as bytes, or nothing) goes back to
    /// the client in order. A hook that fails, or answers what cannot be read, gets the
    /// client an `error` frame with `hook_failed`, and the failure is logged.
    fn on_hook_message(&mut self, data: Bytes) -> Answer {
        let Mode::Hooked(hooked) = &mut self.mode else {
            return Answer::failed(&channels::unexpected(), None);
        };
        let seq = hooked.sent;
        hooked.sent += 1;
        let mut body = serde_json::json!({
            "event": "message",
            "hook": hooked.route.name(),
            "connection_id": hooked.connection_id,
            "subject": &*hooked.subject,
            "attachment": hooked.attachment,
            "seq": seq,
            "time_ms": crate::hooks::now_ms(),
        });
        match std::str::from_utf8(&data) {
            Ok(text) => body["data"] = Value::from(text),
            Err(_) => body["data_base64"] = Value::from(BASE64.encode(&data)),
        }
        if !hooked.route.takes("message") {
            // Nobody to hear it: said once per message, so a client knows.
            let e = ApiError::bad_request(
                "no_message_hook",
                format!("hook {} does not take messages", hooked.route.name()),
            );
            return Answer::failed(&e, None);
        }
        let (hooks, route) = (hooked.hooks.clone(), hooked.route.clone());
        let key = format!("{}/message/{seq}", hooked.connection_id);
        Answer::Hook(Box::pin(async move {
            match hooks.call(&route, "message", &key, &body).await {
                Ok(answer) => match crate::hooks::reply(&route, answer) {
                    Ok(frame) => Answered {
                        frame,
                        rejected: None,
                        subscribe_of: None,
                    },
                    Err(failure) => Answered::failed(&failure.to_api_error(), &None),
                },
                Err(failure) => Answered::failed(&failure.to_api_error(), &None),
            }
        }))
    }

    /// Hands a client's message to the publisher, which checks it as it checks every
    /// publish; the answer waits for the channel in the connection's queue of answers, so
    /// a pipelining client costs no task per publish.
    /// Follows one more channel on this connection: checked like a subscription of its own
    /// (name, credential, the connection's channel limit), then subscribed with this
    /// connection's queue, from the cursor given. Its events then arrive among the others',
    /// each naming its channel.
    fn on_subscribe(
        &mut self,
        to: String,
        last_event_id: Option<String>,
        rewind: Option<u64>,
        r#ref: Option<Value>,
    ) -> Answer {
        let Mode::Channel {
            channel,
            more,
            subscribing,
            publisher,
            principal,
            hooks,
            settings,
            ..
        } = &mut self.mode
        else {
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        let limits = &settings.limits;
        if more.contains(&to)
            && let Some(cursor) = last_event_id.as_deref()
        {
            // Followed already (picked by the hook at connect, or subscribed): resumed from
            // the cursor, as a client that reconnected catches up.
            let start = match cursor::start(&HeaderMap::new(), Some(cursor), None, 1) {
                Ok(start) => start,
                Err(e) => return Answer::failed(&e, r#ref),
            };
            return self.resume(to, start, r#ref);
        }
        let checked = channels::check_channel(&to)
            .and_then(|()| principal.require(Need::Subscribe(&to)))
            .and_then(|()| {
                if to == *channel || more.contains(&to) {
                    return Err(ApiError::new(
                        axum::http::StatusCode::CONFLICT,
                        "already_subscribed",
                        format!("this connection already follows channel {to:?}"),
                    ));
                }
                if more.len() + 1 >= limits.channels_per_connection() {
                    return Err(ApiError::new(
                        axum::http::StatusCode::CONFLICT,
                        "too_many_channels",
                        format!(
                            "this connection follows {} channels, the most one may \
                             (limits.max_channels_per_connection); unsubscribe from one first",
                            more.len() + 1
                        ),
                    ));
                }
                hooks.may_add(&to)?;
                let rewind = rewind.map(|n| n.to_string());
                cursor::start(
                    &HeaderMap::new(),
                    last_event_id.as_deref(),
                    rewind.as_deref(),
                    limits.max_history_page,
                )
            });
        let start = match checked {
            Ok(start) => start,
            Err(e) => return Answer::failed(&e, r#ref),
        };
        let Some(socket) = self.receiver.socket() else {
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        more.push(to.clone());
        subscribing.push(to.clone());
        let publisher = publisher.clone();
        self.list_under_its_channels();
        Answer::Hook(Box::pin(async move {
            match channels::subscribe(&publisher, &to, socket, start).await {
                Ok(starts_after) => Answered {
                    subscribe_of: Some((to.clone(), true)),
                    ..Answered::ready(Frame::Subscribed {
                        channel: &to,
                        starts_after: starts_after.map(|id| id.to_string()),
                        r#ref: &r#ref,
                    })
                },
                Err(e) => Answered {
                    subscribe_of: Some((to, false)),
                    ..Answered::failed(&e, &r#ref)
                },
            }
        }))
    }

    /// Moves a channel the connection follows to `start`: the channel replaces its socket's
    /// handle and sends the backlog from the cursor, which covers what was already sent
    /// from there (an event may come twice, never not at all).
    fn resume(
        &mut self,
        to: String,
        start: dormouse_actors::channel::Start,
        r#ref: Option<Value>,
    ) -> Answer {
        let Mode::Channel {
            publisher,
            subscribing,
            ..
        } = &mut self.mode
        else {
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        let Some(socket) = self.receiver.socket() else {
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        let publisher = publisher.clone();
        // Counted like any subscribe on its way; whatever its answer, the channel stays
        // followed (a refused move leaves the socket where it was).
        subscribing.push(to.clone());
        Answer::Hook(Box::pin(async move {
            // The channel takes a socket it already holds as a move to the new start.
            let answered = match channels::subscribe(&publisher, &to, socket, start).await {
                Ok(starts_after) => Answered::ready(Frame::Subscribed {
                    channel: &to,
                    starts_after: starts_after.map(|id| id.to_string()),
                    r#ref: &r#ref,
                }),
                Err(e) => Answered::failed(&e, &r#ref),
            };
            Answered {
                subscribe_of: Some((to, true)),
                ..answered
            }
        }))
    }

    /// Stops following a channel added with `subscribe` (the one the connection was opened
    /// for stays until it closes). Events of it already queued may still arrive.
    fn on_unsubscribe(&mut self, from: String, r#ref: Option<Value>) -> Answer {
        let Mode::Channel {
            channel,
            more,
            picked,
            publisher,
            ..
        } = &mut self.mode
        else {
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        if from == *channel {
            let e = ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "opened_for_channel",
                format!(
                    "this connection was opened for channel {from:?}, which it follows until \
                     it closes"
                ),
            );
            return Answer::failed(&e, r#ref);
        }
        let Some(at) = more.iter().position(|c| *c == from) else {
            return Answer::failed(&not_following(&from), r#ref);
        };
        if at < *picked {
            // Its hook picked it at connect (and may count it in its occupancy).
            let e = ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "picked_channel",
                format!(
                    "channel {from:?} was picked by the connection's hook and is followed \
                     until the connection closes"
                ),
            );
            return Answer::failed(&e, r#ref);
        }
        // In order: the picked ones stay first.
        more.remove(at);
        let (publisher, socket) = (publisher.clone(), self.receiver.id());
        self.list_under_its_channels();
        // Its close has nothing more to tell this channel.
        if let Some(handle) = self.receiver.socket() {
            handle.forget_when_closed(&from);
        }
        Answer::Hook(Box::pin(async move {
            let request = dormouse_actors::channel::ChannelRequest::Unsubscribe { socket };
            match publisher.call(&from, request).await {
                Ok(_) => Answered::ready(Frame::Unsubscribed {
                    channel: &from,
                    r#ref: &r#ref,
                }),
                Err(e) => Answered::failed(&ApiError::from(e), &r#ref),
            }
        }))
    }

    /// A client's publish to `to`, one of the channels the connection follows (its own
    /// when `None`). Screened by the channel's hook when it takes `publish`, whichever
    /// channel of the connection it is.
    fn on_publish(&self, to: Option<&str>, message: NewMessage, r#ref: Option<Value>) -> Answer {
        let Mode::Channel {
            channel,
            more,
            publisher,
            client_publish,
            principal,
            ip,
            screened,
            hooks,
            ..
        } = &self.mode
        else {
            // Only channel sockets read client messages.
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        let channel = match to {
            None => channel,
            Some(to) if to == channel => channel,
            Some(to) => match more.iter().find(|c| *c == to) {
                Some(followed) => followed,
                None => return Answer::failed(&not_following(to), r#ref),
            },
        };
        if !client_publish {
            let e = ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                "publishing over this socket is disabled",
            );
            return Answer::failed(&e, r#ref);
        }
        let client = Client { principal, ip: *ip };
        if hooks.screening(channel).is_none() {
            return match publisher.publish_one(client, channel, message) {
                Ok(reply) => Answer::Publish { reply, r#ref },
                Err(e) => Answer::failed(&e, r#ref),
            };
        }
        // Only the connection's own hook's channels are followed with a hook, and a
        // connection whose hook screens publishes has its tickets.
        let Some(screened) = screened else {
            return Answer::failed(&channels::unexpected(), r#ref);
        };
        // The same checks as `publish_one`, then the hook, then the channel, in turn.
        let checked = publisher
            .authorize(client, channel)
            .and_then(|()| publisher.charge(client, 1))
            .and_then(|()| publisher.check(&message));
        if let Err(e) = checked {
            return Answer::failed(&e, r#ref);
        }
        let ticket = screened.ticket();
        let (screened, publisher) = (screened.clone(), publisher.clone());
        let (channel, subject) = (channel.clone(), principal.subject.clone());
        Answer::Hook(Box::pin(async move {
            let decided = screened
                .hooks
                .screen(
                    &channel,
                    &subject,
                    Some(&screened.connection_id),
                    message,
                    publisher.max_message_size(),
                )
                .await;
            screened.turn(ticket).await;
            let turn = Turn(&screened);
            let reply = match decided {
                Ok(message) => publisher.publish(&channel, vec![message]),
                Err(e) => return Answered::failed(&e, &r#ref),
            };
            drop(turn);
            Answered::acked(reply.await, &r#ref)
        }))
    }
}

/// A frame the server sends in answer to a client's message.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Frame<'a> {
    Ack {
        id: &'a str,
        duplicate: bool,
        r#ref: &'a Option<Value>,
    },
    AuthOk {
        expires_at: Option<u64>,
        r#ref: &'a Option<Value>,
    },
    Subscribed {
        channel: &'a str,
        /// Where the channel's stream starts for this connection: the cursor to resume it
        /// from until a message of it arrives.
        #[serde(skip_serializing_if = "Option::is_none")]
        starts_after: Option<String>,
        r#ref: &'a Option<Value>,
    },
    Unsubscribed {
        channel: &'a str,
        r#ref: &'a Option<Value>,
    },
    Error {
        code: &'a str,
        message: &'a str,
        r#ref: &'a Option<Value>,
    },
}

impl Frame<'_> {
    fn text(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The answer to one of the client's messages, kept in the order the client sent them.
enum Answer {
    /// Known at once (a refusal, an auth reply); taken when polled.
    Ready(Option<Answered>),
    /// Waits for the channel to store the message.
    Publish { reply: Reply, r#ref: Option<Value> },
    /// Waits for a hook's answer to the message.
    Hook(futures::future::BoxFuture<'static, Answered>),
}

/// An answer's frame, and the error code to count when it refuses the message.
struct Answered {
    /// `None` when there is nothing to send (a hook that did not reply).
    frame: Option<Message>,
    rejected: Option<&'static str>,
    /// The answer to a `subscribe` message: its channel, and whether the connection follows
    /// it now (a refused one is forgotten when the answer is sent, unless another
    /// `subscribe` to it is on its way).
    subscribe_of: Option<(String, bool)>,
}

impl Answer {
    fn ready(frame: Frame<'_>) -> Self {
        Self::Ready(Some(Answered::ready(frame)))
    }

    fn failed(e: &ApiError, r#ref: Option<Value>) -> Self {
        Self::Ready(Some(Answered::failed(e, &r#ref)))
    }
}

impl Answered {
    /// An answer that is this frame.
    fn ready(frame: Frame<'_>) -> Self {
        Self {
            frame: Some(Message::text(frame.text())),
            rejected: None,
            subscribe_of: None,
        }
    }

    fn failed(e: &ApiError, r#ref: &Option<Value>) -> Self {
        Self {
            frame: Some(Message::text(
                Frame::Error {
                    code: e.code,
                    message: &e.message,
                    r#ref,
                }
                .text(),
            )),
            rejected: Some(e.code),
            subscribe_of: None,
        }
    }
}

impl Future for Answer {
    type Output = Answered;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Answered> {
        match self.get_mut() {
            Answer::Ready(answered) => Poll::Ready(
                answered
                    .take()
                    .unwrap_or_else(|| Answered::failed(&channels::unexpected(), &None)),
            ),
            Answer::Hook(call) => call.as_mut().poll(cx),
            Answer::Publish { reply, r#ref } => Pin::new(reply)
                .poll(cx)
                .map(|outcome| Answered::acked(outcome, r#ref)),
        }
    }
}

impl Answered {
    /// The `ack` (or `error`) for a publish the channel answered.
    fn acked(
        outcome: dormouse_runtime::Result<Vec<dormouse_actors::channel::Published>>,
        r#ref: &Option<Value>,
    ) -> Self {
        match outcome {
            Ok(results) => match results.first() {
                Some(p) => Answered {
                    frame: Some(Message::text(
                        Frame::Ack {
                            id: &p.id,
                            duplicate: p.duplicate,
                            r#ref,
                        }
                        .text(),
                    )),
                    rejected: None,
                    subscribe_of: None,
                },
                None => Answered::failed(&channels::unexpected(), r#ref),
            },
            Err(e) => Answered::failed(&ApiError::from(e), r#ref),
        }
    }
}

/// A channel socket's publishes that its channel's hook screens (docs/HOOKS.md,
/// `publish`): each call may take its own time, but the messages enter the channel in the
/// order the client sent them. Each takes a ticket when its frame is read, and enters the
/// publisher only once every earlier one has (or was refused).
pub(crate) struct Screened {
    hooks: Arc<Hooks>,
    connection_id: String,
    issued: std::sync::atomic::AtomicU64,
    next: std::sync::atomic::AtomicU64,
    turn: tokio::sync::Notify,
}

impl Screened {
    pub(crate) fn new(hooks: Arc<Hooks>, connection_id: String) -> Arc<Self> {
        Arc::new(Self {
            hooks,
            connection_id,
            issued: Default::default(),
            next: Default::default(),
            turn: tokio::sync::Notify::new(),
        })
    }

    fn ticket(&self) -> u64 {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
    }

    /// Waits until every publish before `ticket` entered the publisher (or was refused).
    async fn turn(&self, ticket: u64) {
        loop {
            let notified = self.turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.next.load(std::sync::atomic::Ordering::Acquire) == ticket {
                return;
            }
            notified.await;
        }
    }
}

/// Lets the next screened publish go, also when the one holding the turn is dropped.
struct Turn<'a>(&'a Screened);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0
            .next
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.0.turn.notify_waiters();
    }
}

/// Most of a client's messages awaiting their answers before the connection stops reading
/// its frames. Well above what a pipelining client needs to keep a channel's commits full
/// (a merged call takes up to 512 messages), and a bound on what one connection can queue.
const MAX_UNANSWERED: usize = 4096;

/// Most messages of one hook WebSocket waiting for the hook's answers: a client that sends
/// faster waits (TCP pushes back), and one client cannot hold more calls to the backend.
const MAX_HOOK_CALLS: usize = 32;

/// Most answers to a client's publishes written together, so a long run of them cannot keep
/// the connection from its other work (pings, the stop signal, outbound messages).
const ACKS_PER_WRITE: usize = 256;

async fn close_with(ws: &mut WsStream, code: u16, reason: &str) -> End {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    };
    let _ = ws.send(Message::Close(Some(frame))).await;
    let _ = ws.close(None).await;
    End::Closed(code)
}
