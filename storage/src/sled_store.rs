//! The production engine: every record in sled 0.34's default tree, encoded by [`crate::key`],
//! each [`WriteBatch`] applied as one `sled::Batch`.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::instrument;

use crate::error::{SledResultExt, from_sled};
use crate::files::{at, lock_data_dir, sync_dir};
use crate::raw::{self, Raw, Visit};
use crate::{
    Durability, Error, GroupCommit, LogEntry, LogMeta, ObjectId, Result, Storage, SyncFuture,
    WriteBatch, key, plan, record,
};

/// How to open a data dir. Fields are public so the gateway can fill them from its own
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledConfig {
    /// The data dir; created if missing. Holds `dormouse.lock` and sled's files in `sled/`.
    pub path: PathBuf,
    /// Upper bound of sled's page cache, so memory use is set by configuration rather than by
    /// the data size.
    pub cache_capacity_bytes: u64,
    /// When writes count as safe; decides what [`Storage::sync`] waits for.
    pub durability: Durability,
}

impl SledConfig {
    /// 64 MiB: enough for the hot tails of many channels, small next to a server's memory.
    pub const DEFAULT_CACHE_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

    /// The defaults (64 MiB cache, `always`) for a data dir.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_capacity_bytes: Self::DEFAULT_CACHE_CAPACITY_BYTES,
            durability: Durability::default(),
        }
    }
}

/// [`Storage`] on sled. One process per data dir (enforced by a lock file); any number of
/// objects written concurrently.
pub struct SledStorage {
    /// `Some` under [`Durability::Always`]: the thread that shares each fsync among writers.
    /// Declared first so it is dropped (final flush, thread joined) before the database.
    group_commit: Option<GroupCommit>,
    db: sled::Db,
    durability: Durability,
    path: PathBuf,
    /// This run's boot id and whether the previous run crashed.
    boot: crate::Boot,
    /// Serialises epoch allocation between batches that create logs; see [`plan::plan`].
    epoch_lock: Mutex<()>,
    /// Held (locked) for the life of the store and declared last, so it is released only
    /// after sled has closed its files.
    _lock: File,
}

/// How long to wait for sled's own file lock when ours is already held: it can only be held
/// by a sled instance of this process that is still shutting down its background threads.
const SLED_LOCK_PATIENCE: Duration = Duration::from_secs(5);

impl SledStorage {
    /// Opens (or creates) a data dir: takes the process lock, opens sled, checks the schema
    /// version and, under `always`, starts the group commit thread.
    #[instrument(skip_all, fields(path = %config.path.display(), durability = %config.durability))]
    pub fn open(config: SledConfig) -> Result<Self> {
        let path = config.path;
        fs::create_dir_all(&path).map_err(|e| at(&path, e))?;
        // Taken before sled opens anything, so a second process fails with a clear error and
        // never touches sled's files.
        let lock = lock_data_dir(&path)?;

        let sled_dir = path.join("sled");
        let sled_config = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(config.cache_capacity_bytes)
            // Only the default tree is used, and `Mode` is not read by sled 0.34.7 at all;
            // set explicitly so the choice is visible.
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(match config.durability {
                Durability::Interval(period) => {
                    Some(u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1))
                }
                // `always` flushes through group commit; `never` leaves it to the OS.
                Durability::Always | Durability::Never => None,
            });
        let db = open_sled(&sled_config, &path)?;
        let created = check_schema(&db, &path)?;
        let boot = start_boot(&db, created)?;
        if boot.unclean {
            tracing::warn!(
                boot = boot.id,
                "the previous run did not shut down cleanly; weakly durable writes may be lost"
            );
        }
        if created {
            // Make the new files' directory entries durable too, not only their contents.
            sync_dir(&sled_dir)?;
            sync_dir(&path)?;
        }

        let group_commit = match config.durability {
            Durability::Always => Some(start_group_commit(&db, &sled_dir)?),
            Durability::Interval(_) | Durability::Never => None,
        };
        tracing::info!(created, "storage opened");
        Ok(Self {
            group_commit,
            db,
            durability: config.durability,
            path,
            boot,
            epoch_lock: Mutex::new(()),
            _lock: lock,
        })
    }

    /// The data dir, for messages and metrics.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes everything applied so far to disk and fsyncs it, whatever the durability
    /// policy: what a graceful shutdown does so the weaker policies lose nothing either.
    /// Blocking; call it from a blocking context.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().engine()?;
        let db_file_path = self.path.join("sled").join("db");
        File::open(&db_file_path)
            .and_then(|file| file.sync_data())
            .map_err(|e| at(&db_file_path, e))
    }

    /// The tree every record lives in, for reads (see `raw::raw_reads`).
    fn tree(&self) -> &sled::Tree {
        &self.db
    }

    /// Flushes run by group commit so far (0 unless `always`); compared with the number of
    /// syncs it shows how many writers each fsync served.
    pub fn fsyncs(&self) -> u64 {
        self.group_commit.as_ref().map_or(0, GroupCommit::flushes)
    }
}

fn open_sled(config: &sled::Config, path: &Path) -> Result<sled::Db> {
    let deadline = Instant::now() + SLED_LOCK_PATIENCE;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(e) if is_sled_lock_error(&e) => {
                // We hold dormouse.lock, so no other dormouse process has this dir; the
                // holder is a sled instance of ours still closing, or a foreign process.
                if Instant::now() >= deadline {
                    return Err(Error::Locked {
                        path: path.to_owned(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(from_sled(e)),
        }
    }
}

fn is_sled_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Checks the schema record, writing it into a new data dir. Returns whether the data dir
/// was new.
fn check_schema(db: &sled::Db, path: &Path) -> Result<bool> {
    let schema_key = key::schema_version_key();
    if let Some(value) = db.get(&schema_key).engine()? {
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
    if !db.is_empty() {
        return Err(Error::Corrupt(format!(
            "data dir {} holds records but no schema version; it was not written by dormouse",
            path.display()
        )));
    }
    db.insert(schema_key, &key::CURRENT_SCHEMA.to_be_bytes()[..])
        .engine()?;
    db.flush().engine()?;
    Ok(true)
}

/// Counts this open and consumes the clean-shutdown marker. The removal is flushed before
/// anything else is written, so a crash in this run can never leave the marker behind.
fn start_boot(db: &sled::Db, created: bool) -> Result<crate::Boot> {
    let counter_key = key::boot_counter_key();
    let previous = db
        .get(&counter_key)
        .engine()?
        .map(|v| record::decode_u64("boot counter", &v))
        .transpose()?
        .unwrap_or(0);
    let clean = db.remove(key::clean_shutdown_key()).engine()?.is_some();
    let id = previous + 1;
    db.insert(counter_key, record::encode_u64(id).as_ref())
        .engine()?;
    db.flush().engine()?;
    Ok(crate::Boot {
        id,
        unclean: !created && !clean,
    })
}

/// Group commit flushes with sled's `flush` (which writes its buffers and waits for them
/// with `sync_file_range`, see docs/ARCHITECTURE.md "Storage") and then `fdatasync`s the
/// log file, so an acknowledged write also survives power loss, not only `kill -9`.
fn start_group_commit(db: &sled::Db, sled_dir: &Path) -> Result<GroupCommit> {
    let db = db.clone();
    let db_file_path = sled_dir.join("db");
    // fsync is per file (inode) on Linux, so a descriptor of our own covers sled's writes.
    let db_file = File::open(&db_file_path).map_err(|e| at(&db_file_path, e))?;
    GroupCommit::new(move || {
        db.flush().engine()?;
        db_file.sync_data()?;
        Ok(())
    })
}

fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

impl Raw for sled::Tree {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(sled::Tree::get(self, key)
            .engine()?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn scan_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        let range = self.range::<&[u8], _>((start, end));
        raw::visit_each(range, reverse, |item| {
            let (k, v) = item.engine()?;
            visit(&k, &v)
        })
    }
}

impl Storage for SledStorage {
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // Once a flush is stuck, sled's write path blocks too (its buffers never drain):
        // refuse before entering it, so no caller's thread is caught.
        self.check()?;
        let writes = batch.len();
        let plan = plan::plan(&*self.db, id, batch.into_writes(), Some(&self.epoch_lock))?;
        let mut sled_batch = sled::Batch::default();
        let ops = plan.ops.len();
        for (k, v) in &plan.ops {
            match v {
                Some(v) => sled_batch.insert(k.as_slice(), v.as_ref()),
                None => sled_batch.remove(k.as_slice()),
            }
        }
        self.db.apply_batch(sled_batch).engine()?;
        // The plan (and its epoch guard, if any) is released only now that the batch is in.
        drop(plan);
        tracing::trace!(object = %id, writes, ops, "applied batch");
        Ok(())
    }

    fn boot(&self) -> crate::Boot {
        self.boot
    }

    fn close(&self) -> Result<()> {
        self.db
            .insert(key::clean_shutdown_key(), &[1u8][..])
            .engine()?;
        self.flush()
    }

    fn allocate_epoch(&self) -> Result<u64> {
        let _guard = self
            .epoch_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (key, value, epoch) = plan::allocate_epoch(&*self.db)?;
        self.db.insert(key, value.as_ref()).engine()?;
        Ok(epoch)
    }

    fn sync(&self) -> SyncFuture {
        match &self.group_commit {
            Some(group_commit) => group_commit.sync(),
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    fn check(&self) -> Result<()> {
        self.group_commit
            .as_ref()
            .map_or(Ok(()), GroupCommit::check)
    }

    raw::raw_reads!(tree);

    /// Walks the data dir: the bytes of real files, which is what fills a disk.
    fn size_on_disk(&self) -> Result<u64> {
        dir_size(&self.path).map_err(|e| at(&self.path, e))
    }
}

impl Drop for SledStorage {
    /// Best-effort final flush; the group commit thread (if any) flushes for its waiters and
    /// stops next, then sled closes, then the lock is released.
    fn drop(&mut self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(path = %self.path.display(), error = %e, "final flush failed");
        }
    }
}

impl fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStorage")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("fsyncs", &self.fsyncs())
            .finish_non_exhaustive()
    }
}
