//! Accepting connections: [`ConnListener`] admits each within the connection limits
//! ([`ConnLimits`], total and per client address), turns it into a [`ConnStream`] that obeys
//! the kill switch, and answers one over a limit with a 503 instead of a reset.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::admit::ConnLimits;
use super::shutdown::KillSwitch;
use super::tcp::ConnStream;
use crate::telemetry::Telemetry;

/// Accepts connections whose IO obeys `kill`, within the connection limits.
#[derive(Debug)]
pub(crate) struct ConnListener {
    inner: TcpListener,
    kill: KillSwitch,
    write_timeout: Duration,
    connections: Arc<ConnLimits>,
    /// Counts bytes, refusals and write timeouts.
    telemetry: Arc<Telemetry>,
}

impl ConnListener {
    pub(crate) fn new(
        inner: TcpListener,
        kill: KillSwitch,
        write_timeout: Duration,
        connections: Arc<ConnLimits>,
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

impl axum::serve::Listener for ConnListener {
    type Io = ConnStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.connections.admit(addr.ip()) {
                    Ok(permit) => {
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
                        let io = ConnStream::new(
                            stream,
                            permit,
                            self.kill.clone(),
                            self.write_timeout,
                            self.telemetry.clone(),
                        );
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
/// A connection accepted as the server accepts them (no limits), its peer address, and the
/// client's end: for tests of what runs on one.
#[cfg(test)]
pub(crate) async fn accepted_for_test() -> (ConnStream, SocketAddr, TcpStream) {
    let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    let mut listener = ConnListener::new(
        inner,
        KillSwitch::default(),
        Duration::from_secs(5),
        Arc::new(ConnLimits::new(0, 0)),
        Arc::new(Telemetry::new(false)),
    );
    let client = TcpStream::connect(addr).await.unwrap();
    let (stream, peer) = axum::serve::Listener::accept(&mut listener).await;
    (stream, peer, client)
}
