//! [`SubscriberWriter`]: where a subscriber's queued messages become bytes on its socket,
//! written by the thread that released them when it can, else by the connection's task.
//!
//! Under fan-out, a group commit's events reach a thousand subscribers' queues at once.
//! Waking a thousand connection tasks to write them costs a task wake-up, a poll of the
//! connection's sources and a hand-off between cores per subscriber, on top of the write
//! itself. So a connection on a socket the gateway can share (HTTP/1.1, served by our
//! listener) registers its writer with its runtime socket
//! ([`SocketReceiver::write_on_release`](dormouse_runtime::SocketReceiver::write_on_release)):
//! when the output gate's release pass ends, the releasing thread takes the queued messages
//! and writes their frames itself with one non-blocking vectored write per subscriber. It
//! wakes the connection's task only when it cannot finish: the task is writing (the lock is
//! taken), the socket is full (the unwritten rest is kept as `pending`, which goes out before
//! anything else), or a close is queued. A WebSocket writes WebSocket frames; an SSE
//! subscription served outside hyper ([`super::raw_sse`]) writes its events as they are,
//! once its response head is out ([`Framing`]).
//!
//! Ordering rests on one lock per connection, the writer's state: messages are taken off the
//! queue and written (or parked in `pending`) under it, by the releasing thread and by the
//! task alike, and every other write on the connection (tungstenite's pings, pongs, closes
//! and acks; the SSE task's keep-alives) goes through [`SerializedIo`], which takes the same
//! lock, writes `pending` first, and parks the rest of a frame the socket only partly took,
//! so no writer can start inside another's frame.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use dormouse_runtime::{Outbound, Queued, SocketReceiver, WriteOnRelease};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::{Drained, FrameBatch, Framing, StreamCursor};
use super::tcp::SharedTcp;
use crate::telemetry::Telemetry;

/// One subscriber's writer; see the module doc.
#[derive(Debug)]
pub(crate) struct SubscriberWriter {
    state: Mutex<State>,
    telemetry: Arc<Telemetry>,
    framing: Framing,
}

#[derive(Debug, Default)]
struct State {
    /// The connection's socket, shared with its IO; `None` when it cannot be shared (no
    /// direct writes then) and once the connection ended.
    stream: Option<SharedTcp>,
    /// Bytes of frames already begun on the wire that the socket has not taken yet.
    pending: Bytes,
    /// A write failed: the connection is over; the task finds out on its next turn.
    failed: bool,
    /// An event stream of several channels: its cursor, written before each event.
    cursor: Option<Box<StreamCursor>>,
}

impl SubscriberWriter {
    pub(crate) fn new(
        stream: Option<SharedTcp>,
        telemetry: Arc<Telemetry>,
        framing: Framing,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                stream,
                ..State::default()
            }),
            telemetry,
            framing,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `cursor` before each event from now on (an event stream of several channels).
    pub(crate) fn keep_cursor(&self, cursor: Box<StreamCursor>) {
        self.lock().cursor = Some(cursor);
    }

    /// True when the socket is shared, so messages can be written without the task.
    pub(crate) fn writes_directly(&self) -> bool {
        self.lock().stream.is_some()
    }

    /// True while bytes the socket did not take wait to be flushed by the task.
    pub(crate) fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// Ends direct writes and lets go of the socket (it closes once the IO is dropped too).
    pub(crate) fn release_socket(&self) {
        self.lock().stream = None;
    }

    /// For the connection's task: takes what is queued (a close too) and writes it as
    /// far as the socket takes it now; the rest waits in `pending`, which the task then
    /// flushes through [`SerializedIo`] (with the listener's write timeout). Nothing is taken
    /// while an earlier write is still pending.
    pub(crate) fn write_queued(&self, receiver: &mut SocketReceiver) -> Drained {
        let mut state = self.lock();
        if state.failed {
            return Drained {
                failed: true,
                ..Drained::default()
            };
        }
        if !state.pending.is_empty() {
            return Drained::default();
        }
        let mut taken = Vec::new();
        receiver.try_recv_many(&mut taken, FrameBatch::MAX_FRAMES, FrameBatch::MAX_BYTES);
        self.write_taken(&mut state, taken)
    }

    /// Writes `frame` now, without blocking, ahead of anything queued: a connection's first
    /// frame, sent before its writer is registered. What the socket does not take waits in
    /// `pending`, which the task flushes first. `None` when the socket is not shared (the
    /// caller writes it through its IO); `Some(false)` when the write failed. Writing it
    /// here rather than through tungstenite keeps an idle connection from holding the
    /// write buffer tungstenite would grow for it.
    pub(crate) fn write_first(&self, frame: Outbound) -> Option<bool> {
        let mut state = self.lock();
        state.stream.as_ref()?;
        let written = self.write_taken(&mut state, vec![(frame, None)]);
        Some(!written.failed)
    }

    /// For the connection's task when the socket is not shared (an HTTP/2 WebSocket, or
    /// one upgraded through another server's IO): takes what is queued (a close too) and
    /// writes it through `io`, waiting for the socket as needed.
    pub(crate) async fn write_queued_through<W: AsyncWrite + Unpin>(
        &self,
        receiver: &mut SocketReceiver,
        io: &mut W,
    ) -> Drained {
        let mut taken = Vec::new();
        receiver.try_recv_many(&mut taken, FrameBatch::MAX_FRAMES, FrameBatch::MAX_BYTES);
        // A WebSocket's path (an SSE stream's writer always shares its socket): no cursor.
        let (frames, mut drained) = FrameBatch::gather(taken, self.framing, None);
        if frames.write_to(io).await.is_err() {
            // Nothing counts as delivered from a write that failed.
            drained = Drained {
                failed: true,
                ..Drained::default()
            };
        }
        drained
    }

    /// Frames `taken` and writes them without blocking; what the socket does not take goes
    /// to `pending`.
    fn write_taken(&self, state: &mut State, taken: Vec<(Outbound, Option<Instant>)>) -> Drained {
        let (frames, mut written) =
            FrameBatch::gather(taken, self.framing, state.cursor.as_deref_mut());
        let Some(stream) = state.stream.as_ref() else {
            written.failed = true;
            return written;
        };
        match frames.try_write(stream, &self.telemetry) {
            Ok(rest) => state.pending = rest,
            Err(e) => {
                tracing::debug!(error = %e, "direct write failed");
                state.failed = true;
                written.failed = true;
            }
        }
        written
    }
}

impl WriteOnRelease for SubscriberWriter {
    fn write_released(&self, queued: Queued<'_>) -> bool {
        // The task holds the lock only while it writes without blocking: never wait here.
        let Ok(mut state) = self.state.try_lock() else {
            return false;
        };
        if state.failed || !state.pending.is_empty() || state.stream.is_none() {
            return false;
        }
        loop {
            let mut taken = Vec::new();
            if queued.take(&mut taken, FrameBatch::MAX_FRAMES, FrameBatch::MAX_BYTES) == 0 {
                // Empty: done. A close is next: the task sends it.
                return queued.is_empty();
            }
            let written = self.write_taken(&mut state, taken);
            self.telemetry
                .delivered(self.framing.kind(), written.messages, written.stamps);
            if written.failed || !state.pending.is_empty() {
                return false;
            }
        }
    }
}

/// On an SSE response whose events a [`SubscriberWriter`] writes: the raw responder
/// ([`super::raw_sse`]) writes the rest of the body through it, in order with them.
#[derive(Debug, Clone)]
pub(crate) struct BodyWriter(pub(crate) Arc<SubscriberWriter>);

/// The connection's IO as tungstenite sees it: every write takes the connection's
/// [`SubscriberWriter`] lock, sends `pending` first, and parks the rest of a partly taken write in
/// `pending` (reporting it written) so that no other writer can start inside it.
#[derive(Debug)]
pub(crate) struct SerializedIo<S> {
    io: S,
    direct: Arc<SubscriberWriter>,
}

impl<S> SerializedIo<S> {
    pub(crate) fn new(io: S, direct: Arc<SubscriberWriter>) -> Self {
        Self { io, direct }
    }
}

impl<S: AsyncWrite + Unpin> SerializedIo<S> {
    /// Writes `pending` out through the IO (so the listener's write timeout applies).
    fn poll_pending(io: &mut S, state: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !state.pending.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &state.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            state.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SerializedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SerializedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut state = this.direct.lock();
        ready!(Self::poll_pending(&mut this.io, &mut state, cx))?;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        if n < buf.len() && n > 0 {
            // Begun on the wire: the rest must follow before anyone else writes.
            state.pending = Bytes::copy_from_slice(&buf[n..]);
            return Poll::Ready(Ok(buf.len()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut state = this.direct.lock();
        ready!(Self::poll_pending(&mut this.io, &mut state, cx))?;
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if n < total && n > 0 {
            let mut rest = BytesMut::with_capacity(total - n);
            let mut skip = n;
            for buf in bufs {
                let from = skip.min(buf.len());
                skip -= from;
                rest.extend_from_slice(&buf[from..]);
            }
            state.pending = rest.freeze();
            return Poll::Ready(Ok(total));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut state = this.direct.lock();
        ready!(Self::poll_pending(&mut this.io, &mut state, cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut state = this.direct.lock();
        ready!(Self::poll_pending(&mut this.io, &mut state, cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn ordered_writes_never_interleave() {
        let (mut client, server) = tokio::io::duplex(5);
        let direct = SubscriberWriter::new(
            None,
            Arc::new(Telemetry::new(false)),
            Framing::WebSocket { check_text: false },
        );
        direct.lock().pending = Bytes::from_static(b"[pending]");
        let mut io = SerializedIo::new(server, Arc::clone(&direct));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        // Each write call reports the whole buffer written: what the pipe did not take
        // waits in `pending`, ahead of the next write.
        assert_eq!(io.write(b"first frame;").await.unwrap(), 12);
        assert_eq!(io.write(b"second frame").await.unwrap(), 12);
        io.flush().await.unwrap();
        assert!(direct.lock().pending.is_empty());
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), b"[pending]first frame;second frame");
    }
}
