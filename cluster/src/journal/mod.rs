//! Objects' storage in cluster mode: [`ClusterStorage`], a [`Storage`] whose truth is a
//! replicated journal in JetStream and whose reads are served from memory while this node
//! owns the object.
//!
//! Each object has a subject, `{prefix}.obj.{shard}.{namespace}.{name}`, in one of several
//! streams (so one stream leader does not serialise the whole cluster). Its messages are:
//! - **owner markers**, appended by [`crate::take_over`] when a node acquires the object:
//!   the fence. Every later append of that node names the sequence before it, so a former
//!   owner's append is refused by JetStream, whatever it still believes;
//! - **commits**: the write batches the runtime applied, as they were made, one message for
//!   every batch that waited while the previous append was in flight (a group commit per
//!   object). A batch is acknowledged to the runtime (so its replies are released) only
//!   once JetStream stored it on a quorum;
//! - **images**: every record of the object at one point, written instead of a commit when
//!   the commits since the last image outweigh it; the messages before an image are then
//!   purged, so a subject holds about twice the object's state, not its history.
//!
//! A record larger than a NATS message is split into parts (`Dm-Part: i/n`), appended one
//! after another with the same fencing; a reader applies it only once every part is there,
//! so a writer fenced half-way leaves nothing half-applied.
//!
//! Acquiring an object (an activation here): claim it in the [`Directory`] (refused when a
//! live node owns it, which the caller is told by [`Error::NotOwner`]), put this node's
//! fence in its log, then read the log from its first message to the fence: the last image
//! and the commits after it rebuild the object's records in memory. Releasing it (on
//! hibernation) drops them, so a hibernated object costs this node nothing.

mod alarms;
mod codec;
mod logs;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use dormouse_storage::{
    AcquireFuture, Durability, Error, LogEntry, LogMeta, MemoryStorage, ObjectId, Result, Storage,
    SyncFuture, Write, WriteBatch,
};
use futures::channel::oneshot;

use crate::connect::Nats;
use crate::feed::Feed;
use crate::fenced::{AppendError, FencedLog, LogError, LogSpec};
use crate::ownership::{Claim, Directory, Membership, NodeId, TakeOverError, take_over, token};
use crate::wire::Undecodable;
use alarms::AlarmIndex;
use logs::LogIndex;

/// Where and how objects' journals are kept.
#[derive(Debug, Clone)]
pub struct JournalSpec {
    /// Subjects start with `{prefix}.obj.`; streams are named `{PREFIX}_OBJ_{shard}`.
    pub prefix: String,
    /// How many streams objects are spread over (by a hash of their id): each has its own
    /// leader, so appends of different objects are served by different servers.
    pub shards: usize,
    /// Copies of each stream: 3 survives the loss of a server; 1 is for development.
    pub replicas: usize,
    /// How long the servers remember append ids, so a retried append is recognised.
    pub duplicate_window: Duration,
    /// How long an append is retried through an election or a lost connection before the
    /// object is given up as unreplicated.
    pub patience: Duration,
    /// Messages after the last image (commits and owner markers) that make the next write an
    /// image, so loading an object reads a bounded number of messages.
    pub image_every: usize,
    /// Commit bytes after the last image that make the next write an image once they also
    /// exceed the last image's size.
    pub image_min_bytes: usize,
}

impl JournalSpec {
    /// The settings cluster mode runs with, for `replicas` copies.
    pub fn new(prefix: impl Into<String>, replicas: usize) -> Self {
        Self {
            prefix: prefix.into(),
            shards: 8,
            replicas,
            duplicate_window: Duration::from_secs(120),
            patience: Duration::from_secs(30),
            image_every: 64,
            image_min_bytes: 64 * 1024,
        }
    }
}

/// What a node's journal did, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Messages appended (commit and image parts, not owner markers).
    pub appends: AtomicU64,
    /// Bytes of those messages' payloads.
    pub appended_bytes: AtomicU64,
    /// Microseconds those appends took, from sending to the quorum's acknowledgement
    /// (retries included): with `appends`, the replicated write latency operators watch.
    pub append_micros: AtomicU64,
    /// Batches acknowledged to the runtime.
    pub batches: AtomicU64,
    /// Images written.
    pub images: AtomicU64,
    /// Objects acquired (taken over and loaded).
    pub loads: AtomicU64,
    /// Messages read while loading.
    pub loaded_messages: AtomicU64,
    /// Appends refused because another node took the object over.
    pub fenced: AtomicU64,
    /// Objects given up because an append was not acknowledged in time.
    pub unreplicated: AtomicU64,
}

/// A [`Storage`] replicated through JetStream; see the module doc.
#[derive(Clone)]
pub struct ClusterStorage {
    inner: Arc<Inner>,
}

struct Inner {
    /// The records of the objects held here; nothing else.
    cache: MemoryStorage,
    shards: Vec<FencedLog>,
    prefix: String,
    directory: Directory,
    membership: Arc<Membership>,
    held: Mutex<HashMap<ObjectId, Arc<Held>>>,
    /// Every object's alarm, cluster-wide: how alarms of hibernated objects, and of objects
    /// whose node died, are found.
    alarms: AlarmIndex,
    /// Which objects have a log, cluster-wide: how channels are listed.
    logs: LogIndex,
    /// The largest payload of one message (the server's limit less room for headers).
    part_limit: usize,
    last_epoch: Mutex<u64>,
    spec: JournalSpec,
    stats: JournalStats,
}

/// One object this node acquired.
struct Held {
    subject: String,
    shard: usize,
    state: Mutex<HeldState>,
}

#[derive(Default)]
struct HeldState {
    /// Set when an append was refused or not acknowledged: the object must be acquired
    /// again (which re-reads the journal) before it is written.
    broken: Option<Error>,
    /// The subject's last sequence as this node wrote it: what the next append expects.
    expected: u64,
    /// The directory entry's revision, to release it.
    revision: u64,
    /// Applied to the cache, not yet appended.
    pending: Vec<WriteBatch>,
    /// Batches applied, and of those acknowledged by JetStream.
    applied: u64,
    acked: u64,
    /// Who waits for which batch count to be acknowledged.
    waiters: Vec<(u64, oneshot::Sender<Result<()>>)>,
    /// A writer task is running.
    writing: bool,
    /// Write an image next even with nothing pending (loading read too many messages).
    image_wanted: bool,
    /// Messages and commit bytes since the last image, and that image's size.
    since_image: usize,
    since_image_bytes: usize,
    image_bytes: usize,
}

/// What a journal message is, from its `Dm-Kind` header (owner markers have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Commit,
    Image,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Image => "image",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "commit" => Some(Kind::Commit),
            "image" => Some(Kind::Image),
            _ => None,
        }
    }
}

const KIND_HEADER: &str = "Dm-Kind";
/// How often the alarm scheduler looks at the index again with nothing due: how late a dead
/// node's alarm fires, past the node TTL that declares it dead.
const ALARM_POLL: Duration = Duration::from_secs(1);
const PART_HEADER: &str = "Dm-Part";
/// Room left in each message for its headers.
const HEADER_ROOM: usize = 4 * 1024;

impl fmt::Debug for ClusterStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterStorage")
            .field("node", self.inner.membership.me())
            .field("held", &lock(&self.inner.held).len())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; the state stays consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unreplicated(what: &str, e: impl fmt::Display) -> Error {
    Error::Unreplicated(format!("{what}: {e}"))
}

impl ClusterStorage {
    /// Opens (creating them if needed) the journal's streams. `membership` says which
    /// nodes are alive when a claim finds another owner; `directory` records owners.
    pub async fn open(
        nats: &Nats,
        membership: Arc<Membership>,
        directory: Directory,
        spec: JournalSpec,
    ) -> std::result::Result<Self, LogError> {
        let mut shards = Vec::with_capacity(spec.shards);
        for shard in 0..spec.shards.max(1) {
            let log = FencedLog::open(
                nats,
                &LogSpec {
                    name: format!("{}_OBJ_{shard}", spec.prefix.to_uppercase()),
                    subjects: vec![format!("{}.obj.{shard}.>", spec.prefix)],
                    replicas: spec.replicas,
                    duplicate_window: spec.duplicate_window,
                    // Followers ([`ClusterStorage::follow`]) get each append live.
                    republish: true,
                },
            )
            .await?;
            shards.push(log);
        }
        let max_payload = nats.client.server_info().max_payload;
        let part_limit = if max_payload > 4 * HEADER_ROOM {
            max_payload - HEADER_ROOM
        } else {
            max_payload / 2
        };
        let alarms = AlarmIndex::open(nats, &spec.prefix, spec.replicas, membership.clone())
            .await
            .map_err(|e| LogError::new("opening the alarms index", e))?;
        let logs = LogIndex::open(nats, &spec.prefix, spec.replicas)
            .await
            .map_err(|e| LogError::new("opening the log index", e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                cache: MemoryStorage::new(),
                shards,
                prefix: spec.prefix.clone(),
                directory,
                membership,
                alarms,
                logs,
                held: Mutex::new(HashMap::new()),
                part_limit: part_limit.max(1),
                last_epoch: Mutex::new(0),
                spec,
                stats: JournalStats::default(),
            }),
        })
    }

    /// What this node's journal did so far.
    pub fn stats(&self) -> &JournalStats {
        &self.inner.stats
    }

    /// The node this storage writes as.
    pub fn node(&self) -> &NodeId {
        self.inner.membership.me()
    }

    /// How many objects this node holds (acquired, not released).
    pub fn held(&self) -> usize {
        lock(&self.inner.held).len()
    }

    /// Objects with an alarm, cluster-wide, as this node's view of the alarm index has them.
    /// Up to `limit` names of `namespace`'s objects that have a log, cluster-wide, after
    /// `start_after`, in the order the engines list them (the trait's `list_logs` sees only
    /// the objects held here). Reads the whole log index: O(objects with a log).
    pub async fn list_logs_indexed(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.inner
            .logs
            .list(namespace, start_after, limit)
            .await
            .map_err(|e| unreplicated("listing the objects with a log", e))
    }

    pub fn alarms_indexed(&self) -> usize {
        self.inner.alarms.len()
    }

    /// The largest payload one journal message carries; larger records are split.
    pub fn part_limit(&self) -> usize {
        self.inner.part_limit
    }

    /// The subject of `id`'s journal.
    pub fn subject(&self, id: &ObjectId) -> String {
        self.inner.locate(id).1
    }

    /// The sequence of the last message of `id`'s journal, read from its stream's leader:
    /// a follower that has reached it has every write acknowledged before this call.
    pub async fn journal_end(&self, id: &ObjectId) -> Result<u64> {
        let (shard, subject) = self.inner.locate(id);
        self.inner.shards[shard]
            .last_sequence(&subject)
            .await
            .map_err(|e| unreplicated("reading the journal's end", e))
    }

    /// The owner directory's key for `id`, as [`crate::Directory`] and [`crate::place`]
    /// take it.
    pub fn object_key(id: &ObjectId) -> String {
        Inner::directory_key(id)
    }
}

/// Which of `shards` journal streams holds the object `namespace/name` (a hash fixed by its
/// definition, so every node and tool agrees).
pub fn shard(namespace: &str, name: &str, shards: usize) -> usize {
    let hash = crate::ownership::fnv1a([namespace.as_bytes(), &[0xff], name.as_bytes()]);
    (hash % shards.max(1) as u64) as usize
}

/// One complete journal record read by a [`Follower`], to apply to its copy.
#[derive(Debug)]
pub struct Record {
    kind: Kind,
    payload: Bytes,
}

/// A read-only copy of one object's records, kept up to date from its journal on any node:
/// how a node serves subscribers of a channel whichever node owns it. Reads come from the
/// [`MemoryStorage`] it was given; [`Follower::step`] applies the journal's next message.
pub struct Follower {
    feed: Feed,
    assembler: Assembler,
    id: ObjectId,
    copy: Arc<MemoryStorage>,
}

impl fmt::Debug for Follower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower")
            .field("id", &self.id)
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

impl ClusterStorage {
    /// Copies `id`'s records into `copy` (replacing what it held of `id`, in one step) as of
    /// the journal's end now, and returns a follower that keeps them current.
    pub async fn follow(&self, id: &ObjectId, copy: Arc<MemoryStorage>) -> Result<Follower> {
        let (shard, subject) = self.inner.locate(id);
        let log = &self.inner.shards[shard];
        let feed = log
            .follow(&subject, 0)
            .await
            .map_err(|e| unreplicated("following the journal", e))?;
        let tail = log
            .last_sequence(&subject)
            .await
            .map_err(|e| unreplicated("reading the journal's end", e))?;
        // Loaded aside, then put in place in one step: a reader of `copy` never sees the
        // object half-loaded (or gone, as a channel copy would take it to be deleted).
        let mut follower = Follower {
            feed,
            assembler: Assembler::default(),
            id: id.clone(),
            copy: Arc::new(MemoryStorage::new()),
        };
        while follower.feed.delivered() < tail {
            follower.step().await?;
        }
        copy.restore_object(id, follower.copy.export_object(id)?)?;
        follower.copy = copy;
        Ok(follower)
    }
}

impl Follower {
    /// Waits for the journal's next message and applies it to the copy: true when it
    /// completed a record (the copy changed), false for an owner marker or a part.
    pub async fn step(&mut self) -> Result<bool> {
        match self.next().await? {
            Some(record) => {
                self.apply(record)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Waits for the journal's next message: the record it completes, not applied yet
    /// ([`Follower::apply`]), or `None` for an owner marker or a part. Split from applying
    /// so a reader of the copy can prepare for the change first (a hibernated channel copy
    /// wakes before its records move past what its parked subscribers saw).
    pub async fn next(&mut self) -> Result<Option<Record>> {
        let entry = self
            .feed
            .next()
            .await
            .map_err(|e| unreplicated("following the journal", e))?;
        Ok(self
            .assembler
            .push(&entry.headers, entry.payload)
            .map(|(kind, payload)| Record { kind, payload }))
    }

    /// Applies a record [`Follower::next`] returned to the copy.
    pub fn apply(&self, record: Record) -> Result<()> {
        replay(&self.copy, &self.id, record.kind, &record.payload)
    }

    /// Drops every `n`th live message as if its republish had been lost (for tests and
    /// chaos runs): what it left out must be read from the stream.
    pub fn drop_live_every(&mut self, n: u64) {
        self.feed.drop_live_every(n);
    }

    /// The journal sequence the copy has reached.
    pub fn delivered(&self) -> u64 {
        self.feed.delivered()
    }

    /// The object it follows.
    pub fn id(&self) -> &ObjectId {
        &self.id
    }
}

impl Inner {
    fn held(&self, id: &ObjectId) -> Option<Arc<Held>> {
        lock(&self.held).get(id).cloned()
    }

    /// Forgets `id`'s records here (it hibernated), returning what was held.
    fn drop_held(&self, id: &ObjectId) -> Option<Arc<Held>> {
        let held = lock(&self.held).remove(id)?;
        if let Err(e) = self.cache.forget_object(id) {
            tracing::warn!(object = %id, error = %e, "could not drop a hibernated object's records");
        }
        Some(held)
    }

    /// The shard and subject of `id`'s journal.
    fn locate(&self, id: &ObjectId) -> (usize, String) {
        let shard = shard(id.namespace(), id.name(), self.shards.len());
        let subject = format!(
            "{}.obj.{shard}.{}.{}",
            self.prefix,
            token(id.namespace()),
            token(id.name())
        );
        (shard, subject)
    }

    /// The directory's key for `id`.
    fn directory_key(id: &ObjectId) -> String {
        format!("{}/{}", id.namespace(), id.name())
    }

    /// Takes `id` over on this node and loads its records; see the module doc.
    async fn acquire(self: Arc<Self>, id: ObjectId) -> Result<()> {
        if let Some(held) = self.held(&id)
            && lock(&held.state).broken.is_none()
        {
            return Ok(());
        }
        let me = self.membership.me().clone();
        let key = Self::directory_key(&id);
        let claim = self
            .directory
            .claim(&key, &me, |node| self.membership.alive(node))
            .await
            .map_err(|e| unreplicated("claiming the object", e))?;
        let revision = match claim {
            Claim::Mine { revision } => revision,
            Claim::Theirs(owner) => {
                return Err(Error::NotOwner {
                    id,
                    owner: Some(owner.name.clone()),
                    reason: format!("node {owner} owns it and is alive"),
                });
            }
        };
        let (shard, subject) = self.locate(&id);
        let log = &self.shards[shard];
        let fence = take_over(log, &subject, &me)
            .await
            .map_err(|e: TakeOverError| {
                unreplicated("putting this node's fence in the journal", e)
            })?;
        let loaded = self.load(log, &subject, fence, &id).await?;
        let held = Arc::new(Held {
            subject,
            shard,
            state: Mutex::new(HeldState {
                expected: fence,
                revision,
                image_bytes: loaded.image_bytes,
                since_image: loaded.since_image,
                since_image_bytes: loaded.since_image_bytes,
                image_wanted: loaded.since_image >= self.spec.image_every,
                ..HeldState::default()
            }),
        });
        lock(&self.held).insert(id.clone(), held.clone());
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        self.start_writer(&id, &held, &mut lock(&held.state));
        // The index now names this node for the alarm the journal holds (or forgets one the
        // journal does not): what settles an entry left early or stale by a dead writer.
        let alarm = self.cache.alarm(&id)?;
        if let Err(e) = self.alarms.settle(&id, alarm).await {
            tracing::warn!(object = %id, error = %e, "the alarm index was not brought up to date; the next write or acquisition retries");
        }
        // Off the acquisition's path: a listing may lag, a take-over must not.
        let has_log = self.cache.log_meta(&id)?.is_some();
        let inner = self.clone();
        let object = id.clone();
        tokio::spawn(async move {
            if let Err(e) = inner.logs.settle(&object, has_log).await {
                tracing::debug!(object = %object, error = %e, "the log index was not settled");
            }
        });
        Ok(())
    }

    /// Reads `subject` from its first message to `fence` into the cache (replacing what
    /// it held of `id`).
    async fn load(
        &self,
        log: &FencedLog,
        subject: &str,
        fence: u64,
        id: &ObjectId,
    ) -> Result<Loaded> {
        self.cache.forget_object(id)?;
        let mut loaded = Loaded::default();
        let mut assembler = Assembler::default();
        let mut from = 1;
        let started = tokio::time::Instant::now();
        loop {
            let message = match log
                .stream
                .get_first_raw_message_by_subject(subject, from)
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                    return Err(Error::Corrupt(format!(
                        "the journal of {id} ends at {from} before this node's fence at {fence}"
                    )));
                }
                Err(e) if started.elapsed() < self.spec.patience => {
                    tracing::debug!(error = %e, "reading the journal failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(unreplicated("reading the journal", e)),
            };
            self.stats.loaded_messages.fetch_add(1, Ordering::Relaxed);
            let sequence = message.sequence;
            from = sequence + 1;
            loaded.since_image += 1;
            if let Some((kind, payload)) = assembler.push(&message.headers, message.payload) {
                replay(&self.cache, id, kind, &payload)?;
                match kind {
                    Kind::Image => {
                        loaded.image_bytes = payload.len();
                        loaded.since_image = 0;
                        loaded.since_image_bytes = 0;
                    }
                    Kind::Commit => loaded.since_image_bytes += payload.len(),
                }
            }
            if sequence >= fence {
                return Ok(loaded);
            }
        }
    }

    fn start_writer(self: &Arc<Self>, id: &ObjectId, held: &Arc<Held>, state: &mut HeldState) {
        if state.writing
            || state.broken.is_some()
            || (state.pending.is_empty() && !state.image_wanted)
        {
            return;
        }
        state.writing = true;
        tokio::spawn(self.clone().write(id.clone(), held.clone()));
    }

    /// Appends what is pending, one record at a time, until nothing is.
    async fn write(self: Arc<Self>, id: ObjectId, held: Arc<Held>) {
        loop {
            let job = {
                let mut state = lock(&held.state);
                if state.broken.is_some() || (state.pending.is_empty() && !state.image_wanted) {
                    state.writing = false;
                    return;
                }
                let batches = std::mem::take(&mut state.pending);
                let commit = codec::encode_commit(&batches);
                let image_due = state.image_wanted
                    || state.since_image + 1 >= self.spec.image_every
                    || state.since_image_bytes + commit.len()
                        >= self.spec.image_min_bytes.max(state.image_bytes);
                // Under the object's lock, which `apply` holds while it changes the cache:
                // the image holds exactly the batches applied so far.
                let image = image_due.then(|| self.cache.export_object(&id)).transpose();
                let (kind, payload) = match image {
                    Ok(Some(records)) => (Kind::Image, codec::encode_image(&records)),
                    Ok(None) => (Kind::Commit, commit),
                    Err(e) => {
                        tracing::warn!(object = %id, error = %e, "could not image the object; appending a commit");
                        (Kind::Commit, commit)
                    }
                };
                state.image_wanted = false;
                Job {
                    kind,
                    payload,
                    batches: batches.len() as u64,
                    target: state.applied,
                    expected: state.expected,
                    alarm: alarm_change(&batches),
                    log: log_change(&batches),
                }
            };
            // The index may run ahead of the journal, never behind (see `alarms`).
            let recorded = match job.alarm {
                Some(Some(at_ms)) => self
                    .alarms
                    .before_set(&id, at_ms)
                    .await
                    .map_err(|e| unreplicated("recording the alarm in the index", e)),
                _ => Ok(()),
            };
            let outcome = match recorded {
                Ok(()) => self.append_record(&id, &held, &job).await,
                Err(e) => Err(e),
            };
            self.finish_job(&id, &held, &job, outcome);
            if lock(&held.state).broken.is_some() {
                return;
            }
            if let Some(has_log) = job.log
                && let Err(e) = self.logs.record(&id, has_log).await
            {
                // Settled at the object's next acquisition.
                tracing::debug!(object = %id, error = %e, "the log index was not updated");
            }
            if let Some(alarm) = job.alarm
                && let Err(e) = self.alarms.settle(&id, alarm).await
            {
                // Early or stale, never missing: the firing or the next acquisition settles it.
                tracing::debug!(object = %id, error = %e, "the alarm index was not settled");
            }
        }
    }

    /// Records an append's outcome: acknowledges the batches it carried, or breaks the
    /// object (it must be acquired again) and fails every waiter.
    fn finish_job(&self, id: &ObjectId, held: &Held, job: &Job, outcome: Result<(u64, u64)>) {
        let mut state = lock(&held.state);
        match outcome {
            Ok((first, last)) => {
                state.expected = last;
                state.acked = job.target;
                self.stats.batches.fetch_add(job.batches, Ordering::Relaxed);
                let acked = state.acked;
                resolve(&mut state.waiters, acked);
                match job.kind {
                    Kind::Image => {
                        state.since_image = 0;
                        state.since_image_bytes = 0;
                        state.image_bytes = job.payload.len();
                        self.stats.images.fetch_add(1, Ordering::Relaxed);
                        let log = self.shards[held.shard].clone();
                        let subject = held.subject.clone();
                        tokio::spawn(async move {
                            // Best effort: the next image purges again.
                            if let Err(e) =
                                log.stream.purge().filter(&subject).sequence(first).await
                            {
                                tracing::debug!(subject, error = %e, "purging before an image failed");
                            }
                        });
                    }
                    Kind::Commit => {
                        state.since_image += 1;
                        state.since_image_bytes += job.payload.len();
                    }
                }
            }
            Err(e) => {
                match &e {
                    Error::NotOwner { .. } => self.stats.fenced.fetch_add(1, Ordering::Relaxed),
                    _ => self.stats.unreplicated.fetch_add(1, Ordering::Relaxed),
                };
                tracing::warn!(object = %id, error = %e, "the object's journal refused a write; it must be acquired again");
                for (_, waiter) in state.waiters.drain(..) {
                    let _ = waiter.send(Err(e.clone()));
                }
                state.pending.clear();
                state.broken = Some(e);
                state.writing = false;
            }
        }
    }

    /// Appends one record, in parts if it is larger than a message: the stream sequences
    /// of its first and last part.
    async fn append_record(&self, id: &ObjectId, held: &Held, job: &Job) -> Result<(u64, u64)> {
        let log = &self.shards[held.shard];
        let me = self.membership.me();
        let parts = codec::split(&job.payload, self.part_limit);
        let count = parts.len();
        let mut expected = job.expected;
        let mut first = None;
        for (i, part) in parts.into_iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(KIND_HEADER, job.kind.as_str());
            if count > 1 {
                headers.insert(PART_HEADER, format!("{}/{count}", i + 1).as_str());
            }
            // Unique per subject, writer and position (the servers dedupe per stream, which
            // other objects share), so only a retry is recognised as the same append.
            let append_id = format!(
                "{}-{}-{:x}-{expected}",
                held.subject,
                token(&me.name),
                me.incarnation
            );
            let len = part.len() as u64;
            let started = std::time::Instant::now();
            match log
                .append_headed_retrying(
                    &held.subject,
                    headers,
                    part,
                    expected,
                    &append_id,
                    self.spec.patience,
                )
                .await
            {
                Ok(appended) => {
                    expected = appended.sequence;
                    first.get_or_insert(appended.sequence);
                    self.stats.appends.fetch_add(1, Ordering::Relaxed);
                    self.stats.appended_bytes.fetch_add(len, Ordering::Relaxed);
                    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.stats.append_micros.fetch_add(took, Ordering::Relaxed);
                }
                Err(AppendError::Fenced { .. }) => {
                    return Err(Error::NotOwner {
                        id: id.clone(),
                        owner: None,
                        reason: "another node took it over; this node's write was refused".into(),
                    });
                }
                Err(e) => return Err(unreplicated("appending to the journal", e)),
            }
        }
        Ok((first.unwrap_or(expected), expected))
    }

    /// Gives the object's records a new log epoch where a batch appends to an object that has
    /// no log: the engine would pick one itself, and every node replaying the batch must
    /// find the same.
    fn with_epochs(&self, id: &ObjectId, batch: WriteBatch) -> Result<WriteBatch> {
        let mut has_log = self.cache.log_meta(id)?.is_some();
        let needs_epoch = batch.writes().iter().any(|write| match write {
            Write::CreateLog { .. } => {
                has_log = true;
                false
            }
            Write::DeleteLog => {
                has_log = false;
                false
            }
            Write::Append { .. } => !has_log,
            _ => false,
        });
        if !needs_epoch {
            return Ok(batch);
        }
        let mut has_log = self.cache.log_meta(id)?.is_some();
        let mut out = WriteBatch::new();
        for write in batch.into_writes() {
            match &write {
                Write::CreateLog { .. } => has_log = true,
                Write::DeleteLog => has_log = false,
                Write::Append { .. } if !has_log => {
                    out.push(Write::CreateLog {
                        epoch: self.next_epoch(),
                    });
                    has_log = true;
                }
                _ => {}
            }
            out.push(write);
        }
        Ok(out)
    }

    /// Microseconds since the Unix epoch, or one more than the last: distinct for every log
    /// of an object, since one node at a time creates them and clocks agree to far better
    /// than the time a take-over takes.
    fn next_epoch(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut last = lock(&self.last_epoch);
        *last = now.max(*last + 1);
        *last
    }
}

struct Job {
    kind: Kind,
    payload: Bytes,
    /// How many batches it carries (an image carries those pending when it was taken).
    batches: u64,
    /// The applied-batch count it makes durable.
    target: u64,
    expected: u64,
    /// What the batches leave the alarm as, if they touch it: `Some(None)` deleted.
    alarm: Option<Option<u64>>,
    /// Whether the batches leave the object with a log (`CreateLog`) or without one
    /// (`DeleteLog`); `None` if they do neither.
    log: Option<bool>,
}

/// The alarm as `batches` leave it, if any of them touches it.
fn log_change(batches: &[WriteBatch]) -> Option<bool> {
    batches
        .iter()
        .flat_map(|b| b.writes())
        .filter_map(|w| match w {
            Write::CreateLog { .. } => Some(true),
            Write::DeleteLog => Some(false),
            _ => None,
        })
        .last()
}

fn alarm_change(batches: &[WriteBatch]) -> Option<Option<u64>> {
    batches
        .iter()
        .flat_map(|b| b.writes())
        .filter_map(|w| match w {
            Write::SetAlarm { at_ms } => Some(Some(*at_ms)),
            Write::DeleteAlarm => Some(None),
            _ => None,
        })
        .last()
}

#[derive(Default)]
struct Loaded {
    image_bytes: usize,
    since_image: usize,
    since_image_bytes: usize,
}

/// Puts records back together from the messages of one subject, in order: a record split
/// into parts is returned once its last part is read, and parts whose record was cut short
/// (by an owner marker, or a part missing) are dropped, never applied.
#[derive(Default)]
struct Assembler {
    partial: Option<Partial>,
}

/// A record whose parts are being read.
struct Partial {
    kind: Kind,
    of: usize,
    parts: Vec<Bytes>,
}

impl Assembler {
    /// The record this message completes, if any.
    fn push(&mut self, headers: &HeaderMap, payload: Bytes) -> Option<(Kind, Bytes)> {
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        let Some(kind) = header(KIND_HEADER).and_then(|k| Kind::parse(&k)) else {
            // An owner marker: it ends whatever record a fenced writer left unfinished.
            self.partial = None;
            return None;
        };
        let (part, of) = header(PART_HEADER)
            .and_then(|p| parse_part(&p))
            .unwrap_or((1, 1));
        if part == 1 {
            self.partial = Some(Partial {
                kind,
                of,
                parts: Vec::with_capacity(of),
            });
        }
        match self.partial.as_mut() {
            Some(p) if p.kind == kind && p.of == of && p.parts.len() + 1 == part => {
                p.parts.push(payload);
            }
            // A part without its beginning: left by a writer fenced half-way.
            _ => {
                self.partial = None;
                return None;
            }
        }
        let done = self.partial.take_if(|p| p.parts.len() == p.of)?;
        let payload = if done.parts.len() == 1 {
            done.parts.into_iter().next().unwrap_or_default()
        } else {
            Bytes::from(done.parts.concat())
        };
        Some((done.kind, payload))
    }
}

/// Applies one complete journal record to `cache`.
fn replay(cache: &MemoryStorage, id: &ObjectId, kind: Kind, payload: &Bytes) -> Result<()> {
    let damaged = |e: Undecodable| Error::Corrupt(format!("the journal of {id}: {e}"));
    match kind {
        Kind::Image => {
            let records = codec::decode_image(payload).map_err(damaged)?;
            cache.restore_object(id, records)
        }
        Kind::Commit => {
            for batch in codec::decode_commit(payload).map_err(damaged)? {
                cache.apply(id, batch)?;
            }
            Ok(())
        }
    }
}

/// `i/n` with `1 <= i <= n`.
fn parse_part(value: &str) -> Option<(usize, usize)> {
    let (i, n) = value.split_once('/')?;
    let (i, n) = (i.parse().ok()?, n.parse().ok()?);
    (1..=n).contains(&i).then_some((i, n))
}

/// Tells every waiter whose batches are all acknowledged.
fn resolve(waiters: &mut Vec<(u64, oneshot::Sender<Result<()>>)>, acked: u64) {
    let mut i = 0;
    while i < waiters.len() {
        if waiters[i].0 <= acked {
            let (_, waiter) = waiters.swap_remove(i);
            let _ = waiter.send(Ok(()));
        } else {
            i += 1;
        }
    }
}

impl Storage for ClusterStorage {
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let Some(held) = inner.held(id) else {
            return Err(Error::NotOwner {
                id: id.clone(),
                owner: None,
                reason: "this node has not acquired it".into(),
            });
        };
        let mut state = lock(&held.state);
        if let Some(e) = &state.broken {
            return Err(e.clone());
        }
        let batch = inner.with_epochs(id, batch)?;
        inner.cache.apply(id, batch.clone())?;
        state.pending.push(batch);
        state.applied += 1;
        inner.start_writer(id, &held, &mut state);
        Ok(())
    }

    fn sync(&self) -> SyncFuture {
        let ids: Vec<ObjectId> = lock(&self.inner.held).keys().cloned().collect();
        let waits: Vec<SyncFuture> = ids.iter().map(|id| self.sync_object(id)).collect();
        Box::pin(async move {
            for wait in waits {
                wait.await?;
            }
            Ok(())
        })
    }

    fn sync_object(&self, id: &ObjectId) -> SyncFuture {
        let Some(held) = self.inner.held(id) else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let mut state = lock(&held.state);
        if state.acked >= state.applied {
            return Box::pin(std::future::ready(Ok(())));
        }
        if let Some(e) = &state.broken {
            return Box::pin(std::future::ready(Err(e.clone())));
        }
        let (tx, rx) = oneshot::channel();
        let target = state.applied;
        state.waiters.push((target, tx));
        Box::pin(async move { rx.await.unwrap_or(Err(Error::Closed)) })
    }

    fn acquire(&self, id: &ObjectId) -> AcquireFuture {
        Box::pin(self.inner.clone().acquire(id.clone()))
    }

    fn release(&self, id: &ObjectId) {
        let Some(held) = self.inner.drop_held(id) else {
            return;
        };
        let inner = &self.inner;
        let revision = lock(&held.state).revision;
        let inner = inner.clone();
        let id = id.clone();
        tokio::spawn(async move {
            // Acquired here again since: the entry is this node's own, keep it.
            if inner.held(&id).is_some() {
                return;
            }
            let key = Inner::directory_key(&id);
            if let Err(e) = inner.directory.release(&key, revision).await {
                tracing::debug!(object = %id, error = %e, "directory entry not released");
            }
        });
    }

    /// Drops the records but keeps the directory entry: calls keep coming here, where the
    /// object's sockets are, and the next acquire finds its own claim.
    fn park(&self, id: &ObjectId) {
        self.inner.drop_held(id);
    }

    fn allocate_epoch(&self) -> Result<u64> {
        Ok(self.inner.next_epoch())
    }

    /// An acknowledged write is on a quorum of the stream's servers (in memory; on disk
    /// too when the servers run with `sync_interval: always`).
    fn durability(&self) -> Durability {
        Durability::Always
    }

    fn log_meta(&self, id: &ObjectId) -> Result<Option<LogMeta>> {
        self.inner.cache.log_meta(id)
    }

    fn read_log(&self, id: &ObjectId, from_seq: u64, limit: usize) -> Result<Vec<LogEntry>> {
        self.inner.cache.read_log(id, from_seq, limit)
    }

    fn read_log_tail(&self, id: &ObjectId, limit: usize) -> Result<Vec<LogEntry>> {
        self.inner.cache.read_log_tail(id, limit)
    }

    fn read_log_before(
        &self,
        id: &ObjectId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>> {
        self.inner.cache.read_log_before(id, before_seq, limit)
    }

    fn get(&self, id: &ObjectId, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner.cache.get(id, key)
    }

    fn list(
        &self,
        id: &ObjectId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>> {
        self.inner.cache.list(id, prefix, start_after, limit)
    }

    fn alarm(&self, id: &ObjectId) -> Result<Option<u64>> {
        self.inner.cache.alarm(id)
    }

    /// The alarms of objects held here (from their records), and of those held nowhere that
    /// this node fires (from the alarm index; see `alarms`).
    fn due_alarms(&self, now_ms: u64, limit: usize) -> Result<Vec<(ObjectId, u64)>> {
        let inner = &self.inner;
        let mut due = inner.cache.due_alarms(now_ms, limit)?;
        due.extend(
            inner
                .alarms
                .due(now_ms, limit, |id| inner.held(id).is_some()),
        );
        due.sort_by_key(|(_, at)| *at);
        due.truncate(limit);
        Ok(due)
    }

    fn next_alarm(&self) -> Result<Option<(ObjectId, u64)>> {
        let inner = &self.inner;
        let held_here = inner.cache.next_alarm()?;
        let indexed = inner.alarms.next(|id| inner.held(id).is_some());
        Ok([held_here, indexed]
            .into_iter()
            .flatten()
            .min_by_key(|(_, at)| *at))
    }

    /// Another node's death makes its alarms this node's to fire without a write here.
    fn alarm_poll(&self) -> Option<Duration> {
        Some(ALARM_POLL)
    }

    /// The objects held on this node only.
    /// The objects held here only: this call cannot wait on NATS. The cluster-wide list is
    /// [`ClusterStorage::list_logs_indexed`].
    fn list_logs(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.inner.cache.list_logs(namespace, start_after, limit)
    }

    /// Refuses writes while the NATS connection is down, so a readiness probe can say so.
    fn check(&self) -> Result<()> {
        use async_nats::connection::State;
        match self
            .inner
            .shards
            .first()
            .map(|log| log.client.connection_state())
        {
            Some(State::Connected) | None => Ok(()),
            Some(state) => Err(Error::Unreplicated(format!(
                "the NATS connection is {state:?}"
            ))),
        }
    }

    /// Nothing is kept on this node's disk.
    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }
}
