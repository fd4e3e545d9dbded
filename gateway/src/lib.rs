//! The front door: configuration, the HTTP server and the `dormouse` binary's plumbing.
//!
//! # Layout
//! - `config`: [`Config`], what the operator can set (flags and `DORMOUSE_*` variables).
//! - `error`: [`ApiError`], the one type every failure becomes on the wire:
//!   `{"error": {"code", "message"}}` with its HTTP status.
//! - `server`: [`app`] builds the router (tests use the same one) and [`serve`] runs it on an
//!   already-bound listener until a shutdown future resolves.
//! - `health`: liveness and readiness probes.

mod config;
mod error;
mod health;
mod server;

pub use config::Config;
pub use error::ApiError;
pub use server::{AppState, app, serve};
