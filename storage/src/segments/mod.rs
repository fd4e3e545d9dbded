//! The default engine: a log-structured store written for Dormouse's workload.
//!
//! Every applied batch becomes one checksummed frame appended to the newest *segment* file
//! (see [`frame`] for the bytes). An in-memory index maps each live key to where its value
//! sits; small values are kept in the index itself. Reads are index lookups plus a
//! positional read (`pread`) from the page cache.
//!
//! Space is reclaimed by a *cleaner* thread that always takes the **oldest** segment, copies
//! the records in it that are still current to the head of the log, makes the copies
//! durable, then deletes the file. Taking only the oldest segment is what makes this simple
//! and safe: a remove (tombstone) only has to hide records in *older* segments, and there are
//! none, so the cleaner drops removes without tracking them. The replay-buffer workload
//! (append at the head, trim the tail) suits it well: by the time a segment is the oldest,
//! nearly everything in it has been trimmed, so cleaning copies little. Cleaning starts when
//! the files hold more than twice the live data, which bounds disk use at about 2x live
//! data plus a segment.
//!
//! Durability: `always` shares one `fdatasync` of the written segments among concurrent
//! writers ([`GroupCommit`]); `interval` syncs from the cleaner thread every period;
//! `never` leaves it to the OS. Sealed segments are synced in the background under every
//! policy, so only the newest segment can ever have a torn tail, and a segment is deleted
//! only after the copies of its live records are on disk.
//!
//! Failures: a failed write (a full disk) is cut back out of the file and reported, and
//! leaves the store usable once space is freed. A failed fsync is not retried: after one,
//! the kernel may have dropped the dirty pages, so the store refuses writes until restarted
//! ([`Error::Failed`]).

mod frame;
mod index;
mod state;

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::instrument;

use crate::files::{at, lock_data_dir, sync_dir};
use crate::raw;
use crate::{
    Boot, Durability, Error, GroupCommit, LogEntry, LogMeta, ObjectId, Result, Storage, SyncFuture,
    WriteBatch, key, plan, record,
};
use frame::Next;
use state::{State, segment_path};

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
}

impl SegmentConfig {
    /// 64 MiB segments.
    pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
    /// The largest segment size accepted (offsets in the index are 32-bit).
    pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

    /// The defaults (64 MiB segments, cleaning above two segments, `always`) for a data dir.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
            segment_bytes: Self::DEFAULT_SEGMENT_BYTES,
            clean_above_bytes: 2 * Self::DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// Figures about the engine, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentStats {
    /// Bytes of current records (what a perfectly compact store would hold).
    pub live_bytes: u64,
    /// Bytes in segment files.
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Keys in the index.
    pub keys: usize,
    /// Memory the index holds: the engine's main use of memory (about 70–100 bytes per
    /// key).
    pub index_bytes: usize,
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
    _lock: File,
}

struct Shared {
    state: RwLock<State>,
    dir: PathBuf,
    durability: Durability,
    clean_above_bytes: u64,
    /// Set by the first failed fsync; every later write is refused with it.
    failure: Mutex<Option<String>>,
    control: Mutex<Control>,
    wake: Condvar,
    cleaned_segments: AtomicU64,
    moved_bytes: AtomicU64,
    /// One cleaning at a time: the thread and [`SegmentStorage::clean`] must not both take
    /// the same oldest segment.
    cleaning: Mutex<()>,
}

#[derive(Debug, Default)]
struct Control {
    stop: bool,
    kicked: bool,
}

impl SegmentStorage {
    /// Opens (or creates) a data dir: takes the process lock, replays the segments into the
    /// index, checks the schema version, and starts the cleaner (and, under `always`, the
    /// group commit thread).
    #[instrument(skip_all, fields(path = %config.path.display(), durability = %config.durability))]
    pub fn open(config: SegmentConfig) -> Result<Self> {
        if !(4096..=SegmentConfig::MAX_SEGMENT_BYTES).contains(&config.segment_bytes) {
            return Err(Error::Engine(format!(
                "segment size {} is outside 4 KiB..=1 GiB",
                config.segment_bytes
            )));
        }
        let path = config.path;
        fs::create_dir_all(&path).map_err(|e| at(&path, e))?;
        let lock = lock_data_dir(&path)?;
        if path.join("sled").exists() {
            return Err(Error::Engine(format!(
                "data dir {} was written by the sled engine; open it with that engine",
                path.display()
            )));
        }
        let dir = path.join("segments");
        fs::create_dir_all(&dir).map_err(|e| at(&dir, e))?;
        let started = Instant::now();
        let state = State::recover(&dir, config.segment_bytes)?;
        tracing::info!(
            keys = state.index.len(),
            segments = state.segments.len(),
            disk_bytes = state.disk_bytes,
            live_bytes = state.live_bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "segments replayed"
        );
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            dir,
            durability: config.durability,
            clean_above_bytes: config.clean_above_bytes,
            failure: Mutex::new(None),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
            cleaned_segments: AtomicU64::new(0),
            moved_bytes: AtomicU64::new(0),
            cleaning: Mutex::new(()),
        });
        let created = shared.check_schema(&path)?;
        let boot = shared.start_boot(created)?;
        if boot.unclean {
            tracing::warn!(
                boot = boot.id,
                "the previous run did not shut down cleanly; weakly durable writes may be lost"
            );
        }
        if created {
            sync_dir(&path)?;
        }
        let group_commit = match config.durability {
            Durability::Always => {
                let shared = Arc::clone(&shared);
                Some(GroupCommit::new(move || shared.sync(false))?)
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

    /// Sizes and cleaner progress.
    pub fn stats(&self) -> SegmentStats {
        let state = self.shared.read();
        SegmentStats {
            live_bytes: state.live_bytes,
            disk_bytes: state.disk_bytes,
            segments: state.segments.len(),
            keys: state.index.len(),
            index_bytes: state.index.heap_bytes(),
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

    /// Flushes run by group commit so far (0 unless `always`).
    pub fn fsyncs(&self) -> u64 {
        self.group_commit.as_ref().map_or(0, GroupCommit::flushes)
    }

    /// The state for one read (see `raw::raw_reads`).
    fn reader(&self) -> std::sync::RwLockReadGuard<'_, State> {
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
            tracing::error!(error = %e, "fsync failed; refusing writes until restart");
            *failure = Some(e.to_string());
        }
    }

    /// Writes raw records as one frame (for the engine's own bookkeeping records).
    fn put_raw(&self, ops: &[(&[u8], Option<&[u8]>)]) -> Result<()> {
        let frame = frame::encode(ops.iter().copied())?;
        self.write().write_frame(&frame)
    }

    /// Makes everything written so far durable: every segment with unsynced bytes (only
    /// the sealed ones when `sealed_only`), then the directory if a file came or went.
    fn sync(&self, sealed_only: bool) -> Result<()> {
        self.failed()?;
        let pending: Vec<_> = {
            let state = self.read();
            let active = state.active();
            state
                .segments
                .iter()
                .filter(|(id, _)| !sealed_only || **id != active)
                .filter(|(_, s)| s.synced.load(Ordering::Acquire) < s.len)
                .map(|(id, s)| (*id, Arc::clone(&s.file), s.len, Arc::clone(&s.synced)))
                .collect()
        };
        let dir_dirty = Arc::clone(&self.read().dir_dirty);
        let result = (|| {
            for (id, file, len, synced) in pending {
                file.sync_data()
                    .map_err(|e| at(&segment_path(&self.dir, id), e))?;
                synced.fetch_max(len, Ordering::AcqRel);
            }
            if dir_dirty.swap(false, Ordering::AcqRel)
                && let Err(e) = sync_dir(&self.dir)
            {
                dir_dirty.store(true, Ordering::Release);
                return Err(e);
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    fn check_schema(&self, path: &Path) -> Result<bool> {
        let schema_key = key::schema_version_key();
        let state = self.read();
        if let Some(slot) = state.index.get(schema_key.as_slice()) {
            let found = record::decode_u32("schema version", &state.value(slot)?)?;
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
        self.sync(false)?;
        Ok(true)
    }

    /// Counts this open and consumes the clean-shutdown marker, durably, before anything
    /// else is written, so a crash in this run can never leave the marker behind.
    fn start_boot(&self, created: bool) -> Result<Boot> {
        let counter_key = key::boot_counter_key();
        let clean_key = key::clean_shutdown_key();
        let (previous, clean) = {
            let state = self.read();
            let previous = match state.index.get(counter_key.as_slice()) {
                Some(slot) => record::decode_u64("boot counter", &state.value(slot)?)?,
                None => 0,
            };
            (previous, state.index.contains_key(clean_key.as_slice()))
        };
        let id = previous + 1;
        self.put_raw(&[(&counter_key, Some(&id.to_be_bytes())), (&clean_key, None)])?;
        self.sync(false)?;
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

    fn kick(&self) {
        let mut control = self.control();
        if !control.kicked {
            control.kicked = true;
            self.wake.notify_one();
        }
    }

    /// The cleaner thread: syncs on the interval policy's period, syncs sealed segments,
    /// and cleans when asked to or when a tick finds too much garbage.
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
            let full_sync = match self.durability {
                Durability::Interval(period) => last_sync.elapsed() >= period,
                Durability::Always | Durability::Never => false,
            };
            if let Err(e) = self.sync(!full_sync) {
                tracing::warn!(error = %e, "background sync failed");
            }
            if full_sync {
                last_sync = Instant::now();
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

    /// Cleans the oldest segment if the store needs it. Returns whether it did.
    fn clean_once(&self) -> Result<bool> {
        self.failed()?;
        let _cleaning = self.cleaning.lock().unwrap_or_else(PoisonError::into_inner);
        let (id, len) = {
            let state = self.read();
            if !self.needs_cleaning(&state) {
                return Ok(false);
            }
            let id = state.oldest();
            (id, state.segments[&id].len)
        };
        let path = segment_path(&self.dir, id);
        let file = File::open(&path).map_err(|e| at(&path, e))?;
        let mut reader = frame::Reader::open(file, len)?;
        let mut batch = Moving::default();
        loop {
            match reader.next()? {
                Next::Frame { offset, payload } => {
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
        // The copies must be on disk before the originals go.
        self.sync(false)?;
        {
            let mut state = self.write();
            let live = state.segments.get(&id).map_or(0, |s| s.live);
            if live != 0 {
                return Err(Error::Engine(format!(
                    "segment {id} still holds {live} live bytes after cleaning; keeping it"
                )));
            }
            if let Some(segment) = state.segments.remove(&id) {
                state.disk_bytes -= segment.len;
            }
            state.dir_dirty.store(true, Ordering::Release);
        }
        fs::remove_file(&path).map_err(|e| at(&path, e))?;
        sync_dir(&self.dir)?;
        self.cleaned_segments.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(segment = id, "cleaned segment");
        Ok(true)
    }

    /// Copies the records of `batch` that are still current to the head of the log.
    fn move_current(&self, seg: u32, batch: &mut Moving) -> Result<()> {
        if batch.records.is_empty() {
            return Ok(());
        }
        let mut state = self.write();
        let current: Vec<_> = batch
            .records
            .iter()
            .filter(|(k, _, offset)| state.is_current(k, seg, *offset))
            .map(|(k, v, _)| (k.as_slice(), Some(v.as_slice())))
            .collect();
        if !current.is_empty() {
            let moved: u64 = current
                .iter()
                .map(|(k, v)| frame::footprint(k.len(), v.map_or(0, <[u8]>::len)))
                .sum();
            state.write_frame(&frame::encode(current)?)?;
            self.moved_bytes.fetch_add(moved, Ordering::Relaxed);
        }
        drop(state);
        batch.records.clear();
        batch.bytes = 0;
        Ok(())
    }
}

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
        let frame = frame::encode(
            plan.ops
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_ref().map(Bytes::as_ref))),
        )?;
        state.write_frame(&frame)?;
        let clean = self.shared.needs_cleaning(&state);
        drop(state);
        if clean {
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
        state.write_frame(&frame::encode([(key.as_slice(), Some(value.as_ref()))])?)?;
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
        self.shared.sync(false)
    }

    raw::raw_reads!(reader);

    /// The segment files' bytes: what fills the disk (the lock file is empty).
    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.shared.read().disk_bytes)
    }
}

impl Drop for SegmentStorage {
    /// Stops the cleaner, then makes everything written durable whatever the policy.
    fn drop(&mut self) {
        self.shared.control().stop = true;
        self.shared.wake.notify_all();
        if let Some(cleaner) = self.cleaner.take() {
            let _ = cleaner.join();
        }
        if let Err(e) = self.shared.sync(false) {
            tracing::warn!(path = %self.path.display(), error = %e, "final sync failed");
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
