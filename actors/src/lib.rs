//! Built-in object types, written against the same public runtime API a user's objects use.
//!
//! # Layout
//! - `channel`: [`Channel`], pub/sub with a persisted replay buffer and `Last-Event-ID`
//!   resume; its wire encodings (SSE, WebSocket) live in `channel/event.rs` so both are built
//!   once per event and shared by every subscriber.

pub mod channel;

pub use channel::{Channel, ChannelEnv};
