//! The table's storage: a slab of entries with a list per subject threaded through it.
//!
//! Every idle connection pays for its entry, so the layout is chosen for size (measured
//! with `dormouse-bench idle`, docs/BENCHMARKS.md): a hash map from id to entry, plus a
//! set of ids per subject and per channel, cost about 300 bytes per connection at 15,000
//! connections (a hash table is up to half empty after it grows); a slab (the `slab`
//! crate, already used by the shutdown signal) costs one 64-byte slot, and a subject's
//! connections are a doubly linked list through their slots, so a subject costs one map
//! entry however many connections it has. A slab reuses a freed slot, so a key is the slot
//! and a generation the table counts up per connection: a key never names a later
//! occupant of its slot (short of four billion connections in between). A channel's
//! connections are found by a scan: listing them is an operator's call, not a hot path.

use std::collections::HashMap;
use std::sync::Arc;

use dormouse_runtime::{Outlet, Transport};
use slab::Slab;

/// No slot: the end of a list.
const NONE: u32 = u32::MAX;

/// What a connection is, for how a message to it is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A channel's subscriber, and how it reads events.
    Channel(Transport),
    /// A WebSocket accepted by a user object.
    ObjectWs,
    /// A hook's own WebSocket.
    HookWs,
}

/// One live connection.
pub(super) struct Entry {
    pub(super) subject: Arc<str>,
    /// The channel, the object as `namespace/name`, or the hook's name.
    pub(super) target: Arc<str>,
    pub(super) opened_ms: u64,
    pub(super) outlet: Outlet,
    /// Neighbours in the subject's list.
    prev: u32,
    next: u32,
    generation: u32,
    pub(super) kind: Kind,
    /// A hook chose the subject: a credential the client refreshes does not move it.
    pinned: bool,
    /// The other channels a channel connection follows (on `/v1/events`, or added with
    /// `subscribe`, or picked by its hook); boxed, since most connections follow one.
    pub(super) also: Option<Box<[Arc<str>]>>,
}

impl Entry {
    /// Whether this channel connection follows `channel`.
    pub(super) fn follows(&self, channel: &str) -> bool {
        matches!(self.kind, Kind::Channel(_))
            && (*self.target == *channel
                || self
                    .also
                    .as_ref()
                    .is_some_and(|also| also.iter().any(|c| **c == *channel)))
    }
}

/// See the module doc.
#[derive(Default)]
pub(super) struct Entries {
    slots: Slab<Entry>,
    /// Each subject's newest connection; the list runs from it to the oldest.
    subjects: HashMap<Arc<str>, u32>,
    /// The next connection's generation.
    generation: u32,
}

fn key(slot: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(slot)
}

fn split(key: u64) -> (u32, u32) {
    (key as u32, (key >> 32) as u32)
}

impl Entries {
    /// Enters a connection; its key.
    pub(super) fn insert(
        &mut self,
        subject: Arc<str>,
        target: Arc<str>,
        kind: Kind,
        opened_ms: u64,
        outlet: Outlet,
    ) -> u64 {
        let generation = self.generation;
        self.generation = self.generation.wrapping_add(1);
        // Shared with the subject's key, when the subject already has connections.
        let subject = self
            .subjects
            .get_key_value(&*subject)
            .map_or(subject, |(known, _)| known.clone());
        let slot = self.slots.insert(Entry {
            subject,
            target,
            opened_ms,
            outlet,
            prev: NONE,
            next: NONE,
            generation,
            kind,
            pinned: false,
            also: None,
        });
        // A slab index past u32 would need four billion connections at once.
        let slot = u32::try_from(slot).unwrap_or(NONE);
        self.link(slot);
        key(slot, generation)
    }

    fn entry_mut(&mut self, slot: u32) -> Option<&mut Entry> {
        self.slots.get_mut(slot as usize)
    }

    /// Puts `slot` at the head of its subject's list.
    fn link(&mut self, slot: u32) {
        let Some(subject) = self.entry_mut(slot).map(|e| e.subject.clone()) else {
            return;
        };
        let old_head = self.subjects.insert(subject, slot).unwrap_or(NONE);
        if let Some(entry) = self.entry_mut(slot) {
            entry.prev = NONE;
            entry.next = old_head;
        }
        if let Some(head) = self.entry_mut(old_head) {
            head.prev = slot;
        }
    }

    /// Takes `slot` out of its subject's list.
    fn unlink(&mut self, slot: u32) {
        let Some((subject, prev, next)) = self
            .entry_mut(slot)
            .map(|e| (e.subject.clone(), e.prev, e.next))
        else {
            return;
        };
        match self.entry_mut(prev) {
            Some(before) => before.next = next,
            None if next == NONE => {
                self.subjects.remove(&subject);
            }
            None => {
                self.subjects.insert(subject, next);
            }
        }
        if let Some(after) = self.entry_mut(next) {
            after.prev = prev;
        }
    }

    /// The entry under `key`, if it is still that connection's.
    pub(super) fn get(&self, key: u64) -> Option<&Entry> {
        let (slot, generation) = split(key);
        self.slots
            .get(slot as usize)
            .filter(|entry| entry.generation == generation)
    }

    /// Takes the connection under `key` out; a key whose slot moved on is ignored.
    pub(super) fn remove(&mut self, key: u64) {
        if self.get(key).is_none() {
            return;
        }
        let (slot, _) = split(key);
        self.unlink(slot);
        self.slots.remove(slot as usize);
        // A burst that went away must not leave its room behind.
        if self.slots.capacity() > 64 && self.slots.capacity() > 4 * self.slots.len() {
            self.slots.shrink_to_fit();
        }
    }

    /// A subject's connections, oldest first.
    pub(super) fn of_subject(&self, subject: &str) -> Vec<(u64, &Entry)> {
        let mut found = Vec::new();
        let mut at = self.subjects.get(subject).copied().unwrap_or(NONE);
        while let Some(entry) = self.slots.get(at as usize) {
            found.push((key(at, entry.generation), entry));
            at = entry.next;
        }
        found.reverse();
        found
    }

    /// Every connection, in slot order.
    pub(super) fn all(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.slots
            .iter()
            .map(|(slot, entry)| (key(slot as u32, entry.generation), entry))
    }

    /// Moves the connection under `key` to another subject's list; `pin` keeps it there
    /// against later moves without `pin` (a hook chose it, a refreshed credential does not
    /// move it).
    pub(super) fn set_subject(&mut self, key: u64, subject: Arc<str>, pin: bool) {
        match self.get(key) {
            Some(entry) if entry.pinned && !pin => return,
            Some(entry) if *entry.subject != *subject => {}
            Some(_) => {
                let (slot, _) = split(key);
                if let Some(entry) = self.entry_mut(slot) {
                    entry.pinned |= pin;
                }
                return;
            }
            None => return,
        }
        let (slot, _) = split(key);
        self.unlink(slot);
        let subject = self
            .subjects
            .get_key_value(&*subject)
            .map_or(subject, |(known, _)| known.clone());
        if let Some(entry) = self.entry_mut(slot) {
            entry.subject = subject;
            entry.pinned |= pin;
        }
        self.link(slot);
    }

    /// Sets the other channels connection `key` follows.
    pub(super) fn set_also(&mut self, key: u64, channels: &[String]) {
        let (slot, generation) = split(key);
        if let Some(entry) = self.entry_mut(slot)
            && entry.generation == generation
        {
            entry.also = (!channels.is_empty())
                .then(|| channels.iter().map(|c| Arc::from(c.as_str())).collect());
        }
    }

    /// True when nothing is left, indexes included.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.subjects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use dormouse_runtime::{Socket, Transport};

    fn outlet() -> Outlet {
        let (_socket, receiver) = Socket::new(Transport::WebSocket, 1024, Bytes::new());
        receiver.outlet()
    }

    fn subjects(entries: &Entries, subject: &str) -> Vec<u64> {
        entries
            .of_subject(subject)
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    }

    #[test]
    fn lists_follow_inserts_removals_and_moves_and_keys_are_never_reused() {
        let mut entries = Entries::default();
        let add = |entries: &mut Entries, subject: &str| {
            entries.insert(
                Arc::from(subject),
                Arc::from("room"),
                Kind::Channel(Transport::WebSocket),
                0,
                outlet(),
            )
        };
        let a1 = add(&mut entries, "alice");
        let b1 = add(&mut entries, "bob");
        let a2 = add(&mut entries, "alice");
        let a3 = add(&mut entries, "alice");
        assert_eq!(subjects(&entries, "alice"), [a1, a2, a3]);
        // Out of the middle, the head and the tail.
        entries.remove(a2);
        assert_eq!(subjects(&entries, "alice"), [a1, a3]);
        entries.remove(a3);
        assert_eq!(subjects(&entries, "alice"), [a1]);
        let a4 = add(&mut entries, "alice");
        assert_ne!(a4, a2, "a freed slot comes back under a new generation");
        assert_ne!(a4, a3);
        assert!(entries.get(a3).is_none() && entries.get(a2).is_none());
        entries.remove(a3); // a stale key removes nothing
        assert_eq!(subjects(&entries, "alice"), [a1, a4]);
        entries.set_subject(a1, Arc::from("bob"), false);
        assert_eq!(subjects(&entries, "alice"), [a4]);
        assert_eq!(subjects(&entries, "bob"), [b1, a1]);
        // Pinned (a hook chose it): an unpinned move leaves it, a pinned one moves it.
        entries.set_subject(a4, Arc::from("carol"), true);
        entries.set_subject(a4, Arc::from("alice"), false);
        assert_eq!(subjects(&entries, "carol"), [a4]);
        entries.set_subject(a4, Arc::from("dave"), true);
        assert_eq!(subjects(&entries, "dave"), [a4]);
        entries.remove(a4);
        let a4 = a1;
        for key in [a4, b1] {
            entries.remove(key);
        }
        assert!(entries.is_empty());
        assert_eq!(entries.all().count(), 0);
    }

    #[test]
    fn a_burst_that_leaves_gives_its_room_back() {
        let mut entries = Entries::default();
        let keys: Vec<u64> = (0..10_000)
            .map(|i| {
                entries.insert(
                    Arc::from(format!("s{}", i % 7).as_str()),
                    Arc::from("room"),
                    Kind::Channel(Transport::Sse),
                    0,
                    outlet(),
                )
            })
            .collect();
        let stay = keys[3];
        for key in keys.iter().rev().filter(|k| **k != stay) {
            entries.remove(*key);
        }
        assert!(
            entries.slots.capacity() < 1000,
            "{}",
            entries.slots.capacity()
        );
        assert_eq!(subjects(&entries, "s3"), [stay]);
        // New connections, in freed slots and in slots given back and added again: no key of
        // the burst names one of them.
        let again: Vec<u64> = (0..100)
            .map(|_| {
                entries.insert(
                    Arc::from("s3"),
                    Arc::from("room"),
                    Kind::Channel(Transport::Sse),
                    0,
                    outlet(),
                )
            })
            .collect();
        assert_eq!(subjects(&entries, "s3").len(), 101);
        for key in keys.iter().filter(|k| **k != stay) {
            assert!(entries.get(*key).is_none());
            assert!(!again.contains(key));
        }
    }
}
