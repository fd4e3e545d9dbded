//! Turning queued messages into bytes: a WebSocket data frame's header before each payload,
//! or an SSE event's own bytes; gathered into one vectored write ([`FrameBatch`]).

use std::io::{self, IoSlice};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use dormouse_runtime::Outbound;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::telemetry::{ConnKind, Telemetry};

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
    pub(crate) fn kind(self) -> ConnKind {
        match self {
            Framing::WebSocket { .. } => ConnKind::Ws,
            Framing::EventStream => ConnKind::Sse,
        }
    }
}

/// Where an event stream of several channels is in each: the id of the last event of each
/// it wrote (or, before any, where its subscription started), in the order the client named
/// them. Written before every event as its `id:`, `{position},{position},...`, a position
/// empty while a channel had no event; EventSource sends the last one back as
/// `Last-Event-ID`, which resumes every channel exactly. Kept where the stream's events are
/// written: by its writer under the connection's lock, or by its task.
#[derive(Debug)]
pub(crate) struct StreamCursor {
    channels: Vec<String>,
    /// Empty for a channel with no position yet; rewritten in place (no allocation once a
    /// channel's ids stop growing).
    positions: Vec<String>,
}

impl StreamCursor {
    pub(crate) fn new(channels: Vec<String>, positions: Vec<Option<String>>) -> Self {
        Self {
            channels,
            positions: positions
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect(),
        }
    }

    /// The cursor now, as an `id:` line carries it; `None` while no channel has a position
    /// (the stream then starts live everywhere, which a reconnect without a cursor repeats).
    pub(crate) fn current(&self) -> Option<String> {
        self.positions
            .iter()
            .any(|p| !p.is_empty())
            .then(|| self.positions.join(","))
    }

    /// Appends to `lines` the `id:` line to write instead of `frame`'s tag line when it is
    /// an event of one of the channels, the cursor moved past it, and answers the tag line's
    /// length (what of `frame` not to write); `None`, appending nothing, for anything else (a
    /// gap, a message to this connection alone), which does not move it. A batch's lines
    /// share one buffer: one allocation per write, not per event.
    pub(crate) fn write_id_line(&mut self, frame: &[u8], lines: &mut BytesMut) -> Option<usize> {
        let (channel, id, tag) = dormouse_client::sse::channel_tag(frame)?;
        let at = self.channels.iter().position(|c| c == channel)?;
        let position = &mut self.positions[at];
        position.clear();
        position.push_str(id);
        lines.extend_from_slice(b"id: ");
        for (i, position) in self.positions.iter().enumerate() {
            if i > 0 {
                lines.extend_from_slice(b",");
            }
            lines.extend_from_slice(position.as_bytes());
        }
        lines.extend_from_slice(b"\n");
        Some(tag)
    }

    /// About how long an `id:` line is now, to size a batch's buffer.
    fn line_estimate(&self) -> usize {
        5 + self
            .positions
            .iter()
            .map(|p| p.len().max(16) + 1)
            .sum::<usize>()
    }

    /// One frame as the stream writes it: its `id:` line, then the frame without its tag
    /// (the task's path, a frame at a time).
    pub(crate) fn stamp(&mut self, frame: Bytes) -> Bytes {
        let mut out = BytesMut::new();
        match self.write_id_line(&frame, &mut out) {
            Some(tag) => {
                out.extend_from_slice(&frame[tag..]);
                out.freeze()
            }
            None => frame,
        }
    }
}

/// What one batch of queued messages came to: what was framed, their stamps, a close
/// queued after them, and (once written) whether the socket failed.
#[derive(Debug, Default)]
pub(crate) struct Drained {
    /// Messages whose frames are on the wire or in `pending`.
    pub(crate) messages: u64,
    /// Their stamps, for the delivery latency.
    pub(crate) stamps: Vec<Instant>,
    /// A close that was queued after them, for the task to send.
    pub(crate) close: Option<(u16, String)>,
    /// The socket failed.
    pub(crate) failed: bool,
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
pub(crate) struct FrameBatch {
    headers: Vec<([u8; 10], u8)>,
    payloads: Vec<Bytes>,
    bytes: usize,
}

impl FrameBatch {
    /// A batch stops growing here: one write of at most this many bytes or frames (each
    /// frame is two slices, and a vectored write takes at most 1,024).
    pub(crate) const MAX_BYTES: usize = 256 * 1024;
    pub(crate) const MAX_FRAMES: usize = 256;

    /// Frames for `taken`, up to a close, and what they amount to (`failed` unset). An
    /// event stream of several channels writes its `cursor` before each event.
    pub(crate) fn gather(
        taken: Vec<(Outbound, Option<Instant>)>,
        framing: Framing,
        mut cursor: Option<&mut StreamCursor>,
    ) -> (Self, Drained) {
        let mut written = Drained {
            stamps: Vec::with_capacity(taken.len()),
            ..Drained::default()
        };
        let mut frames = FrameBatch::with_capacity(taken.len());
        let mut messages: u64 = 0;
        // A stream of several channels' id lines, one buffer for the batch.
        let mut lines = match &cursor {
            Some(cursor) => BytesMut::with_capacity(taken.len() * cursor.line_estimate()),
            None => BytesMut::new(),
        };
        for (outbound, stamp) in taken {
            match (outbound, framing) {
                (Outbound::Text(bytes), Framing::EventStream) => {
                    match cursor
                        .as_mut()
                        .and_then(|c| c.write_id_line(&bytes, &mut lines))
                    {
                        Some(tag) => {
                            frames.push_raw(lines.split().freeze());
                            frames.push_raw(bytes.slice(tag..));
                        }
                        None => frames.push_raw(bytes),
                    }
                    messages += 1;
                }
                (Outbound::Binary(_), Framing::EventStream) => continue,
                (Outbound::Text(bytes), Framing::WebSocket { check_text }) => {
                    if check_text && std::str::from_utf8(&bytes).is_err() {
                        tracing::warn!("dropped an object's text message that is not UTF-8");
                        continue;
                    }
                    frames.push(Opcode::Text, bytes);
                    messages += 1;
                }
                (Outbound::Binary(bytes), Framing::WebSocket { .. }) => {
                    frames.push(Opcode::Binary, bytes);
                    messages += 1;
                }
                (Outbound::Close { code, reason }, _) => {
                    // Whatever was queued after a close is not written.
                    written.close = Some((code, reason));
                    break;
                }
            }
            written.stamps.extend(stamp);
        }
        written.messages = messages;
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
        self.push_with(ws_frame_header(opcode, payload.len()), payload);
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

    /// Writes every frame without blocking; returns the bytes the socket did not take
    /// (empty when it took everything).
    pub(super) fn try_write(&self, stream: &TcpStream, telemetry: &Telemetry) -> io::Result<Bytes> {
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
fn ws_frame_header(opcode: Opcode, len: usize) -> ([u8; 10], u8) {
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
            let (header, used) = ws_frame_header(opcode, len);
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
        let (frames, written) = FrameBatch::gather(taken, Framing::EventStream, None);
        assert_eq!(written.messages, 2);
        assert_eq!(written.stamps, [now]);
        assert_eq!(written.close, Some((1008, "slow".to_string())));
        let mut out = Vec::new();
        frames.write_to(&mut out).await.unwrap();
        assert_eq!(out, b"id: 1-1\ndata: a\n\nid: 1-2\ndata: b\n\n");
    }

    /// A stream of several channels: each event gets the cursor, moved past it, as its id;
    /// what is not a channel's event passes without moving it.
    #[tokio::test]
    async fn a_stream_of_several_channels_writes_its_cursor_before_each_event() {
        let mut cursor =
            StreamCursor::new(vec!["a".into(), "b".into()], vec![Some("1-4".into()), None]);
        let text = |s: &'static str| (Outbound::Text(Bytes::from_static(s.as_bytes())), None);
        let taken = vec![
            text(":b 2-1\nevent: message\ndata: {}\n\n"),
            text("event: dormouse.gap\ndata: {}\n\n"),
            text(":a 1-5\nevent: message\ndata: {}\n\n"),
        ];
        let (frames, written) = FrameBatch::gather(taken, Framing::EventStream, Some(&mut cursor));
        assert_eq!(written.messages, 3);
        let mut out = Vec::new();
        frames.write_to(&mut out).await.unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id: 1-4,2-1\nevent: message\ndata: {}\n\n\
             event: dormouse.gap\ndata: {}\n\n\
             id: 1-5,2-1\nevent: message\ndata: {}\n\n"
        );
    }

    /// A batch larger than one write can take arrives whole and in order through a pipe
    /// that accepts a few bytes at a time.
    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() {
        let (mut client, mut server) = tokio::io::duplex(7);
        let mut frames = FrameBatch::default();
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
}
