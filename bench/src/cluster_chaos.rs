//! `dormouse-bench cluster-chaos`: cluster mode under faults, bounded in time. Three NATS
//! servers and three nodes on loopback; publishers over a few hundred channels through
//! random nodes (each message with an idempotency key, retried through another node until
//! acknowledged); SSE subscribers that reconnect to random nodes with `Last-Event-ID`.
//! Meanwhile, in turn:
//! 1. the node owning the most channels is killed (SIGKILL), and restarted;
//! 2. the NATS server leading the most journal streams is killed, and restarted;
//! 3. both at once;
//! 4. a node is paused (SIGSTOP) past its `node_ttl`, then continued (its appends must be
//!    refused by the journal: another node took its channels over);
//! 5. every node is killed and restarted.
//!
//! Checks: every acknowledged publish is in its channel's history exactly once; a
//! publisher's messages to a channel are in the order it published them; every subscriber
//! saw each channel's events once, in order, with no jump that was not announced by a gap
//! event, and caught up with the channel's end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dormouse_cluster::Directory;
use dormouse_testkit::nats::NatsCluster;
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cluster::{NAMES, Rig, owner_of, shard_of, stream_leader};

/// `dormouse-bench cluster-chaos`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The `dormouse` binary (default: next to this one, or target/release/dormouse).
    #[arg(long)]
    pub server_bin: Option<std::path::PathBuf>,
    /// Channels published to.
    #[arg(long, default_value_t = 200)]
    pub channels: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// SSE subscribers (each follows one channel, reconnecting to random nodes).
    #[arg(long, default_value_t = 12)]
    pub subscribers: usize,
    /// Seconds of load between two faults.
    #[arg(long, default_value_t = 6)]
    pub settle_secs: u64,
    /// `cluster.node_ttl` of the nodes.
    #[arg(long, default_value = "3s")]
    pub node_ttl: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub params: Value,
    pub faults: Vec<Value>,
    pub acknowledged: u64,
    pub publish_retries: u64,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub reordered: Vec<String>,
    pub subscriber_events: u64,
    pub subscriber_reconnects: u64,
    pub subscriber_gaps_announced: u64,
    pub subscriber_violations: Vec<String>,
    pub seconds: f64,
}

/// An acknowledged publish.
#[derive(Debug, Clone)]
struct Acked {
    channel: String,
    id: String,
    payload: String,
}

fn seq_of(id: &str) -> Option<(String, u64)> {
    let (epoch, seq) = id.split_once('-')?;
    Some((epoch.to_string(), seq.parse().ok()?))
}

/// Shared between the load tasks and the fault driver.
struct Load {
    bases: Mutex<Vec<String>>,
    stop: AtomicBool,
    acked: Mutex<Vec<Acked>>,
    retries: AtomicU64,
    events: AtomicU64,
    reconnects: AtomicU64,
    gaps: AtomicU64,
    violations: Mutex<Vec<String>>,
    /// Set once publishing stopped: each channel's last id, which subscribers catch up to.
    ends: Mutex<Option<HashMap<String, Option<String>>>>,
}

impl Load {
    /// Whether a subscriber at `last` on `channel` is done: the run is over and it reached
    /// the channel's end.
    fn caught_up(&self, channel: &str, last: &Option<String>) -> bool {
        let ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        ends.as_ref()
            .is_some_and(|ends| ends.get(channel).is_none_or(|end| end == last))
    }

    fn base(&self, i: usize) -> String {
        let bases = self.bases.lock().unwrap_or_else(|p| p.into_inner());
        bases[i % bases.len()].clone()
    }
}

/// A small deterministic generator per task.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

async fn publisher(load: Arc<Load>, who: usize, channels: usize) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .expect("a client");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (who as u64 + 1));
    let mut n = 0u64;
    while !load.stop.load(Ordering::Acquire) {
        let channel = format!("chaos-{}", rng.below(channels));
        let payload = format!("p{who}-{n}");
        n += 1;
        // Until acknowledged, through any node; the key makes a retry of a publish that
        // was stored after all answer with its first id.
        loop {
            let base = load.base(rng.below(3));
            let answer = client
                .post(format!("{base}/v1/channels/{channel}/messages"))
                .header("Idempotency-Key", &payload)
                .body(payload.clone())
                .send()
                .await;
            if let Ok(response) = answer
                && response.status().is_success()
                && let Ok(json) = response.json::<Value>().await
                && let Some(id) = json["id"].as_str()
            {
                load.acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Acked {
                        channel: channel.clone(),
                        id: id.to_string(),
                        payload: payload.clone(),
                    });
                break;
            }
            load.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One subscriber: follows `channel`, reconnecting to a random node every few seconds (and
/// whenever its stream ends), checking what it sees. Returns its last id once the run is
/// over and it reached the channel's end (or after a minute of trying to).
async fn subscriber(load: Arc<Load>, who: usize, channel: String) -> Option<String> {
    let mut give_up: Option<tokio::time::Instant> = None;
    let client = reqwest::Client::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (who as u64 + 7));
    let mut last: Option<String> = None;
    let mut seen = HashSet::new();
    let complain = |what: String| {
        load.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("subscriber {who} on {channel}: {what}"));
    };
    loop {
        if load.caught_up(&channel, &last) {
            return last;
        }
        if load.stop.load(Ordering::Acquire) {
            let deadline = *give_up
                .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(60));
            if tokio::time::Instant::now() > deadline {
                return last;
            }
        }
        let base = load.base(rng.below(3));
        let mut request = client.get(format!("{base}/v1/channels/{channel}/events"));
        if let Some(id) = &last {
            request = request.header("Last-Event-ID", id.as_str());
        }
        let Ok(response) = request.send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !response.status().is_success() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        load.reconnects.fetch_add(1, Ordering::Relaxed);
        let mut parser = dormouse_client::sse::Parser::default();
        let mut body = response.bytes_stream();
        let stay = Duration::from_millis(1000 + rng.below(4000) as u64);
        let until = tokio::time::Instant::now() + stay;
        let mut announced_gap = false;
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until, body.next()).await {
            for event in parser.feed(&chunk) {
                if event.event.starts_with("dormouse.") {
                    if event.event == "dormouse.gap" {
                        load.gaps.fetch_add(1, Ordering::Relaxed);
                        announced_gap = true;
                    }
                    continue;
                }
                let Some(id) = event.id.clone() else { continue };
                load.events.fetch_add(1, Ordering::Relaxed);
                if !seen.insert(id.clone()) {
                    complain(format!("{id} twice"));
                }
                if let (Some(prev), Some(now)) = (last.as_deref().and_then(seq_of), seq_of(&id))
                    && prev.0 == now.0
                    && now.1 != prev.1 + 1
                    && !announced_gap
                {
                    complain(format!(
                        "{} then {id} without a gap event",
                        last.clone().unwrap_or_default()
                    ));
                }
                announced_gap = false;
                last = Some(id);
            }
            if load.caught_up(&channel, &last) {
                return last;
            }
        }
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let started = Instant::now();
    let Rig {
        mut nats,
        dir: _dir,
        client,
        mut nodes,
        bench_nats,
        directory,
    } = Rig::start(
        args.server_bin.clone(),
        &args.node_ttl,
        // Long: owners stay active through a pause, so their next appends meet the fence.
        "30s",
        "chaos",
    )
    .await?;
    let load = Arc::new(Load {
        bases: Mutex::new(nodes.bases.clone()),
        stop: AtomicBool::new(false),
        acked: Mutex::new(Vec::new()),
        retries: AtomicU64::new(0),
        events: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        violations: Mutex::new(Vec::new()),
        ends: Mutex::new(None),
    });
    let publishers: Vec<_> = (0..args.publishers)
        .map(|who| tokio::spawn(publisher(load.clone(), who, args.channels)))
        .collect();
    let followed: Vec<String> = (0..args.subscribers)
        .map(|i| format!("chaos-{}", i * args.channels / args.subscribers.max(1)))
        .collect();
    let subscribers: Vec<_> = followed
        .iter()
        .enumerate()
        .map(|(who, channel)| tokio::spawn(subscriber(load.clone(), who, channel.clone())))
        .collect();
    let settle = Duration::from_secs(args.settle_secs);
    let pause = humantime::parse_duration(&args.node_ttl)? + Duration::from_secs(2);
    let mut faults = Vec::new();
    tokio::time::sleep(settle).await;

    // The node owning the most channels, by the directory.
    let busiest = |directory: Directory, channels: usize| async move {
        let mut counts = [0usize; 4];
        for c in 0..channels {
            match owner_of(&directory, &format!("chaos-{c}")).await {
                Ok(Some(i)) => counts[i] += 1,
                Ok(None) => {}
                // Unreadable (the directory's stream electing a leader): counted apart.
                Err(_) => counts[3] += 1,
            }
        }
        let most = (0..3).max_by_key(|i| counts[*i]).unwrap_or(0);
        (most, counts)
    };
    // The NATS server leading the most journal streams.
    let top_leader = |nats: &NatsCluster, leaders: &[String]| -> Option<usize> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for l in leaders {
            *counts.entry(l.as_str()).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .and_then(|(name, _)| nats.index_of(name))
    };
    let leaders = |bench_nats: dormouse_cluster::Nats| async move {
        let mut out = Vec::new();
        for shard in 0..dormouse_cluster::JournalSpec::new("dm", 3).shards {
            if let Ok(leader) = stream_leader(&bench_nats, shard).await {
                out.push(leader);
            }
        }
        out
    };
    let _ = shard_of;

    // 1. Kill the busiest node, restart it.
    let (victim, counts) = busiest(directory.clone(), args.channels).await;
    nodes.procs[victim].kill9()?;
    faults.push(json!({"fault": "kill node", "node": NAMES[victim], "owned": counts}));
    tokio::time::sleep(settle).await;
    nodes.respawn(victim, &client).await?;
    *load.bases.lock().unwrap_or_else(|p| p.into_inner()) = nodes.bases.clone();
    tokio::time::sleep(settle).await;

    // 2. Kill the NATS server leading the most streams, restart it.
    let leading = leaders(bench_nats.clone()).await;
    if let Some(server) = top_leader(&nats, &leading) {
        nats.kill(server);
        faults.push(json!({"fault": "kill NATS leader", "server": format!("n{}", server + 1), "leads": leading}));
        tokio::time::sleep(settle + Duration::from_secs(4)).await;
        nats.restart(server);
        tokio::time::sleep(settle).await;
    }

    // 3. Both at once.
    let (victim, counts) = busiest(directory.clone(), args.channels).await;
    let leading = leaders(bench_nats.clone()).await;
    if let Some(server) = top_leader(&nats, &leading) {
        nodes.procs[victim].kill9()?;
        nats.kill(server);
        faults.push(json!({"fault": "kill node and NATS leader", "node": NAMES[victim], "owned": counts, "server": format!("n{}", server + 1)}));
        tokio::time::sleep(settle + Duration::from_secs(4)).await;
        nats.restart(server);
        nodes.respawn(victim, &client).await?;
        *load.bases.lock().unwrap_or_else(|p| p.into_inner()) = nodes.bases.clone();
        tokio::time::sleep(settle).await;
    }

    // 4. Pause a node past its TTL, then continue it.
    let (victim, counts) = busiest(directory.clone(), args.channels).await;
    signal(nodes.procs[victim].pid, "STOP")?;
    faults.push(json!({"fault": "SIGSTOP node past its TTL", "node": NAMES[victim], "owned": counts, "paused_secs": pause.as_secs_f64()}));
    tokio::time::sleep(pause).await;
    signal(nodes.procs[victim].pid, "CONT")?;
    tokio::time::sleep(settle).await;
    // What the journal refused the paused node once it continued.
    let metrics = client
        .get(format!("{}/metrics", nodes.bases[victim]))
        .send()
        .await?
        .text()
        .await?;
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(fault) = faults.last_mut() {
        fault["fenced_appends_after_continue"] = json!(counter("dormouse_cluster_fenced_total"));
        fault["calls_that_found_the_owner_moved"] = json!(counter("dormouse_cluster_moved_total"));
        fault["unreplicated_after_continue"] =
            json!(counter("dormouse_cluster_unreplicated_total"));
        fault["objects_held_after_continue"] = json!(counter("dormouse_cluster_objects_held"));
        fault["log_refusals"] = json!(
            nodes.procs[victim]
                .log_text()
                .matches("refused a write")
                .count()
        );
    }

    // 5. Kill and restart every node.
    for i in 0..3 {
        nodes.procs[i].kill9()?;
    }
    faults.push(json!({"fault": "kill every node, restart"}));
    for i in 0..3 {
        nodes.respawn(i, &client).await?;
    }
    *load.bases.lock().unwrap_or_else(|p| p.into_inner()) = nodes.bases.clone();
    tokio::time::sleep(settle).await;

    // Stop publishing, then let subscribers catch up and stop.
    load.stop.store(true, Ordering::Release);
    for task in publishers {
        task.await?;
    }
    let acked = load.acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut histories: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let base = load.base(0);
    let mut channels: Vec<String> = acked.iter().map(|a| a.channel.clone()).collect();
    channels.extend(followed.iter().cloned());
    channels.sort();
    channels.dedup();
    for channel in &channels {
        let mut events = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{base}/v1/channels/{channel}/messages?limit=1000");
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let page: Value = client.get(&url).send().await?.json().await?;
            let page_events = page["events"].as_array().cloned().unwrap_or_default();
            if page_events.is_empty() {
                break;
            }
            for e in &page_events {
                events.push((
                    e["id"].as_str().unwrap_or_default().to_string(),
                    e["data"].as_str().unwrap_or_default().to_string(),
                ));
            }
            after = page["next_after"].as_str().map(str::to_string);
        }
        histories.insert(channel.clone(), events);
    }
    // Subscribers: each reaches its channel's end, or gives up after a minute.
    *load.ends.lock().unwrap_or_else(|p| p.into_inner()) = Some(
        histories
            .iter()
            .map(|(channel, events)| (channel.clone(), events.last().map(|(id, _)| id.clone())))
            .collect(),
    );
    let mut lasts = Vec::new();
    for task in subscribers {
        lasts.push(task.await?);
    }
    let mut violations = load
        .violations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (who, (channel, last)) in followed.iter().zip(&lasts).enumerate() {
        let end = histories
            .get(channel)
            .and_then(|h| h.last())
            .map(|(id, _)| id.clone());
        if end.is_some() && last != &end {
            violations.push(format!(
                "subscriber {who} on {channel}: ended at {last:?}, the channel at {end:?}"
            ));
        }
    }

    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    let mut reordered = Vec::new();
    for (channel, events) in &histories {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (_, payload) in events {
            *counts.entry(payload.as_str()).or_default() += 1;
        }
        for (payload, n) in &counts {
            if *n > 1 {
                duplicated.push(format!("{channel}: {payload} x{n}"));
            }
        }
        let position: HashMap<&str, usize> = events
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        // Per publisher: its messages in the order it published them.
        let mut by_publisher: HashMap<&str, Vec<(u64, usize)>> = HashMap::new();
        for a in acked.iter().filter(|a| &a.channel == channel) {
            match position.get(a.id.as_str()) {
                None => lost.push(format!("{channel}: {} ({})", a.payload, a.id)),
                Some(at) => {
                    if events[*at].1 != a.payload {
                        lost.push(format!(
                            "{channel}: {} acknowledged as {} which holds {}",
                            a.payload, a.id, events[*at].1
                        ));
                    }
                    let (who, n) = a.payload.split_once('-').context("a payload")?;
                    by_publisher
                        .entry(who)
                        .or_default()
                        .push((n.parse().unwrap_or(0), *at));
                }
            }
        }
        for (who, mut sent) in by_publisher {
            sent.sort();
            if sent.windows(2).any(|w| w[0].1 > w[1].1) {
                reordered.push(format!("{channel}: publisher {who}"));
            }
        }
    }
    let ok =
        lost.is_empty() && duplicated.is_empty() && reordered.is_empty() && violations.is_empty();
    Ok(Report {
        ok,
        params: json!({
            "channels": args.channels,
            "publishers": args.publishers,
            "subscribers": args.subscribers,
            "settle_secs": args.settle_secs,
            "node_ttl": args.node_ttl,
        }),
        faults,
        acknowledged: acked.len() as u64,
        publish_retries: load.retries.load(Ordering::Relaxed),
        lost,
        duplicated,
        reordered,
        subscriber_events: load.events.load(Ordering::Relaxed),
        subscriber_reconnects: load.reconnects.load(Ordering::Relaxed),
        subscriber_gaps_announced: load.gaps.load(Ordering::Relaxed),
        subscriber_violations: violations,
        seconds: started.elapsed().as_secs_f64(),
    })
}
