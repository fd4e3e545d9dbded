//! Everything behind the engine's lock: the table of segment files with how many of their
//! bytes are still live, the index, and the cache of clean leaves; how a frame is appended
//! and indexed, how dirty leaves are written for a checkpoint, and how a data dir is
//! recovered from its last checkpoint and the log after it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::checkpoint::{self, Position};
use super::frame::{self, FRAME_HEADER, MAGIC, Next};
use super::index::{Index, Load, Loc, Pinned, RootLeaf};
use super::leaf::{self, Entry, Leaf, Slot};

use crate::files::at;
use crate::fs::{FileIo, Fs};
use crate::raw::{Raw, SizeVisit, Visit};
use crate::{Error, Result};

/// One segment file. Only the newest one is appended to; the others are sealed and change
/// only by being cleaned away as a whole.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) file: Arc<dyn FileIo>,
    /// Bytes of whole frames (the file's valid length).
    pub(crate) len: u64,
    /// Bytes of ops and leaves that are still current; `len - live` is garbage the cleaner
    /// can reclaim.
    pub(crate) live: u64,
    /// Bytes known to be on stable storage.
    pub(crate) synced: Arc<AtomicU64>,
    /// The format version of its magic; leaves are only ever written to version 2.
    version: u8,
}

/// Sizes the engine is opened with that the state needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A segment is sealed once a frame would take it past this size.
    pub(crate) segment_bytes: u64,
    /// Clean leaves kept in memory, in bytes.
    pub(crate) cache_bytes: usize,
    /// Changed keys that make recovery write a checkpoint before replaying further.
    pub(crate) changes: usize,
}

/// Everything behind the engine's lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) index: Index,
    pub(crate) segments: BTreeMap<u32, Segment>,
    pub(crate) dir: PathBuf,
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) limits: Limits,
    pub(crate) live_bytes: u64,
    pub(crate) disk_bytes: u64,
    /// Bytes appended since the last checkpoint: what a restart now would replay.
    pub(crate) since_checkpoint: u64,
    /// Set when a segment file is created or removed, so the next sync also makes the
    /// directory entry durable.
    pub(crate) dir_dirty: Arc<AtomicBool>,
    pub(crate) cache: LeafCache,
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

/// A segment file with unsynced bytes, for a sync that runs outside the lock.
pub(crate) type Pending = (u32, Arc<dyn FileIo>, u64, Arc<AtomicU64>);

impl State {
    fn empty(fs: Arc<dyn Fs>, dir: &Path, limits: Limits) -> Self {
        Self {
            index: Index::default(),
            segments: BTreeMap::new(),
            dir: dir.to_owned(),
            fs,
            limits,
            live_bytes: 0,
            disk_bytes: 0,
            since_checkpoint: 0,
            dir_dirty: Arc::new(AtomicBool::new(false)),
            cache: LeafCache::new(limits.cache_bytes),
        }
    }

    /// Opens the segments of `dir`: loads the checkpoint's index, replays the log after it,
    /// cuts a torn write off the newest segment. A data dir without a checkpoint (new, or
    /// written before checkpoints existed) is replayed from its first segment, writing
    /// checkpoints as it goes so its dirty leaves stay within `limits`.
    pub(crate) fn recover(fs: Arc<dyn Fs>, dir: &Path, limits: Limits) -> Result<Self> {
        checkpoint::remove_leftover(&*fs, dir)?;
        let mut ids: Vec<u32> = fs
            .list(dir)
            .map_err(|e| at(dir, e))?
            .iter()
            .filter_map(|name| parse_segment_name(name))
            .collect();
        ids.sort_unstable();
        let mut state = Self::empty(fs, dir, limits);
        let Some(&newest) = ids.last() else {
            state.create_segment(1)?;
            return Ok(state);
        };
        for &id in &ids {
            state.open_segment(id, id == newest)?;
        }
        let saved = checkpoint::read(&*state.fs, dir)?;
        let start = match saved {
            Some(saved) => state.load_checkpoint(saved)?,
            None => Position {
                seg: ids[0],
                offset: MAGIC.len() as u64,
            },
        };
        let old_format = state.segments.get(&newest).is_some_and(|s| s.version < 2);
        if start.seg < newest || old_format {
            // Replay may write a checkpoint before it reaches the newest segment, which
            // appends to the log: its valid end must be known first.
            state.find_end(newest)?;
        }
        if old_format {
            // Leaves must never land in a version 1 segment, which an older build would
            // take for a torn write and cut off: new frames go to a version 2 segment.
            state.rotate()?;
        }
        state.replay(start, newest)?;
        Ok(state)
    }

    fn open_segment(&mut self, id: u32, newest: bool) -> Result<()> {
        let path = segment_path(&self.dir, id);
        let file = self.fs.open(&path, false).map_err(|e| at(&path, e))?;
        let len = file.len().map_err(|e| at(&path, e))?;
        if newest {
            let mut magic = [0; MAGIC.len()];
            let unwritten = len < MAGIC.len() as u64 || {
                file.read_at(&mut magic, 0).map_err(|e| at(&path, e))?;
                magic == [0; MAGIC.len()]
            };
            if unwritten {
                // Its magic never reached the disk (the process died right after creating
                // it, or the power went before anything in it was synced: a sync covers
                // the whole file, and the magic is written first), so nothing in it was
                // ever acknowledged: start it over.
                tracing::warn!(segment = %path.display(), "starting over a segment whose first bytes never reached the disk");
                file.set_len(0).map_err(|e| at(&path, e))?;
                file.write_at(MAGIC, 0).map_err(|e| at(&path, e))?;
                self.add_segment(id, file, MAGIC.len() as u64, 2);
                if let Some(segment) = self.segments.get(&id) {
                    segment.synced.store(0, Ordering::Release);
                }
                return Ok(());
            }
        }
        let reader = frame::Reader::open(Arc::clone(&file), len).map_err(|e| in_file(&path, e))?;
        self.add_segment(id, file, len, reader.version);
        Ok(())
    }

    /// Installs a checkpoint's index and live counts; returns where replay starts.
    fn load_checkpoint(&mut self, saved: checkpoint::Checkpoint) -> Result<Position> {
        let path = checkpoint::path(&self.dir);
        let missing = |what: String| {
            Error::Corrupt(format!(
                "checkpoint {} names {what}, which is missing; restore the data dir from a \
                 backup",
                path.display()
            ))
        };
        let start = saved
            .replay_from
            .ok_or_else(|| missing("no replay position".into()))?;
        match self.segments.get(&start.seg) {
            Some(segment) if start.offset <= segment.len => {}
            _ => {
                return Err(missing(format!(
                    "segment {} up to byte {}",
                    start.seg, start.offset
                )));
            }
        }
        for leaf in &saved.root {
            let loc = leaf.loc;
            let end = u64::from(loc.offset) + u64::from(loc.len);
            if self.segments.get(&loc.seg).is_none_or(|s| end > s.len) {
                return Err(missing(format!(
                    "an index leaf at byte {} of segment {}",
                    loc.offset, loc.seg
                )));
            }
        }
        let known: HashMap<u32, u64> = saved.live.iter().copied().collect();
        // A segment older than the replay position that the checkpoint does not know was
        // deleted before it, and came back because its removal was not yet durable when
        // the power went: it holds nothing current.
        let resurrected: Vec<u32> = self
            .segments
            .keys()
            .copied()
            .filter(|id| *id < start.seg && !known.contains_key(id))
            .collect();
        for id in resurrected {
            if let Some(segment) = self.segments.remove(&id) {
                self.disk_bytes -= segment.len;
            }
            let path = segment_path(&self.dir, id);
            self.fs.remove(&path).map_err(|e| at(&path, e))?;
            self.dir_dirty.store(true, Ordering::Release);
        }
        for (id, live) in saved.live {
            if let Some(segment) = self.segments.get_mut(&id) {
                segment.live = live;
                self.live_bytes += live;
            }
        }
        self.index = Index::from_root(saved.root);
        Ok(start)
    }

    /// Reads the newest segment to its last whole frame and cuts anything after it.
    fn find_end(&mut self, id: u32) -> Result<()> {
        let (file, len) = match self.segments.get(&id) {
            Some(s) => (Arc::clone(&s.file), s.len),
            None => return Ok(()),
        };
        let path = segment_path(&self.dir, id);
        let mut reader = frame::Reader::open(file, len).map_err(|e| in_file(&path, e))?;
        loop {
            match reader.next().map_err(|e| in_file(&path, e))? {
                Next::Frame { .. } => {}
                Next::End => return Ok(()),
                Next::Damaged { offset, reason } => return self.cut(id, offset, &reason),
            }
        }
    }

    /// Cuts a torn write off the end of the newest segment.
    fn cut(&mut self, id: u32, offset: u64, reason: &str) -> Result<()> {
        let path = segment_path(&self.dir, id);
        tracing::warn!(
            segment = %path.display(),
            offset,
            reason,
            "cutting off a torn write at the end of the newest segment"
        );
        let segment = self
            .segments
            .get_mut(&id)
            .ok_or_else(|| Error::Engine("no such segment".into()))?;
        segment.file.set_len(offset).map_err(|e| at(&path, e))?;
        segment.file.sync_data().map_err(|e| at(&path, e))?;
        self.disk_bytes -= segment.len - offset;
        segment.len = offset;
        segment.synced.store(offset, Ordering::Release);
        Ok(())
    }

    /// Replays every batch from `start` to the end of the log into the index.
    fn replay(&mut self, start: Position, newest: u32) -> Result<()> {
        let ids: Vec<u32> = self
            .segments
            .range(start.seg..)
            .map(|(id, _)| *id)
            .collect();
        let checkpoints_allowed = start.seg < newest;
        for id in ids {
            let path = segment_path(&self.dir, id);
            let (file, len) = match self.segments.get(&id) {
                Some(s) => (Arc::clone(&s.file), s.len),
                None => continue,
            };
            let mut reader = frame::Reader::open(file, len).map_err(|e| in_file(&path, e))?;
            if id == start.seg {
                reader.seek(start.offset);
            }
            loop {
                match reader.next().map_err(|e| in_file(&path, e))? {
                    Next::Frame { offset, payload } => {
                        let end = offset + FRAME_HEADER + payload.len() as u64;
                        if !frame::is_leaf(&payload) {
                            // Leaves after the checkpoint belong to one that never
                            // completed: nothing references them.
                            self.since_checkpoint += end - offset;
                            self.replay_frame(id, offset, &payload)?;
                        }
                        if checkpoints_allowed
                            && id < newest
                            && self.index.change_count() > self.limits.changes
                        {
                            self.checkpoint_while_recovering(Position {
                                seg: id,
                                offset: end,
                            })?;
                        }
                    }
                    Next::End => break,
                    Next::Damaged { offset, reason } if id == newest => {
                        self.cut(id, offset, &reason)?;
                        break;
                    }
                    Next::Damaged { offset, reason } => {
                        return Err(Error::Corrupt(format!(
                            "segment {} is damaged at byte {offset} ({reason}), and it is not \
                             the newest segment, so this is not a torn write from a crash; \
                             restore the data dir from a backup",
                            path.display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn replay_frame(&mut self, seg: u32, offset: u64, payload: &[u8]) -> Result<()> {
        let path = segment_path(&self.dir, seg);
        let pinned = self
            .prepare_payload(payload)
            .map_err(|e| in_file(&path, e))?;
        self.index_frame(seg, offset, payload, &pinned)
    }

    /// Writes a checkpoint in the middle of recovery: everything up to `replay_from` is in
    /// the index.
    fn checkpoint_while_recovering(&mut self, replay_from: Position) -> Result<()> {
        let bytes = self.prepare_checkpoint(Some(replay_from))?;
        let pending = self.pending(false);
        sync_files(&*self.fs, &self.dir, pending, &self.dir_dirty)?;
        checkpoint::write(&*self.fs, &self.dir, &bytes)?;
        self.since_checkpoint = 0;
        Ok(())
    }

    fn add_segment(&mut self, id: u32, file: Arc<dyn FileIo>, len: u64, version: u8) {
        self.disk_bytes += len;
        self.segments.insert(
            id,
            Segment {
                file,
                len,
                live: 0,
                synced: Arc::new(AtomicU64::new(len)),
                version,
            },
        );
    }

    fn create_segment(&mut self, id: u32) -> Result<()> {
        let path = segment_path(&self.dir, id);
        let file = self.fs.open(&path, true).map_err(|e| at(&path, e))?;
        if let Err(e) = file.write_at(MAGIC, 0) {
            drop(file);
            let _ = self.fs.remove(&path);
            return Err(at(&path, e));
        }
        self.add_segment(id, file, MAGIC.len() as u64, 2);
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

    /// The end of the log: where the next frame goes.
    pub(crate) fn end(&self) -> Position {
        let seg = self.active();
        Position {
            seg,
            offset: self.segments.get(&seg).map_or(0, |s| s.len),
        }
    }

    /// Seals the active segment and starts a new one. The sealed segment is synced first,
    /// and the new one's directory entry after: after a power loss only the newest segment
    /// may end in a torn write (a torn write anywhere else is damage, never something to
    /// cut), and no segment can survive one created before it, so the log that survives is
    /// always a prefix of the log written.
    pub(crate) fn rotate(&mut self) -> Result<()> {
        let active = self.active();
        let next = active.checked_add(1).ok_or_else(|| {
            Error::Engine("segment ids are exhausted; copy the data to a new data dir".into())
        })?;
        if let Some(segment) = self.segments.get(&active)
            && segment.synced.load(Ordering::Acquire) < segment.len
        {
            let path = segment_path(&self.dir, active);
            segment
                .file
                .sync_data()
                .map_err(|e| Error::Failed(at(&path, e).to_string()))?;
            segment.synced.fetch_max(segment.len, Ordering::AcqRel);
        }
        self.create_segment(next)?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::Failed(at(&self.dir, e).to_string()))?;
        self.dir_dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// Appends a whole frame to the log; returns where it starts. On error the file is cut
    /// back, so a failed write (a full disk) leaves no trace and the next write can succeed
    /// once there is room.
    fn append(&mut self, frame: &[u8]) -> Result<(u32, u64)> {
        let len = frame.len() as u64;
        let active = self.active();
        let active_len = self.segments.get(&active).map_or(0, |s| s.len);
        if active_len > MAGIC.len() as u64 && active_len + len > self.limits.segment_bytes {
            self.rotate()?;
        }
        let id = self.active();
        let segment = self
            .segments
            .get_mut(&id)
            .ok_or_else(|| Error::Engine("no active segment".into()))?;
        let offset = segment.len;
        if let Err(e) = segment.file.write_at(frame, offset) {
            let _ = segment.file.set_len(offset);
            return Err(at(&segment_path(&self.dir, id), e));
        }
        segment.len += len;
        self.disk_bytes += len;
        self.since_checkpoint += len;
        Ok((id, offset))
    }

    /// Loads the leaves a batch payload's ops will change.
    pub(crate) fn prepare_payload(&self, payload: &[u8]) -> Result<Pinned> {
        let keys = frame::ops(payload)
            .map(|op| op.map(|op| op.key))
            .collect::<Result<Vec<_>>>()?;
        self.prepare_keys(keys)
    }

    /// Loads the leaves writes of `keys` will change.
    pub(crate) fn prepare_keys<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Result<Pinned> {
        let mut pinned = Pinned::new();
        self.index.prepare(keys, self, &mut pinned)?;
        Ok(pinned)
    }

    /// Appends a batch frame made by [`frame::encode`] and indexes its ops: the one way
    /// records are written, by batches and by the cleaner alike. `pinned` must come from
    /// [`State::prepare_keys`] for the frame's keys, so indexing reads no file.
    ///
    /// A failure to index after the frame reached its file is [`Error::Failed`]: the index
    /// no longer matches the log, so the store must stop writing until a restart replays it.
    pub(crate) fn write_frame(&mut self, frame: &[u8], pinned: &Pinned) -> Result<()> {
        let (id, offset) = self.append(frame)?;
        self.index_frame(id, offset, &frame[FRAME_HEADER as usize..], pinned)
            .map_err(|e| {
                Error::Failed(format!(
                    "the index could not follow a write to segment {id} at byte {offset}: {e}"
                ))
            })
    }

    /// Points the index at the ops of a frame at `offset` of segment `seg`, moving their
    /// footprint from the records they replace to this segment's live bytes.
    fn index_frame(
        &mut self,
        seg: u32,
        offset: u64,
        payload: &[u8],
        pinned: &Pinned,
    ) -> Result<()> {
        let payload_at = offset + FRAME_HEADER;
        for op in frame::ops(payload) {
            let op = op?;
            let replaced = match op.value {
                Some(value) => {
                    let value_offset =
                        u32::try_from(payload_at + op.value_at as u64).map_err(|_| {
                            Error::Corrupt(format!("segment {seg} is larger than 4 GiB"))
                        })?;
                    self.account(seg, op.footprint() as i64);
                    self.index
                        .insert(op.key, Slot::new(seg, value_offset, value), pinned)?
                }
                None => self.index.remove(op.key, pinned)?,
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

    /// Writes every changed leaf to the log and returns the checkpoint file's bytes, with
    /// replay starting at `replay_from` (the end of the log when `None`, for a store whose
    /// whole log is in the index).
    pub(crate) fn prepare_checkpoint(&mut self, replay_from: Option<Position>) -> Result<Vec<u8>> {
        let mut before = self.index.leaf_count();
        while let Some(run) = self.index.last_run_before(before) {
            // Leaf by leaf, so memory holds one merged leaf and one cut at a time however
            // long the run of changed leaves is.
            let mut fresh = Vec::new();
            let mut carry: Vec<Entry> = Vec::new();
            for li in run.clone() {
                let mut merged = std::mem::take(&mut carry);
                merged.extend(self.index.merge_leaf(li, self)?);
                for chunk in merged.chunks(leaf::LEAF_MAX) {
                    if chunk.len() == leaf::LEAF_MAX {
                        fresh.push(self.write_leaf(chunk)?);
                    } else {
                        carry = chunk.to_vec();
                    }
                }
            }
            if !carry.is_empty() {
                fresh.push(self.write_leaf(&carry)?);
            }
            before = run.start;
            let locs: Vec<Loc> = fresh.iter().map(|leaf| leaf.loc).collect();
            self.index.install(run, fresh);
            // Counted live once the index names them: a leaf written by a checkpoint that
            // failed half-way is garbage.
            for loc in locs {
                self.account(loc.seg, i64::from(loc.len));
            }
        }
        for loc in self.index.take_retired() {
            self.account(loc.seg, -i64::from(loc.len));
            self.cache.remove(loc);
        }
        let root = self.index.root().ok_or_else(|| {
            Error::Engine("a leaf is still changed after a checkpoint wrote them".into())
        })?;
        let replay_from = replay_from.unwrap_or_else(|| self.end());
        let live = self.segments.iter().map(|(id, s)| (*id, s.live));
        Ok(checkpoint::encode(replay_from, live, &root))
    }

    /// Writes one leaf for a checkpoint and keeps it in the cache.
    fn write_leaf(&mut self, entries: &[Entry]) -> Result<RootLeaf<leaf::Key>> {
        let (Some((first, _)), Some((last, _))) = (entries.first(), entries.last()) else {
            return Err(Error::Engine("a checkpoint cut an empty leaf".into()));
        };
        let (first, last) = (first.clone(), last.clone());
        let bytes = frame::seal(leaf::encode(entries))?;
        let (seg, offset) = self.append(&bytes)?;
        let loc = Loc {
            seg,
            offset: u32::try_from(offset)
                .map_err(|_| Error::Engine("a segment passed 4 GiB".into()))?,
            len: bytes.len() as u32,
        };
        self.cache.insert(loc, Arc::new(entries.to_vec()));
        Ok(RootLeaf {
            first,
            last,
            len: entries.len() as u32,
            loc,
        })
    }

    /// Segments with bytes not yet synced (only the sealed ones when `sealed_only`).
    pub(crate) fn pending(&self, sealed_only: bool) -> Vec<Pending> {
        let active = self.active();
        self.segments
            .iter()
            .filter(|(id, _)| !sealed_only || **id != active)
            .filter(|(_, s)| s.synced.load(Ordering::Acquire) < s.len)
            .map(|(id, s)| (*id, Arc::clone(&s.file), s.len, Arc::clone(&s.synced)))
            .collect()
    }

    /// The value a slot points at.
    pub(crate) fn value(&self, slot: &Slot) -> Result<Bytes> {
        let mut buf = Vec::new();
        self.read_into(slot, &mut buf)?;
        Ok(buf.into())
    }

    fn read_into(&self, slot: &Slot, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        if let Some(value) = slot.inline_value() {
            buf.extend_from_slice(value);
            return Ok(());
        }
        let segment = self.segments.get(&slot.seg).ok_or_else(|| {
            Error::Corrupt(format!(
                "index points into segment {} which is gone",
                slot.seg
            ))
        })?;
        buf.resize(slot.len as usize, 0);
        segment
            .file
            .read_at(buf, u64::from(slot.offset))
            .map_err(|e| at(&segment_path(&self.dir, slot.seg), e))?;
        check_value(&self.dir, slot, buf)
    }

    /// True when the record of `key` at `offset` of segment `seg` is the current one.
    pub(crate) fn is_current(&self, key: &[u8], seg: u32, offset: u64) -> Result<bool> {
        Ok(self
            .index
            .get(key, self)?
            .is_some_and(|slot| slot.seg == seg && u64::from(slot.offset) == offset))
    }
}

/// Syncs `pending` segments, then the directory if a file came or went.
pub(crate) fn sync_files(
    fs: &dyn Fs,
    dir: &Path,
    pending: Vec<Pending>,
    dir_dirty: &AtomicBool,
) -> Result<()> {
    for (id, file, len, synced) in pending {
        file.sync_data()
            .map_err(|e| Error::Failed(at(&segment_path(dir, id), e).to_string()))?;
        synced.fetch_max(len, Ordering::AcqRel);
    }
    if dir_dirty.swap(false, Ordering::AcqRel)
        && let Err(e) = fs.sync_dir(dir)
    {
        dir_dirty.store(true, Ordering::Release);
        return Err(Error::Failed(at(dir, e).to_string()));
    }
    Ok(())
}

impl Load for State {
    fn load(&self, loc: Loc) -> Result<Arc<Leaf>> {
        if let Some(leaf) = self.cache.get(loc) {
            return Ok(leaf);
        }
        let damaged = |what: &str| {
            Error::Corrupt(format!(
                "segment {} is damaged at byte {}: the index leaf there {what}; restore the \
                 data dir from a backup",
                segment_path(&self.dir, loc.seg).display(),
                loc.offset
            ))
        };
        let segment = self
            .segments
            .get(&loc.seg)
            .ok_or_else(|| damaged("is in a segment that is gone"))?;
        let len = loc.len as usize;
        if len <= FRAME_HEADER as usize {
            return Err(damaged("has no payload"));
        }
        let mut bytes = vec![0; len];
        segment
            .file
            .read_at(&mut bytes, u64::from(loc.offset))
            .map_err(|e| at(&segment_path(&self.dir, loc.seg), e))?;
        let payload = &bytes[FRAME_HEADER as usize..];
        let stored_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if stored_len != payload.len() || crc32fast::hash(payload) != crc {
            return Err(damaged("fails its checksum"));
        }
        let entries = leaf::decode(payload).map_err(|e| damaged(&e.to_string()))?;
        let entries = Arc::new(entries);
        self.cache.insert(loc, Arc::clone(&entries));
        Ok(entries)
    }
}

impl Raw for State {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.index
            .get(key, self)?
            .map(|slot| self.value(&slot))
            .transpose()
    }

    /// Values are read a few entries ahead, nearby ones in one read: the entries one batch
    /// appended sit side by side in its frame, so a log's tail is a few reads, not one per
    /// entry. The batch grows from one entry, so a scan that stops early reads little more
    /// than it visits.
    fn scan_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        let mut ahead = Ahead::default();
        let mut stopped = false;
        self.index.scan(start, end, reverse, self, &mut |k, slot| {
            ahead.entries.push((k.to_vec(), *slot));
            if ahead.entries.len() >= ahead.batch {
                ahead.batch = (ahead.batch * 2).min(READ_AHEAD_ENTRIES);
                if !self.visit_ahead(&mut ahead, visit)? {
                    stopped = true;
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if !stopped {
            self.visit_ahead(&mut ahead, visit)?;
        }
        Ok(())
    }

    /// Sizes come from the index: nothing is read from the segments.
    fn scan_sizes_nonempty(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        visit: SizeVisit<'_>,
    ) -> Result<()> {
        self.index.scan(start, end, false, self, &mut |k, slot| {
            visit(k, u64::from(slot.len))
        })
    }
}

/// Entries read ahead of a scan's visitor; see `scan_nonempty`.
struct Ahead {
    entries: Vec<(Vec<u8>, Slot)>,
    batch: usize,
    buf: Vec<u8>,
}

impl Default for Ahead {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            batch: 1,
            buf: Vec::new(),
        }
    }
}

/// Most entries read ahead of a scan's visitor.
const READ_AHEAD_ENTRIES: usize = 64;

/// Two values at most this far apart in a segment are read together.
const READ_GAP: u64 = 4096;

/// The most one read of nearby values spans.
const READ_SPAN: u64 = 1 << 20;

impl State {
    /// Reads the values of the entries read ahead, nearby ones together, and visits them in
    /// order; returns whether the visitor wants more.
    fn visit_ahead(&self, ahead: &mut Ahead, visit: Visit<'_>) -> Result<bool> {
        let entries = std::mem::take(&mut ahead.entries);
        let mut i = 0;
        while i < entries.len() {
            let (_, first) = &entries[i];
            if first.inline_value().is_some() {
                if !visit(&entries[i].0, first.inline_value().unwrap_or(&[]))? {
                    return Ok(false);
                }
                i += 1;
                continue;
            }
            // The span of the entries from `i` that lie close together in one segment.
            let (mut lo, mut hi) = (
                u64::from(first.offset),
                u64::from(first.offset) + u64::from(first.len),
            );
            let mut j = i + 1;
            while let Some((_, next)) = entries.get(j) {
                let (n_lo, n_hi) = (
                    u64::from(next.offset),
                    u64::from(next.offset) + u64::from(next.len),
                );
                let joined = (lo.min(n_lo), hi.max(n_hi));
                if next.inline_value().is_some()
                    || next.seg != first.seg
                    || n_lo > hi + READ_GAP
                    || n_hi + READ_GAP < lo
                    || joined.1 - joined.0 > READ_SPAN
                {
                    break;
                }
                (lo, hi) = joined;
                j += 1;
            }
            if j == i + 1 {
                self.read_into(first, &mut ahead.buf)?;
                if !visit(&entries[i].0, &ahead.buf)? {
                    return Ok(false);
                }
                i += 1;
                continue;
            }
            let segment = self.segments.get(&first.seg).ok_or_else(|| {
                Error::Corrupt(format!(
                    "index points into segment {} which is gone",
                    first.seg
                ))
            })?;
            ahead.buf.resize((hi - lo) as usize, 0);
            segment
                .file
                .read_at(&mut ahead.buf, lo)
                .map_err(|e| at(&segment_path(&self.dir, first.seg), e))?;
            for (key, slot) in &entries[i..j] {
                let from = (u64::from(slot.offset) - lo) as usize;
                let value = &ahead.buf[from..from + slot.len as usize];
                check_value(&self.dir, slot, value)?;
                if !visit(key, value)? {
                    return Ok(false);
                }
            }
            i = j;
        }
        Ok(true)
    }
}

/// Fails with the file and offset when a value read back does not match its checksum.
fn check_value(dir: &Path, slot: &Slot, value: &[u8]) -> Result<()> {
    if crc32fast::hash(value) != slot.crc {
        return Err(Error::Corrupt(format!(
            "segment {} is damaged at byte {}: a value of {} bytes there fails its checksum; \
             restore the data dir from a backup",
            segment_path(dir, slot.seg).display(),
            slot.offset,
            slot.len
        )));
    }
    Ok(())
}

/// Clean leaves read recently, up to a size: what makes reading the same leaves again (an
/// active channel's tail, the cleaner's lookups) cost no system call. Least recently used
/// leaves go first, a quarter of the capacity at a time.
#[derive(Debug)]
pub(crate) struct LeafCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    leaves: HashMap<Loc, (Arc<Leaf>, usize, u64)>,
    bytes: usize,
    tick: u64,
    /// The tick of the last sweep: leaves not used since are dropped by the next.
    swept_at: u64,
}

fn leaf_bytes(leaf: &Leaf) -> usize {
    leaf.capacity() * std::mem::size_of::<Entry>()
        + leaf.iter().map(|(k, _)| k.heap_bytes()).sum::<usize>()
}

impl LeafCache {
    fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(CacheInner::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, loc: Loc) -> Option<Arc<Leaf>> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let (leaf, _, used) = inner.leaves.get_mut(&loc)?;
        *used = tick;
        Some(Arc::clone(leaf))
    }

    fn insert(&self, loc: Loc, leaf: Arc<Leaf>) {
        let bytes = leaf_bytes(&leaf);
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, old, _)) = inner.leaves.insert(loc, (leaf, bytes, tick)) {
            inner.bytes -= old;
        }
        inner.bytes += bytes;
        if inner.bytes > self.capacity {
            let mut by_age: Vec<(u64, Loc)> = inner
                .leaves
                .iter()
                .map(|(loc, (_, _, used))| (*used, *loc))
                .collect();
            by_age.sort_unstable_by_key(|(used, _)| *used);
            let target = self.capacity / 4 * 3;
            for (_, loc) in by_age {
                if inner.bytes <= target {
                    break;
                }
                if let Some((_, bytes, _)) = inner.leaves.remove(&loc) {
                    inner.bytes -= bytes;
                }
            }
        }
    }

    fn remove(&self, loc: Loc) {
        let mut inner = self.lock();
        if let Some((_, bytes, _)) = inner.leaves.remove(&loc) {
            inner.bytes -= bytes;
        }
    }

    /// Leaves held and their bytes.
    pub(crate) fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.leaves.len(), inner.bytes)
    }

    /// Drops the leaves not used since the previous sweep, so a store that has gone quiet
    /// gives its memory back while leaves still being read stay.
    pub(crate) fn sweep(&self) {
        let mut inner = self.lock();
        let mark = inner.swept_at;
        let mut freed = 0;
        inner.leaves.retain(|_, (_, bytes, used)| {
            let keep = *used > mark;
            if !keep {
                freed += *bytes;
            }
            keep
        });
        inner.bytes -= freed;
        if inner.leaves.is_empty() {
            inner.leaves = HashMap::new();
        }
        inner.swept_at = inner.tick;
    }
}

/// Adds the file name to an error found while reading it.
pub(crate) fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Corrupt(message) => Error::Corrupt(format!("{}: {message}", path.display())),
        Error::Io(io) => at(path, io),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(offset: u32) -> Loc {
        Loc {
            seg: 1,
            offset,
            len: 10,
        }
    }

    #[test]
    fn a_sweep_drops_the_leaves_not_read_since_the_last_one_and_the_cache_stays_bounded() {
        let cache = LeafCache::new(1 << 20);
        cache.insert(loc(1), Arc::new(Vec::new()));
        cache.insert(loc(2), Arc::new(Vec::new()));
        cache.sweep();
        assert_eq!(cache.size().0, 2, "both were used since the start");
        assert!(cache.get(loc(1)).is_some());
        cache.sweep();
        assert!(cache.get(loc(1)).is_some(), "read since the last sweep");
        assert!(cache.get(loc(2)).is_none(), "not read since the last sweep");

        let leaf = || Arc::new(vec![(leaf::Key::new(b"k"), Slot::new(1, 0, b"v")); 100]);
        let small = LeafCache::new(10 * leaf_bytes(&leaf()));
        for n in 0..100 {
            small.insert(loc(n), leaf());
        }
        assert!(
            small.size().1 <= 10 * leaf_bytes(&leaf()),
            "{:?}",
            small.size()
        );
        assert!(small.get(loc(99)).is_some(), "the newest stays");
    }
}
