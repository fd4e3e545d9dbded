//! Turns a [`WriteBatch`] into the raw key puts and removes that implement it, computing the
//! new log meta on the way. Shared by every engine, so they agree on semantics; an engine
//! only has to apply the result atomically.
//!
//! Writes are applied to an in-memory overlay in order, and every read during planning looks
//! at the overlay first, so later writes of a batch see earlier ones (append then trim,
//! delete log then append, put then delete-all). Validation errors return before anything
//! reaches the engine, so a rejected batch applies nothing.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::raw::{self, Raw};
use crate::{Error, LogMeta, ObjectId, Result, Retention, Write, key, record};

/// Raw changes for the engine: `Some` puts, `None` removes. One entry per key (the last
/// write wins), in key order.
pub(crate) type Ops = BTreeMap<Vec<u8>, Option<Bytes>>;

/// Called for each record of a planning scan: its key, its value when asked for (or still
/// in the overlay), and the value's size; returns `false` to stop early.
type PlanVisit<'v> = &'v mut dyn FnMut(&[u8], Option<&[u8]>, u64) -> Result<bool>;

/// A batch ready to apply.
#[derive(Debug)]
pub(crate) struct Plan<'l> {
    pub(crate) ops: Ops,
    /// Held from reading the epoch counter until the engine has applied the plan, so two
    /// concurrent log creations (on different objects) cannot hand out the same epoch or
    /// write the counter backwards. `None` when the batch creates no log.
    _epoch_guard: Option<MutexGuard<'l, ()>>,
}

/// Plans `writes` for object `id` against the engine's current state.
///
/// `epoch_lock` serialises epoch allocation for engines that plan without holding a global
/// lock (sled); an engine whose whole apply runs under one lock (memory) passes `None`.
pub(crate) fn plan<'l>(
    raw: &dyn Raw,
    id: &ObjectId,
    writes: Vec<Write>,
    epoch_lock: Option<&'l Mutex<()>>,
) -> Result<Plan<'l>> {
    let mut planner = Planner {
        raw,
        id,
        overlay: Ops::new(),
        meta: None,
        meta_dirty: false,
        epoch_lock,
        epoch_guard: None,
        entry_prefix: key::object_prefix(key::LOG_ENTRY, id)?,
    };
    for write in writes {
        planner.write(write)?;
    }
    planner.finish()
}

struct Planner<'a, 'l> {
    raw: &'a dyn Raw,
    id: &'a ObjectId,
    overlay: Ops,
    /// The log meta as of the writes planned so far; `None` until a log write loads it, then
    /// `Some(None)` while the object has no log.
    meta: Option<Option<LogMeta>>,
    meta_dirty: bool,
    epoch_lock: Option<&'l Mutex<()>>,
    epoch_guard: Option<MutexGuard<'l, ()>>,
    entry_prefix: Vec<u8>,
}

impl<'l> Planner<'_, 'l> {
    fn write(&mut self, write: Write) -> Result<()> {
        match write {
            Write::Append {
                seq,
                timestamp_ms,
                data,
            } => self.append(seq, timestamp_ms, &data),
            Write::Trim { retention, now_ms } => self.trim(retention, now_ms),
            Write::DeleteLog => self.delete_log(),
            Write::CreateLog { epoch } => {
                self.delete_log()?;
                self.lock_epochs();
                let counter = self.epoch_counter()?;
                if epoch > counter {
                    self.overlay
                        .insert(key::epoch_counter_key(), Some(record::encode_u64(epoch)));
                }
                self.set_meta(Some(LogMeta {
                    epoch,
                    first_seq: 1,
                    last_seq: 0,
                    count: 0,
                    bytes: 0,
                    oldest_ms: 0,
                }));
                Ok(())
            }
            Write::Put { key, value } => {
                self.overlay
                    .insert(key::kv_key(self.id, &key)?, Some(value));
                Ok(())
            }
            Write::Delete { key } => {
                self.overlay.insert(key::kv_key(self.id, &key)?, None);
                Ok(())
            }
            Write::DeleteAllKv => {
                let prefix = key::object_prefix(key::KV, self.id)?;
                self.remove_prefix(&prefix)
            }
            Write::SetAlarm { at_ms } => self.set_alarm(Some(at_ms)),
            Write::DeleteAlarm => self.set_alarm(None),
        }
    }

    fn finish(self) -> Result<Plan<'l>> {
        let mut ops = self.overlay;
        if self.meta_dirty {
            let meta = self.meta.flatten().map(|meta| record::encode_meta(&meta));
            ops.insert(key::log_meta_key(self.id)?, meta);
        }
        Ok(Plan {
            ops,
            _epoch_guard: self.epoch_guard,
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        match self.overlay.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.raw.get(key),
        }
    }

    /// Scans `(start, end)` forwards as the state would be after the writes planned so far:
    /// overlay puts are visited, overlay removes hide engine records. `visit` gets each key,
    /// its value when `values` is set (records still in the overlay always come with
    /// theirs), and the value's size: without values the engine may read nothing at all.
    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        values: bool,
        visit: PlanVisit<'_>,
    ) -> Result<()> {
        if raw::range_is_empty(start, end) {
            return Ok(());
        }
        let pending: Vec<_> = self.overlay.range::<[u8], _>((start, end)).collect();
        let mut next = 0;
        let mut stopped = false;
        let mut step = |k: &[u8], v: Option<&[u8]>, len: u64| -> Result<bool> {
            while let Some((pending_key, pending_value)) = pending.get(next) {
                let pending_key = pending_key.as_slice();
                if pending_key > k {
                    break;
                }
                next += 1;
                if let Some(value) = pending_value
                    && !visit(pending_key, Some(value), value.len() as u64)?
                {
                    stopped = true;
                    return Ok(false);
                }
                if pending_key == k {
                    // The overlay shadows the engine's record of the same key.
                    return Ok(true);
                }
            }
            if !visit(k, v, len)? {
                stopped = true;
                return Ok(false);
            }
            Ok(true)
        };
        if values {
            self.raw.scan_nonempty(start, end, false, &mut |k, v| {
                step(k, Some(v), v.len() as u64)
            })?;
        } else {
            self.raw
                .scan_sizes_nonempty(start, end, &mut |k, len| step(k, None, len))?;
        }
        if !stopped {
            for (pending_key, pending_value) in &pending[next..] {
                if let Some(value) = pending_value
                    && !visit(pending_key, Some(value), value.len() as u64)?
                {
                    break;
                }
            }
        }
        Ok(())
    }

    fn remove_prefix(&mut self, prefix: &[u8]) -> Result<()> {
        let end = raw::end_of(prefix);
        let mut doomed = Vec::new();
        self.scan(
            Bound::Included(prefix),
            raw::as_ref(&end),
            false,
            &mut |k, _, _| {
                doomed.push(k.to_vec());
                Ok(true)
            },
        )?;
        for k in doomed {
            self.overlay.insert(k, None);
        }
        Ok(())
    }

    fn meta(&mut self) -> Result<Option<LogMeta>> {
        if let Some(meta) = self.meta {
            return Ok(meta);
        }
        let meta = raw::log_meta(self.raw, self.id)?;
        self.meta = Some(meta);
        Ok(meta)
    }

    fn set_meta(&mut self, meta: Option<LogMeta>) {
        self.meta = Some(meta);
        self.meta_dirty = true;
    }

    fn append(&mut self, seq: u64, timestamp_ms: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let meta = match self.meta()? {
            Some(mut meta) => {
                if seq <= meta.last_seq {
                    return Err(self.seq_not_increasing(seq, meta.last_seq));
                }
                if meta.count == 0 {
                    meta.first_seq = seq;
                    meta.oldest_ms = timestamp_ms;
                } else {
                    // Unknown (0) stays unknown until a trim reads the oldest entry.
                    meta.oldest_ms = meta.oldest_ms.min(timestamp_ms);
                }
                meta.last_seq = seq;
                meta.count = meta.count.saturating_add(1);
                meta.bytes = meta.bytes.saturating_add(len);
                meta
            }
            None => {
                // A new log: `last_seq` is 0 before the first append, so seq 0 is rejected
                // like any other non-increasing seq.
                if seq == 0 {
                    return Err(self.seq_not_increasing(seq, 0));
                }
                LogMeta {
                    epoch: self.new_epoch()?,
                    first_seq: seq,
                    last_seq: seq,
                    count: 1,
                    bytes: len,
                    oldest_ms: timestamp_ms,
                }
            }
        };
        self.overlay.insert(
            key::log_entry_key(self.id, seq)?,
            Some(record::encode_entry(timestamp_ms, data)),
        );
        self.set_meta(Some(meta));
        Ok(())
    }

    fn seq_not_increasing(&self, seq: u64, last: u64) -> Error {
        Error::SeqNotIncreasing {
            id: self.id.clone(),
            seq,
            last,
        }
    }

    /// `max(counter + 1, now in µs)`: strictly increasing per data dir, and unlikely to
    /// collide with an epoch of a data dir that was wiped and recreated.
    fn new_epoch(&mut self) -> Result<u64> {
        self.lock_epochs();
        let epoch = successor_epoch(self.epoch_counter()?);
        self.overlay
            .insert(key::epoch_counter_key(), Some(record::encode_u64(epoch)));
        Ok(epoch)
    }

    fn lock_epochs(&mut self) {
        if self.epoch_guard.is_none()
            && let Some(lock) = self.epoch_lock
        {
            self.epoch_guard = Some(lock.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    fn epoch_counter(&self) -> Result<u64> {
        Ok(self
            .get(&key::epoch_counter_key())?
            .map(|value| record::decode_u64("epoch counter", &value))
            .transpose()?
            .unwrap_or(0))
    }

    /// Drops entries from the front of the log while a bound is exceeded. Counting and
    /// byte bounds need only keys and sizes; an entry's time is read only while the log's
    /// `oldest_ms` says something may be old enough to go, so a busy channel's trim after
    /// each append reads no entry at all.
    fn trim(&mut self, retention: Retention, now_ms: u64) -> Result<()> {
        let Some(mut meta) = self.meta()? else {
            return Ok(());
        };
        let over_count = |m: &LogMeta| retention.max_events.is_some_and(|max| m.count > max);
        // The newest entry is never dropped for size alone: it is the one left when count is 1.
        let over_bytes =
            |m: &LogMeta| retention.max_bytes.is_some_and(|max| m.bytes > max) && m.count > 1;
        let cutoff = retention
            .max_age
            .map(|age| now_ms.saturating_sub(millis(age)));
        // Nothing stored is older than `oldest_ms`: while the cutoff has not passed it, no
        // entry needs its time read.
        let age_matters = cutoff.is_some_and(|cutoff| meta.oldest_ms < cutoff);
        if meta.count == 0 || (!age_matters && !over_count(&meta) && !over_bytes(&meta)) {
            return Ok(());
        }

        let start = key::log_entry_key(self.id, meta.first_seq)?;
        let end = raw::end_of(&self.entry_prefix);
        let mut doomed = Vec::new();
        let mut first_kept = None;
        let prefix = self.entry_prefix.clone();
        let range = (Bound::Included(start.as_slice()), raw::as_ref(&end));
        self.scan(range.0, range.1, age_matters, &mut |k, v, size| {
            let seq = key::entry_seq(&prefix, k)?;
            let len = record::entry_payload_len(size)?;
            let timestamp_ms = v.map(record::entry_header).transpose()?.map(|(t, _)| t);
            let too_old = matches!((cutoff, timestamp_ms), (Some(c), Some(t)) if t < c);
            if over_count(&meta) || over_bytes(&meta) || too_old {
                doomed.push(k.to_vec());
                meta.count = meta.count.saturating_sub(1);
                meta.bytes = meta.bytes.saturating_sub(len);
                Ok(true)
            } else {
                first_kept = Some((seq, timestamp_ms));
                Ok(false)
            }
        })?;
        if let Some((_, Some(timestamp_ms))) = first_kept
            && timestamp_ms != meta.oldest_ms
        {
            // The oldest entry's time was read: the bound is exact again, so the next
            // trims skip reading until the cutoff passes it.
            meta.oldest_ms = timestamp_ms;
            if doomed.is_empty() {
                self.set_meta(Some(meta));
            }
        }
        if doomed.is_empty() {
            return Ok(());
        }
        for k in doomed {
            self.overlay.insert(k, None);
        }
        match first_kept {
            Some((seq, _)) => meta.first_seq = seq,
            None => {
                if meta.count != 0 || meta.bytes != 0 {
                    tracing::warn!(
                        object = %self.id,
                        count = meta.count,
                        bytes = meta.bytes,
                        "log meta counted entries that are not stored; resetting to empty"
                    );
                }
                meta.first_seq = meta.last_seq.saturating_add(1);
                meta.count = 0;
                meta.bytes = 0;
                meta.oldest_ms = 0;
            }
        }
        self.set_meta(Some(meta));
        Ok(())
    }

    fn delete_log(&mut self) -> Result<()> {
        let prefix = self.entry_prefix.clone();
        self.remove_prefix(&prefix)?;
        if self.meta()?.is_some() {
            self.set_meta(None);
        }
        Ok(())
    }

    fn set_alarm(&mut self, at_ms: Option<u64>) -> Result<()> {
        let alarm_key = key::alarm_key(self.id)?;
        let old = self
            .get(&alarm_key)?
            .map(|value| record::decode_u64("alarm", &value))
            .transpose()?;
        if let Some(old) = old {
            self.overlay
                .insert(key::alarm_index_key(old, self.id)?, None);
        }
        match at_ms {
            Some(at_ms) => {
                self.overlay
                    .insert(key::alarm_index_key(at_ms, self.id)?, Some(Bytes::new()));
                self.overlay
                    .insert(alarm_key, Some(record::encode_u64(at_ms)));
            }
            None => {
                self.overlay.insert(alarm_key, None);
            }
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The epoch after `counter`: `max(counter + 1, now in µs)`, so strictly increasing per data
/// dir and unlikely to collide with an epoch of a data dir that was wiped and recreated.
fn successor_epoch(counter: u64) -> u64 {
    counter.saturating_add(1).max(now_micros())
}

/// Reserves a fresh epoch: returns it with the counter record the engine must write. The
/// caller holds the engine's epoch lock (or its global lock) until the record is written.
pub(crate) fn allocate_epoch(raw: &dyn Raw) -> Result<(Vec<u8>, Bytes, u64)> {
    let key = key::epoch_counter_key();
    let counter = raw
        .get(&key)?
        .map(|value| record::decode_u64("epoch counter", &value))
        .transpose()?
        .unwrap_or(0);
    let epoch = successor_epoch(counter);
    Ok((key, record::encode_u64(epoch), epoch))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use super::*;
    use crate::WriteBatch;

    /// Records in a map, counting the log entry values a plan reads.
    #[derive(Default)]
    struct Counted {
        records: BTreeMap<Vec<u8>, Bytes>,
        entry_reads: Cell<usize>,
    }

    impl Counted {
        fn count(&self, key: &[u8]) {
            if key.first() == Some(&key::LOG_ENTRY) {
                self.entry_reads.set(self.entry_reads.get() + 1);
            }
        }

        fn apply(&mut self, id: &ObjectId, batch: WriteBatch) {
            let ops = plan(&*self, id, batch.into_writes(), None).unwrap().ops;
            for (k, v) in ops {
                match v {
                    Some(v) => self.records.insert(k, v),
                    None => self.records.remove(&k),
                };
            }
        }

        fn meta(&self, id: &ObjectId) -> LogMeta {
            raw::log_meta(self, id).unwrap().unwrap()
        }

        fn seqs(&self, id: &ObjectId) -> Vec<u64> {
            raw::read_log(self, id, 0, 100)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect()
        }
    }

    impl Raw for Counted {
        fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
            self.count(key);
            Ok(self.records.get(key).cloned())
        }

        fn scan_nonempty(
            &self,
            start: Bound<&[u8]>,
            end: Bound<&[u8]>,
            reverse: bool,
            visit: raw::Visit<'_>,
        ) -> Result<()> {
            let range = self.records.range::<[u8], _>((start, end));
            raw::visit_each(range, reverse, |(k, v)| {
                self.count(k);
                visit(k, v)
            })
        }

        /// Sizes without reading values, as the segment engine's index gives them.
        fn scan_sizes_nonempty(
            &self,
            start: Bound<&[u8]>,
            end: Bound<&[u8]>,
            visit: raw::SizeVisit<'_>,
        ) -> Result<()> {
            let range = self.records.range::<[u8], _>((start, end));
            raw::visit_each(range, false, |(k, v)| visit(k, v.len() as u64))
        }
    }

    #[test]
    fn trims_read_entries_only_when_something_may_be_too_old() {
        let id = ObjectId::new("channel", "busy");
        let mut store = Counted::default();
        let retention = Retention {
            max_events: Some(3),
            max_bytes: Some(1 << 20),
            max_age: Some(Duration::from_secs(60)),
        };
        // A busy channel: an append and a trim per publish, one second apart.
        for seq in 1..=20u64 {
            let mut batch = WriteBatch::new();
            batch
                .append(seq, seq * 1000, vec![b'x'; 100])
                .trim(retention, seq * 1000);
            store.apply(&id, batch);
        }
        assert_eq!(store.seqs(&id), [18, 19, 20]);
        assert_eq!(
            store.entry_reads.get(),
            3,
            "only the three read back: count trims read sizes, the age bound was not passed"
        );
        let meta = store.meta(&id);
        assert_eq!((meta.count, meta.bytes, meta.oldest_ms), (3, 300, 1000));

        // Now the cutoff (2 s) passes the bound (1 s): the front's time is read once,
        // nothing is old enough, and the bound becomes exact again.
        store.entry_reads.set(0);
        let mut batch = WriteBatch::new();
        batch.trim(retention, 62_000);
        store.apply(&id, batch);
        assert_eq!(store.seqs(&id), [18, 19, 20]);
        assert_eq!(store.meta(&id).oldest_ms, 18_000);
        assert_eq!(
            store.entry_reads.get(),
            1 + 3,
            "the front entry, then the three read back"
        );

        // Later, age drops what is too old and no more.
        let mut batch = WriteBatch::new();
        batch.trim(retention, 79_500);
        store.apply(&id, batch);
        assert_eq!(store.seqs(&id), [20]);
        assert_eq!(store.meta(&id).oldest_ms, 20_000);
    }

    #[test]
    fn a_log_without_a_known_bound_is_trimmed_by_age_as_before() {
        let id = ObjectId::new("channel", "old");
        let mut store = Counted::default();
        let mut batch = WriteBatch::new();
        for seq in 1..=5u64 {
            batch.append(seq, seq * 1000, vec![b'x'; 10]);
        }
        store.apply(&id, batch);
        // As a data dir written before `oldest_ms` existed stores it: five fields.
        let meta_key = key::log_meta_key(&id).unwrap();
        let old = store.records[&meta_key].slice(..40);
        store.records.insert(meta_key, old);
        assert_eq!(store.meta(&id).oldest_ms, 0);

        let mut batch = WriteBatch::new();
        batch.trim(
            Retention {
                max_age: Some(Duration::from_millis(2500)),
                ..Retention::default()
            },
            5000,
        );
        store.apply(&id, batch);
        assert_eq!(store.seqs(&id), [3, 4, 5]);
        let meta = store.meta(&id);
        assert_eq!((meta.count, meta.bytes, meta.oldest_ms), (3, 30, 3000));
    }
}
