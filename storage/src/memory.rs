//! An in-process engine with the same semantics as sled (same key encoding, same planner),
//! for tests of the layers above that should not touch a disk.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::raw::{self, Raw, Visit};
use crate::{
    Durability, Error, LogEntry, LogMeta, ObjectId, Result, Storage, SyncFuture, WriteBatch, key,
    plan, record,
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

    /// Every record of object `id`, as stored (the layout of [`crate::key`] and
    /// [`crate::key::CURRENT_SCHEMA`]), in key order: an image of the object that
    /// [`MemoryStorage::restore_object`] puts back exactly, log bounds included. How a
    /// replicated store snapshots an object it holds in memory, so a new owner can continue
    /// from the same state without replaying every write since the object began.
    pub fn export_object(&self, id: &ObjectId) -> Result<Vec<(Vec<u8>, Bytes)>> {
        let records = self.records();
        let mut image = Vec::new();
        for tag in OBJECT_TAGS {
            let prefix = key::object_prefix(tag, id)?;
            let range =
                records.range::<[u8], _>((Bound::Included(prefix.as_slice()), Bound::Unbounded));
            for (k, v) in range.take_while(|(k, _)| k.starts_with(&prefix)) {
                image.push((k.clone(), v.clone()));
            }
        }
        Ok(image)
    }

    /// Replaces everything stored for object `id` with `image` (from
    /// [`MemoryStorage::export_object`]). Every key must belong to `id`; nothing is changed
    /// when one does not, or when a value does not decode.
    pub fn restore_object(&self, id: &ObjectId, image: Vec<(Vec<u8>, Bytes)>) -> Result<()> {
        let prefixes = OBJECT_TAGS
            .iter()
            .map(|tag| key::object_prefix(*tag, id))
            .collect::<Result<Vec<_>>>()?;
        let mut alarm = None;
        for (k, v) in &image {
            if !prefixes.iter().any(|p| k.starts_with(p)) {
                return Err(Error::Corrupt(format!(
                    "an image of {id} holds a record of another object"
                )));
            }
            if k.first() == Some(&key::LOG_META) {
                record::decode_meta(v)?;
            } else if k.first() == Some(&key::ALARM) {
                alarm = Some(record::decode_u64("alarm", v)?);
            }
        }
        let mut records = self.records();
        remove_object(&mut records, id)?;
        if let Some(due) = alarm {
            records.insert(key::alarm_index_key(due, id)?, Bytes::new());
        }
        records.extend(image);
        Ok(())
    }

    /// Drops every record of object `id` (its log, key/value records and alarm) from memory;
    /// for a cache of objects that a replicated store holds elsewhere.
    pub fn forget_object(&self, id: &ObjectId) -> Result<()> {
        remove_object(&mut self.records(), id)
    }
}

/// The tags of records found by their object (the alarm index is found by due time).
const OBJECT_TAGS: [u8; 4] = [key::LOG_META, key::LOG_ENTRY, key::KV, key::ALARM];

fn remove_object(records: &mut Records, id: &ObjectId) -> Result<()> {
    if let Some(due) = records.get(&key::alarm_key(id)?) {
        let due = record::decode_u64("alarm", due)?;
        records.remove(&key::alarm_index_key(due, id)?);
    }
    for tag in OBJECT_TAGS {
        let prefix = key::object_prefix(tag, id)?;
        let doomed: Vec<Vec<u8>> = records
            .range::<[u8], _>((Bound::Included(prefix.as_slice()), Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in doomed {
            records.remove(&k);
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Write;

    type Contents = (
        Option<LogMeta>,
        Vec<LogEntry>,
        Vec<(Vec<u8>, Bytes)>,
        Option<u64>,
        Vec<(ObjectId, u64)>,
    );

    fn contents(s: &MemoryStorage, id: &ObjectId) -> Contents {
        (
            s.log_meta(id).unwrap(),
            s.read_log(id, 0, usize::MAX).unwrap(),
            s.list(id, b"", None, usize::MAX).unwrap(),
            s.alarm(id).unwrap(),
            // The alarm as the due-time index has it.
            s.due_alarms(u64::MAX, 10)
                .unwrap()
                .into_iter()
                .filter(|(due, _)| due == id)
                .collect(),
        )
    }

    #[test]
    fn an_image_puts_an_object_back_exactly_and_touches_no_other() {
        let (a, b) = (ObjectId::new("ns", "a"), ObjectId::new("ns", "ab"));
        let store = MemoryStorage::new();
        for id in [&a, &b] {
            let mut batch = WriteBatch::new();
            batch
                .append(1, 10, Bytes::from_static(b"one"))
                .append(5, 11, Bytes::from_static(b"five"))
                .put(b"k".to_vec(), Bytes::from_static(b"v"))
                .push(Write::SetAlarm { at_ms: 42 });
            store.apply(id, batch).unwrap();
        }
        let mut trim = WriteBatch::new();
        trim.trim(
            crate::Retention {
                max_events: Some(1),
                ..Default::default()
            },
            12,
        );
        store.apply(&a, trim).unwrap();
        let before = contents(&store, &a);
        let image = store.export_object(&a).unwrap();
        let others = contents(&store, &b);

        store.forget_object(&a).unwrap();
        assert_eq!(store.log_meta(&a).unwrap(), None);
        assert_eq!(
            store.due_alarms(u64::MAX, 10).unwrap(),
            vec![(b.clone(), 42)]
        );

        let elsewhere = MemoryStorage::new();
        elsewhere.restore_object(&a, image.clone()).unwrap();
        assert_eq!(
            contents(&elsewhere, &a),
            before,
            "bounds, entries, keys, alarm"
        );
        store.restore_object(&a, image.clone()).unwrap();
        assert_eq!(contents(&store, &a), before);
        assert_eq!(contents(&store, &b), others, "another object was touched");

        // An image of one object is refused for another, and nothing changes.
        assert!(matches!(
            store.restore_object(&b, image),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(contents(&store, &b), others);
    }
}
