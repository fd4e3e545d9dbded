//! A token bucket per key: each key (an API key, a client IP) is its own object, so
//! concurrent requests for one key are serialised by the runtime and the count is exact, and
//! a key nobody uses costs nothing once it hibernates. The bucket lives in the object's
//! storage, so limits survive restarts.
//!
//! - `POST /v1/objects/limits/{key}/take?n=N` takes N tokens (default 1): `200` with
//!   `{"allowed": true, "remaining": R}`, or `429` with `{"allowed": false, "remaining": R,
//!   "retry_after_ms": T}` and a `Retry-After` header.
//! - `GET /v1/objects/limits/{key}` reports the budget without taking anything.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use dormouse_runtime::http::{Method, StatusCode};
use dormouse_runtime::respond;
use dormouse_runtime::{Context, HttpRequest, HttpResponse, Object};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The namespace the example mounts its buckets under.
pub const NAMESPACE: &str = "limits";

/// The bucket's shape, shared by every key.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tokens a full bucket holds (the burst).
    pub capacity: f64,
    /// Tokens added per second (the sustained rate).
    pub refill_per_sec: f64,
}

/// One key's bucket.
#[derive(Debug)]
pub struct TokenBucket {
    limits: Limits,
    state: Stored,
}

/// What is persisted: the level at a moment; the level now is computed from it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Stored {
    tokens: f64,
    at_ms: u64,
}

const KEY: &[u8] = b"bucket";

impl Object for TokenBucket {
    type Env = Limits;
    type Request = u32;
    type Response = Decision;

    async fn activate(ctx: &mut Context<'_>, limits: &Limits) -> anyhow::Result<Self> {
        let state = match ctx.get(KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes).context("corrupt bucket record")?,
            None => Stored {
                tokens: limits.capacity,
                at_ms: now_ms(),
            },
        };
        Ok(Self {
            limits: *limits,
            state,
        })
    }

    /// Typed calls from Rust: take `n` tokens.
    async fn handle(&mut self, ctx: &mut Context<'_>, n: u32) -> anyhow::Result<Decision> {
        self.take(ctx, n)
    }

    async fn fetch(
        &mut self,
        ctx: &mut Context<'_>,
        request: HttpRequest,
    ) -> anyhow::Result<HttpResponse> {
        let path = request.uri().path();
        let decision = match (request.method(), path) {
            (&Method::POST, "/take") => {
                let n = match query_n(request.uri().query()) {
                    Ok(n) => n,
                    Err(message) => {
                        return respond::error(StatusCode::BAD_REQUEST, "bad_query", message);
                    }
                };
                self.take(ctx, n)?
            }
            (&Method::GET, "/") => self.peek(),
            _ => {
                return respond::json(
                    StatusCode::NOT_FOUND,
                    &json!({"error": {"code": "not_found", "message": format!("no route for {} {path}: use POST /take?n=N or GET /", request.method())}}),
                );
            }
        };
        let status = if decision.allowed {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        let mut response = respond::json(status, &serde_json::to_value(decision)?)?;
        if !decision.allowed {
            let seconds = decision.retry_after_ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse()?);
        }
        Ok(response)
    }
}

/// The answer to a take.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Decision {
    /// Whether the tokens were granted.
    pub allowed: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// When refused: how long until enough tokens accumulate.
    pub retry_after_ms: u64,
}

impl TokenBucket {
    fn level(&self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.state.at_ms) as f64 / 1000.0;
        (self.state.tokens + elapsed * self.limits.refill_per_sec).min(self.limits.capacity)
    }

    fn peek(&self) -> Decision {
        let level = self.level(now_ms());
        Decision {
            allowed: level >= 1.0,
            remaining: level.floor() as u64,
            retry_after_ms: 0,
        }
    }

    fn take(&mut self, ctx: &mut Context<'_>, n: u32) -> anyhow::Result<Decision> {
        let now = now_ms();
        let level = self.level(now);
        let wanted = f64::from(n);
        let allowed = level >= wanted;
        let tokens = if allowed { level - wanted } else { level };
        self.state = Stored { tokens, at_ms: now };
        ctx.put(KEY, serde_json::to_vec(&self.state)?);
        let retry_after_ms = if allowed || self.limits.refill_per_sec <= 0.0 {
            0
        } else {
            (((wanted - tokens) / self.limits.refill_per_sec) * 1000.0).ceil() as u64
        };
        Ok(Decision {
            allowed,
            remaining: tokens.floor() as u64,
            retry_after_ms,
        })
    }
}

fn query_n(query: Option<&str>) -> Result<u32, String> {
    let mut n = 1;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("n", v)) => {
                n = v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    format!("n must be a whole number of tokens, 1 or more; got {v:?}")
                })?;
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?}; only n is allowed"
                ));
            }
        }
    }
    Ok(n)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
