//! Memory and CPU as the kernel accounts them, for this process or for a server under test,
//! and the allocator's own view of the heap.

use anyhow::Context as _;

/// Resident set size now, in bytes (`VmRSS`).
pub fn rss_bytes() -> u64 {
    status_kib("self", "VmRSS:").unwrap_or(0) * 1024
}

/// Peak resident set size so far, in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> u64 {
    status_kib("self", "VmHWM:").unwrap_or(0) * 1024
}

/// Another process's resident set size now, in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn process_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    Ok(status_kib(&pid.to_string(), "VmRSS:")? * 1024)
}

/// Another process's peak resident set size, in bytes (`VmHWM`).
pub fn process_peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    Ok(status_kib(&pid.to_string(), "VmHWM:")? * 1024)
}

/// Bytes of every file under `dir`, walked on disk: what a data dir costs, measured without
/// asking the server (its own figure is sampled, and may lag).
pub fn dir_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// CPU time a process has used so far (user + system), in seconds; `"self"` for this one.
pub fn cpu_secs(process: &str) -> anyhow::Result<f64> {
    // The kernel reports these in USER_HZ ticks, 100 per second on Linux.
    const TICKS_PER_SEC: f64 = 100.0;
    let path = format!("/proc/{process}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may contain spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("no CPU times in {path}"))? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SEC)
}

/// CPU time the whole machine has been busy (all CPUs, everything but idle and I/O wait), in
/// seconds. Minus the server's and the bench's own, it shows how much else ran during a run.
pub fn machine_busy_secs() -> anyhow::Result<f64> {
    const TICKS_PER_SEC: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    anyhow::ensure!(ticks.len() >= 5, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal ...; guest time is already in user.
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks[3] - ticks[4];
    Ok(busy as f64 / TICKS_PER_SEC)
}

fn status_kib(process: &str, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{process}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {field} in {path}"))
}

/// Bytes the allocator has handed out and not had back (jemalloc's `stats.allocated`):
/// live heap, as opposed to RSS, which also counts memory the allocator keeps cached.
pub fn heap_allocated_bytes() -> u64 {
    // Statistics are cached per epoch; advancing it refreshes them.
    let _ = tikv_jemalloc_ctl::epoch::advance();
    tikv_jemalloc_ctl::stats::allocated::read().map_or(0, |b| b as u64)
}

/// jemalloc's view of the heap, for telling fragmentation (`active` − `allocated`: pages
/// holding some live data) from cached free pages (`resident` − `active`).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeapStats {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub metadata: u64,
}

pub fn heap_stats() -> HeapStats {
    use tikv_jemalloc_ctl::stats;
    let _ = tikv_jemalloc_ctl::epoch::advance();
    let read = |r: tikv_jemalloc_ctl::Result<usize>| r.map_or(0, |b| b as u64);
    HeapStats {
        allocated: read(stats::allocated::read()),
        active: read(stats::active::read()),
        resident: read(stats::resident::read()),
        metadata: read(stats::metadata::read()),
    }
}
