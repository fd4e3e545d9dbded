//! Group commit: one flush (fsync) covers every writer that asked for one while the previous
//! flush ran, so `always` durability costs one fsync per burst instead of one per write.
//!
//! A dedicated thread runs the blocking flush. Callers join the *next* generation; the
//! flusher takes it (installing a fresh one) just before it starts flushing, so:
//! - every `sync()` that returned before a flush started is covered by that flush;
//! - every `sync()` made while a flush runs waits for the following one, which starts as
//!   soon as the running one ends (a write applied during a flush may have missed it).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::{Error, Result, SyncFuture};

/// The outcome of one flush, shared by all its waiters; `None` until it ran.
type Outcome = Option<Result<()>>;

/// Shares one blocking flush among concurrent callers of [`GroupCommit::sync`]. Engine
/// neutral: it runs whatever flush closure it is given, which keeps it testable without a
/// disk.
pub struct GroupCommit {
    shared: Arc<Shared>,
    /// How long a flush may run before waiters give up and new callers are refused.
    stall_limit: Duration,
    /// Joined on drop, after a final flush, so nothing is left half-done.
    flusher: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the flusher when a sync is requested or the store shuts down.
    wake: Condvar,
    /// Completed flushes, for metrics and for tests that check batching.
    flushes: AtomicU64,
}

struct State {
    /// A caller joined `next` since the flusher last took it.
    pending: bool,
    /// No flush will run any more; new callers fail at once with [`Error::Closed`].
    closed: bool,
    /// The generation new callers join. Dropping its sender without publishing resolves its
    /// waiters with [`Error::Closed`], so no waiter can hang.
    next: watch::Sender<Outcome>,
    /// When the running flush started; `None` between flushes.
    flushing_since: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl GroupCommit {
    /// Starts the flusher thread. `flush` makes every write applied before it was called
    /// durable; it runs on that thread only.
    pub fn new(flush: impl Fn() -> Result<()> + Send + 'static) -> Result<Self> {
        Self::with_stall_limit(flush, Self::DEFAULT_STALL_LIMIT)
    }

    /// A flush that takes longer than this is taken to be stuck. Generous: a healthy fsync
    /// of a large burst takes well under a second.
    pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(30);

    /// As [`GroupCommit::new`], with a chosen stall limit (tests use a short one).
    pub fn with_stall_limit(
        flush: impl Fn() -> Result<()> + Send + 'static,
        stall_limit: Duration,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: false,
                closed: false,
                next: watch::Sender::new(None),
                flushing_since: None,
            }),
            wake: Condvar::new(),
            flushes: AtomicU64::new(0),
        });
        let flusher_shared = Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("dormouse-group-commit".into())
            .spawn(move || run_flusher(&flusher_shared, &flush))?;
        Ok(Self {
            shared,
            stall_limit,
            flusher: Some(flusher),
        })
    }

    /// Resolves once a flush that started after this call has completed, with that flush's
    /// result. The request is registered by the call itself, not by the first poll, so a
    /// caller may create the future, release its locks, and await it later.
    pub fn sync(&self) -> SyncFuture {
        let receiver = {
            let mut state = self.shared.lock();
            if state.closed {
                return Box::pin(std::future::ready(Err(Error::Closed)));
            }
            // A stuck flush will not finish for us either: fail at once, not after a wait.
            if let Some(since) = state.flushing_since
                && since.elapsed() >= self.stall_limit
            {
                return Box::pin(std::future::ready(Err(Error::Stalled(since.elapsed()))));
            }
            state.pending = true;
            state.next.subscribe()
        };
        self.shared.wake.notify_one();
        // The wait is bounded with tokio's timer when there is one (the server); without a
        // runtime (plain executors in tests) callers still see a stuck flush at once on
        // their next call, through the check above.
        let limit = tokio::runtime::Handle::try_current()
            .is_ok()
            .then_some(self.stall_limit);
        Box::pin(wait(receiver, limit))
    }

    /// `Err(Stalled)` while a flush has been running longer than the stall limit: what a
    /// readiness probe reports, so an orchestrator can restart a stuck server.
    pub fn check(&self) -> Result<()> {
        match self.shared.lock().flushing_since {
            Some(since) if since.elapsed() >= self.stall_limit => {
                Err(Error::Stalled(since.elapsed()))
            }
            _ => Ok(()),
        }
    }

    /// Flushes completed so far; compared with the number of syncs it shows how well
    /// writers are being grouped.
    pub fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }
}

/// Waits for the generation's flush; a wait longer than twice the stall limit (the
/// running flush, then ours) means the flusher is stuck.
async fn wait(mut receiver: watch::Receiver<Outcome>, stall_limit: Option<Duration>) -> Result<()> {
    let flushed = match stall_limit {
        Some(limit) => {
            let patience = limit * 2;
            match tokio::time::timeout(patience, receiver.wait_for(Option::is_some)).await {
                Ok(flushed) => flushed.map(|outcome| outcome.clone()),
                Err(_) => return Err(Error::Stalled(patience)),
            }
        }
        None => receiver
            .wait_for(Option::is_some)
            .await
            .map(|outcome| outcome.clone()),
    };
    match flushed {
        Ok(outcome) => outcome.unwrap_or(Err(Error::Closed)),
        // The generation was dropped unflushed: the flusher died or the store shut down.
        Err(_) => Err(Error::Closed),
    }
}

fn run_flusher(shared: &Shared, flush: &dyn Fn() -> Result<()>) {
    // Runs on every exit, panics included, so later callers fail fast instead of waiting on
    // a flusher that is gone.
    let _close = CloseOnExit(shared);
    loop {
        let generation = {
            let mut state = shared.lock();
            while !state.pending && !state.closed {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if !state.pending {
                return;
            }
            state.pending = false;
            state.flushing_since = Some(Instant::now());
            std::mem::replace(&mut state.next, watch::Sender::new(None))
        };
        let outcome = flush();
        shared.lock().flushing_since = None;
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "group commit flush failed");
        }
        generation.send_replace(Some(outcome));
    }
}

struct CloseOnExit<'s>(&'s Shared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.closed = true;
        // Drops the sender of any generation that will never be flushed.
        state.next = watch::Sender::new(None);
    }
}

impl Drop for GroupCommit {
    /// Flushes once more if anyone is waiting, then stops the thread; pending waiters get
    /// that flush's result.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(flusher) = self.flusher.take()
            && flusher.join().is_err()
        {
            tracing::error!("group commit flusher panicked");
        }
    }
}

impl fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupCommit")
            .field("flushes", &self.flushes())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use futures::FutureExt;
    use futures::executor::block_on;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_flush_fails_waiters_and_new_callers_instead_of_hanging() {
        let (release, stuck) = mpsc::channel::<()>();
        let stuck = std::sync::Mutex::new(stuck);
        let commit = GroupCommit::with_stall_limit(
            move || {
                // Blocks until the test lets it go, like sled after the disk filled up.
                let _ = stuck.lock().unwrap().recv();
                Ok(())
            },
            Duration::from_millis(200),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let first = commit.sync().await;
        assert!(matches!(first, Err(Error::Stalled(_))), "{first:?}");
        assert!(started.elapsed() < TIMEOUT);
        assert!(matches!(commit.check(), Err(Error::Stalled(_))));
        // Later callers are refused at once, not after another wait.
        let started = std::time::Instant::now();
        let later = commit.sync().await;
        assert!(matches!(later, Err(Error::Stalled(_))), "{later:?}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert!(
            later
                .unwrap_err()
                .to_string()
                .contains("restart the server")
        );
        // Once the flush completes, the store is healthy again.
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while commit.check().is_err() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(release);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_flushes() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&calls);
        let commit = Arc::new(
            GroupCommit::new(move || {
                std::thread::sleep(Duration::from_millis(20));
                counted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .unwrap(),
        );
        const TASKS: u64 = 100;
        const ROUNDS: u64 = 3;
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let commit = Arc::clone(&commit);
                tokio::spawn(async move {
                    for _ in 0..ROUNDS {
                        commit.sync().await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        }
        let flushes = calls.load(Ordering::Relaxed);
        assert_eq!(commit.flushes(), flushes);
        assert!(
            flushes * 10 < TASKS * ROUNDS,
            "{flushes} flushes for {} syncs",
            TASKS * ROUNDS
        );
    }

    /// A flush whose start is reported and whose result is chosen by the test.
    fn gated() -> (GroupCommit, mpsc::Receiver<()>, mpsc::Sender<Result<()>>) {
        let (started_tx, started) = mpsc::channel();
        let (gate, gate_rx) = mpsc::channel::<Result<()>>();
        let commit = GroupCommit::new(move || {
            started_tx.send(()).unwrap();
            gate_rx.recv().unwrap_or(Err(Error::Closed))
        })
        .unwrap();
        (commit, started, gate)
    }

    #[test]
    fn a_failure_reaches_exactly_its_generation_and_late_callers_wait_for_the_next_flush() {
        let (commit, started, gate) = gated();
        // Flush 1 holds the flusher, so the two callers below join one generation for sure
        // (otherwise the flusher may take the first alone, and the second waits for a
        // flush this test never lets finish).
        let holding = commit.sync();
        started.recv_timeout(TIMEOUT).unwrap();
        let first_a = commit.sync();
        let first_b = commit.sync();
        gate.send(Ok(())).unwrap();
        block_on(holding).unwrap();

        // Flush 2, theirs, is running: this caller's write may have missed it.
        started.recv_timeout(TIMEOUT).unwrap();
        let mut late = commit.sync();
        gate.send(Err(Error::Engine("disk on fire".into())))
            .unwrap();
        for waiter in [first_a, first_b] {
            let err = block_on(waiter).unwrap_err();
            assert!(
                matches!(&err, Error::Engine(m) if m == "disk on fire"),
                "{err}"
            );
        }

        // Flush 3 starts because `late` is pending; until it ends, `late` is not resolved.
        started.recv_timeout(TIMEOUT).unwrap();
        assert!((&mut late).now_or_never().is_none());
        gate.send(Ok(())).unwrap();
        block_on(late).unwrap();
        assert_eq!(commit.flushes(), 3);
    }

    #[test]
    fn no_flush_without_callers() {
        let (commit, started, _gate) = gated();
        assert!(started.recv_timeout(Duration::from_millis(50)).is_err());
        assert_eq!(commit.flushes(), 0);
    }

    #[test]
    fn drop_flushes_for_pending_waiters() {
        let commit = GroupCommit::new(|| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        })
        .unwrap();
        let waiter = commit.sync();
        drop(commit);
        block_on(waiter).unwrap();
    }

    #[test]
    fn a_dead_flusher_closes_instead_of_hanging() {
        let commit = GroupCommit::new(|| panic!("flush panicked on purpose")).unwrap();
        let err = block_on(commit.sync()).unwrap_err();
        assert!(matches!(err, Error::Closed), "{err}");
        let err = block_on(commit.sync()).unwrap_err();
        assert!(matches!(err, Error::Closed), "{err}");
    }
}
