//! Acknowledged publishes per second over HTTP: C concurrent publishers, each waiting for its
//! `201` before the next, for a duration or a message count. What an acknowledgement promises
//! is the server's durability setting, so compare runs started with `--durability always` and
//! `--durability never`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::wire::{self, Percentiles, Publisher, Server, ServerArgs, payload, round1, round3};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
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

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
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
    let mut latency = Histogram::<u64>::new(3)?;
    let mut acks = 0;
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let tally = task.await??;
        latency.add(&tally.latency)?;
        acks += tally.acks;
        errors += tally.errors;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let usage = cpu.stop(&server)?;
    server.check_alive()?;
    Ok(Report {
        scenario: "publish",
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

/// Publishes `body` until `until`, or until `limit` (if not 0) publishes were started in all.
async fn publish(
    mut publisher: Publisher,
    body: Bytes,
    until: Instant,
    started: Arc<AtomicU64>,
    limit: u64,
) -> anyhow::Result<Tally> {
    let mut tally = Tally {
        acks: 0,
        errors: 0,
        first_error: None,
        latency: Histogram::new(3)?,
    };
    while Instant::now() < until && (limit == 0 || started.fetch_add(1, Ordering::Relaxed) < limit)
    {
        let sent = Instant::now();
        match publisher.publish(body.clone()).await {
            Ok(()) => {
                tally.acks += 1;
                tally.latency.record(sent.elapsed().as_micros() as u64)?;
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok(tally)
}
