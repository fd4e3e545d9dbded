//! Load over the wire: the bench talks to a server process through its public protocols only,
//! as users' clients do, from the same machine. Clients are hand-written and minimal (frame
//! headers and the two fields a bench message needs), so on a small machine the load
//! generator takes as little CPU as possible from the server it measures.
//!
//! # Layout
//! - `server`: the server under test: started (and always stopped) by the bench, or running.
//! - `conn`: a TCP connection with a read buffer that decoders parse in place.
//! - `ws`, `sse`, `resp`: subscriber clients for WebSocket, Server-Sent Events and Redis.
//! - `payload`: what a bench message carries: its send time and its index.

pub(crate) mod conn;
pub(crate) mod payload;
pub(crate) mod resp;
pub(crate) mod server;
pub(crate) mod sse;
pub(crate) mod ws;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

pub(crate) use server::{Kind, Server, ServerArgs, TargetArgs};

/// How a dormouse subscriber connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Transport {
    /// WebSocket: `/v1/channels/{channel}/ws`.
    Ws,
    /// Server-Sent Events: `/v1/channels/{channel}/events`.
    Sse,
    /// Server-Sent Events on a connection that first served another request (`GET
    /// /healthz`), as a browser's pooled keep-alive connection or a proxy's upstream one.
    SseKeptAlive,
}

/// What a subscriber received.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    /// A published message: its sequence number, where the protocol carries one (dormouse
    /// event ids end with it; Redis has none), and its payload.
    Message { seq: Option<u64>, data: &'a [u8] },
    /// Dormouse's first frame or event on a connection, naming it: not a message, and
    /// not a control message a run should count.
    Connected,
    /// Anything else: a gap or reconnect notice, a subscription confirmation.
    Other,
}

/// Where the two-byte delimiter `pair` (a CRLF, a blank SSE line) first starts in
/// `haystack`. The subscribers look for one per message; `memchr::memmem::find` would build a
/// new searcher each time, which cost the load generator ~3% of its CPU.
fn find_pair(haystack: &[u8], pair: [u8; 2]) -> Option<usize> {
    memchr::memchr_iter(pair[0], haystack).find(|&i| haystack.get(i + 1) == Some(&pair[1]))
}

/// The sequence number at the end of a dormouse event id (`{epoch hex}-{seq}`).
fn seq_of(id: &[u8]) -> Option<u64> {
    let at = memchr::memrchr(b'-', id)?;
    std::str::from_utf8(&id[at + 1..]).ok()?.parse().ok()
}

/// A subscriber of any kind, connected and subscribed.
#[derive(Debug)]
pub(crate) enum Subscriber {
    Ws(ws::WsClient),
    Sse(sse::SseClient),
    Redis(resp::RespConn),
}

impl Subscriber {
    /// Connects and subscribes to `channel`; on return the subscription is live, so every
    /// message published after it must arrive.
    pub(crate) async fn connect(
        server: &Server,
        transport: Transport,
        channel: &str,
        source: Option<IpAddr>,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        Ok(match (server.kind, transport) {
            (Kind::Redis, _) => {
                let mut conn = resp::RespConn::connect(server.addr, source, buffer).await?;
                conn.subscribe(channel).await?;
                Self::Redis(conn)
            }
            (Kind::Dormouse, Transport::Ws) => {
                let path = format!("/v1/channels/{channel}/ws");
                Self::Ws(ws::WsClient::connect(server.addr, source, &path, buffer).await?)
            }
            (Kind::Dormouse, Transport::Sse) => {
                let path = format!("/v1/channels/{channel}/events");
                Self::Sse(sse::SseClient::connect(server.addr, source, &path, buffer).await?)
            }
            (Kind::Dormouse, Transport::SseKeptAlive) => {
                let path = format!("/v1/channels/{channel}/events");
                Self::Sse(
                    sse::SseClient::connect_after_request(server.addr, source, &path, buffer)
                        .await?,
                )
            }
        })
    }

    /// Connects and follows every channel of `channels` on one connection: a WebSocket to
    /// the first that sends a `subscribe` for each other and waits for their answers, one
    /// event stream of them all (`/v1/events`), or a Redis connection that subscribes to
    /// each. On return every subscription is live.
    pub(crate) async fn connect_many(
        server: &Server,
        transport: Transport,
        channels: &[String],
        source: Option<IpAddr>,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let (first, rest) = channels.split_first().context("no channel to follow")?;
        if rest.is_empty() {
            return Self::connect(server, transport, first, source, buffer).await;
        }
        if server.kind == Kind::Redis {
            // One connection, one SUBSCRIBE per channel, as a Redis client follows several.
            let mut conn = resp::RespConn::connect(server.addr, source, buffer).await?;
            for channel in channels {
                conn.subscribe(channel).await?;
            }
            return Ok(Self::Redis(conn));
        }
        Ok(match transport {
            Transport::Ws => {
                let path = format!("/v1/channels/{first}/ws");
                let mut client = ws::WsClient::connect(server.addr, source, &path, buffer).await?;
                for channel in rest {
                    let subscribe = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
                    client.send_text(&subscribe).await?;
                }
                let mut answered = 0;
                while answered < rest.len() {
                    match client.next().await? {
                        Some(Incoming::Other) => answered += 1,
                        Some(Incoming::Connected) => {}
                        Some(Incoming::Message { .. }) => {
                            anyhow::bail!("an event before the subscriptions were answered")
                        }
                        None => anyhow::bail!("closed while subscribing"),
                    }
                }
                Self::Ws(client)
            }
            Transport::Sse | Transport::SseKeptAlive => {
                let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
                let path = format!("/v1/events?{}", query.join("&"));
                Self::Sse(sse::SseClient::connect(server.addr, source, &path, buffer).await?)
            }
        })
    }

    /// The next message; `None` once the server ended the subscription.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<Incoming<'_>>> {
        match self {
            Self::Ws(client) => client.next().await,
            Self::Sse(client) => client.next().await,
            Self::Redis(client) => client.next().await,
        }
    }
}

/// The protocol name a report gives for subscribers of `kind` over `transport`.
pub(crate) fn transport_name(kind: Kind, transport: Transport) -> &'static str {
    match (kind, transport) {
        (Kind::Redis, _) => "resp",
        (Kind::Dormouse, Transport::Ws) => "ws",
        (Kind::Dormouse, Transport::Sse) => "sse",
        (Kind::Dormouse, Transport::SseKeptAlive) => "sse_kept_alive",
    }
}

/// Publishes to one channel and waits for each acknowledgement: dormouse's `201` (after the
/// commit its durability setting asks for), or Redis's PUBLISH reply.
#[derive(Debug)]
pub(crate) enum Publisher {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Redis {
        conn: resp::RespConn,
        channel: String,
    },
}

impl Publisher {
    pub(crate) async fn connect(
        server: &Server,
        client: &reqwest::Client,
        channel: &str,
    ) -> anyhow::Result<Self> {
        Self::connect_to(server.kind, server.addr, client, channel).await
    }

    /// [`Publisher::connect`] by address, for a thread that cannot borrow the [`Server`].
    pub(crate) async fn connect_to(
        kind: Kind,
        addr: std::net::SocketAddr,
        client: &reqwest::Client,
        channel: &str,
    ) -> anyhow::Result<Self> {
        Ok(match kind {
            Kind::Dormouse => Self::Http {
                client: client.clone(),
                url: format!("http://{addr}/v1/channels/{channel}/messages"),
            },
            Kind::Redis => Self::Redis {
                conn: resp::RespConn::connect(addr, None, 4096).await?,
                channel: channel.to_string(),
            },
        })
    }

    pub(crate) async fn publish(&mut self, body: Bytes) -> anyhow::Result<()> {
        match self {
            Self::Http { client, url } => {
                let response = client.post(url.as_str()).body(body).send().await?;
                let status = response.status();
                let text = response.bytes().await?;
                anyhow::ensure!(
                    status == reqwest::StatusCode::CREATED,
                    "publish answered {status}: {}",
                    String::from_utf8_lossy(&text)
                );
            }
            Self::Redis { conn, channel } => {
                tokio::time::timeout(server::REQUEST_TIMEOUT, conn.publish(channel, &body))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no PUBLISH reply within {:?}", server::REQUEST_TIMEOUT)
                    })??;
            }
        }
        Ok(())
    }
}

/// Raises this process's open-file limit to at least `want` (children inherit it, so a
/// server the bench starts can accept as many connections). Returns the limit in force.
pub(crate) fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft >= want {
        return Ok(soft);
    }
    if hard >= want {
        Resource::NOFILE.set(want, hard)?;
        return Ok(want);
    }
    // Raising the hard limit needs privilege; without it, settle for the hard limit.
    if Resource::NOFILE.set(want, want).is_ok() {
        return Ok(want);
    }
    Resource::NOFILE.set(hard, hard)?;
    Ok(hard)
}

/// The source address of client connection `i` when spreading over `count` addresses
/// 127.0.0.2 and up (each gives its own ~28k ephemeral ports); `None` when `count` is 0.
pub(crate) fn source_ip(i: usize, count: usize) -> Option<IpAddr> {
    (count > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % count) as u8)))
}

/// Runs `connect(i)` for `0..count`, `concurrency` at a time; fails on the first failure.
pub(crate) async fn connect_all<T, F, Fut>(
    count: usize,
    concurrency: usize,
    connect: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    futures::stream::iter(0..count)
        .map(|i| {
            let fut = connect(i);
            async move { fut.await.with_context(|| format!("connection {i}")) }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await
}

/// Runs a scenario on a multi-thread runtime of `threads` workers (default: one per CPU),
/// bounded by `deadline`: past it the scenario is dropped, which stops the server it started,
/// and the run fails instead of hanging.
pub(crate) fn run<T>(
    threads: Option<usize>,
    deadline: Duration,
    scenario: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = builder.enable_all().build()?;
    let outcome = runtime.block_on(async { tokio::time::timeout(deadline, scenario).await });
    runtime.shutdown_timeout(Duration::from_secs(2));
    outcome.map_err(|_| {
        anyhow::anyhow!(
            "the run did not finish within its deadline of {}",
            humantime::format_duration(deadline)
        )
    })?
}

/// Latency percentiles in microseconds.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) max_us: u64,
    pub(crate) mean_us: f64,
    pub(crate) count: u64,
}

impl Percentiles {
    pub(crate) fn of(histogram: &hdrhistogram::Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50_us: histogram.value_at_quantile(0.5),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: round1(histogram.mean()),
            count: histogram.len(),
        }
    }
}

/// Nanoseconds as whole microseconds, saturating (a latency sample).
pub(crate) fn micros(ns: u64) -> u32 {
    (ns / 1000).min(u64::from(u32::MAX)) as u32
}

/// Nanoseconds as seconds.
pub(crate) fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Rounded to one decimal, for reports.
pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Rounded to three decimals, for reports.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_come_from_ids() {
        assert_eq!(seq_of(b"18a3f09c2b1d4-42"), Some(42));
        assert_eq!(seq_of(b"42"), None);
        assert_eq!(seq_of(b"a-"), None);
    }

    #[test]
    fn delimiters_are_found_where_they_first_start() {
        assert_eq!(find_pair(b"ab\r\ncd\r\n", *b"\r\n"), Some(2));
        assert_eq!(find_pair(b"\r\r\n", *b"\r\n"), Some(1));
        assert_eq!(find_pair(b"x\n", *b"\n\n"), None);
        assert_eq!(find_pair(b"x\n\n", *b"\n\n"), Some(1));
        assert_eq!(find_pair(b"", *b"\r\n"), None);
    }

    #[test]
    fn source_addresses_cycle_from_127_0_0_2() {
        assert_eq!(source_ip(0, 0), None);
        assert_eq!(source_ip(0, 3), Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(source_ip(4, 3), Some(IpAddr::from([127, 0, 0, 3])));
    }
}
