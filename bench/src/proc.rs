//! Memory as the kernel accounts it for this process.

/// Resident set size now, in bytes (`VmRSS`).
pub(crate) fn rss_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Peak resident set size so far, in bytes (`VmHWM`).
pub(crate) fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Bytes the allocator has handed out and not had back (jemalloc's `stats.allocated`):
/// live heap, as opposed to RSS, which also counts memory the allocator keeps cached.
pub(crate) fn heap_allocated_bytes() -> u64 {
    // Statistics are cached per epoch; advancing it refreshes them.
    let _ = tikv_jemalloc_ctl::epoch::advance();
    tikv_jemalloc_ctl::stats::allocated::read().map_or(0, |b| b as u64)
}
