//! Subscribers in cluster mode: a client's stream stays on the node it connected to, and is
//! served by a copy of its channel on that node, kept current from the channel's journal
//! whichever node owns the channel (and through owner changes).
//!
//! The copy is the built-in `Channel` itself, run by a second runtime over the copied
//! records ([`ReadOnly`]): subscribing (backlog after the cursor, then live, with the same
//! gap events) is the code single-node mode runs. A [`Follower`] applies each journal record
//! to the copied records, then asks the copy to refresh ([`ChannelRequest::Refresh`]), which
//! hands the new events to its subscribers. Before a subscriber is added, the copy catches
//! up with the journal's end as the stream's leader has it, so a client that resumes from an
//! id another node just acknowledged never finds it missing here.
//!
//! A copy lives while it has subscribers (or one is being added); a sweep stops copies
//! nobody uses, and drops their records.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use dormouse_actors::Channel;
use dormouse_actors::channel::{ChannelEnv, ChannelRequest, ChannelResponse, NAMESPACE, Start};
use dormouse_cluster::{ClusterStorage, Follower};
use dormouse_runtime::{Error, Namespace, NamespaceConfig, ObjectState, Result, Runtime, Socket};
use dormouse_storage::{
    Durability, LogEntry, LogMeta, MemoryStorage, ObjectId, Storage, SyncFuture, WriteBatch,
};
use tokio::sync::{OnceCell, watch};
use tracing::{debug, warn};

/// How long a new subscriber waits for the copy to reach the journal's end.
const CATCH_UP: Duration = Duration::from_secs(10);
/// How often copies nobody uses are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// This node's copies of channels; see the module doc.
pub(super) struct Copies {
    inner: Arc<Inner>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Drop for Copies {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

struct Inner {
    storage: ClusterStorage,
    records: Arc<MemoryStorage>,
    /// Keeps the copies' runtime (and its alarm scheduler) alive.
    _runtime: Runtime,
    channels: Namespace<Channel>,
    copies: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One channel's copy: started once, by the first subscriber.
#[derive(Default)]
struct Slot {
    copy: OnceCell<Copy>,
    /// Subscribers being added right now; the sweep leaves the copy alone meanwhile.
    adding: AtomicUsize,
    /// Subscribers that came at all: a sweep that counted no subscriber stops the copy only
    /// if none came while it counted.
    entries: AtomicU64,
}

struct Copy {
    /// The journal sequence the copy has reached.
    delivered: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Copy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Copies {
    pub(super) fn new(storage: ClusterStorage, env: ChannelEnv, config: NamespaceConfig) -> Self {
        let records = Arc::new(MemoryStorage::new());
        let runtime = Runtime::new(Arc::new(ReadOnly(records.clone())));
        let channels = runtime.namespace::<Channel>(NAMESPACE, config, env);
        let inner = Arc::new(Inner {
            storage,
            records,
            _runtime: runtime,
            channels,
            copies: Mutex::new(HashMap::new()),
        });
        let sweeper = tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self { inner, sweeper }
    }

    /// Adds `socket` to `channel`'s copy (started if needed), from `start`.
    pub(super) async fn subscribe(
        &self,
        channel: &str,
        socket: Socket,
        start: Start,
    ) -> Result<ChannelResponse> {
        let slot = self.inner.enter(channel);
        let outcome = self.inner.subscribe(&slot, channel, socket, start).await;
        slot.adding.fetch_sub(1, Ordering::AcqRel);
        outcome
    }

    /// Another request to a copy (not a subscribe).
    pub(super) async fn call(
        &self,
        channel: &str,
        request: ChannelRequest,
    ) -> Result<ChannelResponse> {
        self.inner.channels.call(channel, request).await
    }

    /// Channels followed on this node.
    pub(super) fn followed(&self) -> usize {
        self.inner.lock().len()
    }

    /// Subscribers of `channel`'s copy on this node.
    pub(super) async fn subscribers(&self, channel: &str) -> usize {
        if !self.inner.lock().contains_key(channel) {
            return 0;
        }
        self.inner.subscribers(channel).await
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.copies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The channel's slot, counted as being added to (under the map's lock, so a sweep
    /// never removes a slot a subscriber is entering).
    fn enter(&self, channel: &str) -> Arc<Slot> {
        let mut copies = self.lock();
        let slot = copies.entry(channel.to_string()).or_default();
        slot.adding.fetch_add(1, Ordering::AcqRel);
        slot.entries.fetch_add(1, Ordering::AcqRel);
        slot.clone()
    }

    async fn subscribe(
        self: &Arc<Self>,
        slot: &Slot,
        channel: &str,
        socket: Socket,
        start: Start,
    ) -> Result<ChannelResponse> {
        let id = ObjectId::new(NAMESPACE, channel);
        let copy = slot
            .copy
            .get_or_try_init(|| self.clone().start(channel.to_string()))
            .await?;
        // Everything acknowledged before this subscribe, wherever it was published.
        let end = self.storage.journal_end(&id).await?;
        let mut delivered = copy.delivered.clone();
        let caught_up = tokio::time::timeout(CATCH_UP, delivered.wait_for(|seq| *seq >= end));
        match caught_up.await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                return Err(Error::Unavailable(format!(
                    "{id}: the copy stopped following its journal"
                )));
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "{id}: the copy did not reach the journal's end in {CATCH_UP:?}"
                )));
            }
        }
        self.channels.call(channel, ChannelRequest::Refresh).await?;
        self.channels
            .call(channel, ChannelRequest::Subscribe { socket, start })
            .await
    }

    /// Loads `channel`'s records and starts following its journal.
    async fn start(self: Arc<Self>, channel: String) -> Result<Copy> {
        let id = ObjectId::new(NAMESPACE, channel.as_str());
        let follower = self.storage.follow(&id, self.records.clone()).await?;
        let (tell, delivered) = watch::channel(follower.delivered());
        // An activation left from an earlier copy may hold less than the records now do.
        self.channels
            .call(&channel, ChannelRequest::Refresh)
            .await?;
        let task = tokio::spawn(self.clone().follow(channel, follower, tell));
        Ok(Copy { delivered, task })
    }

    /// Applies the journal to the copy as it grows, and tells the copy's subscribers.
    async fn follow(
        self: Arc<Self>,
        channel: String,
        mut follower: Follower,
        tell: watch::Sender<u64>,
    ) {
        let id = follower.id().clone();
        loop {
            match follower.next().await {
                Ok(None) => {
                    tell.send_replace(follower.delivered());
                }
                Ok(Some(record)) => {
                    // Awake before the records move: a copy that wakes loads its position
                    // from them, and its parked subscribers saw only what came before.
                    self.refresh(&channel).await;
                    if let Err(e) = follower.apply(record) {
                        warn!(channel, error = %e, "a journal record could not be applied; reloading");
                        follower = self.reload(&id, &channel).await;
                    }
                    self.refresh(&channel).await;
                    tell.send_replace(follower.delivered());
                }
                Err(e) => {
                    // The feed could not fill a gap in time (a long election, NATS gone):
                    // load the journal again rather than skip anything.
                    warn!(channel, error = %e, "following the channel's journal failed; reloading");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    follower = self.reload(&id, &channel).await;
                    tell.send_replace(follower.delivered());
                }
            }
        }
    }

    /// Hands the copy's subscribers what its records hold that they have not seen.
    async fn refresh(&self, channel: &str) {
        if let Err(e) = self.channels.call(channel, ChannelRequest::Refresh).await {
            warn!(channel, error = %e, "a channel copy could not refresh");
        }
    }

    /// Loads the journal again (the copy awake meanwhile), until it loads.
    async fn reload(&self, id: &ObjectId, channel: &str) -> Follower {
        loop {
            self.refresh(channel).await;
            match self.storage.follow(id, self.records.clone()).await {
                Ok(follower) => {
                    self.refresh(channel).await;
                    return follower;
                }
                Err(e) => {
                    debug!(channel, error = %e, "reloading failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Subscribers of `channel`'s copy here, connected or parked.
    async fn subscribers(&self, channel: &str) -> usize {
        match self.channels.state(channel) {
            ObjectState::Active => match self.channels.call(channel, ChannelRequest::Info).await {
                Ok(ChannelResponse::Info(info)) => info.subscribers,
                // Unknown: keep it.
                _ => 1,
            },
            _ => self.channels.parked_sockets(channel).unwrap_or(0),
        }
    }
}

/// Stops the copies nobody uses, until the copies are dropped.
async fn sweep(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let names: Vec<String> = inner.lock().keys().cloned().collect();
        for name in names {
            let Some(before) = inner
                .lock()
                .get(&name)
                .map(|slot| slot.entries.load(Ordering::Acquire))
            else {
                continue;
            };
            if inner.subscribers(&name).await > 0 {
                continue;
            }
            let mut copies = inner.lock();
            let unused = copies.get(&name).is_some_and(|slot| {
                slot.adding.load(Ordering::Acquire) == 0
                    && slot.entries.load(Ordering::Acquire) == before
            });
            if unused {
                copies.remove(&name);
                drop(copies);
                let id = ObjectId::new(NAMESPACE, name.as_str());
                if let Err(e) = inner.records.forget_object(&id) {
                    warn!(channel = name, error = %e, "a copy's records were not dropped");
                }
            }
        }
    }
}

/// The copies' records, read-only: only a [`Follower`] changes them. A copy that tried to
/// write (it never should: publishes go to the owner) is refused, not silently diverged.
#[derive(Debug)]
struct ReadOnly(Arc<MemoryStorage>);

impl ReadOnly {
    fn refuse() -> dormouse_storage::Error {
        dormouse_storage::Error::Engine(
            "a channel copy is read-only: writes go to the channel's owner (a bug)".into(),
        )
    }
}

impl Storage for ReadOnly {
    fn apply(&self, _id: &ObjectId, _batch: WriteBatch) -> dormouse_storage::Result<()> {
        Err(Self::refuse())
    }

    fn sync(&self) -> SyncFuture {
        Box::pin(std::future::ready(Ok(())))
    }

    fn allocate_epoch(&self) -> dormouse_storage::Result<u64> {
        Err(Self::refuse())
    }

    fn durability(&self) -> Durability {
        Durability::Always
    }

    fn log_meta(&self, id: &ObjectId) -> dormouse_storage::Result<Option<LogMeta>> {
        self.0.log_meta(id)
    }

    fn read_log(
        &self,
        id: &ObjectId,
        from_seq: u64,
        limit: usize,
    ) -> dormouse_storage::Result<Vec<LogEntry>> {
        self.0.read_log(id, from_seq, limit)
    }

    fn read_log_tail(
        &self,
        id: &ObjectId,
        limit: usize,
    ) -> dormouse_storage::Result<Vec<LogEntry>> {
        self.0.read_log_tail(id, limit)
    }

    fn read_log_before(
        &self,
        id: &ObjectId,
        before_seq: u64,
        limit: usize,
    ) -> dormouse_storage::Result<Vec<LogEntry>> {
        self.0.read_log_before(id, before_seq, limit)
    }

    fn get(&self, id: &ObjectId, key: &[u8]) -> dormouse_storage::Result<Option<Bytes>> {
        self.0.get(id, key)
    }

    fn list(
        &self,
        id: &ObjectId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> dormouse_storage::Result<Vec<(Vec<u8>, Bytes)>> {
        self.0.list(id, prefix, start_after, limit)
    }

    fn alarm(&self, id: &ObjectId) -> dormouse_storage::Result<Option<u64>> {
        self.0.alarm(id)
    }

    /// None: a copy's alarms fire on the owner.
    fn due_alarms(
        &self,
        _now_ms: u64,
        _limit: usize,
    ) -> dormouse_storage::Result<Vec<(ObjectId, u64)>> {
        Ok(Vec::new())
    }

    fn next_alarm(&self) -> dormouse_storage::Result<Option<(ObjectId, u64)>> {
        Ok(None)
    }

    fn list_logs(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> dormouse_storage::Result<Vec<String>> {
        self.0.list_logs(namespace, start_after, limit)
    }

    fn size_on_disk(&self) -> dormouse_storage::Result<u64> {
        Ok(0)
    }
}
