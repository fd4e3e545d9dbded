//! Taking an HTTP/1 connection back from hyper when an SSE subscription follows other
//! requests on it ([`ReclaimableIo`]), so the subscription is served outside hyper too.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use http::header;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::sniff::is_sse_head;
use super::tcp::ConnStream;

/// An HTTP/1 connection lent to hyper, which gives it back when the client's next request,
/// made with nothing else in flight, is an SSE subscription: the subscription is then served
/// as if it had opened the connection ([`super::sniff`], [`super::raw_sse`]), where hyper would
/// keep its read and write buffers for the stream's whole life (~22 KB against ~2.6 KB per
/// idle subscriber). Browsers reuse pooled keep-alive connections for `EventSource`s, and
/// proxies with upstream keep-alive do too.
///
/// Whenever hyper reads while no request is in flight, the bytes waiting are looked at
/// (`MSG_PEEK`); if they are a whole SSE subscription head, the read is answered with the
/// end of the stream and nothing is taken off the socket. hyper then ends the connection
/// without shutting the socket down (see `poll_shutdown`), and the caller takes the stream
/// back from hyper's parts.
pub(crate) struct ReclaimableIo {
    io: ConnStream,
    reclaim: Arc<Reclaim>,
}

impl ReclaimableIo {
    pub(crate) fn new(io: ConnStream) -> Self {
        Self {
            io,
            reclaim: Arc::default(),
        }
    }

    /// What the service tells the stream about requests in flight.
    pub(crate) fn reclaim(&self) -> Arc<Reclaim> {
        Arc::clone(&self.reclaim)
    }

    /// The stream, once hyper is done with it.
    pub(crate) fn into_inner(self) -> ConnStream {
        self.io
    }
}

impl std::fmt::Debug for ReclaimableIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReclaimableIo")
            .field("reclaim", &self.reclaim)
            .finish()
    }
}

/// What the service and the stream share about one lent connection.
#[derive(Debug, Default)]
pub(crate) struct Reclaim {
    /// Requests whose response hyper has not finished with (it drops the body when done).
    in_flight: AtomicUsize,
    /// hyper keeps the connection: a request asked to switch protocols (a WebSocket),
    /// whether or not it did. hyper holds on to a requested upgrade and, when the connection
    /// ends, hands the socket to it rather than back, so such a connection is never taken.
    kept: AtomicBool,
    /// The next request is an SSE subscription, to be served outside hyper.
    taken: AtomicBool,
}

impl Reclaim {
    /// A request entered the service.
    pub(crate) fn began<B>(&self, request: &Request<B>) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if request.headers().contains_key(header::UPGRADE) {
            self.kept.store(true, Ordering::Release);
        }
    }

    /// The response to a request that [`Reclaim::began`]: the request counts as in flight
    /// until hyper drops the response's body.
    pub(crate) fn answered(self: &Arc<Self>, response: Response<Body>) -> Response<Body> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            self.kept.store(true, Ordering::Release);
        }
        let in_flight = InFlightGuard(Arc::clone(self));
        response.map(|body| {
            Body::new(InFlightBody {
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
struct InFlightGuard(Arc<Reclaim>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlightGuard`] until hyper drops it.
struct InFlightBody {
    body: Body,
    _in_flight: InFlightGuard,
}

impl hyper::body::Body for InFlightBody {
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

impl AsyncRead for ReclaimableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reclaim.taken() {
            return Poll::Ready(Ok(()));
        }
        if this.reclaim.may_take() {
            let mut head = [0u8; LENT_HEAD];
            let mut peeked = ReadBuf::new(&mut head);
            if let Poll::Ready(Ok(_)) = this.io.poll_peek(cx, &mut peeked)
                && is_sse_head(peeked.filled())
            {
                this.reclaim.taken.store(true, Ordering::Release);
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReclaimableIo {
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
        if this.reclaim.taken() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
