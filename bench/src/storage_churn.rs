//! The storage engine under the replay-buffer workload: many logs, constant appends, each
//! log trimmed to its newest entries. What matters is whether disk and memory plateau.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dormouse_runtime::storage::{Durability, Retention, WriteBatch};
use serde::Serialize;

use crate::engine::{EngineArgs, Opened, with_writers};
use dormouse_bench::proc;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Number of logs (channels).
    #[arg(long, default_value_t = 1_000)]
    logs: u64,
    /// Total events appended across all logs.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Payload size of each event, in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Entries each log keeps (older ones are trimmed in the same batch as the append).
    #[arg(long, default_value_t = 1_000)]
    keep: u64,
    /// Storage durability: always, never or a period such as 100ms.
    #[arg(long, default_value = "never")]
    durability: Durability,
    /// Writer threads; each owns a disjoint set of logs, as one activation owns its log.
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// Take a disk/RSS sample every this many events.
    #[arg(long, default_value_t = 1_000_000)]
    sample_every: u64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Where to put the data dir (a fresh temporary directory inside it).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    events: u64,
    elapsed_s: f64,
    disk_bytes: u64,
    live_bytes: u64,
    disk_over_live: f64,
    rss_bytes: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    engine: String,
    logs: u64,
    events: u64,
    size: usize,
    keep: u64,
    durability: String,
    writers: u64,
    cache_mib: Option<u64>,
    elapsed_s: f64,
    appends_per_sec: f64,
    fsyncs: u64,
    live_bytes: u64,
    /// The engine's own live figure (payloads plus keys and headers), when it has one.
    engine_live_bytes: Option<u64>,
    final_disk_bytes: u64,
    final_disk_over_live: f64,
    final_rss_bytes: u64,
    peak_rss_bytes: u64,
    /// Closing the store and opening it again (the segment engine replays its files).
    reopen_ms: u64,
    samples: Vec<Sample>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(parent)?;
    let opened = Opened::open(&args.engine, dir.path(), args.durability)?;
    let storage = opened.storage.clone();
    let payload = bytes::Bytes::from(vec![0xA5u8; args.size]);
    let appended = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let live_at = |events: u64| -> u64 {
        let per_log = events / args.logs;
        args.logs * per_log.min(args.keep) * args.size as u64
    };

    with_writers(args.writers, args.logs, |_, mine| {
        let retention = Retention {
            max_events: Some(args.keep),
            ..Retention::default()
        };
        let mut seq = 0u64;
        loop {
            seq += 1;
            for id in &mine {
                let n = appended.fetch_add(1, Ordering::Relaxed);
                if n >= args.events {
                    return Ok(());
                }
                let mut batch = WriteBatch::new();
                let now = now_ms();
                batch.append(seq, now, payload.clone());
                batch.trim(retention, now);
                storage.apply(id, batch)?;
                futures::executor::block_on(storage.sync())?;
                let done = n + 1;
                if done.is_multiple_of(args.sample_every) {
                    let disk_bytes = storage.size_on_disk()?;
                    let live_bytes = live_at(done);
                    samples.lock().expect("samples").push(Sample {
                        events: done,
                        elapsed_s: started.elapsed().as_secs_f64(),
                        disk_bytes,
                        live_bytes,
                        disk_over_live: disk_bytes as f64 / live_bytes.max(1) as f64,
                        rss_bytes: proc::rss_bytes(),
                    });
                }
            }
        }
    })?;

    let elapsed = started.elapsed();
    // Let the engine settle so the final disk figure is not a mid-flush snapshot.
    opened.settle()?;
    std::thread::sleep(Duration::from_millis(200));
    let final_disk_bytes = storage.size_on_disk()?;
    let live_bytes = live_at(args.events);
    let mut samples = samples.lock().expect("samples").clone();
    samples.sort_by_key(|s| s.events);
    let fsyncs = opened.fsyncs();
    let engine_live_bytes = opened.engine_live_bytes();
    let final_rss_bytes = proc::rss_bytes();
    drop(storage);
    drop(opened);
    let reopen_started = Instant::now();
    let reopened = Opened::open(&args.engine, dir.path(), args.durability)?;
    let reopen_ms = reopen_started.elapsed().as_millis() as u64;
    drop(reopened);
    Ok(Report {
        scenario: "storage-churn",
        engine: format!("{:?}", args.engine.engine).to_lowercase(),
        logs: args.logs,
        events: args.events,
        size: args.size,
        keep: args.keep,
        durability: args.durability.to_string(),
        writers: args.writers,
        cache_mib: args.engine.cache_mib,
        elapsed_s: elapsed.as_secs_f64(),
        appends_per_sec: args.events as f64 / elapsed.as_secs_f64(),
        fsyncs,
        live_bytes,
        engine_live_bytes,
        final_disk_bytes,
        final_disk_over_live: final_disk_bytes as f64 / live_bytes.max(1) as f64,
        final_rss_bytes,
        peak_rss_bytes: proc::peak_rss_bytes(),
        reopen_ms,
        samples,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
