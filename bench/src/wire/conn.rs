//! A client TCP connection with its own read buffer. Protocol decoders parse frames in place
//! from the buffer, so a delivery costs one socket read shared by every frame it carried and
//! no copy.

use std::io;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest HTTP response head we accept before giving up on a server.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet consumed are `buf[start..end]`; the buffer grows only when one
    /// frame is larger than it.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Connects to `addr`, from `source` when given. Binding the source address first is what
    /// lets one client open more connections than one address has ephemeral ports.
    pub(crate) async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        buffer: usize,
    ) -> io::Result<Self> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: vec![0; buffer.max(512)],
            start: 0,
            end: 0,
        })
    }

    /// What has been read and not consumed.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks the first `n` buffered bytes as used.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads whatever the socket has after the buffered bytes; `false` at end of stream.
    pub(crate) async fn fill(&mut self) -> io::Result<bool> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads and consumes an HTTP/1.1 response head; what follows it stays buffered.
    pub(crate) async fn read_head(&mut self) -> anyhow::Result<Head> {
        loop {
            if let Some(end) = memchr::memmem::find(self.buffered(), b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buffered()[..end]).into_owned();
                self.consume(end + 4);
                return Head::parse(text);
            }
            anyhow::ensure!(
                self.buffered().len() < MAX_HEAD,
                "response head larger than {MAX_HEAD} bytes"
            );
            anyhow::ensure!(
                self.fill().await?,
                "connection closed before the response head"
            );
        }
    }
}

/// An HTTP response's status line and headers.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: u16,
    text: String,
}

impl Head {
    fn parse(text: String) -> anyhow::Result<Self> {
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP response: {:?}", first_line(&text)))?;
        Ok(Self { status, text })
    }

    /// The status line, for error messages.
    pub(crate) fn status_line(&self) -> &str {
        first_line(&self.text)
    }

    /// A header's value, by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parses_status_and_headers() {
        let head = Head::parse(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked"
                .to_string(),
        )
        .unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.status_line(), "HTTP/1.1 200 OK");
        assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        assert_eq!(head.header("Content-Type"), Some("text/event-stream"));
        assert_eq!(head.header("upgrade"), None);
        assert!(Head::parse("garbage".to_string()).is_err());
    }
}
