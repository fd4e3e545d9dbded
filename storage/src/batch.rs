//! [`WriteBatch`]: everything one handler wrote to one object, applied atomically.

use bytes::Bytes;

use crate::Retention;

/// One write of a [`WriteBatch`]. Applied in order, so a batch may delete a log and append to
/// its new incarnation, or put and then delete the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Appends one event; `seq` must be greater than the log's `last_seq`.
    Append {
        /// Caller-assigned sequence number.
        seq: u64,
        /// Milliseconds since the Unix epoch.
        timestamp_ms: u64,
        /// The encoded event.
        data: Bytes,
    },
    /// Drops the oldest entries beyond the retention bounds; `now_ms` anchors `max_age`.
    Trim {
        /// Bounds to enforce.
        retention: Retention,
        /// The time against which `max_age` is measured.
        now_ms: u64,
    },
    /// Removes the log and its meta; the next append starts a new epoch.
    DeleteLog,
    /// Replaces the log (if any) with an empty one of the given epoch, which the caller got
    /// from [`crate::Storage::allocate_epoch`]. This is how an object learns its new log's
    /// epoch before its batch commits, so it can hand out ids that include it.
    CreateLog {
        /// The epoch for the new log.
        epoch: u64,
    },
    /// Sets one key/value record.
    Put {
        /// The user key.
        key: Vec<u8>,
        /// The value.
        value: Bytes,
    },
    /// Removes one key/value record (absent keys are fine).
    Delete {
        /// The user key.
        key: Vec<u8>,
    },
    /// Removes every key/value record of the object.
    DeleteAllKv,
    /// Replaces the object's alarm (at most one per object).
    SetAlarm {
        /// Due time, milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Removes the object's alarm, if any.
    DeleteAlarm,
}

/// Everything one handler wrote to one object: applied atomically by [`crate::Storage::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    writes: Vec<Write>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a write at the end.
    pub fn push(&mut self, write: Write) -> &mut Self {
        self.writes.push(write);
        self
    }

    /// Adds an append.
    pub fn append(&mut self, seq: u64, timestamp_ms: u64, data: impl Into<Bytes>) -> &mut Self {
        self.push(Write::Append {
            seq,
            timestamp_ms,
            data: data.into(),
        })
    }

    /// Adds a trim.
    pub fn trim(&mut self, retention: Retention, now_ms: u64) -> &mut Self {
        self.push(Write::Trim { retention, now_ms })
    }

    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Bytes>) -> &mut Self {
        self.push(Write::Put {
            key: key.into(),
            value: value.into(),
        })
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.push(Write::Delete { key: key.into() })
    }

    /// True when there is nothing to apply (and so nothing to wait for).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// The writes, in order.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// Consumes the batch into its writes.
    pub fn into_writes(self) -> Vec<Write> {
        self.writes
    }
}
