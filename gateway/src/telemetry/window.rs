//! A one-second latency window: log-spaced atomic buckets that the sampler empties every
//! second into the admin page's percentiles. Recording is two relaxed atomic operations on
//! the recording thread's own copy (see `sharded`), so it can sit on the delivery path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Buckets: four per power of two of microseconds (within 19% of the true value), up to
/// about 2^33 µs (2.4 hours); slower values land in the last bucket.
const BUCKETS: usize = 128;

/// Latencies recorded since the last `take`.
#[derive(Debug)]
pub(super) struct LatencyWindow {
    buckets: [AtomicU64; BUCKETS],
    max_us: AtomicU64,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max_us: AtomicU64::new(0),
        }
    }
}

/// What one window held, in milliseconds; all zero when nothing was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

/// The bucket of a latency of `us` microseconds.
fn bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let log = 63 - u64::from(us.leading_zeros());
    let mantissa = (us >> (log - 2)) & 3;
    (((log - 1) * 4 + mantissa) as usize).min(BUCKETS - 1)
}

/// The smallest latency, in microseconds, that falls in `index`.
fn lower_bound(index: usize) -> u64 {
    if index < 4 {
        return index as u64;
    }
    let log = index as u64 / 4 + 1;
    (4 + index as u64 % 4) << (log - 2)
}

impl LatencyWindow {
    pub(super) fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Empties the window and summarises what it held. A percentile is reported as the
    /// upper end of its bucket, so it never understates.
    #[cfg(test)]
    pub(super) fn take(&self) -> Percentiles {
        Self::take_all(std::iter::once(self))
    }

    /// Empties several windows (one figure's per-thread copies) and summarises them as one.
    pub(super) fn take_all<'a>(windows: impl Iterator<Item = &'a LatencyWindow>) -> Percentiles {
        let mut counts = vec![0u64; BUCKETS];
        let mut max_us = 0;
        for window in windows {
            for (total, bucket) in counts.iter_mut().zip(&window.buckets) {
                *total += bucket.swap(0, Ordering::Relaxed);
            }
            max_us = max_us.max(window.max_us.swap(0, Ordering::Relaxed));
        }
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return Percentiles::default();
        }
        let max_ms = max_us as f64 / 1000.0;
        let quantile = |q: f64| {
            let rank = ((count as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (index, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    let upper = lower_bound(index + 1) as f64 / 1000.0;
                    return upper.min(max_ms);
                }
            }
            max_ms
        };
        Percentiles {
            count,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            max_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        let mut previous = 0;
        for us in (0..5000).chain([1 << 20, (1 << 20) + 1, 3 << 30]) {
            let b = bucket(us);
            assert!(b >= previous, "{us}");
            previous = b;
            assert!(lower_bound(b) <= us, "{us} in {b}");
            assert!(b == BUCKETS - 1 || us < lower_bound(b + 1), "{us} in {b}");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_window_reports_percentiles_then_starts_empty() {
        let w = LatencyWindow::default();
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms));
        }
        let p = w.take();
        assert_eq!(p.count, 100);
        assert!((50.0..=60.0).contains(&p.p50_ms), "{p:?}");
        assert!((99.0..=100.0).contains(&p.p99_ms), "{p:?}");
        assert_eq!(p.max_ms, 100.0);
        assert_eq!(w.take(), Percentiles::default());
    }
}
