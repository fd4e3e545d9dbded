//! The checkpoint file: where every index leaf was written, how many live bytes each segment
//! holds, and the position in the log from which a restart replays. Opening a data dir reads
//! this file and the log after that position, so start-up time follows the index's size and
//! what was written since the last checkpoint, not the data's size.
//!
//! ```text
//! file:    magic "DMCKPT\0\1" | payload_len: u64 LE | crc32(payload): u32 LE | payload
//! payload: replay_seg: u32 | replay_offset: u64 | segments: u32 | (seg: u32, live: u64)*
//!          | leaves: u32 | (first_len: u32, first, last_len: u32, last, len: u32, seg: u32,
//!            offset: u32, frame_len: u32)*
//! ```
//!
//! It is replaced atomically: written to `checkpoint.tmp`, synced, renamed over
//! `checkpoint`, and the directory synced. A checkpoint is only written once every leaf it
//! names is on disk, and a segment is only deleted once a durable checkpoint no longer names
//! it, so whichever checkpoint a crash leaves is complete.

use std::path::{Path, PathBuf};

use super::index::{Loc, RootLeaf};
use crate::files::at;
use crate::fs::Fs;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"DMCKPT\x00\x01";
const HEADER: usize = 8 + 8 + 4;

/// A position in the log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub(crate) seg: u32,
    pub(crate) offset: u64,
}

/// What a checkpoint records.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub(crate) replay_from: Option<Position>,
    pub(crate) live: Vec<(u32, u64)>,
    pub(crate) root: Vec<RootLeaf<Vec<u8>>>,
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

fn tmp_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.tmp")
}

/// The file's bytes for a checkpoint.
pub(crate) fn encode(
    replay_from: Position,
    live: impl ExactSizeIterator<Item = (u32, u64)>,
    root: &[RootLeaf<&[u8]>],
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(16 + live.len() * 12 + root.len() * 60);
    payload.extend_from_slice(&replay_from.seg.to_le_bytes());
    payload.extend_from_slice(&replay_from.offset.to_le_bytes());
    payload.extend_from_slice(&(live.len() as u32).to_le_bytes());
    for (seg, bytes) in live {
        payload.extend_from_slice(&seg.to_le_bytes());
        payload.extend_from_slice(&bytes.to_le_bytes());
    }
    payload.extend_from_slice(&(root.len() as u32).to_le_bytes());
    for leaf in root {
        for key in [leaf.first, leaf.last] {
            payload.extend_from_slice(&(key.len() as u32).to_le_bytes());
            payload.extend_from_slice(key);
        }
        payload.extend_from_slice(&leaf.len.to_le_bytes());
        payload.extend_from_slice(&leaf.loc.seg.to_le_bytes());
        payload.extend_from_slice(&leaf.loc.offset.to_le_bytes());
        payload.extend_from_slice(&leaf.loc.len.to_le_bytes());
    }
    let mut file = Vec::with_capacity(HEADER + payload.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    file.extend_from_slice(&payload);
    file
}

/// Decodes a checkpoint file; every way it can be wrong is an error naming the file.
pub(crate) fn decode(file: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let bad = |what: &str| {
        Error::Corrupt(format!(
            "checkpoint {} is damaged ({what}); restore the data dir from a backup",
            file.display()
        ))
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("no checkpoint header"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| bad("header"))?);
    let crc = u32::from_le_bytes(bytes[16..20].try_into().map_err(|_| bad("header"))?);
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(bad("its length does not match its header"));
    }
    if crc32fast::hash(payload) != crc {
        return Err(bad("its checksum does not match"));
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let end = at
            .checked_add(n)
            .filter(|end| *end <= payload.len())
            .ok_or_else(|| bad("it is cut short"))?;
        let out = &payload[at..end];
        at = end;
        Ok(out)
    };
    fn u32_of(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn u64_of(b: &[u8]) -> u64 {
        let mut a = [0; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_le_bytes(a)
    }
    let replay_seg = u32_of(take(4)?);
    let replay_offset = u64_of(take(8)?);
    let segments = u32_of(take(4)?) as usize;
    let mut live = Vec::with_capacity(segments.min(1 << 20));
    for _ in 0..segments {
        let seg = u32_of(take(4)?);
        let bytes = u64_of(take(8)?);
        live.push((seg, bytes));
    }
    let leaves = u32_of(take(4)?) as usize;
    let mut root = Vec::with_capacity(leaves.min(1 << 20));
    let mut previous: Option<Vec<u8>> = None;
    for _ in 0..leaves {
        let first_len = u32_of(take(4)?) as usize;
        let first = take(first_len)?.to_vec();
        let last_len = u32_of(take(4)?) as usize;
        let last = take(last_len)?.to_vec();
        let len = u32_of(take(4)?);
        let seg = u32_of(take(4)?);
        let offset = u32_of(take(4)?);
        let frame_len = u32_of(take(4)?);
        if len == 0 || first > last || previous.as_ref().is_some_and(|p| *p >= first) {
            return Err(bad("its leaves are empty or out of order"));
        }
        previous = Some(last.clone());
        root.push(RootLeaf {
            first,
            last,
            len,
            loc: Loc {
                seg,
                offset,
                len: frame_len,
            },
        });
    }
    if at != payload.len() {
        return Err(bad("bytes follow its last leaf"));
    }
    Ok(Checkpoint {
        replay_from: Some(Position {
            seg: replay_seg,
            offset: replay_offset,
        }),
        live,
        root,
    })
}

/// Reads the data dir's checkpoint, if it has one.
pub(crate) fn read(fs: &dyn Fs, dir: &Path) -> Result<Option<Checkpoint>> {
    let path = path(dir);
    if !fs.exists(&path) {
        return Ok(None);
    }
    let file = fs.open(&path, false).map_err(|e| at(&path, e))?;
    let len = file.len().map_err(|e| at(&path, e))?;
    let mut bytes =
        vec![0; usize::try_from(len).map_err(|_| Error::Corrupt("checkpoint too large".into()))?];
    file.read_at(&mut bytes, 0).map_err(|e| at(&path, e))?;
    decode(&path, &bytes).map(Some)
}

/// Replaces the checkpoint with `bytes`, durably; every leaf and segment it names must be
/// durable already.
pub(crate) fn write(fs: &dyn Fs, dir: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(dir);
    if fs.exists(&tmp) {
        fs.remove(&tmp).map_err(|e| at(&tmp, e))?;
    }
    let file = fs.open(&tmp, true).map_err(|e| at(&tmp, e))?;
    file.write_at(bytes, 0).map_err(|e| at(&tmp, e))?;
    file.sync_data().map_err(|e| at(&tmp, e))?;
    drop(file);
    let path = path(dir);
    fs.rename(&tmp, &path).map_err(|e| at(&path, e))?;
    fs.sync_dir(dir).map_err(|e| at(dir, e))
}

/// Removes a `checkpoint.tmp` a crash left behind.
pub(crate) fn remove_leftover(fs: &dyn Fs, dir: &Path) -> Result<()> {
    let tmp = tmp_path(dir);
    if fs.exists(&tmp) {
        fs.remove(&tmp).map_err(|e| at(&tmp, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let loc = Loc {
            seg: 3,
            offset: 100,
            len: 50,
        };
        let root = vec![
            RootLeaf {
                first: &b"ab"[..],
                last: &b"abc"[..],
                len: 10,
                loc,
            },
            RootLeaf {
                first: &b"abd"[..],
                last: &b"abd"[..],
                len: 3,
                loc,
            },
        ];
        let bytes = encode(
            Position { seg: 4, offset: 8 },
            [(3u32, 99u64), (4, 7)].into_iter(),
            &root,
        );
        let decoded = decode(Path::new("c"), &bytes).unwrap();
        assert_eq!(decoded.replay_from, Some(Position { seg: 4, offset: 8 }));
        assert_eq!(decoded.live, vec![(3, 99), (4, 7)]);
        assert_eq!(decoded.root.len(), 2);
        assert_eq!(decoded.root[1].last, b"abd");
        assert_eq!(decoded.root[0].first, b"ab");
        for cut in 0..bytes.len() {
            assert!(decode(Path::new("c"), &bytes[..cut]).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(decode(Path::new("c"), &flipped).is_err());
    }
}
