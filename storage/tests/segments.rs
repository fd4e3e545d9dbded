//! What only the segment engine has: replay of its files on open, torn-tail handling, the
//! cleaner's space bound, and its lock, boot and group-commit bookkeeping.

mod support;

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dormouse_storage::{
    Bytes, Durability, Error, Retention, SegmentConfig, SegmentStorage, Storage, Write,
};
use support::{apply, id, open_segments, payload, seqs};

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

/// A replay-buffer workload: `logs` logs, each appended `per_log` times and trimmed to its
/// last `keep` entries, plus a key overwritten on every append.
fn churn(store: &dyn Storage, logs: u64, per_log: u64, keep: u64, len: usize) {
    for seq in 1..=per_log {
        for n in 0..logs {
            apply(store, &id("channel", &format!("c{n}")), |b| {
                b.append(seq, seq, payload(n, seq, len))
                    .trim(
                        Retention {
                            max_events: Some(keep),
                            ..Retention::default()
                        },
                        0,
                    )
                    .put("last", seq.to_be_bytes().to_vec());
            })
            .unwrap();
        }
    }
}

fn check_churned(store: &dyn Storage, logs: u64, per_log: u64, keep: u64, len: usize) {
    for n in 0..logs {
        let chan = id("channel", &format!("c{n}"));
        let entries = store.read_log(&chan, 0, usize::MAX).unwrap();
        assert_eq!(
            seqs(&entries),
            (per_log - keep + 1..=per_log).collect::<Vec<_>>(),
            "{chan}"
        );
        assert!(
            entries.iter().all(|e| e.data == payload(n, e.seq, len)),
            "{chan}"
        );
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert_eq!(
            (meta.first_seq, meta.last_seq, meta.count),
            (per_log - keep + 1, per_log, keep)
        );
        assert_eq!(
            store.get(&chan, b"last").unwrap().unwrap().as_ref(),
            per_log.to_be_bytes()
        );
    }
}

#[test]
fn churn_stays_within_twice_the_live_data_and_replays_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_segments(dir.path(), Durability::Never);
    churn(&store, 8, 400, 20, 200);
    store.clean().unwrap();
    let stats = store.stats();
    assert!(stats.cleaned_segments > 100, "{stats:?}");
    // The bound: twice the live data plus the active segment (4 KiB here) and a frame.
    assert!(
        stats.disk_bytes <= 2 * stats.live_bytes + 2 * 4096,
        "{stats:?}"
    );
    assert_eq!(store.size_on_disk().unwrap(), stats.disk_bytes);
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(
        on_disk, stats.disk_bytes,
        "the files are what the stats say"
    );
    check_churned(&store, 8, 400, 20, 200);
    drop(store);

    let store = open_segments(dir.path(), Durability::Never);
    check_churned(&store, 8, 400, 20, 200);
    assert_eq!(store.stats().live_bytes, stats.live_bytes);
}

#[test]
fn the_cleaner_thread_reclaims_space_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_segments(dir.path(), Durability::Never);
    churn(&store, 4, 300, 10, 300);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = store.stats();
        if stats.disk_bytes <= 2 * stats.live_bytes + 2 * 4096 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never cleaned: {stats:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    check_churned(&store, 4, 300, 10, 300);
}

#[test]
fn values_larger_than_a_segment_work() {
    let dir = tempfile::tempdir().unwrap();
    let chan = id("channel", "big");
    {
        let store = open_segments(dir.path(), Durability::Always);
        for seq in 1..=3 {
            apply(&store, &chan, |b| {
                b.append(seq, seq, payload(7, seq, 3 << 20));
            })
            .unwrap();
        }
        futures::executor::block_on(store.sync()).unwrap();
    }
    let store = open_segments(dir.path(), Durability::Always);
    let entries = store.read_log(&chan, 0, 10).unwrap();
    assert_eq!(seqs(&entries), [1, 2, 3]);
    assert!(entries.iter().all(|e| e.data == payload(7, e.seq, 3 << 20)));
}

#[test]
fn a_torn_write_at_the_tail_is_cut_off_and_writing_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let chan = id("channel", "news");
    {
        let store = open_segments(dir.path(), Durability::Always);
        for seq in 1..=30 {
            apply(&store, &chan, |b| {
                b.append(seq, seq, payload(1, seq, 100));
            })
            .unwrap();
        }
    }
    // What a crash in the middle of a write leaves: part of a frame.
    let newest = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&newest).unwrap().len();
    OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap()
        .write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6])
        .unwrap();

    let store = open_segments(dir.path(), Durability::Always);
    let after_open = fs::read(&newest).unwrap();
    assert_ne!(
        after_open.get(len as usize..len as usize + 4),
        Some(&[200, 0, 0, 0][..]),
        "the torn frame is cut off (new frames go where it was)"
    );
    assert_eq!(
        seqs(&store.read_log(&chan, 0, 100).unwrap()),
        (1..=30).collect::<Vec<_>>()
    );
    apply(&store, &chan, |b| {
        b.append(31, 31, "after");
    })
    .unwrap();
    drop(store);
    let store = open_segments(dir.path(), Durability::Always);
    assert_eq!(
        store.read_log(&chan, 31, 1).unwrap()[0].data,
        Bytes::from("after")
    );
}

/// Opening reads the checkpoint and the log after it, not old segments, so damage in an
/// old segment is found when the damaged record is read: the read fails with the file and
/// the offset, and the damaged bytes never come back as data.
#[test]
fn damage_in_an_older_segment_fails_the_read_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_segments(dir.path(), Durability::Never);
        churn(&store, 2, 40, 1000, 200);
    }
    let files = segment_files(dir.path());
    assert!(files.len() > 2);
    let victim = &files[0];
    let mut bytes = fs::read(victim).unwrap();
    // The first event of log c1 sits in the first segment (c0's payloads start with the
    // same bytes as their timestamps, c1's do not).
    let value = payload(1, 1, 200);
    let at = bytes
        .windows(value.len())
        .position(|w| w == value.as_ref())
        .expect("the first event is in the first segment");
    bytes[at + 100] ^= 0xff;
    fs::write(victim, bytes).unwrap();

    let store = open_segments(dir.path(), Durability::Never);
    let err = store.read_log(&id("channel", "c1"), 0, 1000).unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&victim.display().to_string()), "{message}");
    // A log entry's value is its 8-byte timestamp, then the payload.
    assert!(message.contains(&format!("byte {}", at - 8)), "{message}");
    assert!(message.contains("backup"), "{message}");
    // What is not damaged still reads.
    let other = store.read_log(&id("channel", "c0"), 0, 1000).unwrap();
    assert_eq!(seqs(&other), (1..=40).collect::<Vec<_>>());
}

#[test]
fn a_second_open_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_segments(dir.path(), Durability::Never);
    let err = SegmentStorage::open(SegmentConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    drop(store);
}

#[test]
fn a_crash_is_told_apart_from_a_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_segments(dir.path(), Durability::Never);
    assert_eq!(
        store.boot(),
        dormouse_storage::Boot {
            id: 1,
            unclean: false
        }
    );
    store.close().unwrap();
    drop(store);
    let store = open_segments(dir.path(), Durability::Never);
    assert_eq!((store.boot().id, store.boot().unclean), (2, false));
    drop(store);
    let store = open_segments(dir.path(), Durability::Never);
    assert_eq!((store.boot().id, store.boot().unclean), (3, true));
}

#[test]
fn reopening_keeps_kv_alarms_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let chan = id("channel", "news");
    let room = id("room", "r1");
    let epoch = {
        let store = open_segments(dir.path(), Durability::Always);
        apply(&store, &chan, |b| {
            b.append(1, 1, "one");
        })
        .unwrap();
        apply(&store, &room, |b| {
            b.put("k", "v").push(Write::SetAlarm { at_ms: 42 });
        })
        .unwrap();
        futures::executor::block_on(store.sync()).unwrap();
        store.log_meta(&chan).unwrap().unwrap().epoch
    };
    let store = open_segments(dir.path(), Durability::Always);
    assert_eq!(store.log_meta(&chan).unwrap().unwrap().epoch, epoch);
    assert_eq!(store.get(&room, b"k").unwrap(), Some(Bytes::from("v")));
    assert_eq!(store.next_alarm().unwrap(), Some((room.clone(), 42)));
    apply(&store, &id("channel", "later"), |b| {
        b.append(1, 0, "x");
    })
    .unwrap();
    assert!(
        store
            .log_meta(&id("channel", "later"))
            .unwrap()
            .unwrap()
            .epoch
            > epoch
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs_among_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_segments(dir.path(), Durability::Always));
    let writers: Vec<_> = (0..32u64)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let chan = id("channel", &format!("c{n}"));
                for seq in 1..=20 {
                    apply(&*store, &chan, |b| {
                        b.append(seq, seq, payload(n, seq, 64));
                    })
                    .unwrap();
                    store.sync().await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let syncs = 32 * 20;
    assert!(
        store.fsyncs() < syncs,
        "{} fsyncs for {syncs} syncs",
        store.fsyncs()
    );
}

/// Damage anywhere in a data dir, a flipped byte or a cut file, never panics and never reads
/// back as data: opening and scrubbing either succeeds with exactly what was written, or
/// fails with an error that names a file. (The `recover` fuzz target does the same with
/// arbitrary bytes.)
#[test]
fn damage_anywhere_fails_cleanly_or_reads_back_exactly_what_was_written() {
    let pristine = tempfile::tempdir().unwrap();
    {
        let store = open_segments(pristine.path(), Durability::Never);
        churn(&store, 3, 30, 10, 120);
        store.clean().unwrap();
    }
    let files: Vec<PathBuf> = fs::read_dir(pristine.path().join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let expect = |store: &SegmentStorage| -> dormouse_storage::Result<()> {
        store.scrub()?;
        for n in 0..3 {
            let chan = id("channel", &format!("c{n}"));
            let entries = store.read_log(&chan, 0, usize::MAX)?;
            assert_eq!(seqs(&entries), (21..=30).collect::<Vec<_>>(), "{chan}");
            assert!(entries.iter().all(|e| e.data == payload(n, e.seq, 120)));
        }
        Ok(())
    };
    let mut outcomes = (0, 0);
    for file in &files {
        let bytes = fs::read(file).unwrap();
        let step = (bytes.len() / 40).max(1);
        for at in (0..bytes.len()).step_by(step) {
            for damage in 0..2 {
                let dir = tempfile::tempdir().unwrap();
                let segments = dir.path().join("segments");
                fs::create_dir_all(&segments).unwrap();
                for other in &files {
                    fs::copy(other, segments.join(other.file_name().unwrap())).unwrap();
                }
                let victim = segments.join(file.file_name().unwrap());
                let mut damaged = bytes.clone();
                if damage == 0 {
                    damaged[at] ^= 0x5a;
                } else {
                    damaged.truncate(at);
                }
                fs::write(&victim, &damaged).unwrap();
                let result = SegmentStorage::open(SegmentConfig {
                    durability: Durability::Never,
                    segment_bytes: 4096,
                    clean_above_bytes: 0,
                    ..SegmentConfig::new(dir.path())
                })
                .and_then(|store| expect(&store));
                match result {
                    Ok(()) => outcomes.0 += 1,
                    Err(e) => {
                        outcomes.1 += 1;
                        let message = e.to_string();
                        assert!(
                            message.contains(&dir.path().display().to_string()),
                            "{}: {message}",
                            victim.display()
                        );
                    }
                }
            }
        }
    }
    eprintln!(
        "damage sweep: {} read back exactly, {} refused",
        outcomes.0, outcomes.1
    );
    assert!(outcomes.1 > 0, "no damage was detected at all");
}
