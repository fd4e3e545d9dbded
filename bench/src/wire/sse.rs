//! A minimal Server-Sent Events subscriber: one HTTP/1.1 GET, the chunked body decoded into a
//! byte buffer, and events split on blank lines with only `id`, `event` and `data` read.
//!
//! Not the shared parser (`dormouse_client::sse`, which the other harnesses use): thousands
//! of these run on the same two cores as the server under test, so each reads the body in
//! place, without a string per line, to leave the cores to the server it measures.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;

use super::Incoming;
use super::conn::Conn;

#[derive(Debug)]
pub(crate) struct SseClient {
    conn: Conn,
    /// The decoded body; `body[pos..]` is not yet parsed.
    body: Vec<u8>,
    pos: usize,
    chunks: Dechunk,
}

impl SseClient {
    /// Opens the event stream on `path`; once the response head arrives, the subscription is
    /// live (the server subscribes before it answers).
    pub(crate) async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let conn = Conn::connect(addr, source, buffer)
            .await
            .with_context(|| format!("connecting to {addr} from {source:?}"))?;
        Self::subscribe(conn, addr, path, buffer).await
    }

    /// As [`SseClient::connect`], on a connection that first served `GET /healthz` (kept
    /// alive), as a browser's pooled connection or a proxy's upstream one would have.
    pub(crate) async fn connect_after_request(
        addr: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let mut conn = Conn::connect(addr, source, buffer)
            .await
            .with_context(|| format!("connecting to {addr} from {source:?}"))?;
        conn.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let head = conn.read_head().await?;
        anyhow::ensure!(head.status == 200, "/healthz: {}", head.status_line());
        let length: usize = head
            .header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .context("/healthz answered without a content-length")?;
        while conn.buffered().len() < length {
            anyhow::ensure!(conn.fill().await?, "closed inside /healthz's answer");
        }
        anyhow::ensure!(
            conn.buffered().len() == length,
            "bytes after /healthz's answer"
        );
        conn.consume(length);
        Self::subscribe(conn, addr, path, buffer).await
    }

    async fn subscribe(
        mut conn: Conn,
        addr: SocketAddr,
        path: &str,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        conn.write_all(request.as_bytes()).await?;
        let head = conn.read_head().await?;
        anyhow::ensure!(
            head.status == 200,
            "event stream {path} refused: {}",
            head.status_line()
        );
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        Ok(Self {
            conn,
            body: Vec::with_capacity(buffer.min(64 * 1024)),
            pos: 0,
            chunks: Dechunk::new(chunked),
        })
    }

    /// The next event; `None` once the stream ended.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Incoming<'_>>> {
        loop {
            if self.pos == self.body.len() {
                self.body.clear();
                self.pos = 0;
            }
            if let Some(end) = super::find_pair(&self.body[self.pos..], *b"\n\n") {
                let frame = self.pos..self.pos + end + 1;
                self.pos += end + 2;
                match parse_event(&self.body[frame.clone()]) {
                    Event::Skip => continue,
                    Event::Other => return Ok(Some(Incoming::Other)),
                    Event::Connected => return Ok(Some(Incoming::Connected)),
                    Event::Message { seq, data } => {
                        let data = frame.start + data.start..frame.start + data.end;
                        return Ok(Some(Incoming::Message {
                            seq,
                            data: &self.body[data],
                        }));
                    }
                }
            }
            if self.pos > 64 * 1024 {
                self.body.drain(..self.pos);
                self.pos = 0;
            }
            // Decode what is buffered; read the socket only when that yields nothing.
            loop {
                let before = self.body.len();
                let used = self.chunks.decode(self.conn.buffered(), &mut self.body)?;
                self.conn.consume(used);
                if self.body.len() > before {
                    break;
                }
                if self.chunks.ended || !self.conn.fill().await? {
                    return Ok(None);
                }
            }
        }
    }
}

/// One event's lines, as this client cares about them.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A comment, or an event with no data: EventSource dispatches nothing.
    Skip,
    /// A control event (gap, reconnect) or a payload that is not a bench message.
    Other,
    /// The event naming the connection, first on every stream.
    Connected,
    /// A published message: its sequence number and where its data is in the frame.
    Message {
        seq: Option<u64>,
        data: std::ops::Range<usize>,
    },
}

/// Parses one event (its lines, without the blank line that ends it).
fn parse_event(frame: &[u8]) -> Event {
    let mut seq = None;
    let mut control = false;
    let mut connected = false;
    let mut data = None;
    let mut start = 0;
    while start < frame.len() {
        let end = memchr::memchr(b'\n', &frame[start..]).map_or(frame.len(), |i| start + i);
        let line = &frame[start..end];
        if let Some(value) = field(line, b"id") {
            seq = super::seq_of(value);
        } else if let Some(value) = field(line, b"event") {
            control |= value.starts_with(b"dormouse.") || value.starts_with(b"base64:");
            connected |= value == b"dormouse.connected";
        } else if let Some(value) = field(line, b"data") {
            // Bench payloads are one line; a second data line is not ours.
            control |= data.is_some();
            data = Some(end - value.len()..end);
        }
        start = end + 1;
    }
    match (data, control) {
        (Some(_), true) if connected => Event::Connected,
        (Some(data), false) => {
            let value = &frame[data.clone()];
            if !value.starts_with(br#"{"type":"message","channel":""#) {
                return Event::Message { seq, data };
            }
            // A stream of several channels: the data is the WebSocket JSON message, whose
            // own id and data count (the event's `id:` is the stream's cursor).
            match super::ws::decode(value) {
                Incoming::Message { seq, data: inner } => {
                    let start = data.start + (inner.as_ptr() as usize - value.as_ptr() as usize);
                    Event::Message {
                        seq,
                        data: start..start + inner.len(),
                    }
                }
                _ => Event::Other,
            }
        }
        (Some(_), true) => Event::Other,
        (None, _) => Event::Skip,
    }
}

/// `name: value` (one optional space after the colon), as the SSE grammar has it.
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let value = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// HTTP/1.1 chunked transfer decoding, incremental: moves body bytes from the connection's
/// buffer into a body buffer as they arrive.
#[derive(Debug)]
struct Dechunk {
    chunked: bool,
    /// Bytes of the current chunk not yet moved.
    left: usize,
    /// The CRLF after a chunk's data is still to come.
    crlf: bool,
    /// The last (empty) chunk arrived: the response is over.
    ended: bool,
}

impl Dechunk {
    fn new(chunked: bool) -> Self {
        Self {
            chunked,
            left: 0,
            crlf: false,
            ended: false,
        }
    }

    /// Appends the body bytes found in `raw` (what the connection has buffered) to `body`;
    /// returns how many bytes of `raw` it used.
    fn decode(&mut self, raw: &[u8], body: &mut Vec<u8>) -> anyhow::Result<usize> {
        if !self.chunked {
            body.extend_from_slice(raw);
            return Ok(raw.len());
        }
        let mut used = 0;
        while !self.ended && used < raw.len() {
            let rest = &raw[used..];
            if self.left > 0 {
                let n = self.left.min(rest.len());
                body.extend_from_slice(&rest[..n]);
                used += n;
                self.left -= n;
                self.crlf = self.left == 0;
            } else if self.crlf {
                if rest.len() < 2 {
                    break;
                }
                anyhow::ensure!(&rest[..2] == b"\r\n", "bad chunked encoding: no CRLF");
                used += 2;
                self.crlf = false;
            } else {
                let Some(eol) = super::find_pair(rest, *b"\r\n") else {
                    anyhow::ensure!(rest.len() < 1024, "bad chunked encoding: no size line");
                    break;
                };
                let size = rest[..eol]
                    .split(|&b| b == b';')
                    .next()
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| usize::from_str_radix(hex.trim(), 16).ok())
                    .context("bad chunked encoding: bad size line")?;
                used += eol + 2;
                self.left = size;
                self.ended = size == 0;
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_comments_and_controls() {
        let frame = b"id: ab-7\nevent: message\ndata: 00ffxx\n";
        let Event::Message { seq, data } = parse_event(frame) else {
            panic!("not a message");
        };
        assert_eq!((seq, &frame[data]), (Some(7), &b"00ffxx"[..]));
        // A stream of several channels: the cursor is the id, the JSON the event.
        let frame = br#"id: ab-9,ab-7
:c ab-7
event: message
data: {"type":"message","channel":"c","id":"ab-7","event":"message","data":"00ffxx"}
"#;
        let Event::Message { seq, data } = parse_event(frame) else {
            panic!("not a message");
        };
        assert_eq!((seq, &frame[data]), (Some(7), &b"00ffxx"[..]));
        assert_eq!(parse_event(b": connected\nretry: 2000\n"), Event::Skip);
        assert_eq!(parse_event(b": keep-alive\n"), Event::Skip);
        assert_eq!(
            parse_event(b"event: dormouse.reconnect\ndata: {}\n"),
            Event::Other
        );
        assert_eq!(
            parse_event(b"event: dormouse.connected\ndata: {}\n"),
            Event::Connected
        );
        assert_eq!(
            parse_event(b"data:x\n"),
            Event::Message {
                seq: None,
                data: 5..6
            }
        );
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        // Feed the bytes in every split, as reads may cut them anywhere.
        for cut in 0..wire.len() {
            let mut dechunk = Dechunk::new(true);
            let mut body = Vec::new();
            let mut buffered = wire[..cut].to_vec();
            let used = dechunk.decode(&buffered, &mut body).unwrap();
            buffered.drain(..used);
            buffered.extend_from_slice(&wire[cut..]);
            let used = dechunk.decode(&buffered, &mut body).unwrap();
            assert_eq!(body, b"hello, world", "cut at {cut}");
            assert!(dechunk.ended);
            assert_eq!(used, buffered.len() - 2, "the trailer CRLF is left");
        }
    }
}
