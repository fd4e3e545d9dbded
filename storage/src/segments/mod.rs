//! The default engine: a log-structured store written for Dormouse's workload.
//!
//! Every applied batch becomes one checksummed frame appended to the newest *segment* file
//! (see [`frame`] for the bytes). The index from each live key to where its value sits is
//! a list of leaves ([`index`]): the list is always in memory, a leaf only while it is
//! being changed or read often (a bounded cache). A *checkpoint* writes the changed leaves
//! into the log and records where every leaf is ([`checkpoint`]), so opening a data dir
//! reads the checkpoint and replays only the log written after it, and memory follows what
//! is active, not what is kept.
//!
//! Space is reclaimed by a *cleaner* thread that always takes the **oldest** segments, copies
//! the records in them that are still current to the head of the log, writes the index
//! leaves they hold elsewhere with a checkpoint, then deletes the files. Taking only the
//! oldest segments is what makes this simple and safe: a remove (tombstone) only has to hide records
//! in *older* segments, and there are none, so the cleaner drops removes without tracking
//! them. The replay-buffer workload (append at the head, trim the tail) suits it well: by
//! the time a segment is the oldest, nearly everything in it has been trimmed, so cleaning
//! copies little. Cleaning starts when the files hold more than twice the live data, which
//! bounds disk use at about 2x live data plus a segment.
//!
//! Durability: `always` shares one `fdatasync` of the written segments among concurrent
//! writers ([`GroupCommit`]); `interval` syncs from the cleaner thread every period;
//! `never` leaves it to the OS. A segment is synced before the next one is started, so
//! only the newest segment can ever end in a torn write, and a segment is deleted only
//! after a durable checkpoint no longer needs it.
//!
//! Failures: a failed write (a full disk) is cut back out of the file and reported, and
//! leaves the store usable once space is freed. A failed fsync is not retried: after one,
//! the kernel may have dropped the dirty pages, so the store refuses writes until restarted
//! ([`Error::Failed`]).

mod checkpoint;
mod frame;
mod index;
mod leaf;
mod state;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::instrument;

use crate::files::{at, lock_data_dir};
use crate::fs::{Fs, RealFs};
use crate::raw::{self, Raw};
use crate::{
    Boot, Durability, Error, GroupCommit, LogEntry, LogMeta, ObjectId, Result, Storage, SyncFuture,
    WriteBatch, key, plan, record,
};
use frame::Next;
use state::{Limits, State, segment_path, sync_files};

/// How to open a data dir with the segment engine. Fields are public so the gateway can
/// fill them from its own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentConfig {
    /// The data dir; created if missing. Holds `dormouse.lock` and the segment files in
    /// `segments/`.
    pub path: PathBuf,
    /// When writes count as safe; decides what [`Storage::sync`] waits for.
    pub durability: Durability,
    /// Target size of one segment file. Smaller means finer-grained cleaning; larger means
    /// fewer files. At most 1 GiB.
    pub segment_bytes: u64,
    /// Below this many bytes on disk the cleaner does nothing, so a small store does not
    /// keep rewriting itself to save a few megabytes.
    pub clean_above_bytes: u64,
    /// Memory for index leaves that are read but not being changed: what an active
    /// object's reads are served from without a system call. Leaves leave it as others are
    /// read, and, once writes have stopped, when a second passes without a read of them.
    pub cache_bytes: u64,
    /// Memory for changes to the index since the last checkpoint (about 80 bytes per
    /// changed key); reaching it starts one. Bounds the engine's memory while publishing to
    /// many objects; larger means fewer index writes when writes are spread thin.
    pub dirty_bytes: u64,
    /// Log bytes written since the last checkpoint that start the next one: what a
    /// restart after a crash replays at most (plus what arrives while it runs).
    pub checkpoint_bytes: u64,
}

impl SegmentConfig {
    /// 64 MiB segments.
    pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
    /// The largest segment size accepted (offsets in the index are 32-bit).
    pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

    /// The defaults (64 MiB segments, cleaning above two segments, 16 MiB of leaf cache,
    /// 16 MiB of index changes, a checkpoint every 64 MiB of log, `always`) for a data dir.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            clean_above_bytes: 2 * Self::DEFAULT_SEGMENT_BYTES,
            cache_bytes: 16 << 20,
            dirty_bytes: 16 << 20,
            checkpoint_bytes: 64 << 20,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            segment_bytes: self.segment_bytes,
            cache_bytes: usize::try_from(self.cache_bytes).unwrap_or(usize::MAX),
            changes: usize::try_from((self.dirty_bytes / index::CHANGE_BYTES).max(1))
                .unwrap_or(usize::MAX),
        }
    }
}

/// Figures about the engine, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentStats {
    /// Bytes of current records and index leaves (what a perfectly compact store would
    /// hold).
    pub live_bytes: u64,
    /// Bytes in segment files.
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Keys in the index.
    pub keys: usize,
    /// Leaves of the index.
    pub leaves: usize,
    /// Leaves changed since the last checkpoint.
    pub dirty_leaves: usize,
    /// Keys changed since the last checkpoint (in memory until it writes them).
    pub changes: usize,
    /// Memory the index holds itself: the list of leaves (about 80 bytes per leaf) and the
    /// changes.
    pub index_bytes: usize,
    /// Clean leaves in the cache and their memory.
    pub cached_leaves: usize,
    /// See `cached_leaves`.
    pub cache_bytes: usize,
    /// Log bytes a restart would replay now.
    pub replay_bytes: u64,
    /// Checkpoints written since open.
    pub checkpoints: u64,
    /// Segments the cleaner has deleted since open.
    pub cleaned_segments: u64,
    /// Bytes of current records the cleaner has copied forward since open.
    pub moved_bytes: u64,
}

/// [`Storage`] on segment files; see the module docs. One process per data dir (a lock
/// file); writes are serialised by one lock, reads share it.
pub struct SegmentStorage {
    /// `Some` under [`Durability::Always`]. Declared first so it is dropped (final flush,
    /// thread joined) before the rest.
    group_commit: Option<GroupCommit>,
    shared: Arc<Shared>,
    cleaner: Option<JoinHandle<()>>,
    durability: Durability,
    path: PathBuf,
    boot: Boot,
    /// Held for the life of the store and declared last.
    _lock: Option<File>,
}

struct Shared {
    state: RwLock<State>,
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    durability: Durability,
    clean_above_bytes: u64,
    checkpoint_bytes: u64,
    changes: usize,
    /// Set by the first failed fsync; every later write is refused with it.
    failure: Mutex<Option<String>>,
    control: Mutex<Control>,
    wake: Condvar,
    cleaned_segments: AtomicU64,
    moved_bytes: AtomicU64,
    checkpoints: AtomicU64,
    /// When the last batch was applied, for checkpointing an idle store.
    last_write: Mutex<Instant>,
    /// One cleaning at a time: the thread and [`SegmentStorage::clean`] must not both take
    /// the same oldest segment.
    cleaning: Mutex<()>,
    /// One checkpoint at a time, each finished (file renamed, directory synced) before the
    /// next starts, so a segment is deleted only once the durable checkpoint is one written
    /// after its contents moved.
    checkpointing: Mutex<()>,
}

#[derive(Debug, Default)]
struct Control {
    stop: bool,
    kicked: bool,
}

/// A store with nothing applied for this long writes its dirty leaves out, so an idle
/// server holds no more index memory than the leaf cache.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(2);

impl SegmentStorage {
    /// Opens (or creates) a data dir: takes the process lock, migrates a data dir written
    /// by the sled engine, loads the last checkpoint and replays the log after it, checks
    /// the schema version, and starts the cleaner (and, under `always`, the group commit
    /// thread).
    #[instrument(skip_all, fields(path = %config.path.display(), durability = %config.durability))]
    pub fn open(config: SegmentConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.path).map_err(|e| at(&config.path, e))?;
        let lock = lock_data_dir(&config.path)?;
        crate::migrate::from_sled_if_present(&config)?;
        Self::open_on(config, Arc::new(RealFs), Some(lock))
    }

    /// Opens a data dir on the given file layer (the simulated one in power-loss tests).
    pub(crate) fn open_on(
        config: SegmentConfig,
        fs: Arc<dyn Fs>,
        lock: Option<File>,
    ) -> Result<Self> {
        if !(4096..=SegmentConfig::MAX_SEGMENT_BYTES).contains(&config.segment_bytes) {
            return Err(Error::Engine(format!(
                "segment size {} is outside 4 KiB..=1 GiB",
                config.segment_bytes
            )));
        }
        let path = config.path.clone();
        fs.create_dir_all(&path).map_err(|e| at(&path, e))?;
        let dir = path.join("segments");
        let created = !fs.exists(&dir);
        fs.create_dir_all(&dir).map_err(|e| at(&dir, e))?;
        if created {
            fs.sync_dir(&path).map_err(|e| at(&path, e))?;
        }
        let started = Instant::now();
        let limits = config.limits();
        let state = State::recover(Arc::clone(&fs), &dir, limits)?;
        let replayed = state.since_checkpoint;
        tracing::info!(
            keys = state.index.len(),
            leaves = state.index.leaf_count(),
            segments = state.segments.len(),
            disk_bytes = state.disk_bytes,
            replayed_bytes = state.since_checkpoint,
            took_ms = started.elapsed().as_millis() as u64,
            "segments opened"
        );
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            fs,
            dir,
            durability: config.durability,
            clean_above_bytes: config.clean_above_bytes,
            checkpoint_bytes: config.checkpoint_bytes,
            changes: limits.changes,
            failure: Mutex::new(None),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
            cleaned_segments: AtomicU64::new(0),
            moved_bytes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            last_write: Mutex::new(Instant::now()),
            cleaning: Mutex::new(()),
            checkpointing: Mutex::new(()),
        });
        let created = shared.check_schema(&path)?;
        let boot = shared.start_boot(created)?;
        if boot.unclean {
            tracing::warn!(
                boot = boot.id,
                "the previous run did not shut down cleanly; weakly durable writes may be lost"
            );
        }
        if replayed > 0 {
            // What was replayed is in memory only: write it out, so the next open (and
            // this run's memory) does not carry it.
            shared.checkpoint()?;
        }
        let group_commit = match config.durability {
            Durability::Always => {
                let shared = Arc::clone(&shared);
                Some(GroupCommit::new(move || shared.sync())?)
            }
            Durability::Interval(_) | Durability::Never => None,
        };
        let cleaner = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("dormouse-cleaner".into())
                .spawn(move || shared.run_cleaner())?
        };
        Ok(Self {
            group_commit,
            shared,
            cleaner: Some(cleaner),
            durability: config.durability,
            path,
            boot,
            _lock: lock,
        })
    }

    /// The data dir, for messages and metrics.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sizes, memory and background progress.
    pub fn stats(&self) -> SegmentStats {
        let state = self.shared.read();
        let (cached_leaves, cache_bytes) = state.cache.size();
        SegmentStats {
            live_bytes: state.live_bytes,
            disk_bytes: state.disk_bytes,
            segments: state.segments.len(),
            keys: state.index.len(),
            leaves: state.index.leaf_count(),
            dirty_leaves: state.index.dirty_count(),
            changes: state.index.change_count(),
            index_bytes: state.index.heap_bytes(),
            cached_leaves,
            cache_bytes,
            replay_bytes: state.since_checkpoint,
            checkpoints: self.shared.checkpoints.load(Ordering::Relaxed),
            cleaned_segments: self.shared.cleaned_segments.load(Ordering::Relaxed),
            moved_bytes: self.shared.moved_bytes.load(Ordering::Relaxed),
        }
    }

    /// Runs the cleaner until the store is within its space bound (or nothing can be
    /// cleaned). The cleaner thread does this by itself; tests and benchmarks call it to
    /// observe the result without waiting.
    pub fn clean(&self) -> Result<()> {
        while self.shared.clean_once()? {}
        Ok(())
    }

    /// Writes every changed index leaf and a checkpoint now. The engine does this by itself
    /// (after enough changes, enough log, or a moment of quiet); benchmarks call it to
    /// measure settled memory.
    pub fn checkpoint(&self) -> Result<()> {
        self.shared.checkpoint()
    }

    /// Reads every index leaf and every value of the store and checks their checksums,
    /// without waiting for a read to come across damage: returns the number of records,
    /// or the first damage found, naming its file and offset. Opening a data dir does not
    /// read what the last checkpoint covers; this does.
    pub fn scrub(&self) -> Result<u64> {
        let state = self.shared.read();
        let mut records = 0;
        state.scan(
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            false,
            &mut |_, _| {
                records += 1;
                Ok(true)
            },
        )?;
        Ok(records)
    }

    /// Writes raw records (encoded keys) as one frame, for migrations.
    pub(crate) fn put_raw(&self, ops: &[(&[u8], Option<&[u8]>)]) -> Result<()> {
        self.check()?;
        self.shared.put_raw(ops)
    }

    /// Flushes run by group commit so far (0 unless `always`).
    pub fn fsyncs(&self) -> u64 {
        self.group_commit.as_ref().map_or(0, GroupCommit::flushes)
    }

    /// The state for one read (see `raw::raw_reads`).
    pub(crate) fn reader(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.read()
    }
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Nothing panics between the index update and the file write it describes, so a
        // poisoned lock still guards a consistent state.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self) -> Result<()> {
        match &*self.failure.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(message) => Err(Error::Failed(message.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, e: &Error) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_none() {
            tracing::error!(error = %e, "storage failed; refusing writes until restart");
            *failure = Some(e.to_string());
        }
    }

    /// Passes `result` on, first marking the store failed if it is an fsync failure.
    fn guard<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e @ Error::Failed(_)) = &result {
            self.fail(e);
        }
        result
    }

    /// Writes a batch of raw records as one frame: every write goes through here.
    fn write_ops<'o>(
        &self,
        state: &mut State,
        ops: impl IntoIterator<Item = (&'o [u8], Option<&'o [u8]>)> + Clone,
    ) -> Result<()> {
        if ops.clone().into_iter().next().is_none() {
            // A batch that changes nothing (a trim within bounds, removing what is not
            // there) writes nothing: an empty frame reads like zeroed bytes.
            return Ok(());
        }
        let frame = frame::encode(ops.clone())?;
        let pinned = state.prepare_keys(ops.into_iter().map(|(k, _)| k))?;
        self.guard(state.write_frame(&frame, &pinned))
    }

    /// Writes raw records as one frame (for the engine's own bookkeeping records).
    fn put_raw(&self, ops: &[(&[u8], Option<&[u8]>)]) -> Result<()> {
        let mut state = self.write();
        self.write_ops(&mut state, ops.iter().copied())
    }

    /// Makes everything written so far durable: every segment with unsynced bytes, then the
    /// directory if a file came or went.
    fn sync(&self) -> Result<()> {
        self.failed()?;
        let (pending, dir_dirty) = {
            let state = self.read();
            (state.pending(false), Arc::clone(&state.dir_dirty))
        };
        let result = sync_files(&*self.fs, &self.dir, pending, &dir_dirty);
        self.guard(result)
    }

    /// Writes every dirty leaf into the log, makes it durable, and replaces the checkpoint
    /// file; see the module docs.
    fn checkpoint(&self) -> Result<()> {
        let _one = self
            .checkpointing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.failed()?;
        let bytes = {
            let mut state = self.write();
            let bytes = self.guard(state.prepare_checkpoint(None))?;
            state.since_checkpoint = 0;
            bytes
        };
        self.sync()?;
        let result = checkpoint::write(&*self.fs, &self.dir, &bytes);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn check_schema(&self, path: &Path) -> Result<bool> {
        let schema_key = key::schema_version_key();
        let state = self.read();
        if let Some(value) = Raw::get(&*state, &schema_key)? {
            let found = record::decode_u32("schema version", &value)?;
            if found != key::CURRENT_SCHEMA {
                return Err(Error::SchemaMismatch {
                    path: path.to_owned(),
                    found,
                    expected: key::CURRENT_SCHEMA,
                });
            }
            return Ok(false);
        }
        if !state.index.is_empty() {
            return Err(Error::Corrupt(format!(
                "data dir {} holds records but no schema version; it was not written by dormouse",
                path.display()
            )));
        }
        drop(state);
        self.put_raw(&[(&schema_key, Some(&key::CURRENT_SCHEMA.to_be_bytes()))])?;
        self.sync()?;
        Ok(true)
    }

    /// Counts this open and consumes the clean-shutdown marker, durably, before anything
    /// else is written, so a crash in this run can never leave the marker behind.
    fn start_boot(&self, created: bool) -> Result<Boot> {
        let counter_key = key::boot_counter_key();
        let clean_key = key::clean_shutdown_key();
        let (previous, clean) = {
            let state = self.read();
            let previous = match Raw::get(&*state, &counter_key)? {
                Some(value) => record::decode_u64("boot counter", &value)?,
                None => 0,
            };
            (previous, Raw::get(&*state, &clean_key)?.is_some())
        };
        let id = previous + 1;
        self.put_raw(&[(&counter_key, Some(&id.to_be_bytes())), (&clean_key, None)])?;
        self.sync()?;
        Ok(Boot {
            id,
            unclean: !created && !clean,
        })
    }

    /// True when the files hold more than twice the live data (and more than the floor)
    /// and there is a sealed segment to clean. The active segment is never cleaned, so
    /// disk use is bounded by twice the live data plus one segment.
    fn needs_cleaning(&self, state: &State) -> bool {
        state.disk_bytes > self.clean_above_bytes
            && state.disk_bytes > state.live_bytes.saturating_mul(2)
            && state.segments.len() > 1
    }

    /// True when enough has changed since the last checkpoint to write the next.
    fn needs_checkpoint(&self, state: &State) -> bool {
        state.index.change_count() > self.changes || state.since_checkpoint > self.checkpoint_bytes
    }

    fn kick(&self) {
        let mut control = self.control();
        if !control.kicked {
            control.kicked = true;
            self.wake.notify_one();
        }
    }

    /// The cleaner thread: syncs on the interval policy's period, checkpoints when enough
    /// changed or the store went quiet, and cleans when asked to or when a tick finds too
    /// much garbage.
    fn run_cleaner(&self) {
        let tick = match self.durability {
            Durability::Interval(period) => period.min(Duration::from_secs(1)),
            Durability::Always | Durability::Never => Duration::from_secs(1),
        };
        let mut last_sync = Instant::now();
        loop {
            {
                let mut control = self.control();
                if !control.stop && !control.kicked {
                    control = self
                        .wake
                        .wait_timeout(control, tick)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if control.stop {
                    return;
                }
                control.kicked = false;
            }
            if let Durability::Interval(period) = self.durability
                && last_sync.elapsed() >= period
            {
                if let Err(e) = self.sync() {
                    tracing::warn!(error = %e, "background sync failed");
                }
                last_sync = Instant::now();
            }
            let quiet = self
                .last_write
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed()
                >= IDLE_CHECKPOINT;
            let due = {
                let state = self.read();
                self.needs_checkpoint(&state)
                    || (quiet && (state.index.dirty_count() > 0 || state.since_checkpoint > 0))
            };
            if due && let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "checkpoint failed; will retry");
            }
            if quiet {
                // Nothing is being written: leaves that were not read in the last tick
                // belong to objects that have gone back to sleep.
                self.read().cache.sweep();
            }
            loop {
                if self.control().stop {
                    return;
                }
                match self.clean_once() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cleaning a segment failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// One cleaning pass, if the store needs one: takes the oldest segments in turn,
    /// copying their current records to the head of the log and marking the index leaves
    /// they hold for rewriting, until the files are within 1.5x the live data (or a pass
    /// has taken [`PASS_BYTES`]); then one checkpoint, after which nothing durable names
    /// them, and they are deleted. Returns whether it cleaned anything.
    ///
    /// Cleaning down to 1.5x while starting only above 2x is what makes passes converge:
    /// each pass frees at least half the live data's size, more than the leaves its
    /// checkpoint rewrites.
    fn clean_once(&self) -> Result<bool> {
        self.failed()?;
        let _cleaning = self.cleaning.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.needs_cleaning(&self.read()) {
            return Ok(false);
        }
        let mut taken: Vec<u32> = Vec::new();
        let mut taken_bytes = 0u64;
        loop {
            let next = {
                let state = self.read();
                let remaining = state.disk_bytes - taken_bytes;
                let candidate = state
                    .segments
                    .iter()
                    .find(|(id, _)| !taken.contains(id) && **id != state.active());
                match candidate {
                    Some((id, segment))
                        if remaining > state.live_bytes.saturating_mul(3) / 2
                            && taken_bytes < PASS_BYTES =>
                    {
                        Some((*id, segment.len, Arc::clone(&segment.file)))
                    }
                    _ => None,
                }
            };
            let Some((id, len, file)) = next else {
                break;
            };
            self.move_out(id, len, file)?;
            taken.push(id);
            taken_bytes += len;
        }
        if taken.is_empty() {
            return Ok(false);
        }
        // The copies, and a checkpoint that no longer names these segments, must be
        // durable before they go.
        self.checkpoint()?;
        {
            let mut state = self.write();
            for &id in &taken {
                let live = state.segments.get(&id).map_or(0, |s| s.live);
                if live != 0 {
                    return Err(Error::Engine(format!(
                        "segment {id} still holds {live} live bytes after cleaning; keeping it"
                    )));
                }
            }
            for &id in &taken {
                if let Some(segment) = state.segments.remove(&id) {
                    state.disk_bytes -= segment.len;
                }
            }
            state.dir_dirty.store(true, Ordering::Release);
        }
        for &id in &taken {
            let path = segment_path(&self.dir, id);
            self.fs.remove(&path).map_err(|e| at(&path, e))?;
            tracing::debug!(segment = id, "cleaned segment");
        }
        self.guard(
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| Error::Failed(at(&self.dir, e).to_string())),
        )?;
        self.cleaned_segments
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Copies the current records of segment `id` to the head of the log and marks the
    /// index leaves written to it dirty, so the next checkpoint writes them elsewhere.
    fn move_out(&self, id: u32, len: u64, file: Arc<dyn crate::fs::FileIo>) -> Result<()> {
        let path = segment_path(&self.dir, id);
        let mut reader = frame::Reader::open(file, len).map_err(|e| state::in_file(&path, e))?;
        let mut batch = Moving::default();
        loop {
            match reader.next().map_err(|e| state::in_file(&path, e))? {
                Next::Frame { offset, payload } => {
                    if frame::is_leaf(&payload) {
                        continue;
                    }
                    let payload_at = offset + frame::FRAME_HEADER;
                    for op in frame::ops(&payload) {
                        let op = op?;
                        if let Some(value) = op.value {
                            batch.push(op.key, value, payload_at + op.value_at as u64);
                        }
                    }
                    if batch.bytes >= MOVE_CHUNK {
                        self.move_current(id, &mut batch)?;
                    }
                }
                Next::End => break,
                Next::Damaged { offset, reason } => {
                    return Err(Error::Corrupt(format!(
                        "segment {} is damaged at byte {offset} ({reason})",
                        path.display()
                    )));
                }
            }
        }
        self.move_current(id, &mut batch)?;
        let mut state = self.write();
        for li in state.index.clean_on(id) {
            state.index.make_dirty(li);
        }
        Ok(())
    }

    /// Copies the records of `batch` that are still current to the head of the log.
    fn move_current(&self, seg: u32, batch: &mut Moving) -> Result<()> {
        if batch.records.is_empty() {
            return Ok(());
        }
        let mut state = self.write();
        let mut current = Vec::new();
        for (k, v, offset) in &batch.records {
            if state.is_current(k, seg, *offset)? {
                current.push((k.as_slice(), Some(v.as_slice())));
            }
        }
        if !current.is_empty() {
            let moved: u64 = current
                .iter()
                .map(|(k, v)| frame::footprint(k.len(), v.map_or(0, <[u8]>::len)))
                .sum();
            self.write_ops(&mut state, current.iter().copied())?;
            self.moved_bytes.fetch_add(moved, Ordering::Relaxed);
        }
        drop(state);
        batch.records.clear();
        batch.bytes = 0;
        Ok(())
    }
}

/// The most segment bytes one cleaning pass takes before its checkpoint.
const PASS_BYTES: u64 = 1 << 30;

/// How many bytes of candidate records the cleaner collects before taking the write lock
/// to move them: bounds both its memory and how long writers wait for it.
const MOVE_CHUNK: u64 = 1 << 20;

/// Records of the segment being cleaned, with where each value sits in it.
#[derive(Debug, Default)]
struct Moving {
    records: Vec<(Vec<u8>, Vec<u8>, u64)>,
    bytes: u64,
}

impl Moving {
    fn push(&mut self, key: &[u8], value: &[u8], offset: u64) {
        self.bytes += frame::footprint(key.len(), value.len());
        self.records.push((key.to_vec(), value.to_vec(), offset));
    }
}

impl Storage for SegmentStorage {
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.check()?;
        let mut state = self.shared.write();
        let plan = plan::plan(&*state, id, batch.into_writes(), None)?;
        self.shared.write_ops(
            &mut state,
            plan.ops
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_ref().map(Bytes::as_ref))),
        )?;
        let clean = self.shared.needs_cleaning(&state);
        let checkpoint = self.shared.needs_checkpoint(&state);
        // Far past the dirty limit, the writer pays for the checkpoint itself: the
        // background thread is not keeping up, and memory must stay bounded.
        let overdue = state.index.change_count() > self.shared.changes.saturating_mul(2);
        drop(state);
        *self
            .shared
            .last_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        if overdue {
            self.shared.checkpoint()?;
        } else if clean || checkpoint {
            self.shared.kick();
        }
        Ok(())
    }

    fn boot(&self) -> Boot {
        self.boot
    }

    fn allocate_epoch(&self) -> Result<u64> {
        self.check()?;
        let mut state = self.shared.write();
        let (key, value, epoch) = plan::allocate_epoch(&*state)?;
        self.shared
            .write_ops(&mut state, [(key.as_slice(), Some(value.as_ref()))])?;
        Ok(epoch)
    }

    fn sync(&self) -> SyncFuture {
        match &self.group_commit {
            Some(group_commit) => group_commit.sync(),
            None => Box::pin(std::future::ready(self.shared.failed())),
        }
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    fn check(&self) -> Result<()> {
        self.shared.failed()?;
        self.group_commit
            .as_ref()
            .map_or(Ok(()), GroupCommit::check)
    }

    fn close(&self) -> Result<()> {
        self.shared
            .put_raw(&[(&key::clean_shutdown_key(), Some(&[1u8][..]))])?;
        // A restart after a clean shutdown replays nothing.
        self.shared.checkpoint()
    }

    raw::raw_reads!(reader);

    /// The segment files' bytes: what fills the disk (the lock file is empty).
    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.shared.read().disk_bytes)
    }
}

impl Drop for SegmentStorage {
    /// Stops the cleaner, then writes a checkpoint (so the next open replays little) and
    /// makes everything written durable, whatever the policy.
    fn drop(&mut self) {
        self.shared.control().stop = true;
        self.shared.wake.notify_all();
        if let Some(cleaner) = self.cleaner.take() {
            let _ = cleaner.join();
        }
        let needed = {
            let state = self.shared.read();
            state.index.dirty_count() > 0 || state.since_checkpoint > 0
        };
        let result = if needed {
            self.shared.checkpoint()
        } else {
            self.shared.sync()
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "final checkpoint failed");
        }
    }
}

impl fmt::Debug for SegmentStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentStorage")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
