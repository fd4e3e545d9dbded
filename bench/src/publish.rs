//! Acknowledged publishes per second: C concurrent publishers for a duration or a message
//! count, over HTTP (each waits for its `201` before the next) or over WebSocket (each is a
//! connection to the channel with up to `--window` publish frames awaiting their `ack`). What
//! an acknowledgement promises is the server's durability setting, so compare runs started
//! with `--durability always` and `--durability never`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, Percentiles, Publisher, Server, ServerArgs, payload, round1, round3};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// How publishers reach the server.
    #[arg(long, value_enum, default_value_t = Over::Http)]
    over: Over,
    /// Publishes each WebSocket publisher keeps awaiting their ack (HTTP: always 1).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// How long to publish.
    #[arg(long, default_value = "10s")]
    duration: humantime::Duration,
    /// Stop after this many acknowledged messages, if that comes first (0: no limit).
    #[arg(long, default_value_t = 0)]
    messages: u64,
    /// Channels the publishers are spread over (publisher i publishes to channel i mod this).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Unmeasured publishes per publisher first, to open connections and activate channels.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Hard limit on the whole run, server start included.
    #[arg(long, default_value = "120s")]
    deadline: humantime::Duration,
    /// Worker threads of the load generator [default: one per CPU].
    #[arg(long)]
    client_threads: Option<usize>,
    #[command(flatten)]
    server: ServerArgs,
}

/// The way a publisher publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Over {
    /// `POST /v1/channels/{c}/messages` on a kept-alive connection.
    Http,
    /// `{"type":"publish"}` frames on the channel's WebSocket (which also delivers every
    /// message of the channel to that connection, as to any subscriber).
    Ws,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    over: Over,
    /// Publishes in flight per publisher.
    window: usize,
    durability: String,
    server_env: Vec<String>,
    size: usize,
    publishers: usize,
    channels: usize,
    duration_ms: u128,
    message_limit: u64,
    acks: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed_secs: f64,
    acks_per_sec: f64,
    mib_per_sec: f64,
    latency: Percentiles,
    server_rss_after_bytes: Option<u64>,
    server_peak_rss_bytes: Option<u64>,
    /// CPU used while publishing, by the server and by this load generator.
    server_cpu_secs: Option<f64>,
    client_cpu_secs: f64,
    /// CPU the rest of the machine used meanwhile (other processes, the kernel's own work such
    /// as journaling after fsyncs), within about a second (per-process and machine-wide tick
    /// accounting differ): well above that means the figures were taken on a busy machine.
    other_cpu_secs: f64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    wire::run(args.client_threads, args.deadline.into(), run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.publishers > 0 && args.channels > 0,
        "--publishers and --channels must be at least 1"
    );
    let mut server = Server::start(&args.server.clone().into()).await?;
    if args.over == Over::Ws {
        return run_ws(args, server).await;
    }
    let client = wire::server::http_client()?;
    let body = payload::encode(args.size, 0, 0);

    let mut publishers = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        let channel = format!("bench-publish-{}", i % args.channels);
        publishers.push(Publisher::connect(&server, &client, &channel).await?);
    }
    let warmups = publishers.iter_mut().map(|p| async {
        for _ in 0..args.warmup {
            p.publish(body.clone()).await?;
        }
        anyhow::Ok(())
    });
    futures::future::try_join_all(warmups).await?;

    let cpu = server.cpu_meter()?;
    let started = Instant::now();
    let until = started + Duration::from(args.duration);
    let budget = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|p| {
            let limit = args.messages;
            tokio::spawn(publish(p, body.clone(), until, budget.clone(), limit))
        })
        .collect();
    let tallies = join_all(tasks).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let usage = cpu.stop(&server)?;
    report(&args, &mut server, usage, elapsed, tallies)
}

/// The report of a run whose publishers ended with `tallies`.
fn report(
    args: &Args,
    server: &mut Server,
    usage: wire::server::CpuUsage,
    elapsed: f64,
    tallies: Vec<Tally>,
) -> anyhow::Result<Report> {
    server.check_alive()?;
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut acks, mut errors, mut first_error) = (0, 0, None);
    for tally in tallies {
        latency.add(&tally.latency)?;
        acks += tally.acks;
        errors += tally.errors;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    Ok(Report {
        scenario: "publish",
        over: args.over,
        window: if args.over == Over::Ws {
            args.window
        } else {
            1
        },
        durability: server.durability.clone(),
        server_env: server.env.clone(),
        size: args.size,
        publishers: args.publishers,
        channels: args.channels,
        duration_ms: Duration::from(args.duration).as_millis(),
        message_limit: args.messages,
        acks,
        errors,
        first_error,
        elapsed_secs: round3(elapsed),
        acks_per_sec: round1(acks as f64 / elapsed),
        mib_per_sec: round1((acks * args.size as u64) as f64 / elapsed / 1048576.0),
        latency: Percentiles::of(&latency),
        server_rss_after_bytes: server.rss_bytes()?,
        server_peak_rss_bytes: server.peak_rss_bytes()?,
        server_cpu_secs: usage.server,
        client_cpu_secs: usage.client,
        other_cpu_secs: usage.other,
    })
}

#[derive(Debug)]
struct Tally {
    acks: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            acks: 0,
            errors: 0,
            first_error: None,
            latency: Histogram::new(3)?,
        })
    }

    fn failed(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

/// Whether another publish may start: before `until`, and while fewer than `limit` (if not
/// 0) were started by all publishers together.
fn may_start(until: Instant, started: &AtomicU64, limit: u64) -> bool {
    Instant::now() < until && (limit == 0 || started.fetch_add(1, Ordering::Relaxed) < limit)
}

/// The tallies of the publisher tasks, once every one has ended.
async fn join_all(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Tally>>>,
) -> anyhow::Result<Vec<Tally>> {
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await??);
    }
    Ok(tallies)
}

/// Publishes `body` until `until`, or until `limit` (if not 0) publishes were started in all.
async fn publish(
    mut publisher: Publisher,
    body: Bytes,
    until: Instant,
    started: Arc<AtomicU64>,
    limit: u64,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    while may_start(until, &started, limit) {
        let sent = Instant::now();
        match publisher.publish(body.clone()).await {
            Ok(()) => {
                tally.acks += 1;
                tally.latency.record(sent.elapsed().as_micros() as u64)?;
            }
            Err(e) => {
                tally.failed(format!("{e:#}"));
            }
        }
    }
    Ok(tally)
}

/// The WebSocket run: each publisher is a connection to its channel keeping `window`
/// publishes awaiting their acks.
async fn run_ws(args: Args, mut server: Server) -> anyhow::Result<Report> {
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    let data: Arc<str> = "x".repeat(args.size).into();
    let base = server.base_url().replacen("http://", "ws://", 1);
    let mut sockets = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        let url = format!("{base}/v1/channels/bench-publish-{}/ws", i % args.channels);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        for _ in 0..args.warmup {
            ws.send(publish_frame(&data, u64::MAX)).await?;
            wait_for_ack(&mut ws).await?;
        }
        sockets.push(ws);
    }
    let cpu = server.cpu_meter()?;
    let started = Instant::now();
    let until = started + Duration::from(args.duration);
    let budget = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            let limit = args.messages;
            tokio::spawn(publish_ws(
                ws,
                data.clone(),
                args.window,
                until,
                budget.clone(),
                limit,
            ))
        })
        .collect();
    let tallies = join_all(tasks).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let usage = cpu.stop(&server)?;
    report(&args, &mut server, usage, elapsed, tallies)
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn publish_frame(data: &str, r#ref: u64) -> Message {
    Message::text(format!(
        r#"{{"type":"publish","data":"{data}","ref":{}}}"#,
        r#ref
    ))
}

/// What a text frame from the server says of a publish: `Some(Ok(ref))` for an ack,
/// `Some(Err(..))` for an error, `None` for anything else (the channel's own messages).
fn answer(text: &str) -> Option<Result<u64, String>> {
    // Messages carry the payload; only the short answers are parsed.
    if text.len() > 512 || !text.contains(r#""ref""#) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    match value["type"].as_str()? {
        "ack" => value["ref"].as_u64().map(Ok),
        "error" => Some(Err(value.to_string())),
        _ => None,
    }
}

async fn wait_for_ack(ws: &mut WsStream) -> anyhow::Result<()> {
    while let Some(frame) = ws.next().await {
        if let Message::Text(text) = frame?
            && let Some(answer) = answer(&text)
        {
            return answer.map(drop).map_err(anyhow::Error::msg);
        }
    }
    anyhow::bail!("the WebSocket closed before the ack")
}

/// Keeps `window` publishes in flight until `until` (or until `limit` were started in
/// all), then waits for the acks still due.
async fn publish_ws(
    mut ws: WsStream,
    data: Arc<str>,
    window: usize,
    until: Instant,
    started: Arc<AtomicU64>,
    limit: u64,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut pending: HashMap<u64, Instant> = HashMap::with_capacity(window);
    let mut next_ref = 0u64;
    let mut sending = true;
    loop {
        if sending {
            let mut fed = false;
            while pending.len() < window {
                if !may_start(until, &started, limit) {
                    sending = false;
                    break;
                }
                ws.feed(publish_frame(&data, next_ref)).await?;
                pending.insert(next_ref, Instant::now());
                next_ref += 1;
                fed = true;
            }
            if fed {
                ws.flush().await?;
            }
        }
        if pending.is_empty() {
            break;
        }
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no ack for 30 s ({} pending)", pending.len()))?;
        let Some(frame) = frame else {
            anyhow::bail!(
                "the WebSocket closed with {} publishes pending",
                pending.len()
            );
        };
        let Message::Text(text) = frame? else {
            continue;
        };
        match answer(&text) {
            Some(Ok(r#ref)) => {
                if let Some(sent) = pending.remove(&r#ref) {
                    tally.acks += 1;
                    tally.latency.record(sent.elapsed().as_micros() as u64)?;
                }
            }
            Some(Err(e)) => {
                // An error answer names its ref too; without it the window would shrink.
                let r#ref = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["ref"].as_u64());
                if let Some(r#ref) = r#ref {
                    pending.remove(&r#ref);
                }
                tally.failed(e);
            }
            None => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(tally)
}
