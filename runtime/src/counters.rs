//! Activation and hibernation figures of a namespace ([`NamespaceStats`]), counted with
//! relaxed atomics on the hot path and read when metrics are scraped.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dormouse_storage::SyncFuture;

/// Live counters of one namespace, updated with relaxed atomics on the hot path.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) active: AtomicU64,
    pub(crate) hibernated: AtomicU64,
    pub(crate) activations: AtomicU64,
    pub(crate) wakes: AtomicU64,
    pub(crate) hibernations: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) evictions_declined: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> NamespaceStats {
        NamespaceStats {
            active: self.active.load(Ordering::Relaxed),
            hibernated: self.hibernated.load(Ordering::Relaxed),
            activations_total: self.activations.load(Ordering::Relaxed),
            wakes_total: self.wakes.load(Ordering::Relaxed),
            hibernations_total: self.hibernations.load(Ordering::Relaxed),
            failures_total: self.failures.load(Ordering::Relaxed),
            requests_total: self.requests.load(Ordering::Relaxed),
            evictions_declined_total: self.evictions_declined.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time view of a namespace, for metrics and the admin page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NamespaceStats {
    /// Objects with a live activation now.
    pub active: u64,
    /// Objects that hibernated in this process and have not woken since.
    pub hibernated: u64,
    /// Activations started (cold starts and wakes).
    pub activations_total: u64,
    /// Activations of an object that had hibernated in this process.
    pub wakes_total: u64,
    /// Activations that ended by idling out.
    pub hibernations_total: u64,
    /// Handler or activation failures (errors and panics).
    pub failures_total: u64,
    /// Requests delivered to objects.
    pub requests_total: u64,
    /// Activations asked to hibernate early (past `max_active`) that declined, because they
    /// were working or asked to stay awake. Climbing fast means the bound is too low for
    /// what must stay awake.
    pub evictions_declined_total: u64,
}

/// Receives the duration of each durability wait.
pub(crate) type CommitObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// Times the commit futures handlers wait on, for whoever embeds the runtime (the gateway
/// turns them into a histogram). Without an observer a commit is returned untouched, so
/// the timing costs nothing unless someone asked for it.
#[derive(Default)]
pub(crate) struct CommitTimer {
    observer: OnceLock<CommitObserver>,
}

impl fmt::Debug for CommitTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitTimer")
            .field("observed", &self.observer.get().is_some())
            .finish()
    }
}

impl CommitTimer {
    /// Installs the observer; false if one was already installed.
    pub(crate) fn set(&self, observer: CommitObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// `sync`, reporting the time from now until it resolves. The gate polls commits in
    /// order, so a commit that finished while an earlier one was awaited is reported when
    /// the gate reaches it: what is measured is how long the output waited for durability.
    pub(crate) fn time(&self, sync: SyncFuture) -> SyncFuture {
        let Some(observer) = self.observer.get() else {
            return sync;
        };
        let observer = observer.clone();
        let started = Instant::now();
        Box::pin(async move {
            let outcome = sync.await;
            observer(started.elapsed());
            outcome
        })
    }
}
