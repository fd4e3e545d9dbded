//! The busiest channels right now, for the admin page: publishes per channel over a
//! sliding window of the last [`WINDOW`] seconds, for at most [`TRACKED`] channels.
//!
//! Memory is bounded whatever the number of channels: when the table is full, a channel not
//! in it replaces the quietest one (which may then come back later with a fresh count). The
//! top of the list is exact for channels that stay busy, approximate under heavy churn, which
//! is what a dashboard needs. Channel names live here, never in metric labels.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Seconds the rate is averaged over.
pub(crate) const WINDOW: usize = 10;
/// Channels tracked at most.
const TRACKED: usize = 256;

/// Publish counts per channel, per second of the window.
#[derive(Debug, Default)]
pub(crate) struct Busiest {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Which slot of each window the current second writes to.
    slot: usize,
    channels: HashMap<Box<str>, [u64; WINDOW]>,
}

/// One row of the admin page's list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct BusyChannel {
    pub(crate) channel: String,
    /// Messages per second, averaged over the window.
    pub(crate) per_second: f64,
    /// Messages published in the window.
    pub(crate) messages: u64,
}

impl Busiest {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `events` were published to `channel`.
    pub(crate) fn record(&self, channel: &str, events: u64) {
        let mut inner = self.lock();
        let slot = inner.slot;
        if let Some(window) = inner.channels.get_mut(channel) {
            window[slot] += events;
            return;
        }
        if inner.channels.len() >= TRACKED
            && let Some(quietest) = inner
                .channels
                .iter()
                .min_by_key(|(_, w)| w.iter().sum::<u64>())
                .map(|(name, _)| name.clone())
        {
            inner.channels.remove(&quietest);
        }
        let mut window = [0; WINDOW];
        window[slot] = events;
        inner.channels.insert(channel.into(), window);
    }

    /// Starts the next second: its slot is emptied, and channels with nothing left in the
    /// window are forgotten.
    pub(crate) fn tick(&self) {
        let mut inner = self.lock();
        inner.slot = (inner.slot + 1) % WINDOW;
        let slot = inner.slot;
        inner.channels.retain(|_, window| {
            window[slot] = 0;
            window.iter().any(|&n| n > 0)
        });
    }

    /// The `n` busiest channels, busiest first (ties by name, so the order is stable).
    pub(crate) fn top(&self, n: usize) -> Vec<BusyChannel> {
        let inner = self.lock();
        let mut rows: Vec<BusyChannel> = inner
            .channels
            .iter()
            .map(|(name, window)| {
                let messages = window.iter().sum::<u64>();
                BusyChannel {
                    channel: name.to_string(),
                    per_second: messages as f64 / WINDOW as f64,
                    messages,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.messages
                .cmp(&a.messages)
                .then_with(|| a.channel.cmp(&b.channel))
        });
        rows.truncate(n);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_lead_and_old_publishes_slide_out_of_the_window() {
        let b = Busiest::default();
        b.record("a", 5);
        b.record("b", 20);
        b.record("c", 1);
        b.record("a", 5);
        let top = b.top(2);
        assert_eq!(
            top.iter()
                .map(|r| (r.channel.as_str(), r.messages))
                .collect::<Vec<_>>(),
            [("b", 20), ("a", 10)]
        );
        assert_eq!(top[0].per_second, 2.0);
        for _ in 0..WINDOW - 1 {
            b.tick();
        }
        b.record("c", 3);
        assert_eq!(b.top(1)[0].channel, "b", "still inside the window");
        b.tick();
        let top = b.top(10);
        assert_eq!(top.len(), 1, "{top:?}");
        assert_eq!((top[0].channel.as_str(), top[0].messages), ("c", 3));
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_busy_ones() {
        let b = Busiest::default();
        b.record("hot", 1000);
        for i in 0..10 * TRACKED {
            b.record(&format!("cold-{i}"), 1);
        }
        assert_eq!(b.lock().channels.len(), TRACKED);
        assert_eq!(b.top(1)[0].channel, "hot");
    }
}
