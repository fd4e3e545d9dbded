//! An in-process engine with the same semantics as sled (same key encoding, same planner),
//! for tests of the layers above that should not touch a disk.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::raw::{self, Raw, Visit};
use crate::{
    Durability, LogEntry, LogMeta, ObjectId, Result, Storage, SyncFuture, WriteBatch, plan,
};

type Records = BTreeMap<Vec<u8>, Bytes>;

/// [`Storage`] in a `BTreeMap`: nothing survives the process, `sync` resolves at once.
#[derive(Default)]
pub struct MemoryStorage {
    /// One lock around everything: a batch is planned and applied under it, which makes it
    /// atomic and serialises epoch allocation without a second lock.
    records: Mutex<Records>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        // Applying a plan cannot panic half-way, so a poisoned map is still consistent.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Raw for Records {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(BTreeMap::get(self, key).cloned())
    }

    fn scan_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        let range = self.range::<[u8], _>((start, end));
        if reverse {
            for (k, v) in range.rev() {
                if !visit(k, v)? {
                    break;
                }
            }
        } else {
            for (k, v) in range {
                if !visit(k, v)? {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Storage for MemoryStorage {
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut records = self.records();
        let plan = plan::plan(&*records, id, batch.into_writes(), None)?;
        for (k, v) in plan.ops {
            match v {
                Some(v) => records.insert(k, v),
                None => records.remove(&k),
            };
        }
        Ok(())
    }

    fn allocate_epoch(&self) -> Result<u64> {
        let mut records = self.records();
        let (key, value, epoch) = plan::allocate_epoch(&*records)?;
        records.insert(key, value);
        Ok(epoch)
    }

    fn sync(&self) -> SyncFuture {
        Box::pin(std::future::ready(Ok(())))
    }

    /// `Never`: nothing is ever written to disk, so nothing could be lost "less".
    fn durability(&self) -> Durability {
        Durability::Never
    }

    fn log_meta(&self, id: &ObjectId) -> Result<Option<LogMeta>> {
        raw::log_meta(&*self.records(), id)
    }

    fn read_log(&self, id: &ObjectId, from_seq: u64, limit: usize) -> Result<Vec<LogEntry>> {
        raw::read_log(&*self.records(), id, from_seq, limit)
    }

    fn read_log_tail(&self, id: &ObjectId, limit: usize) -> Result<Vec<LogEntry>> {
        raw::read_log_tail(&*self.records(), id, limit)
    }

    fn read_log_before(
        &self,
        id: &ObjectId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>> {
        raw::read_log_before(&*self.records(), id, before_seq, limit)
    }

    fn get(&self, id: &ObjectId, key: &[u8]) -> Result<Option<Bytes>> {
        raw::get(&*self.records(), id, key)
    }

    fn list(
        &self,
        id: &ObjectId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>> {
        raw::list(&*self.records(), id, prefix, start_after, limit)
    }

    fn alarm(&self, id: &ObjectId) -> Result<Option<u64>> {
        raw::alarm(&*self.records(), id)
    }

    fn due_alarms(&self, now_ms: u64, limit: usize) -> Result<Vec<(ObjectId, u64)>> {
        raw::due_alarms(&*self.records(), now_ms, limit)
    }

    fn next_alarm(&self) -> Result<Option<(ObjectId, u64)>> {
        raw::next_alarm(&*self.records())
    }

    fn list_logs(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        raw::list_logs(&*self.records(), namespace, start_after, limit)
    }

    /// Always 0: nothing is on disk.
    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }
}

impl fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStorage")
            .field("records", &self.records().len())
            .finish()
    }
}
