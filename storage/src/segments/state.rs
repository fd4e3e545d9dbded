//! The engine's memory: an ordered index from every live key to where its value is, and the
//! table of segment files with how many of their bytes are still live.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

use super::frame::{self, FRAME_HEADER, MAGIC, Next};
use super::index::Index;
use crate::files::at;
use crate::raw::{Raw, Visit};
use crate::{Error, Result};

/// Values up to this size live in the index itself (counters, alarms, the alarm index's
/// empty values), so reading them costs no system call.
pub(crate) const INLINE: usize = 16;

/// Where a key's current value is: always a position in a segment file (so the cleaner can
/// tell whether a record it finds is the current one), plus the value itself when small.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) seg: u32,
    /// Byte offset of the value in the segment file.
    pub(crate) offset: u32,
    pub(crate) len: u32,
    inline: [u8; INLINE],
}

/// One segment file. Only the newest one is appended to; the others are sealed and change
/// only by being cleaned away as a whole.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) file: Arc<File>,
    /// Bytes of whole frames (the file's valid length).
    pub(crate) len: u64,
    /// Bytes of ops that are still current; `len - live` is garbage the cleaner can reclaim.
    pub(crate) live: u64,
    /// Bytes known to be on stable storage.
    pub(crate) synced: Arc<AtomicU64>,
}

/// Everything behind the engine's lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) index: Index,
    pub(crate) segments: BTreeMap<u32, Segment>,
    pub(crate) dir: PathBuf,
    /// A segment is sealed once a frame would take it past this size.
    pub(crate) segment_bytes: u64,
    pub(crate) live_bytes: u64,
    pub(crate) disk_bytes: u64,
    /// Set when a segment file is created or removed, so the next sync also makes the
    /// directory entry durable.
    pub(crate) dir_dirty: Arc<AtomicBool>,
}

/// The file name of segment `id`: fixed width so names sort like ids.
pub(crate) fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.seg"))
}

fn parse_segment_name(name: &str) -> Option<u32> {
    let id = name.strip_suffix(".seg")?;
    (id.len() == 10 && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| id.parse().ok())
        .flatten()
}

impl State {
    /// Rebuilds the index by replaying every segment in order. A torn frame at the end of
    /// the newest segment (a crash mid-write) is cut off; damage anywhere else is an error,
    /// because valid frames after it prove it was not a crash.
    pub(crate) fn recover(dir: &Path, segment_bytes: u64) -> Result<Self> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| at(dir, e))? {
            let entry = entry.map_err(|e| at(dir, e))?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_segment_name) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut state = Self {
            index: Index::default(),
            segments: BTreeMap::new(),
            dir: dir.to_owned(),
            segment_bytes,
            live_bytes: 0,
            disk_bytes: 0,
            dir_dirty: Arc::new(AtomicBool::new(false)),
        };
        for (i, &id) in ids.iter().enumerate() {
            state.replay(id, i + 1 == ids.len())?;
        }
        if state.segments.is_empty() {
            state.create_segment(1)?;
        }
        Ok(state)
    }

    fn replay(&mut self, id: u32, newest: bool) -> Result<()> {
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| at(&path, e))?;
        let file_len = file.metadata().map_err(|e| at(&path, e))?.len();
        if newest && file_len < MAGIC.len() as u64 {
            // Created, then the process died before the magic reached the file.
            file.set_len(0).map_err(|e| at(&path, e))?;
            file.write_all_at(MAGIC, 0).map_err(|e| at(&path, e))?;
            self.add_segment(id, file, MAGIC.len() as u64);
            return Ok(());
        }
        let reader_file = File::open(&path).map_err(|e| at(&path, e))?;
        let mut reader =
            frame::Reader::open(reader_file, file_len).map_err(|e| in_file(&path, e))?;
        self.add_segment(id, file, file_len);
        loop {
            match reader.next().map_err(|e| in_file(&path, e))? {
                Next::Frame { offset, payload } => self.index_frame(id, offset, &payload)?,
                Next::End => return Ok(()),
                Next::Damaged { offset, reason } if newest => {
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        reason,
                        "cutting off a torn write at the end of the newest segment"
                    );
                    let segment = self.segments.get_mut(&id).expect("added above");
                    segment.file.set_len(offset).map_err(|e| at(&path, e))?;
                    self.disk_bytes -= segment.len - offset;
                    segment.len = offset;
                    return Ok(());
                }
                Next::Damaged { offset, reason } => {
                    return Err(Error::Corrupt(format!(
                        "segment {} is damaged at byte {offset} ({reason}), and it is not the \
                         newest segment, so this is not a torn write from a crash; restore the \
                         data dir from a backup",
                        path.display()
                    )));
                }
            }
        }
    }

    fn add_segment(&mut self, id: u32, file: File, len: u64) {
        self.disk_bytes += len;
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len,
                live: 0,
                synced: Arc::new(AtomicU64::new(len)),
            },
        );
    }

    fn create_segment(&mut self, id: u32) -> Result<()> {
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| at(&path, e))?;
        if let Err(e) = file.write_all_at(MAGIC, 0) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(at(&path, e));
        }
        self.add_segment(id, file, MAGIC.len() as u64);
        if let Some(segment) = self.segments.get(&id) {
            segment.synced.store(0, Ordering::Release);
        }
        self.dir_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// The segment new frames go to.
    pub(crate) fn active(&self) -> u32 {
        self.segments.keys().next_back().copied().unwrap_or(0)
    }

    /// The oldest segment: the only one the cleaner may take, because no older segment can
    /// hold a record that one of its removes still has to hide.
    pub(crate) fn oldest(&self) -> u32 {
        self.segments.keys().next().copied().unwrap_or(0)
    }

    /// Seals the active segment and starts a new one.
    pub(crate) fn rotate(&mut self) -> Result<()> {
        let next = self.active().checked_add(1).ok_or_else(|| {
            Error::Engine("segment ids are exhausted; copy the data to a new data dir".into())
        })?;
        self.create_segment(next)
    }

    /// Appends a frame made by [`frame::encode`] and indexes its ops: the one way anything
    /// is written, by batches and by the cleaner alike. On error nothing is indexed and the
    /// file is cut back, so a failed write (a full disk) leaves no trace and the next write
    /// can succeed once there is room.
    pub(crate) fn write_frame(&mut self, frame: &[u8]) -> Result<()> {
        let len = frame.len() as u64;
        let active = self.active();
        let active_len = self.segments.get(&active).map_or(0, |s| s.len);
        if active_len > MAGIC.len() as u64 && active_len + len > self.segment_bytes {
            self.rotate()?;
        }
        let id = self.active();
        let segment = self
            .segments
            .get_mut(&id)
            .ok_or_else(|| Error::Engine("no active segment".into()))?;
        let offset = segment.len;
        if let Err(e) = segment.file.write_all_at(frame, offset) {
            let _ = segment.file.set_len(offset);
            return Err(at(&segment_path(&self.dir, id), e));
        }
        segment.len += len;
        self.disk_bytes += len;
        self.index_frame(id, offset, &frame[FRAME_HEADER as usize..])
    }

    /// Points the index at the ops of a frame at `offset` of segment `seg`, moving their
    /// footprint from the records they replace to this segment's live bytes.
    pub(crate) fn index_frame(&mut self, seg: u32, offset: u64, payload: &[u8]) -> Result<()> {
        let payload_at = offset + FRAME_HEADER;
        for op in frame::ops(payload) {
            let op = op?;
            let replaced = match op.value {
                Some(value) => {
                    let value_offset = payload_at + op.value_at as u64;
                    let slot = Slot {
                        seg,
                        offset: u32::try_from(value_offset).map_err(|_| {
                            Error::Corrupt(format!("segment {seg} is larger than 4 GiB"))
                        })?,
                        len: value.len() as u32,
                        inline: inline(value),
                    };
                    self.account(seg, op.footprint() as i64);
                    self.index.insert(op.key, slot)
                }
                None => self.index.remove(op.key),
            };
            if let Some(old) = replaced {
                let footprint = frame::footprint(op.key.len(), old.len as usize);
                self.account(old.seg, -(footprint as i64));
            }
        }
        Ok(())
    }

    fn account(&mut self, seg: u32, delta: i64) {
        if let Some(segment) = self.segments.get_mut(&seg) {
            segment.live = segment.live.saturating_add_signed(delta);
        }
        self.live_bytes = self.live_bytes.saturating_add_signed(delta);
    }

    /// The value a slot points at.
    pub(crate) fn value(&self, slot: &Slot) -> Result<Bytes> {
        let mut buf = Vec::new();
        self.read_into(slot, &mut buf)?;
        Ok(buf.into())
    }

    fn read_into(&self, slot: &Slot, buf: &mut Vec<u8>) -> Result<()> {
        let len = slot.len as usize;
        buf.clear();
        if len <= INLINE {
            buf.extend_from_slice(&slot.inline[..len]);
            return Ok(());
        }
        let segment = self.segments.get(&slot.seg).ok_or_else(|| {
            Error::Corrupt(format!(
                "index points into segment {} which is gone",
                slot.seg
            ))
        })?;
        buf.resize(len, 0);
        segment
            .file
            .read_exact_at(buf, u64::from(slot.offset))
            .map_err(|e| at(&segment_path(&self.dir, slot.seg), e))
    }

    /// True when the record of `key` at `offset` of segment `seg` is the current one.
    pub(crate) fn is_current(&self, key: &[u8], seg: u32, offset: u64) -> bool {
        self.index
            .get(key)
            .is_some_and(|slot| slot.seg == seg && u64::from(slot.offset) == offset)
    }
}

impl Slot {
    /// A slot that only carries `offset`, for tests of the index.
    #[cfg(test)]
    pub(crate) fn for_test(offset: u32) -> Self {
        Self {
            seg: 0,
            offset,
            len: 0,
            inline: [0; INLINE],
        }
    }
}

fn inline(value: &[u8]) -> [u8; INLINE] {
    let mut inline = [0; INLINE];
    if value.len() <= INLINE {
        inline[..value.len()].copy_from_slice(value);
    }
    inline
}

impl Raw for State {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.index.get(key).map(|slot| self.value(slot)).transpose()
    }

    fn scan_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        let range = self.index.range(start, end);
        let mut buf = Vec::new();
        let mut step = |k: &[u8], slot: &Slot| -> Result<bool> {
            self.read_into(slot, &mut buf)?;
            visit(k, &buf)
        };
        if reverse {
            for (k, slot) in range.rev() {
                if !step(k, slot)? {
                    break;
                }
            }
        } else {
            for (k, slot) in range {
                if !step(k, slot)? {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Adds the file name to an error found while reading it.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Corrupt(message) => Error::Corrupt(format!("{}: {message}", path.display())),
        Error::Io(io) => at(path, io),
        other => other,
    }
}
