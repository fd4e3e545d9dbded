//! The soak: steady publishers and churning subscribers for a long time, checking that no
//! subscriber ever misses or repeats a message across its reconnects and that the server's
//! memory stays flat. Each channel has one publisher sending consecutive numbers at a fixed
//! rate; each subscriber reads for a random while, drops its connection, waits, and resumes
//! with its last event id (over SSE and WebSocket alternately), so every reconnect exercises
//! the replay path.
//!
//! Run: `cargo run --release -p dormouse-bench -- soak --duration 2h`. The gateway's tests
//! run it for a few seconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::child::ServerProcess;
use dormouse_client::sse::{Event, Parser};

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// How long to run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub duration: Duration,
    /// Channels, each with one publisher.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Messages per second per channel.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Churning subscribers per channel.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Bytes per message (padding after the number).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Longest a subscriber stays connected before dropping (it stays between a tenth of
    /// this and this).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub max_session: Duration,
    /// Server memory is sampled this often.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub sample_every: Duration,
    /// The dormouse binary [default: `dormouse` next to this binary, or
    /// target/release/dormouse].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

/// What the soak saw.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub duration_secs: f64,
    pub channels: usize,
    pub rate_per_channel: u32,
    pub subscribers: usize,
    pub published: u64,
    pub publish_errors: u64,
    /// Messages subscribers received, all sessions together.
    pub delivered: u64,
    /// Subscriber connections made (the first and every resume).
    pub sessions: u64,
    /// Messages missed or repeated across a resume, or out of order; must be 0.
    pub gaps: u64,
    pub duplicates: u64,
    /// Described failures (the first 20).
    pub violations: Vec<String>,
    /// Server RSS samples, bytes, one per `sample_every`.
    pub rss_samples: Vec<u64>,
    /// Mean RSS of the first and of the last quarter of the samples, and their ratio.
    pub rss_first_quarter: u64,
    pub rss_last_quarter: u64,
    pub rss_growth: f64,
    pub ok: bool,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    publish_errors: AtomicU64,
    delivered: AtomicU64,
    sessions: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
}

/// Runs the soak (see the module doc).
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => crate::default_server_bin()?,
    };
    let dir = tempfile::Builder::new()
        .prefix("dormouse-soak-")
        .tempdir()?;
    let mut server =
        ServerProcess::start(&bin, &dir.path().join("data"), dir.path(), "always", 0, &[])?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = server.wait_ready(&client).await?;
    let counters = Arc::new(Counters::default());
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for c in 0..args.channels {
        let channel = format!("soak-{c}");
        // Subscribers first, so each sees the channel from its first message.
        for s in 0..args.subscribers {
            tasks.push(tokio::spawn(subscriber(
                base.clone(),
                channel.clone(),
                c * 1000 + s,
                args.max_session,
                counters.clone(),
                violations.clone(),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(publisher(
            client.clone(),
            format!("{base}/v1/channels/{channel}/messages"),
            args.rate,
            args.size,
            counters.clone(),
            stop.clone(),
        )));
    }

    let mut rss_samples = Vec::new();
    let mut next_sample = Instant::now() + args.sample_every;
    while started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if Instant::now() >= next_sample {
            rss_samples.push(crate::proc::process_rss_bytes(server.pid)?);
            next_sample += args.sample_every;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await??;
    }
    server.stop_gracefully()?;

    let quarter = (rss_samples.len() / 4).max(1);
    let mean = |s: &[u64]| s.iter().sum::<u64>() / (s.len().max(1) as u64);
    let first = mean(&rss_samples[..quarter.min(rss_samples.len())]);
    let last = mean(&rss_samples[rss_samples.len().saturating_sub(quarter)..]);
    let c = &counters;
    let gaps = c.gaps.load(Ordering::SeqCst);
    let duplicates = c.duplicates.load(Ordering::SeqCst);
    let publish_errors = c.publish_errors.load(Ordering::SeqCst);
    let mut violations = violations.lock().await.clone();
    violations.truncate(20);
    Ok(Report {
        scenario: "soak",
        duration_secs: started.elapsed().as_secs_f64(),
        channels: args.channels,
        rate_per_channel: args.rate,
        subscribers: args.channels * args.subscribers,
        published: c.published.load(Ordering::SeqCst),
        publish_errors,
        delivered: c.delivered.load(Ordering::SeqCst),
        sessions: c.sessions.load(Ordering::SeqCst),
        gaps,
        duplicates,
        ok: gaps == 0 && duplicates == 0 && publish_errors == 0 && violations.is_empty(),
        violations,
        rss_growth: if first > 0 {
            last as f64 / first as f64
        } else {
            0.0
        },
        rss_samples,
        rss_first_quarter: first,
        rss_last_quarter: last,
    })
}

/// Publishes `0`, `1`, `2`, ... (padded to `size`) at `rate` per second until `stop`.
async fn publisher(
    client: reqwest::Client,
    url: String,
    rate: u32,
    size: usize,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let mut body = n.to_string();
        body.push(' ');
        while body.len() < size {
            body.push('.');
        }
        match client.post(&url).body(body).send().await {
            Ok(res) if res.status() == 201 => {
                counters.published.fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
            // Counted, and the same number is tried again: a failed publish is not a gap.
            _ => {
                counters.publish_errors.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    Ok(())
}

/// Connects, reads for a random while, drops, waits, resumes with its last id; over SSE and
/// WebSocket alternately. Checks each message is the successor of the one before it.
async fn subscriber(
    base: String,
    channel: String,
    seed: usize,
    max_session: Duration,
    counters: Arc<Counters>,
    violations: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut rng = crate::crash::XorShift((seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // The last (id, number) received, carried across sessions.
    let mut last: Option<(String, u64)> = None;
    let client = reqwest::Client::new();
    let mut session = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let length = max_session.mul_f64(0.1 + 0.9 * rng.unit());
        let deadline = tokio::time::Instant::now() + length;
        counters.sessions.fetch_add(1, Ordering::SeqCst);
        let resume = last.as_ref().map(|(id, _)| id.clone());
        let mut on_message = |id: String, data: &str| {
            let Some(n) = data.split(' ').next().and_then(|n| n.parse::<u64>().ok()) else {
                return Some(format!("{channel}: unexpected payload {data:?}"));
            };
            counters.delivered.fetch_add(1, Ordering::SeqCst);
            let problem = match &last {
                Some((_, prev)) if n == prev + 1 => None,
                Some((_, prev)) if n <= *prev => {
                    counters.duplicates.fetch_add(1, Ordering::SeqCst);
                    Some(format!("{channel}: {n} after {prev} (repeat)"))
                }
                Some((_, prev)) => {
                    counters.gaps.fetch_add(1, Ordering::SeqCst);
                    Some(format!("{channel}: {n} after {prev} (gap)"))
                }
                // A first session may join mid-stream.
                None => None,
            };
            last = Some((id, n));
            problem
        };
        let problems = if session.is_multiple_of(2) {
            sse_session(
                &client,
                &base,
                &channel,
                resume,
                deadline,
                &stop,
                &mut on_message,
            )
            .await
        } else {
            ws_session(&base, &channel, resume, deadline, &stop, &mut on_message).await
        }
        .with_context(|| format!("subscriber session on {channel}"))?;
        if !problems.is_empty() {
            violations.lock().await.extend(problems);
        }
        session += 1;
        // Offline for a moment; messages published meanwhile must come on resume.
        tokio::time::sleep(Duration::from_millis(50 + (rng.unit() * 500.0) as u64)).await;
    }
    Ok(())
}

type OnMessage<'a> = &'a mut (dyn FnMut(String, &str) -> Option<String> + Send);

async fn sse_session(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    resume: Option<String>,
    deadline: tokio::time::Instant,
    stop: &AtomicBool,
    on_message: OnMessage<'_>,
) -> anyhow::Result<Vec<String>> {
    let mut request = client.get(format!("{base}/v1/channels/{channel}/events"));
    if let Some(id) = &resume {
        request = request.header("last-event-id", id);
    }
    let res = request.send().await?.error_for_status()?;
    let mut stream = res.bytes_stream();
    let mut parser = Parser::default();
    let mut problems = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Ok(chunk) = tokio::time::timeout_at(deadline, stream.next()).await else {
            break;
        };
        let Some(chunk) = chunk else {
            problems.push(format!("{channel}: the SSE stream ended"));
            break;
        };
        for Event { id, event, data } in parser.feed(&chunk?) {
            match (id, event.as_str()) {
                (Some(id), "message") => problems.extend(on_message(id, &data)),
                (None, "message") => {
                    problems.push(format!("{channel}: a message without an id: {data:?}"));
                }
                // Its id, when it has one, is where the stream starts: not an event.
                (_, "dormouse.connected") => {}
                (_, event) => problems.push(format!("{channel}: SSE event {event}: {data:?}")),
            }
        }
    }
    Ok(problems)
}

async fn ws_session(
    base: &str,
    channel: &str,
    resume: Option<String>,
    deadline: tokio::time::Instant,
    stop: &AtomicBool,
    on_message: OnMessage<'_>,
) -> anyhow::Result<Vec<String>> {
    let mut url = format!(
        "{}/v1/channels/{channel}/ws",
        base.replacen("http://", "ws://", 1)
    );
    if let Some(id) = &resume {
        url.push_str(&format!("?last_event_id={id}"));
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let mut problems = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Ok(message) = tokio::time::timeout_at(deadline, ws.next()).await else {
            break;
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                let value: serde_json::Value = serde_json::from_str(&text)?;
                match (
                    value["type"].as_str(),
                    value["id"].as_str(),
                    value["data"].as_str(),
                ) {
                    (Some("message"), Some(id), Some(data)) => {
                        problems.extend(on_message(id.to_string(), data));
                    }
                    (Some("connected"), None, None) => {}
                    _ => problems.push(format!("{channel}: WebSocket message {value}")),
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                problems.push(format!("{channel}: WebSocket error {e}"));
                break;
            }
            None => {
                problems.push(format!("{channel}: the WebSocket ended"));
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    let _ = ws.flush().await;
    Ok(problems)
}
