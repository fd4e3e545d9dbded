//! The front door: configuration, the HTTP API, SSE and WebSocket connections. The
//! `dormouse` binary (crate `dormouse`, in `cli/`) runs it; a program of its own can too
//! (every example does), without compiling the binary's client commands.
//!
//! # Layout
//! - `config`: [`Settings`], from defaults, a TOML file, `DORMOUSE_*` variables and flags.
//! - `error`: [`ApiError`], the one type every failure becomes on the wire:
//!   `{"error": {"code", "message"}}` with its HTTP status.
//! - `server`: [`Dormouse`] opens storage and the runtime (or joins a cluster), [`Dormouse::router`] builds the
//!   routes (tests use the same router), [`Dormouse::serve`] runs until shutdown.
//! - `state`: [`AppState`], the handles every handler shares; only handlers and middleware
//!   import it.
//! - `routes`: every route's path, named once (router, auth rules, SSE fast path).
//! - `middleware`: the HTTP glue every request passes (refusals counted, size and overload
//!   guard, authentication and what the route needs).
//! - `auth`: credentials (JWT, API keys), [`Grants`], and what each route needs.
//! - `publisher`: [`Publisher`], the one way into a channel: a client's checks (grant, rate,
//!   validation) and the merging of concurrent publishes into one call.
//! - `health`: liveness and readiness probes.
//! - `limits`: request size, overload shedding and publish rate limits.
//! - `channels`: the channel routes: publish, history, info, list, delete.
//! - `cluster`: cluster mode: [`ClusterNode`] sends each call to the owner of its channel
//!   or object, answers other nodes' calls, and serves subscribers from copies of their
//!   channels kept current from the journal.
//! - `publish`: batch publish (`POST /v1/publish`, JSON array or NDJSON).
//! - `cursor`: where a subscriber starts (`Last-Event-ID` header or query).
//! - `conn`: the connection layer, from the TCP socket to the router and from a runtime
//!   socket's queue to the client: accept loop, connection IO, the SSE fast path outside
//!   hyper, WebSocket handshakes, the subscriber writer and framing, shutdown. Its module
//!   doc lists its vocabulary.
//! - `connections`: the connection table (every SSE and WebSocket client by id, subject and
//!   channel) and the server-side API that sends to, lists and closes them, on any node.
//! - `hooks`: upstream hooks: signed HTTP calls to a backend on connect, message and
//!   disconnect, and the records that make disconnects at least once.
//! - `sse`: the Server-Sent Events subscription handlers and body stream.
//! - `ws`: the WebSocket session: subscription handler and the client's own messages.
//! - `objects`: user-defined objects mounted under `/v1/objects/{namespace}/{name}/...`.
//! - `telemetry`: the server's figures, connection open/close logging, per-second samples
//!   for the admin page; `telemetry/render.rs` writes them as Prometheus text.
//! - `scrape`: `GET /metrics`.
//! - `busiest`: a bounded top-N of channels by recent publishes (admin page only).
//! - `admin`: the dashboard at `/admin` and the JSON it polls.
//! - `logging`: text or JSON log lines, and error cause chains for log fields.

mod admin;
mod auth;
mod busiest;
mod channels;
mod cluster;
mod config;
mod conn;
mod connections;
mod cursor;
mod error;
mod health;
mod hooks;
mod limits;
mod logging;
mod middleware;
mod objects;
mod publish;
mod publisher;
mod routes;
mod scrape;
mod server;
mod sse;
mod state;
mod telemetry;
mod ws;

pub use auth::{Auth, Grants, Principal};
pub use cluster::ClusterNode;
pub use config::{
    AdminSettings, ApiKeySettings, AuthSettings, ByteSize, ChannelsSettings, ClusterSettings,
    CorsSettings, HookSettings, LimitsSettings, LogSettings, PrefixSettings, Settings, SseSettings,
    StorageSettings, WebSocketSettings,
};
pub use conn::{Stopping, shutdown_signal};
pub use connections::ConnectionTable;
pub use error::ApiError;
pub use limits::Limits;
pub use logging::{Chain, LogFormat, error_chain, init_logging};
pub use objects::SUBJECT_HEADER;
pub use publish::{Planned, parse_batch};
pub use publisher::{Publisher, Reply};
pub use server::Dormouse;
pub use state::AppState;
pub use telemetry::Telemetry;
pub use ws::{ClientMessage, parse_client_message};
