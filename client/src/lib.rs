//! What a client of Dormouse needs to read its protocols, kept apart from the server so a
//! client does not compile it: the Server-Sent Events parser ([`sse::Parser`]) that the
//! `dormouse tail` command, the test kit and the load harnesses read streams with, and the
//! binary WebSocket frame ([`binary::Frame`]), whose constants the server writes with.
//! A parser written here rather than taken from a crate because it must tell an event
//! without an `id:` line (a control event, which must not move a resume cursor) from one
//! that carries the last id over, as WHATWG's `lastEventId` does, and keep CR, LF and CRLF
//! line ends split across chunks right.
//!
//! Features:
//! - `http`: `http::Client` publishes, reads history and presence, and follows channels
//!   over Server-Sent Events, resuming by itself after any interruption (the `dormouse`
//!   CLI's `publish` and `tail` are built on it);
//! - `websocket` (with `http`): `Client::socket` follows channels over one WebSocket and
//!   publishes on it with acknowledgements, stored once across reconnections, replacing a
//!   provider's token in place; `Client::object` is a reconnecting WebSocket to a user
//!   object.

pub mod binary;
#[cfg(feature = "http")]
pub mod http;
pub mod sse;
