//! The little that an engine must provide (point reads and ordered scans over the encoded key
//! space), and the [`crate::Storage`] read operations written once on top of it, so sled and
//! memory cannot drift apart.

use std::ops::Bound;

use bytes::Bytes;

use crate::key::{self, Key};
use crate::{Error, LogEntry, LogMeta, ObjectId, Result, record};

/// The read methods of [`crate::Storage`], written once for every engine: `$raw` is a
/// method of the engine that returns something that dereferences to a [`Raw`] (a lock
/// guard, a tree), held for the one read.
macro_rules! raw_reads {
    ($raw:ident) => {
        fn log_meta(&self, id: &ObjectId) -> Result<Option<LogMeta>> {
            raw::log_meta(&*self.$raw(), id)
        }

        fn read_log(&self, id: &ObjectId, from_seq: u64, limit: usize) -> Result<Vec<LogEntry>> {
            raw::read_log(&*self.$raw(), id, from_seq, limit)
        }

        fn read_log_tail(&self, id: &ObjectId, limit: usize) -> Result<Vec<LogEntry>> {
            raw::read_log_tail(&*self.$raw(), id, limit)
        }

        fn read_log_before(
            &self,
            id: &ObjectId,
            before_seq: u64,
            limit: usize,
        ) -> Result<Vec<LogEntry>> {
            raw::read_log_before(&*self.$raw(), id, before_seq, limit)
        }

        fn get(&self, id: &ObjectId, key: &[u8]) -> Result<Option<Bytes>> {
            raw::get(&*self.$raw(), id, key)
        }

        fn list(
            &self,
            id: &ObjectId,
            prefix: &[u8],
            start_after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<(Vec<u8>, Bytes)>> {
            raw::list(&*self.$raw(), id, prefix, start_after, limit)
        }

        fn alarm(&self, id: &ObjectId) -> Result<Option<u64>> {
            raw::alarm(&*self.$raw(), id)
        }

        fn due_alarms(&self, now_ms: u64, limit: usize) -> Result<Vec<(ObjectId, u64)>> {
            raw::due_alarms(&*self.$raw(), now_ms, limit)
        }

        fn next_alarm(&self) -> Result<Option<(ObjectId, u64)>> {
            raw::next_alarm(&*self.$raw())
        }

        fn list_logs(
            &self,
            namespace: &str,
            start_after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<String>> {
            raw::list_logs(&*self.$raw(), namespace, start_after, limit)
        }
    };
}

pub(crate) use raw_reads;

/// Called for each record of a scan, in scan order; returns `false` to stop early.
pub(crate) type Visit<'v> = &'v mut dyn FnMut(&[u8], &[u8]) -> Result<bool>;

/// Called for each record of a scan that needs only keys and value sizes, in key order;
/// returns `false` to stop early.
pub(crate) type SizeVisit<'v> = &'v mut dyn FnMut(&[u8], u64) -> Result<bool>;

/// An ordered map from encoded keys to values, as seen by one read.
pub(crate) trait Raw {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>>;

    /// Scans `(start, end)`, which the caller guarantees is not empty or inverted (some
    /// engines panic on those).
    fn scan_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()>;

    /// Scans `(start, end)` in key order (or reverse), calling `visit` until it returns
    /// `false`. An empty or inverted range visits nothing.
    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        if range_is_empty(start, end) {
            return Ok(());
        }
        self.scan_nonempty(start, end, reverse, visit)
    }

    /// Scans the non-empty `(start, end)` forwards for keys and the sizes of their values.
    /// Trimming a log and removing a prefix need no more; an engine that knows sizes
    /// without reading values (the segment engine's index does) overrides this to read none.
    fn scan_sizes_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        visit: SizeVisit<'_>,
    ) -> Result<()> {
        self.scan_nonempty(start, end, false, &mut |k, v| visit(k, v.len() as u64))
    }
}

/// Feeds `items` (an engine's ordered range) to `visit`, backwards when `reverse`, until
/// it returns `false`: the loop every engine's [`Raw::scan_nonempty`] needs.
pub(crate) fn visit_each<T>(
    items: impl DoubleEndedIterator<Item = T>,
    reverse: bool,
    mut visit: impl FnMut(T) -> Result<bool>,
) -> Result<()> {
    if reverse {
        for item in items.rev() {
            if !visit(item)? {
                break;
            }
        }
    } else {
        for item in items {
            if !visit(item)? {
                break;
            }
        }
    }
    Ok(())
}

/// True when no key lies in `(start, end)`; `BTreeMap::range` panics on some of these.
pub(crate) fn range_is_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => {
            s >= e
        }
        _ => false,
    }
}

/// The exclusive end of a scan over every key starting with `prefix`, as a bound.
pub(crate) fn end_of(prefix: &[u8]) -> Bound<Vec<u8>> {
    key::prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded)
}

pub(crate) fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(k) => Bound::Included(k),
        Bound::Excluded(k) => Bound::Excluded(k),
        Bound::Unbounded => Bound::Unbounded,
    }
}

pub(crate) fn log_meta(raw: &dyn Raw, id: &ObjectId) -> Result<Option<LogMeta>> {
    raw.get(&key::log_meta_key(id)?)?
        .map(|value| record::decode_meta(&value))
        .transpose()
}

pub(crate) fn read_log(
    raw: &dyn Raw,
    id: &ObjectId,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<LogEntry>> {
    let prefix = key::object_prefix(key::LOG_ENTRY, id)?;
    let start = key::log_entry_key(id, from_seq)?;
    let end = end_of(&prefix);
    collect_entries(
        raw,
        &prefix,
        Bound::Included(&start),
        as_ref(&end),
        false,
        limit,
    )
}

pub(crate) fn read_log_tail(raw: &dyn Raw, id: &ObjectId, limit: usize) -> Result<Vec<LogEntry>> {
    let prefix = key::object_prefix(key::LOG_ENTRY, id)?;
    let end = end_of(&prefix);
    let mut entries = collect_entries(
        raw,
        &prefix,
        Bound::Included(&prefix),
        as_ref(&end),
        true,
        limit,
    )?;
    entries.reverse();
    Ok(entries)
}

pub(crate) fn read_log_before(
    raw: &dyn Raw,
    id: &ObjectId,
    before_seq: u64,
    limit: usize,
) -> Result<Vec<LogEntry>> {
    let prefix = key::object_prefix(key::LOG_ENTRY, id)?;
    let end = key::log_entry_key(id, before_seq)?;
    let mut entries = collect_entries(
        raw,
        &prefix,
        Bound::Included(&prefix),
        Bound::Excluded(&end),
        true,
        limit,
    )?;
    entries.reverse();
    Ok(entries)
}

fn collect_entries(
    raw: &dyn Raw,
    prefix: &[u8],
    start: Bound<&[u8]>,
    end: Bound<&[u8]>,
    reverse: bool,
    limit: usize,
) -> Result<Vec<LogEntry>> {
    let mut entries = Vec::new();
    if limit == 0 {
        return Ok(entries);
    }
    raw.scan(start, end, reverse, &mut |k, v| {
        let seq = key::entry_seq(prefix, k)?;
        entries.push(record::decode_entry(seq, v)?);
        Ok(entries.len() < limit)
    })?;
    Ok(entries)
}

pub(crate) fn get(raw: &dyn Raw, id: &ObjectId, user_key: &[u8]) -> Result<Option<Bytes>> {
    raw.get(&key::kv_key(id, user_key)?)
}

pub(crate) fn list(
    raw: &dyn Raw,
    id: &ObjectId,
    prefix: &[u8],
    start_after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Bytes)>> {
    let mut records = Vec::new();
    if limit == 0 {
        return Ok(records);
    }
    let object_len = key::object_prefix(key::KV, id)?.len();
    let first = key::kv_key(id, prefix)?;
    let after = start_after.map(|k| key::kv_key(id, k)).transpose()?;
    let start = match &after {
        Some(after) if *after >= first => Bound::Excluded(after.as_slice()),
        _ => Bound::Included(first.as_slice()),
    };
    let end = end_of(&first);
    raw.scan(start, as_ref(&end), false, &mut |k, v| {
        let user_key = k.get(object_len..).ok_or_else(|| {
            Error::Corrupt(format!("key/value key {} is truncated", k.escape_ascii()))
        })?;
        records.push((user_key.to_vec(), Bytes::copy_from_slice(v)));
        Ok(records.len() < limit)
    })?;
    Ok(records)
}

pub(crate) fn alarm(raw: &dyn Raw, id: &ObjectId) -> Result<Option<u64>> {
    raw.get(&key::alarm_key(id)?)?
        .map(|value| record::decode_u64("alarm", &value))
        .transpose()
}

pub(crate) fn due_alarms(raw: &dyn Raw, now_ms: u64, limit: usize) -> Result<Vec<(ObjectId, u64)>> {
    let end = match now_ms.checked_add(1) {
        Some(after_now) => Bound::Excluded(key::alarm_index_from(after_now)),
        None => end_of(&[key::ALARM_INDEX]),
    };
    scan_alarm_index(raw, as_ref(&end), limit)
}

pub(crate) fn next_alarm(raw: &dyn Raw) -> Result<Option<(ObjectId, u64)>> {
    let end = end_of(&[key::ALARM_INDEX]);
    Ok(scan_alarm_index(raw, as_ref(&end), 1)?.pop())
}

fn scan_alarm_index(
    raw: &dyn Raw,
    end: Bound<&[u8]>,
    limit: usize,
) -> Result<Vec<(ObjectId, u64)>> {
    let mut alarms = Vec::new();
    if limit == 0 {
        return Ok(alarms);
    }
    raw.scan(
        Bound::Included(&[key::ALARM_INDEX]),
        end,
        false,
        &mut |k, _| {
            match key::decode(k)? {
                Key::AlarmIndex { due_ms, id } => alarms.push((id, due_ms)),
                other => {
                    return Err(Error::Corrupt(format!("alarm index holds a {other:?} key")));
                }
            }
            Ok(alarms.len() < limit)
        },
    )?;
    Ok(alarms)
}

pub(crate) fn list_logs(
    raw: &dyn Raw,
    namespace: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if limit == 0 {
        return Ok(names);
    }
    let prefix = key::namespace_prefix(key::LOG_META, namespace)?;
    let after = start_after
        .map(|name| key::log_meta_key_parts(namespace, name))
        .transpose()?;
    let start = match &after {
        Some(after) => Bound::Excluded(after.as_slice()),
        None => Bound::Included(prefix.as_slice()),
    };
    let end = end_of(&prefix);
    raw.scan(start, as_ref(&end), false, &mut |k, _| {
        match key::decode(k)? {
            Key::LogMeta(id) => names.push(id.name().to_owned()),
            other => {
                return Err(Error::Corrupt(format!(
                    "log meta range holds a {other:?} key"
                )));
            }
        }
        Ok(names.len() < limit)
    })?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_ranges() {
        let (a, b): (&[u8], &[u8]) = (b"a", b"b");
        assert!(!range_is_empty(Bound::Included(a), Bound::Included(a)));
        assert!(range_is_empty(Bound::Excluded(a), Bound::Included(a)));
        assert!(range_is_empty(Bound::Included(a), Bound::Excluded(a)));
        assert!(range_is_empty(Bound::Included(b), Bound::Excluded(a)));
        assert!(!range_is_empty(Bound::Excluded(a), Bound::Excluded(b)));
        assert!(!range_is_empty(Bound::Unbounded, Bound::Excluded(a)));
    }
}
