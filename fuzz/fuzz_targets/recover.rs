//! Opening a damaged data dir: arbitrary bytes as segment files and a checkpoint. Opening,
//! scrubbing and reading every log never panics; it succeeds, or fails with an error.
//!
//! Input: files separated by `FILE_BREAK`; a file starting with the checkpoint magic is the
//! checkpoint, the others are segments 1, 2, ... The seed (`fuzz/corpus/recover/seed1`) is
//! a small real data dir in that form.
#![no_main]

use dormouse_storage::{Durability, SegmentConfig, SegmentStorage, Storage};
use libfuzzer_sys::fuzz_target;

const FILE_BREAK: &[u8] = b"\xff--file--\xff";

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let segments = dir.path().join("segments");
    std::fs::create_dir_all(&segments).expect("segments directory");
    let mut next = 1u32;
    let mut rest = data;
    loop {
        let (file, more) = match rest.windows(FILE_BREAK.len()).position(|w| w == FILE_BREAK) {
            Some(at) => (&rest[..at], Some(&rest[at + FILE_BREAK.len()..])),
            None => (rest, None),
        };
        let name = if file.starts_with(b"DMCKPT") {
            "checkpoint".to_owned()
        } else {
            next += 1;
            format!("{:010}.seg", next - 1)
        };
        std::fs::write(segments.join(name), file).expect("write a file");
        match more {
            Some(more) if next < 8 => rest = more,
            _ => break,
        }
    }
    let Ok(store) = SegmentStorage::open(SegmentConfig {
        durability: Durability::Never,
        segment_bytes: 4096,
        ..SegmentConfig::new(dir.path())
    }) else {
        return;
    };
    let _ = store.scrub();
    if let Ok(names) = store.list_logs("channel", None, 100) {
        for name in names {
            let id = dormouse_storage::ObjectId::new("channel", name);
            let _ = store.read_log(&id, 0, 1000);
            let _ = store.read_log_tail(&id, 10);
        }
    }
});
