//! The accept loop and what each connection becomes: an SSE subscription is served outside
//! hyper ([`super::raw_sse`]); HTTP/2 goes to hyper; HTTP/1 is lent to hyper
//! ([`super::reclaim`]) and taken back when an SSE subscription follows other requests on
//! it. On stop, the loop ends and the connections are drained
//! ([`super::shutdown::drain_connections`]).
//!
//! hyper directly rather than `axum::serve`, for what axum does not expose: a deadline on
//! reading request heads, and the socket given back.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::serve::Listener as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use super::listen::ConnListener;
use super::raw_sse::serve_raw_sse;
use super::reclaim::ReclaimableIo;
use super::shutdown::{KillSwitch, StopWaiter, Stopping, drain_connections};
use super::sniff::{FirstRequest, peek_first_request};
use super::tcp::{ConnStream, PeerAddr, RawSocket, Writable};
use crate::telemetry::{self, ConnKind, Telemetry};

/// What every connection's task needs, made once per server and shared.
#[derive(Debug)]
pub(crate) struct ConnContext {
    /// The full router: every request, raw SSE ones included, goes through it.
    pub(crate) router: Router,
    /// A request head must arrive within this (hyper's header-read timeout, and the sniff's).
    pub(crate) head_timeout: Duration,
    /// WebSocket and raw SSE tasks, waited for on stop.
    pub(crate) tasks: TaskTracker,
    pub(crate) stopping: Stopping,
    pub(crate) telemetry: Arc<Telemetry>,
}

/// Accepts connections until `shutdown` resolves, then drains them: see
/// [`drain_connections`] for the bounds (`grace`, then the `kill` switch).
pub(crate) async fn serve(
    mut listener: ConnListener,
    shutdown: impl Future<Output = ()>,
    ctx: ConnContext,
    kill: KillSwitch,
    grace: Duration,
) {
    let ctx = Arc::new(ctx);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        tokio::spawn(serve_connection(
            io,
            peer,
            Arc::clone(&ctx),
            graceful.watcher(),
        ));
    }
    drop(listener);
    tracing::info!("shutting down: closing connections");
    drain_connections(&ctx.stopping, &kill, graceful, &ctx.tasks, grace).await;
}

/// Serves one connection to its end. The head is only peeked at to decide who serves it,
/// so hyper gets the connection exactly as the client sent it.
async fn serve_connection(
    mut io: ConnStream,
    peer: SocketAddr,
    ctx: Arc<ConnContext>,
    watcher: Watcher,
) {
    let mut tracked = ctx
        .telemetry
        .connection_opened(ConnKind::Http, false, &peer);
    let mut stopping = ctx.stopping.waiter();
    loop {
        let http2 = match peek_first_request(&io, ctx.head_timeout).await {
            FirstRequest::Sse { request, head_len } => {
                hand_to_raw_sse(io, request, head_len, peer, &ctx, tracked);
                return;
            }
            FirstRequest::Hyper { http2 } => http2,
            FirstRequest::Closed => {
                tracked.ending("client_left");
                return;
            }
        };
        if http2 {
            let result = serve_http2(io, peer, &ctx, watcher).await;
            record_end(&mut tracked, result);
            return;
        }
        match serve_http1(io, peer, &ctx, &mut stopping).await {
            Http1End::Reclaimed(stream) => io = stream,
            Http1End::Ended(result) => {
                record_end(&mut tracked, result);
                return;
            }
        }
    }
}

/// Spawns the raw SSE response as the connection's task from here on: this task is sized
/// for hyper's connection too, which a subscriber would otherwise carry while it idles.
fn hand_to_raw_sse(
    io: ConnStream,
    request: Box<http::Request<Body>>,
    head_len: usize,
    peer: SocketAddr,
    ctx: &ConnContext,
    mut tracked: telemetry::Connection,
) {
    // Tracked, so a graceful stop waits for the goodbye to be written.
    let running = ctx.tasks.token();
    let socket = RawSocket {
        tcp: io.shared(),
        writable: Writable::ResponseBody,
    };
    let finished = move || {
        tracked.ending("closed");
        drop(running);
    };
    tokio::spawn(serve_raw_sse(
        io,
        socket,
        request,
        head_len,
        peer,
        ctx.router.clone(),
        finished,
    ));
}

/// HTTP/2 through hyper, until the connection ends; a graceful stop (through `watcher`)
/// sends GOAWAY.
async fn serve_http2(
    io: ConnStream,
    peer: SocketAddr,
    ctx: &ConnContext,
    watcher: Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let peer = ConnectInfo(PeerAddr(peer));
    // No raw socket: the connection carries other requests' frames.
    let service = ctx
        .router
        .clone()
        .map_request(move |request| connection_request(request, peer, None));
    let connection = auto::Builder::new(TokioExecutor::new())
        .http2_only()
        .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
        .into_owned();
    watcher.watch(connection).await
}

/// How an HTTP/1 connection lent to hyper came back.
enum Http1End {
    /// An SSE subscription is next on it: serve it outside hyper.
    Reclaimed(ConnStream),
    /// The connection is over.
    Ended(Result<(), hyper::Error>),
}

/// HTTP/1 through hyper until the connection ends, the server stops (gracefully: the
/// request in flight is answered), or an SSE subscription comes next on it.
async fn serve_http1(
    io: ConnStream,
    peer: SocketAddr,
    ctx: &ConnContext,
    stopping: &mut StopWaiter,
) -> Http1End {
    let peer = ConnectInfo(PeerAddr(peer));
    // For a WebSocket upgraded on this connection to write to it directly.
    let socket = RawSocket {
        tcp: io.shared(),
        writable: Writable::AfterUpgrade,
    };
    let lent = ReclaimableIo::new(io);
    let reclaim = lent.reclaim();
    let began = Arc::clone(&reclaim);
    let answered = Arc::clone(&reclaim);
    let service = ctx
        .router
        .clone()
        .map_request(move |request: http::Request<Incoming>| {
            began.began(&request);
            connection_request(request, peer, Some(&socket))
        })
        .map_response(move |response| answered.answered(response));
    let mut connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.head_timeout)
        .serve_connection(TokioIo::new(lent), TowerToHyperService::new(service))
        .with_upgrades();
    // The drain waits for hyper's HTTP/2 connections through their watchers; an HTTP/1
    // one is told through `stopping`, which is set first.
    let result = tokio::select! {
        result = &mut connection => result,
        () = stopping.stopped() => {
            std::pin::Pin::new(&mut connection).graceful_shutdown();
            (&mut connection).await
        }
    };
    if result.is_ok()
        && reclaim.taken()
        && let Some(parts) = connection.into_parts()
        && parts.read_buf.is_empty()
    {
        return Http1End::Reclaimed(parts.io.into_inner().into_inner());
    }
    Http1End::Ended(result)
}

/// A request as the router takes it, with what handlers need from its connection: the
/// client's address (limits) and, on HTTP/1, the socket (WebSocket direct writes).
fn connection_request(
    mut request: http::Request<Incoming>,
    peer: ConnectInfo<PeerAddr>,
    socket: Option<&RawSocket>,
) -> http::Request<Body> {
    request.extensions_mut().insert(peer);
    if let Some(socket) = socket {
        request.extensions_mut().insert(socket.clone());
    }
    request.map(Body::new)
}

/// Records how a connection hyper served ended.
fn record_end<E>(tracked: &mut telemetry::Connection, result: Result<(), E>)
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Err(e) = result else {
        tracked.ending("closed");
        return;
    };
    let e = e.into();
    // Routine for clients that vanish or idle; debug, not a warning.
    tracing::debug!(error = %crate::logging::error_chain(&*e), "connection failed");
    tracked.ending(match e.downcast_ref::<hyper::Error>() {
        Some(e) if e.is_timeout() => "header_read_timeout",
        Some(e) if e.is_incomplete_message() => "client_left",
        _ => "error",
    });
}
