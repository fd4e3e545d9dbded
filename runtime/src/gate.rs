//! The output gate: what a handler says is held until what it wrote is durable.
//!
//! Each activation owns one gate. Items enter in handler order and are released strictly in
//! that order, each after its own commit future (if any) resolves. Because group commits
//! complete in order and a later item always waits for the earlier ones, a reply can never
//! overtake the durability of state it may have observed. A handler that wrote nothing and
//! finds the gate empty is released at once, with no task hop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dormouse_storage::SyncFuture;
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::socket::WakeBatch;
use crate::{Error, Result};

/// What to do once an item's commit is decided: run effects and reply on `Ok`, report the
/// failure on `Err`.
pub(crate) type Release = Box<dyn FnOnce(Result<()>) + Send + 'static>;

struct Item {
    commit: Option<SyncFuture>,
    release: Release,
}

/// One activation's output gate.
#[derive(Default)]
pub(crate) struct Gate {
    /// The releasing task's queue, created on the first item that has to wait.
    queue: Option<(mpsc::UnboundedSender<Item>, JoinHandle<()>)>,
    /// Items queued and not yet released; zero means a write-free reply may skip the queue.
    pending: Arc<AtomicUsize>,
    /// Set when a commit failed: the activation's in-memory state may be ahead of storage,
    /// so it must be rebuilt before serving more requests.
    poisoned: Arc<AtomicBool>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl Gate {
    /// Queues `release` behind every earlier item and behind `commit`.
    pub(crate) fn submit(&mut self, commit: Option<SyncFuture>, release: Release) {
        if commit.is_none() && self.pending.load(Ordering::Acquire) == 0 {
            release(Ok(()));
            return;
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        let (tx, _) = self.queue.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(run(rx, self.pending.clone(), self.poisoned.clone()));
            (tx, task)
        });
        if let Err(mpsc::error::SendError(item)) = tx.send(Item { commit, release }) {
            // The task only ends when the sender is dropped, so this is unreachable in
            // practice; fail the item rather than lose its reply.
            self.pending.fetch_sub(1, Ordering::AcqRel);
            (item.release)(Err(Error::Unavailable("output gate".into())));
        }
    }

    /// True while outputs wait for their commits; an activation must not retire then, or a
    /// successor could reveal state that is not durable yet.
    pub(crate) fn is_busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// True once a commit failed; cleared by the activation when it rebuilds its state.
    pub(crate) fn take_poisoned(&self) -> bool {
        self.poisoned.swap(false, Ordering::AcqRel)
    }

    /// Waits until every queued item is released; used by an orderly shutdown.
    pub(crate) async fn drain(&mut self) {
        if let Some((tx, task)) = self.queue.take() {
            drop(tx);
            let _ = task.await;
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Item>,
    pending: Arc<AtomicUsize>,
    poisoned: Arc<AtomicBool>,
) {
    // An item taken off the queue whose commit was not yet done; it goes first next round.
    let mut waiting: Option<Item> = None;
    loop {
        let item = match waiting.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        let outcome = match item.commit {
            Some(commit) => commit.await.map_err(Error::from),
            None => Ok(()),
        };
        // Release this item and every later one whose commit is already decided (a group
        // commit covers many) together, so the sockets they feed are woken once for all.
        let _batch = WakeBatch::begin();
        release(item.release, outcome, &pending, &poisoned);
        while let Ok(mut next) = rx.try_recv() {
            let outcome = match next.commit.as_mut() {
                None => Ok(()),
                Some(commit) => match commit.now_or_never() {
                    Some(outcome) => outcome.map_err(Error::from),
                    None => {
                        waiting = Some(next);
                        break;
                    }
                },
            };
            release(next.release, outcome, &pending, &poisoned);
        }
    }
}

fn release(release: Release, outcome: Result<()>, pending: &AtomicUsize, poisoned: &AtomicBool) {
    if outcome.is_err() {
        poisoned.store(true, Ordering::Release);
    }
    release(outcome);
    pending.fetch_sub(1, Ordering::AcqRel);
}
