//! The NATS JetStream facts cluster mode is designed on, measured here rather than taken on
//! trust: what a fenced, replicated append costs (latency, and the NATS servers' CPU per
//! append), and how long appends pause when the stream's leader is killed. It starts its own
//! three-server cluster on loopback (the pinned nats-server; see `testkit::nats`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use dormouse_cluster::{FencedLog, LogSpec, NatsSettings, connect};
use dormouse_testkit::nats::NatsCluster;
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Fenced appends timed on each subject, one after another.
    #[arg(long, default_value_t = 1500)]
    appends: u64,
    /// Subjects appended to at once, each by its own writer (as many channels' owners
    /// would): aggregate throughput and CPU per append under concurrency.
    #[arg(long, default_value_t = 1)]
    subjects: usize,
    /// Payload bytes per append.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Stream replicas (3 survives a server's loss).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Node to node requests timed (200 B echoed, the two nodes on different servers).
    #[arg(long, default_value_t = 1000)]
    rpc_calls: u64,
    /// Times the stream's leader is killed (and restarted) to time the pause.
    #[arg(long, default_value_t = 3)]
    leader_kills: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    nats_version: String,
    replicas: usize,
    subjects: usize,
    appends: u64,
    size: usize,
    append_p50_us: u64,
    append_p99_us: u64,
    append_max_us: u64,
    appends_per_sec: f64,
    /// CPU of all the NATS servers together, per append.
    nats_cpu_us_per_append: f64,
    rpc_p50_us: u64,
    rpc_p99_us: u64,
    /// Time from killing the stream's leader to the next acknowledged append (retried every
    /// 10 ms), per kill.
    leader_kill_pauses_ms: Vec<u64>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    let mut cluster = NatsCluster::start(3).await;
    let nats = connect(&NatsSettings::new(cluster.urls(), "nats-probe")).await?;
    let log = FencedLog::open(
        &nats,
        &LogSpec {
            name: "probe".into(),
            subjects: vec!["probe.>".into()],
            replicas: args.replicas,
            duplicate_window: Duration::from_secs(30),
            republish: false,
        },
    )
    .await?;
    let payload = Bytes::from(vec![b'x'; args.size]);
    let subject = "probe.chan-0";
    // Warm the connection and the stream's leader before timing.
    let mut warm = log.last_sequence(subject).await?;
    for n in 0..50 {
        warm = log
            .append(subject, payload.clone(), warm, &format!("warm-{n}"))
            .await?
            .sequence;
    }
    let cpu = |cluster: &NatsCluster| -> anyhow::Result<f64> {
        let mut total = 0.0;
        for pid in cluster.pids() {
            total += dormouse_bench::proc::cpu_secs(&pid.to_string())?;
        }
        Ok(total)
    };
    let cpu_before = cpu(&cluster)?;
    let started = Instant::now();
    let writers: Vec<_> = (0..args.subjects)
        .map(|w| {
            let (log, payload) = (log.clone(), payload.clone());
            tokio::spawn(async move {
                let subject = format!("probe.chan-{w}");
                let mut latency = Histogram::<u64>::new(3)?;
                let mut expected = log.last_sequence(&subject).await?;
                for n in 0..args.appends {
                    let at = Instant::now();
                    expected = log
                        .append(&subject, payload.clone(), expected, &format!("a-{w}-{n}"))
                        .await?
                        .sequence;
                    latency.record(at.elapsed().as_micros() as u64)?;
                }
                anyhow::Ok(latency)
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new(3)?;
    for writer in writers {
        latency.add(writer.await??)?;
    }
    let elapsed = started.elapsed();
    let cpu_used = cpu(&cluster)? - cpu_before;
    let total = args.appends * args.subjects as u64;
    // The leader-kill appends go on from the first subject's tail.
    let mut expected = log.last_sequence(subject).await?;

    let rpc = time_rpc(&cluster, args.rpc_calls).await?;

    let mut pauses = Vec::new();
    for kill in 0..args.leader_kills {
        let leader = log
            .leader()
            .await?
            .and_then(|name| cluster.index_of(&name))
            .ok_or_else(|| anyhow::anyhow!("the stream has no leader"))?;
        cluster.kill(leader);
        let killed = Instant::now();
        let id = format!("after-kill-{kill}");
        expected = log
            .append_retrying(
                subject,
                payload.clone(),
                expected,
                &id,
                Duration::from_secs(60),
            )
            .await?
            .sequence;
        pauses.push(killed.elapsed().as_millis() as u64);
        cluster.restart(leader);
        // Back to three servers before the next kill, so each kill is the same fault.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    Ok(Report {
        scenario: "nats-probe",
        nats_version: nats.version.to_string(),
        replicas: args.replicas,
        subjects: args.subjects,
        appends: total,
        size: args.size,
        append_p50_us: latency.value_at_quantile(0.5),
        append_p99_us: latency.value_at_quantile(0.99),
        append_max_us: latency.max(),
        appends_per_sec: total as f64 / elapsed.as_secs_f64(),
        nats_cpu_us_per_append: cpu_used * 1e6 / total as f64,
        rpc_p50_us: rpc.value_at_quantile(0.5),
        rpc_p99_us: rpc.value_at_quantile(0.99),
        leader_kill_pauses_ms: pauses,
    })
}

/// Round trips of a node to node request between connections on two different servers.
async fn time_rpc(cluster: &NatsCluster, calls: u64) -> anyhow::Result<Histogram<u64>> {
    let caller = connect(&NatsSettings::new(vec![cluster.url(0)], "caller")).await?;
    let owner = connect(&NatsSettings::new(vec![cluster.url(1)], "owner")).await?;
    let me = dormouse_cluster::NodeId::start("owner");
    let _server =
        dormouse_cluster::rpc::serve(&owner, &me, |_, body| async move { Ok(body) }).await?;
    let body = Bytes::from(vec![b'x'; 200]);
    let mut latency = Histogram::<u64>::new(3)?;
    for n in 0..calls + 50 {
        let at = Instant::now();
        dormouse_cluster::rpc::call(&caller, &me, "echo", body.clone(), Duration::from_secs(5))
            .await?;
        // The first 50 warm the route.
        if n >= 50 {
            latency.record(at.elapsed().as_micros() as u64)?;
        }
    }
    Ok(latency)
}
