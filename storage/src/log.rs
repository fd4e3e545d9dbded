//! An object's append-only log as storage keeps it: entries ([`LogEntry`]) and the meta
//! record of its bounds ([`LogMeta`]), and what it keeps ([`Retention`]).

use std::time::Duration;

use bytes::Bytes;

/// One stored event. The payload is opaque to storage; the timestamp exists so retention by
/// age can be enforced without decoding payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Caller-assigned, strictly increasing within one epoch of one object's log.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the entry was written.
    pub timestamp_ms: u64,
    /// The encoded event.
    pub data: Bytes,
}

/// Bounds of one object's log, kept in a meta record updated in the same atomic batch as the
/// entries, so it never disagrees with them after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMeta {
    /// Identifies this incarnation of the log; changes when the log is deleted and recreated,
    /// so a cursor from an older history can be recognised.
    pub epoch: u64,
    /// Sequence of the oldest entry still stored (equal to `last_seq + 1` when empty).
    pub first_seq: u64,
    /// Sequence of the newest entry ever appended in this epoch (0 before the first).
    pub last_seq: u64,
    /// Number of entries stored.
    pub count: u64,
    /// Sum of the payload sizes of the stored entries.
    pub bytes: u64,
    /// No stored entry is older than this (ms since the Unix epoch), as long as entries were
    /// appended in time order, which trimming by age assumes anyway (it drops from the
    /// front); 0 when not known (logs last written before it was recorded). A lower bound,
    /// not always the exact oldest: it lets a trim by age that has nothing to drop skip
    /// reading entries, which is every trim of a busy channel.
    pub oldest_ms: u64,
}

/// How much of a log to keep; an entry goes when any bound is exceeded. Oldest entries go
/// first, and trimming never removes the newest entry because of `max_bytes` alone, so the
/// latest message is always replayable however large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Keep at most this many entries.
    pub max_events: Option<u64>,
    /// Keep at most this many payload bytes.
    pub max_bytes: Option<u64>,
    /// Drop entries older than this, measured against the trim's own timestamp.
    pub max_age: Option<Duration>,
}
