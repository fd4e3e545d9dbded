//! The output gate: what a handler says is held until what it wrote is durable.
//!
//! Each activation owns one gate. Items enter in handler order and are released strictly in
//! that order, each after its own commit future (if any) resolves. Because group commits
//! complete in order and a later item always waits for the earlier ones, a reply can never
//! overtake the durability of state it may have observed. A handler that wrote nothing and
//! finds the gate empty is released at once, with no task hop.
//!
//! A failed commit fails more than its own item: every item computed by the object as it
//! was when the commit failed (its in-memory state, or what storage showed it, may hold
//! the writes that were not stored), including items queued after it and items of an
//! object rebuilt while the failed write was still on its way. Each item names the gate's
//! failure count when its object was built (its basis); one that differs at release is
//! refused.
//!
//! The releasing task runs only while items wait: it is spawned when the queue goes from
//! empty to not, and ends when it has emptied it. An activation that is merely alive (most
//! of them, most of the time: waiting for their idle timeout) holds no task and no channel,
//! which matters when a burst keeps a hundred thousand of them alive at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dormouse_storage::SyncFuture;
use futures::FutureExt;
use tokio::task::JoinHandle;

use crate::socket::WakeBatch;
use crate::{Error, Result};

/// What to do once an item's commit is decided: run effects and reply on `Ok`, report the
/// failure on `Err`.
pub(crate) type Release = Box<dyn FnOnce(Result<()>) + Send + 'static>;

struct Item {
    /// The gate's failure count when the object that made this item was built.
    basis: u64,
    commit: Option<SyncFuture>,
    release: Release,
}

/// One activation's output gate.
#[derive(Default)]
pub(crate) struct Gate {
    shared: Arc<Shared>,
    /// The releasing task last spawned; finished, or running while items wait.
    task: Option<JoinHandle<()>>,
}

/// What the gate and its releasing task share.
#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Items queued and not yet released; zero means a write-free reply may skip the queue.
    pending: AtomicUsize,
    /// Set when a commit failed: the activation's in-memory state may be ahead of storage,
    /// so it must be rebuilt before serving more requests.
    poisoned: AtomicBool,
    /// Commits that failed so far.
    failures: AtomicU64,
}

#[derive(Default)]
struct Queue {
    /// Oldest first.
    items: VecDeque<Item>,
    /// A releasing task is running and will take every item queued before it sets this
    /// back (under the lock, as it finds the queue empty).
    running: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock: releases run outside it.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, basis: u64, release: Release, outcome: Result<()>) {
        release(self.judge(basis, outcome));
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// An item's outcome: its commit's, unless a commit failed since its object was built.
    fn judge(&self, basis: u64, outcome: Result<()>) -> Result<()> {
        match outcome {
            Err(e) => {
                self.failures.fetch_add(1, Ordering::AcqRel);
                self.poisoned.store(true, Ordering::Release);
                Err(e)
            }
            Ok(()) if basis != self.failures.load(Ordering::Acquire) => Err(Error::Unavailable(
                "an earlier write of this object was not stored, and this answer may \
                 have seen it; nothing of it was acknowledged"
                    .into(),
            )),
            Ok(()) => Ok(()),
        }
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("pending", &self.shared.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl Gate {
    /// Queues `release` behind every earlier item and behind `commit`. `basis` is
    /// [`Gate::failures`] as it was when the object that made the item was built.
    pub(crate) fn submit(&mut self, basis: u64, commit: Option<SyncFuture>, release: Release) {
        if commit.is_none() && self.shared.pending.load(Ordering::Acquire) == 0 {
            release(self.shared.judge(basis, Ok(())));
            return;
        }
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        let start = {
            let mut queue = self.shared.lock();
            queue.items.push_back(Item {
                basis,
                commit,
                release,
            });
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            self.task = Some(tokio::spawn(run(self.shared.clone())));
        }
    }

    /// True while outputs wait for their commits; an activation must not retire then, or a
    /// successor could reveal state that is not durable yet.
    pub(crate) fn is_busy(&self) -> bool {
        self.shared.pending.load(Ordering::Acquire) > 0
    }

    /// Commits that failed so far: an object built now is the basis of its items.
    pub(crate) fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Acquire)
    }

    /// True once a commit failed; cleared by the activation when it rebuilds its state.
    pub(crate) fn take_poisoned(&self) -> bool {
        self.shared.poisoned.swap(false, Ordering::AcqRel)
    }

    /// Waits until every queued item is released; used by an orderly shutdown.
    pub(crate) async fn drain(&mut self) {
        // Only the activation submits, and it is here: the last task spawned is the one
        // that will empty the queue.
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Room for waiting items an idle gate keeps; more is given back when the queue empties.
const SPARE_ITEMS: usize = 16;

/// Releases queued items in order until the queue is empty, then ends.
async fn run(shared: Arc<Shared>) {
    loop {
        let item = {
            let mut queue = shared.lock();
            match queue.items.pop_front() {
                Some(item) => item,
                None => {
                    queue.running = false;
                    // A burst (a thousand publishes waiting on one slow fsync) must not
                    // leave its room behind for the rest of the activation's life.
                    if queue.items.capacity() > SPARE_ITEMS {
                        queue.items.shrink_to(SPARE_ITEMS);
                    }
                    return;
                }
            }
        };
        let outcome = match item.commit {
            Some(commit) => commit.await.map_err(Error::from),
            None => Ok(()),
        };
        // Release this item and every later one whose commit is already decided (a group
        // commit covers many) together, so the sockets they feed are woken once for all.
        let _batch = WakeBatch::begin();
        shared.release(item.basis, item.release, outcome);
        loop {
            let (item, outcome) = {
                let mut queue = shared.lock();
                let Some(next) = queue.items.front_mut() else {
                    break;
                };
                let outcome = match next.commit.as_mut() {
                    None => Ok(()),
                    Some(commit) => match commit.now_or_never() {
                        Some(outcome) => outcome.map_err(Error::from),
                        None => break,
                    },
                };
                match queue.items.pop_front() {
                    Some(item) => (item, outcome),
                    None => break,
                }
            };
            shared.release(item.basis, item.release, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use futures::channel::oneshot;

    use super::*;

    /// A commit the test decides, and a log of releases.
    fn commit() -> (oneshot::Sender<()>, SyncFuture) {
        let (tx, rx) = oneshot::channel::<()>();
        (
            tx,
            Box::pin(async move { rx.await.map_err(|_| dormouse_storage::Error::Closed) }),
        )
    }

    fn logger(log: &Arc<StdMutex<Vec<u32>>>, n: u32) -> Release {
        let log = log.clone();
        Box::new(move |outcome| {
            assert!(outcome.is_ok());
            log.lock().unwrap().push(n);
        })
    }

    #[tokio::test]
    async fn items_leave_in_order_and_the_task_ends_when_the_queue_is_empty() {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let mut gate = Gate::default();
        let (first, first_commit) = commit();
        let (second, second_commit) = commit();
        gate.submit(0, Some(first_commit), logger(&log, 1));
        gate.submit(0, Some(second_commit), logger(&log, 2));
        // Wrote nothing, but queued behind writes: it waits for them.
        gate.submit(0, None, logger(&log, 3));
        assert!(gate.is_busy());
        // The later commit finishing first releases nothing.
        second.send(()).unwrap();
        tokio::task::yield_now().await;
        assert!(log.lock().unwrap().is_empty());
        first.send(()).unwrap();
        let task = gate.task.take().expect("a releasing task while items wait");
        task.await.unwrap();
        assert_eq!(*log.lock().unwrap(), [1, 2, 3]);
        assert!(!gate.is_busy());
        // Idle again: a write-free item goes at once, and a new write starts a new task.
        gate.submit(0, None, logger(&log, 4));
        assert_eq!(log.lock().unwrap().last(), Some(&4));
        assert!(gate.task.is_none());
        let (third, third_commit) = commit();
        gate.submit(0, Some(third_commit), logger(&log, 5));
        third.send(()).unwrap();
        gate.drain().await;
        assert_eq!(*log.lock().unwrap(), [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_failed_commit_fails_its_item_and_poisons_the_gate() {
        let mut gate = Gate::default();
        let (failing, failing_commit) = commit();
        let failed = Arc::new(AtomicBool::new(false));
        let seen = failed.clone();
        gate.submit(
            0,
            Some(failing_commit),
            Box::new(move |outcome| seen.store(outcome.is_err(), Ordering::SeqCst)),
        );
        drop(failing);
        gate.drain().await;
        assert!(failed.load(Ordering::SeqCst));
        assert!(gate.take_poisoned());
        assert!(!gate.take_poisoned(), "taken once");
    }

    #[tokio::test]
    async fn what_the_object_made_before_its_rebuild_fails_with_the_write_it_may_have_seen() {
        let mut gate = Gate::default();
        let outcomes = Arc::new(StdMutex::new(Vec::new()));
        let record = |n: u32| -> Release {
            let outcomes = outcomes.clone();
            Box::new(move |outcome| outcomes.lock().unwrap().push((n, outcome.is_ok())))
        };
        let (failing, failing_commit) = commit();
        let basis = gate.failures();
        gate.submit(basis, Some(failing_commit), record(1));
        // Read-only, queued behind the write it may have seen.
        gate.submit(basis, None, record(2));
        drop(failing);
        gate.drain().await;
        // Still made by the object as it was (the activation has not rebuilt it yet).
        gate.submit(basis, None, record(3));
        // Rebuilt: its basis is the new failure count, and its answers go out again.
        assert!(gate.take_poisoned());
        gate.submit(gate.failures(), None, record(4));
        assert_eq!(
            *outcomes.lock().unwrap(),
            [(1, false), (2, false), (3, false), (4, true)]
        );
    }
}
