//! The byte-ordered key encoding: every record of every object lives in one ordered key space,
//! so one engine batch is atomic across an object's log, meta, key/value records and alarm,
//! and one range scan reads a log in sequence order.
//!
//! | tag    | record           | key after the tag                           | value                          |
//! |--------|------------------|---------------------------------------------|--------------------------------|
//! | `0x00` | system           | a fixed name (`schema_version`, `epoch_counter`, `boot_counter`, `clean_shutdown`) | u32 BE version / u64 BE |
//! | `0x01` | log meta         | `ns` `name`                                 | 5 × u64 BE: epoch, first_seq, last_seq, count, bytes |
//! | `0x02` | log entry        | `ns` `name` seq (u64 BE)                    | timestamp_ms (u64 BE) + payload |
//! | `0x03` | key/value        | `ns` `name` user key (raw bytes)            | the user value                 |
//! | `0x04` | alarm by object  | `ns` `name`                                 | due ms (u64 BE)                |
//! | `0x05` | alarm index      | due ms (u64 BE) `ns` `name`                 | empty                          |
//!
//! `ns` and `name` are each a u16 big-endian length followed by the UTF-8 bytes. The length
//! prefix makes every object prefix self-delimiting: the prefix of object A is never a prefix
//! of a key of another object B, so a range scan of A never reads B's records. The price is
//! that objects of one namespace sort by name length first, then by bytes.
//!
//! Big-endian integers sort numerically as bytes, so log entries sort by seq and the alarm
//! index sorts by due time first.

use crate::{Error, ObjectId, Result};

/// System records: schema version and the epoch counter.
pub const SYSTEM: u8 = 0x00;
/// One meta record per log: epoch and bounds.
pub const LOG_META: u8 = 0x01;
/// Log entries, ordered by seq within an object.
pub const LOG_ENTRY: u8 = 0x02;
/// Key/value records, ordered by user key within an object.
pub const KV: u8 = 0x03;
/// The alarm of an object, found by the object.
pub const ALARM: u8 = 0x04;
/// Every alarm again, ordered by due time, found by time.
pub const ALARM_INDEX: u8 = 0x05;

/// The version of this key layout and of the value formats. Bump it on any incompatible
/// change so an old data dir fails to open with a clear error instead of being misread.
pub const CURRENT_SCHEMA: u32 = 1;

const SCHEMA_VERSION: &[u8] = b"schema_version";
const EPOCH_COUNTER: &[u8] = b"epoch_counter";

/// Length of a big-endian u64 in a key.
const U64_LEN: usize = 8;

/// A decoded key, for scans that need to know what they read (alarm index, list of logs)
/// and for checking a data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A system record, by its name.
    System(Vec<u8>),
    /// The meta record of an object's log.
    LogMeta(ObjectId),
    /// One log entry.
    LogEntry {
        /// The object.
        id: ObjectId,
        /// The entry's sequence number.
        seq: u64,
    },
    /// One key/value record.
    Kv {
        /// The object.
        id: ObjectId,
        /// The user key.
        key: Vec<u8>,
    },
    /// The alarm record of an object.
    Alarm(ObjectId),
    /// The due-time index entry of an alarm.
    AlarmIndex {
        /// Due time, milliseconds since the Unix epoch.
        due_ms: u64,
        /// The object.
        id: ObjectId,
    },
}

impl Key {
    /// The key's bytes; fails only when a name is longer than a u16 length can say.
    pub fn encode(&self) -> Result<Vec<u8>> {
        match self {
            Key::System(name) => Ok(system_key(name)),
            Key::LogMeta(id) => log_meta_key(id),
            Key::LogEntry { id, seq } => log_entry_key(id, *seq),
            Key::Kv { id, key } => kv_key(id, key),
            Key::Alarm(id) => alarm_key(id),
            Key::AlarmIndex { due_ms, id } => alarm_index_key(*due_ms, id),
        }
    }
}

/// Where the layout version is recorded, so opening checks it before reading anything else.
pub fn schema_version_key() -> Vec<u8> {
    system_key(SCHEMA_VERSION)
}

/// Where the last epoch handed out is recorded, so epochs keep increasing across restarts
/// even if the clock goes back.
pub fn epoch_counter_key() -> Vec<u8> {
    system_key(EPOCH_COUNTER)
}

/// Where the number of times this data dir was opened is recorded: the boot id.
pub fn boot_counter_key() -> Vec<u8> {
    system_key(b"boot_counter")
}

/// Present only while the data dir is closed cleanly: written by a clean shutdown, removed
/// (durably) when the dir is opened. Its absence at open means the last run crashed.
pub fn clean_shutdown_key() -> Vec<u8> {
    system_key(b"clean_shutdown")
}

fn system_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(SYSTEM);
    key.extend_from_slice(name);
    key
}

/// The prefix shared by every record with `tag` of one object: what a range scan of that
/// object's log or key/value records starts from.
pub fn object_prefix(tag: u8, id: &ObjectId) -> Result<Vec<u8>> {
    object_prefix_parts(tag, id.namespace(), id.name(), 0)
}

/// The prefix shared by every record with `tag` of one namespace, for listing its objects.
pub fn namespace_prefix(tag: u8, namespace: &str) -> Result<Vec<u8>> {
    let mut key = Vec::with_capacity(1 + 2 + namespace.len());
    key.push(tag);
    push_part(&mut key, "namespace", namespace.as_bytes())?;
    Ok(key)
}

/// The meta record key of a log given as separate parts, so a listing can build the key of
/// a name without allocating an [`ObjectId`].
pub fn log_meta_key_parts(namespace: &str, name: &str) -> Result<Vec<u8>> {
    object_prefix_parts(LOG_META, namespace, name, 0)
}

/// The meta record key of an object's log.
pub fn log_meta_key(id: &ObjectId) -> Result<Vec<u8>> {
    object_prefix(LOG_META, id)
}

/// The key of one log entry.
pub fn log_entry_key(id: &ObjectId, seq: u64) -> Result<Vec<u8>> {
    let mut key = object_prefix_parts(LOG_ENTRY, id.namespace(), id.name(), U64_LEN)?;
    key.extend_from_slice(&seq.to_be_bytes());
    Ok(key)
}

/// The key of one key/value record.
pub fn kv_key(id: &ObjectId, user_key: &[u8]) -> Result<Vec<u8>> {
    let mut key = object_prefix_parts(KV, id.namespace(), id.name(), user_key.len())?;
    key.extend_from_slice(user_key);
    Ok(key)
}

/// The key of an object's alarm record.
pub fn alarm_key(id: &ObjectId) -> Result<Vec<u8>> {
    object_prefix(ALARM, id)
}

/// The due-time index key of an alarm.
pub fn alarm_index_key(due_ms: u64, id: &ObjectId) -> Result<Vec<u8>> {
    let mut key = alarm_index_from(due_ms);
    key.reserve(4 + id.namespace().len() + id.name().len());
    push_part(&mut key, "namespace", id.namespace().as_bytes())?;
    push_part(&mut key, "name", id.name().as_bytes())?;
    Ok(key)
}

/// The smallest index key with due time `due_ms`: scanning up to it (excluded) yields the
/// alarms due strictly before `due_ms`.
pub fn alarm_index_from(due_ms: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + U64_LEN);
    key.push(ALARM_INDEX);
    key.extend_from_slice(&due_ms.to_be_bytes());
    key
}

/// The smallest key greater than every key that starts with `prefix`: the exclusive end of a
/// prefix scan. `None` when there is none (the prefix is empty or all `0xff`), meaning the
/// scan runs to the end of the key space.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|b| *b != u8::MAX)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

fn object_prefix_parts(tag: u8, namespace: &str, name: &str, extra: usize) -> Result<Vec<u8>> {
    let mut key = Vec::with_capacity(1 + 4 + namespace.len() + name.len() + extra);
    key.push(tag);
    push_part(&mut key, "namespace", namespace.as_bytes())?;
    push_part(&mut key, "name", name.as_bytes())?;
    Ok(key)
}

fn push_part(key: &mut Vec<u8>, what: &'static str, part: &[u8]) -> Result<()> {
    let len = u16::try_from(part.len()).map_err(|_| Error::NameTooLong {
        what,
        len: part.len(),
    })?;
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(part);
    Ok(())
}

/// Decodes any key of the layout. Never panics: malformed input is [`Error::Corrupt`].
pub fn decode(key: &[u8]) -> Result<Key> {
    let mut reader = Reader { key, rest: key };
    let tag = reader.take(1)?[0];
    let decoded = match tag {
        SYSTEM => return Ok(Key::System(reader.rest.to_vec())),
        LOG_META => Key::LogMeta(reader.object_id()?),
        LOG_ENTRY => {
            let id = reader.object_id()?;
            let seq = reader.u64()?;
            Key::LogEntry { id, seq }
        }
        KV => {
            let id = reader.object_id()?;
            let key = std::mem::take(&mut reader.rest).to_vec();
            Key::Kv { id, key }
        }
        ALARM => Key::Alarm(reader.object_id()?),
        ALARM_INDEX => {
            let due_ms = reader.u64()?;
            let id = reader.object_id()?;
            Key::AlarmIndex { due_ms, id }
        }
        other => return Err(reader.corrupt(&format!("unknown tag {other:#04x}"))),
    };
    if !reader.rest.is_empty() {
        return Err(reader.corrupt("trailing bytes"));
    }
    Ok(decoded)
}

/// The sequence number at the end of a log entry key whose object prefix is `prefix`; the
/// hot path of trimming, which must not allocate an [`ObjectId`] per entry.
pub(crate) fn entry_seq(prefix: &[u8], key: &[u8]) -> Result<u64> {
    key.strip_prefix(prefix)
        .and_then(|rest| <[u8; U64_LEN]>::try_from(rest).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Corrupt(format!("bad log entry key {}", key.escape_ascii())))
}

struct Reader<'k> {
    key: &'k [u8],
    rest: &'k [u8],
}

impl<'k> Reader<'k> {
    fn take(&mut self, n: usize) -> Result<&'k [u8]> {
        if self.rest.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64> {
        let bytes = self.take(U64_LEN)?;
        let mut buf = [0; U64_LEN];
        buf.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(buf))
    }

    fn part(&mut self) -> Result<&'k str> {
        let len = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| self.corrupt("name is not UTF-8"))
    }

    fn object_id(&mut self) -> Result<ObjectId> {
        let namespace = self.part()?;
        let name = self.part()?;
        Ok(ObjectId::new(namespace, name))
    }

    fn corrupt(&self, why: &str) -> Error {
        // Bounded, escaped excerpt: enough to find the record, never a megabyte of binary.
        let shown = &self.key[..self.key.len().min(64)];
        Error::Corrupt(format!("bad key {} ({why})", shown.escape_ascii()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(namespace: &str, name: &str) -> ObjectId {
        ObjectId::new(namespace, name)
    }

    fn any_id() -> impl Strategy<Value = ObjectId> {
        (any::<String>(), any::<String>()).prop_map(|(ns, name)| id(&ns, &name))
    }

    proptest! {
        #[test]
        fn seq_order_is_byte_order(object in any_id(), a in any::<u64>(), b in any::<u64>()) {
            let ka = log_entry_key(&object, a).unwrap();
            let kb = log_entry_key(&object, b).unwrap();
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
        }

        #[test]
        fn kv_order_is_user_key_order(
            object in any_id(),
            a in proptest::collection::vec(any::<u8>(), 0..40),
            b in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let ka = kv_key(&object, &a).unwrap();
            let kb = kv_key(&object, &b).unwrap();
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
        }

        #[test]
        fn every_key_round_trips(
            object in any_id(),
            seq in any::<u64>(),
            user_key in proptest::collection::vec(any::<u8>(), 0..40),
            system in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let keys = [
                Key::System(system),
                Key::LogMeta(object.clone()),
                Key::LogEntry { id: object.clone(), seq },
                Key::Kv { id: object.clone(), key: user_key },
                Key::Alarm(object.clone()),
                Key::AlarmIndex { due_ms: seq, id: object },
            ];
            for key in keys {
                let bytes = key.encode().unwrap();
                prop_assert_eq!(decode(&bytes).unwrap(), key);
            }
        }

        #[test]
        fn object_prefix_never_matches_another_object(
            a in any_id(),
            b in any_id(),
            seq in any::<u64>(),
            user_key in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            prop_assume!(a != b);
            for tag in [LOG_META, LOG_ENTRY, KV, ALARM] {
                let prefix = object_prefix(tag, &a).unwrap();
                let others = [
                    log_meta_key(&b).unwrap(),
                    log_entry_key(&b, seq).unwrap(),
                    kv_key(&b, &user_key).unwrap(),
                    alarm_key(&b).unwrap(),
                ];
                for other in others {
                    prop_assert!(!other.starts_with(&prefix));
                }
            }
        }

        #[test]
        fn alarm_index_orders_by_due_time_first(
            a in any_id(),
            b in any_id(),
            due_a in any::<u64>(),
            due_b in any::<u64>(),
        ) {
            prop_assume!(due_a != due_b);
            let ka = alarm_index_key(due_a, &a).unwrap();
            let kb = alarm_index_key(due_b, &b).unwrap();
            prop_assert_eq!(due_a.cmp(&due_b), ka.cmp(&kb));
            prop_assert!(ka >= alarm_index_from(due_a));
            prop_assert!(ka < alarm_index_from(due_a.saturating_add(1)) || due_a == u64::MAX);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn prefix_end_bounds_the_prefix(
            prefix in proptest::collection::vec(any::<u8>(), 1..8),
            suffix in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut key = prefix.clone();
            key.extend_from_slice(&suffix);
            match prefix_end(&prefix) {
                Some(end) => {
                    prop_assert!(key < end);
                    prop_assert!(prefix < end);
                }
                None => prop_assert!(prefix.iter().all(|b| *b == u8::MAX)),
            }
        }
    }

    #[test]
    fn rejects_names_longer_than_u16() {
        let long = "x".repeat(usize::from(u16::MAX) + 1);
        let err = log_meta_key(&id("channel", &long)).unwrap_err();
        assert!(
            matches!(err, Error::NameTooLong { what: "name", .. }),
            "{err}"
        );
        let err = kv_key(&id(&long, "a"), b"k").unwrap_err();
        assert!(
            matches!(
                err,
                Error::NameTooLong {
                    what: "namespace",
                    ..
                }
            ),
            "{err}"
        );
        assert!(log_meta_key(&id("channel", &long[1..])).is_ok());
    }

    #[test]
    fn rejects_malformed_keys() {
        for bad in [
            &[][..],
            &[0x09],
            &[LOG_META, 0, 5, b'a'],
            &[LOG_ENTRY, 0, 1, b'n', 0, 1, b'x', 1, 2],
            &[LOG_META, 0, 1, b'n', 0, 1, b'x', 7],
            &[LOG_META, 0, 1, 0xff, 0, 0],
        ] {
            assert!(matches!(decode(bad), Err(Error::Corrupt(_))), "{bad:?}");
        }
    }

    #[test]
    fn names_sort_by_length_then_bytes() {
        let keys: Vec<_> = ["b", "a", "aa", "z"]
            .iter()
            .map(|name| log_meta_key(&id("ns", name)).unwrap())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![
                keys[1].clone(),
                keys[0].clone(),
                keys[3].clone(),
                keys[2].clone()
            ]
        );
    }
}
