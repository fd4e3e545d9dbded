//! Cluster mode measured from outside, as issue 16's targets put it: three NATS servers and
//! three `dormouse` nodes (child processes) on loopback.
//!
//! - **latency**: sequential publishes to one channel through its owner and through another
//!   node; p50/p99/max, and the CPU the six processes used per publish.
//! - **failover**: a channel's owner is killed (SIGKILL) and the time until a publish through
//!   a surviving node is acknowledged is measured; the killed node is restarted under its
//!   name before the next round. Every round also checks the history is intact (no
//!   acknowledged publish lost, the next id follows the last).
//! - **memory**: many channels with a few events each are published through one node and
//!   left to hibernate, twice (different channels): the first fill warms the processes up
//!   (allocator arenas, buffers, connections: a fixed cost that does not depend on the
//!   number of channels), the second is measured, so the figure is the cost of one more
//!   hibernated channel. The sum of the three nodes' RSS growth per channel, next to a
//!   single-node server given the same two fills.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dormouse_cluster::{ClusterStorage, Directory, DirectorySpec, NatsSettings, connect};
use dormouse_storage::ObjectId;
use dormouse_testkit::nats::NatsCluster;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::child::ServerProcess;
use crate::proc::{cpu_secs, process_rss_bytes};

/// `dormouse-bench cluster`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The `dormouse` binary (default: next to this one, or target/release/dormouse).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Sequential publishes through each of the owner and another node.
    #[arg(long, default_value_t = 2000)]
    pub publishes: u64,
    /// Owner kills (each followed by a restart of the killed node).
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Channels for the memory figure (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    pub channels: u64,
    /// Events per channel for the memory figure.
    #[arg(long, default_value_t = 10)]
    pub events: u64,
    /// `cluster.node_ttl` of the nodes.
    #[arg(long, default_value = "5s")]
    pub node_ttl: String,
    /// Kills of the NATS server that leads a channel's stream.
    #[arg(long, default_value_t = 3)]
    pub leader_kills: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub params: Value,
    pub latency: Value,
    pub failover: Value,
    pub nats_leader_loss: Value,
    pub memory: Value,
}

/// The three nodes and what restarting one needs.
pub(crate) struct Nodes {
    bin: PathBuf,
    dir: PathBuf,
    urls: String,
    node_ttl: String,
    idle_timeout: String,
    pub(crate) procs: Vec<ServerProcess>,
    pub(crate) bases: Vec<String>,
    runs: usize,
}

pub(crate) const NAMES: [&str; 3] = ["n1", "n2", "n3"];

impl Nodes {
    fn env(&self, i: usize) -> Vec<(&'static str, String)> {
        vec![
            ("DORMOUSE_CLUSTER_NATS_URLS", self.urls.clone()),
            ("DORMOUSE_CLUSTER_NODE_NAME", NAMES[i].to_string()),
            ("DORMOUSE_CLUSTER_NODE_TTL", self.node_ttl.clone()),
            ("DORMOUSE_LIMITS_MAX_MESSAGE_SIZE", "512KiB".to_string()),
            ("DORMOUSE_CHANNELS_IDLE_TIMEOUT", self.idle_timeout.clone()),
        ]
    }

    async fn spawn(
        &mut self,
        i: usize,
        client: &reqwest::Client,
    ) -> anyhow::Result<(ServerProcess, String)> {
        let env = self.env(i);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let data = self.dir.join(NAMES[i]);
        std::fs::create_dir_all(&data)?;
        self.runs += 1;
        let mut proc =
            ServerProcess::start(&self.bin, &data, &self.dir, "always", self.runs, &env)?;
        let base = proc
            .wait_ready_within(client, Duration::from_secs(60))
            .await?;
        Ok((proc, base))
    }

    /// Starts node `i` again under its name (after a kill).
    pub(crate) async fn respawn(
        &mut self,
        i: usize,
        client: &reqwest::Client,
    ) -> anyhow::Result<()> {
        let (proc, base) = self.spawn(i, client).await?;
        self.procs[i] = proc;
        self.bases[i] = base;
        Ok(())
    }

    pub(crate) async fn start(
        bin: PathBuf,
        dir: &Path,
        urls: String,
        node_ttl: String,
        idle_timeout: &str,
        client: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let mut nodes = Self {
            bin,
            dir: dir.to_path_buf(),
            urls,
            node_ttl,
            idle_timeout: idle_timeout.to_string(),
            procs: Vec::new(),
            bases: Vec::new(),
            runs: 0,
        };
        for i in 0..3 {
            let (proc, base) = nodes.spawn(i, client).await?;
            nodes.procs.push(proc);
            nodes.bases.push(base);
        }
        Ok(nodes)
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }
}

/// Publishes `body` to `channel` through `base`: its id, or the failure.
async fn publish(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    body: String,
) -> anyhow::Result<String> {
    publish_keyed(client, base, channel, body, None).await
}

/// [`publish`], with an `Idempotency-Key` when a failed attempt may have been stored and is
/// retried: the retry then answers the first attempt's id instead of storing it twice.
async fn publish_keyed(
    client: &reqwest::Client,
    base: &str,
    channel: &str,
    body: String,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let mut request = client
        .post(format!("{base}/v1/channels/{channel}/messages"))
        .body(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await?;
    let status = response.status();
    let json: Value = response.json().await.unwrap_or(Value::Null);
    // 200 answers a retry whose first attempt was stored (`"duplicate": true`).
    anyhow::ensure!(
        status.as_u16() == 201 || (status.as_u16() == 200 && json["duplicate"] == true),
        "{status}: {json}"
    );
    json["id"].as_str().map(str::to_string).context("an id")
}

fn figures(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
        "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
        "max_ms": h.max() as f64 / 1000.0,
    })
}

fn cpu_of(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
}

/// Which node owns `channel` now, by the directory.
pub(crate) async fn owner_of(
    directory: &Directory,
    channel: &str,
) -> anyhow::Result<Option<usize>> {
    let key = ClusterStorage::object_key(&ObjectId::new("channel", channel));
    Ok(directory
        .owner(&key)
        .await?
        .and_then(|(node, _)| NAMES.iter().position(|n| *n == node.name)))
}

/// Three NATS servers and three nodes, plus the harness's own connection and a view of
/// the owner directory: what both cluster commands measure against.
pub(crate) struct Rig {
    pub(crate) nats: NatsCluster,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) client: reqwest::Client,
    pub(crate) nodes: Nodes,
    pub(crate) bench_nats: dormouse_cluster::Nats,
    pub(crate) directory: Directory,
}

impl Rig {
    /// Starts it with `server_bin` (default: the build next to this one), the nodes'
    /// `node_ttl` and channel idle timeout; `who` names the harness's NATS connection.
    pub(crate) async fn start(
        server_bin: Option<PathBuf>,
        node_ttl: &str,
        channels_idle: &str,
        who: &str,
    ) -> anyhow::Result<Self> {
        let bin = match server_bin {
            Some(bin) => bin,
            None => crate::default_server_bin()?,
        };
        let nats = NatsCluster::start(3).await;
        let dir = tempfile::tempdir()?;
        let client = reqwest::Client::new();
        let nodes = Nodes::start(
            bin,
            dir.path(),
            nats.urls().join(","),
            node_ttl.to_string(),
            channels_idle,
            &client,
        )
        .await?;
        let bench_nats = connect(&NatsSettings::new(nats.urls(), who)).await?;
        let directory = Directory::open(
            &bench_nats,
            &DirectorySpec {
                prefix: "dm".into(),
                replicas: 3,
                node_ttl: humantime::parse_duration(node_ttl)?,
            },
        )
        .await?;
        Ok(Self {
            nats,
            dir,
            client,
            nodes,
            bench_nats,
            directory,
        })
    }
}

/// `id` is the event right after `last` in the same log (`epoch-seq` ids): a round lost
/// nothing.
fn ensure_next(round: usize, last: &str, id: &str) -> anyhow::Result<()> {
    let seq = |id: &str| {
        id.split_once('-')
            .and_then(|(epoch, seq)| Some((epoch.to_string(), seq.parse::<u64>().ok()?)))
    };
    anyhow::ensure!(
        seq(id) == seq(last).map(|(epoch, s)| (epoch, s + 1)),
        "round {round}: {last} then {id}"
    );
    Ok(())
}

/// The RSS of each of `pids`.
fn rss_each(pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    pids.iter().map(|p| process_rss_bytes(*p)).collect()
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let Rig {
        mut nats,
        dir,
        client,
        mut nodes,
        bench_nats,
        directory,
    } = Rig::start(
        args.server_bin.clone(),
        &args.node_ttl,
        // Short, so the memory figure sees every channel hibernated.
        "2s",
        "bench",
    )
    .await?;
    // What the cluster costs NATS doing nothing (heartbeats, tail checks), to hold the
    // per-publish counts against.
    let quiet = nats_traffic(&client, &nats).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = nats_traffic(&client, &nats).await?.since(&quiet).per(5.0);

    // Latency through the owner and through another node.
    publish(&client, &nodes.bases[0], "latency", "first".into()).await?;
    let owner = owner_of(&directory, "latency")
        .await?
        .context("the latency channel has an owner")?;
    let other = (owner + 1) % 3;
    let payload = "x".repeat(200);
    let mut latency = serde_json::Map::new();
    latency.insert("nats_idle_per_second".into(), idle);
    for (label, via) in [("through_owner", owner), ("through_another_node", other)] {
        let mut h = Histogram::<u64>::new(3)?;
        let traffic_before = nats_traffic(&client, &nats).await?;
        let (nodes_before, nats_before) = (cpu_of(&nodes.pids())?, cpu_of(&nats.pids())?);
        let started = Instant::now();
        for _ in 0..args.publishes {
            let t = Instant::now();
            publish(&client, &nodes.bases[via], "latency", payload.clone()).await?;
            h.record(t.elapsed().as_micros() as u64)?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let per_publish = |secs: f64| secs * 1000.0 / args.publishes as f64;
        let nodes_cpu = per_publish(cpu_of(&nodes.pids())? - nodes_before);
        let nats_cpu = per_publish(cpu_of(&nats.pids())? - nats_before);
        let traffic = nats_traffic(&client, &nats).await?.since(&traffic_before);
        let mut f = figures(&h);
        f["publishes_per_sec"] = json!(args.publishes as f64 / elapsed);
        f["nats_per_publish"] = traffic.per(args.publishes as f64);
        f["cpu_ms_per_publish_all_six_processes"] = json!(nodes_cpu + nats_cpu);
        f["cpu_ms_per_publish_dormouse_nodes"] = json!(nodes_cpu);
        f["cpu_ms_per_publish_nats_servers"] = json!(nats_cpu);
        latency.insert(label.into(), f);
    }

    // Failover: kill the owner, publish through a survivor until it is acknowledged.
    let mut takeover = Histogram::<u64>::new(3)?;
    let mut rounds = Vec::new();
    for round in 0..args.kills {
        let channel = format!("failover-{round}");
        let mut last = String::new();
        for i in 0..5 {
            last = publish(
                &client,
                &nodes.bases[i % 3],
                &channel,
                format!("before-{i}"),
            )
            .await?;
        }
        let owner = owner_of(&directory, &channel).await?.context("an owner")?;
        let survivor = (owner + 1 + round % 2) % 3;
        nodes.procs[owner].kill9()?;
        let killed = Instant::now();
        let mut tries = 0u32;
        let id = loop {
            tries += 1;
            match publish(&client, &nodes.bases[survivor], &channel, "after".into()).await {
                Ok(id) => break id,
                Err(e) => {
                    anyhow::ensure!(
                        killed.elapsed() < Duration::from_secs(60),
                        "round {round}: never served again: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let took = killed.elapsed();
        takeover.record(took.as_micros() as u64)?;
        // Nothing lost: the next id follows the last acknowledged one, and the history
        // through the survivor holds all six.
        ensure_next(round, &last, &id)?;
        let history: Value = client
            .get(format!(
                "{}/v1/channels/{channel}/messages",
                nodes.bases[survivor]
            ))
            .send()
            .await?
            .json()
            .await?;
        let events = history["events"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(events == 6, "round {round}: {events} events in the history");
        rounds.push(json!({"killed": NAMES[owner], "served_by": NAMES[survivor], "ms": took.as_millis(), "tries": tries}));
        // Bring the node back under its name before the next round.
        nodes.respawn(owner, &client).await?;
    }
    let failover = json!({
        "served_again": figures(&takeover),
        "rounds": rounds,
    });

    // The NATS server leading a channel's stream is killed: how long until a publish through
    // Dormouse is acknowledged again.
    let mut leader_loss = Vec::new();
    for round in 0..args.leader_kills {
        let channel = format!("leader-{round}");
        let mut last = publish(&client, &nodes.bases[0], &channel, "before".into()).await?;
        let subject_shard = {
            let nodes_storage_key =
                ClusterStorage::object_key(&ObjectId::new("channel", channel.as_str()));
            shard_of(&nodes_storage_key)
        };
        let leader = stream_leader(&bench_nats, subject_shard).await?;
        let index = nats
            .index_of(&leader)
            .context("the leader is one of ours")?;
        nats.kill(index);
        let killed = Instant::now();
        // NATS's own election time, to hold the write-back time against: when the stream
        // reports a leader other than the killed server.
        let elected = {
            let (nats, gone) = (bench_nats.clone(), leader.clone());
            tokio::spawn(async move {
                loop {
                    let asked = stream_leader(&nats, subject_shard);
                    match tokio::time::timeout(Duration::from_millis(500), asked)
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer")))
                    {
                        Ok(now) if now != gone => return Some(killed.elapsed()),
                        _ if killed.elapsed() > Duration::from_secs(90) => return None,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        };
        let via = round % 3;
        // An attempt that times out while the stream elects a leader may still have been
        // stored (ambiguous, as any replicated write); the key makes the retries safe.
        let key = format!("leader-loss-{round}");
        // What each failed attempt answered, and when (each kind once): where the time went.
        let mut failures: Vec<Value> = Vec::new();
        let id = loop {
            let attempt = Instant::now();
            match publish_keyed(
                &client,
                &nodes.bases[via],
                &channel,
                "after".into(),
                Some(&key),
            )
            .await
            {
                Ok(id) => break id,
                Err(e) => {
                    anyhow::ensure!(
                        killed.elapsed() < Duration::from_secs(90),
                        "round {round}: writes never came back: {e}"
                    );
                    let what: String = e.to_string().chars().take(160).collect();
                    if failures.last().is_none_or(|f| f["error"] != what.as_str()) {
                        failures.push(json!({
                            "at_ms": attempt.duration_since(killed).as_millis(),
                            "took_ms": attempt.elapsed().as_millis(),
                            "error": what,
                        }));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let took = killed.elapsed();
        let elected = elected.await?.map(|t| t.as_millis());
        ensure_next(round, &last, &id)?;
        last = id;
        nats.restart(index);
        // The next kill must find three current replicas, or it measures a stream left
        // without a quorum by a server still catching up, not an election.
        let caught_up = Instant::now();
        streams_current(&bench_nats, 8).await?;
        leader_loss.push(json!({
            "killed": leader,
            "ms": took.as_millis(),
            "stream_leader_elected_after_ms": elected,
            "last_id": last,
            "restarted_server_current_after_ms": caught_up.elapsed().as_millis(),
            "failed_attempts": failures,
        }));
    }
    let nats_leader_loss = json!({ "rounds": leader_loss });

    // Memory per hibernated channel, cluster against one node.
    let memory = if args.channels > 0 {
        fill(&client, &nodes.bases[0], "warm", args.channels, args.events).await?;
        // Idle timeout 2 s, then the copies' sweep and the allocator settle.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let baseline = rss_each(&nodes.pids())?;
        // Where a hibernated channel's records live in cluster mode: the NATS servers.
        let nats_baseline: u64 = rss_each(&nats.pids())?.iter().sum();
        fill(&client, &nodes.bases[0], "mem", args.channels, args.events).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let after = rss_each(&nodes.pids())?;
        let nats_grown = rss_each(&nats.pids())?
            .iter()
            .sum::<u64>()
            .saturating_sub(nats_baseline);
        let grown: u64 = after
            .iter()
            .zip(&baseline)
            .map(|(a, b)| a.saturating_sub(*b))
            .sum();
        let single_dir = dir.path().join("single");
        std::fs::create_dir_all(&single_dir)?;
        let mut single = ServerProcess::start(
            &nodes.bin,
            &single_dir,
            dir.path(),
            "always",
            1000,
            &[("DORMOUSE_CHANNELS_IDLE_TIMEOUT", "2s")],
        )?;
        let single_base = single.wait_ready(&client).await?;
        // The same sequential publishes on one node, back to back with the cluster's.
        publish(&client, &single_base, "latency", "first".into()).await?;
        let mut h = Histogram::<u64>::new(3)?;
        let cpu_before = cpu_secs(&single.pid.to_string())?;
        let started = Instant::now();
        for _ in 0..args.publishes {
            let t = Instant::now();
            publish(&client, &single_base, "latency", payload.clone()).await?;
            h.record(t.elapsed().as_micros() as u64)?;
        }
        let mut f = figures(&h);
        f["publishes_per_sec"] = json!(args.publishes as f64 / started.elapsed().as_secs_f64());
        f["cpu_ms_per_publish"] = json!(
            (cpu_secs(&single.pid.to_string())? - cpu_before) * 1000.0 / args.publishes as f64
        );
        latency.insert("single_node_durability_always".into(), f);
        fill(&client, &single_base, "warm", args.channels, args.events).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let single_baseline = process_rss_bytes(single.pid)?;
        fill(&client, &single_base, "mem", args.channels, args.events).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let single_grown = process_rss_bytes(single.pid)?.saturating_sub(single_baseline);
        json!({
            "channels": args.channels,
            "events_each": args.events,
            "cluster_rss_growth_bytes_per_node": after.iter().zip(&baseline).map(|(a, b)| a.saturating_sub(*b)).collect::<Vec<_>>(),
            "cluster_rss_growth_per_channel_bytes": grown as f64 / args.channels as f64,
            "single_node_rss_growth_per_channel_bytes": single_grown as f64 / args.channels as f64,
            "nats_servers_rss_growth_per_channel_bytes": nats_grown as f64 / args.channels as f64,
        })
    } else {
        Value::Null
    };

    Ok(Report {
        params: json!({
            "publishes": args.publishes,
            "kills": args.kills,
            "channels": args.channels,
            "events": args.events,
            "node_ttl": args.node_ttl,
            "leader_kills": args.leader_kills,
            "payload_bytes": 200,
            "nats_servers": 3,
            "replicas": 3,
        }),
        latency: Value::Object(latency),
        failover,
        nats_leader_loss,
        memory,
    })
}

/// The NATS servers' message and byte counters, summed (`/varz`): every message a server
/// took in or sent out, from clients, routes (replication) and JetStream itself.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    in_msgs: f64,
    out_msgs: f64,
    in_bytes: f64,
    out_bytes: f64,
}

impl Traffic {
    fn since(&self, before: &Traffic) -> Traffic {
        Traffic {
            in_msgs: self.in_msgs - before.in_msgs,
            out_msgs: self.out_msgs - before.out_msgs,
            in_bytes: self.in_bytes - before.in_bytes,
            out_bytes: self.out_bytes - before.out_bytes,
        }
    }

    /// Per unit of work (a publish, a second).
    fn per(&self, units: f64) -> Value {
        json!({
            "msgs_in": self.in_msgs / units,
            "msgs_out": self.out_msgs / units,
            "bytes_in": self.in_bytes / units,
            "bytes_out": self.out_bytes / units,
        })
    }
}

async fn nats_traffic(client: &reqwest::Client, nats: &NatsCluster) -> anyhow::Result<Traffic> {
    let mut sum = Traffic::default();
    for url in nats.monitor_urls() {
        let varz: Value = client
            .get(format!("{url}/varz"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let field = |name: &str| varz[name].as_f64().unwrap_or(0.0);
        sum.in_msgs += field("in_msgs");
        sum.out_msgs += field("out_msgs");
        sum.in_bytes += field("in_bytes");
        sum.out_bytes += field("out_bytes");
    }
    Ok(sum)
}

/// The journal stream a directory key's object lives in (as `ClusterStorage` places it).
pub(crate) fn shard_of(key: &str) -> usize {
    let (namespace, name) = key.split_once('/').unwrap_or(("", key));
    dormouse_cluster::journal::shard(
        namespace,
        name,
        dormouse_cluster::JournalSpec::new("dm", 3).shards,
    )
}

/// The server leading journal stream `shard`.
pub(crate) async fn stream_leader(
    nats: &dormouse_cluster::Nats,
    shard: usize,
) -> anyhow::Result<String> {
    let spec = dormouse_cluster::JournalSpec::new("dm", 3);
    let log = dormouse_cluster::FencedLog::open(
        nats,
        &dormouse_cluster::LogSpec {
            name: format!("DM_OBJ_{shard}"),
            subjects: vec![format!("dm.obj.{shard}.>")],
            replicas: spec.replicas,
            duplicate_window: spec.duplicate_window,
            republish: true,
        },
    )
    .await?;
    log.leader().await?.context("the stream has a leader")
}

/// Waits (up to a minute) until every journal stream has a leader and two current replicas.
async fn streams_current(nats: &dormouse_cluster::Nats, shards: usize) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    for shard in 0..shards {
        loop {
            let current = match js.get_stream(format!("DM_OBJ_{shard}")).await {
                Ok(mut stream) => stream.info().await.ok().and_then(|info| {
                    let cluster = info.cluster.as_ref()?;
                    Some(
                        cluster.leader.is_some()
                            && cluster.replicas.len() == 2
                            && cluster.replicas.iter().all(|r| r.current && !r.offline),
                    )
                }),
                Err(_) => None,
            };
            if current == Some(true) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "stream DM_OBJ_{shard} has no quorum of current replicas after a minute"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// `channels` channels with `events` events each, through one node's batch publish, 16
/// requests in flight.
async fn fill(
    client: &reqwest::Client,
    base: &str,
    prefix: &str,
    channels: u64,
    events: u64,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let per_request = 50u64;
    let requests = channels.div_ceil(per_request);
    let results = futures::stream::iter(0..requests)
        .map(|r| {
            let body: Vec<Value> = (r * per_request..((r + 1) * per_request).min(channels))
                .flat_map(|c| {
                    (0..events).map(move |e| {
                        json!({"channel": format!("{prefix}-{c}"), "data": format!("event {e:>6} of 64 bytes {}", ".".repeat(38))})
                    })
                })
                .collect();
            let request = client.post(format!("{base}/v1/publish")).json(&body);
            async move { crate::json_of(request).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for result in results {
        result?;
    }
    Ok(())
}
