//! Storage's [`Error`], worded for the operator who reads it in a log or an HTTP body.

use std::io;
use std::path::PathBuf;

use crate::ObjectId;

/// Everything that can go wrong in storage. Messages are written for the operator who reads
/// them in a log or an HTTP error body, so each one says what happened and, where there is
/// one, what to do.
///
/// `Clone` because group commit hands one flush failure to every writer that waited on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two processes writing one sled directory would corrupt it, so the second one stops.
    #[error("data dir {} is in use by another dormouse process", path.display())]
    Locked {
        /// The data dir that is already open.
        path: PathBuf,
    },

    /// The data dir was written with a different key or value layout; reading it with this
    /// build would misinterpret records.
    #[error(
        "data dir {} has storage schema version {found}, but this dormouse build uses version \
         {expected}: run a dormouse version that matches the data dir, or start with a new, \
         empty data dir",
        path.display()
    )]
    SchemaMismatch {
        /// The data dir.
        path: PathBuf,
        /// The version recorded in the data dir.
        found: u32,
        /// The version this build reads and writes.
        expected: u32,
    },

    /// A stored key or value does not decode; the data dir is damaged or was written by
    /// something else.
    #[error("corrupt storage record: {0}")]
    Corrupt(String),

    /// The file system refused an operation (full disk, permissions, failing device).
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),

    /// The engine failed for a reason other than I/O; the message is the engine's own.
    #[error("storage engine error: {0}")]
    Engine(String),

    /// A flush has been running for longer than the stall limit: the engine is stuck (seen
    /// with sled after the disk filled up). Writes are refused rather than left hanging;
    /// nothing refused was acknowledged. A restart is needed once the cause is fixed.
    #[error(
        "storage is stalled: a flush has not completed for {} s (disk full or failing?); \
         nothing was acknowledged; restart the server once the cause is fixed",
        .0.as_secs()
    )]
    Stalled(std::time::Duration),

    /// An fsync failed. After that the kernel may have dropped the unsynced pages, so the
    /// engine cannot know what is on disk and refuses writes until a restart replays the
    /// files (nothing unsynced was acknowledged under `always`).
    #[error(
        "storage stopped accepting writes after a failed fsync ({0}); restart the server \
         once the disk is healthy"
    )]
    Failed(String),

    /// Cluster mode: another node owns the object (or took it over from this one), so this
    /// node may not read or write it; nothing of the refused write was stored. The work
    /// belongs on `owner` when it is known.
    #[error("{id} is owned by {}; this node may not write it: {reason}", owner.as_deref().unwrap_or("another node"))]
    NotOwner {
        /// The object.
        id: ObjectId,
        /// The node that owns it, when known (its name).
        owner: Option<String>,
        /// What happened.
        reason: String,
    },

    /// Cluster mode: the replicated log did not answer (no quorum, an election that did not
    /// end in time, a lost connection to NATS). Whether the last write was stored is not
    /// known; nothing was acknowledged, and the object is reloaded before it serves again.
    #[error("the replicated log is unavailable: {0}")]
    Unreplicated(String),

    /// Sequence numbers are assigned by the caller and must increase, so that a log read in
    /// key order is the log in append order. Nothing of the batch was applied.
    #[error(
        "append to {id} with seq {seq} rejected: the log's last seq is {last} and sequence \
         numbers must increase"
    )]
    SeqNotIncreasing {
        /// The object whose log was appended to.
        id: ObjectId,
        /// The rejected sequence number.
        seq: u64,
        /// The log's last sequence number (0 for a log that does not exist yet).
        last: u64,
    },

    /// Keys store each name with a 16-bit length, so longer names cannot be stored.
    #[error("{what} is {len} bytes long; storage accepts at most 65535")]
    NameTooLong {
        /// Which part of the id: `namespace` or `name`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },

    /// The store shut down (or its flusher died) before the write could be made durable; the
    /// write may or may not be on disk.
    #[error("storage is closed: it shut down before the write was made durable")]
    Closed,
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// True when the disk (or the user's quota) is full, so the gateway can answer
    /// `507 Insufficient Storage` instead of a generic 500, and operators know what to fix.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io(e) => {
                matches!(
                    e.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                ) || e.raw_os_error() == Some(ENOSPC)
            }
            Error::Engine(message) => message.contains("No space left on device"),
            _ => false,
        }
    }
}

/// `ENOSPC` on Linux and the BSDs; checked besides the error kind because an `io::Error`
/// rebuilt from a message (by sled or by [`Clone`]) keeps only the kind.
const ENOSPC: i32 = 28;

impl Clone for Error {
    /// `io::Error` is not `Clone`: the copy keeps its kind and message, which is all that
    /// callers match on ([`Error::is_disk_full`] looks at the kind).
    fn clone(&self) -> Self {
        match self {
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::SchemaMismatch {
                path,
                found,
                expected,
            } => Error::SchemaMismatch {
                path: path.clone(),
                found: *found,
                expected: *expected,
            },
            Error::Corrupt(message) => Error::Corrupt(message.clone()),
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), e.to_string())),
            Error::Engine(message) => Error::Engine(message.clone()),
            Error::SeqNotIncreasing { id, seq, last } => Error::SeqNotIncreasing {
                id: id.clone(),
                seq: *seq,
                last: *last,
            },
            Error::NameTooLong { what, len } => Error::NameTooLong { what, len: *len },
            Error::Closed => Error::Closed,
            Error::Stalled(for_how_long) => Error::Stalled(*for_how_long),
            Error::Failed(message) => Error::Failed(message.clone()),
            Error::NotOwner { id, owner, reason } => Error::NotOwner {
                id: id.clone(),
                owner: owner.clone(),
                reason: reason.clone(),
            },
            Error::Unreplicated(message) => Error::Unreplicated(message.clone()),
        }
    }
}

/// Converts sled's errors without making `sled::Error` part of this crate's public API
/// (no `From` impl), so the engine stays replaceable.
pub(crate) trait SledResultExt<T> {
    /// Maps the error: I/O stays I/O (so a full disk is still recognisable), corruption
    /// becomes [`Error::Corrupt`], the rest [`Error::Engine`] with sled's message.
    fn engine(self) -> Result<T>;
}

impl<T> SledResultExt<T> for std::result::Result<T, sled::Error> {
    fn engine(self) -> Result<T> {
        self.map_err(from_sled)
    }
}

pub(crate) fn from_sled(e: sled::Error) -> Error {
    match e {
        sled::Error::Io(io) => Error::Io(io),
        e @ sled::Error::Corruption { .. } => Error::Corrupt(e.to_string()),
        e => Error::Engine(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_full_disk() {
        let full = Error::Io(io::Error::from(io::ErrorKind::StorageFull));
        assert!(full.is_disk_full());
        assert!(full.clone().is_disk_full(), "a clone keeps the kind");
        assert!(Error::Io(io::Error::from_raw_os_error(ENOSPC)).is_disk_full());
        assert!(from_sled(sled::Error::Io(io::Error::from_raw_os_error(ENOSPC))).is_disk_full());
        assert!(!Error::Io(io::Error::from(io::ErrorKind::PermissionDenied)).is_disk_full());
        assert!(!Error::Closed.is_disk_full());
    }

    #[test]
    fn messages_name_the_path_and_the_fix() {
        let locked = Error::Locked {
            path: PathBuf::from("/var/lib/dormouse"),
        };
        assert_eq!(
            locked.to_string(),
            "data dir /var/lib/dormouse is in use by another dormouse process"
        );
        let mismatch = Error::SchemaMismatch {
            path: PathBuf::from("/d"),
            found: 2,
            expected: 1,
        }
        .to_string();
        assert!(mismatch.contains("/d"), "{mismatch}");
        assert!(mismatch.contains("version 2"), "{mismatch}");
        assert!(mismatch.contains("new, empty data dir"), "{mismatch}");
    }

    #[test]
    fn is_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Error>();
    }
}
