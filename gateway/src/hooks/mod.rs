//! Upstream hooks (docs/HOOKS.md): the way a backend in any language decides who connects
//! and hears of every message and every disconnect, over plain HTTP.
//!
//! Each `[[hooks]]` entry is a [`Route`]: a URL, an HMAC key, the events it takes, and the
//! channel patterns whose subscribers go through it (besides its own hooks-mode WebSocket,
//! `GET /v1/hooks/{name}/ws`). Every call is a `POST` of a JSON body, signed over the
//! timestamp and the body, with an idempotency key that a retry repeats.
//!
//! - **Decisions** (`connect`, `message`) wait for the answer and fail closed: a hook that
//!   times out, answers non-2xx or answers what cannot be read refuses the connection
//!   (`502 hook_failed`) or the message (an `error` frame); the outcome is logged with what
//!   went wrong and counted.
//! - **Notifications** are at least once. `disconnect`: a connection's record is written
//!   durably before the client is told it is connected ([`outbox`]), removed only after the
//!   backend acknowledged its disconnect, and a start finds the records a stopped or
//!   crashed run left and sends them. `occupied` and `vacated`: stored by the channel's
//!   occupancy object in the commit that changed it, and sent by its alarm ([`occupancy`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use bytes::Bytes;
use ring::hmac;
use serde_json::Value;

use axum::http::HeaderMap;
use dormouse_storage::Storage;
use serde_json::json;

use crate::auth::glob;
use crate::config::HookSettings;
use crate::connections::Registration;
use crate::error::ApiError;
use crate::telemetry::Connection;
use dormouse_actors::channel::NewMessage;
use outbox::Record;

pub(crate) mod occupancy;
pub(crate) mod outbox;

/// One configured hook; see the module doc.
pub(crate) struct Route {
    pub(crate) settings: HookSettings,
    key: hmac::Key,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.settings.name)
            .field("url", &self.settings.url)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// The hook's name.
    pub(crate) fn name(&self) -> &str {
        &self.settings.name
    }

    /// Whether the hook takes `event`.
    pub(crate) fn takes(&self, event: &str) -> bool {
        self.settings.events.iter().any(|e| e == event)
    }

    /// The failure of an answer that is JSON but not what the event allows: `why` is
    /// Dormouse's own words, so the client may see them.
    pub(crate) fn bad_answer(&self, why: impl Into<String>) -> HookFailure {
        HookFailure::BadAnswer {
            hook: self.name().to_string(),
            why: why.into(),
            excerpt: None,
        }
    }

    /// `Dormouse-Signature` for a body sent at `timestamp`: `t=TIMESTAMP,v1=HEX`, the
    /// HMAC-SHA256 of `TIMESTAMP.BODY` under the hook's secret.
    pub(crate) fn signature(&self, timestamp: u64, body: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={timestamp},v1={hex}")
    }
}

/// Why a hook call did not give an answer the server can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HookFailure {
    #[error("hook {hook} did not answer within {timeout:?}")]
    Timeout { hook: String, timeout: Duration },
    #[error("hook {hook} could not be reached: {why}")]
    Unreachable { hook: String, why: String },
    #[error("hook {hook} answered {status}: {body}")]
    Status {
        hook: String,
        status: u16,
        body: String,
    },
    #[error("hook {hook} answered what is not the documented JSON: {why}{}", excerpt.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    BadAnswer {
        hook: String,
        /// What is wrong, in Dormouse's words: shown to the client too.
        why: String,
        /// The start of what the backend sent: for the log only.
        excerpt: Option<String>,
    },
}

impl HookFailure {
    /// The label of `dormouse_hook_calls_total`'s `outcome` for it.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Unreachable { .. } => "unreachable",
            Self::Status { .. } => "status",
            Self::BadAnswer { .. } => "bad_answer",
        }
    }

    /// What a client that was refused because of it is told: what kind of failure, never
    /// the backend's own words or address, which stay in the server's log.
    pub(crate) fn to_api_error(&self) -> ApiError {
        let what = match self {
            Self::Timeout { hook, timeout } => {
                format!("hook {hook} did not answer within {timeout:?}")
            }
            Self::Unreachable { hook, .. } => format!("hook {hook} could not be reached"),
            Self::Status { hook, status, .. } => format!("hook {hook} answered {status}"),
            Self::BadAnswer { hook, why, .. } => {
                format!("hook {hook} answered what is not the documented JSON: {why}")
            }
        };
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "hook_failed",
            format!("the call could not be completed: {what} (the server's log says more)"),
        )
    }
}

/// Counters per outcome, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct HookCounters {
    pub(crate) ok: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) timeout: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    pub(crate) status: AtomicU64,
    pub(crate) bad_answer: AtomicU64,
    /// Disconnects waiting to be acknowledged by their backend.
    pub(crate) pending_disconnects: AtomicU64,
}

/// Every configured hook, the HTTP client they share, and the node's disconnect records.
pub(crate) struct Hooks {
    routes: Vec<Arc<Route>>,
    http: reqwest::Client,
    pub(crate) counters: HookCounters,
    outbox: outbox::Outbox,
    /// This node's name, as the occupancy objects know it.
    node: String,
    /// This node's subscriber counts of the channels whose hook takes `occupied` or
    /// `vacated`.
    occupancy: occupancy::Tracker,
    /// Cancelled when the server stops: deliveries still failing then are left to the
    /// next start, which finds their records.
    stopped: tokio_util::sync::CancellationToken,
    /// Makes the idempotency keys of publishes without one unique to this process...
    nonce: u64,
    /// ...and within it.
    published: AtomicU64,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Hooks {
    /// The hooks of `settings`, checked (an error names the entry that is wrong), keeping
    /// their records in `storage` under this node's name.
    pub(crate) fn new(
        settings: &[HookSettings],
        storage: Arc<dyn Storage>,
        node: &str,
        max_in_memory: usize,
    ) -> anyhow::Result<Self> {
        let mut routes: Vec<Arc<Route>> = Vec::new();
        for hook in settings {
            hook.check()?;
            anyhow::ensure!(
                routes.iter().all(|r| r.name() != hook.name),
                "hooks: two entries are named {:?}",
                hook.name
            );
            routes.push(Arc::new(Route {
                key: hmac::Key::new(hmac::HMAC_SHA256, hook.secret.as_bytes()),
                settings: hook.clone(),
            }));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("dormouse/", env!("CARGO_PKG_VERSION")))
            // A hook's backend is found again on every call; a redirect is a misconfiguration.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            routes,
            http,
            counters: HookCounters::default(),
            outbox: outbox::Outbox::new(storage, node, max_in_memory),
            node: node.to_string(),
            occupancy: occupancy::Tracker::default(),
            stopped: tokio_util::sync::CancellationToken::new(),
            nonce: {
                use std::hash::{BuildHasher as _, Hasher as _};
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write_u128(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0),
                );
                hasher.finish()
            },
            published: AtomicU64::new(0),
        })
    }

    /// True when any hook is configured.
    pub(crate) fn any(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The hook named `name`.
    pub(crate) fn named(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name() == name)
    }

    /// The hook a subscriber of `channel` goes through: the first whose patterns match.
    pub(crate) fn for_channel(&self, channel: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| r.settings.channels.iter().any(|p| glob(p, channel)))
    }

    /// Refuses adding `channel` to a connection that follows several (`403
    /// hooked_channel`) when a hook takes it: a hook admits connections one channel at a
    /// time, so such a channel is subscribed to on a connection of its own.
    pub(crate) fn may_add(&self, channel: &str) -> Result<(), ApiError> {
        if self.for_channel(channel).is_none() {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "hooked_channel",
            format!(
                "channel {channel:?} goes through a hook, which admits connections one channel \
                 at a time: subscribe to it on a connection of its own"
            ),
        ))
    }

    /// [`Hooks::call`] for a decision: a failure is the client's `502 hook_failed`.
    async fn decide(
        &self,
        route: &Route,
        event: &str,
        idempotency_key: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        self.call(route, event, idempotency_key, body)
            .await
            .map_err(|failure| failure.to_api_error())
    }

    /// Sends `body` as `event` to `route` and reads its answer: the JSON object it
    /// answered, or `Value::Null` for an empty 2xx body.
    pub(crate) async fn call(
        &self,
        route: &Route,
        event: &str,
        idempotency_key: &str,
        body: &Value,
    ) -> Result<Value, HookFailure> {
        let answer = self.call_inner(route, event, idempotency_key, body).await;
        let counter = match &answer {
            Ok(_) => &self.counters.ok,
            Err(HookFailure::Timeout { .. }) => &self.counters.timeout,
            Err(HookFailure::Unreachable { .. }) => &self.counters.unreachable,
            Err(HookFailure::Status { .. }) => &self.counters.status,
            Err(HookFailure::BadAnswer { .. }) => &self.counters.bad_answer,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(failure) = &answer {
            tracing::warn!(
                hook = route.name(),
                event,
                idempotency_key,
                outcome = failure.outcome(),
                error = %failure,
                "hook call failed"
            );
        }
        answer
    }

    async fn call_inner(
        &self,
        route: &Route,
        event: &str,
        idempotency_key: &str,
        body: &Value,
    ) -> Result<Value, HookFailure> {
        let hook = route.name().to_string();
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let timestamp = now_secs();
        let timeout = route.settings.timeout;
        let sent = self
            .http
            .post(&route.settings.url)
            .header("content-type", "application/json")
            .header("dormouse-event", event)
            .header("dormouse-hook", &hook)
            .header("idempotency-key", idempotency_key)
            .header("dormouse-signature", route.signature(timestamp, &body))
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                HookFailure::Timeout {
                    hook: hook.clone(),
                    timeout,
                }
            } else {
                HookFailure::Unreachable {
                    hook: hook.clone(),
                    why: crate::logging::error_chain(&e).to_string(),
                }
            }
        };
        let response = sent.map_err(failed)?;
        let status = response.status();
        // An answer is small; a hook that sends more is cut off rather than buffered.
        let bytes = read_limited(response, MAX_ANSWER).await.map_err(failed)?;
        if !status.is_success() {
            return Err(HookFailure::Status {
                hook,
                status: status.as_u16(),
                body: excerpt(&bytes),
            });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(value @ Value::Object(_)) => Ok(value),
            Ok(_) => Err(HookFailure::BadAnswer {
                hook,
                why: "expected a JSON object".to_string(),
                excerpt: Some(excerpt(&bytes)),
            }),
            Err(e) => Err(HookFailure::BadAnswer {
                hook,
                why: e.to_string(),
                excerpt: Some(excerpt(&bytes)),
            }),
        }
    }
}

/// Largest attachment a `connect` answer may set: it is kept for the connection's life.
const MAX_ATTACHMENT: usize = 16 * 1024;

/// Largest answer read from a hook.
const MAX_ANSWER: usize = 1 << 20;

/// Reads at most `limit` bytes of `response`'s body (the rest is not read).
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The start of a body, for a log line or an error message.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    if bytes.len() > 200 {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

/// What a `connect` hook decided.
#[derive(Debug, Clone, Default)]
pub(crate) struct Admission {
    /// The subject the connection is known by from now on, if the hook set one.
    pub(crate) subject: Option<String>,
    /// What the hook asked to keep with the connection: sent back with its later calls.
    pub(crate) attachment: Option<Value>,
    /// Channels the hook subscribed the connection to, besides the one it asked for (a
    /// WebSocket's; see [`crate::channels::follow_picked`]).
    pub(crate) channels: Vec<String>,
    /// What presence shows of the client, as compact JSON (instead of its token's `info`).
    pub(crate) info: Option<bytes::Bytes>,
}

/// Reads a `connect` answer: `{"allow"?, "reason"?, "subject"?, "attachment"?,
/// "channels"?, "info"?}`. A refusal is `403 hook_refused` with the hook's reason; an
/// answer with a field of the wrong type or an unknown field is the hook's mistake,
/// `502 hook_failed`.
pub(crate) fn admission(route: &Route, answer: Value) -> Result<Admission, ApiError> {
    let bad = |why: String| route.bad_answer(why).to_api_error();
    let Value::Object(mut fields) = answer else {
        return Ok(Admission::default());
    };
    decided(route, &mut fields, "the connection")?;
    let subject = match fields.remove("subject") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s),
        Some(other) => {
            return Err(bad(format!(
                "\"subject\" must be a string of 1 to 256 bytes, not {other}"
            )));
        }
    };
    let channels = match fields.remove("channels") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let mut channels = Vec::with_capacity(items.len());
            for item in items {
                let Value::String(channel) = item else {
                    return Err(bad(format!(
                        "\"channels\" must be channel names, not {item}"
                    )));
                };
                crate::channels::check_channel(&channel)
                    .map_err(|e| bad(format!("\"channels\" holds a bad name: {}", e.message)))?;
                if !channels.contains(&channel) {
                    channels.push(channel);
                }
            }
            channels
        }
        Some(other) => {
            return Err(bad(format!(
                "\"channels\" must be an array of channel names, not {other}"
            )));
        }
    };
    let attachment = fields.remove("attachment");
    if attachment
        .as_ref()
        .is_some_and(|a| a.to_string().len() > MAX_ATTACHMENT)
    {
        return Err(bad(format!(
            "\"attachment\" is over {MAX_ATTACHMENT} bytes as JSON"
        )));
    }
    let info = match fields.remove("info") {
        None | Some(Value::Null) => None,
        Some(info) => {
            let json = info.to_string();
            if json.len() > dormouse_actors::channel::MAX_INFO {
                return Err(bad(format!(
                    "\"info\" is {} bytes as JSON, over {} (it travels with every presence \
                     event)",
                    json.len(),
                    dormouse_actors::channel::MAX_INFO
                )));
            }
            Some(bytes::Bytes::from(json))
        }
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(bad(format!(
            "unknown field {unknown:?}; a connect answer may carry allow, reason, subject, \
             attachment, channels and info"
        )));
    }
    Ok(Admission {
        subject,
        attachment,
        channels,
        info,
    })
}

/// A connection asking to be let in, as its `connect` call describes it.
#[derive(Debug)]
pub(crate) struct Connecting<'a> {
    pub(crate) subject: &'a str,
    /// The channel it subscribes to; `None` on a hook's own WebSocket.
    pub(crate) channel: Option<&'a str>,
    /// `websocket` or `sse`.
    pub(crate) transport: &'static str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) ip: Option<std::net::IpAddr>,
}

impl Hooks {
    /// Puts a new connection through `route`: its `connect` decision (when the hook takes
    /// it), then its disconnect record (when the hook takes `disconnect`), stored before
    /// this returns, so the client is never told it is connected without a disconnect
    /// being owed. `conn` must be registered in the connection table.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        route: &Arc<Route>,
        conn: &mut Connection,
        connecting: Connecting<'_>,
    ) -> Result<Admission, ApiError> {
        let connection_id = conn
            .registration()
            .map(Registration::id)
            .unwrap_or_default();
        let mut admitted = Admission::default();
        if route.takes("connect") {
            let headers: serde_json::Map<String, Value> = connecting
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_string(), Value::String(value))
                })
                .collect();
            let body = json!({
                "event": "connect",
                "hook": route.name(),
                "connection_id": connection_id,
                "subject": connecting.subject,
                "channel": connecting.channel,
                "transport": connecting.transport,
                "query": connecting.query,
                "headers": headers,
                "remote_addr": connecting.ip.map(|ip| ip.to_string()),
                "time_ms": now_ms(),
            });
            let key = format!("{connection_id}/connect");
            let answer = self.decide(route, "connect", &key, &body).await?;
            admitted = admission(route, answer).inspect_err(|e| self.count_refusal(e))?;
        }
        let subject = match (&admitted.subject, conn.registration()) {
            (Some(subject), Some(registration)) => {
                registration.pin_subject(&Arc::from(subject.as_str()));
                subject.clone()
            }
            _ => connecting.subject.to_string(),
        };
        if route.takes("disconnect") {
            let record = Record {
                hook: route.name().to_string(),
                connection_id,
                subject,
                channel: connecting.channel.map(str::to_string),
                attachment: admitted.attachment.clone(),
                connected_at_ms: now_ms(),
                closed: None,
            };
            // Owed from here on, whatever happens next: the guard sends it when it drops,
            // even if this handler is dropped during the write below, or the write fails
            // (the backend heard of the connect, so it hears of the end).
            conn.on_close(self.clone(), record.clone());
            self.opened(&record).await?;
        }
        Ok(admitted)
    }
}

/// Reads a `message` answer: `{"reply": "text"}`, `{"reply_base64": "..."}`, or nothing
/// (an empty body or `{}`); the frame to send the client, if any.
pub(crate) fn reply(
    route: &Route,
    answer: Value,
) -> Result<Option<tokio_tungstenite::tungstenite::Message>, HookFailure> {
    use tokio_tungstenite::tungstenite::Message;
    let bad = |why: String| route.bad_answer(why);
    let Value::Object(mut fields) = answer else {
        return Ok(None);
    };
    let frame = match (fields.remove("reply"), fields.remove("reply_base64")) {
        (None, None) => None,
        (Some(Value::String(text)), None) => Some(Message::text(text)),
        (None, Some(Value::String(b64))) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| bad(format!("\"reply_base64\" is not base64: {e}")))?;
            Some(Message::binary(bytes))
        }
        (Some(_), Some(_)) => return Err(bad("give reply or reply_base64, not both".into())),
        (Some(other), None) | (None, Some(other)) => {
            return Err(bad(format!("a reply must be a string, not {other}")));
        }
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(bad(format!(
            "unknown field {unknown:?}; a message answer may carry reply or reply_base64"
        )));
    }
    Ok(frame)
}

impl Hooks {
    /// Counts a decision that refused (not one that failed).
    fn count_refusal(&self, e: &ApiError) {
        if e.code == "hook_refused" {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `/metrics` lines: calls by outcome, connections refused, disconnects owed.
    pub(crate) fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        if !self.any() {
            return String::new();
        }
        let c = &self.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let mut out = String::from(
            "# HELP dormouse_hook_calls_total Calls to upstream hooks, by outcome: ok, or why \
             no usable answer came (timeout, unreachable, status, bad_answer)\n\
             # TYPE dormouse_hook_calls_total counter\n",
        );
        for (outcome, n) in [
            ("ok", &c.ok),
            ("timeout", &c.timeout),
            ("unreachable", &c.unreachable),
            ("status", &c.status),
            ("bad_answer", &c.bad_answer),
        ] {
            let _ = writeln!(
                out,
                "dormouse_hook_calls_total{{outcome=\"{outcome}\"}} {}",
                load(n)
            );
        }
        let _ = write!(
            out,
            "# HELP dormouse_hook_refused_total Connections a connect hook refused\n\
             # TYPE dormouse_hook_refused_total counter\n\
             dormouse_hook_refused_total {}\n\
             # HELP dormouse_hook_disconnects_pending Disconnects sent and not yet acknowledged \
             by their backend (each is retried until it is)\n\
             # TYPE dormouse_hook_disconnects_pending gauge\n\
             dormouse_hook_disconnects_pending {}\n",
            load(&c.refused),
            load(&c.pending_disconnects),
        );
        out
    }
}

impl Hooks {
    /// The channel's hook that screens publishes, if any.
    pub(crate) fn screening(&self, channel: &str) -> Option<&Arc<Route>> {
        self.for_channel(channel).filter(|r| r.takes("publish"))
    }

    /// Puts a client's publish to `channel` through its hook's `publish` call, when it
    /// takes one: the message to store (as sent, or as the hook rewrote it), or the refusal
    /// (`403 hook_refused`) or failure (`502 hook_failed`) to answer the client with.
    pub(crate) async fn screen(
        &self,
        channel: &str,
        subject: &str,
        connection_id: Option<&str>,
        message: NewMessage,
        max_message_size: usize,
    ) -> Result<NewMessage, ApiError> {
        let Some(route) = self.screening(channel) else {
            return Ok(message);
        };
        let mut body = json!({
            "event": "publish",
            "hook": route.name(),
            "channel": channel,
            "subject": subject,
            "connection_id": connection_id,
            "event_name": message.event,
            "idempotency_key": message.idempotency_key,
            "time_ms": now_ms(),
        });
        match std::str::from_utf8(&message.data) {
            Ok(text) => body["data"] = Value::from(text),
            Err(_) => {
                use base64::Engine as _;
                body["data_base64"] =
                    Value::from(base64::engine::general_purpose::STANDARD.encode(&message.data));
            }
        }
        // A retry of the same publish (same idempotency key) is the same call; any other
        // publish is a call of its own.
        let key = match &message.idempotency_key {
            Some(k) => format!("{channel}/publish/{k}"),
            None => format!(
                "{channel}/publish/{:x}-{:x}",
                self.nonce,
                self.published.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let answer = self.decide(route, "publish", &key, &body).await?;
        let rewritten = rewrite(route, answer, message).inspect_err(|e| self.count_refusal(e))?;
        crate::publisher::check_message(&rewritten, max_message_size).map_err(|e| {
            let why = format!(
                "the rewritten message is not one a client may publish: {}",
                e.message
            );
            route.bad_answer(why).to_api_error()
        })?;
        Ok(rewritten)
    }
}

/// Reads a `publish` answer: `{"allow"?, "reason"?, "data"? | "data_base64"?, "event"?}`.
fn rewrite(route: &Route, answer: Value, mut message: NewMessage) -> Result<NewMessage, ApiError> {
    let bad = |why: String| route.bad_answer(why).to_api_error();
    let Value::Object(mut fields) = answer else {
        return Ok(message);
    };
    decided(route, &mut fields, "the message")?;
    match (fields.remove("data"), fields.remove("data_base64")) {
        (None, None) => {}
        (Some(Value::String(text)), None) => message.data = Bytes::from(text),
        (None, Some(Value::String(b64))) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| bad(format!("\"data_base64\" is not base64: {e}")))?;
            message.data = Bytes::from(bytes);
        }
        (Some(_), Some(_)) => return Err(bad("give data or data_base64, not both".into())),
        (Some(other), None) | (None, Some(other)) => {
            return Err(bad(format!("data must be a string, not {other}")));
        }
    }
    match fields.remove("event") {
        None => {}
        Some(Value::String(event)) => message.event = Some(event),
        Some(other) => return Err(bad(format!("\"event\" must be a string, not {other}"))),
    }
    if let Some(unknown) = fields.keys().next() {
        return Err(bad(format!(
            "unknown field {unknown:?}; a publish answer may carry allow, reason, data, \
             data_base64 and event"
        )));
    }
    Ok(message)
}

/// Takes a decision's `allow` and `reason` out of its answer: `Err(403 hook_refused)` with
/// the hook's reason when it refuses `what`, `Err(502 hook_failed)` when either has the
/// wrong type. Every decision (connect, subscribe, publish) reads them alike.
fn decided(
    route: &Route,
    fields: &mut serde_json::Map<String, Value>,
    what: &str,
) -> Result<(), ApiError> {
    let bad = |why: String| route.bad_answer(why).to_api_error();
    let allow = match fields.remove("allow") {
        None | Some(Value::Bool(true)) => true,
        Some(Value::Bool(false)) => false,
        Some(other) => return Err(bad(format!("\"allow\" must be true or false, not {other}"))),
    };
    let reason = match fields.remove("reason") {
        None => None,
        Some(Value::String(reason)) => Some(reason),
        Some(other) => return Err(bad(format!("\"reason\" must be a string, not {other}"))),
    };
    if allow {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "hook_refused",
        reason.unwrap_or_else(|| format!("hook {} refused {what}", route.name())),
    ))
}

impl Hooks {
    /// Asks the channel's hook, when it takes `subscribe`, whether connection
    /// `connection_id` (of `subject`, with the attachment its `connect` set) may subscribe
    /// to `channel`: `403 hook_refused` or `502 hook_failed` when not.
    pub(crate) async fn may_subscribe(
        &self,
        route: &Route,
        connection_id: &str,
        subject: &str,
        channel: &str,
        attachment: Option<&Value>,
    ) -> Result<(), ApiError> {
        if !route.takes("subscribe") {
            return Ok(());
        }
        let body = json!({
            "event": "subscribe",
            "hook": route.name(),
            "connection_id": connection_id,
            "subject": subject,
            "channel": channel,
            "attachment": attachment,
            "time_ms": now_ms(),
        });
        let key = format!("{connection_id}/subscribe/{channel}");
        let answer = self.decide(route, "subscribe", &key, &body).await?;
        let Value::Object(mut fields) = answer else {
            return Ok(());
        };
        decided(
            route,
            &mut fields,
            &format!("the subscription to {channel}"),
        )
        .inspect_err(|e| self.count_refusal(e))?;
        if let Some(unknown) = fields.keys().next() {
            let why =
                format!("unknown field {unknown:?}; a subscribe answer may carry allow and reason");
            return Err(route.bad_answer(why).to_api_error());
        }
        Ok(())
    }
}
