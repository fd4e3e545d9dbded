//! The crash-safety harness: a `dormouse` child under constant publish load is killed with
//! SIGKILL at random moments and restarted on the same data dir, again and again, while one
//! SSE consumer per channel follows along and resumes with its last event id after each
//! restart. At the end every consumer must hold every acknowledged message exactly once, in
//! each publisher's order, with no gap events; a message whose answer was lost in a kill may
//! be there too (it was committed, its `201` never arrived), but never twice.
//!
//! Run: `cargo run --release -p dormouse-bench -- crash --cycles 50`. The gateway's test
//! suite runs the same code in a short form (`cli/tests/crash.rs`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::child::ServerProcess;
use dormouse_client::sse::{Event, Parser};

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Kill/restart cycles.
    #[arg(long, default_value_t = 20)]
    pub cycles: usize,
    /// Channels published to (one consumer each).
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    /// Sequential publishers per channel.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Shortest life of a server before its kill.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "200ms")]
    pub min_life: Duration,
    /// Longest life of a server before its kill.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1500ms")]
    pub max_life: Duration,
    /// Seed of the kill timing (default: from the clock); printed in the report.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Durability of the server (always, never, a period); only `always` promises that an
    /// acknowledged message survives a kill.
    #[arg(long, default_value = "always")]
    pub durability: String,
    /// The dormouse binary [default: `dormouse` next to this binary, or
    /// target/release/dormouse].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

/// What the harness saw.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub seed: u64,
    pub durability: String,
    pub cycles: usize,
    pub kills: usize,
    pub channels: usize,
    pub publishers_per_channel: usize,
    /// Messages whose `201` arrived.
    pub acknowledged: usize,
    /// Messages the consumers received (acknowledged or not), after the final catch-up.
    pub delivered: usize,
    /// Delivered messages whose answer was lost in a kill (allowed, at most once each).
    pub delivered_unacknowledged: usize,
    /// Every failure of the promise, described; empty means the run passed.
    pub violations: Vec<String>,
    pub elapsed_secs: f64,
    pub ok: bool,
}

/// Runs the harness (see the module doc).
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let started = Instant::now();
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => crate::default_server_bin()?,
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = XorShift(seed | 1);
    let dir = tempfile::Builder::new()
        .prefix("dormouse-crash-")
        .tempdir()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let channels: Vec<String> = (0..args.channels).map(|c| format!("crash-{c}")).collect();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // What each consumer received, and the id it resumes from.
    let consumed: Vec<Arc<Mutex<Consumed>>> = channels
        .iter()
        .map(|_| Arc::new(Mutex::new(Consumed::default())))
        .collect();
    let mut next_n = vec![0u64; args.channels * args.publishers];
    let mut kills = 0;
    let mut stored: HashMap<String, Vec<(String, String)>> = HashMap::new();

    for cycle in 0..=args.cycles {
        let last = cycle == args.cycles;
        // Retain everything, so a consumer's resume never meets a trimmed buffer.
        let retain_all = [
            ("DORMOUSE_CHANNELS_MAX_EVENTS", "100000000"),
            ("DORMOUSE_CHANNELS_MAX_BYTES", "4GiB"),
        ];
        let mut server = ServerProcess::start(
            &bin,
            &dir.path().join("data"),
            dir.path(),
            &args.durability,
            cycle,
            &retain_all,
        )?;
        let base = server.wait_ready(&client).await?;
        // Consumers first, so from the very first cycle nothing is published before them.
        let stop = Arc::new(AtomicBool::new(false));
        let mut consumers = Vec::new();
        for (c, channel) in channels.iter().enumerate() {
            let url = format!("{base}/v1/channels/{channel}/events");
            consumers.push(tokio::spawn(consume(
                client.clone(),
                url,
                consumed[c].clone(),
            )));
        }
        // Let the subscriptions open before publishing.
        for state in &consumed {
            wait_until(|| async { state.lock().await.connected_cycle == Some(cycle) }).await?;
        }
        if last {
            // The final, graceful run: catch every consumer up to its channel's last id.
            for (c, channel) in channels.iter().enumerate() {
                let info: serde_json::Value = client
                    .get(format!("{base}/v1/channels/{channel}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                let Some(last_id) = info["last_id"].as_str().map(str::to_string) else {
                    continue;
                };
                let state = consumed[c].clone();
                let target = seq_of(&last_id);
                // At or past it: under weak durability a consumer may hold live events that
                // storage lost, which the check below reports.
                wait_until(|| async {
                    state.lock().await.last_id.as_deref().map(seq_of) >= Some(target)
                })
                .await
                .with_context(|| format!("consumer of {channel} catching up to {last_id}"))?;
            }
            // And what is stored: the full history of each channel, read from the start.
            for channel in &channels {
                stored.insert(
                    channel.clone(),
                    read_history(&client, &base, channel).await?,
                );
            }
            server.stop_gracefully()?;
            for consumer in consumers {
                let _ = consumer.await;
            }
            break;
        }
        let mut publishers = Vec::new();
        for (p, n) in next_n.iter().enumerate() {
            let channel = channels[p % args.channels].clone();
            publishers.push(tokio::spawn(publish(
                client.clone(),
                format!("{base}/v1/channels/{channel}/messages"),
                channel,
                p,
                *n,
                ledger.clone(),
                stop.clone(),
            )));
        }
        let life = args.min_life
            + Duration::from_secs_f64(
                rng.unit() * (args.max_life.saturating_sub(args.min_life)).as_secs_f64(),
            );
        tokio::time::sleep(life).await;
        server.kill9()?;
        kills += 1;
        stop.store(true, Ordering::SeqCst);
        for (p, publisher) in publishers.into_iter().enumerate() {
            // The next number after the last one tried: an unanswered one is never reused.
            next_n[p] = publisher.await??;
        }
        for consumer in consumers {
            let _ = consumer.await;
        }
    }

    let ledger = ledger.lock().await;
    let mut violations = Vec::new();
    let mut delivered = 0;
    let mut delivered_unacknowledged = 0;
    for (c, channel) in channels.iter().enumerate() {
        let consumed = consumed[c].lock().await;
        violations.extend(consumed.violations.iter().cloned());
        delivered += consumed.events.len();
        let check = check_channel(channel, &consumed.events, &ledger);
        delivered_unacknowledged += check.unacknowledged;
        violations.extend(check.violations);
        // The stored history must hold the same: nothing acknowledged lost on disk either.
        let history = stored.get(channel).map_or(&[][..], Vec::as_slice);
        let check = check_channel(&format!("{channel} (stored)"), history, &ledger);
        // Stored-history findings first: they say whether the data itself is wrong.
        violations.splice(0..0, check.violations.into_iter().take(10));
    }
    violations.truncate(50);
    if !violations.is_empty() {
        // Kept for a post-mortem: the data dir and every run's server log.
        let kept = dir.keep();
        eprintln!(
            "crash harness: violations; data dir kept at {}",
            kept.display()
        );
    }
    Ok(Report {
        scenario: "crash",
        seed,
        durability: args.durability.clone(),
        cycles: args.cycles,
        kills,
        channels: args.channels,
        publishers_per_channel: args.publishers,
        acknowledged: ledger.acked.len(),
        delivered,
        delivered_unacknowledged,
        ok: violations.is_empty(),
        violations,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// Acknowledged messages: body → (channel, id).
#[derive(Debug, Default)]
struct Ledger {
    acked: HashMap<String, (String, String)>,
}

/// One consumer's view.
#[derive(Debug, Default)]
struct Consumed {
    /// (id, body) in arrival order.
    events: Vec<(String, String)>,
    last_id: Option<String>,
    /// The cycle whose server this consumer last subscribed to.
    connected_cycle: Option<usize>,
    cycle: usize,
    violations: Vec<String>,
}

/// Publishes `p:n`, `p:n+1`, ... one at a time until `stop`, recording each acknowledgement.
/// Returns the next number to use.
async fn publish(
    client: reqwest::Client,
    url: String,
    channel: String,
    p: usize,
    mut n: u64,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    while !stop.load(Ordering::SeqCst) {
        let body = format!("p{p}:{n}");
        n += 1;
        let Ok(res) = client.post(&url).body(body.clone()).send().await else {
            // The server died under us; this number is never used again.
            break;
        };
        if res.status() != 201 {
            break;
        }
        let Ok(answer) = res.json::<serde_json::Value>().await else {
            break;
        };
        let id = answer["id"]
            .as_str()
            .context("a 201 without an id")?
            .to_string();
        ledger
            .lock()
            .await
            .acked
            .insert(body, (channel.clone(), id));
    }
    Ok(n)
}

/// Follows one channel over SSE from the consumer's last id until the stream ends.
async fn consume(client: reqwest::Client, url: String, state: Arc<Mutex<Consumed>>) {
    let last_id = state.lock().await.last_id.clone();
    let mut request = client
        .get(&url)
        .timeout(Duration::from_secs(3600))
        .header("accept", "text/event-stream");
    if let Some(id) = &last_id {
        request = request.header("last-event-id", id);
    }
    let Ok(res) = request.send().await else {
        return;
    };
    if res.status() != 200 {
        let status = res.status();
        state
            .lock()
            .await
            .violations
            .push(format!("{url}: subscribe answered {status}"));
        return;
    }
    {
        let mut s = state.lock().await;
        s.connected_cycle = Some(s.cycle);
        s.cycle += 1;
    }
    let mut stream = res.bytes_stream();
    let mut parser = Parser::default();
    while let Some(Ok(chunk)) = stream.next().await {
        for Event { id, event, data } in parser.feed(&chunk) {
            let mut s = state.lock().await;
            match (id, event.as_str()) {
                (Some(id), "message") => {
                    s.last_id = Some(id.clone());
                    s.events.push((id, data));
                }
                (_, "dormouse.reconnect" | "dormouse.connected") => {}
                (_, other) => {
                    s.violations
                        .push(format!("{url}: unexpected event {other}: {data:?}"));
                }
            }
        }
    }
}

struct ChannelCheck {
    unacknowledged: usize,
    violations: Vec<String>,
}

/// Every stored event of `channel` as (id, text data), oldest first, through the history
/// route; a gap in it is an error.
pub(crate) async fn read_history(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/channels/{channel}/messages?limit=1000");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page = crate::json_of(client.get(&url)).await?;
        anyhow::ensure!(
            page["gap"].is_null(),
            "{channel}: history has a gap: {}",
            page["gap"]
        );
        let batch = page["events"]
            .as_array()
            .context("history without events")?;
        if batch.is_empty() {
            return Ok(events);
        }
        for event in batch {
            let id = event["id"]
                .as_str()
                .context("event without id")?
                .to_string();
            let data = event["data"]
                .as_str()
                .context("event without text data")?
                .to_string();
            events.push((id, data));
        }
        after = page["next_after"].as_str().map(str::to_string);
    }
}

/// Every acknowledged message of `channel` exactly once with its acknowledged id; ids
/// strictly increasing; each publisher's messages in its order; nothing twice.
fn check_channel(channel: &str, events: &[(String, String)], ledger: &Ledger) -> ChannelCheck {
    // The ledger names the channel without the "(stored)" label.
    let ledger_channel = channel.split(' ').next().unwrap_or(channel);
    let mut violations = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut last_seq: Option<u64> = None;
    let mut last_n: BTreeMap<String, u64> = BTreeMap::new();
    let mut unacknowledged = 0;
    for (i, (id, body)) in events.iter().enumerate() {
        *seen.entry(body.as_str()).or_default() += 1;
        if seen[body.as_str()] == 2 {
            violations.push(format!("{channel}: {body} delivered twice"));
        }
        let seq = id.rsplit('-').next().and_then(|s| s.parse::<u64>().ok());
        match (seq, last_seq) {
            (Some(seq), Some(last)) if seq <= last => {
                let before = &events[i.saturating_sub(3)..i];
                violations.push(format!(
                    "{channel}: id {id} ({body}, #{i}) does not follow seq {last}; before it: {before:?}"
                ));
            }
            (None, _) => violations.push(format!("{channel}: malformed id {id}")),
            _ => {}
        }
        last_seq = seq.or(last_seq);
        if let Some((publisher, n)) = body.split_once(':')
            && let Ok(n) = n.parse::<u64>()
            && let Some(prev) = last_n.insert(publisher.to_string(), n)
            && n <= prev
        {
            violations.push(format!("{channel}: {body} after {publisher}:{prev}"));
        }
        match ledger.acked.get(body) {
            Some((acked_channel, acked_id)) => {
                if acked_channel != ledger_channel || acked_id != id {
                    violations.push(format!(
                        "{channel}: {body} arrived as {id}, acknowledged as {acked_channel} {acked_id}"
                    ));
                }
            }
            None => unacknowledged += 1,
        }
    }
    for (body, (acked_channel, id)) in &ledger.acked {
        if acked_channel == ledger_channel && !seen.contains_key(body.as_str()) {
            violations.push(format!(
                "{channel}: acknowledged {body} ({id}) never delivered"
            ));
        }
    }
    ChannelCheck {
        unacknowledged,
        violations,
    }
}

/// The sequence number at the end of an event id (`{epoch}-{seq}`); 0 if malformed.
fn seq_of(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Polls `done` until it is true, for at most 20 s.
async fn wait_until<F, Fut>(done: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A tiny deterministic generator for kill timing (reproducible with `--seed`).
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    /// The next number in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
