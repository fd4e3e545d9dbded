//! How much an object costs to activate, to keep hibernated, and to wake.
//!
//! Everything goes through the runtime's public API, as a user's program would: a
//! `Namespace` over the chosen storage engine in a temporary directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dormouse_runtime::storage::Durability;
use dormouse_runtime::{Context, Namespace, NamespaceConfig, Object, Runtime};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::engine::{EngineArgs, Opened};
use dormouse_bench::proc;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Objects to activate.
    #[arg(long, default_value_t = 200_000)]
    objects: u64,
    /// Activations in flight at once.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Idle timeout after which objects hibernate (humantime).
    #[arg(long, default_value = "2s")]
    idle_timeout: humantime::Duration,
    /// Hibernated objects to wake, one at a time, for the wake latency figures.
    #[arg(long, default_value_t = 20_000)]
    wake_sample: u64,
    /// Storage durability: always, never or a period.
    #[arg(long, default_value = "always")]
    durability: Durability,
    #[command(flatten)]
    engine: EngineArgs,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    engine: String,
    objects: u64,
    concurrency: usize,
    idle_timeout_ms: u128,
    durability: String,
    cache_mib: Option<u64>,
    workers: usize,
    wake_sample: u64,
    rss_baseline_bytes: u64,
    rss_peak_bytes: u64,
    rss_after_hibernation_bytes: u64,
    rss_after_hibernation_over_baseline_bytes: i64,
    heap_baseline_bytes: u64,
    heap_active_bytes: u64,
    heap_after_hibernation_bytes: u64,
    /// jemalloc's allocated/active/resident/metadata after hibernation: where RSS over the
    /// live heap goes.
    heap_stats_after_hibernation: proc::HeapStats,
    activation_p50_us: u64,
    activation_p99_us: u64,
    activation_max_us: u64,
    activations_per_sec: f64,
    hibernation_wait_ms: u128,
    wake_p50_us: u64,
    wake_p99_us: u64,
    wake_max_us: u64,
    storage_bytes: u64,
    /// Keys in the storage engine's in-memory index and the bytes it holds (segment engine).
    index_keys: Option<usize>,
    index_bytes: Option<usize>,
}

/// The benchmark object: rebuilds itself from its log on activation, like a channel does.
#[derive(Debug)]
struct BenchObject {
    last_seq: u64,
}

#[derive(Debug)]
enum BenchReq {
    /// Append one event.
    Write,
    /// Answer from memory (what a wake measures: activation cost, not a write).
    Read,
}

impl Object for BenchObject {
    type Env = ();
    type Request = BenchReq;
    type Response = u64;

    async fn activate(ctx: &mut Context<'_>, _env: &()) -> anyhow::Result<Self> {
        let last_seq = ctx.log_meta()?.map_or(0, |meta| meta.last_seq);
        // Load the newest event, as a channel loads its in-memory tail.
        let _tail = ctx.read_log_tail(1)?;
        Ok(Self { last_seq })
    }

    async fn handle(&mut self, ctx: &mut Context<'_>, req: BenchReq) -> anyhow::Result<u64> {
        match req {
            BenchReq::Write => {
                self.last_seq += 1;
                ctx.append_log(self.last_seq, 0, vec![0u8; 64]);
            }
            BenchReq::Read => {}
        }
        Ok(self.last_seq)
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?
        .block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let opened = Opened::open(&args.engine, dir.path(), args.durability)?;
    let storage = opened.storage.clone();
    let runtime = Runtime::new(storage.clone());
    let idle: Duration = args.idle_timeout.into();
    let ns: Namespace<BenchObject> =
        runtime.namespace("bench", NamespaceConfig::with_idle_timeout(idle), ());

    // Warm up the runtime's machinery so the baseline includes fixed costs, not per-object ones.
    ns.call("warmup", BenchReq::Write).await?;
    wait_for_hibernation(&ns, idle).await?;
    let rss_baseline_bytes = proc::rss_bytes();
    let heap_baseline_bytes = proc::heap_allocated_bytes();

    let started = Instant::now();
    let activation = activate_all(&ns, args.objects, args.concurrency).await?;
    let activation_secs = started.elapsed().as_secs_f64();
    let heap_active_bytes = proc::heap_allocated_bytes();

    let hibernation_started = Instant::now();
    wait_for_hibernation(&ns, idle).await?;
    let hibernation_wait_ms = hibernation_started.elapsed().as_millis();
    // jemalloc returns freed pages after its 1 s decay (see .cargo/config.toml); measure
    // after it, so the figure is what Dormouse holds rather than what is about to be purged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_hibernation_bytes = proc::rss_bytes();
    let heap_after_hibernation_bytes = proc::heap_allocated_bytes();
    let heap_stats_after_hibernation = proc::heap_stats();
    let rss_peak_bytes = proc::peak_rss_bytes();

    let mut wake = Histogram::<u64>::new(3)?;
    let sample = args.wake_sample.min(args.objects);
    let stride = (args.objects / sample.max(1)).max(1);
    for i in 0..sample {
        let name = object_name(i * stride);
        let t = Instant::now();
        let seq = ns.call(&name, BenchReq::Read).await?;
        wake.record(t.elapsed().as_micros() as u64)?;
        anyhow::ensure!(seq == 1, "{name} woke with last_seq {seq}, expected 1");
    }
    let stats = ns.stats();
    anyhow::ensure!(
        stats.wakes_total >= sample,
        "expected {sample} wakes, runtime counted {}",
        stats.wakes_total
    );

    Ok(Report {
        scenario: "activation",
        engine: format!("{:?}", args.engine.engine).to_lowercase(),
        objects: args.objects,
        concurrency: args.concurrency,
        idle_timeout_ms: idle.as_millis(),
        durability: args.durability.to_string(),
        cache_mib: args.engine.cache_mib,
        workers: args.workers,
        wake_sample: sample,
        rss_baseline_bytes,
        rss_peak_bytes,
        rss_after_hibernation_bytes,
        rss_after_hibernation_over_baseline_bytes: rss_after_hibernation_bytes as i64
            - rss_baseline_bytes as i64,
        heap_baseline_bytes,
        heap_active_bytes,
        heap_after_hibernation_bytes,
        heap_stats_after_hibernation,
        activation_p50_us: activation.value_at_quantile(0.5),
        activation_p99_us: activation.value_at_quantile(0.99),
        activation_max_us: activation.max(),
        activations_per_sec: args.objects as f64 / activation_secs,
        hibernation_wait_ms,
        wake_p50_us: wake.value_at_quantile(0.5),
        wake_p99_us: wake.value_at_quantile(0.99),
        wake_max_us: wake.max(),
        storage_bytes: storage.size_on_disk()?,
        index_keys: opened.index().map(|(keys, _)| keys),
        index_bytes: opened.index().map(|(_, bytes)| bytes),
    })
}

fn object_name(i: u64) -> String {
    format!("object-{i}")
}

/// Activates `objects` cold objects with `concurrency` in flight; returns their latencies.
async fn activate_all(
    ns: &Namespace<BenchObject>,
    objects: u64,
    concurrency: usize,
) -> anyhow::Result<Histogram<u64>> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let ns = ns.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3)?;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= objects {
                        return anyhow::Ok(histogram);
                    }
                    let t = Instant::now();
                    let seq = ns.call(&object_name(i), BenchReq::Write).await?;
                    histogram.record(t.elapsed().as_micros() as u64)?;
                    anyhow::ensure!(seq == 1, "object {i} was not cold: seq {seq}");
                }
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new(3)?;
    for worker in workers {
        total.add(worker.await.context("activation worker")??)?;
    }
    Ok(total)
}

/// Waits until no object is active; bounded so a stuck object fails the run instead of
/// hanging it.
async fn wait_for_hibernation(ns: &Namespace<BenchObject>, idle: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + idle * 4 + Duration::from_secs(60);
    while ns.stats().active > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "objects still active: {:?}",
            ns.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
