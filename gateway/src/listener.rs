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

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::telemetry::Telemetry;

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// How much it reads at most while lingering.
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// The switch that ends every connection's IO at the end of a shutdown's grace period.
#[derive(Debug, Clone, Default)]
pub(crate) struct KillSwitch {
    /// What every read and write checks first: a plain atomic load, where the token's own
    /// `is_cancelled` takes a mutex that all connections share (measured at 2.4 % of the
    /// server's CPU under fan-out).
    flipped: Arc<AtomicBool>,
    /// Wakes IO that is blocked when the switch flips.
    token: CancellationToken,
}

impl KillSwitch {
    /// Fails every connection's pending and future IO.
    pub(crate) fn flip(&self) {
        self.flipped.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn is_flipped(&self) -> bool {
        self.flipped.load(Ordering::Acquire)
    }
}

/// Accepts connections whose IO obeys `kill`, within the connection limits.
#[derive(Debug)]
pub(crate) struct GuardedListener {
    inner: TcpListener,
    kill: KillSwitch,
    write_timeout: Duration,
    connections: Arc<Connections>,
    /// Counts bytes, refusals and write timeouts.
    telemetry: Arc<Telemetry>,
}

impl GuardedListener {
    pub(crate) fn new(
        inner: TcpListener,
        kill: KillSwitch,
        write_timeout: Duration,
        connections: Arc<Connections>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            inner,
            kill,
            write_timeout,
            connections,
            telemetry,
        }
    }
}

/// Open connections, in total and per client address, against their limits (0: none).
#[derive(Debug)]
pub(crate) struct Connections {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Connections {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            open: Mutex::default(),
        }
    }

    /// A slot for a new connection from `ip`, or why there is none.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        if self.max_total > 0 && *total >= self.max_total {
            return Err("the server has reached its connection limit (limits.max_connections)");
        }
        let mine = per_ip.entry(ip).or_default();
        if self.max_per_ip > 0 && *mine >= self.max_per_ip {
            return Err("too many connections from your address (limits.max_connections_per_ip)");
        }
        *mine += 1;
        *total += 1;
        Ok(Slot {
            connections: Arc::clone(self),
            ip,
        })
    }
}

/// One admitted connection; gives its place back when the connection is dropped.
#[derive(Debug)]
struct Slot {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(mine) = per_ip.get_mut(&self.ip) {
            *mine -= 1;
            if *mine == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over a limit with a 503 and closes it: the client learns why and
/// when to retry instead of seeing a reset. The request head is read first (briefly, and
/// bounded), because an HTTP client treats an answer that comes before its request as an
/// error rather than as the answer.
async fn refuse(mut stream: TcpStream, why: &'static str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = format!(r#"{{"error":{{"code":"too_many_connections","message":"{why}"}}}}"#);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {REFUSED_RETRY_AFTER_SECS}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut head = Vec::with_capacity(1024);
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut scratch).await {
                Ok(n) if n > 0 => head.extend_from_slice(&scratch[..n]),
                _ => break,
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        // Drain what the client still sends so it reads the answer, not a reset.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    })
    .await;
}

/// The `Retry-After` of a refused connection.
const REFUSED_RETRY_AFTER_SECS: u64 = 5;

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.connections.admit(addr.ip()) {
                    Ok(slot) => {
                        // Nagle's algorithm holds a small write back while an earlier one
                        // is unacknowledged. A channel's frames are small and each is
                        // written as soon as it is released, so with it on, a message
                        // waits for the client's (possibly delayed) acknowledgement of the
                        // one before: a round trip or up to 200 ms of latency on a stream
                        // of tokens. Redis, nginx, Go's net package and Node's `ws` turn it
                        // off for the same reason. A failure only costs latency.
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(peer = %addr, error = %e, "TCP_NODELAY not set");
                        }
                        let mut io = GuardedStream::new(
                            stream,
                            self.kill.clone(),
                            self.write_timeout,
                            self.telemetry.clone(),
                        );
                        io.slot = Some(slot);
                        return (io, addr);
                    }
                    Err(why) => {
                        tracing::debug!(peer = %addr, why, "connection refused");
                        self.telemetry.rejected("too_many_connections");
                        tokio::spawn(refuse(stream, why));
                    }
                },
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Usually out of file descriptors: wait for some to close.
                    tracing::error!(error = %crate::logging::error_chain(&e), "accept failed; retrying in 1 s");
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
///
/// The stream is shared (`Arc`) so that a WebSocket's fan-out can write to the same socket
/// from the thread that released the messages (`direct.rs`); all IO here goes through
/// readiness plus `try_*` calls, which work on a shared stream.
pub(crate) struct GuardedStream {
    inner: Arc<TcpStream>,
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
    slot: Option<Slot>,
    telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("peer", &self.inner.peer_addr().ok())
            .finish()
    }
}

impl GuardedStream {
    fn new(
        inner: TcpStream,
        kill: KillSwitch,
        write_timeout: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            telemetry,
            inner: Arc::new(inner),
            killed: Box::pin(kill.token.clone().cancelled_owned()),
            kill_waker: None,
            kill,
            linger: None,
            drained: 0,
            write_timeout,
            stall_timer: None,
            stalled: false,
            slot: None,
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

    /// As [`GuardedStream::peek`], without waiting: for a reader that must decide in a poll.
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

/// The stream, shared with whoever writes to it directly (see the type's doc).
impl GuardedStream {
    pub(crate) fn shared(&self) -> Arc<TcpStream> {
        Arc::clone(&self.inner)
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

impl AsyncRead for GuardedStream {
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

impl AsyncWrite for GuardedStream {
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
            socket2::SockRef::from(&*this.inner).shutdown(std::net::Shutdown::Write)?;
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

/// A connection accepted as the server accepts them (no limits), its peer address, and the
/// client's end: for tests of what runs on one.
#[cfg(test)]
pub(crate) async fn accepted_for_test() -> (GuardedStream, SocketAddr, TcpStream) {
    let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    let mut listener = GuardedListener::new(
        inner,
        KillSwitch::default(),
        Duration::from_secs(5),
        Arc::new(Connections::new(0, 0)),
        Arc::new(Telemetry::new(false)),
    );
    let client = TcpStream::connect(addr).await.unwrap();
    let (stream, peer) = axum::serve::Listener::accept(&mut listener).await;
    (stream, peer, client)
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
