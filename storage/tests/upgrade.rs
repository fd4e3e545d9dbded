//! Data dirs written by earlier versions open with everything they held: a sled data dir is
//! migrated in place on open (and a migration cut short starts over), and a segment data
//! dir from before checkpoints (format version 1, a checked-in fixture written by that
//! version) is read and carried forward.

mod support;

use std::fs;
use std::path::Path;

use dormouse_storage::{
    Bytes, Durability, ObjectId, Retention, SegmentConfig, SegmentStorage, Storage, Write,
};
use support::{apply, id, open_sled, payload, seqs};

/// What an object holds, read through the trait.
#[derive(Debug, PartialEq)]
struct Held {
    meta: Option<dormouse_storage::LogMeta>,
    entries: Vec<(u64, u64, Bytes)>,
    kv: Vec<(Vec<u8>, Bytes)>,
    alarm: Option<u64>,
}

fn held(store: &dyn Storage, id: &ObjectId) -> Held {
    Held {
        meta: store.log_meta(id).unwrap(),
        entries: store
            .read_log(id, 0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, e.timestamp_ms, e.data))
            .collect(),
        kv: store.list(id, b"", None, usize::MAX).unwrap(),
        alarm: store.alarm(id).unwrap(),
    }
}

fn objects() -> Vec<ObjectId> {
    (0..20)
        .map(|n| id("channel", &format!("ch-{n}")))
        .chain([id("counter", "visits"), id("channel", "gone")])
        .collect()
}

/// Writes a bit of everything into `store`.
fn fill(store: &dyn Storage) {
    for n in 0..20u64 {
        let chan = id("channel", &format!("ch-{n}"));
        for seq in 1..=30 {
            apply(store, &chan, |b| {
                b.append(seq, seq, payload(n, seq, 50 + (seq as usize * 37) % 3000))
                    .trim(
                        Retention {
                            max_events: Some(12),
                            ..Retention::default()
                        },
                        0,
                    );
            })
            .unwrap();
        }
        apply(store, &chan, |b| {
            b.put("cursor", n.to_be_bytes().to_vec());
        })
        .unwrap();
    }
    apply(store, &id("counter", "visits"), |b| {
        b.put("count", 7u64.to_be_bytes().to_vec())
            .put("name", vec![b'x'; 5000])
            .push(Write::SetAlarm { at_ms: 42 });
    })
    .unwrap();
    apply(store, &id("channel", "gone"), |b| {
        b.append(1, 1, "x");
    })
    .unwrap();
    apply(store, &id("channel", "gone"), |b| {
        b.push(Write::DeleteLog);
    })
    .unwrap();
}

fn open(path: &Path) -> SegmentStorage {
    SegmentStorage::open(SegmentConfig {
        durability: Durability::Always,
        segment_bytes: 64 * 1024,
        ..SegmentConfig::new(path)
    })
    .unwrap()
}

#[test]
fn a_sled_data_dir_is_migrated_in_place_with_everything_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let (before, due, boot) = {
        let sled = open_sled(dir.path(), Durability::Always);
        fill(&sled);
        let before: Vec<Held> = objects().iter().map(|id| held(&sled, id)).collect();
        let due = sled.due_alarms(u64::MAX, 100).unwrap();
        let boot = sled.boot();
        sled.close().unwrap();
        (before, due, boot)
    };

    let store = open(dir.path());
    let after: Vec<Held> = objects().iter().map(|id| held(&store, id)).collect();
    assert_eq!(after, before);
    assert_eq!(store.due_alarms(u64::MAX, 100).unwrap(), due);
    assert_eq!(
        store.list_logs("channel", None, 100).unwrap().len(),
        20,
        "every log but the deleted one"
    );
    // The same data dir, one boot later, shut down cleanly before the move.
    assert_eq!(store.boot().id, boot.id + 1);
    assert!(!store.boot().unclean);
    assert!(!dir.path().join("sled").exists());
    assert!(
        dir.path().join("sled.migrated").is_dir(),
        "sled's files are kept"
    );

    // Epochs keep increasing across the move, and it goes on working and reopening.
    let epoch = store.allocate_epoch().unwrap();
    assert!(
        before
            .iter()
            .filter_map(|h| h.meta)
            .all(|m| m.epoch < epoch)
    );
    apply(&store, &id("channel", "ch-0"), |b| {
        b.append(31, 31, "after");
    })
    .unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        seqs(&store.read_log(&id("channel", "ch-0"), 0, 100).unwrap()),
        (19..=31).collect::<Vec<_>>()
    );
}

#[test]
fn a_migration_cut_short_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let sled = open_sled(dir.path(), Durability::Always);
        fill(&sled);
        objects()
            .iter()
            .map(|id| held(&sled, id))
            .collect::<Vec<_>>()
    };
    // What a crash in the middle of the copy leaves: part of a segment directory, with
    // `sled/` still in place.
    let segments = dir.path().join("segments");
    fs::create_dir_all(&segments).unwrap();
    fs::write(segments.join("0000000001.seg"), b"DMSEG\x00\x00\x02garbage").unwrap();

    let store = open(dir.path());
    let after: Vec<Held> = objects().iter().map(|id| held(&store, id)).collect();
    assert_eq!(after, before);
    assert!(store.boot().unclean, "sled was not shut down cleanly");
}

/// The fixture was written by the segment engine before checkpoints (format version 1):
/// rooms 0–2 each appended 50 events and trimmed to the last 20, a counter with a key
/// that fits inline, one that does not and an alarm, and a deleted log; then shut down
/// cleanly.
#[test]
fn a_segment_data_dir_from_before_checkpoints_opens_with_everything_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/segments");
    fs::create_dir_all(dir.path().join("segments")).unwrap();
    for file in fs::read_dir(&fixture).unwrap() {
        let file = file.unwrap();
        fs::copy(
            file.path(),
            dir.path().join("segments").join(file.file_name()),
        )
        .unwrap();
    }

    let check = |store: &SegmentStorage| {
        for n in 0..3 {
            let room = id("channel", &format!("room-{n}"));
            let entries = store.read_log(&room, 0, 100).unwrap();
            assert_eq!(seqs(&entries), (31..=50).collect::<Vec<_>>(), "{room}");
            for entry in &entries {
                assert_eq!(
                    entry.data,
                    Bytes::from(format!("event {} of room-{n}", entry.seq))
                );
                assert_eq!(entry.timestamp_ms, 1_700_000_000_000 + entry.seq);
            }
            let meta = store.log_meta(&room).unwrap().unwrap();
            assert_eq!((meta.first_seq, meta.last_seq, meta.count), (31, 50, 20));
        }
        let counter = id("counter", "visits");
        assert_eq!(
            store.get(&counter, b"count").unwrap().unwrap().as_ref(),
            42u64.to_be_bytes()
        );
        assert_eq!(
            store.get(&counter, b"name").unwrap().unwrap().as_ref(),
            b"a longer value that does not fit inline in the index"
        );
        assert_eq!(store.alarm(&counter).unwrap(), Some(1_800_000_000_000));
        assert_eq!(store.log_meta(&id("channel", "deleted")).unwrap(), None);
    };

    let store = open(dir.path());
    assert!(!store.boot().unclean, "the fixture was shut down cleanly");
    check(&store);
    apply(&store, &id("channel", "room-0"), |b| {
        b.append(51, 1, "after the upgrade");
    })
    .unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.read_log_tail(&id("channel", "room-0"), 1).unwrap()[0].seq,
        51
    );
    assert!(dir.path().join("segments/checkpoint").exists());
    // New segments are version 2: an older build refuses them by their magic rather
    // than taking an index leaf for a torn write.
    let newest = fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .unwrap();
    assert_eq!(&fs::read(newest).unwrap()[..8], b"DMSEG\x00\x00\x02");
}

/// Replaying a large old data dir writes checkpoints as it goes (its changes would not fit
/// in memory otherwise); their leaves must go to a new-format segment, never into an old
/// one, which an older build would take for a torn write and cut off.
#[test]
fn checkpoints_while_upgrading_never_write_into_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/segments");
    fs::create_dir_all(dir.path().join("segments")).unwrap();
    let mut lengths = Vec::new();
    for file in fs::read_dir(&fixture).unwrap() {
        let file = file.unwrap();
        let copy = dir.path().join("segments").join(file.file_name());
        fs::copy(file.path(), &copy).unwrap();
        lengths.push((copy, file.metadata().unwrap().len()));
    }
    let store = SegmentStorage::open(SegmentConfig {
        durability: Durability::Always,
        // Room in the old newest segment, so a leaf would fit there if it were allowed.
        segment_bytes: 64 * 1024,
        // A budget of a handful of changes: replay checkpoints every few batches.
        dirty_bytes: 512,
        ..SegmentConfig::new(dir.path())
    })
    .unwrap();
    assert!(store.stats().checkpoints >= 1, "{:?}", store.stats());
    for (file, len) in &lengths {
        assert_eq!(
            fs::metadata(file).unwrap().len(),
            *len,
            "{} was written to",
            file.display()
        );
    }
    let room = id("channel", "room-2");
    assert_eq!(
        seqs(&store.read_log(&room, 0, 100).unwrap()),
        (31..=50).collect::<Vec<_>>()
    );
}
