//! What only the sled engine has: a data dir that outlives the process, its lock, its schema
//! record, and group commit.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dormouse_storage::{Bytes, Durability, Error, SledConfig, SledStorage, Storage, Write, key};
use support::{apply, id, open_sled, payload, seqs};

#[test]
fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let chan = id("channel", "news");
    let room = id("room", "r1");
    let epoch = {
        let store = open_sled(dir.path(), Durability::Always);
        for seq in 1..=50 {
            apply(&store, &chan, |b| {
                b.append(seq, seq, payload(1, seq, 100));
            })
            .unwrap();
        }
        apply(&store, &room, |b| {
            b.put("k", "v").push(Write::SetAlarm { at_ms: 42 });
        })
        .unwrap();
        futures::executor::block_on(store.sync()).unwrap();
        store.log_meta(&chan).unwrap().unwrap().epoch
    };

    let store = open_sled(dir.path(), Durability::Always);
    let meta = store.log_meta(&chan).unwrap().unwrap();
    assert_eq!(
        (
            meta.epoch,
            meta.first_seq,
            meta.last_seq,
            meta.count,
            meta.bytes
        ),
        (epoch, 1, 50, 50, 5000)
    );
    let entries = store.read_log(&chan, 0, 100).unwrap();
    assert_eq!(seqs(&entries), (1..=50).collect::<Vec<_>>());
    assert!(entries.iter().all(|e| e.data == payload(1, e.seq, 100)));
    assert_eq!(store.get(&room, b"k").unwrap(), Some(Bytes::from("v")));
    assert_eq!(store.next_alarm().unwrap(), Some((room.clone(), 42)));
    assert_eq!(store.list_logs("channel", None, 10).unwrap(), ["news"]);

    // A log created after the restart gets a later epoch than any before it.
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
    assert!(store.size_on_disk().unwrap() > 5000);
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open_sled(dir.path(), Durability::Never);
    let err = SledStorage::open(SledConfig::new(dir.path())).unwrap_err();
    assert!(
        matches!(&err, Error::Locked { path } if path == dir.path()),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("in use by another dormouse process"),
        "{message}"
    );

    drop(first);
    let reopened = open_sled(dir.path(), Durability::Never);
    assert_eq!(reopened.path(), dir.path());
}

/// Opens sled directly, as another tool (or an older dormouse) would, retrying while the
/// store that just closed is still releasing sled's own lock.
fn raw_sled(path: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying sled::open: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("sled::open: {e}"),
        }
    }
}

#[test]
fn a_data_dir_of_another_schema_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_sled(dir.path(), Durability::Never));
    {
        let db = raw_sled(&dir.path().join("sled"));
        db.insert(key::schema_version_key(), &2u32.to_be_bytes()[..])
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledStorage::open(SledConfig::new(dir.path())).unwrap_err();
    match &err {
        Error::SchemaMismatch {
            path,
            found,
            expected,
        } => {
            assert_eq!(path, dir.path());
            assert_eq!((*found, *expected), (2, key::CURRENT_SCHEMA));
        }
        other => panic!("unexpected error {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("version 2"), "{message}");
    assert!(message.contains("new, empty data dir"), "{message}");

    // The refused open released the lock: fixing the record makes the dir usable again.
    {
        let db = raw_sled(&dir.path().join("sled"));
        db.insert(
            key::schema_version_key(),
            &key::CURRENT_SCHEMA.to_be_bytes()[..],
        )
        .unwrap();
        db.flush().unwrap();
    }
    open_sled(dir.path(), Durability::Never);
}

#[test]
fn a_foreign_sled_db_without_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw_sled(&dir.path().join("sled"));
        db.insert(b"something", &b"else"[..]).unwrap();
        db.flush().unwrap();
    }
    let err = SledStorage::open(SledConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs_among_concurrent_writers() {
    const WRITERS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_sled(dir.path(), Durability::Always));
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS as usize));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|n| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let chan = id("channel", &format!("c{n}"));
                apply(&*store, &chan, |b| {
                    b.append(1, 0, payload(n, 1, 256));
                })
                .unwrap();
                barrier.wait().await;
                store.sync().await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
    let fsyncs = store.fsyncs();
    eprintln!("{fsyncs} fsyncs for {WRITERS} writers");
    assert!(
        (1..WRITERS).contains(&fsyncs),
        "{fsyncs} fsyncs for {WRITERS} writers"
    );
}

#[test]
fn without_always_sync_resolves_at_once_and_never_fsyncs() {
    for durability in [
        Durability::Never,
        Durability::Interval(Duration::from_millis(50)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sled(dir.path(), durability);
        assert_eq!(store.durability(), durability);
        apply(&store, &id("channel", "c"), |b| {
            b.append(1, 0, "x");
        })
        .unwrap();
        futures::executor::block_on(store.sync()).unwrap();
        assert_eq!(store.fsyncs(), 0);
    }
}

#[test]
fn config_defaults() {
    let config = SledConfig::new("/data");
    assert_eq!(config.cache_capacity_bytes, 64 * 1024 * 1024);
    assert_eq!(config.durability, Durability::Always);
}

#[test]
fn a_crash_is_told_apart_from_a_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_sled(dir.path(), Durability::Never);
    assert_eq!(
        store.boot(),
        dormouse_storage::Boot {
            id: 1,
            unclean: false
        },
        "a new data dir has no previous run"
    );
    store.close().unwrap();
    drop(store);

    let store = open_sled(dir.path(), Durability::Never);
    assert_eq!(store.boot().id, 2);
    assert!(!store.boot().unclean, "closed cleanly");
    // Dropped without close: as far as the next run can tell, a crash.
    drop(store);

    let store = open_sled(dir.path(), Durability::Never);
    assert_eq!(store.boot().id, 3);
    assert!(store.boot().unclean);
    store.close().unwrap();
    drop(store);
    assert!(!open_sled(dir.path(), Durability::Never).boot().unclean);
}
