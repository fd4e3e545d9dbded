//! An SSE subscription served outside hyper: the request still goes through the whole
//! router (limits, auth, CORS, the handler), and the response is written straight to the
//! socket, `Connection: close`-delimited, with no buffer kept between events. The events
//! themselves are usually written by the thread that released them
//! ([`SubscriberWriter`]); the body's own chunks (the opening,
//! keep-alives, the closing event) go through [`SerializedIo`], in order with them.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http::header;
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::either::Either;
use tower::ServiceExt;

use super::tcp::{PeerAddr, RawSocket};
use super::writer::{BodyWriter, SerializedIo, SubscriberWriter};

/// Largest non-streaming answer (an error) written here.
const MAX_PLAIN_BODY: usize = 1 << 20;

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
pub(crate) fn serve_raw_sse<IO>(
    mut io: IO,
    socket: RawSocket,
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
        if let Err(e) = write_response(&mut io, response).await {
            tracing::trace!(error = %e, "sse connection ended");
        }
        let _ = io.shutdown().await;
        finished();
    }
}

/// Writes `response`: an event stream chunk by chunk as it comes, anything else whole.
///
/// The future takes only what it needs from the response: it lives as long as the
/// subscriber, and a future keeps whatever it captured (or holds across an await) for its
/// whole life. The head's parts stay out of it, and the rare plain answer (an error) is
/// boxed, so an idle stream's state is small.
fn write_response<'a, IO>(
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
                .get::<BodyWriter>()
                .map(|BodyWriter(writer)| Arc::clone(writer)),
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
            Some(direct) => Either::Left(SerializedIo::new(writer, direct)),
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

/// What [`write_response`] writes, decided before its future is made.
enum Answer {
    /// An event stream: its head, and the subscription's writer when it writes directly.
    Stream {
        head: Vec<u8>,
        direct: Option<Arc<SubscriberWriter>>,
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
    use crate::conn::sniff::{Parsed, parse};

    /// An idle SSE subscriber costs mostly this future (docs/BENCHMARKS.md: ~2.6 KB per
    /// connection in all); it was 2,368 bytes while it shared its task with hyper's
    /// connection, and 1,264 while the head's parts and the request stayed in it.
    #[tokio::test]
    async fn a_subscription_future_stays_small() {
        let (io, peer, _client) = super::super::listen::accepted_for_test().await;
        let head = "GET /v1/channels/news/events HTTP/1.1\r\n\r\n";
        let Parsed::Sse(request, head_len) = parse(head.as_bytes()) else {
            panic!("an SSE subscription");
        };
        let socket = RawSocket {
            tcp: io.shared(),
            writable: super::super::Writable::ResponseBody,
        };
        // The server's `finished` holds the connection's telemetry and a task token: as
        // many bytes, one of them a pointer.
        let held = ([0u64; 7], Arc::new(()));
        let serving = serve_raw_sse(
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
}
