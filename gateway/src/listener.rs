//! The TCP listener and connection IO the server runs on. Two things axum's plain
//! `TcpListener` cannot do:
//!
//! - **Forced shutdown.** A graceful stop asks every connection to finish, but a client that
//!   stopped reading leaves its connection blocked in a write that will never complete. Every
//!   connection's IO here watches a kill switch, flipped after a grace period, that fails its
//!   pending reads and writes, so the server always stops.
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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// How much it reads at most while lingering.
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// Accepts connections whose IO obeys `kill`.
#[derive(Debug)]
pub(crate) struct GuardedListener {
    inner: TcpListener,
    kill: CancellationToken,
    write_timeout: Duration,
}

impl GuardedListener {
    pub(crate) fn new(
        inner: TcpListener,
        kill: CancellationToken,
        write_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            kill,
            write_timeout,
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    return (
                        GuardedStream::new(stream, self.kill.clone(), self.write_timeout),
                        addr,
                    );
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Usually out of file descriptors: wait for some to close.
                    tracing::error!(error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection's IO: a TCP stream with a kill switch and a lingering close.
pub(crate) struct GuardedStream {
    inner: TcpStream,
    kill: CancellationToken,
    /// Polled only when the IO would block, so the hot path is one atomic load.
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set once our sending side is shut down: the deadline of the lingering read.
    linger: Option<Pin<Box<Sleep>>>,
    drained: usize,
    write_timeout: Duration,
    /// The stall deadline, allocated on the first blocked write and re-armed after that.
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// True while the timer runs for the current blocked write.
    stalled: bool,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("peer", &self.inner.peer_addr().ok())
            .finish()
    }
}

impl GuardedStream {
    fn new(inner: TcpStream, kill: CancellationToken, write_timeout: Duration) -> Self {
        Self {
            inner,
            killed: Box::pin(kill.clone().cancelled_owned()),
            kill,
            linger: None,
            drained: 0,
            write_timeout,
            stall_timer: None,
            stalled: false,
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
        if self.killed.as_mut().poll(cx).is_ready() {
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
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )));
        }
        Poll::Pending
    }

    /// The cheap check on every operation; waiting for the switch is registered only when
    /// an operation would block.
    fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }
}

fn killed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "server shutting down")
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_pending() && self.killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(killed_error()));
        }
        poll
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
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
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Err(killed_error()));
        }
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch_write(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_killed() {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
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
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
