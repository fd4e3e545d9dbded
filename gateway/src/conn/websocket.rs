//! WebSocket handshakes answered here, so the gateway drives the upgraded connection
//! itself.
//!
//! axum's `WebSocket` hides the stream it wraps, and the fan-out path needs that stream: a
//! connection writes each message's frame header and its shared, already-encoded payload
//! straight to the socket in one vectored write per batch (see [`super::writer`]),
//! where going through tungstenite's sink copied every payload into a per-connection
//! buffer, validated its UTF-8 again and took a lock shared by the two split halves. So the
//! handshake is checked by axum's own extractor (which names each failure precisely:
//! method, `Connection`, `Upgrade`, version, key) and answered here, and the upgraded
//! stream is wrapped in tokio-tungstenite directly, with the same small buffers.

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::{ConnectionNotUpgradable, WebSocketUpgradeRejection};
use axum::response::Response;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{StatusCode, Version};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::framing::Framing;
use super::tcp::{RawSocket, SharedTcp, Writable};
use super::writer::{SerializedIo, SubscriberWriter};
use crate::telemetry::Telemetry;

/// An accepted WebSocket. Its IO is [`SerializedIo`], so that data frames written around
/// tungstenite ([`SubscriberWriter`]) never interleave with the frames tungstenite writes.
pub(crate) type WsStream = WebSocketStream<SerializedIo<TokioIo<Upgraded>>>;

/// A valid WebSocket handshake, not yet answered.
pub(crate) struct WsHandshake {
    on_upgrade: OnUpgrade,
    /// `Sec-WebSocket-Accept` for an HTTP/1.1 handshake; HTTP/2 (RFC 8441) has none and is
    /// answered with a plain 200.
    accept: Option<HeaderValue>,
    /// The connection's own TCP stream, for an HTTP/1.1 upgrade on our listener: after the
    /// upgrade nothing but this WebSocket uses it. (On HTTP/2 the stream carries other
    /// requests' frames too: never written to directly.)
    stream: Option<SharedTcp>,
    /// The subprotocols the client offered (`Sec-WebSocket-Protocol`).
    offered: Option<HeaderValue>,
    /// The one chosen, answered in the handshake.
    chosen: Option<&'static str>,
}

impl<S: Send + Sync> FromRequestParts<S> for WsHandshake {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Taken before axum's extractor moves it out: an `OnUpgrade` is a shared handle,
        // and the extractor's copy is dropped unused.
        let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
        let _checked = WebSocketUpgrade::from_request_parts(parts, state).await?;
        // The extractor refuses a request without upgrade state, so this holds whenever
        // it passed; answered the same way if it ever does not.
        let on_upgrade = on_upgrade.ok_or_else(ConnectionNotUpgradable::default)?;
        let (accept, stream) = if parts.version <= Version::HTTP_11 {
            let accept = parts
                .headers
                .get(header::SEC_WEBSOCKET_KEY)
                .map(|key| derive_accept_key(key.as_bytes()))
                .and_then(|accept| HeaderValue::from_str(&accept).ok());
            let stream = parts
                .extensions
                .get::<RawSocket>()
                .filter(|socket| socket.writable == Writable::AfterUpgrade)
                .map(|socket| socket.tcp.clone());
            (accept, stream)
        } else {
            (None, None)
        };
        Ok(Self {
            on_upgrade,
            accept,
            stream,
            offered: parts.headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned(),
            chosen: None,
        })
    }
}

impl WsHandshake {
    /// Whether the client offered `protocol` as a subprotocol.
    pub(crate) fn offers(&self, protocol: &str) -> bool {
        self.offered
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|list| list.split(',').any(|p| p.trim() == protocol))
    }

    /// Answers with `protocol` chosen (the client must have offered it: a browser fails a
    /// handshake that names one it did not).
    pub(crate) fn choose(&mut self, protocol: &'static str) {
        if self.offers(protocol) {
            self.chosen = Some(protocol);
        }
    }

    /// Answers the handshake and, once the client has the answer, runs `serve` on the
    /// connection in its own task, with the connection's [`SubscriberWriter`] (enabled when the
    /// socket can be shared). Buffers: a 1 KiB read buffer is allocated for every
    /// connection (it grows only while a larger frame is read); `max_message` bounds what
    /// a client may send in one message. `check_text`: whether the text the connection
    /// sends must be checked for UTF-8 (an object's; a channel's is its own JSON).
    pub(crate) fn accept<F, Fut>(
        self,
        max_message: usize,
        telemetry: Arc<Telemetry>,
        check_text: bool,
        serve: F,
    ) -> Response
    where
        F: FnOnce(WsStream, Arc<SubscriberWriter>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        let stream = self.stream;
        // What the task captures stays in it for the connection's whole life (a future keeps
        // its captures apart from what it later awaits), so `serve`, which holds the
        // connection's state, is boxed until called and the config is made inside.
        let serve = Box::new(serve);
        tokio::spawn(async move {
            let config = WebSocketConfig::default()
                .read_buffer_size(1024)
                .write_buffer_size(8 * 1024)
                .max_message_size(Some(max_message))
                .max_frame_size(Some(max_message));
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %crate::logging::error_chain(&e), "websocket upgrade failed");
                    return;
                }
            };
            let writer =
                SubscriberWriter::new(stream, telemetry, Framing::WebSocket { check_text });
            let io = SerializedIo::new(TokioIo::new(upgraded), Arc::clone(&writer));
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            serve(ws, writer).await;
        });
        let mut response = Response::new(Body::empty());
        if let Some(accept) = self.accept {
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(protocol) = self.chosen {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}
