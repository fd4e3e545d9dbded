//! WebSocket handshakes whose connection the gateway drives itself.
//!
//! axum's `WebSocket` hides the stream it wraps, and the fan-out path needs that stream: a
//! connection writes each message's frame header and its shared, already-encoded payload
//! straight to the socket in one vectored write per batch (see `ws::Conn::write_batch`),
//! where going through tungstenite's sink copied every payload into a per-connection
//! buffer, validated its UTF-8 again and took a lock shared by the two split halves. So the
//! handshake is checked by axum's own extractor (which names each failure precisely:
//! method, `Connection`, `Upgrade`, version, key) and answered here, and the upgraded
//! stream is wrapped in tokio-tungstenite directly, with the same small buffers.

use std::future::Future;

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

/// An accepted WebSocket, with the raw stream reachable through `get_mut`.
pub(crate) type WsStream = WebSocketStream<TokioIo<Upgraded>>;

/// A valid WebSocket handshake, not yet answered.
pub(crate) struct Handshake {
    on_upgrade: OnUpgrade,
    /// `Sec-WebSocket-Accept` for an HTTP/1.1 handshake; HTTP/2 (RFC 8441) has none and is
    /// answered with a plain 200.
    accept: Option<HeaderValue>,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Taken before axum's extractor moves it out: an `OnUpgrade` is a shared handle,
        // and the extractor's copy is dropped unused.
        let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
        let _checked = WebSocketUpgrade::from_request_parts(parts, state).await?;
        // The extractor refuses a request without upgrade state, so this holds whenever
        // it passed; answered the same way if it ever does not.
        let on_upgrade = on_upgrade.ok_or_else(ConnectionNotUpgradable::default)?;
        let accept = if parts.version <= Version::HTTP_11 {
            parts
                .headers
                .get(header::SEC_WEBSOCKET_KEY)
                .map(|key| derive_accept_key(key.as_bytes()))
                .and_then(|accept| HeaderValue::from_str(&accept).ok())
        } else {
            None
        };
        Ok(Self { on_upgrade, accept })
    }
}

impl Handshake {
    /// Answers the handshake and, once the client has the answer, runs `serve` on the
    /// connection in its own task. Buffers: `read_buffer` is allocated for every
    /// connection (it grows only while a larger frame is read); `max_message` bounds what
    /// a client may send in one message.
    pub(crate) fn accept<F, Fut>(self, max_message: usize, serve: F) -> Response
    where
        F: FnOnce(WsStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(8 * 1024)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %crate::logging::error_chain(&e), "websocket upgrade failed");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            serve(ws).await;
        });
        let mut response = Response::new(Body::empty());
        if let Some(accept) = self.accept {
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}
