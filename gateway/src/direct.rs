//! WebSocket data frames and SSE events, and writing them from the thread that released
//! them.
//!
//! Under fan-out, a group commit's events reach a thousand subscribers' queues at once.
//! Waking a thousand connection tasks to write them costs a task wake-up, a poll of the
//! connection's sources and a hand-off between cores per subscriber, on top of the write
//! itself. So a WebSocket on a socket the gateway can share (HTTP/1.1, served by our
//! listener) registers a [`Direct`] with its socket: when the output gate's release pass
//! ends, the releasing thread takes the queued messages and writes their frames itself with
//! one non-blocking vectored write per subscriber (`DirectWrite::write_now`). It wakes the
//! connection's task only when it cannot finish: the task is writing (the lock is taken),
//! the socket is full (the unwritten rest is kept as `pending`, which goes out before
//! anything else), or a close is queued. An SSE subscription served outside hyper
//! (`detach.rs`) does the same once its response head is out: its events are already the
//! bytes of the body, so they are written as they are ([`Framing::EventStream`]).
//!
//! Ordering rests on one lock per connection, `Direct::state`: messages are taken off the
//! queue and written (or parked in `pending`) under it, by the releasing thread and by the
//! task alike, and every write tungstenite makes (pings, pongs, closes, acks) goes through
//! [`Ordered`], which takes the same lock, writes `pending` first, and parks the rest of a
//! frame the socket only partly took, so no writer can start inside another's frame.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use dormouse_runtime::{DirectWrite, Outbound, Queued};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::telemetry::{Telemetry, Wire};

/// One connection's direct-write state; see the module doc.
#[derive(Debug)]
pub(crate) struct Direct {
    state: Mutex<State>,
    telemetry: Arc<Telemetry>,
    framing: Framing,
}

/// How queued messages become bytes on the wire.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Framing {
    /// A frame header before each payload. An object's text is checked for UTF-8 (a client
    /// must fail a connection on invalid text); a channel's is JSON from its own encoder.
    WebSocket { check_text: bool },
    /// A channel's SSE encoding is the event's bytes as the body carries them; binary
    /// messages have no SSE form and are dropped, as the connection's task does.
    EventStream,
}

impl Framing {
    fn wire(self) -> Wire {
        match self {
            Framing::WebSocket { .. } => Wire::Ws,
            Framing::EventStream => Wire::Sse,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The connection's socket, shared with its IO; `None` when it cannot be shared (no
    /// direct writes then) and once the connection ended.
    stream: Option<Arc<TcpStream>>,
    /// Bytes of frames already begun on the wire that the socket has not taken yet.
    pending: Bytes,
    /// A write failed: the connection is over; the task finds out on its next turn.
    failed: bool,
}

/// What one write under the lock did.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// Messages whose frames are on the wire or in `pending`.
    pub(crate) messages: u64,
    /// Their stamps, for the delivery latency.
    pub(crate) stamps: Vec<Instant>,
    /// A close that was queued after them, for the task to send.
    pub(crate) close: Option<(u16, String)>,
    /// The socket failed.
    pub(crate) failed: bool,
}

impl Direct {
    pub(crate) fn new(
        stream: Option<Arc<TcpStream>>,
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

    /// True when the socket is shared, so messages can be written without the task.
    pub(crate) fn enabled(&self) -> bool {
        self.lock().stream.is_some()
    }

    /// True while bytes the socket did not take wait to be flushed by the task.
    pub(crate) fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// Ends direct writes and lets go of the socket (it closes once the IO is dropped too).
    pub(crate) fn detach(&self) {
        self.lock().stream = None;
    }

    /// For the connection's task: takes what is queued (a close too) and writes it as
    /// far as the socket takes it now; the rest waits in `pending`, which the task then
    /// flushes through [`Ordered`] (with the listener's write timeout). Nothing is taken
    /// while an earlier write is still pending.
    pub(crate) fn write_queued(&self, receiver: &mut dormouse_runtime::SocketReceiver) -> Written {
        let mut state = self.lock();
        if state.failed {
            return Written {
                failed: true,
                ..Written::default()
            };
        }
        if !state.pending.is_empty() {
            return Written::default();
        }
        let mut taken = Vec::new();
        receiver.try_recv_many(&mut taken, Frames::MAX_FRAMES, Frames::MAX_BYTES);
        self.write_taken(&mut state, taken)
    }

    /// Frames `taken` and writes them without blocking; what the socket does not take goes
    /// to `pending`.
    fn write_taken(&self, state: &mut State, taken: Vec<(Outbound, Option<Instant>)>) -> Written {
        let (frames, mut written) = Frames::gather(taken, self.framing);
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

impl DirectWrite for Direct {
    fn write_now(&self, queued: Queued<'_>) -> bool {
        // The task holds the lock only while it writes without blocking: never wait here.
        let Ok(mut state) = self.state.try_lock() else {
            return false;
        };
        if state.failed || !state.pending.is_empty() || state.stream.is_none() {
            return false;
        }
        loop {
            let mut taken = Vec::new();
            if queued.take(&mut taken, Frames::MAX_FRAMES, Frames::MAX_BYTES) == 0 {
                // Empty: done. A close is next: the task sends it.
                return queued.is_empty();
            }
            let written = self.write_taken(&mut state, taken);
            self.telemetry
                .delivered(self.framing.wire(), written.messages, written.stamps);
            if written.failed || !state.pending.is_empty() {
                return false;
            }
        }
    }
}

/// The connection's IO as tungstenite sees it: every write takes the connection's
/// [`Direct`] lock, sends `pending` first, and parks the rest of a partly taken write in
/// `pending` (reporting it written) so that no other writer can start inside it.
#[derive(Debug)]
pub(crate) struct Ordered<S> {
    io: S,
    direct: Arc<Direct>,
}

impl<S> Ordered<S> {
    pub(crate) fn new(io: S, direct: Arc<Direct>) -> Self {
        Self { io, direct }
    }
}

impl<S: AsyncWrite + Unpin> Ordered<S> {
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

impl<S: AsyncRead + Unpin> AsyncRead for Ordered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Ordered<S> {
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

/// A WebSocket data frame's opcode (RFC 6455, section 5.2).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Opcode {
    Text = 0x1,
    Binary = 0x2,
}

/// Server-to-client data frames for one vectored write: a header per message (made here,
/// unmasked, as a server's frames are) and the message's payload, shared, not copied.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    headers: Vec<([u8; 10], u8)>,
    payloads: Vec<Bytes>,
    bytes: usize,
}

impl Frames {
    /// A batch stops growing here: one write of at most this many bytes or frames (each
    /// frame is two slices, and a vectored write takes at most 1,024).
    pub(crate) const MAX_BYTES: usize = 256 * 1024;
    pub(crate) const MAX_FRAMES: usize = 256;

    /// Frames for `taken`, up to a close, and what they amount to (`failed` unset).
    pub(crate) fn gather(
        taken: Vec<(Outbound, Option<Instant>)>,
        framing: Framing,
    ) -> (Self, Written) {
        let mut written = Written {
            stamps: Vec::with_capacity(taken.len()),
            ..Written::default()
        };
        let mut frames = Frames::with_capacity(taken.len());
        for (outbound, stamp) in taken {
            match (outbound, framing) {
                (Outbound::Text(bytes), Framing::EventStream) => frames.push_raw(bytes),
                (Outbound::Binary(_), Framing::EventStream) => continue,
                (Outbound::Text(bytes), Framing::WebSocket { check_text }) => {
                    if check_text && std::str::from_utf8(&bytes).is_err() {
                        tracing::warn!("dropped an object's text message that is not UTF-8");
                        continue;
                    }
                    frames.push(Opcode::Text, bytes);
                }
                (Outbound::Binary(bytes), Framing::WebSocket { .. }) => {
                    frames.push(Opcode::Binary, bytes);
                }
                (Outbound::Close { code, reason }, _) => {
                    // Whatever was queued after a close is not written.
                    written.close = Some((code, reason));
                    break;
                }
            }
            written.stamps.extend(stamp);
        }
        written.messages = frames.count() as u64;
        (frames, written)
    }

    pub(crate) fn with_capacity(frames: usize) -> Self {
        Self {
            headers: Vec::with_capacity(frames),
            payloads: Vec::with_capacity(frames),
            bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, opcode: Opcode, payload: Bytes) {
        self.push_with(frame_header(opcode, payload.len()), payload);
    }

    /// A payload that is already the bytes to send (an SSE event): an empty header.
    fn push_raw(&mut self, payload: Bytes) {
        self.push_with(([0; 10], 0), payload);
    }

    fn push_with(&mut self, header: ([u8; 10], u8), payload: Bytes) {
        self.headers.push(header);
        self.bytes += payload.len();
        self.payloads.push(payload);
    }

    pub(crate) fn count(&self) -> usize {
        self.payloads.len()
    }

    /// Writes every frame without blocking; returns the bytes the socket did not take
    /// (empty when it took everything).
    fn try_write(&self, stream: &TcpStream, telemetry: &Telemetry) -> io::Result<Bytes> {
        let mut slices = self.slices();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match stream.try_write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    telemetry.sent(n);
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut unwritten = BytesMut::with_capacity(rest.iter().map(|s| s.len()).sum());
                    for slice in rest.iter() {
                        unwritten.extend_from_slice(slice);
                    }
                    return Ok(unwritten.freeze());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::new())
    }

    fn slices(&self) -> Vec<IoSlice<'_>> {
        self.headers
            .iter()
            .zip(&self.payloads)
            .flat_map(|((header, len), payload)| {
                [
                    IoSlice::new(&header[..usize::from(*len)]),
                    IoSlice::new(payload),
                ]
            })
            .filter(|slice| !slice.is_empty())
            .collect()
    }

    /// Writes every frame, waiting for the socket as needed (a connection without a shared
    /// socket).
    pub(crate) async fn write_to<W: AsyncWrite + Unpin>(&self, io: &mut W) -> std::io::Result<()> {
        if self.payloads.is_empty() {
            return Ok(());
        }
        let mut slices = self.slices();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let written = io.write_vectored(rest).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut rest, written);
        }
        io.flush().await
    }
}

/// The header of a final, unmasked data frame carrying `len` bytes, and its length.
fn frame_header(opcode: Opcode, len: usize) -> ([u8; 10], u8) {
    let mut header = [0u8; 10];
    header[0] = 0x80 | opcode as u8;
    let used = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    /// Every header length form parses back, with tungstenite's own reader, to the opcode
    /// and length it was made for.
    #[test]
    fn frame_headers_parse_back() {
        for (opcode, len) in [
            (Opcode::Text, 0),
            (Opcode::Text, 125),
            (Opcode::Binary, 126),
            (Opcode::Text, 65_535),
            (Opcode::Binary, 65_536),
            (Opcode::Text, 16 << 20),
        ] {
            let (header, used) = frame_header(opcode, len);
            let mut cursor = std::io::Cursor::new(&header[..usize::from(used)]);
            let (parsed, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(parsed.is_final);
            assert!(parsed.mask.is_none(), "a server's frames are unmasked");
            assert_eq!(parsed_len, len as u64);
            assert_eq!(cursor.position(), u64::from(used));
            let expected = match opcode {
                Opcode::Text => "TEXT",
                Opcode::Binary => "BINARY",
            };
            assert_eq!(format!("{}", parsed.opcode), expected);
        }
    }

    /// An SSE event is written as the body's bytes: no header, binary dropped, nothing
    /// after a close.
    #[tokio::test]
    async fn event_stream_frames_are_the_events_bytes() {
        let now = Instant::now();
        let taken = vec![
            (
                Outbound::Text(Bytes::from_static(b"id: 1-1\ndata: a\n\n")),
                Some(now),
            ),
            (Outbound::Binary(Bytes::from_static(b"\x00\x01")), Some(now)),
            (
                Outbound::Text(Bytes::from_static(b"id: 1-2\ndata: b\n\n")),
                None,
            ),
            (
                Outbound::Close {
                    code: 1008,
                    reason: "slow".into(),
                },
                None,
            ),
            (Outbound::Text(Bytes::from_static(b"never")), None),
        ];
        let (frames, written) = Frames::gather(taken, Framing::EventStream);
        assert_eq!(written.messages, 2);
        assert_eq!(written.stamps, [now]);
        assert_eq!(written.close, Some((1008, "slow".to_string())));
        let mut out = Vec::new();
        frames.write_to(&mut out).await.unwrap();
        assert_eq!(out, b"id: 1-1\ndata: a\n\nid: 1-2\ndata: b\n\n");
    }

    /// A batch larger than one write can take arrives whole and in order through a pipe
    /// that accepts a few bytes at a time.
    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() {
        let (mut client, mut server) = tokio::io::duplex(7);
        let mut frames = Frames::default();
        frames.push(Opcode::Text, Bytes::from_static(b"hello"));
        frames.push(Opcode::Binary, Bytes::from(vec![9u8; 300]));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
                .await
                .unwrap();
            got
        });
        frames.write_to(&mut server).await.unwrap();
        drop(server);
        let got = reader.await.unwrap();
        let mut expected = vec![0x81, 5];
        expected.extend_from_slice(b"hello");
        expected.extend_from_slice(&[0x82, 126, 1, 44]);
        expected.extend_from_slice(&[9u8; 300]);
        assert_eq!(got, expected);
    }

    /// A write the IO takes only part of is finished before anything written after it,
    /// and bytes already pending go first.
    #[tokio::test]
    async fn ordered_writes_never_interleave() {
        let (mut client, server) = tokio::io::duplex(5);
        let direct = Direct::new(
            None,
            Arc::new(Telemetry::new(false)),
            Framing::WebSocket { check_text: false },
        );
        direct.lock().pending = Bytes::from_static(b"[pending]");
        let mut io = Ordered::new(server, Arc::clone(&direct));
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
