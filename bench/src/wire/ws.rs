//! A minimal WebSocket subscriber: the RFC 6455 handshake, frame headers, pong replies, and
//! nothing else. The server's JSON message is not parsed: its layout is fixed
//! (`{"type":"message","channel":"..","id":"..","event":"..","data":".."}`), so the `id` and
//! `data` fields are located by position, which keeps the client far cheaper than the server
//! it measures.

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

use anyhow::Context as _;

use super::Incoming;
use super::conn::Conn;

/// Any 16 bytes in base64 will do: the server only echoes its digest.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

#[derive(Debug)]
pub(crate) struct WsClient {
    conn: Conn,
    /// Bytes of the frame handed out by the last `next`, consumed on the following call (the
    /// caller borrows them until then).
    pending: usize,
    /// A message that arrived in several frames (the server sends none, the protocol allows it).
    fragments: Vec<u8>,
    in_fragments: bool,
}

impl WsClient {
    /// Opens a WebSocket on `path`; once the server answers 101, the subscription is live.
    pub(crate) async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let mut conn = Conn::connect(addr, source, buffer)
            .await
            .with_context(|| format!("connecting to {addr} from {source:?}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).await?;
        let head = conn.read_head().await?;
        anyhow::ensure!(
            head.status == 101,
            "WebSocket upgrade of {path} refused: {}",
            head.status_line()
        );
        Ok(Self {
            conn,
            pending: 0,
            fragments: Vec::new(),
            in_fragments: false,
        })
    }

    /// Sends a text message (masked, as a client's must be; a zero mask leaves it as is).
    pub(crate) async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let len = text.len();
        let mut frame = Vec::with_capacity(len + 8);
        frame.push(0x80 | OP_TEXT);
        match u16::try_from(len) {
            Ok(short) if len < 126 => frame.push(0x80 | short as u8),
            Ok(medium) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&medium.to_be_bytes());
            }
            Err(_) => anyhow::bail!("a bench message over 64 KiB"),
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(text.as_bytes());
        self.conn.write_all(&frame).await?;
        Ok(())
    }

    /// The next message; `None` once the server closed the connection.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Incoming<'_>>> {
        self.conn.consume(std::mem::take(&mut self.pending));
        if !self.in_fragments {
            self.fragments.clear();
        }
        loop {
            let header = FrameHeader::parse(self.conn.buffered())?;
            let Some(header) =
                header.filter(|h| self.conn.buffered().len() >= h.header_len + h.payload_len)
            else {
                if !self.conn.fill().await? {
                    return Ok(None);
                }
                continue;
            };
            let total = header.header_len + header.payload_len;
            let payload = header.header_len..total;
            match header.opcode {
                OP_PING => {
                    let pong = pong(&self.conn.buffered()[payload]);
                    self.conn.consume(total);
                    self.conn.write_all(&pong).await?;
                }
                OP_PONG => self.conn.consume(total),
                OP_CLOSE => return Ok(None),
                OP_TEXT | OP_BINARY if header.fin && !self.in_fragments => {
                    self.pending = total;
                    return Ok(Some(decode(&self.conn.buffered()[payload])));
                }
                OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                    self.fragments
                        .extend_from_slice(&self.conn.buffered()[payload]);
                    self.conn.consume(total);
                    self.in_fragments = !header.fin;
                    if header.fin {
                        return Ok(Some(decode(&self.fragments)));
                    }
                }
                other => anyhow::bail!("unknown WebSocket opcode {other:#x}"),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
}

impl FrameHeader {
    /// The header at the start of `buf`, or `None` if it is not all there yet.
    fn parse(buf: &[u8]) -> anyhow::Result<Option<Self>> {
        let [b0, b1, rest @ ..] = buf else {
            return Ok(None);
        };
        anyhow::ensure!(b1 & 0x80 == 0, "the server sent a masked frame");
        let (payload_len, header_len) = match b1 & 0x7f {
            126 => match rest {
                [a, b, ..] => (u16::from_be_bytes([*a, *b]) as usize, 4),
                _ => return Ok(None),
            },
            127 => match rest.get(..8) {
                Some(len) => (
                    u64::from_be_bytes(len.try_into().expect("8 bytes")) as usize,
                    10,
                ),
                None => return Ok(None),
            },
            len => (len as usize, 2),
        };
        Ok(Some(Self {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            header_len,
            payload_len,
        }))
    }
}

/// A client pong echoing `payload`; client frames must be masked, and a zero mask is a mask.
fn pong(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.extend_from_slice(&[
        0x80 | OP_PONG,
        0x80 | payload.len().min(125) as u8,
        0,
        0,
        0,
        0,
    ]);
    frame.extend_from_slice(&payload[..payload.len().min(125)]);
    frame
}

/// Locates `id` and `data` in a server message (a message sent to this connection alone,
/// `direct`, has data and no id); anything else (gap, ack, error, binary payloads sent as
/// `data_base64`) is `Other`.
pub(super) fn decode(text: &[u8]) -> Incoming<'_> {
    const PREFIX: &[u8] = br#"{"type":"message","channel":""#;
    const ID: &[u8] = br#"","id":""#;
    const DIRECT: &[u8] = br#"{"type":"direct","#;
    const DATA: &[u8] = br#""data":""#;
    let (seq, rest) = match text.strip_prefix(PREFIX) {
        Some(rest) => {
            // Channel names need no JSON escaping: the name ends at the next quote.
            let Some(rest) =
                memchr::memchr(b'"', rest).and_then(|end| rest[end..].strip_prefix(ID))
            else {
                return Incoming::Other;
            };
            let Some(id_end) = memchr::memchr(b'"', rest) else {
                return Incoming::Other;
            };
            (super::seq_of(&rest[..id_end]), &rest[id_end..])
        }
        None if text.starts_with(DIRECT) => (None, text),
        None if text.starts_with(br#"{"type":"connected""#) => return Incoming::Connected,
        None => return Incoming::Other,
    };
    // One searcher for the process: building one per message cost ~3% of the client's CPU.
    static FIND_DATA: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(DATA));
    let Some(at) = FIND_DATA.find(rest) else {
        return Incoming::Other;
    };
    // The payloads this bench sends need no JSON escaping, so the value ends at the final `"}`.
    let data = &rest[at + DATA.len()..];
    let data = data.strip_suffix(b"\"}").unwrap_or(data);
    Incoming::Message { seq, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_of_every_length_form() {
        assert_eq!(FrameHeader::parse(&[0x81]).unwrap(), None);
        assert_eq!(
            FrameHeader::parse(&[0x81, 5, b'h']).unwrap(),
            Some(FrameHeader {
                fin: true,
                opcode: OP_TEXT,
                header_len: 2,
                payload_len: 5
            })
        );
        assert_eq!(FrameHeader::parse(&[0x81, 126, 1]).unwrap(), None);
        let h = FrameHeader::parse(&[0x01, 126, 0x04, 0x00])
            .unwrap()
            .unwrap();
        assert_eq!((h.fin, h.header_len, h.payload_len), (false, 4, 1024));
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&(1u64 << 20).to_be_bytes());
        let h = FrameHeader::parse(&long).unwrap().unwrap();
        assert_eq!(
            (h.opcode, h.header_len, h.payload_len),
            (OP_BINARY, 10, 1 << 20)
        );
        assert!(FrameHeader::parse(&[0x81, 0x85]).is_err());
    }

    #[test]
    fn decodes_messages_by_position() {
        let text =
            br#"{"type":"message","channel":"c","id":"18a3-42","event":"message","data":"0011xx"}"#;
        assert_eq!(
            decode(text),
            Incoming::Message {
                seq: Some(42),
                data: b"0011xx"
            }
        );
        let hello = br#"{"type":"connected","connection_id":"n.1.2"}"#;
        let direct = br#"{"type":"direct","event":"message","data":"0011xx"}"#;
        assert_eq!(
            decode(direct),
            Incoming::Message {
                seq: None,
                data: b"0011xx"
            }
        );
        assert_eq!(decode(hello), Incoming::Connected);
        let gap = br#"{"type":"gap","reason":"expired","message":"m"}"#;
        assert_eq!(decode(gap), Incoming::Other);
        let binary =
            br#"{"type":"message","channel":"c","id":"1-2","event":"message","data_base64":"AA=="}"#;
        assert_eq!(decode(binary), Incoming::Other);
    }

    #[test]
    fn pongs_are_masked() {
        assert_eq!(pong(b"hi"), vec![0x8A, 0x82, 0, 0, 0, 0, b'h', b'i']);
    }
}
