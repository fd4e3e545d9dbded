//! Long-lived SSE responses served outside hyper, to keep idle subscribers small.
//!
//! hyper keeps an HTTP/1 connection's read buffer and header-write buffer (8 KiB each) for
//! as long as a response is streaming, which made an idle SSE subscriber cost ~30 KB of
//! server memory (docs/BENCHMARKS.md). So each new connection's first request head is read
//! here: when it is an SSE subscription, the request still goes through the whole router
//! (limits, auth, CORS, the handler), and the response is then written straight to the
//! socket, `Connection: close`-delimited, with no buffer kept between events (the events
//! themselves are usually written by the thread that released them: see `sse.rs`). Anything else
//! (other routes, WebSocket upgrades, HTTP/2, heads we cannot parse) is handed to hyper
//! untouched: the head is only peeked at. An HTTP/1 connection is only lent to hyper
//! ([`Handover`]): an SSE subscription that follows other requests on it is served here
//! too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::either::Either;
use tower::ServiceExt;

use crate::direct::Ordered;
use crate::limits::PeerAddr;
use crate::listener::GuardedStream;
use crate::routes;
use crate::sse::{DetachedSocket, DirectBody};

/// A request head longer than this is left to hyper (which refuses it).
const MAX_HEAD: usize = 64 * 1024;

/// Headers parsed here; a request with more goes to hyper.
const MAX_HEADERS: usize = 100;

/// Largest non-streaming answer (an error) written here.
const MAX_PLAIN_BODY: usize = 1 << 20;

/// What a new connection's first request head turned out to be.
pub(crate) enum First {
    /// An SSE subscription whose head is the first `head_len` bytes of the connection; to
    /// serve with [`serve_sse`] once those are read.
    Sse {
        request: Box<Request<Body>>,
        head_len: usize,
    },
    /// Anything else: serve it with hyper (nothing has been read from the connection);
    /// `h2` when the connection opens with HTTP/2's preface.
    Hyper { h2: bool },
    /// The client went away or did not send a whole head in time.
    Closed,
}

/// Looks at the first request head of a new connection without taking it off the socket
/// (`MSG_PEEK`), so a connection handed to hyper is exactly as the client sent it and needs
/// no wrapper for its whole life.
pub(crate) async fn first_request(io: &GuardedStream, head_timeout: Duration) -> First {
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
                Parsed::Sse(request, head_len) => return Ok(First::Sse { request, head_len }),
                Parsed::NotOurs => {
                    let h2 = buf[..n].starts_with(b"PRI * HTTP/2.0");
                    return Ok(First::Hyper { h2 });
                }
                Parsed::Incomplete if n == buf.len() && buf.len() < MAX_HEAD => {
                    buf.resize(buf.len() * 2, 0);
                }
                Parsed::Incomplete if n == buf.len() => return Ok(First::Hyper { h2: false }),
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
        Err(_) | Ok(Err(_)) => First::Closed,
    }
}

/// Answers an SSE subscription through the router (limits, auth, the handler) and streams
/// the response to the socket until either side ends it. `socket` is `io`'s own, for the
/// subscription to write its events to directly; `finished` runs once the exchange is over
/// (not if the task is dropped first).
///
/// Meant to be spawned as the connection's task from here on, and not an `async fn`: an idle
/// subscriber's memory is mostly this future, and an `async fn` keeps each by-value argument
/// twice (as passed, and as the local it is moved to), where an `async move` block uses what
/// it captured in place.
#[expect(
    clippy::manual_async_fn,
    reason = "an `async fn` would keep its by-value arguments twice"
)]
pub(crate) fn serve_sse<IO>(
    mut io: IO,
    socket: DetachedSocket,
    request: Box<Request<Body>>,
    head_len: usize,
    peer: SocketAddr,
    router: Router,
    finished: impl FnOnce() + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        // In a block, so that neither the head nor the request takes room in the future
        // while the response streams.
        let response = {
            // Take the head, which was only peeked at, off the socket.
            let mut head = vec![0u8; head_len];
            if io.read_exact(&mut head).await.is_err() {
                return;
            }
            drop(head);
            let mut request = *request;
            request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
            request.extensions_mut().insert(socket);
            match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        };
        if let Err(e) = respond(&mut io, response).await {
            tracing::trace!(error = %e, "sse connection ended");
        }
        let _ = io.shutdown().await;
        finished();
    }
}

/// An HTTP/1 connection lent to hyper, which gives it back when the client's next request,
/// made with nothing else in flight, is an SSE subscription: the subscription is then served
/// as if it had opened the connection ([`first_request`], [`serve_sse`]), where hyper would
/// keep its read and write buffers for the stream's whole life (~22 KB against ~2.6 KB per
/// idle subscriber). Browsers reuse pooled keep-alive connections for `EventSource`s, and
/// proxies with upstream keep-alive do too.
///
/// Whenever hyper reads while no request is in flight, the bytes waiting are looked at
/// (`MSG_PEEK`); if they are a whole SSE subscription head, the read is answered with the
/// end of the stream and nothing is taken off the socket. hyper then ends the connection
/// without shutting the socket down (see `poll_shutdown`), and the caller takes the stream
/// back from hyper's parts.
pub(crate) struct Handover {
    io: GuardedStream,
    lent: Arc<Lent>,
}

impl Handover {
    pub(crate) fn new(io: GuardedStream) -> Self {
        Self {
            io,
            lent: Arc::default(),
        }
    }

    /// What the service tells the stream about requests in flight.
    pub(crate) fn lent(&self) -> Arc<Lent> {
        Arc::clone(&self.lent)
    }

    /// The stream, once hyper is done with it.
    pub(crate) fn into_inner(self) -> GuardedStream {
        self.io
    }
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("lent", &self.lent)
            .finish()
    }
}

/// What the service and the stream share about one lent connection.
#[derive(Debug, Default)]
pub(crate) struct Lent {
    /// Requests whose response hyper has not finished with (it drops the body when done).
    in_flight: AtomicUsize,
    /// hyper keeps the connection: a request asked to switch protocols (a WebSocket),
    /// whether or not it did. hyper holds on to a requested upgrade and, when the connection
    /// ends, hands the socket to it rather than back, so such a connection is never taken.
    kept: AtomicBool,
    /// The next request is an SSE subscription, to be served outside hyper.
    taken: AtomicBool,
}

impl Lent {
    /// A request entered the service.
    pub(crate) fn began<B>(&self, request: &Request<B>) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if request.headers().contains_key(header::UPGRADE) {
            self.kept.store(true, Ordering::Release);
        }
    }

    /// The response to a request that [`Lent::began`]: the request counts as in flight
    /// until hyper drops the response's body.
    pub(crate) fn answered(self: &Arc<Self>, response: Response<Body>) -> Response<Body> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            self.kept.store(true, Ordering::Release);
        }
        let in_flight = InFlight(Arc::clone(self));
        response.map(|body| {
            Body::new(Counted {
                body,
                _in_flight: in_flight,
            })
        })
    }

    /// Whether hyper was told the connection ended because an SSE subscription came.
    pub(crate) fn taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    fn may_take(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && !self.kept.load(Ordering::Acquire)
    }
}

/// Counts a request as in flight while it lives.
struct InFlight(Arc<Lent>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] until hyper drops it.
struct Counted {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Largest head looked at on a lent connection; a longer one stays with hyper.
const LENT_HEAD: usize = 4096;

impl AsyncRead for Handover {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.lent.taken() {
            return Poll::Ready(Ok(()));
        }
        if this.lent.may_take() {
            let mut head = [0u8; LENT_HEAD];
            let mut peeked = ReadBuf::new(&mut head);
            if let Poll::Ready(Ok(_)) = this.io.poll_peek(cx, &mut peeked)
                && is_sse_head(peeked.filled())
            {
                this.lent.taken.store(true, Ordering::Release);
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Handover {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// Left open when the connection was taken back: the subscription answers on it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.lent.taken() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Whether `bytes` are a whole SSE subscription head, checked cheaply first: this runs at
/// the start of every request on a lent connection.
fn is_sse_head(bytes: &[u8]) -> bool {
    let Some(target) = bytes
        .strip_prefix(b"GET ")
        .and_then(|rest| rest.split(|&b| b == b' ').next())
    else {
        return false;
    };
    std::str::from_utf8(target).is_ok_and(is_sse_path) && matches!(parse(bytes), Parsed::Sse(..))
}

enum Parsed {
    Incomplete,
    NotOurs,
    /// The request and the length of its head.
    Sse(Box<Request<Body>>, usize),
}

/// Whether `buf` starts with a complete head of an SSE subscription (`GET` of
/// `/v1/channels/{channel}/events` or `/sub`, HTTP/1.x, no upgrade).
fn parse(buf: &[u8]) -> Parsed {
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

/// Writes `response`: an event stream chunk by chunk as it comes, anything else whole.
///
/// The future takes only what it needs from the response: it lives as long as the
/// subscriber, and a future keeps whatever it captured (or holds across an await) for its
/// whole life. The head's parts stay out of it, and the rare plain answer (an error) is
/// boxed, so an idle stream's state is small.
fn respond<'a, IO>(
    io: &'a mut IO,
    response: Response<Body>,
) -> impl Future<Output = io::Result<()>> + Send + 'a
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    let (parts, mut body) = response.into_parts();
    let streaming = parts.status.is_success()
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let answer = if streaming {
        Answer::Stream {
            head: head(&parts, None),
            direct: parts
                .extensions
                .get::<DirectBody>()
                .map(|DirectBody(direct)| Arc::clone(direct)),
        }
    } else {
        Answer::Plain(Box::new(parts))
    };
    async move {
        let (head, direct) = match answer {
            Answer::Plain(parts) => return Box::pin(write_plain(io, parts, body)).await,
            Answer::Stream { head, direct } => (head, direct),
        };
        io.write_all(&head).await?;
        // Not kept for the stream's life.
        drop(head);
        io.flush().await?;
        let (mut reader, writer) = tokio::io::split(io);
        // With direct writes, every write of the body takes the subscription's lock and
        // sends what a direct write left pending first; an empty chunk asks for just that
        // flush.
        let mut writer = match direct {
            Some(direct) => Either::Left(Ordered::new(writer, direct)),
            None => Either::Right(writer),
        };
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let Some(frame) = frame else { break };
                    let Ok(data) = frame.map_err(io::Error::other)?.into_data() else {
                        continue;
                    };
                    writer.write_all(&data).await?;
                    writer.flush().await?;
                }
                // A client of an event stream sends nothing more; reading only notices it
                // left (or sent something else, which ends the stream too).
                read = reader.read(&mut probe) => {
                    let _ = read?;
                    break;
                }
            }
        }
        Ok(())
    }
}

/// What [`respond`] writes, decided before its future is made.
enum Answer {
    /// An event stream: its head, and the subscription's writer when it writes directly.
    Stream {
        head: Vec<u8>,
        direct: Option<Arc<crate::direct::Direct>>,
    },
    /// Anything else, written whole once its body is read.
    Plain(Box<http::response::Parts>),
}

/// Writes a whole (non-streaming) answer, `Content-Length`-delimited.
async fn write_plain<IO>(
    io: &mut IO,
    parts: Box<http::response::Parts>,
    body: Body,
) -> io::Result<()>
where
    IO: AsyncWrite + Unpin,
{
    let body = http_body_util::Limited::new(body, MAX_PLAIN_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    io.write_all(&head(&parts, Some(body.len()))).await?;
    io.write_all(&body).await?;
    io.flush().await
}

/// The status line and headers, always with `Connection: close`; `Content-Length` when the
/// body is known, otherwise the body ends when the connection does.
fn head(parts: &http::response::Parts, content_length: Option<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONNECTION
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(len) = content_length {
        out.extend_from_slice(format!("content-length: {len}\r\n").as_bytes());
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle SSE subscriber costs mostly this future (docs/BENCHMARKS.md: ~2.6 KB per
    /// connection in all); it was 2,368 bytes while it shared its task with hyper's
    /// connection, and 1,264 while the head's parts and the request stayed in it.
    #[tokio::test]
    async fn a_subscription_future_stays_small() {
        let (io, peer, _client) = crate::listener::accepted_for_test().await;
        let head = "GET /v1/channels/news/events HTTP/1.1\r\n\r\n";
        let Parsed::Sse(request, head_len) = parse(head.as_bytes()) else {
            panic!("an SSE subscription");
        };
        let socket = DetachedSocket(io.shared());
        // The server's `finished` holds the connection's telemetry and a task token: as
        // many bytes, one of them a pointer.
        let held = ([0u64; 7], Arc::new(()));
        let serving = serve_sse(
            io,
            socket,
            request,
            head_len,
            peer,
            Router::new(),
            move || drop(held),
        );
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 1024, "the future takes {size} bytes");
    }

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
