//! What an idle subscriber costs the server: N connections held open to one or many channels,
//! the server's resident memory before and after, and a publish at the end to prove the
//! connections are still live.
//!
//! Memory is the server process's `VmRSS`, read from outside. Kernel socket buffers are not in
//! it: they are the same for any server and not what Dormouse can change.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wire::{self, Incoming, Kind, Publisher, Server, Subscriber, TargetArgs, Transport};
use crate::wire::{payload, round1, round3, secs};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Idle connections to hold.
    #[arg(long, default_value_t = 15_000)]
    connections: usize,
    /// How dormouse subscribers connect (Redis subscribers speak RESP).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Channels the connections are spread over (connection i joins channel i mod this).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Channels each connection follows: channel i mod `channels` and the next ones, on one
    /// WebSocket (`subscribe` messages) or one event stream (`/v1/events`).
    #[arg(long, default_value_t = 1)]
    channels_per_connection: usize,
    /// Source addresses 127.0.0.2 and up to spread client sockets over (each has ~28k
    /// ephemeral ports).
    #[arg(long, default_value_t = 4)]
    source_ips: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Read buffer per client connection, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Connections opened and closed before the baseline, so that it includes what the
    /// server allocates once (thread caches, the channels' activation).
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Wait before each memory reading, so freed memory has gone back to the kernel (the
    /// server's jemalloc returns it after about a second).
    #[arg(long, default_value = "3s")]
    settle: humantime::Duration,
    /// How long the closing publish may take to reach every connection.
    #[arg(long, default_value = "20s")]
    delivery_timeout: humantime::Duration,
    /// Hard limit on the whole run, server start included.
    #[arg(long, default_value = "180s")]
    deadline: humantime::Duration,
    /// Worker threads of the load generator [default: one per CPU].
    #[arg(long)]
    client_threads: Option<usize>,
    /// How the closing message reaches the connections: a publish to their channels, or
    /// one call of the server-side connection API to every connection of a subject (`POST
    /// /v1/subjects/anonymous/messages`: a server without auth gives every connection that
    /// subject), which is what a backend does to reach its users' dormant connections.
    #[arg(long, value_enum, default_value_t = DeliverBy::Publish)]
    deliver_by: DeliverBy,
    #[command(flatten)]
    target: TargetArgs,
}

/// See [`Args::deliver_by`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DeliverBy {
    Publish,
    Subject,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    target: Kind,
    transport: &'static str,
    durability: String,
    server_env: Vec<String>,
    connections: usize,
    channels: usize,
    channels_per_connection: usize,
    source_ips: usize,
    nofile_limit: u64,
    settle_ms: u128,
    /// Every connection opened, none was closed, and the closing publish reached all (one
    /// message per channel it follows).
    complete: bool,
    connect_secs: f64,
    connects_per_sec: f64,
    server_rss_before_bytes: u64,
    server_rss_after_bytes: u64,
    server_peak_rss_bytes: u64,
    /// (after - before) / connections.
    bytes_per_connection: f64,
    /// After one message reached every connection, and a settle: what a connection that has
    /// carried traffic keeps.
    server_rss_after_delivery_bytes: u64,
    bytes_per_connection_after_delivery: f64,
    closed_early: u64,
    delivered_after_idle: u64,
    deliver_by: DeliverBy,
    delivery_ms: f64,
    /// The server's CPU from the closing call until every connection had the message.
    delivery_server_cpu_ms: Option<f64>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    wire::run(args.client_threads, args.deadline.into(), run_async(args))
}

/// Counters every connection task reports to.
#[derive(Debug, Default)]
struct Counts {
    delivered: AtomicU64,
    closed: AtomicU64,
}

async fn run_async(args: Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.channels > 0, "--channels must be at least 1");
    anyhow::ensure!(
        (1..=args.channels).contains(&args.channels_per_connection),
        "--channels-per-connection must be between 1 and --channels"
    );
    let want = args.connections as u64 + 4096;
    let nofile_limit = wire::raise_nofile(want)?;
    anyhow::ensure!(
        nofile_limit >= args.connections as u64 + 256,
        "the open-file limit is {nofile_limit}, too low for {} connections",
        args.connections
    );
    let mut server = Server::start(&args.target).await?;
    anyhow::ensure!(
        server.pid.is_some(),
        "idle measures the server's memory: pass --server-pid with --url"
    );
    let settle = Duration::from(args.settle);
    let channel = |i: usize| format!("bench-idle-{}", i % args.channels);
    let follows = |i: usize| -> Vec<String> {
        (0..args.channels_per_connection)
            .map(|j| channel(i + j))
            .collect()
    };
    let client = wire::server::http_client()?;

    // The fixed costs go into the baseline: the channels exist, the connection path ran.
    publish_to_all(&server, &client, args.channels, &channel).await?;
    let warmup = wire::connect_all(args.warmup, args.connect_concurrency, |i| {
        let (server, channels) = (&server, follows(i));
        let source = wire::source_ip(i, args.source_ips);
        async move {
            Subscriber::connect_many(server, args.transport, &channels, source, args.read_buffer)
                .await
        }
    })
    .await
    .context("warm-up")?;
    drop(warmup);
    tokio::time::sleep(settle).await;
    let server_rss_before_bytes = server.rss_bytes()?.unwrap_or(0);

    let counts = Arc::new(Counts::default());
    let (stop, stopped) = watch::channel(false);
    let connect_started = payload::now_ns();
    let holders: Vec<JoinHandle<()>> =
        wire::connect_all(args.connections, args.connect_concurrency, |i| {
            let counts = counts.clone();
            let stopped = stopped.clone();
            let channels = follows(i);
            let server = &server;
            let transport = args.transport;
            let source = wire::source_ip(i, args.source_ips);
            let buffer = args.read_buffer;
            async move {
                let subscriber =
                    Subscriber::connect_many(server, transport, &channels, source, buffer).await?;
                Ok(tokio::spawn(hold(subscriber, counts, stopped)))
            }
        })
        .await?;
    let connect_secs = secs(payload::now_ns() - connect_started);
    tokio::time::sleep(settle).await;
    server.check_alive()?;
    let server_rss_after_bytes = server.rss_bytes()?.unwrap_or(0);
    let server_peak_rss_bytes = server.peak_rss_bytes()?.unwrap_or(0);

    // Still live? One message must reach every connection.
    let cpu_before = server.cpu_secs()?;
    let published_ns = payload::now_ns();
    match args.deliver_by {
        DeliverBy::Publish => publish_to_all(&server, &client, args.channels, &channel).await?,
        DeliverBy::Subject => send_to_subject(&server, &client, args.connections).await?,
    }
    let delivery_until = tokio::time::Instant::now() + Duration::from(args.delivery_timeout);
    let per_connection = match args.deliver_by {
        DeliverBy::Publish => args.channels_per_connection as u64,
        DeliverBy::Subject => 1,
    };
    while counts.delivered.load(Ordering::Acquire)
        + counts.closed.load(Ordering::Acquire) * per_connection
        < args.connections as u64 * per_connection
        && tokio::time::Instant::now() < delivery_until
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivery_ms = (payload::now_ns() - published_ns) as f64 / 1e6;
    let delivery_server_cpu_ms = match (cpu_before, server.cpu_secs()?) {
        (Some(before), Some(after)) => Some(round1((after - before) * 1000.0)),
        _ => None,
    };
    // What a connection keeps after it has carried a message (write buffers grown, queues).
    tokio::time::sleep(settle).await;
    let server_rss_after_delivery_bytes = server.rss_bytes()?.unwrap_or(0);
    let _ = stop.send(true);
    for holder in holders {
        holder.await?;
    }
    server.check_alive()?;

    let delivered_after_idle = counts.delivered.load(Ordering::Acquire);
    let closed_early = counts.closed.load(Ordering::Acquire);
    let n = args.connections as u64;
    Ok(Report {
        scenario: "idle",
        target: server.kind,
        transport: wire::transport_name(server.kind, args.transport),
        durability: server.durability.clone(),
        server_env: server.env.clone(),
        connections: args.connections,
        channels: args.channels,
        channels_per_connection: args.channels_per_connection,
        source_ips: args.source_ips,
        nofile_limit,
        settle_ms: settle.as_millis(),
        complete: closed_early == 0 && delivered_after_idle == n * per_connection,
        connect_secs: round3(connect_secs),
        connects_per_sec: round1(n as f64 / connect_secs),
        server_rss_before_bytes,
        server_rss_after_bytes,
        server_peak_rss_bytes,
        bytes_per_connection: round1(
            (server_rss_after_bytes as f64 - server_rss_before_bytes as f64) / n.max(1) as f64,
        ),
        server_rss_after_delivery_bytes,
        bytes_per_connection_after_delivery: round1(
            (server_rss_after_delivery_bytes as f64 - server_rss_before_bytes as f64)
                / n.max(1) as f64,
        ),
        closed_early,
        delivered_after_idle,
        deliver_by: args.deliver_by,
        delivery_ms: round1(delivery_ms),
        delivery_server_cpu_ms,
    })
}

/// One call that queues a message for every connection of the subject `anonymous`; fails
/// unless the server says it queued it for all `connections`.
async fn send_to_subject(
    server: &Server,
    client: &reqwest::Client,
    connections: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        server.kind == Kind::Dormouse,
        "--deliver-by subject needs a dormouse server"
    );
    let answer: serde_json::Value = client
        .post(format!(
            "{}/v1/subjects/anonymous/messages",
            server.base_url()
        ))
        .body(payload::encode(64, payload::now_ns(), 0))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(
        answer["queued"].as_u64() == Some(connections as u64),
        "the server queued the message for {} connections, not {connections}",
        answer["queued"]
    );
    Ok(())
}

/// Publishes one small message to each channel, one after another.
async fn publish_to_all(
    server: &Server,
    client: &reqwest::Client,
    channels: usize,
    channel: &impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    for c in 0..channels {
        let mut publisher = Publisher::connect(server, client, &channel(c)).await?;
        publisher
            .publish(payload::encode(64, payload::now_ns(), 0))
            .await
            .with_context(|| format!("publishing to {}", channel(c)))?;
    }
    Ok(())
}

/// Keeps a connection open, answering pings, until told to stop; counts messages and closes.
async fn hold(mut subscriber: Subscriber, counts: Arc<Counts>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            next = subscriber.next() => match next {
                Ok(Some(Incoming::Message { .. })) => {
                    counts.delivered.fetch_add(1, Ordering::Release);
                }
                Ok(Some(Incoming::Other | Incoming::Connected)) => {}
                Ok(None) | Err(_) => {
                    counts.closed.fetch_add(1, Ordering::Release);
                    return;
                }
            },
        }
    }
}
