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

    pub(crate) fn records(&self) -> MutexGuard<'_, Records> {
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
        raw::visit_each(range, reverse, |(k, v)| visit(k, v))
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

    raw::raw_reads!(records);

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
