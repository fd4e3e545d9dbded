//! Memory and start-up against what is *kept*, not what is active: many logs, each holding
//! its full replay buffer, with nothing active afterwards (every channel hibernated). Then
//! the data dir is opened again in a fresh process, as a restart would, for the time to
//! open and the memory an open store holds.
//!
//! Writes go through the `Storage` trait exactly as a channel's publishes do (an append and
//! a trim per event, in batches as the batch endpoint makes them), round-robin over the logs
//! so every segment holds records of many logs, as real traffic leaves them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use dormouse_runtime::storage::{Durability, ObjectId, Retention, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::engine::{EngineArgs, Opened, with_writers};
use dormouse_bench::proc;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Logs (channels).
    #[arg(long, default_value_t = 10_000)]
    logs: u64,
    /// Events each log keeps (its retention; this many are written to each).
    #[arg(long, default_value_t = 1_000)]
    events: u64,
    /// Payload size of each event, in bytes (not compressible).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Events per applied batch (one batch publish).
    #[arg(long, default_value_t = 50)]
    batch: u64,
    /// Writer threads; each owns a disjoint set of logs, as one activation owns its log.
    #[arg(long, default_value_t = 2)]
    writers: u64,
    /// Storage durability: always, never or a period such as 100ms.
    #[arg(long, default_value = "never")]
    durability: Durability,
    #[command(flatten)]
    engine: EngineArgs,
    /// Where to put the data dir (a fresh directory inside it) [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data dir afterwards (its path is in the report), for start-up runs.
    #[arg(long)]
    keep: bool,
    /// Logs whose tails the reopened store reads back and checks.
    #[arg(long, default_value_t = 200)]
    check_logs: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    engine: String,
    logs: u64,
    events: u64,
    size: usize,
    batch: u64,
    writers: u64,
    durability: String,
    data_dir: Option<PathBuf>,
    write_secs: f64,
    events_per_sec: f64,
    /// This process before the store was opened.
    rss_baseline_bytes: u64,
    /// Highest RSS while writing.
    rss_peak_bytes: u64,
    /// After writing, with nothing active and the allocator's decay passed.
    rss_idle_bytes: u64,
    rss_idle_over_baseline_bytes: i64,
    rss_idle_per_event_bytes: f64,
    /// jemalloc's view at the same moment: live heap against pages kept.
    heap_idle: proc::HeapStats,
    /// The engine's own figures when idle.
    engine_idle: serde_json::Value,
    disk_bytes: u64,
    /// The fresh process that opened the data dir again.
    reopen: OpenReport,
}

/// What the `retained-open` child reports: one line of JSON.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OpenReport {
    rss_baseline_bytes: u64,
    open_ms: f64,
    rss_open_bytes: u64,
    rss_open_over_baseline_bytes: i64,
    /// After reading back `check_logs` tails (an active channel's first read).
    rss_after_reads_bytes: u64,
    read_p50_us: u64,
    read_max_us: u64,
    checked_logs: u64,
}

#[derive(Debug, clap::Args)]
pub(crate) struct OpenArgs {
    /// The data dir to open.
    #[arg(long)]
    path: PathBuf,
    #[command(flatten)]
    engine: EngineArgs,
    /// Logs to read back: log-0 .. log-N, each expected to hold `events` entries.
    #[arg(long, default_value_t = 200)]
    check_logs: u64,
    /// Logs written, so the checked ones spread over all of them.
    #[arg(long, default_value_t = 10_000)]
    logs: u64,
    #[arg(long, default_value_t = 1_000)]
    events: u64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(parent)?;
    let rss_baseline_bytes = proc::rss_bytes();
    let opened = Opened::open(&args.engine, dir.path(), args.durability)?;
    let storage = opened.storage.clone();
    let started = Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    with_writers(args.writers, args.logs, |writer, mine| {
        let retention = Retention {
            max_events: Some(args.events),
            ..Retention::default()
        };
        let mut rng = writer.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next_seq = 1;
        while next_seq <= args.events {
            let last = (next_seq + args.batch - 1).min(args.events);
            for id in &mine {
                let mut batch = WriteBatch::new();
                let now = now_ms();
                for seq in next_seq..=last {
                    batch.append(seq, now, payload(&mut rng, args.size));
                }
                batch.trim(retention, now);
                storage.apply(id, batch)?;
                futures::executor::block_on(storage.sync())?;
                written.fetch_add(last - next_seq + 1, Ordering::Relaxed);
            }
            next_seq = last + 1;
        }
        Ok(())
    })?;
    let write_secs = started.elapsed().as_secs_f64();
    let total = written.load(Ordering::Relaxed);
    anyhow::ensure!(total == args.logs * args.events, "wrote {total} events");
    opened.settle()?;
    // jemalloc hands freed pages back after about a second (.cargo/config.toml).
    std::thread::sleep(Duration::from_secs(3));
    let rss_idle_bytes = proc::rss_bytes();
    let heap_idle = proc::heap_stats();
    let engine_idle = opened.notes();
    let rss_peak_bytes = proc::peak_rss_bytes();
    let disk_bytes = storage.size_on_disk()?;
    drop(storage);
    drop(opened);

    let reopen = open_in_child(dir.path(), &args)?;
    let data_dir = if args.keep { Some(dir.keep()) } else { None };
    let over = rss_idle_bytes as i64 - rss_baseline_bytes as i64;
    Ok(Report {
        scenario: "retained",
        engine: format!("{:?}", args.engine.engine).to_lowercase(),
        logs: args.logs,
        events: args.events,
        size: args.size,
        batch: args.batch,
        writers: args.writers,
        durability: args.durability.to_string(),
        data_dir,
        write_secs,
        events_per_sec: total as f64 / write_secs,
        rss_baseline_bytes,
        rss_peak_bytes,
        rss_idle_bytes,
        rss_idle_over_baseline_bytes: over,
        rss_idle_per_event_bytes: over as f64 / total as f64,
        heap_idle,
        engine_idle,
        disk_bytes,
        reopen,
    })
}

/// Runs `retained-open` in a fresh process, so its memory is the open store's alone.
fn open_in_child(path: &Path, args: &Args) -> anyhow::Result<OpenReport> {
    let exe = std::env::current_exe()?;
    let engine = format!("{:?}", args.engine.engine).to_lowercase();
    let output = Command::new(exe)
        .arg("retained-open")
        .arg("--path")
        .arg(path)
        .args(["--engine", &engine])
        .args(args.engine.cache_mib.map(|m| format!("--cache-mib={m}")))
        .args(args.engine.dirty_mib.map(|m| format!("--dirty-mib={m}")))
        .args(["--check-logs", &args.check_logs.to_string()])
        .args(["--logs", &args.logs.to_string()])
        .args(["--events", &args.events.to_string()])
        .output()
        .context("running retained-open")?;
    anyhow::ensure!(
        output.status.success(),
        "retained-open failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8(output.stdout)?;
    serde_json::from_str(line.trim()).context("parsing retained-open's report")
}

/// The child: open, measure, read back a sample, check it.
pub(crate) fn open(args: OpenArgs) -> anyhow::Result<OpenReport> {
    let rss_baseline_bytes = proc::rss_bytes();
    let started = Instant::now();
    let opened = Opened::open(&args.engine, &args.path, Durability::Never)?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_open_bytes = proc::rss_bytes();
    let storage = opened.storage.clone();
    let mut reads = Vec::new();
    let mut checked = 0;
    for log in dormouse_bench::spread(args.logs, args.check_logs) {
        let id = ObjectId::new("channel", format!("log-{log}"));
        let t = Instant::now();
        let meta = storage
            .log_meta(&id)?
            .with_context(|| format!("{id} has no log"))?;
        let tail = storage.read_log_tail(&id, args.events as usize)?;
        reads.push(t.elapsed().as_micros() as u64);
        anyhow::ensure!(
            meta.count == args.events && tail.len() as u64 == args.events,
            "{id}: meta {meta:?}, {} entries read",
            tail.len()
        );
        anyhow::ensure!(
            tail.iter().zip(1..).all(|(entry, seq)| entry.seq == seq),
            "{id}: entries out of order"
        );
        checked += 1;
    }
    reads.sort_unstable();
    let rss_after_reads_bytes = proc::rss_bytes();
    drop(storage);
    drop(opened);
    Ok(OpenReport {
        rss_baseline_bytes,
        open_ms,
        rss_open_bytes,
        rss_open_over_baseline_bytes: rss_open_bytes as i64 - rss_baseline_bytes as i64,
        rss_after_reads_bytes,
        read_p50_us: reads.get(reads.len() / 2).copied().unwrap_or(0),
        read_max_us: reads.last().copied().unwrap_or(0),
        checked_logs: checked,
    })
}

/// Bytes no engine can compress, from a xorshift generator.
fn payload(state: &mut u64, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size);
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
