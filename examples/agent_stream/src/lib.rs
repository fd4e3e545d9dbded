//! An AI agent's run, streamed live to any number of viewers who may drop and resume mid-run
//! without missing or repeating a token. Each run is an object (namespace `runs`, one per run
//! id): its event log is the run, its key/value storage holds the summary and the final state.
//!
//! # Producer
//! - `POST /v1/objects/runs/{run}/chunks`, body: a piece of output (UTF-8 text).
//! - `POST /v1/objects/runs/{run}/artifacts?name=NAME`, body: any bytes, up to the gateway's
//!   `limits.max_message_size` (16 MiB by default). Names are 1 to 128 of `A-Z a-z 0-9 . _ -`.
//! - `POST /v1/objects/runs/{run}/finish`, body: the final state, any JSON, kept in the
//!   run's key/value storage.
//! - `GET /v1/objects/runs/{run}/state`: `{"run", "status": "running" | "finished", "chunks",
//!   "artifacts", "artifact_bytes", "last_id", "channel", "state"}` (`state` is the final
//!   state, `null` while running).
//!
//! Each `POST` answers `201 {"id", "seq"}` once the event is durable; after `finish` all three
//! answer `409` (`finished`). A producer that retries after a lost answer may add the event
//! twice: producer-side deduplication is left out of this example.
//!
//! # Viewers
//! Every event is one JSON object, the same on both transports:
//!
//! ```json
//! {"seq":1,"type":"chunk","text":"Hel"}
//! {"seq":2,"type":"artifact","name":"report.pdf","size":5242880,"data_base64":"JVBERi0x..."}
//! {"seq":3,"type":"finish","state":{"answer":"..."}}
//! ```
//!
//! `seq` is the event's place in the run: increasing, and it may skip after a crash.
//! Artifacts travel base64-encoded (standard alphabet), whole, in one event.
//!
//! - **A page**, `GET /v1/objects/runs/{run}`: the run's text as it streams, its artifacts
//!   and final state, watched through the run's channel with the JavaScript client
//!   (`clients/js`, served at `.../dormouse.js`).
//! - **WebSocket**, served by the run itself: `ws://HOST/v1/objects/runs/{run}/ws`. Text
//!   messages are the event JSON plus `"id"`, the run's event id (opaque, increasing). Without
//!   a cursor a viewer gets the run from its start, then live events; with `?last_event_id=ID`
//!   (or a `Last-Event-ID` header) exactly the events after `ID`. An id the run cannot honour
//!   gets a `{"type":"gap",...}` message first, as on channels. After `finish` the socket is
//!   closed with 1000. A viewer that falls `limits.subscriber_queue` behind is closed with
//!   1008 and resumes with its last id.
//! - **SSE**, through the run's channel: `GET /v1/channels/run:{run}/events`, the built-in
//!   channel API. `id:` is the channel's event id (not the run's), `event:` the type, `data:`
//!   the event JSON. `Last-Event-ID` (EventSource sends it by itself) resumes after that id.
//!   Without a cursor the stream starts with the next event; to watch from the start, read
//!   `GET /v1/channels/run:{run}/messages` pages first, then subscribe with the last id. The
//!   channel's retention applies (1000 events and 24 h by default; `main.rs` raises it for
//!   `run:` channels).
//!
//! # Why SSE goes through a channel
//! The gateway gives a user object whole HTTP responses (`fetch`) and WebSockets; it cannot
//! stream an SSE body from an object. Channels already stream SSE with `Last-Event-ID`
//! resume, gap events and slow-consumer handling, so the run mirrors each event into the
//! channel `run:{run}` (see `mirror`). The run's log stays the source of truth:
//!
//! 1. An event is appended to the run's log; its fan-out to WebSocket viewers and its
//!    publish to the channel are after-commit effects, so neither audience ever sees an
//!    event a crash could take back, and both see the log's order.
//! 2. A crash can lose publishes that were queued but not yet stored by the channel (the
//!    producer already had its 201). So every event also makes sure the run's alarm is set,
//!    at most `mirror_check` ahead; the alarm survives the crash, wakes the run after the
//!    restart, and every activation (and every alarm) compares the channel's newest event
//!    with the log and publishes what is missing, in order, with the run's event id as
//!    idempotency key (so a late duplicate is stored once). SSE viewers thus get every
//!    acknowledged event, late but in order, and resume across the repair as usual.
//! 3. How far the channel is known to be complete is kept in the run's storage, so waking
//!    an old, finished run (`GET .../state`) asks the channel nothing.
//!
//! Known limit: if the channel fails to store one event (its disk is full, say) while the
//! next one succeeds, SSE viewers can miss the first even after the repair, which only looks
//! at the channel's newest event. WebSocket viewers are not affected.
//!
//! # Layout
//! - `event`: [`RunEvent`], its log record and wire encodings.
//! - `mirror`: the run's channel copy for SSE viewers.

pub mod event;
mod mirror;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use dormouse_actors::channel::{Control, EventId};
use dormouse_gateway::Publisher;
use dormouse_runtime::http::{HeaderMap, Method, StatusCode};
use dormouse_runtime::respond;
use dormouse_runtime::{
    Bytes, Context, HttpRequest, HttpResponse, Object, Outbound, Socket, Transport,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use event::{Body, RunEvent};
pub use mirror::CHANNEL_PREFIX;
use mirror::Mirror;

/// The namespace the example mounts its runs under.
pub const NAMESPACE: &str = "runs";

const SUMMARY_KEY: &[u8] = b"summary";
const STATE_KEY: &[u8] = b"state";
/// The newest seq the channel is known to hold.
const MIRRORED_KEY: &[u8] = b"mirrored";
/// More seqs than one run could hand out between two flushes, by far.
const SEQ_JUMP_AFTER_CRASH: u64 = 1 << 32;
/// Log entries read per storage call when replaying.
const READ_PAGE: usize = 64;
/// A viewer's page (`GET /v1/objects/runs/{run}`), which watches the run through its
/// channel with the JavaScript client (`clients/js`), served beside it.
const PAGE: &str = include_str!("../static/index.html");
const CLIENT: &str = include_str!("../../../clients/js/dormouse.js");
const MAX_ARTIFACT_NAME: usize = 128;

/// What every run shares.
#[derive(Debug, Clone)]
pub struct RunEnv {
    /// The gateway's publisher (`Dormouse::state().publisher`), through which the SSE mirror
    /// feeds the run's channel as every other publish does.
    pub publisher: Publisher,
    /// How long after an event the run wakes to check its channel copy is complete. Short
    /// means SSE viewers wait less for a repair after a crash; each check is two cheap calls.
    pub mirror_check: Duration,
}

impl RunEnv {
    /// The defaults: a check 2 s after activity.
    pub fn new(publisher: Publisher) -> Self {
        Self {
            publisher,
            mirror_check: Duration::from_secs(2),
        }
    }
}

/// Typed calls from Rust, the same operations as the HTTP routes.
#[derive(Debug, Clone)]
pub enum RunRequest {
    /// Appends output text.
    Chunk(String),
    /// Appends a file.
    Artifact {
        /// Its name.
        name: String,
        /// Its bytes.
        data: Bytes,
    },
    /// Ends the run with this state.
    Finish(Value),
    /// Describes the run.
    Status,
}

/// What a run answers.
#[derive(Debug, Clone, PartialEq)]
pub enum RunReply {
    /// The event is durable.
    Appended {
        /// The run's event id.
        id: String,
        /// Its place in the run.
        seq: u64,
    },
    /// Nothing was stored: the run had already finished.
    AlreadyFinished,
    /// The `GET .../state` document.
    Status(Value),
}

/// Counts kept next to the log, so the state page never scans it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Summary {
    chunks: u64,
    artifacts: u64,
    artifact_bytes: u64,
    finished: bool,
}

/// One run.
#[derive(Debug)]
pub struct Run {
    mirror: Mirror,
    mirror_check: Duration,
    /// The log's epoch; 0 while the run has no events.
    epoch: u64,
    next_seq: u64,
    summary: Summary,
    /// The newest seq the channel is known to hold (persisted under `MIRRORED_KEY`).
    mirrored_through: u64,
    /// Where the last repair in this activation started; the same start twice means the
    /// channel's newest event is not ours, and repeating would loop.
    last_repair_from: Option<u64>,
}

impl Object for Run {
    type Env = RunEnv;
    type Request = RunRequest;
    type Response = RunReply;

    async fn activate(ctx: &mut Context<'_>, env: &RunEnv) -> anyhow::Result<Self> {
        let summary = match ctx.get(SUMMARY_KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes).context("corrupt run summary")?,
            None => Summary::default(),
        };
        let mirrored_through = match ctx.get(MIRRORED_KEY)? {
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .context("corrupt mirror watermark")?,
            ),
            None => 0,
        };
        let mut run = Self {
            mirror: Mirror::new(env.publisher.clone(), ctx.name())?,
            mirror_check: env.mirror_check,
            epoch: 0,
            next_seq: 1,
            summary,
            mirrored_through,
            last_repair_from: None,
        };
        if let Some(meta) = ctx.log_meta()? {
            run.epoch = meta.epoch;
            run.next_seq = meta.last_seq + 1;
            // After a crash, events past the log's end may have been delivered (under a
            // weak durability, delivery precedes the fsync) and then lost: skip far past any
            // seq the lost run could have handed out, so no id ever names two events. The
            // unused range is a hole that readers step over.
            if ctx.first_activation_after_crash()? {
                run.next_seq = meta.last_seq + 1 + SEQ_JUMP_AFTER_CRASH;
            }
            if meta.last_seq > run.mirrored_through
                && let Err(e) = run.repair_mirror(ctx).await
            {
                tracing::warn!(run = %ctx.name(), error = %format!("{e:#}"), "could not check the channel copy; retrying later");
                ctx.set_alarm(SystemTime::now() + run.mirror_check);
            }
        }
        Ok(run)
    }

    async fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        request: RunRequest,
    ) -> anyhow::Result<RunReply> {
        self.repair_if_broken(ctx).await;
        self.call(ctx, request)
    }

    async fn fetch(
        &mut self,
        ctx: &mut Context<'_>,
        request: HttpRequest,
    ) -> anyhow::Result<HttpResponse> {
        self.repair_if_broken(ctx).await;
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        let request = match (&parts.method, path) {
            (&Method::POST, "/chunks") => match String::from_utf8(body.to_vec()) {
                Ok(text) if !text.is_empty() => RunRequest::Chunk(text),
                _ => {
                    return respond::error(
                        StatusCode::BAD_REQUEST,
                        "bad_chunk",
                        "a chunk is non-empty UTF-8 text",
                    );
                }
            },
            (&Method::POST, "/artifacts") => match artifact_name(parts.uri.query()) {
                Ok(name) => RunRequest::Artifact { name, data: body },
                Err(message) => {
                    return respond::error(StatusCode::BAD_REQUEST, "bad_query", &message);
                }
            },
            (&Method::POST, "/finish") => match serde_json::from_slice(&body) {
                Ok(state) => RunRequest::Finish(state),
                Err(e) => {
                    return respond::error(
                        StatusCode::BAD_REQUEST,
                        "bad_state",
                        format!("the final state must be JSON: {e}"),
                    );
                }
            },
            (&Method::GET, "/state") => RunRequest::Status,
            (&Method::GET, "/") => {
                return page(StatusCode::OK, "text/html; charset=utf-8", PAGE);
            }
            (&Method::GET, "/dormouse.js") => {
                return page(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT);
            }
            (_, "/ws") => {
                return respond::error(
                    StatusCode::UPGRADE_REQUIRED,
                    "websocket_upgrade_required",
                    "connect to /ws with a WebSocket client",
                );
            }
            (_, "/chunks" | "/artifacts" | "/finish" | "/state") => {
                return respond::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{} is not allowed on {path}", parts.method),
                );
            }
            _ => {
                return respond::error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!(
                        "no route for {path}: producers POST /chunks, /artifacts?name=, /finish; viewers GET / (a page), /state or connect to /ws"
                    ),
                );
            }
        };
        match self.call(ctx, request)? {
            RunReply::Appended { id, seq } => {
                respond::json(StatusCode::CREATED, &json!({"id": id, "seq": seq}))
            }
            RunReply::AlreadyFinished => respond::error(
                StatusCode::CONFLICT,
                "finished",
                "the run has finished and takes no more events",
            ),
            RunReply::Status(status) => respond::json(StatusCode::OK, &status),
        }
    }

    async fn websocket(
        &mut self,
        ctx: &mut Context<'_>,
        socket: Socket,
        request: dormouse_runtime::http::request::Parts,
    ) -> anyhow::Result<()> {
        if request.uri.path() != "/ws" {
            refuse(
                &socket,
                4404,
                "not_found",
                "WebSocket viewers connect to /ws",
            );
            return Ok(());
        }
        let cursor = match cursor(&request.headers, request.uri.query()) {
            Ok(cursor) => cursor,
            Err(message) => {
                refuse(&socket, 4400, "bad_event_id", &message);
                return Ok(());
            }
        };
        // Backlog and subscription in one handler: every later event reaches this socket
        // through the fan-out, every earlier one through the backlog, none through both.
        let (gap, backlog) = self.backlog(ctx, cursor)?;
        let finished = self.summary.finished;
        if !finished {
            ctx.accept_socket(socket.clone());
        }
        ctx.after_commit(move || {
            if let Some(gap) = gap {
                socket.send(gap.frame(Transport::WebSocket));
            }
            for event in &backlog {
                socket.send(Outbound::Text(event.ws_message()));
            }
            if finished {
                socket.send(finished_close());
            }
        });
        Ok(())
    }

    /// The mirror check: confirms the channel holds every event, publishing what it lacks.
    async fn alarm(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.repair_mirror(ctx).await
    }
}

impl Run {
    fn call(&mut self, ctx: &mut Context<'_>, request: RunRequest) -> anyhow::Result<RunReply> {
        match request {
            RunRequest::Chunk(text) => self.append(ctx, Body::Chunk(text)),
            RunRequest::Artifact { name, data } => self.append(ctx, Body::Artifact { name, data }),
            RunRequest::Finish(state) => self.append(ctx, Body::Finish(state)),
            RunRequest::Status => Ok(RunReply::Status(self.status(ctx)?)),
        }
    }

    fn append(&mut self, ctx: &mut Context<'_>, body: Body) -> anyhow::Result<RunReply> {
        if self.summary.finished {
            return Ok(RunReply::AlreadyFinished);
        }
        if self.epoch == 0 {
            self.epoch = ctx.allocate_epoch()?;
            ctx.create_log(self.epoch);
            self.next_seq = 1;
        }
        let id = EventId {
            epoch: self.epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        match &body {
            Body::Chunk(_) => self.summary.chunks += 1,
            Body::Artifact { data, .. } => {
                self.summary.artifacts += 1;
                self.summary.artifact_bytes += data.len() as u64;
            }
            Body::Finish(state) => {
                ctx.put(STATE_KEY, state.to_string());
                self.summary.finished = true;
            }
        }
        let event = Arc::new(RunEvent::new(id, body));
        ctx.append_log(id.seq, now_ms(), event.record());
        ctx.put(SUMMARY_KEY, serde_json::to_vec(&self.summary)?);
        if ctx.alarm()?.is_none() {
            ctx.set_alarm(SystemTime::now() + self.mirror_check);
        }
        let sockets = ctx.sockets();
        let finished = self.summary.finished;
        let mirror = self.mirror.clone();
        ctx.after_commit(move || {
            let message = Outbound::Text(event.ws_message());
            for socket in sockets.iter() {
                socket.send(message.clone());
                if finished {
                    socket.send(finished_close());
                }
            }
            mirror.publish(&[event]);
        });
        Ok(RunReply::Appended {
            id: id.to_string(),
            seq: id.seq,
        })
    }

    /// Publishes whatever the channel lacks after its newest run event (see the module docs),
    /// and records how far it is known to be complete.
    async fn repair_mirror(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let Some(meta) = ctx.log_meta()?.filter(|m| m.count > 0) else {
            return Ok(());
        };
        let held = self
            .mirror
            .last_seq()
            .await?
            .unwrap_or(0)
            .max(self.mirrored_through)
            .min(meta.last_seq);
        if held == meta.last_seq {
            self.confirm(ctx, held);
            return Ok(());
        }
        if self.last_repair_from == Some(held) {
            // The events went out and were stored (or deduplicated), yet the newest event is
            // still not a later one of ours: something else publishes to the channel.
            tracing::warn!(channel = %self.mirror.channel(), "the channel's newest event is not from this run; assuming it holds the run");
            self.confirm(ctx, meta.last_seq);
            return Ok(());
        }
        let missing = self.read_from(ctx, held + 1)?;
        tracing::info!(channel = %self.mirror.channel(), from_seq = held + 1, events = missing.len(), "republishing events the channel lacks");
        self.last_repair_from = Some(held);
        self.confirm(ctx, held);
        let mirror = self.mirror.clone();
        ctx.after_commit(move || mirror.publish(&missing));
        // Look again once they are stored.
        ctx.set_alarm(SystemTime::now() + self.mirror_check);
        Ok(())
    }

    async fn repair_if_broken(&mut self, ctx: &mut Context<'_>) {
        if self.mirror.take_broken()
            && let Err(e) = self.repair_mirror(ctx).await
        {
            tracing::warn!(channel = %self.mirror.channel(), error = %format!("{e:#}"), "could not repair the channel copy; the mirror check will retry");
            if ctx.alarm().ok().flatten().is_none() {
                ctx.set_alarm(SystemTime::now() + self.mirror_check);
            }
        }
    }

    fn confirm(&mut self, ctx: &mut Context<'_>, seq: u64) {
        if seq > self.mirrored_through {
            self.mirrored_through = seq;
            ctx.put(MIRRORED_KEY, seq.to_be_bytes().to_vec());
        }
    }

    /// Committed events from `from` on, in order.
    fn read_from(&self, ctx: &Context<'_>, mut from: u64) -> anyhow::Result<Vec<Arc<RunEvent>>> {
        let mut events = Vec::new();
        loop {
            let page = ctx.read_log(from, READ_PAGE)?;
            for entry in &page {
                events.push(Arc::new(RunEvent::from_record(
                    self.epoch,
                    entry.seq,
                    &entry.data,
                )?));
            }
            match page.last() {
                Some(last) if page.len() == READ_PAGE => from = last.seq + 1,
                _ => return Ok(events),
            }
        }
    }

    /// What a viewer with `cursor` has missed, with a gap notice when the cursor cannot be
    /// honoured (the same reasons as a channel's).
    fn backlog(
        &self,
        ctx: &Context<'_>,
        cursor: Option<EventId>,
    ) -> anyhow::Result<(Option<Control>, Vec<Arc<RunEvent>>)> {
        let (gap, from) = match cursor {
            None => (None, 1),
            Some(c) if self.epoch == 0 || c.epoch != self.epoch => (
                Some((
                    "epoch_changed",
                    "the id is not from this run's history; replaying the whole run",
                )),
                1,
            ),
            Some(c) if c.seq >= self.next_seq => (
                Some((
                    "unknown_id",
                    "the id is newer than anything this run holds (history was lost); continuing with new events",
                )),
                self.next_seq,
            ),
            Some(c) => (None, c.seq + 1),
        };
        let events = if self.epoch == 0 {
            Vec::new()
        } else {
            self.read_from(ctx, from)?
        };
        let gap = gap.map(|(reason, message)| Control {
            r#type: "gap",
            reason,
            message: message.to_string(),
            channel: None,
            earliest_id: events.first().map(|e| e.id.to_string()),
            requested_id: cursor.map(|c| c.to_string()),
        });
        Ok((gap, events))
    }

    fn status(&self, ctx: &Context<'_>) -> anyhow::Result<Value> {
        let state: Option<Value> = match ctx.get(STATE_KEY)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).context("corrupt final state")?),
            None => None,
        };
        let last_id = ctx.log_meta()?.filter(|m| m.count > 0).map(|m| {
            EventId {
                epoch: m.epoch,
                seq: m.last_seq,
            }
            .to_string()
        });
        Ok(json!({
            "run": ctx.name(),
            "status": if self.summary.finished { "finished" } else { "running" },
            "chunks": self.summary.chunks,
            "artifacts": self.summary.artifacts,
            "artifact_bytes": self.summary.artifact_bytes,
            "last_id": last_id,
            "channel": self.mirror.channel(),
            "state": state,
        }))
    }
}

/// The viewer's cursor: the `Last-Event-ID` header, else the `last_event_id` query parameter.
fn cursor(headers: &HeaderMap, query: Option<&str>) -> Result<Option<EventId>, String> {
    let header = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| "Last-Event-ID must be ASCII text".to_string())?
                .trim(),
        ),
        None => None,
    };
    let query = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("last_event_id="));
    match header
        .filter(|h| !h.is_empty())
        .or(query.filter(|q| !q.is_empty()))
    {
        None => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|e| format!("{e}")),
    }
}

fn artifact_name(query: Option<&str>) -> Result<String, String> {
    let mut name = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("name", value)) => name = Some(value),
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?}; only name is allowed"
                ));
            }
        }
    }
    let rule = "artifact names are 1 to 128 characters from A-Z a-z 0-9 . _ -";
    match name {
        None => Err(format!("the name query parameter is required ({rule})")),
        Some(name)
            if name.is_empty()
                || name.len() > MAX_ARTIFACT_NAME
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
        {
            Err(format!("{rule}; got {name:?}"))
        }
        Some(name) => Ok(name.to_string()),
    }
}

/// Tells a viewer why it is not being served, then closes its socket (it was not accepted).
fn refuse(socket: &Socket, close_code: u16, code: &str, message: &str) {
    let text = json!({"type": "error", "code": code, "message": message}).to_string();
    socket.send(Outbound::Text(Bytes::from(text)));
    socket.send(Outbound::Close {
        code: close_code,
        reason: code.to_string(),
    });
}

fn finished_close() -> Outbound {
    Outbound::Close {
        code: 1000,
        reason: "the run finished".to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A static answer: the viewer's page or the client it loads.
fn page(
    status: StatusCode,
    content_type: &str,
    body: &'static str,
) -> anyhow::Result<HttpResponse> {
    Ok(dormouse_runtime::http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Bytes::from_static(body.as_bytes()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_cursor_wins_over_the_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(cursor(&headers, None), Ok(None));
        assert_eq!(
            cursor(&headers, Some("x=1&last_event_id=ab-7")),
            Ok(Some(EventId {
                epoch: 0xab,
                seq: 7
            }))
        );
        headers.insert("last-event-id", " ab-9 ".parse().unwrap());
        assert_eq!(
            cursor(&headers, Some("last_event_id=ab-7")),
            Ok(Some(EventId {
                epoch: 0xab,
                seq: 9
            }))
        );
        assert!(cursor(&HeaderMap::new(), Some("last_event_id=nope")).is_err());
    }

    #[test]
    fn artifact_names() {
        assert_eq!(
            artifact_name(Some("name=report.v2_final-1.pdf")),
            Ok("report.v2_final-1.pdf".to_string())
        );
        for bad in [
            None,
            Some(""),
            Some("name="),
            Some("name=a/b"),
            Some("name=a&x=1"),
        ] {
            assert!(artifact_name(bad).is_err(), "{bad:?}");
        }
        assert!(artifact_name(Some(&format!("name={}", "a".repeat(129)))).is_err());
    }
}
