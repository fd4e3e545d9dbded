//! The bytes of a segment file.
//!
//! A segment starts with an 8-byte [`MAGIC`], then holds frames back to back. A frame is one
//! applied [`crate::WriteBatch`] (or one batch of records moved by the cleaner), or one leaf
//! of the index written by a checkpoint (see `leaf`):
//!
//! ```text
//! frame:   payload_len: u32 LE | crc32(payload): u32 LE | payload
//! payload: op+ | leaf
//! op:      tag: u8 (1 put, 2 remove) | key_len: u32 LE | value_len: u32 LE | key | value
//! leaf:    3 | ... (see leaf.rs)
//! ```
//!
//! The checksum covers the whole payload, so a frame is applied entirely or not at all: a
//! torn write at the end of the newest segment (a crash mid-`write`) fails its checksum or
//! its length and is cut off on open. Lengths are little-endian because nothing sorts by
//! them; keys keep their own big-endian, byte-ordered encoding ([`crate::key`]).

use std::sync::Arc;

use crate::fs::FileIo;
use crate::{Error, Result};

/// Identifies a segment file (and its format version, the last byte) before anything in it
/// is trusted. Version 2 segments may hold index leaves; version 1 segments (written before
/// the paged index) hold only batches and are still read. A version 1 reader refuses a
/// version 2 segment by its magic instead of taking a leaf for a torn write.
pub(crate) const MAGIC: &[u8; 8] = b"DMSEG\x00\x00\x02";

/// The newest segment format this build reads and the one it writes.
const VERSION: u8 = 2;

/// Bytes before a frame's payload.
pub(crate) const FRAME_HEADER: u64 = 8;

/// Bytes of an op before its key.
pub(crate) const OP_HEADER: u64 = 9;

const PUT: u8 = 1;
const REMOVE: u8 = 2;

/// Frames larger than this are refused when written, and treated as damage when read: a
/// corrupt length must not make the reader allocate gigabytes.
pub(crate) const MAX_PAYLOAD: u64 = 1 << 30;

/// One record change inside a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Op<'p> {
    pub(crate) key: &'p [u8],
    /// `None` for a remove.
    pub(crate) value: Option<&'p [u8]>,
    /// Where the value starts, counted from the start of the payload.
    pub(crate) value_at: usize,
}

impl Op<'_> {
    /// The op's size in the file: what it adds to a segment's live bytes while current.
    pub(crate) fn footprint(&self) -> u64 {
        footprint(self.key.len(), self.value.map_or(0, <[u8]>::len))
    }
}

pub(crate) fn footprint(key_len: usize, value_len: usize) -> u64 {
    OP_HEADER + key_len as u64 + value_len as u64
}

/// Builds a frame from `(key, Some(value))` puts and `(key, None)` removes.
pub(crate) fn encode<'a>(
    ops: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> Result<Vec<u8>> {
    let mut frame = vec![0; FRAME_HEADER as usize];
    for (key, value) in ops {
        let (tag, value) = match value {
            Some(value) => (PUT, value),
            None => (REMOVE, &[][..]),
        };
        frame.push(tag);
        frame.extend_from_slice(&len_u32(key.len())?.to_le_bytes());
        frame.extend_from_slice(&len_u32(value.len())?.to_le_bytes());
        frame.extend_from_slice(key);
        frame.extend_from_slice(value);
    }
    seal(frame)
}

fn len_u32(len: usize) -> Result<u32> {
    u32::try_from(len).map_err(|_| Error::Engine(format!("a record of {len} bytes is too large")))
}

/// The ops of a payload whose checksum has been verified, in order.
pub(crate) fn ops(payload: &[u8]) -> impl Iterator<Item = Result<Op<'_>>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= payload.len() {
            return None;
        }
        let op = parse_op(payload, at);
        match &op {
            Ok((_, next)) => at = *next,
            Err(_) => at = payload.len(),
        }
        Some(op.map(|(op, _)| op))
    })
}

fn parse_op(payload: &[u8], at: usize) -> Result<(Op<'_>, usize)> {
    let bad = || Error::Corrupt(format!("segment frame has a malformed op at byte {at}"));
    let header = payload.get(at..at + OP_HEADER as usize).ok_or_else(bad)?;
    let tag = header[0];
    let key_len = u32::from_le_bytes(header[1..5].try_into().map_err(|_| bad())?) as usize;
    let value_len = u32::from_le_bytes(header[5..9].try_into().map_err(|_| bad())?) as usize;
    let key_at = at + OP_HEADER as usize;
    let value_at = key_at.checked_add(key_len).ok_or_else(bad)?;
    let end = value_at.checked_add(value_len).ok_or_else(bad)?;
    let key = payload.get(key_at..value_at).ok_or_else(bad)?;
    let value = payload.get(value_at..end).ok_or_else(bad)?;
    let value = match tag {
        PUT => Some(value),
        REMOVE if value_len == 0 => None,
        _ => return Err(bad()),
    };
    Ok((
        Op {
            key,
            value,
            value_at,
        },
        end,
    ))
}

/// What reading the next frame of a segment found.
#[derive(Debug)]
pub(crate) enum Next {
    /// A whole frame whose checksum matches, starting at `offset`.
    Frame { offset: u64, payload: Vec<u8> },
    /// The clean end of the segment.
    End,
    /// Something that is not a whole, valid frame starts at `offset`: a torn write at the
    /// tail of the newest segment, damage anywhere else.
    Damaged { offset: u64, reason: String },
}

/// How many bytes the reader asks the file for at once.
const READ_AHEAD: usize = 1 << 20;

/// Reads a segment's frames in order, from just after the magic to `end`, a megabyte at a
/// time.
#[derive(Debug)]
pub(crate) struct Reader {
    file: Arc<dyn FileIo>,
    at: u64,
    end: u64,
    /// Bytes of the file from `buf_at`.
    buf: Vec<u8>,
    buf_at: u64,
    /// The segment's format version, from its magic.
    pub(crate) version: u8,
}

impl Reader {
    /// Checks the magic and positions the reader at the first frame.
    pub(crate) fn open(file: Arc<dyn FileIo>, end: u64) -> Result<Self> {
        if end < MAGIC.len() as u64 {
            return Err(Error::Corrupt(
                "segment file is shorter than its header".into(),
            ));
        }
        let mut magic = [0; MAGIC.len()];
        file.read_at(&mut magic, 0)?;
        let Some(version) = magic_version(&magic) else {
            return Err(Error::Corrupt(
                "segment file does not start with the dormouse segment magic".into(),
            ));
        };
        Ok(Self {
            file,
            at: MAGIC.len() as u64,
            end,
            buf: Vec::new(),
            buf_at: 0,
            version,
        })
    }

    /// Starts at `offset` (a frame boundary found earlier) instead of the first frame.
    pub(crate) fn seek(&mut self, offset: u64) {
        self.at = offset;
    }

    /// Bytes `[at, at + len)` of the file, through the read-ahead buffer.
    fn bytes(&mut self, at: u64, len: usize) -> Result<&[u8]> {
        let buffered = at >= self.buf_at && at + len as u64 <= self.buf_at + self.buf.len() as u64;
        if !buffered {
            let want = len.max(READ_AHEAD).min((self.end - at) as usize).max(len);
            self.buf.resize(want, 0);
            self.file.read_at(&mut self.buf, at)?;
            self.buf_at = at;
        }
        let from = (at - self.buf_at) as usize;
        Ok(&self.buf[from..from + len])
    }

    /// The next frame, the end, or where the damage starts.
    pub(crate) fn next(&mut self) -> Result<Next> {
        let offset = self.at;
        if offset >= self.end {
            return Ok(Next::End);
        }
        let damaged = |reason: &str| Next::Damaged {
            offset,
            reason: reason.to_owned(),
        };
        if self.end - offset < FRAME_HEADER {
            return Ok(damaged("a frame header is cut short"));
        }
        let header = self.bytes(offset, FRAME_HEADER as usize)?;
        let len = u64::from(u32::from_le_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 {
            // Nothing writes an empty frame; zeros are what a file extended by a crash, but
            // never written, reads as.
            return Ok(damaged("an empty frame (zeroed bytes)"));
        }
        if len > MAX_PAYLOAD || len > self.end - offset - FRAME_HEADER {
            return Ok(damaged("a frame is longer than what follows it"));
        }
        let payload = self.bytes(offset + FRAME_HEADER, len as usize)?.to_vec();
        if crc32fast::hash(&payload) != crc {
            return Ok(damaged("a frame's checksum does not match"));
        }
        if !is_leaf(&payload)
            && let Some(Err(e)) = ops(&payload).find(Result::is_err)
        {
            return Ok(damaged(&e.to_string()));
        }
        self.at = offset + FRAME_HEADER + len;
        Ok(Next::Frame { offset, payload })
    }
}

/// The format version a magic names, if it is one of ours.
fn magic_version(magic: &[u8; 8]) -> Option<u8> {
    (magic[..7] == MAGIC[..7] && (1..=VERSION).contains(&magic[7])).then_some(magic[7])
}

/// The first byte of a leaf frame's payload. An ops payload starts with an op's tag
/// (`PUT` or `REMOVE`), so the two kinds never look alike.
pub(crate) const LEAF: u8 = 3;

/// True when a verified payload holds an index leaf rather than a batch of ops.
pub(crate) fn is_leaf(payload: &[u8]) -> bool {
    payload.first() == Some(&LEAF)
}

/// Wraps an encoded payload in a frame header.
pub(crate) fn seal(mut frame: Vec<u8>) -> Result<Vec<u8>> {
    let payload_len = frame.len() as u64 - FRAME_HEADER;
    if payload_len > MAX_PAYLOAD {
        return Err(Error::Engine(format!(
            "a batch of {payload_len} bytes is larger than the storage limit of {MAX_PAYLOAD}"
        )));
    }
    let crc = crc32fast::hash(&frame[FRAME_HEADER as usize..]);
    frame[..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip() {
        let frame = encode([(&b"k1"[..], Some(&b"value"[..])), (&b"k2"[..], None)]).unwrap();
        let payload = &frame[FRAME_HEADER as usize..];
        let ops: Vec<_> = ops(payload).collect::<Result<_>>().unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].key, b"k1");
        assert_eq!(ops[0].value, Some(&b"value"[..]));
        assert_eq!(&payload[ops[0].value_at..ops[0].value_at + 5], b"value");
        assert_eq!(ops[1].key, b"k2");
        assert_eq!(ops[1].value, None);
        assert_eq!(ops[0].footprint(), 9 + 2 + 5);
    }

    #[test]
    fn malformed_ops_are_errors_not_panics() {
        for payload in [
            &[1u8][..],
            &[1, 255, 255, 255, 255, 0, 0, 0, 0],
            &[9, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert!(ops(payload).any(|op| op.is_err()), "{payload:?}");
        }
    }
}
