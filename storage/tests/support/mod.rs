//! Helpers shared by the storage integration tests.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;

use dormouse_storage::{
    Bytes, Durability, MemoryStorage, ObjectId, SegmentConfig, SegmentStorage, SledConfig,
    SledStorage, Storage, WriteBatch,
};

pub(crate) fn id(namespace: &str, name: &str) -> ObjectId {
    ObjectId::new(namespace, name)
}

/// Runs `test` against every engine, each fresh: the semantics must not depend on the engine.
pub(crate) fn each_engine(test: impl Fn(&dyn Storage)) {
    eprintln!("engine: memory");
    test(&MemoryStorage::new());

    eprintln!("engine: sled");
    let dir = tempfile::tempdir().unwrap();
    let store = open_sled(dir.path(), Durability::Never);
    test(&store);

    eprintln!("engine: segments");
    let dir = tempfile::tempdir().unwrap();
    let store = open_segments(dir.path(), Durability::Never);
    test(&store);
    // Everything the test wrote must read back the same after the cleaner ran.
    store.clean().unwrap();
    test_reopen(store, dir.path());
}

/// Reopens a segment store and checks the checkpoint and replay rebuilt the same index.
fn test_reopen(store: SegmentStorage, path: &Path) {
    // Live bytes count written index leaves, so compare two settled stores.
    store.checkpoint().unwrap();
    let before = store.stats();
    drop(store);
    let store = open_segments(path, Durability::Never);
    let after = store.stats();
    assert_eq!(
        (after.keys, after.live_bytes),
        (before.keys, before.live_bytes),
        "replay rebuilt a different index"
    );
}

/// The segment engine with tiny segments and no cleaning floor, so tests that write a few
/// kilobytes already go through rotation and cleaning.
pub(crate) fn open_segments(path: &Path, durability: Durability) -> SegmentStorage {
    SegmentStorage::open(SegmentConfig {
        durability,
        segment_bytes: 4096,
        clean_above_bytes: 0,
        ..SegmentConfig::new(path)
    })
    .unwrap()
}

pub(crate) fn open_sled(path: &Path, durability: Durability) -> SledStorage {
    SledStorage::open(SledConfig {
        durability,
        // Small: many stores may be open at once while tests run in parallel.
        cache_capacity_bytes: 4 * 1024 * 1024,
        ..SledConfig::new(path)
    })
    .unwrap()
}

/// Applies one batch built by `build`.
pub(crate) fn apply(
    store: &dyn Storage,
    object: &ObjectId,
    build: impl FnOnce(&mut WriteBatch),
) -> dormouse_storage::Result<()> {
    let mut batch = WriteBatch::new();
    build(&mut batch);
    store.apply(object, batch)
}

/// A payload derived from `seq` and a salt, so a wrong, torn or shifted entry is detectable.
pub(crate) fn payload(salt: u64, seq: u64, len: usize) -> Bytes {
    let word = (salt << 48 ^ seq).to_be_bytes();
    word.iter()
        .copied()
        .cycle()
        .take(len)
        .collect::<Vec<u8>>()
        .into()
}

pub(crate) fn seqs(entries: &[dormouse_storage::LogEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}
