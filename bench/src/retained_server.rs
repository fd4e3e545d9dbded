//! What a user sees of retained data: a `dormouse` server fills many channels' replay
//! buffers through the batch endpoint, every channel hibernates, and the server's own memory
//! is read from outside; then it is restarted on the same data dir, and the time until it
//! answers and its memory after are read too. A sample of channels is read back over HTTP
//! after the restart and checked event by event.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::child::ServerProcess;

/// The retained-server scenario's parameters.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Channels.
    #[arg(long, default_value_t = 10_000)]
    channels: u64,
    /// Events each channel retains (its `max_events`; this many are published to each).
    #[arg(long, default_value_t = 1_000)]
    events: u64,
    /// Payload size of each event, in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Channels per batch request.
    #[arg(long, default_value_t = 100)]
    batch_channels: u64,
    /// Events per channel per batch request.
    #[arg(long, default_value_t = 50)]
    batch_events: u64,
    /// Batch requests in flight.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Server durability (DORMOUSE_STORAGE_DURABILITY).
    #[arg(long, default_value = "never")]
    durability: String,
    /// More environment for the server, KEY=VALUE, repeatable.
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    server_env: Vec<String>,
    /// Channels read back after the restart.
    #[arg(long, default_value_t = 100)]
    check: u64,
    /// The dormouse binary [default: the one next to this binary].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Where to put the data dir (a fresh directory inside it) [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One JSON line: the figures and what produced them.
#[derive(Debug, Serialize)]
pub struct Report {
    scenario: &'static str,
    channels: u64,
    events: u64,
    size: usize,
    durability: String,
    server_env: Vec<String>,
    publish_secs: f64,
    events_per_sec: f64,
    /// The server's RSS once ready, before anything was published.
    rss_baseline_bytes: u64,
    /// Its peak RSS (VmHWM) over the publishing.
    rss_peak_bytes: u64,
    /// Once every channel hibernated and the allocator's decay passed.
    rss_hibernated_bytes: u64,
    rss_hibernated_over_baseline_bytes: i64,
    rss_hibernated_per_event_bytes: f64,
    /// The data dir's size, as the server reports it in `/metrics`.
    data_dir_bytes: u64,
    /// SIGTERM to exit.
    stop_ms: u64,
    /// Start of the new process to its first successful `/readyz`.
    restart_ready_ms: u64,
    rss_after_restart_bytes: u64,
    rss_after_restart_over_baseline_bytes: i64,
    /// After reading back `check` channels' full buffers over HTTP.
    rss_after_reads_bytes: u64,
    checked_channels: u64,
    read_p50_ms: f64,
    read_max_ms: f64,
}

/// Runs the scenario; every server it starts is stopped on every path out.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => crate::default_server_bin()?,
    };
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("dormouse-retained-")
        .tempdir_in(parent)?;
    let data_dir = dir.path().join("data");
    let max_events = args.events.to_string();
    let mut env: Vec<(String, String)> = vec![
        ("DORMOUSE_CHANNELS_IDLE_TIMEOUT".into(), "2s".into()),
        ("DORMOUSE_CHANNELS_MAX_EVENTS".into(), max_events),
    ];
    for pair in &args.server_env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--server-env {pair}: expected KEY=VALUE"))?;
        env.push((key.into(), value.into()));
    }
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()?;

    let mut server =
        ServerProcess::start(&bin, &data_dir, dir.path(), &args.durability, 0, &env_refs)?;
    let base = server.wait_ready(&client).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_baseline_bytes = crate::proc::process_rss_bytes(server.pid)?;

    let started = Instant::now();
    publish(&client, &base, &args).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let rss_peak_bytes = crate::proc::process_peak_rss_bytes(server.pid)?;
    wait_hibernated(&client, &base).await?;
    // jemalloc hands freed pages back after about a second (.cargo/config.toml); the
    // engine writes its last changes out and empties its leaf cache after 2 s of quiet.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rss_hibernated_bytes = crate::proc::process_rss_bytes(server.pid)?;

    let stopping = Instant::now();
    server.stop_gracefully()?;
    let stop_ms = stopping.elapsed().as_millis() as u64;
    let data_dir_bytes = crate::proc::dir_bytes(&data_dir)?;
    let starting = Instant::now();
    let mut server =
        ServerProcess::start(&bin, &data_dir, dir.path(), &args.durability, 1, &env_refs)?;
    let base = server
        .wait_ready_within(&client, Duration::from_secs(600))
        .await?;
    let restart_ready_ms = starting.elapsed().as_millis() as u64;
    let rss_after_restart_bytes = crate::proc::process_rss_bytes(server.pid)?;

    let mut reads = Vec::new();
    let mut checked = 0;
    for c in crate::spread(args.channels, args.check) {
        let t = Instant::now();
        let got = read_back(&client, &base, c, &args).await?;
        reads.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(got == args.events, "channel ch-{c} read back {got} events");
        checked += 1;
    }
    reads.sort_by(f64::total_cmp);
    let rss_after_reads_bytes = crate::proc::process_rss_bytes(server.pid)?;
    server.stop_gracefully()?;

    let total = args.channels * args.events;
    let over = rss_hibernated_bytes as i64 - rss_baseline_bytes as i64;
    Ok(Report {
        scenario: "retained-server",
        channels: args.channels,
        events: args.events,
        size: args.size,
        durability: args.durability.clone(),
        server_env: args.server_env.clone(),
        publish_secs,
        events_per_sec: total as f64 / publish_secs,
        rss_baseline_bytes,
        rss_peak_bytes,
        rss_hibernated_bytes,
        rss_hibernated_over_baseline_bytes: over,
        rss_hibernated_per_event_bytes: over as f64 / total as f64,
        data_dir_bytes,
        stop_ms,
        restart_ready_ms,
        rss_after_restart_bytes,
        rss_after_restart_over_baseline_bytes: rss_after_restart_bytes as i64
            - rss_baseline_bytes as i64,
        rss_after_reads_bytes,
        checked_channels: checked,
        read_p50_ms: reads.get(reads.len() / 2).copied().unwrap_or(0.0),
        read_max_ms: reads.last().copied().unwrap_or(0.0),
    })
}

/// The event published as number `seq` to channel `c`: its text says which, padded to the
/// size, so a read-back can check every event.
fn event_data(c: u64, seq: u64, size: usize) -> String {
    let mut data = format!("ch-{c}/{seq}/");
    while data.len() < size {
        data.push('.');
    }
    data.truncate(size.max(data.len().min(size)));
    data
}

/// Publishes `events` to every channel through `POST /v1/publish` (NDJSON), `batch_events`
/// per channel and `batch_channels` channels per request, `concurrency` requests at once.
async fn publish(client: &reqwest::Client, base: &str, args: &Args) -> anyhow::Result<()> {
    let mut bodies = Vec::new();
    let mut first = 1;
    while first <= args.events {
        let last = (first + args.batch_events - 1).min(args.events);
        let mut c = 0;
        while c < args.channels {
            let upto = (c + args.batch_channels).min(args.channels);
            bodies.push((c, upto, first, last));
            c = upto;
        }
        first = last + 1;
    }
    let next = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(bodies);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, base, next, bodies) = (
            client.clone(),
            base.to_owned(),
            next.clone(),
            bodies.clone(),
        );
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&(from, upto, first, last)) = bodies.get(i) else {
                    return anyhow::Ok(());
                };
                let mut body = String::new();
                let mut items = 0;
                for c in from..upto {
                    for seq in first..=last {
                        body.push_str(&format!(
                            "{{\"channel\":\"ch-{c}\",\"data\":\"{}\"}}\n",
                            event_data(c, seq, size)
                        ));
                        items += 1;
                    }
                }
                let answer = crate::json_of(
                    client
                        .post(format!("{base}/v1/publish"))
                        .header("content-type", "application/x-ndjson")
                        .body(body),
                )
                .await?;
                anyhow::ensure!(
                    answer["published"].as_u64() == Some(items),
                    "a batch of {items} was answered {answer}"
                );
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Reads channel `c`'s whole buffer back; returns how many events there were, after
/// checking each is the one published with its seq.
async fn read_back(
    client: &reqwest::Client,
    base: &str,
    c: u64,
    args: &Args,
) -> anyhow::Result<u64> {
    let events = crate::crash::read_history(client, base, &format!("ch-{c}")).await?;
    for (seq, (id, data)) in (1..).zip(&events) {
        anyhow::ensure!(
            *data == event_data(c, seq, args.size),
            "ch-{c}: event {seq} ({id}) reads {data:?}"
        );
    }
    Ok(events.len() as u64)
}

/// Waits until no channel is active, by the server's own `dormouse_objects` gauge.
async fn wait_hibernated(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let active = metric_line(client, base, |l| {
            l.starts_with("dormouse_objects{")
                && l.contains("state=\"active\"")
                && l.contains("namespace=\"channel\"")
        })
        .await?
        .unwrap_or(0.0);
        if active == 0.0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{active} channels still active");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of the first `/metrics` line that `pick` chooses.
async fn metric_line(
    client: &reqwest::Client,
    base: &str,
    pick: impl Fn(&str) -> bool,
) -> anyhow::Result<Option<f64>> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find(|l| pick(l))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok()))
}
