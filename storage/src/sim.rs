//! A file system in memory that remembers what was synced, and a power cut that keeps only
//! that: beneath the segment engine in tests (`fs::Fs`), it shows what a real disk may hold
//! after the power goes, which `kill -9` (the page cache survives it) never shows.
//!
//! What survives a cut, as POSIX file systems allow it:
//! - a file's contents as of its last `sync_data`, plus any subset of the writes made since,
//!   each cut at 512-byte sector boundaries, in any order; a file may also end up longer
//!   than anything that reached it (zeros), up to its length before the cut;
//! - directory entries as of the directory's last sync, each later creation, removal or
//!   rename either kept or not.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::fs::{FileIo, Fs};

const SECTOR: u64 = 512;

/// A small, seedable random source (xorshift), so a failing trial can be replayed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent`%.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    current: Vec<u8>,
    /// The contents as of the last `sync_data`.
    durable: Vec<u8>,
    /// Changes since, in order.
    pending: Vec<Change>,
}

#[derive(Debug, Default)]
struct Disk {
    inodes: HashMap<u64, Inode>,
    /// Directory entries now.
    names: BTreeMap<PathBuf, u64>,
    /// Directory entries as of each directory's last sync.
    durable_names: BTreeMap<PathBuf, u64>,
    next_inode: u64,
}

/// The simulated file system; clones share one disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct SimFs {
    disk: Arc<Mutex<Disk>>,
}

#[derive(Debug)]
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    inode: u64,
}

fn lock(disk: &Mutex<Disk>) -> MutexGuard<'_, Disk> {
    disk.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimFs {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The disk as the power cut leaves it: a new file system holding what survived.
    pub(crate) fn cut(&self, rng: &mut Rng) -> SimFs {
        let disk = lock(&self.disk);
        let mut after = Disk {
            next_inode: disk.next_inode,
            ..Disk::default()
        };
        let mut paths: Vec<&PathBuf> = disk.names.keys().chain(disk.durable_names.keys()).collect();
        paths.sort();
        paths.dedup();
        for path in paths {
            let now = disk.names.get(path);
            let then = disk.durable_names.get(path);
            let kept = if now == then || rng.chance(50) {
                now
            } else {
                then
            };
            if let Some(&inode) = kept {
                after.names.insert(path.clone(), inode);
                after.durable_names.insert(path.clone(), inode);
            }
        }
        for &inode in after.names.values() {
            if after.inodes.contains_key(&inode) {
                continue;
            }
            let Some(file) = disk.inodes.get(&inode) else {
                continue;
            };
            let mut contents = file.durable.clone();
            let mut longest = contents.len() as u64;
            for change in &file.pending {
                match change {
                    Change::SetLen(len) => {
                        if rng.chance(50) {
                            contents.resize(*len as usize, 0);
                        }
                    }
                    Change::Write { offset, data } => {
                        longest = longest.max(offset + data.len() as u64);
                        let mut at = *offset;
                        while at < offset + data.len() as u64 {
                            let end = ((at / SECTOR + 1) * SECTOR).min(offset + data.len() as u64);
                            if rng.chance(50) {
                                let piece = &data[(at - offset) as usize..(end - offset) as usize];
                                if contents.len() < end as usize {
                                    contents.resize(end as usize, 0);
                                }
                                contents[at as usize..end as usize].copy_from_slice(piece);
                            }
                            at = end;
                        }
                    }
                }
            }
            // The length may have reached the disk without the data.
            let now_len = file.current.len() as u64;
            if rng.chance(30) && (contents.len() as u64) < now_len.min(longest) {
                contents.resize(now_len.min(longest) as usize, 0);
            }
            after.inodes.insert(
                inode,
                Inode {
                    current: contents.clone(),
                    durable: contents,
                    pending: Vec::new(),
                },
            );
        }
        SimFs {
            disk: Arc::new(Mutex::new(after)),
        }
    }
}

impl FileIo for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let disk = lock(&self.disk);
        let file = disk
            .inodes
            .get(&self.inode)
            .ok_or_else(|| io::Error::other("gone"))?;
        let end = offset as usize + buf.len();
        let bytes = file
            .current
            .get(offset as usize..end)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        let file = disk
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("gone"))?;
        let end = offset as usize + buf.len();
        if file.current.len() < end {
            file.current.resize(end, 0);
        }
        file.current[offset as usize..end].copy_from_slice(buf);
        file.pending.push(Change::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        let file = disk
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("gone"))?;
        file.current.resize(len as usize, 0);
        file.pending.push(Change::SetLen(len));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let disk = lock(&self.disk);
        let file = disk
            .inodes
            .get(&self.inode)
            .ok_or_else(|| io::Error::other("gone"))?;
        Ok(file.current.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        let file = disk
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("gone"))?;
        file.durable = file.current.clone();
        file.pending.clear();
        Ok(())
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        // Directories themselves are taken to exist durably; their entries are what a
        // cut can lose.
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let disk = lock(&self.disk);
        Ok(disk
            .names
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create_new: bool) -> io::Result<Arc<dyn FileIo>> {
        let mut disk = lock(&self.disk);
        let inode = match (disk.names.get(path), create_new) {
            (Some(_), true) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists", path.display()),
                ));
            }
            (Some(&inode), false) => inode,
            (None, true) => {
                disk.next_inode += 1;
                let inode = disk.next_inode;
                disk.inodes.insert(inode, Inode::default());
                disk.names.insert(path.to_owned(), inode);
                inode
            }
            (None, false) => return Err(not_found(path)),
        };
        Ok(Arc::new(SimFile {
            disk: Arc::clone(&self.disk),
            inode,
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        let disk = lock(&self.disk);
        disk.names.contains_key(path) || disk.names.keys().any(|p| p.starts_with(path))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        disk.names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        let inode = disk.names.remove(from).ok_or_else(|| not_found(from))?;
        disk.names.insert(to.to_owned(), inode);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        let in_dir = |path: &PathBuf| path.parent() == Some(dir);
        disk.durable_names.retain(|path, _| !in_dir(path));
        let now: Vec<(PathBuf, u64)> = disk
            .names
            .iter()
            .filter(|(path, _)| in_dir(path))
            .map(|(path, inode)| (path.clone(), *inode))
            .collect();
        disk.durable_names.extend(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Power-loss trials: a random workload on the segment engine over [`SimFs`], a cut at
    //! a random moment, and a reopen of what survived. Every trial must reopen, and hold
    //! exactly the state after some prefix of the batches applied that includes every
    //! batch a completed `sync` acknowledged (under `always`; under `never`, any prefix).

    use std::sync::Arc;

    use bytes::Bytes;

    use super::{Rng, SimFs};
    use crate::{
        Durability, MemoryStorage, ObjectId, Retention, SegmentConfig, SegmentStorage, Storage,
        Write, WriteBatch,
    };

    /// Records of a store in key order, without the system records (boot counter, clean
    /// shutdown marker), which differ between runs by design.
    fn contents(store: &dyn crate::raw::Raw) -> Vec<(Vec<u8>, Bytes)> {
        let mut out = Vec::new();
        store
            .scan(
                std::ops::Bound::Included(&[crate::key::LOG_META][..]),
                std::ops::Bound::Unbounded,
                false,
                &mut |k, v| {
                    out.push((k.to_vec(), Bytes::copy_from_slice(v)));
                    Ok(true)
                },
            )
            .unwrap();
        out
    }

    /// A random workload's state: which objects have a log, and their next sequence.
    struct Workload {
        objects: Vec<ObjectId>,
        logs: Vec<Option<u64>>,
        next_epoch: u64,
    }

    impl Workload {
        fn new() -> Self {
            let objects: Vec<ObjectId> = ["a", "b", "c", "d"]
                .into_iter()
                .map(|name| ObjectId::new("channel", name))
                .chain([ObjectId::new("counter", "x")])
                .collect();
            Self {
                logs: vec![None; objects.len()],
                objects,
                next_epoch: 1,
            }
        }

        fn value(rng: &mut Rng) -> Bytes {
            let len = match rng.below(10) {
                0 => 0,
                1..=5 => rng.below(16) as usize,
                6..=8 => rng.below(400) as usize,
                _ => 1000 + rng.below(3000) as usize,
            };
            let byte = rng.next() as u8;
            (0..len)
                .map(|i| byte.wrapping_add(i as u8))
                .collect::<Vec<u8>>()
                .into()
        }

        fn batch(&mut self, rng: &mut Rng) -> (ObjectId, WriteBatch) {
            let o = rng.below(self.objects.len() as u64) as usize;
            let mut batch = WriteBatch::new();
            for _ in 0..=rng.below(3) {
                match rng.below(20) {
                    0..=7 => {
                        let next = match self.logs[o] {
                            Some(next) => next,
                            None => {
                                batch.push(Write::CreateLog {
                                    epoch: self.next_epoch,
                                });
                                self.next_epoch += 1;
                                1
                            }
                        };
                        let count = 1 + rng.below(4);
                        for seq in next..next + count {
                            batch.append(seq, 1_000 + seq, Self::value(rng));
                        }
                        self.logs[o] = Some(next + count);
                        if rng.chance(50) {
                            batch.trim(
                                Retention {
                                    max_events: Some(3 + rng.below(12)),
                                    ..Retention::default()
                                },
                                2_000,
                            );
                        }
                    }
                    8..=11 => {
                        let key = format!("k{}", rng.below(12));
                        batch.put(key, Self::value(rng));
                    }
                    12..=13 => {
                        batch.delete(format!("k{}", rng.below(12)));
                    }
                    14 => {
                        batch.push(Write::DeleteAllKv);
                    }
                    15..=16 => {
                        batch.push(Write::SetAlarm {
                            at_ms: rng.below(1_000_000),
                        });
                    }
                    17 => {
                        batch.push(Write::DeleteAlarm);
                    }
                    _ => {
                        if self.logs[o].is_some() && rng.chance(30) {
                            batch.push(Write::DeleteLog);
                            self.logs[o] = None;
                        }
                    }
                }
            }
            (self.objects[o].clone(), batch)
        }
    }

    fn config(rng: &mut Rng, durability: Durability) -> SegmentConfig {
        SegmentConfig {
            durability,
            segment_bytes: 4096 << rng.below(4),
            clean_above_bytes: 0,
            cache_bytes: 1 << (10 + rng.below(10)),
            dirty_bytes: 1 << (8 + rng.below(10)),
            checkpoint_bytes: 1 << (10 + rng.below(8)),
            ..SegmentConfig::new("/data")
        }
    }

    /// One trial: returns an error describing what went wrong, if anything did.
    fn trial(seed: u64, durability: Durability) -> Result<(), String> {
        let mut rng = Rng::new(seed);
        let fs = SimFs::new();
        let config = config(&mut rng, durability);
        let store = SegmentStorage::open_on(config.clone(), Arc::new(fs.clone()), None)
            .map_err(|e| format!("first open: {e}"))?;
        let mut workload = Workload::new();
        let mut history: Vec<(ObjectId, WriteBatch)> = Vec::new();
        let mut acked = 0;
        let steps = 1 + rng.below(250);
        for _ in 0..steps {
            let (id, batch) = workload.batch(&mut rng);
            store
                .apply(&id, batch.clone())
                .map_err(|e| format!("apply: {e}"))?;
            history.push((id, batch));
            if rng.chance(50) {
                futures::executor::block_on(store.sync()).map_err(|e| format!("sync: {e}"))?;
                acked = history.len();
            }
            match rng.below(40) {
                0 => store.clean().map_err(|e| format!("clean: {e}"))?,
                1 => store.checkpoint().map_err(|e| format!("checkpoint: {e}"))?,
                _ => {}
            }
        }
        let image = fs.cut(&mut rng);
        drop(store);

        let reopened = SegmentStorage::open_on(config, Arc::new(image), None)
            .map_err(|e| format!("the data dir does not open after the cut: {e}"))?;
        let found = contents(&*reopened.reader());
        let model = MemoryStorage::new();
        let floor = match durability {
            Durability::Always => acked,
            _ => 0,
        };
        for (id, batch) in &history[..floor] {
            model
                .apply(id, batch.clone())
                .map_err(|e| format!("model: {e}"))?;
        }
        let mut prefix = floor;
        loop {
            if contents(&*model.records()) == found {
                break;
            }
            let Some((id, batch)) = history.get(prefix) else {
                return Err(format!(
                    "after the cut the store holds no prefix of the {} batches applied that \
                     includes the {acked} acknowledged ones",
                    history.len()
                ));
            };
            model
                .apply(id, batch.clone())
                .map_err(|e| format!("model: {e}"))?;
            prefix += 1;
        }
        // And it goes on working.
        let (id, batch) = workload.batch(&mut rng);
        let _ = reopened.apply(&id, batch);
        futures::executor::block_on(reopened.sync()).map_err(|e| format!("sync after: {e}"))?;
        Ok(())
    }

    /// How many cuts a run makes: `DORMOUSE_POWER_LOSS_CUTS` (the benchmark runs 1,000),
    /// else a number that keeps the test suite quick. `DORMOUSE_POWER_LOSS_SEED` sets the
    /// first seed, so one failing seed can be run alone with a count of 1 (the engine's
    /// threads make a replay likely, not certain, to take the same path).
    fn cuts() -> u64 {
        std::env::var("DORMOUSE_POWER_LOSS_CUTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(150)
    }

    #[test]
    fn after_a_power_cut_the_data_dir_opens_with_every_acknowledged_write() {
        let cuts = cuts();
        let base: u64 = std::env::var("DORMOUSE_POWER_LOSS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x5eed);
        let mut failures = Vec::new();
        for n in 0..cuts {
            let durability = if n % 4 == 3 {
                Durability::Never
            } else {
                Durability::Always
            };
            let seed = base + n;
            if let Err(e) = trial(seed, durability) {
                failures.push(format!("seed {seed} ({durability}): {e}"));
            }
        }
        eprintln!(
            "power-loss trials: {cuts} cuts, {} failures (seed base {base})",
            failures.len()
        );
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
