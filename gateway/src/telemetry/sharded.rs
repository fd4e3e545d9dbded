//! Figures written on every delivery, by every connection task, on every worker thread.
//!
//! One shared atomic per figure makes the two cores fight over its cache line on each
//! write: under fan-out to 1,000 subscribers the byte counters, the delivery counter and
//! the latency histograms together took about a tenth of the server's CPU. Here each
//! thread writes its own copy (a relaxed add on a line no other core touches), and a reader
//! (a scrape, the once-a-second sampler) adds the copies up.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Copies per figure. More than the threads that write on a small machine; with more
/// threads than this, some share a copy, which is still correct.
const SHARDS: usize = 16;

/// This thread's copy.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Keeps each copy on cache lines of its own (128 bytes: adjacent-line prefetching pairs
/// 64-byte lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// One copy of `T` per thread group; see the module doc.
#[derive(Debug)]
pub(super) struct Sharded<T> {
    shards: Box<[Padded<T>]>,
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> Sharded<T> {
    /// The copy this thread writes.
    pub(super) fn local(&self) -> &T {
        &self.shards[shard()].0
    }

    /// Every copy, for a reader to add up.
    pub(super) fn all(&self) -> impl Iterator<Item = &T> {
        self.shards.iter().map(|p| &p.0)
    }
}

impl Sharded<AtomicU64> {
    pub(super) fn add(&self, n: u64) {
        self.local().fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn sum(&self) -> u64 {
        self.all().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Most bucket bounds a [`Histogram`] takes.
const MAX_BOUNDS: usize = 24;

/// One thread's share of a Prometheus histogram: a count per bucket (not cumulative; the
/// last one is `+Inf`) and the sum of the observations in nanoseconds.
#[derive(Debug, Default)]
pub(super) struct HistogramShard {
    counts: [AtomicU64; MAX_BOUNDS + 1],
    sum_ns: AtomicU64,
}

/// A Prometheus histogram of durations with fixed bucket bounds, recorded per thread.
#[derive(Debug)]
pub(super) struct Histogram {
    /// Upper bounds in nanoseconds, ascending.
    bounds_ns: Vec<u64>,
    /// The same bounds as written in the `le` label.
    labels: Vec<String>,
    shards: Sharded<HistogramShard>,
}

impl Histogram {
    /// `bounds` in seconds, ascending, at most [`MAX_BOUNDS`] of them.
    pub(super) fn new(bounds: &[f64]) -> Self {
        assert!(bounds.len() <= MAX_BOUNDS, "too many histogram buckets");
        Self {
            bounds_ns: bounds.iter().map(|s| (s * 1e9).round() as u64).collect(),
            labels: bounds.iter().map(|s| s.to_string()).collect(),
            shards: Sharded::default(),
        }
    }

    pub(super) fn record(&self, value: Duration) {
        let ns = value.as_nanos().min(u128::from(u64::MAX)) as u64;
        let bucket = self.bounds_ns.partition_point(|&bound| bound < ns);
        let shard = self.shards.local();
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Appends the histogram in the Prometheus text format (`# HELP`, `# TYPE`, the
    /// cumulative `_bucket` series, `_sum` in seconds and `_count`).
    pub(super) fn render(&self, name: &str, help: &str, out: &mut String) {
        let mut counts = [0u64; MAX_BOUNDS + 1];
        let mut sum_ns = 0u64;
        for shard in self.shards.all() {
            for (total, count) in counts.iter_mut().zip(&shard.counts) {
                *total += count.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (label, count) in self.labels.iter().zip(counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{label}\"}} {cumulative}");
        }
        cumulative += counts[self.labels.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", sum_ns as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cumulative}");
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_written_from_several_threads_add_up() {
        let counter = std::sync::Arc::new(Sharded::<AtomicU64>::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| counter.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counter.sum(), 20_000);
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(1)); // on a bound: `le` includes it
        h.record(Duration::from_millis(5));
        h.record(Duration::from_secs(2));
        let mut out = String::new();
        h.render("x_seconds", "Help.", &mut out);
        assert_eq!(
            out,
            "# HELP x_seconds Help.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.001\"} 2\nx_seconds_bucket{le=\"0.01\"} 3\n\
             x_seconds_bucket{le=\"+Inf\"} 4\nx_seconds_sum 2.0065\nx_seconds_count 4\n\n"
        );
    }
}
