//! The connection layer: everything between a TCP socket and the router, and the write
//! path from a runtime socket's queue to the client. Handlers (`sse.rs`, `ws.rs`,
//! `objects.rs`) use it; it imports nothing from them, nor [`AppState`](crate::AppState).
//!
//! # Vocabulary, in the order a connection meets it
//! - [`listen`]: [`ConnListener`] accepts a connection within the [`ConnLimits`] ([`admit`];
//!   over them it answers 503), as a [`ConnStream`](tcp::ConnStream).
//! - [`tcp`]: [`ConnStream`](tcp::ConnStream) is a connection's IO: a
//!   [`SharedTcp`](tcp::SharedTcp) socket with the kill switch, a write timeout and a
//!   lingering close. [`RawSocket`] is the socket as a request carries it to a handler that
//!   may write to it itself, and when ([`Writable`]).
//! - [`accept`]: the accept loop and each connection's dispatch: an SSE subscription to
//!   [`raw_sse`], HTTP/2 to hyper, HTTP/1 lent to hyper ([`reclaim`]) until it ends or an
//!   SSE subscription follows; and, on stop, the drain.
//! - [`sniff`]: [`FirstRequest`](sniff::FirstRequest), what a connection's first request
//!   head is, read with `MSG_PEEK`.
//! - [`reclaim`]: [`ReclaimableIo`](reclaim::ReclaimableIo), an HTTP/1 connection lent to
//!   hyper that it gives back.
//! - [`raw_sse`]: an SSE response written straight to the socket, outside hyper.
//! - [`websocket`]: [`WsHandshake`], the upgrade answered here, so the WebSocket's stream
//!   ([`WsStream`]) can be written around tungstenite.
//! - [`writer`]: [`SubscriberWriter`], the one place a subscriber's queued messages are
//!   written: by the thread that released them ([`dormouse_runtime::WriteOnRelease`]) or by
//!   the connection's task, under one lock; [`SerializedIo`](writer::SerializedIo) keeps
//!   every other write on the connection out of its frames.
//! - [`framing`]: [`Framing`] (WebSocket frames or SSE bytes) and
//!   [`FrameBatch`](framing::FrameBatch), one vectored write's worth of frames.
//! - [`shutdown`]: [`Stopping`], the signal every connection's loop polls; [`KillSwitch`],
//!   which fails the IO of connections that outlive the grace period; the OS signals.
//! - [`expiry`]: a connection's credential deadline, as a timer made once.

pub(crate) mod accept;
pub(crate) mod admit;
pub(crate) mod expiry;
pub(crate) mod framing;
pub(crate) mod listen;
pub(crate) mod raw_sse;
pub(crate) mod reclaim;
pub(crate) mod shutdown;
pub(crate) mod sniff;
pub(crate) mod tcp;
pub(crate) mod websocket;
pub(crate) mod writer;

pub(crate) use accept::ConnContext;
pub(crate) use admit::ConnLimits;
pub(crate) use framing::{Framing, StreamCursor};
pub(crate) use listen::ConnListener;
pub(crate) use shutdown::{KillSwitch, StopWaiter};
pub use shutdown::{Stopping, shutdown_signal};
pub(crate) use tcp::{PeerAddr, RawSocket, Writable};
pub(crate) use websocket::{WsHandshake, WsStream};
pub(crate) use writer::{BodyWriter, SubscriberWriter};

#[cfg(test)]
mod tests {
    /// The layer's one rule: it is used by handlers and imports none of them, nor the
    /// state they share, so it can carry connections fed from elsewhere (another node).
    #[test]
    fn the_connection_layer_imports_nothing_above_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/conn");
        let sources: Vec<(String, String)> = std::fs::read_dir(&dir)
            .expect("the conn sources")
            .map(|entry| entry.expect("a conn source").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
            .map(|path| {
                let source = std::fs::read_to_string(&path).expect("readable");
                (path.display().to_string(), source)
            })
            .collect();
        assert!(sources.len() >= 10, "found {} sources", sources.len());
        let above = [
            "AppState",
            "crate::state",
            "crate::server",
            "crate::sse",
            "crate::ws",
            "crate::channels",
            "crate::objects",
            "crate::publisher",
            "crate::publish",
            "crate::middleware",
            "crate::auth",
            "dormouse_actors",
        ];
        for (file, source) in sources {
            for line in source
                .lines()
                .filter(|l| l.trim_start().starts_with("use "))
            {
                for name in above {
                    assert!(!line.contains(name), "{file} imports {name}: {line}");
                }
            }
        }
    }
}
