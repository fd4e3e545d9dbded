//! Opening a WebSocket through the client's own HTTP stack: the handshake is an ordinary
//! request, so it carries the credential as a header (never in the URL, where logs keep
//! it), goes over `https` with the same TLS and proxies as every other request, and a
//! refused handshake is an ordinary error answer whose `code` says why (a browser's
//! WebSocket cannot read it).

use std::time::Duration;

use reqwest::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::{Client, Error, error_of};

pub(super) type WebSocket = WebSocketStream<reqwest::Upgraded>;

/// Bounds a handshake the server never answers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Room for the server's largest message (`limits.max_message_size` is 16 MiB by default
/// and may be raised) in one frame, with its binary header.
const MAX_MESSAGE: usize = 256 << 20;

/// Opens a WebSocket to `url` (an `http` or `https` URL of a WebSocket route), asking for
/// subprotocol `protocol` if given, with `token` as the credential.
pub(super) async fn open(
    client: &Client,
    url: Url,
    protocol: Option<&str>,
    token: Option<String>,
) -> Result<WebSocket, Error> {
    let handshake = async {
        let key = generate_key();
        let mut request = client
            .request(Method::GET, url.clone(), false)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "websocket")
            .header(SEC_WEBSOCKET_VERSION, "13")
            .header(SEC_WEBSOCKET_KEY, &key);
        if let Some(protocol) = protocol {
            request = request.header(SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        let (method, url, response) = client.execute_as(request, token).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(error_of(method, url, response).await.into());
        }
        let accepted = response
            .headers()
            .get(SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == derive_accept_key(key.as_bytes()).as_bytes());
        if !accepted {
            return Err(Error::Refused {
                code: "bad_handshake".into(),
                message: format!(
                    "{url} answered 101 without the right Sec-WebSocket-Accept: not a WebSocket server"
                ),
            });
        }
        let upgraded = response.upgrade().await.map_err(|source| Error::Http {
            what: format!("upgrading {url} to a WebSocket"),
            source,
        })?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        Ok(WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config)).await)
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(result) => result,
        Err(_) => Err(Error::Refused {
            code: "timeout".into(),
            message: format!("no answer to the WebSocket handshake within {HANDSHAKE_TIMEOUT:?}"),
        }),
    }
}

/// What a socket's task hands the app: its items, then the error it ended with, which
/// every later call answers again (an [`Error`] is not `Clone`: it may hold a
/// `reqwest::Error`).
#[derive(Debug)]
pub(super) struct Items<T> {
    receiver: mpsc::Receiver<Result<T, Error>>,
    ended: Option<Error>,
}

impl<T> Items<T> {
    pub(super) fn new(receiver: mpsc::Receiver<Result<T, Error>>) -> Self {
        Self {
            receiver,
            ended: None,
        }
    }

    pub(super) async fn next(&mut self) -> Result<T, Error> {
        if let Some(ended) = &self.ended {
            return Err(again(ended));
        }
        let error = match self.receiver.recv().await {
            Some(Ok(item)) => return Ok(item),
            Some(Err(e)) => e,
            // The task is gone without a word: only the app's close ends it so.
            None => by_the_app(),
        };
        self.ended = Some(again(&error));
        Err(error)
    }
}

/// A socket the app closed (or dropped), as what its calls answer afterwards.
pub(super) fn by_the_app() -> Error {
    Error::Closed {
        code: 1000,
        reason: "closed by the app".into(),
    }
}

/// `e` again, for another caller.
pub(super) fn again(e: &Error) -> Error {
    match e {
        Error::Closed { code, reason } => Error::Closed {
            code: *code,
            reason: reason.clone(),
        },
        Error::Refused { code, message } => Error::Refused {
            code: code.clone(),
            message: message.clone(),
        },
        other => Error::Refused {
            code: "ended".into(),
            message: other.to_string(),
        },
    }
}

/// Whether a close code ends the connection for good: a backend's decision (`1000`, the
/// code a backend's close gets by default, `3000`–`3999`, `4100`–`4999`). The server's own
/// closes (`1008` slow consumer, `1011`, `1012` restart, `4000` heartbeat, `4001` token
/// expired) and a dropped connection ask for a reconnect.
pub(super) fn is_final_close(code: u16) -> bool {
    code == 1000 || (3000..=3999).contains(&code) || (4100..=4999).contains(&code)
}

/// Seconds since the epoch at which a JWT expires (its `exp` claim), if it is a JWT that
/// says; an API key says nothing.
pub(super) fn token_expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["exp"].as_u64()
}

/// When to replace a token that expires at `exp` (seconds since the epoch): once four
/// fifths of its remaining life have passed, so a slow token endpoint still has time.
pub(super) fn refresh_in(exp: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(exp)
        .saturating_sub(now)
        .mul_f64(0.8)
        .max(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backends_close_is_final_and_the_servers_own_are_not() {
        for code in [1000, 3000, 3999, 4100, 4999] {
            assert!(is_final_close(code), "{code}");
        }
        for code in [1001, 1006, 1008, 1011, 1012, 4000, 4001, 4099] {
            assert!(!is_final_close(code), "{code}");
        }
    }

    #[test]
    fn a_jwts_expiry_is_read_and_anything_else_has_none() {
        // {"alg":"HS256"}.{"sub":"a","exp":1700000000}.sig
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIiwiZXhwIjoxNzAwMDAwMDAwfQ.c2ln";
        assert_eq!(token_expiry(token), Some(1_700_000_000));
        assert_eq!(token_expiry("dmk_an-api-key"), None);
        assert_eq!(token_expiry("a.b!.c"), None);
    }
}
