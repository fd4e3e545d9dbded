//! Just enough RESP (the Redis protocol) for the yardstick: SUBSCRIBE and its pushed
//! messages, PUBLISH and its integer reply, PING. Written by hand, like the WebSocket and SSE
//! clients, so both servers are measured through equally thin clients.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use anyhow::Context as _;

use super::Incoming;
use super::conn::Conn;

/// A connection speaking RESP.
#[derive(Debug)]
pub(crate) struct RespConn {
    conn: Conn,
    /// Bytes of the reply handed out by the last `next`, consumed on the following call.
    pending: usize,
    /// Reused for encoding commands.
    scratch: Vec<u8>,
}

/// A parsed reply; arrays keep the positions of their first three elements, which is all
/// pub/sub needs (`message`, channel, payload).
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(Range<usize>),
    Error(Range<usize>),
    Int(i64),
    Bulk(Option<Range<usize>>),
    Array {
        len: usize,
        items: [Option<Range<usize>>; 3],
    },
}

impl RespConn {
    pub(crate) async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let conn = Conn::connect(addr, source, buffer)
            .await
            .with_context(|| format!("connecting to {addr} from {source:?}"))?;
        Ok(Self {
            conn,
            pending: 0,
            scratch: Vec::new(),
        })
    }

    /// Subscribes to `channel` and waits for the confirmation: after it, the subscription is
    /// live.
    pub(crate) async fn subscribe(&mut self, channel: &str) -> anyhow::Result<()> {
        self.command(&[b"SUBSCRIBE", channel.as_bytes()]).await?;
        let (reply, buf) = self.reply().await?;
        match reply {
            Reply::Array {
                items: [Some(kind), ..],
                ..
            } if &buf[kind.clone()] == b"subscribe" => Ok(()),
            Reply::Error(e) => {
                anyhow::bail!("SUBSCRIBE {channel}: {}", String::from_utf8_lossy(&buf[e]))
            }
            other => anyhow::bail!("SUBSCRIBE {channel}: unexpected reply {other:?}"),
        }
    }

    /// Publishes and waits for the reply: how many subscribers Redis handed the message to.
    pub(crate) async fn publish(&mut self, channel: &str, payload: &[u8]) -> anyhow::Result<i64> {
        self.command(&[b"PUBLISH", channel.as_bytes(), payload])
            .await?;
        match self.reply().await? {
            (Reply::Int(receivers), _) => Ok(receivers),
            (Reply::Error(e), buf) => {
                anyhow::bail!("PUBLISH: {}", String::from_utf8_lossy(&buf[e]))
            }
            (other, _) => anyhow::bail!("PUBLISH: unexpected reply {other:?}"),
        }
    }

    /// PING, answered with PONG once the server is up.
    pub(crate) async fn ping(&mut self) -> anyhow::Result<()> {
        self.command(&[b"PING"]).await?;
        match self.reply().await? {
            (Reply::Simple(s), buf) if &buf[s.clone()] == b"PONG" => Ok(()),
            (other, _) => anyhow::bail!("PING: unexpected reply {other:?}"),
        }
    }

    /// The next pushed pub/sub message; `None` once the server closed the connection.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Incoming<'_>>> {
        self.conn.consume(std::mem::take(&mut self.pending));
        loop {
            if let Some((used, reply)) = parse(self.conn.buffered())? {
                self.pending = used;
                let buf = self.conn.buffered();
                return Ok(Some(match reply {
                    Reply::Array {
                        len: 3,
                        items: [Some(kind), Some(_), Some(data)],
                    } if &buf[kind.clone()] == b"message" => Incoming::Message {
                        seq: None,
                        data: &buf[data],
                    },
                    _ => Incoming::Other,
                }));
            }
            if !self.conn.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn command(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        self.scratch.clear();
        self.scratch
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            self.scratch
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.scratch.extend_from_slice(arg);
            self.scratch.extend_from_slice(b"\r\n");
        }
        self.conn.write_all(&self.scratch).await?;
        Ok(())
    }

    /// The next reply, with the buffer its positions refer to.
    async fn reply(&mut self) -> anyhow::Result<(Reply, &[u8])> {
        self.conn.consume(std::mem::take(&mut self.pending));
        loop {
            if let Some((used, reply)) = parse(self.conn.buffered())? {
                self.pending = used;
                return Ok((reply, self.conn.buffered()));
            }
            anyhow::ensure!(self.conn.fill().await?, "the server closed the connection");
        }
    }
}

/// Parses one reply at the start of `buf`: its length and value, or `None` if incomplete.
fn parse(buf: &[u8]) -> anyhow::Result<Option<(usize, Reply)>> {
    let Some((first, mut at)) = line(buf, 0) else {
        return Ok(None);
    };
    let Some((&kind, rest)) = first.split_first() else {
        anyhow::bail!("empty RESP line");
    };
    let reply = match kind {
        b'+' => Reply::Simple(1..first.len()),
        b'-' => Reply::Error(1..first.len()),
        b':' => Reply::Int(int(rest)?),
        b'$' => match bulk(buf, int(rest)?, at)? {
            Some((range, next)) => {
                at = next;
                Reply::Bulk(range)
            }
            None => return Ok(None),
        },
        b'*' => {
            let len = int(rest)?.max(0) as usize;
            let mut items = [None, None, None];
            for i in 0..len {
                let Some((element, next)) = line(buf, at) else {
                    return Ok(None);
                };
                at = next;
                let item = match element.split_first() {
                    Some((b'$', n)) => match bulk(buf, int(n)?, at)? {
                        Some((range, next)) => {
                            at = next;
                            range
                        }
                        None => return Ok(None),
                    },
                    Some((b':' | b'+', _)) => Some(at - element.len() - 1..at - 2),
                    _ => anyhow::bail!("unsupported RESP array element {element:?}"),
                };
                if i < items.len() {
                    items[i] = item;
                }
            }
            Reply::Array { len, items }
        }
        other => anyhow::bail!("unknown RESP type {:?}", other as char),
    };
    Ok(Some((at, reply)))
}

/// The CRLF-terminated line at `at` (without the CRLF) and where the next one starts.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let end = at + super::find_pair(buf.get(at..)?, *b"\r\n")?;
    Some((&buf[at..end], end + 2))
}

/// A bulk string of `len` bytes at `at`: its range (`None` for the null bulk string) and
/// where what follows starts; `None` if it is not all there yet.
fn bulk(buf: &[u8], len: i64, at: usize) -> anyhow::Result<Option<(Option<Range<usize>>, usize)>> {
    if len < 0 {
        return Ok(Some((None, at)));
    }
    let end = at + len as usize;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    anyhow::ensure!(&buf[end..end + 2] == b"\r\n", "bulk string without CRLF");
    Ok(Some((Some(at..end), end + 2)))
}

fn int(digits: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad RESP integer {:?}", String::from_utf8_lossy(digits)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pubsub_replies() {
        let confirm = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        let (used, reply) = parse(confirm).unwrap().unwrap();
        assert_eq!(used, confirm.len());
        let Reply::Array { len: 3, items } = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(&confirm[items[0].clone().unwrap()], b"subscribe");
        assert_eq!(&confirm[items[2].clone().unwrap()], b"1");

        let message = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n*3";
        let (used, reply) = parse(message).unwrap().unwrap();
        assert_eq!(used, message.len() - 2);
        let Reply::Array { items, .. } = reply else {
            panic!()
        };
        assert_eq!(&message[items[2].clone().unwrap()], b"hello");

        // Incomplete at every cut.
        for cut in 0..message.len() - 2 {
            assert_eq!(parse(&message[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(parse(b":42\r\n").unwrap(), Some((5, Reply::Int(42))));
        assert_eq!(parse(b"+PONG\r\n").unwrap(), Some((7, Reply::Simple(1..5))));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((5, Reply::Bulk(None))));
        assert!(parse(b"?\r\n").is_err());
    }
}
