//! [`Context`]: what a handler sees of its object: its name, its own storage (reads see its
//! pending writes), its sockets and alarm, and the effects it wants released once its
//! writes are durable.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dormouse_storage::{Bytes, LogEntry, LogMeta, ObjectId, Retention, Storage, Write, WriteBatch};

use crate::Result;
use crate::socket::{Socket, Sockets};

/// What a handler asked about its activation's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Hibernate after the namespace's idle timeout, as usual.
    Default,
    /// Do not hibernate before this instant.
    StayAwake(tokio::time::Instant),
    /// Hibernate as soon as nothing is queued.
    Hibernate,
}

/// A deferred output, run by the output gate once the writes before it are durable.
pub(crate) type Effect = Box<dyn FnOnce() + Send + 'static>;

/// A handler's window onto its object: its identity, its own storage, and the outputs it
/// wants released after its writes are durable.
///
/// Writes are buffered in the context and applied as one atomic batch when the handler
/// returns `Ok`; key/value reads see the handler's own buffered writes, so a handler reads
/// what it wrote. Log reads see only what earlier handlers committed.
pub struct Context<'a> {
    /// Which object this is; also the storage key prefix of everything it owns.
    id: &'a ObjectId,
    /// The shared engine; only this object's records are ever touched through it.
    storage: &'a dyn Storage,
    /// Writes of this handler, applied together on success, discarded on failure.
    batch: WriteBatch,
    /// Key/value writes of this handler by key (`None` = deleted), for read-your-writes.
    overlay: BTreeMap<Vec<u8>, Option<Bytes>>,
    /// Set when the handler cleared all its keys, so reads must not fall through to storage.
    cleared: bool,
    /// The alarm as this handler left it: `None` = untouched, `Some(None)` = deleted.
    alarm: Option<Option<u64>>,
    /// What the handler asked about hibernation.
    lifecycle: Lifecycle,
    /// Outputs to release, in order, after the batch is durable.
    effects: Vec<Effect>,
    /// The object's connected clients; owned by the activation (and parked while it
    /// hibernates), lent to each handler.
    sockets: &'a mut Sockets,
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", self.id)
            .field("pending_writes", &self.batch.len())
            .field("pending_effects", &self.effects.len())
            .finish()
    }
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        id: &'a ObjectId,
        storage: &'a dyn Storage,
        sockets: &'a mut Sockets,
    ) -> Self {
        Self {
            id,
            storage,
            sockets,
            batch: WriteBatch::new(),
            overlay: BTreeMap::new(),
            cleared: false,
            alarm: None,
            lifecycle: Lifecycle::Default,
            effects: Vec::new(),
        }
    }

    /// The object's identity (namespace and name).
    pub fn id(&self) -> &ObjectId {
        self.id
    }

    /// The object's name within its namespace.
    pub fn name(&self) -> &str {
        self.id.name()
    }

    /// Reads one key, seeing this handler's own pending writes first.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        if let Some(pending) = self.overlay.get(key) {
            return Ok(pending.clone());
        }
        if self.cleared {
            return Ok(None);
        }
        Ok(self.storage.get(self.id, key)?)
    }

    /// Lists up to `limit` keys starting with `prefix`, after `start_after`, merging this
    /// handler's pending writes with what is stored.
    pub fn list(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>> {
        let mut merged: BTreeMap<Vec<u8>, Bytes> = BTreeMap::new();
        if !self.cleared {
            // Fetch enough stored rows that pending deletes cannot starve the page.
            let deletes = self.overlay.values().filter(|v| v.is_none()).count();
            for (k, v) in
                self.storage
                    .list(self.id, prefix, start_after, limit.saturating_add(deletes))?
            {
                merged.insert(k, v);
            }
        }
        let lower = match start_after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        for (k, v) in self.overlay.range((lower, Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                if k.as_slice() > prefix {
                    break;
                }
                continue;
            }
            match v {
                Some(value) => {
                    merged.insert(k.clone(), value.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// Sets a key; committed with the rest of this handler's writes.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Bytes>) {
        let key = key.into();
        let value = value.into();
        self.overlay.insert(key.clone(), Some(value.clone()));
        self.batch.push(Write::Put { key, value });
    }

    /// Removes a key; committed with the rest of this handler's writes.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        let key = key.into();
        self.overlay.insert(key.clone(), None);
        self.batch.push(Write::Delete { key });
    }

    /// Removes every key of the object.
    pub fn delete_all(&mut self) {
        self.overlay.clear();
        self.cleared = true;
        self.batch.push(Write::DeleteAllKv);
    }

    /// The object's event log bounds as committed by earlier handlers.
    pub fn log_meta(&self) -> Result<Option<LogMeta>> {
        Ok(self.storage.log_meta(self.id)?)
    }

    /// Committed log entries from `from_seq` on.
    pub fn read_log(&self, from_seq: u64, limit: usize) -> Result<Vec<LogEntry>> {
        Ok(self.storage.read_log(self.id, from_seq, limit)?)
    }

    /// The newest `limit` committed log entries, oldest first.
    pub fn read_log_tail(&self, limit: usize) -> Result<Vec<LogEntry>> {
        Ok(self.storage.read_log_tail(self.id, limit)?)
    }

    /// The last `limit` committed entries with `seq < before_seq`, oldest first: for reading
    /// a log backwards a page at a time (seqs may have holes after a crash).
    pub fn read_log_before(&self, before_seq: u64, limit: usize) -> Result<Vec<LogEntry>> {
        Ok(self.storage.read_log_before(self.id, before_seq, limit)?)
    }

    /// Appends an event to the object's log; `seq` must exceed every earlier sequence of the
    /// current epoch, or the whole batch is refused.
    pub fn append_log(&mut self, seq: u64, timestamp_ms: u64, data: impl Into<Bytes>) {
        self.batch.append(seq, timestamp_ms, data);
    }

    /// Trims the log to the retention bounds, measured at `now_ms`.
    pub fn trim_log(&mut self, retention: Retention, now_ms: u64) {
        self.batch.trim(retention, now_ms);
    }

    /// This run of the data dir and whether the previous one crashed; an object whose ids
    /// may have been seen by clients before they were durable uses it to avoid reusing them.
    pub fn boot(&self) -> dormouse_storage::Boot {
        self.storage.boot()
    }

    /// True exactly once per object after an unclean start (a crash or `kill -9` ended the
    /// previous run), on the first activation that asks; recorded with this handler's writes.
    ///
    /// Why an object asks: under a durability weaker than `always`, outputs may have left
    /// before the fsync, so a crash can lose state clients already saw. An object that hands
    /// out ids (a log's seqs) uses this to skip past any id the lost run could have used, so
    /// no id ever names two different things. The record lives under the reserved key
    /// [`Context::BOOT_KEY`] of the object's key/value store.
    pub fn first_activation_after_crash(&mut self) -> Result<bool> {
        let boot = self.storage.boot();
        if !boot.unclean {
            return Ok(false);
        }
        let seen = self
            .get(Self::BOOT_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        if seen == Some(boot.id) {
            return Ok(false);
        }
        self.put(Self::BOOT_KEY, boot.id.to_be_bytes().to_vec());
        Ok(true)
    }

    /// Reserved key/value key (it starts with a NUL byte) used by
    /// [`Context::first_activation_after_crash`].
    pub const BOOT_KEY: &'static [u8] = b"\0dormouse/boot";

    /// Reserves a fresh log epoch (see [`Context::create_log`]). Not part of the batch: an
    /// unused reservation is harmless.
    pub fn allocate_epoch(&self) -> Result<u64> {
        Ok(self.storage.allocate_epoch()?)
    }

    /// Starts a new, empty log with `epoch` (from [`Context::allocate_epoch`]), replacing
    /// any existing one, so the object knows its epoch before the batch commits.
    pub fn create_log(&mut self, epoch: u64) {
        self.batch.push(Write::CreateLog { epoch });
    }

    /// Deletes the log; the next append starts a new epoch.
    pub fn delete_log(&mut self) {
        self.batch.push(Write::DeleteLog);
    }

    /// The object's alarm, as this handler left it.
    pub fn alarm(&self) -> Result<Option<SystemTime>> {
        let at = match self.alarm {
            Some(pending) => pending,
            None => self.storage.alarm(self.id)?,
        };
        Ok(at.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)))
    }

    /// Sets the object's one alarm (replacing any other) to fire at `at`; committed with the
    /// handler's other writes. A time in the past fires as soon as possible.
    pub fn set_alarm(&mut self, at: SystemTime) {
        let at_ms = crate::alarm::to_ms(at);
        self.alarm = Some(Some(at_ms));
        self.batch.push(Write::SetAlarm { at_ms });
    }

    /// Removes the object's alarm, if any.
    pub fn delete_alarm(&mut self) {
        self.alarm = Some(None);
        self.batch.push(Write::DeleteAlarm);
    }

    /// True when this handler set or deleted the alarm.
    pub(crate) fn touched_alarm(&self) -> bool {
        self.alarm.is_some()
    }

    /// Registers an output to run after this handler's writes (and every earlier handler's)
    /// are durable, in registration order and before the reply is released. This is how an
    /// object talks to the outside world without ever revealing state a crash could undo.
    pub fn after_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.effects.push(Box::new(effect));
    }

    /// Takes ownership of a client connection: it stays with this object, across
    /// hibernation, until the client leaves or the object drops it.
    pub fn accept_socket(&mut self, socket: Socket) {
        self.sockets.add(socket);
    }

    /// The object's sockets (clients that left are pruned before each request). A snapshot:
    /// hand it to an [`Context::after_commit`] effect to fan out after the commit.
    pub fn sockets(&self) -> Arc<Vec<Socket>> {
        self.sockets.snapshot()
    }

    /// Number of sockets the object holds.
    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// The socket with this id, if the object holds it.
    pub fn socket(&self, id: u64) -> Option<Socket> {
        self.sockets
            .snapshot()
            .iter()
            .find(|s| s.id() == id)
            .cloned()
    }

    /// Keeps the object in memory for at least `duration` from now, whatever the idle
    /// timeout: for an object that expects traffic soon and is expensive to rebuild.
    pub fn stay_awake_for(&mut self, duration: Duration) {
        self.lifecycle = Lifecycle::StayAwake(tokio::time::Instant::now() + duration);
    }

    /// Asks to hibernate as soon as nothing else is queued, instead of after the idle
    /// timeout: for an object that knows it is done for now. Its sockets stay connected.
    pub fn hibernate(&mut self) {
        self.lifecycle = Lifecycle::Hibernate;
    }

    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Stops holding a socket; the connection ends once the returned handle and its clones
    /// are dropped.
    pub fn remove_socket(&mut self, id: u64) -> Option<Socket> {
        self.sockets.remove(id)
    }

    /// Hands the buffered writes and effects to the activation once the handler succeeded.
    pub(crate) fn finish(self) -> (WriteBatch, Vec<Effect>) {
        (self.batch, self.effects)
    }
}
