//! The engine's in-memory index: every live key, in order, with where its value is.
//!
//! A two-level sorted structure (a list of sorted leaves of up to [`LEAF_MAX`] entries)
//! rather than `std`'s `BTreeMap`, for memory: its leaves are ~16 KiB allocations made with
//! their full capacity up front, and keys of up to [`INLINE_KEY`] bytes are stored inside
//! the entries, so an index of a million keys is a few thousand large allocations instead
//! of a few million small ones. That matters after a burst of activations: the index grows
//! while thousands of short-lived actors allocate and free small blocks, and small index
//! allocations scattered among them keep the allocator from returning the freed pages
//! (measured: RSS stayed ~120 MB above the live heap; docs/BENCHMARKS.md).

use std::cmp::Ordering;
use std::ops::Bound;

use super::state::Slot;

/// Key bytes stored in the entry itself; longer keys get their own allocation.
const INLINE_KEY: usize = 38;

/// Entries per leaf: 240 entries of 68 bytes is just under 16 KiB, one allocation that
/// never grows.
const LEAF_MAX: usize = 240;

/// A leaf shrunk below this merges with a neighbour when they fit together comfortably.
const LEAF_MIN: usize = LEAF_MAX / 4;

#[derive(Clone)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..key.len()].copy_from_slice(key);
            Self::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(key.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(key) => key,
        }
    }
}

type Entry = (Key, Slot);

/// The ordered map from keys to slots; see the module docs.
#[derive(Default)]
pub(crate) struct Index {
    /// Sorted, non-overlapping, each non-empty.
    leaves: Vec<Vec<Entry>>,
    len: usize,
}

fn new_leaf() -> Vec<Entry> {
    Vec::with_capacity(LEAF_MAX)
}

fn last_key(leaf: &[Entry]) -> &[u8] {
    leaf.last().map_or(&[], |(k, _)| k.as_slice())
}

impl Index {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes the index holds (leaves at their full capacity, plus long keys): what
    /// the engine's memory use is, for metrics and benchmarks. O(leaves).
    pub(crate) fn heap_bytes(&self) -> usize {
        let leaves = self.leaves.capacity() * std::mem::size_of::<Vec<Entry>>();
        let entries = self.leaves.len() * LEAF_MAX * std::mem::size_of::<Entry>();
        let long_keys: usize = self
            .leaves
            .iter()
            .flatten()
            .map(|(k, _)| match k {
                Key::Heap(key) => key.len(),
                Key::Inline { .. } => 0,
            })
            .sum();
        leaves + entries + long_keys
    }

    /// The leaf that holds `key` if anything does: the first whose last key is not below it.
    fn leaf_for(&self, key: &[u8]) -> usize {
        self.leaves.partition_point(|leaf| last_key(leaf) < key)
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Slot> {
        let leaf = self.leaves.get(self.leaf_for(key))?;
        let i = leaf.binary_search_by(|(k, _)| k.as_slice().cmp(key)).ok()?;
        Some(&leaf[i].1)
    }

    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Inserts or replaces; returns the slot replaced.
    pub(crate) fn insert(&mut self, key: &[u8], slot: Slot) -> Option<Slot> {
        if self.leaves.is_empty() {
            self.leaves.push(new_leaf());
        }
        let li = self.leaf_for(key).min(self.leaves.len() - 1);
        let leaf = &mut self.leaves[li];
        let i = match leaf.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
            Ok(i) => return Some(std::mem::replace(&mut leaf[i].1, slot)),
            Err(i) => i,
        };
        self.len += 1;
        if leaf.len() < LEAF_MAX {
            leaf.insert(i, (Key::new(key), slot));
            return None;
        }
        // Full. Before splitting, shift one entry into a neighbour with room, as a B*-tree
        // does: late arrivals (keys behind the front, from concurrent writers) would
        // otherwise split old leaves in half and leave them half empty for good.
        let entry = (Key::new(key), slot);
        if li + 1 < self.leaves.len() && self.leaves[li + 1].len() < LEAF_MAX {
            let moved = if i == LEAF_MAX {
                entry
            } else {
                let leaf = &mut self.leaves[li];
                let last = leaf.pop().expect("a full leaf");
                leaf.insert(i, entry);
                last
            };
            self.leaves[li + 1].insert(0, moved);
            return None;
        }
        if li > 0 && self.leaves[li - 1].len() < LEAF_MAX {
            let moved = if i == 0 {
                entry
            } else {
                let leaf = &mut self.leaves[li];
                let first = leaf.remove(0);
                leaf.insert(i - 1, entry);
                first
            };
            self.leaves[li - 1].push(moved);
            return None;
        }
        let leaf = &mut self.leaves[li];
        // Full: split. Keys mostly arrive in order (new objects and new log entries sort
        // after the ones before them, give or take concurrency), so an insert near the end
        // splits there, leaving the left leaf nearly full; a split in the middle would leave
        // every leaf behind the insertion point half empty for good.
        let split_at = if i >= LEAF_MAX * 3 / 4 {
            i
        } else {
            LEAF_MAX / 2
        };
        let mut right = new_leaf();
        right.extend(leaf.drain(split_at..));
        if i < split_at {
            leaf.insert(i, entry);
        } else {
            right.insert(i - split_at, entry);
        }
        self.leaves.insert(li + 1, right);
        None
    }

    /// Removes `key`; returns its slot.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Slot> {
        let li = self.leaf_for(key);
        let leaf = self.leaves.get_mut(li)?;
        let i = leaf.binary_search_by(|(k, _)| k.as_slice().cmp(key)).ok()?;
        let (_, slot) = leaf.remove(i);
        self.len -= 1;
        if leaf.is_empty() {
            self.leaves.remove(li);
        } else if leaf.len() < LEAF_MIN {
            self.merge_around(li);
        }
        Some(slot)
    }

    /// Merges leaf `li` into a neighbour when both fit in half a leaf, so deletions cannot
    /// leave the index as many nearly empty 16 KiB leaves.
    fn merge_around(&mut self, li: usize) {
        let fits = |a: usize, b: usize| a + b <= LEAF_MAX / 2;
        if li + 1 < self.leaves.len() && fits(self.leaves[li].len(), self.leaves[li + 1].len()) {
            let right = self.leaves.remove(li + 1);
            self.leaves[li].extend(right);
        } else if li > 0 && fits(self.leaves[li - 1].len(), self.leaves[li].len()) {
            let right = self.leaves.remove(li);
            self.leaves[li - 1].extend(right);
        }
    }

    /// Where a range bound falls, as (leaf, entry); `(leaves.len(), 0)` is the end.
    fn position(&self, bound: Bound<&[u8]>, is_start: bool) -> (usize, usize) {
        let (key, take_equal) = match bound {
            Bound::Unbounded if is_start => return (0, 0),
            Bound::Unbounded => return (self.leaves.len(), 0),
            // A start that includes the key, or an end that excludes it, is placed before
            // an equal key; the other two after it.
            Bound::Included(key) => (key, is_start),
            Bound::Excluded(key) => (key, !is_start),
        };
        let before = |k: &[u8]| match k.cmp(key) {
            Ordering::Less => true,
            Ordering::Equal => !take_equal,
            Ordering::Greater => false,
        };
        let li = self.leaves.partition_point(|leaf| before(last_key(leaf)));
        match self.leaves.get(li) {
            Some(leaf) => (li, leaf.partition_point(|(k, _)| before(k.as_slice()))),
            None => (li, 0),
        }
    }

    /// The entries with keys in `(start, end)`, in order (or reversed).
    pub(crate) fn range<'a>(
        &'a self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl DoubleEndedIterator<Item = (&'a [u8], &'a Slot)> + 'a {
        let lo = self.position(start, true);
        let hi = self.position(end, false).max(lo);
        let leaves = &self.leaves;
        (lo.0..leaves.len().min(hi.0 + 1)).flat_map(move |li| {
            let leaf = &leaves[li];
            let from = if li == lo.0 { lo.1 } else { 0 };
            let to = if li == hi.0 { hi.1 } else { leaf.len() };
            leaf[from..to].iter().map(|(k, slot)| (k.as_slice(), slot))
        })
    }
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("len", &self.len)
            .field("leaves", &self.leaves.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn slot(n: u32) -> Slot {
        Slot::for_test(n)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(Vec<u8>, u32),
        Remove(Vec<u8>),
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
            3 => (key(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => key().prop_map(Op::Remove),
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

    fn check_same(index: &Index, model: &BTreeMap<Vec<u8>, u32>) {
        assert_eq!(index.len(), model.len());
        let ours: Vec<_> = index
            .range(Bound::Unbounded, Bound::Unbounded)
            .map(|(k, s)| (k.to_vec(), s.offset))
            .collect();
        let theirs: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(ours, theirs);
        assert!(
            index
                .leaves
                .iter()
                .all(|leaf| !leaf.is_empty() && leaf.len() <= LEAF_MAX)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Behaves as a `BTreeMap` through any sequence of inserts and removes, including
        /// every kind of range, forwards and backwards.
        #[test]
        fn behaves_like_a_btreemap(
            ops in proptest::collection::vec(op(), 0..3000),
            ranges in proptest::collection::vec((a_bound(), a_bound()), 20),
        ) {
            let mut index = Index::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let old = index.insert(&k, slot(v)).map(|s| s.offset);
                        prop_assert_eq!(old, model.insert(k, v));
                    }
                    Op::Remove(k) => {
                        let old = index.remove(&k).map(|s| s.offset);
                        prop_assert_eq!(old, model.remove(&k));
                    }
                }
            }
            check_same(&index, &model);
            for (k, v) in &model {
                prop_assert_eq!(index.get(k).map(|s| s.offset), Some(*v));
            }
            for (start, end) in ranges {
                let empty = crate::raw::range_is_empty(bound(&start), bound(&end));
                let theirs: Vec<_> = if empty {
                    Vec::new()
                } else {
                    model.range::<[u8], _>((bound(&start), bound(&end))).map(|(k, v)| (k.clone(), *v)).collect()
                };
                let ours: Vec<_> = index.range(bound(&start), bound(&end)).map(|(k, s)| (k.to_vec(), s.offset)).collect();
                prop_assert_eq!(&ours, &theirs);
                let mut back: Vec<_> = index.range(bound(&start), bound(&end)).rev().map(|(k, s)| (k.to_vec(), s.offset)).collect();
                back.reverse();
                prop_assert_eq!(&back, &theirs);
            }
        }
    }

    #[test]
    fn in_order_inserts_fill_leaves_and_deletions_merge_them() {
        let mut index = Index::default();
        for n in 0..100_000u32 {
            index.insert(&n.to_be_bytes(), slot(n));
        }
        // Appending in order leaves every leaf but the last full.
        assert_eq!(index.leaves.len(), 100_000usize.div_ceil(LEAF_MAX));
        // Trimming from the front (the replay-buffer pattern) drops whole leaves.
        for n in 0..90_000u32 {
            index.remove(&n.to_be_bytes());
        }
        assert!(index.leaves.len() <= 10_000usize.div_ceil(LEAF_MAX) + 1);
        // Deleting most of every leaf merges them.
        for n in 90_000..100_000u32 {
            if n % 10 != 0 {
                index.remove(&n.to_be_bytes());
            }
        }
        assert_eq!(index.len(), 1_000);
        assert!(
            index.leaves.len() < 1_000 / LEAF_MIN + 2,
            "{}",
            index.leaves.len()
        );
    }
}
