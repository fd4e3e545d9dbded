//! A connection's TCP stream: [`ConnStream`], the IO every connection runs on, and
//! [`SharedTcp`], the same socket as a subscriber's writer holds it.
//!
//! Three things a plain `TcpStream` does not do:
//!
//! - **Forced shutdown.** A graceful stop asks every connection to finish, but a client that
//!   stopped reading leaves its connection blocked in a write that will never complete. Every
//!   connection's IO here watches the [`KillSwitch`], flipped after a grace period, that fails
//!   its pending reads and writes, so the server always stops.
//! - **Write timeout.** A client that stops reading for good would otherwise hold its
//!   connection (and its queued bytes) forever: a write that makes no progress for
//!   `write_timeout` fails, which ends the connection; the client resumes with its last id.
//! - **Lingering close.** When the server answers before reading the whole request (a 413 for
//!   an oversized body), closing at once with unread bytes makes the kernel send a reset, and
//!   the client may see "connection reset" instead of the 413. On close we shut down our
//!   sending side and read (and drop) what the client still sends, for a bounded time and
//!   amount, so the answer arrives (RFC 9112, section 9.6).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::admit::ConnPermit;
#[cfg(test)]
use super::listen::accepted_for_test;
use super::shutdown::KillSwitch;
use crate::telemetry::Telemetry;

/// The address a connection came from, put in every request it carries (as axum's
/// `ConnectInfo`), for the limits and the logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// A connection's socket, shared between its IO and a [`SubscriberWriter`] that writes
/// released messages to it from another thread. All IO on it goes through readiness and
/// `try_*` calls, which work on a shared stream.
///
/// [`SubscriberWriter`]: super::SubscriberWriter
#[derive(Debug, Clone)]
pub(crate) struct SharedTcp(Arc<TcpStream>);

impl std::ops::Deref for SharedTcp {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

/// Put into a request by the accept loop (see [`super::accept`]): the connection's socket,
/// and when the request's handler may write to it around the server's HTTP code. Never put
/// into an HTTP/2 request, whose connection carries other requests' frames.
#[derive(Debug, Clone)]
pub(crate) struct RawSocket {
    pub(crate) tcp: SharedTcp,
    pub(crate) writable: Writable,
}

/// When a handler may write to a [`RawSocket`] itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writable {
    /// After a WebSocket upgrade: nothing but the WebSocket uses the connection then.
    AfterUpgrade,
    /// Once the response head is out: an SSE subscription served outside hyper
    /// ([`super::raw_sse`]) owns the connection and writes its body straight to it.
    ResponseBody,
}
/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// How much it reads at most while lingering.
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A connection's IO: a TCP stream with a kill switch and a lingering close.
///
/// The socket is a [`SharedTcp`], so that a subscriber's writer can write to it from the
/// thread that released the messages ([`super::writer`]).
pub(crate) struct ConnStream {
    inner: SharedTcp,
    kill: KillSwitch,
    /// Polled only when the IO would block, so the hot path is one atomic load.
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `killed` was last polled with. Polling it takes a mutex every connection
    /// shares, so it is polled again only for a different waker (the IO moved to another
    /// task, as an upgraded connection does): a connection that blocks on every turn pays
    /// a pointer comparison instead.
    kill_waker: Option<Waker>,
    /// Set once our sending side is shut down: the deadline of the lingering read.
    linger: Option<Pin<Box<Sleep>>>,
    drained: usize,
    write_timeout: Duration,
    /// The stall deadline, allocated on the first blocked write and re-armed after that.
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// True while the timer runs for the current blocked write.
    stalled: bool,
    /// Its place under the connection limits, given back on drop.
    _permit: ConnPermit,
    telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for ConnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnStream")
            .field("peer", &self.inner.peer_addr().ok())
            .finish()
    }
}

impl ConnStream {
    pub(super) fn new(
        inner: TcpStream,
        permit: ConnPermit,
        kill: KillSwitch,
        write_timeout: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            telemetry,
            inner: SharedTcp(Arc::new(inner)),
            killed: Box::pin(kill.flipped()),
            kill_waker: None,
            kill,
            linger: None,
            drained: 0,
            write_timeout,
            stall_timer: None,
            stalled: false,
            _permit: permit,
        }
    }

    /// Tracks a write's progress: disarms the stall timer on progress; while blocked, fails
    /// the write once it has been stuck for `write_timeout` or the kill switch flips.
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = false;
            return poll;
        }
        if self.poll_killed(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        let timer = self
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalled {
            timer.as_mut().reset(deadline);
            self.stalled = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = false;
            self.telemetry.write_timeout();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }

    /// Copies the bytes waiting on the socket into `buf` without taking them off it, so a
    /// request head can be looked at before deciding who serves the connection.
    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.peek(buf).await
    }

    /// As [`ConnStream::peek`], without waiting: for a reader that must decide in a poll.
    pub(crate) fn poll_peek(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_peek(cx, buf)
    }

    /// The cheap check on every operation; waiting for the switch is registered only when
    /// an operation would block.
    fn is_killed(&self) -> bool {
        self.kill.is_flipped()
    }

    /// For an operation that would block: true if the switch flipped, else arranges for
    /// `cx` to be woken when it does.
    fn poll_killed(&mut self, cx: &mut Context<'_>) -> bool {
        if self.is_killed() {
            return true;
        }
        if self
            .kill_waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            // Registered with this waker already; a flip wakes it.
            return false;
        }
        self.kill_waker = Some(cx.waker().clone());
        self.killed.as_mut().poll(cx).is_ready()
    }
}

impl ConnStream {
    /// The socket, for a writer that writes to it around this IO (see the type's doc).
    pub(crate) fn shared(&self) -> SharedTcp {
        self.inner.clone()
    }
}

/// Most bytes one read takes. Reads go through a buffer on the stack because `try_read`
/// needs initialised memory: zeroing the caller's unused room first (hyper offers up to
/// hundreds of KiB of it) made those pages resident for every connection, and jemalloc
/// kept them dirty after the connection went (+15 MB of RSS in the soak's churn of
/// subscribers). Copying what was read costs less than the zeroing did.
const READ_CHUNK: usize = 16 * 1024;

/// Reads into `buf` once the socket is readable (tokio's `poll_read` does the same on an
/// owned stream, reading into uninitialised memory, which safe code cannot).
fn read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        // Made only once the socket reads as ready: most polls find it not ready.
        let mut chunk = [0u8; READ_CHUNK];
        let room = buf.remaining().min(READ_CHUNK);
        match stream.try_read(&mut chunk[..room]) {
            Ok(n) => {
                buf.put_slice(&chunk[..n]);
                return Poll::Ready(Ok(()));
            }
            // Readiness was stale; it is cleared, so the next poll waits for real.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes with `write` once the socket is writable.
fn write_with(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match write(stream) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

fn killed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "server shutting down")
}

impl AsyncRead for ConnStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        let before = buf.filled().len();
        let poll = read_into(&self.inner, cx, buf);
        if poll.is_pending() && self.poll_killed(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        if let Poll::Ready(Ok(())) = poll {
            self.telemetry.received(buf.filled().len() - before);
        }
        poll
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        let poll = write_with(&self.inner, cx, |s| s.try_write(buf));
        if let Poll::Ready(Ok(n)) = poll {
            self.telemetry.sent(n);
        }
        self.watch_write(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        let poll = write_with(&self.inner, cx, |s| s.try_write_vectored(bufs));
        if let Poll::Ready(Ok(n)) = poll {
            self.telemetry.sent(n);
        }
        self.watch_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        // Nothing is buffered here: a TCP stream's flush has nothing to do.
        let poll = Poll::Ready(Ok(()));
        self.watch_write(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        if this.linger.is_none() {
            socket2::SockRef::from(&*this.inner.0).shutdown(std::net::Shutdown::Write)?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if this.drained >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = this.linger.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match read_into(&this.inner, cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.drained += buf.filled().len();
                    this.telemetry.received(buf.filled().len());
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_small_writes_at_once() {
        let (stream, peer, client) = accepted_for_test().await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(
            stream.shared().nodelay().unwrap(),
            "Nagle's algorithm is off"
        );
    }
}
