//! Where every object's alarm is, cluster-wide: what lets an alarm fire while its object is
//! hibernated (held by no node) and after the node that set it died.
//!
//! The truth of an alarm is its object's journal, like every other record; this index is a
//! KV bucket (`{prefix}_alarms`, one entry per object with an alarm: its due time and the
//! node that wrote it) that every node watches into memory, so the scheduler asks it
//! without I/O. It may be ahead of the journal, never behind it:
//! - a commit that sets an alarm puts the earlier of the old and new due times in the index
//!   *before* the append, and the exact one after it is acknowledged, so a node that dies
//!   in between leaves an entry that fires early, never one that fires late or not at all;
//! - a commit that deletes the alarm removes the entry only after it is acknowledged;
//! - a node that acquires an object rewrites its entry from the journal it just read (the
//!   due time, and itself as the writer), which settles what an early or stale entry left.
//!
//! An entry that fires too early, or for an alarm that is gone, costs one wake-up: the firing
//! acquires the object, which settles the entry, and the runtime finds nothing due.
//!
//! Which node fires an entry: the node holding the object fires from its own records (the
//! index is not asked); otherwise the writer, while it is alive; otherwise the live node
//! [`crate::place`] picks, so a dead node's alarms are fired by exactly one survivor (one
//! at a time: a firing acquires the object, and acquiring is exclusive).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use dormouse_storage::ObjectId;
use futures::StreamExt as _;

use super::lock;
use crate::connect::Nats;
use crate::ownership::{DirectoryError, Membership, NodeId, place, token};

/// An entry: when, and which node wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Due {
    at_ms: u64,
    writer: NodeId,
}

/// The bucket's entries as this node's watch saw them.
#[derive(Debug, Default)]
struct View {
    by_key: HashMap<String, (ObjectId, Due)>,
    by_time: BTreeSet<(u64, ObjectId)>,
}

impl View {
    fn put(&mut self, key: String, id: ObjectId, due: Due) {
        self.remove(&key);
        self.by_time.insert((due.at_ms, id.clone()));
        self.by_key.insert(key, (id, due));
    }

    fn remove(&mut self, key: &str) {
        if let Some((id, old)) = self.by_key.remove(key) {
            self.by_time.remove(&(old.at_ms, id));
        }
    }
}

/// The cluster-wide alarm index; see the module doc.
#[derive(Debug)]
pub(super) struct AlarmIndex {
    store: kv::Store,
    membership: Arc<Membership>,
    view: Arc<Mutex<View>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for AlarmIndex {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

fn key_of(id: &ObjectId) -> String {
    format!("{}.{}", token(id.namespace()), token(id.name()))
}

fn encode(id: &ObjectId, due: &Due) -> Bytes {
    Bytes::from(format!(
        "{}\n{} {}\n{}\n{}",
        due.at_ms,
        due.writer.incarnation,
        due.writer.name,
        id.namespace(),
        id.name()
    ))
}

fn decode(value: &[u8]) -> Option<(ObjectId, Due)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.splitn(4, '\n');
    let at_ms = parts.next()?.parse().ok()?;
    let (incarnation, name) = parts.next()?.split_once(' ')?;
    let writer = NodeId {
        name: name.to_string(),
        incarnation: incarnation.parse().ok()?,
    };
    let id = ObjectId::new(parts.next()?, parts.next()?);
    Some((id, Due { at_ms, writer }))
}

impl AlarmIndex {
    /// Opens (creating it if needed) the bucket and starts watching it from its first entry.
    pub(super) async fn open(
        nats: &Nats,
        prefix: &str,
        replicas: usize,
        membership: Arc<Membership>,
    ) -> Result<Self, DirectoryError> {
        let store =
            crate::ownership::bucket(nats, format!("{prefix}_alarms"), replicas, Duration::ZERO)
                .await?;
        let mut updates = store
            .watch_with_history(">")
            .await
            .map_err(|e| DirectoryError::new("watching the alarms bucket", e))?;
        let view = Arc::new(Mutex::new(View::default()));
        let watched = view.clone();
        let watch = tokio::spawn(async move {
            while let Some(update) = updates.next().await {
                let Ok(entry) = update else { continue };
                let mut view = lock(&watched);
                match (entry.operation, decode(&entry.value)) {
                    (Operation::Put, Some((id, due))) => view.put(entry.key, id, due),
                    (Operation::Put, None) => {
                        tracing::warn!(
                            key = entry.key,
                            "an alarm entry that does not decode; ignored"
                        );
                    }
                    _ => view.remove(&entry.key),
                }
            }
            tracing::warn!(
                "the alarms bucket's watch ended; alarms of hibernated objects wait for it"
            );
        });
        Ok(Self {
            store,
            membership,
            view,
            watch,
        })
    }

    fn entry(&self, id: &ObjectId) -> Option<Due> {
        lock(&self.view)
            .by_key
            .get(&key_of(id))
            .map(|(_, due)| due.clone())
    }

    async fn put(&self, id: &ObjectId, at_ms: u64) -> Result<(), DirectoryError> {
        let due = Due {
            at_ms,
            writer: self.membership.me().clone(),
        };
        let key = key_of(id);
        self.store
            .put(&key, encode(id, &due))
            .await
            .map_err(|e| DirectoryError::new(format!("recording the alarm of {id}"), e))?;
        // Seen here at once, not only when the watch brings it back.
        lock(&self.view).put(key, id.clone(), due);
        Ok(())
    }

    /// Before a commit that sets `id`'s alarm to `at_ms` is appended: the entry fires no
    /// later than either the alarm now in the journal or the new one.
    pub(super) async fn before_set(&self, id: &ObjectId, at_ms: u64) -> Result<(), DirectoryError> {
        let at_ms = match self.entry(id) {
            Some(old) if &old.writer == self.membership.me() && old.at_ms <= at_ms => return Ok(()),
            Some(old) => old.at_ms.min(at_ms),
            None => at_ms,
        };
        self.put(id, at_ms).await
    }

    /// Once the journal holds `alarm` as `id`'s alarm (after an acknowledged commit that
    /// changed it, or after loading): the entry says exactly that, with this node as writer.
    pub(super) async fn settle(
        &self,
        id: &ObjectId,
        alarm: Option<u64>,
    ) -> Result<(), DirectoryError> {
        let current = self.entry(id);
        match alarm {
            Some(at_ms) => match current {
                Some(due) if due.at_ms == at_ms && &due.writer == self.membership.me() => Ok(()),
                _ => self.put(id, at_ms).await,
            },
            None if current.is_none() => Ok(()),
            None => {
                let key = key_of(id);
                self.store
                    .delete(&key)
                    .await
                    .map_err(|e| DirectoryError::new(format!("removing the alarm of {id}"), e))?;
                lock(&self.view).remove(&key);
                Ok(())
            }
        }
    }

    /// Whether this node fires `id`'s entry written by `writer`, the object being held by
    /// no one here.
    fn mine(&self, id: &ObjectId, writer: &NodeId, alive: &[String]) -> bool {
        let me = self.membership.me();
        if writer == me {
            return true;
        }
        if self.membership.alive(writer) {
            return false;
        }
        let key = key_of(id);
        place(&key, alive.iter().map(String::as_str)) == Some(me.name.as_str())
    }

    /// Entries this node fires, due at or before `now_ms`, earliest first, skipping objects
    /// `held` says this node holds (their own records say when they are due).
    pub(super) fn due(
        &self,
        now_ms: u64,
        limit: usize,
        held: impl Fn(&ObjectId) -> bool,
    ) -> Vec<(ObjectId, u64)> {
        let alive: Vec<String> = self.membership.alive_nodes().into_keys().collect();
        let view = lock(&self.view);
        let mut out = Vec::new();
        for (at_ms, id) in &view.by_time {
            if *at_ms > now_ms || out.len() >= limit {
                break;
            }
            if held(id) {
                continue;
            }
            let Some((_, due)) = view.by_key.get(&key_of(id)) else {
                continue;
            };
            if self.mine(id, &due.writer, &alive) {
                out.push((id.clone(), *at_ms));
            }
        }
        out
    }

    /// The earliest entry this node fires (see [`AlarmIndex::due`]).
    pub(super) fn next(&self, held: impl Fn(&ObjectId) -> bool) -> Option<(ObjectId, u64)> {
        let alive: Vec<String> = self.membership.alive_nodes().into_keys().collect();
        let view = lock(&self.view);
        view.by_time.iter().find_map(|(at_ms, id)| {
            if held(id) {
                return None;
            }
            let (_, due) = view.by_key.get(&key_of(id))?;
            self.mine(id, &due.writer, &alive)
                .then(|| (id.clone(), *at_ms))
        })
    }

    /// Entries in the index (objects with an alarm, cluster-wide).
    pub(super) fn len(&self) -> usize {
        lock(&self.view).by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_whatever_the_object_is_called() {
        let due = Due {
            at_ms: 1_700_000_000_123,
            writer: NodeId {
                name: "node-a".into(),
                incarnation: 42,
            },
        };
        for name in ["plain", "with.dots:and@signs", "new\nline", ""] {
            let id = ObjectId::new("ingest", name);
            assert_eq!(decode(&encode(&id, &due)), Some((id, due.clone())));
        }
        assert_eq!(decode(b"not a number\n1 a\nns\nname"), None);
        assert_eq!(decode(b"12"), None);
    }

    #[test]
    fn a_moved_entry_leaves_no_trace_of_its_old_time() {
        let mut view = View::default();
        let id = ObjectId::new("ns", "a");
        let writer = NodeId {
            name: "n".into(),
            incarnation: 1,
        };
        view.put(
            key_of(&id),
            id.clone(),
            Due {
                at_ms: 10,
                writer: writer.clone(),
            },
        );
        view.put(key_of(&id), id.clone(), Due { at_ms: 5, writer });
        assert_eq!(
            view.by_time.iter().cloned().collect::<Vec<_>>(),
            [(5, id.clone())]
        );
        view.remove(&key_of(&id));
        assert!(view.by_time.is_empty() && view.by_key.is_empty());
    }
}
