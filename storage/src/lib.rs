//! Durable state for Dormouse objects: an append-only event log, a key/value map and at most one
//! alarm per object, behind the [`Storage`] trait so the engine stays replaceable.
//!
//! # Layout
//! - `error`: the crate's one [`Error`] type, with messages meant for an operator.
//! - `object`: [`ObjectId`], the (namespace, name) pair every record belongs to.
//! - `batch`: [`WriteBatch`], the unit of atomicity: everything one handler wrote.
//! - `log`: [`LogEntry`], [`LogMeta`] and [`Retention`], the event-log vocabulary.
//! - `durability`: [`Durability`], when a write counts as safe.
//! - `key`: the byte-ordered key encoding shared by every engine that needs ordered keys.
//! - `group_commit`: [`GroupCommit`], one fsync shared by every writer that waited during the last.
//! - `segments`: [`SegmentStorage`], the default engine: checksummed frames in segment
//!   files, an index whose leaves live in those files and come into memory while used,
//!   checkpoints that bound start-up, and a cleaner that reclaims the oldest segment.
//! - `sled_store`: [`SledStorage`], the first engine, on sled 0.34; see
//!   docs/ARCHITECTURE.md for why it is no longer the default.
//! - `migrate` (private): moves a data dir sled wrote to the segment engine when it is
//!   opened.
//! - `fs` (private): the file layer under the segment engine, so tests can simulate power
//!   loss beneath it.
//! - `memory`: [`MemoryStorage`], an in-process engine for tests.
//! - `raw` (private): what an engine must provide (point reads, ordered scans) and the read
//!   operations written once on top of it.
//! - `plan` (private): turns a [`WriteBatch`] into raw puts and removes plus the new log meta,
//!   shared by both engines so their semantics cannot drift.
//! - `record` (private): the fixed-size big-endian value encodings.
//! - `files` (private): the data dir lock, directory syncs, I/O errors naming their file.
//!
//! # Contract
//! Writes become visible to reads as soon as [`Storage::apply`] returns, and become durable
//! when a later [`Storage::sync`] resolves. Writes to one object must be serialised by the
//! caller (the runtime guarantees one activation per object); writes to different objects may
//! run concurrently.

mod batch;
mod durability;
mod error;
mod files;
#[cfg(feature = "fjall")]
mod fjall_store;
mod fs;
mod group_commit;
pub mod key;
mod log;
mod memory;
mod migrate;
mod object;
mod plan;
mod raw;
mod record;
mod segments;
#[cfg(test)]
mod sim;
mod sled_store;

use std::fmt::Debug;

pub use batch::{Write, WriteBatch};
pub use bytes::Bytes;
pub use durability::Durability;

pub use error::{Error, Result};
#[cfg(feature = "fjall")]
pub use fjall_store::{FjallConfig, FjallStorage};
pub use group_commit::GroupCommit;
pub use log::{LogEntry, LogMeta, Retention};
pub use memory::MemoryStorage;
pub use object::ObjectId;
pub use segments::{SegmentConfig, SegmentStats, SegmentStorage};
pub use sled_store::{SledConfig, SledStorage};

/// Which run of a data dir this is; see [`Storage::boot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Boot {
    /// Increments every time the data dir is opened.
    pub id: u64,
    /// True when the previous run did not shut down cleanly (a crash or `kill -9`).
    pub unclean: bool,
}

/// A future that resolves once the writes applied before it was created are durable.
pub type SyncFuture = futures::future::BoxFuture<'static, Result<()>>;

/// A future that resolves once an object's records are ready for an activation here; see
/// [`Storage::acquire`].
pub type AcquireFuture = futures::future::BoxFuture<'static, Result<()>>;

/// What the runtime needs from a storage engine. Object-safe so the runtime can hold an
/// `Arc<dyn Storage>` and tests can swap in [`MemoryStorage`].
pub trait Storage: Send + Sync + Debug + 'static {
    /// Applies every write of `batch` to object `id` atomically: after a crash either all of
    /// them are present or none. Visible to reads on return; durable after the next `sync`.
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> Result<()>;

    /// Resolves when every write applied before this call is durable under the configured
    /// [`Durability`]. Under `always` concurrent callers share one fsync (group commit); under
    /// `interval` and `never` it resolves at once.
    fn sync(&self) -> SyncFuture;

    /// Like [`Storage::sync`], for the writes applied to one object only: what the runtime
    /// waits for before it releases that object's replies. An engine that makes every
    /// object durable together (one fsync) needs nothing else; a replicated one commits
    /// each object on its own, and one object's slow commit must not hold back the others.
    fn sync_object(&self, id: &ObjectId) -> SyncFuture {
        let _ = id;
        self.sync()
    }

    /// Makes object `id`'s records readable and writable on this node before an activation
    /// builds the object from them. A local engine holds every object: ready at once. A
    /// replicated engine (cluster mode) takes the object over here, fencing its former
    /// owner, and loads its records; it fails with [`Error::NotOwner`] when another live
    /// node owns the object, so the caller can send the work there instead.
    fn acquire(&self, id: &ObjectId) -> AcquireFuture {
        let _ = id;
        Box::pin(std::future::ready(Ok(())))
    }

    /// The activation of `id` retired (hibernated or stopped) with all its writes durable:
    /// a replicated engine drops its copy and gives the object up, so a hibernated object
    /// costs this node nothing. Reads and writes of `id` need a new [`Storage::acquire`].
    fn release(&self, id: &ObjectId) {
        let _ = id;
    }

    /// The activation of `id` hibernated while clients stay connected to it on this node
    /// (the runtime parked its sockets here). Its records may leave memory as on
    /// [`Storage::release`], but a replicated engine must keep the object this node's: its
    /// sockets cannot move, so its next wake-up (a socket's message, or any call another
    /// node forwards here) must happen where they are. Needs a new [`Storage::acquire`]
    /// like `release`; a local engine treats both alike.
    fn park(&self, id: &ObjectId) {
        self.release(id);
    }

    /// Reserves a new log epoch, strictly greater than any handed out before in this data
    /// dir, for a [`Write::CreateLog`]. Reserving without using one is harmless.
    fn allocate_epoch(&self) -> Result<u64>;

    /// Which run of the data dir this is, and whether the previous run ended without a clean
    /// shutdown (so writes it acknowledged under a weak durability may be missing).
    fn boot(&self) -> Boot {
        Boot::default()
    }

    /// The policy this store was opened with, so callers can report it.
    fn durability(&self) -> Durability;

    /// The log's epoch and bounds, or `None` if the object has no log (never appended, or
    /// deleted). The epoch is new each time a log is created, and strictly greater than any
    /// epoch this data dir handed out before.
    fn log_meta(&self, id: &ObjectId) -> Result<Option<LogMeta>>;

    /// Up to `limit` entries with `seq >= from_seq`, in sequence order.
    fn read_log(&self, id: &ObjectId, from_seq: u64, limit: usize) -> Result<Vec<LogEntry>>;

    /// The last `limit` entries of the log, in sequence order; what an activation loads to
    /// rebuild its in-memory tail.
    fn read_log_tail(&self, id: &ObjectId, limit: usize) -> Result<Vec<LogEntry>>;

    /// The last `limit` entries with `seq < before_seq`, in sequence order: reading a log
    /// backwards a page at a time, which must not assume seqs are contiguous (a crash leaves
    /// a hole; see `Context::first_activation_after_crash`).
    fn read_log_before(
        &self,
        id: &ObjectId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>>;

    /// Whether the engine can still make writes durable: `Err` (e.g. [`Error::Stalled`])
    /// when it is stuck, so a readiness probe can say so. Cheap; no I/O.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// One key/value record of the object.
    fn get(&self, id: &ObjectId, key: &[u8]) -> Result<Option<Bytes>>;

    /// Up to `limit` key/value records whose key starts with `prefix`, in key order, starting
    /// strictly after `start_after` when given (for pagination).
    fn list(
        &self,
        id: &ObjectId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>>;

    /// The object's alarm, as milliseconds since the Unix epoch.
    fn alarm(&self, id: &ObjectId) -> Result<Option<u64>>;

    /// Up to `limit` alarms due at or before `now_ms`, earliest first, read from the
    /// due-time index; how the runtime finds alarms after a restart.
    fn due_alarms(&self, now_ms: u64, limit: usize) -> Result<Vec<(ObjectId, u64)>>;

    /// The earliest alarm of any object, so the alarm scheduler knows how long to sleep.
    fn next_alarm(&self) -> Result<Option<(ObjectId, u64)>>;

    /// How often the alarm scheduler must look again even when nothing it knows of is due.
    /// A replicated store's alarms can become this process's to fire without a write here
    /// (the node that set them died); `None` (a local store): only this process's writes
    /// change what is due, and they wake the scheduler themselves.
    fn alarm_poll(&self) -> Option<std::time::Duration> {
        None
    }

    /// Up to `limit` names of objects of `namespace` that have a log, after `start_after`
    /// (for pagination). The order is the storage order: by name length in bytes, then
    /// bytewise (names are length-prefixed in keys), which pages correctly but is not
    /// alphabetical.
    fn list_logs(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>>;

    /// Marks the data dir as cleanly shut down and makes everything durable, whatever the
    /// policy: the last thing a graceful shutdown does, so the next open knows nothing
    /// acknowledged can be missing. Writing after it is safe (the next open then treats
    /// the run as a crash). Blocking.
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes the engine occupies on disk, for metrics and benchmarks.
    fn size_on_disk(&self) -> Result<u64>;
}
