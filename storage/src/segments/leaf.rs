//! One leaf of the index: up to [`LEAF_MAX`] keys in order, each with the [`Slot`] that says
//! where its value is, and the bytes a leaf is written as when a checkpoint persists it.
//!
//! ```text
//! leaf payload: 3 | count: u32 LE | entry*
//! entry:        shared: u16 LE | suffix_len: u32 LE | suffix | seg: u32 LE | offset: u32 LE
//!               | len: u32 LE | value (len bytes) when len <= INLINE, else crc32(value): u32 LE
//! ```
//!
//! `shared` is how many leading bytes the key has in common with the previous one: keys of
//! one object share their whole prefix, so a log entry's key costs its 8-byte sequence or
//! less. Decoding trusts nothing: a leaf whose checksum matched but whose contents do not
//! decode, or are out of order, is an error, never a panic.

use super::frame::LEAF;
use crate::{Error, Result};

/// Key bytes stored in the entry itself; longer keys get their own allocation.
const INLINE_KEY: usize = 38;

/// Entries per leaf: 240 entries of 72 bytes is just under 17 KiB, one allocation that
/// never grows while the leaf is being changed.
pub(crate) const LEAF_MAX: usize = 240;

/// Values up to this size live in the slot itself (counters, alarms, the alarm index's
/// empty values), so reading them costs no system call.
pub(crate) const INLINE: usize = 16;

/// A key, stored inline when short.
#[derive(Clone)]
pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl Key {
    pub(crate) fn new(key: &[u8]) -> Self {
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

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(key) => key,
        }
    }

    /// Heap bytes beyond the entry itself.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Self::Heap(key) => key.len(),
            Self::Inline { .. } => 0,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Byte order, the order of the key space.
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

/// So ordered maps of keys can be searched with plain byte slices.
impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_slice().escape_ascii())
    }
}

/// Where a key's current value is: always a position in a segment file (so the cleaner can
/// tell whether a record it finds is the current one), plus the value itself when small,
/// or its checksum when not: a value is read on its own, without the frame whose checksum
/// covered it when written, and damage must never read back as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) seg: u32,
    /// Byte offset of the value in the segment file.
    pub(crate) offset: u32,
    pub(crate) len: u32,
    /// crc32 of the value, when it is not inline.
    pub(crate) crc: u32,
    pub(crate) inline: [u8; INLINE],
}

impl Slot {
    pub(crate) fn new(seg: u32, offset: u32, value: &[u8]) -> Self {
        let mut inline = [0; INLINE];
        let crc = if value.len() <= INLINE {
            inline[..value.len()].copy_from_slice(value);
            0
        } else {
            crc32fast::hash(value)
        };
        Self {
            seg,
            offset,
            len: value.len() as u32,
            crc,
            inline,
        }
    }

    /// The value, when it is small enough to live in the slot.
    pub(crate) fn inline_value(&self) -> Option<&[u8]> {
        let len = self.len as usize;
        (len <= INLINE).then(|| &self.inline[..len])
    }

    /// A slot that only carries `offset`, for tests of the index.
    #[cfg(test)]
    pub(crate) fn for_test(offset: u32) -> Self {
        Self::new(0, offset, &[])
    }
}

pub(crate) type Entry = (Key, Slot);

/// A leaf's entries, sorted by key.
pub(crate) type Leaf = Vec<Entry>;

/// The frame payload of a leaf (see the module docs), preceded by room for the frame header.
pub(crate) fn encode(leaf: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 5 + leaf.len() * 24);
    out.extend_from_slice(&[0; 8]);
    out.push(LEAF);
    out.extend_from_slice(&(leaf.len() as u32).to_le_bytes());
    let mut previous: &[u8] = &[];
    for (key, slot) in leaf {
        let key = key.as_slice();
        let shared = previous
            .iter()
            .zip(key)
            .take_while(|(a, b)| a == b)
            .count()
            .min(usize::from(u16::MAX));
        let suffix = &key[shared..];
        out.extend_from_slice(&(shared as u16).to_le_bytes());
        out.extend_from_slice(&(suffix.len() as u32).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(&slot.seg.to_le_bytes());
        out.extend_from_slice(&slot.offset.to_le_bytes());
        out.extend_from_slice(&slot.len.to_le_bytes());
        match slot.inline_value() {
            Some(value) => out.extend_from_slice(value),
            None => out.extend_from_slice(&slot.crc.to_le_bytes()),
        }
        previous = key;
    }
    out
}

/// Reads a leaf payload back, checking everything a damaged or foreign payload could get
/// wrong.
pub(crate) fn decode(payload: &[u8]) -> Result<Leaf> {
    let mut input = Input { payload, at: 0 };
    if input.take(1)? != [LEAF] {
        return Err(input.bad("it is not a leaf"));
    }
    let count = input.u32()? as usize;
    if count == 0 || count > LEAF_MAX {
        return Err(input.bad(&format!("it claims {count} entries")));
    }
    let mut leaf = Vec::with_capacity(count);
    let mut key = Vec::new();
    for _ in 0..count {
        let shared = usize::from(input.u16()?);
        let suffix_len = input.u32()? as usize;
        if shared > key.len() {
            return Err(input.bad("a key shares more than the previous key has"));
        }
        key.truncate(shared);
        key.extend_from_slice(input.take(suffix_len)?);
        let seg = input.u32()?;
        let offset = input.u32()?;
        let len = input.u32()?;
        let mut slot = if len as usize <= INLINE {
            Slot::new(seg, offset, input.take(len as usize)?)
        } else {
            let mut slot = Slot::new(seg, offset, &[]);
            slot.len = len;
            slot.crc = input.u32()?;
            slot
        };
        slot.len = len;
        if let Some((previous, _)) = leaf.last()
            && Key::as_slice(previous) >= key.as_slice()
        {
            return Err(input.bad("its keys are out of order"));
        }
        leaf.push((Key::new(&key), slot));
    }
    if input.at != payload.len() {
        return Err(input.bad("bytes follow its last entry"));
    }
    Ok(leaf)
}

struct Input<'p> {
    payload: &'p [u8],
    at: usize,
}

impl<'p> Input<'p> {
    fn bad(&self, what: &str) -> Error {
        Error::Corrupt(format!(
            "an index leaf does not decode at byte {} of its payload: {what}",
            self.at
        ))
    }

    fn take(&mut self, len: usize) -> Result<&'p [u8]> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.payload.len())
            .ok_or_else(|| self.bad("it is cut short"))?;
        let bytes = &self.payload[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(keys: &[&[u8]]) -> Leaf {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let value = vec![i as u8; i * 3];
                (Key::new(k), Slot::new(7, 1000 + i as u32, &value))
            })
            .collect()
    }

    #[test]
    fn round_trips_with_shared_prefixes_and_inline_values() {
        let long = [b'x'; 70];
        let original = leaf(&[b"a", b"abc", b"abd", b"b", &long, b"zz"]);
        let frame = encode(&original);
        let decoded = decode(&frame[8..]).unwrap();
        assert_eq!(decoded.len(), original.len());
        for ((k1, s1), (k2, s2)) in original.iter().zip(&decoded) {
            assert_eq!(k1.as_slice(), k2.as_slice());
            assert_eq!(s1, s2);
        }
    }

    #[test]
    fn damaged_payloads_are_errors_not_panics() {
        let frame = encode(&leaf(&[b"a", b"ab", b"b"]));
        let payload = &frame[8..];
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = payload.to_vec();
        for i in 1..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = decode(&flipped);
            flipped[i] ^= 0xff;
        }
        let unordered = encode(&leaf(&[b"b", b"a"]));
        assert!(decode(&unordered[8..]).is_err());
    }
}
