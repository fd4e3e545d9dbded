//! The engine's index: every live key, in order, with the [`Slot`] where its value is, kept
//! as a list of leaves. Only the list is always in memory (one [`LeafRef`], about 80
//! bytes, per leaf of up to [`LEAF_MAX`] keys: its last key and where it was written). A
//! leaf's entries are read from the segment file a checkpoint wrote them to, through the
//! engine's cache, and changes since are kept as the leaf's *delta*: an ordered map of the
//! keys changed, which a checkpoint merges into a new written version. So memory follows
//! what is being changed and read, not what is kept: a hibernated channel's thousand
//! events cost a few bytes of the list, and an active one the keys it changed since the
//! last checkpoint.
//!
//! Writes never read a file half-way: [`Index::prepare`] loads the written version of
//! every leaf a write must look into (to learn what a key replaces) before the write
//! reaches its segment, and the updates that follow only use those ([`Pinned`]). A key
//! past the end of the last leaf (an append) needs no load at all.
//!
//! Leaf boundaries change only at checkpoints ([`Index::materialize`]): a run of changed
//! leaves is merged with its deltas and cut again into full leaves, so appends fill leaves
//! to the brim and trims drop emptied leaves.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::ops::{Bound, Range};
use std::sync::Arc;

use super::leaf::{Entry, Key, Leaf, Slot};
use crate::raw::range_is_empty;
use crate::{Error, Result};

/// Where a written leaf is: the frame at `offset` of segment `seg`, `len` bytes with its
/// header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Loc {
    pub(crate) seg: u32,
    pub(crate) offset: u32,
    pub(crate) len: u32,
}

/// Written leaves loaded for one write before it touched its file.
pub(crate) type Pinned = HashMap<Loc, Arc<Leaf>>;

/// A leaf as a checkpoint records it: its first and last keys, how many keys, where it
/// was written. `K` is borrowed when written, owned when read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootLeaf<K> {
    pub(crate) first: K,
    pub(crate) last: K,
    pub(crate) len: u32,
    pub(crate) loc: Loc,
}

/// Reads a written leaf (from the cache or its segment).
pub(crate) trait Load {
    fn load(&self, loc: Loc) -> Result<Arc<Leaf>>;
}

/// Changes to a leaf's keys since it was written: the new slot, or `None` for a removal.
/// An ordered map, because writes land anywhere in it (appends of many objects share a
/// leaf until a checkpoint cuts them apart).
type Delta = BTreeMap<Key, Option<Slot>>;

/// Memory one change takes in a delta (entry and map overhead), for sizing the checkpoint
/// trigger.
pub(crate) const CHANGE_BYTES: u64 =
    (std::mem::size_of::<Key>() + std::mem::size_of::<Option<Slot>>() + 16) as u64;

/// One leaf as the always-resident list sees it.
struct LeafRef {
    /// No key of the leaf is greater, and every key of the next leaf is: what a search
    /// compares against. Exact after a checkpoint; an upper bound after removals.
    last: Key,
    /// The first key of the written version: a key before it, or after `last`, is not in
    /// the written version, so writing it reads nothing (the appends of one object land in
    /// the leaf after its own, before that leaf's first key).
    first: Key,
    /// Keys in the leaf, counting its delta.
    len: u32,
    /// The version a checkpoint last wrote; `None` for a leaf made since.
    disk: Option<Loc>,
    /// Changes since `disk`, sorted by key; `Some` (possibly empty) marks the leaf for
    /// the next checkpoint to write.
    delta: Option<Delta>,
}

/// The ordered map from keys to slots; see the module docs.
#[derive(Default)]
pub(crate) struct Index {
    /// Sorted, non-overlapping.
    leaves: Vec<LeafRef>,
    len: usize,
    /// Changes held in deltas, over all leaves.
    changes: usize,
    dirty: usize,
    /// Written versions no longer referenced (their leaf was written again, or merged
    /// away), not yet taken out of their segment's live bytes.
    retired: Vec<Loc>,
}

fn not_prepared() -> Error {
    Error::Engine("an index leaf was not loaded before the write that changes it".into())
}

fn search(entries: &[Entry], key: &[u8]) -> std::result::Result<usize, usize> {
    entries.binary_search_by(|(k, _)| k.as_slice().cmp(key))
}

/// `base` with the changes of `delta` applied, in key order.
fn merge<'d>(
    base: &[Entry],
    delta: impl Iterator<Item = (&'d Key, &'d Option<Slot>)>,
    capacity: usize,
) -> Vec<Entry> {
    let mut out = Vec::with_capacity(capacity);
    let mut b = 0;
    for (key, change) in delta {
        while let Some((bk, _)) = base.get(b)
            && bk.as_slice() < key.as_slice()
        {
            out.push(base[b].clone());
            b += 1;
        }
        if base
            .get(b)
            .is_some_and(|(bk, _)| bk.as_slice() == key.as_slice())
        {
            b += 1;
        }
        if let Some(slot) = change {
            out.push((key.clone(), *slot));
        }
    }
    out.extend_from_slice(&base[b..]);
    out
}

impl Index {
    /// An index whose leaves are all written, as a checkpoint lists them.
    pub(crate) fn from_root(root: Vec<RootLeaf<Vec<u8>>>) -> Self {
        let len = root.iter().map(|leaf| leaf.len as usize).sum();
        let leaves = root
            .into_iter()
            .map(|leaf| LeafRef {
                last: Key::new(&leaf.last),
                first: Key::new(&leaf.first),
                len: leaf.len,
                disk: Some(leaf.loc),
                delta: None,
            })
            .collect();
        Self {
            leaves,
            len,
            changes: 0,
            dirty: 0,
            retired: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// Leaves the next checkpoint writes.
    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// Changed keys held in memory until the next checkpoint.
    pub(crate) fn change_count(&self) -> usize {
        self.changes
    }

    /// Heap bytes the index holds itself (the list, long keys, deltas); the leaf cache is
    /// counted by its owner. O(leaves).
    pub(crate) fn heap_bytes(&self) -> usize {
        let list = self.leaves.capacity() * std::mem::size_of::<LeafRef>();
        let leaves: usize = self
            .leaves
            .iter()
            .map(|leaf| {
                leaf.last.heap_bytes()
                    + leaf.first.heap_bytes()
                    + leaf.delta.as_ref().map_or(0, |delta| {
                        delta.len() * CHANGE_BYTES as usize
                            + delta.keys().map(Key::heap_bytes).sum::<usize>()
                    })
            })
            .sum();
        list + leaves
    }

    /// The leaf that holds `key` if anything does: the first whose last key is not below it.
    fn leaf_for(&self, key: &[u8]) -> usize {
        self.leaves
            .partition_point(|leaf| leaf.last.as_slice() < key)
    }

    /// The leaf a new `key` goes to: the one that holds it, or the last leaf.
    fn leaf_into(&self, key: &[u8]) -> Option<usize> {
        let last = self.leaves.len().checked_sub(1)?;
        Some(self.leaf_for(key).min(last))
    }

    /// The written entries of leaf `li` (empty for a leaf never written).
    fn base(&self, li: usize, load: &dyn Load) -> Result<Option<Arc<Leaf>>> {
        self.leaves[li].disk.map(|loc| load.load(loc)).transpose()
    }

    pub(crate) fn get(&self, key: &[u8], load: &dyn Load) -> Result<Option<Slot>> {
        let li = self.leaf_for(key);
        let Some(leaf) = self.leaves.get(li) else {
            return Ok(None);
        };
        if let Some(change) = leaf.delta.as_ref().and_then(|delta| delta.get(key)) {
            return Ok(*change);
        }
        Ok(self
            .base(li, load)?
            .and_then(|base| search(&base, key).ok().map(|i| base[i].1)))
    }

    /// Visits the entries with keys in `(start, end)` in order (or reversed) until `visit`
    /// returns `false`, loading leaves as it goes.
    pub(crate) fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        load: &dyn Load,
        visit: &mut dyn FnMut(&[u8], &Slot) -> Result<bool>,
    ) -> Result<()> {
        let Some(last) = self.leaves.len().checked_sub(1) else {
            return Ok(());
        };
        let after_start = |k: &[u8]| match start {
            Bound::Included(s) => k >= s,
            Bound::Excluded(s) => k > s,
            Bound::Unbounded => true,
        };
        let lo = self
            .leaves
            .partition_point(|leaf| !after_start(leaf.last.as_slice()));
        let hi = match end {
            Bound::Unbounded => last,
            Bound::Included(e) | Bound::Excluded(e) => self.leaf_for(e).min(last),
        };
        if lo > hi {
            return Ok(());
        }
        let one = |li: usize| -> Result<bool> {
            let base = self.base(li, load)?;
            let base: &[Entry] = base.as_deref().map_or(&[], |b| &b[..]);
            let base = &base[sub_range(base, start, end)];
            let delta = match &self.leaves[li].delta {
                Some(delta) if !delta.is_empty() && !range_is_empty(start, end) => {
                    Some(delta.range::<[u8], _>((start, end)))
                }
                _ => None,
            };
            match (delta, reverse) {
                (Some(delta), false) => visit_merged(base.iter(), delta, Ordering::Less, visit),
                (Some(delta), true) => {
                    visit_merged(base.iter().rev(), delta.rev(), Ordering::Greater, visit)
                }
                (None, false) => {
                    visit_merged(base.iter(), std::iter::empty(), Ordering::Less, visit)
                }
                (None, true) => visit_merged(
                    base.iter().rev(),
                    std::iter::empty(),
                    Ordering::Greater,
                    visit,
                ),
            }
        };
        crate::raw::visit_each(lo..=hi, reverse, one)
    }

    /// Loads into `pinned` the written version of every leaf a write of `keys` must look
    /// into: the leaf each key falls in, unless the key is past its last key (an append)
    /// or already in its delta.
    pub(crate) fn prepare<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
        load: &dyn Load,
        pinned: &mut Pinned,
    ) -> Result<()> {
        for key in keys {
            let Some(li) = self.leaf_into(key) else {
                return Ok(());
            };
            let leaf = &self.leaves[li];
            let in_delta = leaf
                .delta
                .as_ref()
                .is_some_and(|delta| delta.contains_key(key));
            if leaf.may_hold(key)
                && !in_delta
                && let Some(loc) = leaf.disk
                && !pinned.contains_key(&loc)
            {
                pinned.insert(loc, load.load(loc)?);
            }
        }
        Ok(())
    }

    /// The current slot of `key` in leaf `li`, from its delta or its pinned written version.
    fn current(&self, li: usize, key: &[u8], pinned: &Pinned) -> Result<Option<Slot>> {
        let leaf = &self.leaves[li];
        if let Some(change) = leaf.delta.as_ref().and_then(|delta| delta.get(key)) {
            return Ok(*change);
        }
        match leaf.disk {
            Some(loc) if leaf.may_hold(key) => {
                let base = pinned.get(&loc).ok_or_else(not_prepared)?;
                Ok(search(base, key).ok().map(|i| base[i].1))
            }
            _ => Ok(None),
        }
    }

    /// Records `change` for `key` in leaf `li`'s delta.
    fn change(&mut self, li: usize, key: &[u8], change: Option<Slot>) {
        let leaf = &mut self.leaves[li];
        if leaf.delta.is_none() {
            self.dirty += 1;
        }
        let delta = leaf.delta.get_or_insert_with(Delta::new);
        match delta.get_mut(key) {
            Some(existing) => *existing = change,
            None => {
                delta.insert(Key::new(key), change);
                self.changes += 1;
            }
        }
    }

    /// Inserts or replaces; returns the slot replaced.
    pub(crate) fn insert(
        &mut self,
        key: &[u8],
        slot: Slot,
        pinned: &Pinned,
    ) -> Result<Option<Slot>> {
        let Some(li) = self.leaf_into(key) else {
            self.leaves.push(LeafRef {
                last: Key::new(key),
                first: Key::new(key),
                len: 1,
                disk: None,
                delta: Some(Delta::from([(Key::new(key), Some(slot))])),
            });
            self.dirty += 1;
            self.changes += 1;
            self.len += 1;
            return Ok(None);
        };
        let old = self.current(li, key, pinned)?;
        self.change(li, key, Some(slot));
        let leaf = &mut self.leaves[li];
        if key > leaf.last.as_slice() {
            leaf.last = Key::new(key);
        }
        if old.is_none() {
            leaf.len += 1;
            self.len += 1;
        }
        Ok(old)
    }

    /// Removes `key`; returns its slot.
    pub(crate) fn remove(&mut self, key: &[u8], pinned: &Pinned) -> Result<Option<Slot>> {
        let li = self.leaf_for(key);
        if li == self.leaves.len() {
            return Ok(None);
        }
        let old = self.current(li, key, pinned)?;
        if old.is_some() {
            self.change(li, key, None);
            self.leaves[li].len -= 1;
            self.len -= 1;
        }
        Ok(old)
    }

    /// Marks leaf `li` for the next checkpoint to write again even if unchanged (the
    /// cleaner's way of moving a leaf out of the segment it cleans).
    pub(crate) fn make_dirty(&mut self, li: usize) {
        let leaf = &mut self.leaves[li];
        if leaf.delta.is_none() {
            leaf.delta = Some(Delta::new());
            self.dirty += 1;
        }
    }

    /// The last run of neighbouring changed leaves that ends at or before leaf `before`.
    /// A checkpoint rewrites runs from the last to the first, so installing one leaves the
    /// positions of those before it alone.
    pub(crate) fn last_run_before(&self, before: usize) -> Option<Range<usize>> {
        let end = self.leaves[..before.min(self.leaves.len())]
            .iter()
            .rposition(|leaf| leaf.delta.is_some())?
            + 1;
        let start = self.leaves[..end]
            .iter()
            .rposition(|leaf| leaf.delta.is_none())
            .map_or(0, |i| i + 1);
        Some(start..end)
    }

    /// The entries of leaf `li` with its delta applied, in order: what a checkpoint cuts
    /// into new leaves, together with its changed neighbours, so appends fill leaves and
    /// trims merge what they thin.
    pub(crate) fn merge_leaf(&self, li: usize, load: &dyn Load) -> Result<Vec<Entry>> {
        let base = self.base(li, load)?;
        let base: &[Entry] = base.as_deref().map_or(&[], |b| &b[..]);
        Ok(match &self.leaves[li].delta {
            Some(delta) => merge(base, delta.iter(), base.len() + delta.len()),
            None => base.to_vec(),
        })
    }

    /// Replaces the leaves of `run` with `fresh` ones, just written: together they hold the
    /// run's merged entries, in order, each at most [`LEAF_MAX`].
    pub(crate) fn install(&mut self, run: Range<usize>, fresh: Vec<RootLeaf<Key>>) {
        let refs = fresh.into_iter().map(|leaf| LeafRef {
            last: leaf.last,
            first: leaf.first,
            len: leaf.len,
            disk: Some(leaf.loc),
            delta: None,
        });
        let old: Vec<LeafRef> = self.leaves.splice(run, refs).collect();
        for leaf in old {
            if let Some(delta) = leaf.delta {
                self.dirty -= 1;
                self.changes -= delta.len();
            }
            if let Some(loc) = leaf.disk {
                self.retired.push(loc);
            }
        }
    }

    /// Written versions that nothing references any more, since the last call.
    pub(crate) fn take_retired(&mut self) -> Vec<Loc> {
        std::mem::take(&mut self.retired)
    }

    /// Every leaf as a checkpoint records it. `None` while a leaf is changed (a
    /// checkpoint writes them first).
    pub(crate) fn root(&self) -> Option<Vec<RootLeaf<&[u8]>>> {
        self.leaves
            .iter()
            .map(|leaf| match (&leaf.delta, leaf.disk) {
                (None, Some(loc)) => Some(RootLeaf {
                    first: leaf.first.as_slice(),
                    last: leaf.last.as_slice(),
                    len: leaf.len,
                    loc,
                }),
                _ => None,
            })
            .collect()
    }

    /// Unchanged leaves written to segment `seg`: what the cleaner must have written
    /// elsewhere before the segment can go.
    pub(crate) fn clean_on(&self, seg: u32) -> Vec<usize> {
        self.leaves
            .iter()
            .enumerate()
            .filter(|(_, leaf)| leaf.delta.is_none() && leaf.disk.is_some_and(|l| l.seg == seg))
            .map(|(li, _)| li)
            .collect()
    }
}

impl LeafRef {
    /// Whether the written version may hold `key`.
    fn may_hold(&self, key: &[u8]) -> bool {
        self.disk.is_some() && key >= self.first.as_slice() && key <= self.last.as_slice()
    }
}

/// Visits the written entries `base` with the changes of `delta` applied, lazily, in the
/// order both iterate (`first` is the ordering of a key that comes first: `Less` forwards,
/// `Greater` backwards), until `visit` returns `false`; returns whether it wanted more.
fn visit_merged<'a, 'd>(
    base: impl Iterator<Item = &'a Entry>,
    delta: impl Iterator<Item = (&'d Key, &'d Option<Slot>)>,
    first: Ordering,
    visit: &mut dyn FnMut(&[u8], &Slot) -> Result<bool>,
) -> Result<bool> {
    let mut base = base.peekable();
    let mut delta = delta.peekable();
    loop {
        let from_delta = match (base.peek(), delta.peek()) {
            (None, None) => return Ok(true),
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((bk, _)), Some((dk, _))) => {
                let order = dk.as_slice().cmp(bk.as_slice());
                if order == Ordering::Equal {
                    // The change replaces the written entry.
                    base.next();
                }
                order != first.reverse()
            }
        };
        if from_delta {
            if let Some((key, Some(slot))) = delta.next()
                && !visit(key.as_slice(), slot)?
            {
                return Ok(false);
            }
        } else if let Some((key, slot)) = base.next()
            && !visit(key.as_slice(), slot)?
        {
            return Ok(false);
        }
    }
}

/// The part of sorted `entries` with keys in `(start, end)`.
fn sub_range(entries: &[Entry], start: Bound<&[u8]>, end: Bound<&[u8]>) -> Range<usize> {
    let from = entries.partition_point(|(k, _)| match start {
        Bound::Included(s) => k.as_slice() < s,
        Bound::Excluded(s) => k.as_slice() <= s,
        Bound::Unbounded => false,
    });
    let to = entries.partition_point(|(k, _)| match end {
        Bound::Included(e) => k.as_slice() <= e,
        Bound::Excluded(e) => k.as_slice() < e,
        Bound::Unbounded => true,
    });
    from..to.max(from)
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("len", &self.len)
            .field("leaves", &self.leaves.len())
            .field("dirty", &self.dirty)
            .field("changes", &self.changes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;
    use crate::segments::leaf::LEAF_MAX;

    fn slot(n: u32) -> Slot {
        Slot::for_test(n)
    }

    /// Leaves "written" to memory, so tests can checkpoint and load like the engine.
    #[derive(Default)]
    struct Disk {
        leaves: Mutex<HashMap<Loc, Arc<Leaf>>>,
        next: Mutex<u32>,
    }

    impl Load for Disk {
        fn load(&self, loc: Loc) -> Result<Arc<Leaf>> {
            self.leaves
                .lock()
                .unwrap()
                .get(&loc)
                .cloned()
                .ok_or_else(|| Error::Engine("no such leaf".into()))
        }
    }

    impl Disk {
        /// Writes every changed leaf, as a checkpoint does.
        fn checkpoint(&self, index: &mut Index) {
            let mut before = index.leaf_count();
            while let Some(run) = index.last_run_before(before) {
                let mut merged = Vec::new();
                for li in run.clone() {
                    merged.extend(index.merge_leaf(li, self).unwrap());
                }
                let fresh = merged
                    .chunks(LEAF_MAX)
                    .map(|chunk| {
                        let mut next = self.next.lock().unwrap();
                        *next += 1;
                        let loc = Loc {
                            seg: 1,
                            offset: *next,
                            len: 1,
                        };
                        self.leaves
                            .lock()
                            .unwrap()
                            .insert(loc, Arc::new(chunk.to_vec()));
                        RootLeaf {
                            first: chunk[0].0.clone(),
                            last: chunk[chunk.len() - 1].0.clone(),
                            len: chunk.len() as u32,
                            loc,
                        }
                    })
                    .collect();
                before = run.start;
                index.install(run, fresh);
            }
            index.take_retired();
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(Vec<u8>, u32),
        Remove(Vec<u8>),
        Checkpoint,
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        // Short keys collide often (replacements, removals of present keys); a few long
        // ones take the heap path.
        prop_oneof![
            4 => proptest::collection::vec(0u8..4, 0..4),
            1 => proptest::collection::vec(any::<u8>(), 30..60),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            30 => (key(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            20 => key().prop_map(Op::Remove),
            1 => Just(Op::Checkpoint),
        ]
    }

    fn bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        match b {
            Bound::Included(k) => Bound::Included(k),
            Bound::Excluded(k) => Bound::Excluded(k),
            Bound::Unbounded => Bound::Unbounded,
        }
    }

    fn a_bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
        prop_oneof![
            key().prop_map(Bound::Included),
            key().prop_map(Bound::Excluded),
            Just(Bound::Unbounded),
        ]
    }

    fn collect(
        index: &Index,
        disk: &Disk,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
    ) -> Vec<(Vec<u8>, u32)> {
        let mut out = Vec::new();
        index
            .scan(start, end, reverse, disk, &mut |k, s| {
                out.push((k.to_vec(), s.offset));
                Ok(true)
            })
            .unwrap();
        out
    }

    fn prepared(index: &Index, disk: &Disk, key: &[u8]) -> Pinned {
        let mut pinned = Pinned::new();
        index.prepare([key], disk, &mut pinned).unwrap();
        pinned
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Behaves as a `BTreeMap` through any sequence of inserts, removes and
        /// checkpoints (each followed by a restart from the written root), including
        /// every kind of range, forwards and backwards.
        #[test]
        fn behaves_like_a_btreemap(
            ops in proptest::collection::vec(op(), 0..3000),
            ranges in proptest::collection::vec((a_bound(), a_bound()), 20),
        ) {
            let disk = Disk::default();
            let mut index = Index::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let pinned = prepared(&index, &disk, &k);
                        let old = index.insert(&k, slot(v), &pinned).unwrap().map(|s| s.offset);
                        prop_assert_eq!(old, model.insert(k, v));
                    }
                    Op::Remove(k) => {
                        let pinned = prepared(&index, &disk, &k);
                        let old = index.remove(&k, &pinned).unwrap().map(|s| s.offset);
                        prop_assert_eq!(old, model.remove(&k));
                    }
                    Op::Checkpoint => {
                        disk.checkpoint(&mut index);
                        prop_assert_eq!(index.dirty_count(), 0);
                        prop_assert_eq!(index.change_count(), 0);
                        let root: Vec<_> = index
                            .root()
                            .unwrap()
                            .into_iter()
                            .map(|leaf| RootLeaf {
                                first: leaf.first.to_vec(),
                                last: leaf.last.to_vec(),
                                len: leaf.len,
                                loc: leaf.loc,
                            })
                            .collect();
                        index = Index::from_root(root);
                    }
                }
                prop_assert_eq!(index.len(), model.len());
            }
            let all = collect(&index, &disk, Bound::Unbounded, Bound::Unbounded, false);
            let theirs: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
            prop_assert_eq!(&all, &theirs);
            for (k, v) in &model {
                prop_assert_eq!(index.get(k, &disk).unwrap().map(|s| s.offset), Some(*v));
            }
            for (start, end) in ranges {
                if crate::raw::range_is_empty(bound(&start), bound(&end)) {
                    continue;
                }
                let theirs: Vec<_> = model
                    .range::<[u8], _>((bound(&start), bound(&end)))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                let ours = collect(&index, &disk, bound(&start), bound(&end), false);
                prop_assert_eq!(&ours, &theirs);
                let mut back = collect(&index, &disk, bound(&start), bound(&end), true);
                back.reverse();
                prop_assert_eq!(&back, &theirs);
            }
        }
    }

    #[test]
    fn appends_fill_leaves_and_trims_drop_them() {
        let disk = Disk::default();
        let mut index = Index::default();
        for n in 0..100_000u32 {
            let pinned = prepared(&index, &disk, &n.to_be_bytes());
            index.insert(&n.to_be_bytes(), slot(n), &pinned).unwrap();
            if n % 5_000 == 0 {
                disk.checkpoint(&mut index);
            }
        }
        disk.checkpoint(&mut index);
        // Appending in order leaves every leaf but the last full.
        assert_eq!(index.leaf_count(), 100_000usize.div_ceil(LEAF_MAX));
        // Trimming from the front (the replay-buffer pattern) drops whole leaves.
        for n in 0..90_000u32 {
            let pinned = prepared(&index, &disk, &n.to_be_bytes());
            index.remove(&n.to_be_bytes(), &pinned).unwrap();
            if n % 5_000 == 0 {
                disk.checkpoint(&mut index);
            }
        }
        disk.checkpoint(&mut index);
        assert!(index.leaf_count() <= 10_000usize.div_ceil(LEAF_MAX) + 1);
        // Thinning every leaf merges neighbours that changed together.
        for n in 90_000..100_000u32 {
            if n % 10 != 0 {
                let pinned = prepared(&index, &disk, &n.to_be_bytes());
                index.remove(&n.to_be_bytes(), &pinned).unwrap();
            }
        }
        disk.checkpoint(&mut index);
        assert_eq!(index.len(), 1_000);
        assert_eq!(index.leaf_count(), 1_000usize.div_ceil(LEAF_MAX));
    }

    #[test]
    fn writes_outside_a_written_leaf_read_nothing_and_inside_need_it_loaded() {
        let disk = Disk::default();
        let mut index = Index::default();
        index.insert(b"b", slot(1), &Pinned::new()).unwrap();
        index.insert(b"d", slot(2), &Pinned::new()).unwrap();
        disk.checkpoint(&mut index);
        // Before its first key or past its last: nothing to look into.
        index.insert(b"a", slot(3), &Pinned::new()).unwrap();
        index.insert(b"e", slot(4), &Pinned::new()).unwrap();
        // Within it: refused, not guessed.
        assert!(index.insert(b"c", slot(5), &Pinned::new()).is_err());
        assert!(index.remove(b"b", &Pinned::new()).is_err());
        assert_eq!(index.len(), 4);
        let pinned = prepared(&index, &disk, b"c");
        assert_eq!(index.insert(b"c", slot(5), &pinned).unwrap(), None);
        assert_eq!(index.len(), 5);
    }
}
