//! Which objects have a log, cluster-wide: what lists channels (`GET /v1/channels`) when
//! no node holds their records (a hibernated object's records are only in its journal).
//!
//! A KV bucket (`{prefix}_logs`), one key per object with a log, nothing in the value. A
//! commit that creates a log puts its key once acknowledged, one that deletes it removes
//! it, and every acquisition settles the key from the journal it just read, which repairs
//! what a node that died between the two left. Keys change only when a log is created or
//! deleted, never per event.

use std::time::Duration;

use async_nats::jetstream::kv;
use dormouse_storage::ObjectId;
use futures::TryStreamExt as _;

use crate::connect::Nats;
use crate::ownership::{DirectoryError, token};

/// The cluster-wide index of objects with a log; see the module doc.
#[derive(Debug)]
pub(super) struct LogIndex {
    store: kv::Store,
}

fn key_of(id: &ObjectId) -> String {
    format!("{}.{}", token(id.namespace()), token(id.name()))
}

/// The name [`token`] made `token` from; `None` if it is not one of its tokens.
fn untoken(token: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'=' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Names in the order every engine lists them: by length in bytes, then bytewise.
fn listing_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

impl LogIndex {
    /// Opens (creating it if needed) the bucket.
    pub(super) async fn open(
        nats: &Nats,
        prefix: &str,
        replicas: usize,
    ) -> Result<Self, DirectoryError> {
        let store =
            crate::ownership::bucket(nats, format!("{prefix}_logs"), replicas, Duration::ZERO)
                .await?;
        Ok(Self { store })
    }

    /// Records that `id` has a log now (`true`) or no longer (`false`).
    pub(super) async fn record(&self, id: &ObjectId, has_log: bool) -> Result<(), DirectoryError> {
        let key = key_of(id);
        let what = || format!("recording whether {id} has a log");
        if has_log {
            self.store
                .put(&key, bytes::Bytes::new())
                .await
                .map(|_| ())
                .map_err(|e| DirectoryError::new(what(), e))
        } else {
            self.store
                .delete(&key)
                .await
                .map_err(|e| DirectoryError::new(what(), e))
        }
    }

    /// Makes the index say what the journal says (after an acquisition): one read, and a
    /// write only when they differ.
    pub(super) async fn settle(&self, id: &ObjectId, has_log: bool) -> Result<(), DirectoryError> {
        let indexed = self
            .store
            .entry(key_of(id))
            .await
            .map_err(|e| DirectoryError::new(format!("reading whether {id} has a log"), e))?
            .is_some_and(|e| e.operation == kv::Operation::Put);
        if indexed == has_log {
            return Ok(());
        }
        self.record(id, has_log).await
    }

    /// Up to `limit` names of `namespace`'s objects with a log, after `start_after`, in
    /// the engines' listing order. Reads every key of the bucket: its cost grows with the
    /// number of objects that have a log, not with their events.
    pub(super) async fn list(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, DirectoryError> {
        let prefix = format!("{}.", token(namespace));
        let keys: Vec<String> = match self.store.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| DirectoryError::new("listing objects with a log", e))?,
            Err(e) => return Err(DirectoryError::new("listing objects with a log", e)),
        };
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|key| untoken(key.strip_prefix(&prefix)?))
            .filter(|name| start_after.is_none_or(|after| listing_order(name, after).is_gt()))
            .collect();
        names.sort_by(|a, b| listing_order(a, b));
        names.truncate(limit);
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_turns_back_into_its_name() {
        for name in [
            "news",
            "run:abc",
            "a.b",
            "a=2Eb",
            "user@example.com",
            "é",
            "",
        ] {
            assert_eq!(untoken(&token(name)).as_deref(), Some(name));
        }
        assert_eq!(untoken("=ZZ"), None);
        assert_eq!(untoken("=4"), None);
    }

    #[test]
    fn names_list_by_length_then_bytes() {
        let mut names = vec!["bb", "a", "ab", "c", "aaa"];
        names.sort_by(|a, b| listing_order(a, b));
        assert_eq!(names, ["a", "c", "ab", "bb", "aaa"]);
    }
}
