//! Telling an SSE subscription from everything else by a connection's first request head,
//! read with `MSG_PEEK`, so a connection handed to hyper is exactly as the client sent it.
//!
//! hyper keeps an HTTP/1 connection's read buffer and header-write buffer (8 KiB each) for
//! as long as a response is streaming, which made an idle SSE subscriber cost ~30 KB of
//! server memory (docs/BENCHMARKS.md). So an SSE subscription is served outside hyper
//! ([`super::raw_sse`]); anything else (other routes, WebSocket upgrades, HTTP/2, heads we
//! cannot parse) goes to hyper untouched. The routes recognised are the router's own
//! constants ([`crate::routes::SSE_SUBSCRIPTIONS`]), matched as the router matches them.

use std::io;
use std::sync::LazyLock;
use std::time::Duration;

use axum::body::Body;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Version};

use super::tcp::ConnStream;
use crate::routes;

/// A request head longer than this is left to hyper (which refuses it).
const MAX_HEAD: usize = 64 * 1024;

/// Headers parsed here; a request with more goes to hyper.
const MAX_HEADERS: usize = 100;

/// What a new connection's first request head turned out to be.
pub(crate) enum FirstRequest {
    /// An SSE subscription whose head is the first `head_len` bytes of the connection; to
    /// serve with [`super::raw_sse::serve_raw_sse`] once those are read.
    Sse {
        request: Box<Request<Body>>,
        head_len: usize,
    },
    /// Anything else: serve it with hyper (nothing has been read from the connection);
    /// `http2` when the connection opens with HTTP/2's preface.
    Hyper { http2: bool },
    /// The client went away or did not send a whole head in time.
    Closed,
}

/// Looks at the first request head of a new connection without taking it off the socket
/// (`MSG_PEEK`), so a connection handed to hyper is exactly as the client sent it and needs
/// no wrapper for its whole life.
pub(crate) async fn peek_first_request(io: &ConnStream, head_timeout: Duration) -> FirstRequest {
    let decided = tokio::time::timeout(head_timeout, async {
        let mut buf = vec![0u8; 4096];
        let mut seen = 0;
        let mut pause = Duration::from_millis(5);
        loop {
            let n = io.peek(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            match parse(&buf[..n]) {
                Parsed::Sse(request, head_len) => {
                    return Ok(FirstRequest::Sse { request, head_len });
                }
                Parsed::NotOurs => {
                    let http2 = buf[..n].starts_with(b"PRI * HTTP/2.0");
                    return Ok(FirstRequest::Hyper { http2 });
                }
                Parsed::Incomplete if n == buf.len() && buf.len() < MAX_HEAD => {
                    buf.resize(buf.len() * 2, 0);
                }
                Parsed::Incomplete if n == buf.len() => {
                    return Ok(FirstRequest::Hyper { http2: false });
                }
                Parsed::Incomplete => {
                    // A head arriving in pieces (a large head, a slow or hostile client).
                    // Peeking again returns at once with the same bytes, so wait first, a
                    // little longer each time: a slow-loris client costs a few dozen
                    // wake-ups before the head timeout, not one every few milliseconds.
                    if n == seen {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                }
            }
            seen = n;
        }
    })
    .await;
    match decided {
        Ok(Ok(first)) => first,
        // Like hyper's header-read timeout: the connection is just closed.
        Err(_) | Ok(Err(_)) => FirstRequest::Closed,
    }
}

/// Whether `bytes` are a whole SSE subscription head, checked cheaply first: this runs at
/// the start of every request on a lent connection.
pub(super) fn is_sse_head(bytes: &[u8]) -> bool {
    let Some(target) = bytes
        .strip_prefix(b"GET ")
        .and_then(|rest| rest.split(|&b| b == b' ').next())
    else {
        return false;
    };
    std::str::from_utf8(target).is_ok_and(is_sse_path) && matches!(parse(bytes), Parsed::Sse(..))
}

pub(super) enum Parsed {
    Incomplete,
    NotOurs,
    /// The request and the length of its head.
    Sse(Box<Request<Body>>, usize),
}

/// Whether `buf` starts with a complete head of an SSE subscription (`GET` of
/// `/v1/channels/{channel}/events` or `/sub`, HTTP/1.x, no upgrade).
pub(super) fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let head_len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(_) => return Parsed::NotOurs,
    };
    let (Some("GET"), Some(path), Some(minor)) = (head.method, head.path, head.version) else {
        return Parsed::NotOurs;
    };
    if !is_sse_path(path)
        || head
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
    {
        return Parsed::NotOurs;
    }
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            // Let hyper answer what it makes of it.
            return Parsed::NotOurs;
        };
        builder = builder.header(name, value);
    }
    match builder.body(Body::empty()) {
        Ok(request) => Parsed::Sse(Box::new(request), head_len),
        Err(_) => Parsed::NotOurs,
    }
}

/// Whether the request target names an SSE subscription route: matched as the router
/// matches (the same matcher, on the path without the query), against the router's own
/// constants.
fn is_sse_path(target: &str) -> bool {
    static SSE_ROUTES: LazyLock<matchit::Router<()>> = LazyLock::new(|| {
        let mut routes = matchit::Router::new();
        for route in routes::SSE_SUBSCRIPTIONS {
            // The constants are the router's own patterns, which axum accepted already.
            let _ = routes.insert(route, ());
        }
        routes
    });
    let path = target.split('?').next().unwrap_or_default();
    SSE_ROUTES.at(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sse_subscriptions_are_taken() {
        let sse =
            |head: &str| matches!(parse(head.as_bytes()), Parsed::Sse(_, len) if len == head.len());
        assert!(sse(
            "GET /v1/channels/news/events HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(sse(
            "GET /v1/channels/news/events?last_event_id=1-2 HTTP/1.1\r\n\r\n"
        ));
        assert!(sse("GET /v1/events?channel=a&channel=b HTTP/1.1\r\n\r\n"));
        assert!(sse("GET /sub?channel=news HTTP/1.0\r\n\r\n"));
        // Taken as the router takes it; the handler refuses the empty name.
        assert!(sse("GET /v1/channels//events HTTP/1.1\r\n\r\n"));
        for other in [
            "POST /v1/channels/news/events HTTP/1.1\r\n\r\n",
            "GET /v1/channels/news/ws HTTP/1.1\r\n\r\n",
            "GET /v1/channels/news/events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /v1/channels/a/b/events HTTP/1.1\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                matches!(parse(other.as_bytes()), Parsed::NotOurs),
                "{other}"
            );
        }
        assert!(matches!(
            parse(b"GET /v1/channels/news/events HTTP/1.1\r\nHost"),
            Parsed::Incomplete
        ));
    }
}
