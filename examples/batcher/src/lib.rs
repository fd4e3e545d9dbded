//! An ingest buffer in front of an analytics sink, like an event proxy: clients post events
//! as NDJSON, each stream's buffer acknowledges them once they are on disk, and ships them to
//! an upstream HTTP sink in batches. Every stream is its own object, so one stream's rows are
//! ordered and counted exactly without locks, a slow stream never holds up another, and an
//! idle stream costs nothing once it hibernates.
//!
//! - `POST /v1/objects/ingest/{stream}/events`, body NDJSON (one JSON object per line; blank
//!   lines are skipped): `202 {"accepted": n, "buffered": m}` once the rows are durable;
//!   `400` naming the first line that is not a JSON object (nothing is stored); `429` with
//!   `Retry-After` when the stream already holds `max_buffered` rows; `413` when one request
//!   alone has more rows than that.
//! - `GET /v1/objects/ingest/{stream}`: `{"buffered", "consecutive_failures",
//!   "next_attempt_in_ms"}`.
//!
//! # Flushing
//! Accepted rows are appended to the stream object's log. A batch (the oldest `max_rows` rows
//! at most) leaves when `max_rows` are buffered, or `max_delay` after its oldest row was
//! accepted, whichever comes first; both are the object's one alarm, so a buffer that waits
//! survives hibernation and restarts. The alarm handler posts the batch to the upstream
//! (`Content-Type: application/x-ndjson`, one row per line, in acceptance order) and, after a
//! 2xx, removes exactly those rows in its commit. A failed delivery (connection error,
//! timeout, non-2xx) keeps them and sets the alarm again after `max_delay`, doubling up to
//! `max_backoff`, without limit: the rows wait for the sink, and ingest answers 429 once the
//! buffer is full.
//!
//! # Guarantees
//! - **No acknowledged row is lost**, even to `kill -9`: the output gate releases the 202
//!   only once the rows are durable, and rows leave the log only in the commit that follows
//!   the sink's 2xx.
//! - **At least once**: a crash, or a timeout after the sink stored the batch, between the
//!   sink's 2xx and that commit sends those rows again. Each batch carries `Idempotency-Key:
//!   ingest/{stream}/{epoch}-{first_seq}-{last_seq}`, which names exactly its rows, plus
//!   `Dormouse-Stream`, `Dormouse-Epoch` and `Dormouse-First-Seq`. A retry may cut the batch
//!   differently (more rows arrived meanwhile), so a sink that must not count twice dedupes
//!   per row on (stream, epoch, first seq + line index).
//! - **Order**: per stream, rows reach the sink in acceptance order, and a batch is sent only
//!   after the one before it was acknowledged.
//! - **Only durable rows leave**: a batch never holds a row whose commit could still be lost,
//!   so a sequence number the sink has seen never comes back naming a different row.
//!
//! The delivery runs inside the alarm handler, so while it is in flight (at most
//! `request_timeout`) the stream's ingests wait behind it. That keeps the example simple and
//! is what bounds memory: a stream never has more than one batch in the air.
//!
//! # Layout
//! - `config`: [`BatcherConfig`], the batching rules and the `BATCHER_*` variables.
//! - `upstream`: one delivery: the POST, its headers, what counts as success.

mod config;
mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use dormouse_runtime::http::{Method, StatusCode};
use dormouse_runtime::respond;
use dormouse_runtime::storage::Retention;
use dormouse_runtime::{Bytes, Context, HttpRequest, HttpResponse, Object};
use serde_json::{Map, Value, json};

pub use config::BatcherConfig;
use upstream::Batch;

/// The namespace the example mounts its streams under.
pub const NAMESPACE: &str = "ingest";

/// What every stream shares: the rules and one HTTP client (one connection pool).
#[derive(Debug, Clone)]
pub struct BatcherEnv {
    config: BatcherConfig,
    client: reqwest::Client,
}

impl BatcherEnv {
    /// Checks `config` and builds the client.
    pub fn new(config: BatcherConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let client = reqwest::Client::builder()
            .build()
            .context("building the HTTP client")?;
        Ok(Self { config, client })
    }

    /// The rules in force.
    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }
}

/// One stream's buffer. The rows live in the object's log, from `first_seq` to
/// `next_seq - 1`; everything here is derived from it on activation.
#[derive(Debug)]
pub struct Batcher {
    config: BatcherConfig,
    client: reqwest::Client,
    /// The oldest buffered row; equal to `next_seq` when the buffer is empty.
    first_seq: u64,
    /// The sequence number the next accepted row gets.
    next_seq: u64,
    /// The newest row known to be durable, raised by after-commit effects: each ingest's, and
    /// the flush's own (see [`Batcher::flush`]). A batch stops there, so no row leaves before
    /// its commit is safe.
    durable: Arc<AtomicU64>,
    /// Consecutive failed deliveries, for the backoff. Kept in memory: after a restart the
    /// first retry comes promptly, which is what an operator who fixed the sink wants.
    failures: u32,
}

/// What became of an ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Every row was stored.
    Accepted {
        /// Rows in this request.
        accepted: usize,
        /// Rows the stream holds now, these included.
        buffered: usize,
    },
    /// Nothing was stored: the buffer cannot take that many more rows now.
    Full {
        /// Rows the stream holds.
        buffered: usize,
        /// When the next delivery attempt is due.
        retry_after: Duration,
    },
    /// Nothing was stored: one request had more rows than a stream may ever hold.
    TooLarge,
}

impl Object for Batcher {
    type Env = BatcherEnv;
    /// Typed calls from Rust: events to ingest.
    type Request = Vec<Map<String, Value>>;
    type Response = Ingested;

    async fn activate(ctx: &mut Context<'_>, env: &BatcherEnv) -> anyhow::Result<Self> {
        let (first_seq, next_seq) = match ctx.log_meta()? {
            Some(meta) if meta.count > 0 => (meta.first_seq, meta.last_seq + 1),
            Some(meta) => (meta.last_seq + 1, meta.last_seq + 1),
            None => (1, 1),
        };
        let batcher = Self {
            config: env.config.clone(),
            client: env.client.clone(),
            first_seq,
            next_seq,
            // Nothing is known durable yet: rows may come from an activation whose commits
            // are still in flight. The first flush establishes it.
            durable: Arc::new(AtomicU64::new(0)),
            failures: 0,
        };
        // Buffered rows always have an alarm; repair that if a handler gave up on one.
        if batcher.buffered() > 0 && ctx.alarm()?.is_none() {
            ctx.set_alarm(SystemTime::now());
        }
        Ok(batcher)
    }

    async fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        events: Vec<Map<String, Value>>,
    ) -> anyhow::Result<Ingested> {
        let rows = events
            .iter()
            .map(|event| serde_json::to_vec(event).map(Bytes::from))
            .collect::<Result<Vec<_>, _>>()?;
        self.ingest(ctx, rows)
    }

    async fn fetch(
        &mut self,
        ctx: &mut Context<'_>,
        request: HttpRequest,
    ) -> anyhow::Result<HttpResponse> {
        let path = request.uri().path();
        match (request.method(), path) {
            (&Method::POST, "/events") => {
                let rows = match parse_ndjson(request.body()) {
                    Ok(rows) if rows.is_empty() => {
                        return respond::error(
                            StatusCode::BAD_REQUEST,
                            "no_events",
                            "the body holds no events: send one JSON object per line",
                        );
                    }
                    Ok(rows) => rows,
                    Err(BadLine { line, why }) => {
                        return respond::json(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": {"code": "bad_event", "line": line,
                                "message": format!("line {line} is not a JSON object ({why}); nothing was stored")}}),
                        );
                    }
                };
                let outcome = self.ingest(ctx, rows)?;
                self.answer(outcome)
            }
            (&Method::GET, "/") => respond::json(StatusCode::OK, &self.status(ctx)?),
            (_, "/events" | "/") => respond::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {path}", request.method()),
            ),
            _ => respond::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {path}: use POST /events or GET /"),
            ),
        }
    }

    async fn alarm(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.flush(ctx).await
    }
}

impl Batcher {
    fn buffered(&self) -> usize {
        (self.next_seq - self.first_seq) as usize
    }

    fn ingest(&mut self, ctx: &mut Context<'_>, rows: Vec<Bytes>) -> anyhow::Result<Ingested> {
        let n = rows.len();
        if n > self.config.max_buffered {
            return Ok(Ingested::TooLarge);
        }
        let buffered = self.buffered();
        if buffered + n > self.config.max_buffered {
            return Ok(Ingested::Full {
                buffered,
                retry_after: self.next_attempt_in(ctx)?.unwrap_or(self.config.max_delay),
            });
        }
        let now = now_ms();
        for row in rows {
            ctx.append_log(self.next_seq, now, row);
            self.next_seq += 1;
        }
        let last = self.next_seq - 1;
        let durable = self.durable.clone();
        ctx.after_commit(move || {
            durable.fetch_max(last, Ordering::AcqRel);
        });
        let total = buffered + n;
        // A full batch goes now, unless the sink is failing: then the backoff stands.
        if total >= self.config.max_rows && self.failures == 0 {
            self.alarm_by(ctx, now)?;
        } else if buffered == 0 {
            self.alarm_by(ctx, now + millis(self.config.max_delay))?;
        }
        Ok(Ingested::Accepted {
            accepted: n,
            buffered: total,
        })
    }

    /// Ships the oldest durable rows if a batch is due, then sets the next alarm.
    async fn flush(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let now = now_ms();
        if self.buffered() == 0 {
            self.failures = 0;
            ctx.delete_alarm();
            return Ok(());
        }
        let meta = ctx
            .log_meta()?
            .context("rows are buffered but the log is missing")?;
        let durable = self.durable.load(Ordering::Acquire);
        let applied = self.next_seq - 1;
        if durable < applied {
            // Rows are stored but not known durable. This handler always writes (at least
            // the alarm), and its commit waits for every write applied before it, so once its
            // effects run those rows are safe: the next flush may ship them.
            let watermark = self.durable.clone();
            ctx.after_commit(move || {
                watermark.fetch_max(applied, Ordering::AcqRel);
            });
        }
        let ready = (durable + 1).saturating_sub(self.first_seq);
        let ready = ready.min(self.config.max_rows as u64) as usize;
        let entries = if ready > 0 {
            ctx.read_log(self.first_seq, ready)?
        } else {
            Vec::new()
        };
        let overdue = match entries.first() {
            Some(oldest) => oldest.timestamp_ms + millis(self.config.max_delay) <= now,
            None => false,
        };
        if entries.is_empty() || (entries.len() < self.config.max_rows && !overdue) {
            // Not due yet, or the rows are still on their way to disk: the alarm set here
            // fires again only after this handler's commit, and so after theirs.
            return self.rearm(ctx, now);
        }
        // The trim below drops the oldest rows by count, so the log must hold exactly the
        // buffered rows, in order.
        anyhow::ensure!(
            meta.count == self.buffered() as u64
                && entries.len() == ready
                && entries
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.seq == self.first_seq + i as u64),
            "the log does not hold rows {}..={} in order",
            self.first_seq,
            self.first_seq + ready as u64 - 1
        );
        let stream = ctx.name().to_string();
        let batch = Batch {
            stream: &stream,
            epoch: meta.epoch,
            first_seq: self.first_seq,
            rows: entries.into_iter().map(|e| e.data).collect(),
        };
        match upstream::deliver(&self.client, &self.config, &batch).await {
            Ok(()) => {
                let sent = batch.rows.len() as u64;
                tracing::debug!(stream = %stream, rows = sent, key = %batch.idempotency_key(), "batch delivered");
                let retention = Retention {
                    max_events: Some(meta.count.saturating_sub(sent)),
                    ..Retention::default()
                };
                ctx.trim_log(retention, now);
                self.first_seq += sent;
                self.failures = 0;
                self.rearm(ctx, now)
            }
            Err(e) => {
                self.failures += 1;
                let delay = self.config.backoff(self.failures);
                tracing::warn!(
                    stream = %stream,
                    failures = self.failures,
                    retry_in = ?delay,
                    error = %format!("{e:#}"),
                    "delivery failed; the rows stay buffered"
                );
                ctx.set_alarm(SystemTime::now() + delay);
                Ok(())
            }
        }
    }

    /// The alarm after a flush: none for an empty buffer, now for a full batch, else when
    /// the oldest row has waited `max_delay`.
    fn rearm(&self, ctx: &mut Context<'_>, now: u64) -> anyhow::Result<()> {
        if self.buffered() == 0 {
            ctx.delete_alarm();
        } else if self.buffered() >= self.config.max_rows {
            ctx.set_alarm(at(now));
        } else {
            let oldest = ctx
                .read_log(self.first_seq, 1)?
                .first()
                .map_or(now, |e| e.timestamp_ms);
            ctx.set_alarm(at(oldest + millis(self.config.max_delay)));
        }
        Ok(())
    }

    /// Moves the alarm to `due_ms` unless it is already due by then.
    fn alarm_by(&self, ctx: &mut Context<'_>, due_ms: u64) -> anyhow::Result<()> {
        match ctx.alarm()? {
            Some(current) if current <= at(due_ms) => {}
            _ => ctx.set_alarm(at(due_ms)),
        }
        Ok(())
    }

    fn next_attempt_in(&self, ctx: &Context<'_>) -> anyhow::Result<Option<Duration>> {
        Ok(ctx
            .alarm()?
            .map(|due| due.duration_since(SystemTime::now()).unwrap_or_default()))
    }

    fn status(&self, ctx: &Context<'_>) -> anyhow::Result<Value> {
        Ok(json!({
            "buffered": self.buffered(),
            "consecutive_failures": self.failures,
            "next_attempt_in_ms": self.next_attempt_in(ctx)?.map(|d| d.as_millis() as u64),
        }))
    }

    fn answer(&self, outcome: Ingested) -> anyhow::Result<HttpResponse> {
        match outcome {
            Ingested::Accepted { accepted, buffered } => respond::json(
                StatusCode::ACCEPTED,
                &json!({"accepted": accepted, "buffered": buffered}),
            ),
            Ingested::Full {
                buffered,
                retry_after,
            } => {
                let seconds = retry_after.as_millis().div_ceil(1000).max(1);
                let mut response = respond::json(
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({"error": {"code": "buffer_full", "message": format!(
                        "the stream holds {buffered} rows and takes at most {} until the upstream catches up; retry later",
                        self.config.max_buffered)}, "buffered": buffered}),
                )?;
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse()?);
                Ok(response)
            }
            Ingested::TooLarge => respond::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "a request may carry at most {} events",
                    self.config.max_buffered
                ),
            ),
        }
    }
}

/// Why a body was refused: its first bad line (1-based).
#[derive(Debug)]
struct BadLine {
    line: usize,
    why: String,
}

/// The body's rows, each a JSON object kept byte for byte (surrounding whitespace trimmed).
fn parse_ndjson(body: &Bytes) -> Result<Vec<Bytes>, BadLine> {
    let mut rows = Vec::new();
    let mut start = 0;
    for (index, line) in body.split(|&b| b == b'\n').enumerate() {
        let line_start = start;
        start += line.len() + 1;
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        let bad = |why: String| BadLine {
            line: index + 1,
            why,
        };
        serde_json::from_slice::<serde::de::IgnoredAny>(trimmed).map_err(|e| bad(e.to_string()))?;
        if trimmed[0] != b'{' {
            return Err(bad("it is valid JSON but not an object".to_string()));
        }
        let from = line_start + (line.len() - line.trim_ascii_start().len());
        rows.push(body.slice(from..from + trimmed.len()));
    }
    Ok(rows)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_rows_are_kept_byte_for_byte() {
        let body = Bytes::from_static(b"{\"a\":1}\n\n  {\"b\": [1, 2]}  \r\n{}");
        let rows = parse_ndjson(&body).unwrap();
        assert_eq!(rows, ["{\"a\":1}", "{\"b\": [1, 2]}", "{}"]);
    }

    #[test]
    fn the_first_bad_line_is_named() {
        for (body, line) in [
            (&b"{\"a\":1}\n[1]\n{}"[..], 2),
            (b"{}\n\n{\"a\":\n", 3),
            (b"nope", 1),
            (b"{} {}", 1),
            (b"\"text\"", 1),
        ] {
            let err = parse_ndjson(&Bytes::from_static(body)).unwrap_err();
            assert_eq!(
                err.line,
                line,
                "{:?}: {}",
                String::from_utf8_lossy(body),
                err.why
            );
        }
    }
}
