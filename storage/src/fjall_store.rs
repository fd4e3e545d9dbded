//! [`Storage`] on fjall 3 (an LSM tree), behind the `fjall` feature: the well-kept crate the
//! segment engine is measured against (docs/BENCHMARKS.md "Choosing the engine"). Every
//! record lives in one keyspace, encoded by [`crate::key`]; each [`WriteBatch`] is one fjall
//! batch, so it is atomic through fjall's journal.

use std::fmt;
use std::fs;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::files::{at, lock_data_dir};
use crate::raw::{self, Raw, Visit};
use crate::{
    Boot, Durability, Error, GroupCommit, LogEntry, LogMeta, ObjectId, Result, Storage, SyncFuture,
    WriteBatch, key, plan, record,
};

/// How to open a data dir on fjall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FjallConfig {
    /// The data dir; fjall's files go to `fjall/` inside it.
    pub path: PathBuf,
    /// When writes count as safe.
    pub durability: Durability,
    /// fjall's block cache.
    pub cache_bytes: u64,
    /// Size at which the memtable is flushed to a table.
    pub memtable_bytes: u64,
    /// Journal bytes kept before memtables are forced out: bounds start-up replay.
    pub journal_bytes: u64,
}

impl FjallConfig {
    /// Defaults chosen to bound memory and start-up: 16 MiB cache, 8 MiB memtable, 64 MiB
    /// of journal.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
            cache_bytes: 16 << 20,
            memtable_bytes: 8 << 20,
            journal_bytes: 64 << 20,
        }
    }
}

/// [`Storage`] on fjall; see the module docs.
pub struct FjallStorage {
    group_commit: Option<GroupCommit>,
    db: Database,
    records: Keyspace,
    durability: Durability,
    path: PathBuf,
    boot: Boot,
    epoch_lock: Mutex<()>,
    _lock: fs::File,
}

fn engine(e: fjall::Error) -> Error {
    match e {
        fjall::Error::Io(io) => Error::Io(io),
        other => Error::Engine(other.to_string()),
    }
}

impl FjallStorage {
    /// Opens (or creates) a data dir on fjall.
    pub fn open(config: FjallConfig) -> Result<Self> {
        let path = config.path;
        fs::create_dir_all(&path).map_err(|e| at(&path, e))?;
        let lock = lock_data_dir(&path)?;
        let db = Database::builder(path.join("fjall"))
            .cache_size(config.cache_bytes)
            .max_journaling_size(config.journal_bytes)
            .manual_journal_persist(true)
            .open()
            .map_err(engine)?;
        let memtable_bytes = config.memtable_bytes;
        let records = db
            .keyspace("records", move || {
                // Nothing pinned outside the block cache, so memory is the cache and the
                // memtables, not a share of every table written.
                KeyspaceCreateOptions::default()
                    .index_block_pinning_policy(fjall::config::PinningPolicy::all(false))
                    .filter_block_pinning_policy(fjall::config::PinningPolicy::all(false))
                    .max_memtable_size(memtable_bytes)
                    .manual_journal_persist(true)
            })
            .map_err(engine)?;
        let mut store = Self {
            group_commit: None,
            db,
            records,
            durability: config.durability,
            path,
            boot: Boot::default(),
            epoch_lock: Mutex::new(()),
            _lock: lock,
        };
        let created = store.check_schema()?;
        store.boot = store.start_boot(created)?;
        if let Durability::Always = config.durability {
            let db = store.db.clone();
            store.group_commit = Some(GroupCommit::new(move || {
                db.persist(PersistMode::SyncData).map_err(engine)
            })?);
        }
        Ok(store)
    }

    /// The data dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes run by group commit so far.
    pub fn fsyncs(&self) -> u64 {
        self.group_commit.as_ref().map_or(0, GroupCommit::flushes)
    }

    /// Waits until fjall has no flush or compaction running or queued, so a memory or disk
    /// figure taken next is settled (bounded by `limit`).
    pub fn wait_idle(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while (self.db.outstanding_flushes() > 0 || self.db.active_compactions() > 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Bytes in memtables (active and sealed), fjall's write buffer.
    pub fn write_buffer_bytes(&self) -> u64 {
        self.db.write_buffer_size()
    }

    fn check_schema(&self) -> Result<bool> {
        let schema_key = key::schema_version_key();
        if let Some(value) = Raw::get(self, &schema_key)? {
            let found = record::decode_u32("schema version", &value)?;
            if found != key::CURRENT_SCHEMA {
                return Err(Error::SchemaMismatch {
                    path: self.path.clone(),
                    found,
                    expected: key::CURRENT_SCHEMA,
                });
            }
            return Ok(false);
        }
        self.records
            .insert(schema_key, key::CURRENT_SCHEMA.to_be_bytes().to_vec())
            .map_err(engine)?;
        self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        Ok(true)
    }

    fn start_boot(&self, created: bool) -> Result<Boot> {
        let counter_key = key::boot_counter_key();
        let previous = Raw::get(self, &counter_key)?
            .map(|v| record::decode_u64("boot counter", &v))
            .transpose()?
            .unwrap_or(0);
        let clean = Raw::get(self, &key::clean_shutdown_key())?.is_some();
        let id = previous + 1;
        let mut batch = self.db.batch();
        batch.insert(&self.records, counter_key, id.to_be_bytes().to_vec());
        batch.remove(&self.records, key::clean_shutdown_key());
        batch.commit().map_err(engine)?;
        self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        Ok(Boot {
            id,
            unclean: !created && !clean,
        })
    }

    fn raw(&self) -> &Self {
        self
    }
}

impl Raw for FjallStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .records
            .get(key)
            .map_err(engine)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn scan_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        let iter = self.records.range::<&[u8], _>((start, end));
        raw::visit_each(iter, reverse, |guard| {
            let (k, v) = guard.into_inner().map_err(engine)?;
            visit(&k, &v)
        })
    }
}

impl Storage for FjallStorage {
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.check()?;
        let plan = plan::plan(self, id, batch.into_writes(), Some(&self.epoch_lock))?;
        let mut fj = self.db.batch();
        for (k, v) in plan.ops {
            match v {
                Some(v) => fj.insert(&self.records, k, v.to_vec()),
                None => fj.remove(&self.records, k),
            }
        }
        fj.commit().map_err(engine)
    }

    fn boot(&self) -> Boot {
        self.boot
    }

    fn allocate_epoch(&self) -> Result<u64> {
        let _guard = self
            .epoch_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (key, value, epoch) = plan::allocate_epoch(self)?;
        self.records.insert(key, value.to_vec()).map_err(engine)?;
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

    fn close(&self) -> Result<()> {
        self.records
            .insert(key::clean_shutdown_key(), vec![1u8])
            .map_err(engine)?;
        self.db.persist(PersistMode::SyncAll).map_err(engine)
    }

    raw::raw_reads!(raw);

    fn size_on_disk(&self) -> Result<u64> {
        self.db.disk_space().map_err(engine)
    }
}

impl fmt::Debug for FjallStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStorage")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}
