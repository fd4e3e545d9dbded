//! The `Storage` contract, checked against every engine.

mod support;

use std::time::Duration;

use dormouse_storage::{Bytes, Error, LogMeta, Retention, Storage, Write, WriteBatch};
use support::{apply, each_engine, id, payload, seqs};

fn append_n(
    store: &dyn Storage,
    object: &dormouse_storage::ObjectId,
    seqs: impl Iterator<Item = u64>,
    len: usize,
) {
    for seq in seqs {
        apply(store, object, |b| {
            b.append(seq, seq * 1000, payload(0, seq, len));
        })
        .unwrap();
    }
}

#[test]
fn append_and_read() {
    each_engine(|store| {
        let chan = id("channel", "news");
        assert_eq!(store.log_meta(&chan).unwrap(), None);
        assert!(store.read_log(&chan, 0, 10).unwrap().is_empty());
        assert!(store.read_log_tail(&chan, 10).unwrap().is_empty());

        append_n(store, &chan, 1..=10, 16);
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert!(meta.epoch > 0);
        assert_eq!(
            (meta.first_seq, meta.last_seq, meta.count, meta.bytes),
            (1, 10, 10, 160)
        );

        let all = store.read_log(&chan, 0, 100).unwrap();
        assert_eq!(seqs(&all), (1..=10).collect::<Vec<_>>());
        for entry in &all {
            assert_eq!(entry.timestamp_ms, entry.seq * 1000);
            assert_eq!(entry.data, payload(0, entry.seq, 16));
        }
        assert_eq!(seqs(&store.read_log(&chan, 5, 3).unwrap()), [5, 6, 7]);
        assert!(store.read_log(&chan, 11, 10).unwrap().is_empty());
        assert!(store.read_log(&chan, 1, 0).unwrap().is_empty());
        assert_eq!(seqs(&store.read_log_tail(&chan, 3).unwrap()), [8, 9, 10]);
        assert_eq!(store.read_log_tail(&chan, 100).unwrap(), all);
        assert!(store.read_log_tail(&chan, 0).unwrap().is_empty());

        // Sequence numbers may skip; reads find the next one.
        append_n(store, &chan, [20, 25].into_iter(), 16);
        assert_eq!(seqs(&store.read_log(&chan, 11, 10).unwrap()), [20, 25]);
        assert_eq!(seqs(&store.read_log(&chan, 21, 10).unwrap()), [25]);
        // Backwards by key range, across the holes.
        assert_eq!(
            seqs(&store.read_log_before(&chan, 25, 3).unwrap()),
            [9, 10, 20]
        );
        assert_eq!(seqs(&store.read_log_before(&chan, 20, 2).unwrap()), [9, 10]);
        assert_eq!(seqs(&store.read_log_before(&chan, 3, 10).unwrap()), [1, 2]);
        assert_eq!(
            seqs(&store.read_log_before(&chan, u64::MAX, 2).unwrap()),
            [20, 25]
        );
        assert!(store.read_log_before(&chan, 1, 10).unwrap().is_empty());
        assert!(store.read_log_before(&chan, 25, 0).unwrap().is_empty());

        // Another object's log is separate, including one whose name extends this one's.
        let other = id("channel", "newsy");
        append_n(store, &other, 1..=2, 4);
        assert_eq!(store.read_log(&chan, 0, 100).unwrap().len(), 12);
        assert_eq!(seqs(&store.read_log_tail(&other, 10).unwrap()), [1, 2]);
        assert_eq!(
            seqs(&store.read_log_before(&other, 100, 10).unwrap()),
            [1, 2]
        );
    });
}

#[test]
fn trim_by_count() {
    each_engine(|store| {
        let chan = id("channel", "c");
        append_n(store, &chan, 1..=10, 10);
        let keep_4 = Retention {
            max_events: Some(4),
            ..Retention::default()
        };
        apply(store, &chan, |b| {
            b.trim(keep_4, 0);
        })
        .unwrap();
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert_eq!(
            (meta.first_seq, meta.last_seq, meta.count, meta.bytes),
            (7, 10, 4, 40)
        );
        assert_eq!(seqs(&store.read_log(&chan, 0, 100).unwrap()), [7, 8, 9, 10]);

        // Append and trim in one batch: the trim sees the new entry.
        apply(store, &chan, |b| {
            b.append(11, 0, payload(0, 11, 10)).trim(keep_4, 0);
        })
        .unwrap();
        assert_eq!(
            seqs(&store.read_log(&chan, 0, 100).unwrap()),
            [8, 9, 10, 11]
        );
        assert_eq!(store.log_meta(&chan).unwrap().unwrap().first_seq, 8);

        // Within bounds: nothing changes.
        apply(store, &chan, |b| {
            b.trim(keep_4, 0);
        })
        .unwrap();
        assert_eq!(store.log_meta(&chan).unwrap().unwrap().count, 4);

        // A trim of an object without a log is a no-op.
        apply(store, &id("channel", "none"), |b| {
            b.trim(keep_4, 0);
        })
        .unwrap();
        assert_eq!(store.log_meta(&id("channel", "none")).unwrap(), None);
    });
}

#[test]
fn trim_by_bytes_keeps_the_newest_entry() {
    each_engine(|store| {
        let chan = id("channel", "c");
        append_n(store, &chan, 1..=5, 100);
        let max_250 = Retention {
            max_bytes: Some(250),
            ..Retention::default()
        };
        apply(store, &chan, |b| {
            b.trim(max_250, 0);
        })
        .unwrap();
        assert_eq!(seqs(&store.read_log(&chan, 0, 100).unwrap()), [4, 5]);
        assert_eq!(store.log_meta(&chan).unwrap().unwrap().bytes, 200);

        // One entry larger than the bound: everything older goes, it stays.
        apply(store, &chan, |b| {
            b.append(6, 0, payload(0, 6, 1000)).trim(max_250, 0);
        })
        .unwrap();
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert_eq!(
            (meta.first_seq, meta.last_seq, meta.count, meta.bytes),
            (6, 6, 1, 1000)
        );
        assert_eq!(store.read_log_tail(&chan, 10).unwrap()[0].data.len(), 1000);
    });
}

#[test]
fn trim_by_age() {
    each_engine(|store| {
        let chan = id("channel", "c");
        // Timestamps 1000, 2000, ... 5000.
        append_n(store, &chan, 1..=5, 8);
        let max_age = |ms| Retention {
            max_age: Some(Duration::from_millis(ms)),
            ..Retention::default()
        };
        apply(store, &chan, |b| {
            b.trim(max_age(2500), 5000);
        })
        .unwrap();
        assert_eq!(seqs(&store.read_log(&chan, 0, 100).unwrap()), [3, 4, 5]);

        // Age may drop every entry, the newest too; the log (and its epoch) stay.
        let epoch = store.log_meta(&chan).unwrap().unwrap().epoch;
        apply(store, &chan, |b| {
            b.trim(max_age(1), 1_000_000);
        })
        .unwrap();
        assert_eq!(
            store.log_meta(&chan).unwrap(),
            Some(LogMeta {
                epoch,
                first_seq: 6,
                last_seq: 5,
                count: 0,
                bytes: 0,
                oldest_ms: 0,
            })
        );
        assert!(store.read_log(&chan, 0, 10).unwrap().is_empty());
        assert!(store.read_log_tail(&chan, 10).unwrap().is_empty());

        // The next append continues the same log.
        append_n(store, &chan, [9].into_iter(), 8);
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert_eq!(
            (meta.epoch, meta.first_seq, meta.last_seq, meta.count),
            (epoch, 9, 9, 1)
        );
    });
}

#[test]
fn trim_applies_every_bound() {
    each_engine(|store| {
        let chan = id("channel", "c");
        append_n(store, &chan, 1..=10, 10);
        apply(store, &chan, |b| {
            b.trim(
                Retention {
                    max_events: Some(8),
                    max_bytes: Some(65),
                    max_age: Some(Duration::from_millis(7000)),
                },
                10_000,
            );
        })
        .unwrap();
        // Count keeps 3..=10, bytes keeps 5..=10, age keeps ts >= 3000 (3..=10).
        assert_eq!(
            seqs(&store.read_log(&chan, 0, 100).unwrap()),
            [5, 6, 7, 8, 9, 10]
        );
    });
}

#[test]
fn epochs_change_when_a_log_is_recreated_and_always_increase() {
    each_engine(|store| {
        let chan = id("channel", "c");
        append_n(store, &chan, 1..=3, 8);
        let first = store.log_meta(&chan).unwrap().unwrap().epoch;

        apply(store, &chan, |b| {
            b.push(Write::DeleteLog);
        })
        .unwrap();
        assert_eq!(store.log_meta(&chan).unwrap(), None);
        assert!(store.read_log(&chan, 0, 10).unwrap().is_empty());
        assert!(store.list_logs("channel", None, 10).unwrap().is_empty());

        // Sequence numbers start over in the new epoch.
        append_n(store, &chan, 1..=1, 8);
        let second = store.log_meta(&chan).unwrap().unwrap().epoch;
        assert!(second > first, "{second} > {first}");

        // Delete and recreate in one batch: only the new entry remains.
        apply(store, &chan, |b| {
            b.push(Write::DeleteLog).append(1, 0, "fresh");
        })
        .unwrap();
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert!(meta.epoch > second);
        assert_eq!(
            (meta.first_seq, meta.last_seq, meta.count, meta.bytes),
            (1, 1, 1, 5)
        );
        let entries = store.read_log(&chan, 0, 10).unwrap();
        assert_eq!(seqs(&entries), [1]);
        assert_eq!(entries[0].data, Bytes::from("fresh"));

        // Epochs increase across objects too.
        let other = id("channel", "other");
        append_n(store, &other, 1..=1, 8);
        assert!(store.log_meta(&other).unwrap().unwrap().epoch > meta.epoch);

        // Deleting a log that does not exist is fine.
        apply(store, &id("channel", "never"), |b| {
            b.push(Write::DeleteLog);
        })
        .unwrap();
    });
}

#[test]
fn a_non_increasing_seq_rejects_the_whole_batch() {
    each_engine(|store| {
        let chan = id("channel", "c");
        append_n(store, &chan, 1..=3, 8);
        let before = store.log_meta(&chan).unwrap();

        let err = apply(store, &chan, |b| {
            b.put("k", "v").append(4, 0, "ok").append(4, 0, "dup");
        })
        .unwrap_err();
        match &err {
            Error::SeqNotIncreasing { id, seq, last } => {
                assert_eq!((id, *seq, *last), (&chan, 4, 4));
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("channel/c"), "{err}");
        assert_eq!(store.get(&chan, b"k").unwrap(), None);
        assert_eq!(store.log_meta(&chan).unwrap(), before);
        assert_eq!(seqs(&store.read_log(&chan, 0, 10).unwrap()), [1, 2, 3]);

        let err = apply(store, &chan, |b| {
            b.append(2, 0, "old");
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::SeqNotIncreasing {
                    seq: 2,
                    last: 3,
                    ..
                }
            ),
            "{err}"
        );

        // A new log's last seq is 0, so seq 0 is not increasing.
        let fresh = id("channel", "fresh");
        let err = apply(store, &fresh, |b| {
            b.append(0, 0, "zero");
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::SeqNotIncreasing {
                    seq: 0,
                    last: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(store.log_meta(&fresh).unwrap(), None);
    });
}

#[test]
fn kv_get_put_delete_and_list() {
    each_engine(|store| {
        let obj = id("counter", "x");
        assert_eq!(store.get(&obj, b"a/1").unwrap(), None);
        apply(store, &obj, |b| {
            for k in ["a/3", "a/1", "a/5", "a/2", "a/4", "b/1", "a"] {
                b.put(k, format!("value of {k}"));
            }
            b.put(vec![b'a', b'/', 0xff], "high");
        })
        .unwrap();
        assert_eq!(
            store.get(&obj, b"a/1").unwrap(),
            Some(Bytes::from("value of a/1"))
        );

        let keys = |records: Vec<(Vec<u8>, Bytes)>| -> Vec<Vec<u8>> {
            records.into_iter().map(|(k, _)| k).collect()
        };
        let k = |s: &str| s.as_bytes().to_vec();

        let page = store.list(&obj, b"a/", None, 2).unwrap();
        assert_eq!(page[0], (k("a/1"), Bytes::from("value of a/1")));
        assert_eq!(keys(page), [k("a/1"), k("a/2")]);
        assert_eq!(
            keys(store.list(&obj, b"a/", Some(b"a/2"), 2).unwrap()),
            [k("a/3"), k("a/4")]
        );
        assert_eq!(
            keys(store.list(&obj, b"a/", Some(b"a/4"), 10).unwrap()),
            [k("a/5"), vec![b'a', b'/', 0xff]]
        );
        assert!(
            store
                .list(&obj, b"a/", Some(&[b'a', b'/', 0xff]), 10)
                .unwrap()
                .is_empty()
        );
        // A cursor before the prefix starts at the prefix; one after it yields nothing.
        assert_eq!(
            keys(store.list(&obj, b"a/", Some(b"0"), 1).unwrap()),
            [k("a/1")]
        );
        assert!(store.list(&obj, b"a/", Some(b"c"), 10).unwrap().is_empty());
        assert_eq!(store.list(&obj, b"", None, 100).unwrap().len(), 8);
        assert_eq!(keys(store.list(&obj, b"", None, 1).unwrap()), [k("a")]);
        assert!(store.list(&obj, b"", None, 0).unwrap().is_empty());

        // Paging through everything with the last key as cursor yields each key once.
        let mut paged = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let page = store.list(&obj, b"", cursor.as_deref(), 3).unwrap();
            let Some((last, _)) = page.last() else { break };
            cursor = Some(last.clone());
            paged.extend(keys(page));
        }
        assert_eq!(paged, keys(store.list(&obj, b"", None, 100).unwrap()));

        apply(store, &obj, |b| {
            b.delete("a/3").delete("absent");
        })
        .unwrap();
        assert_eq!(store.get(&obj, b"a/3").unwrap(), None);
        assert_eq!(store.list(&obj, b"a/", None, 100).unwrap().len(), 5);

        // Put then delete, and delete then put, of one key in one batch: the last write wins.
        apply(store, &obj, |b| {
            b.put("p", "1").delete("p").delete("q").put("q", "2");
        })
        .unwrap();
        assert_eq!(store.get(&obj, b"p").unwrap(), None);
        assert_eq!(store.get(&obj, b"q").unwrap(), Some(Bytes::from("2")));
    });
}

#[test]
fn kv_of_different_objects_is_separate() {
    each_engine(|store| {
        let x = id("counter", "x");
        let xy = id("counter", "xy");
        let other_ns = id("counter2", "x");
        for (obj, v) in [(&x, "x"), (&xy, "xy"), (&other_ns, "ns")] {
            apply(store, obj, |b| {
                b.put("k", v).put("k2", v);
            })
            .unwrap();
        }
        apply(store, &x, |b| {
            b.push(Write::DeleteAllKv);
        })
        .unwrap();
        assert!(store.list(&x, b"", None, 10).unwrap().is_empty());
        assert_eq!(store.get(&xy, b"k").unwrap(), Some(Bytes::from("xy")));
        assert_eq!(store.get(&other_ns, b"k").unwrap(), Some(Bytes::from("ns")));
        assert_eq!(store.list(&xy, b"", None, 10).unwrap().len(), 2);

        // Delete-all sees puts earlier in its batch, and puts after it survive.
        apply(store, &xy, |b| {
            b.put("k3", "new")
                .push(Write::DeleteAllKv)
                .put("k4", "after");
        })
        .unwrap();
        assert_eq!(
            store.list(&xy, b"", None, 10).unwrap(),
            [(b"k4".to_vec(), Bytes::from("after"))]
        );
    });
}

#[test]
fn a_batch_is_atomic_across_records() {
    each_engine(|store| {
        let obj = id("room", "r");
        apply(store, &obj, |b| {
            b.put("a", "1")
                .put("b", "2")
                .append(1, 0, "event")
                .push(Write::SetAlarm { at_ms: 10 })
                .delete("b");
        })
        .unwrap();
        assert_eq!(store.get(&obj, b"a").unwrap(), Some(Bytes::from("1")));
        assert_eq!(store.get(&obj, b"b").unwrap(), None);
        assert_eq!(store.read_log(&obj, 0, 10).unwrap().len(), 1);
        assert_eq!(store.alarm(&obj).unwrap(), Some(10));

        // A batch that fails validation part-way leaves every record as it was.
        let err = apply(store, &obj, |b| {
            b.put("a", "changed")
                .push(Write::DeleteAllKv)
                .push(Write::SetAlarm { at_ms: 99 })
                .append(2, 0, "ok")
                .append(1, 0, "bad");
        })
        .unwrap_err();
        assert!(matches!(err, Error::SeqNotIncreasing { .. }), "{err}");
        assert_eq!(store.get(&obj, b"a").unwrap(), Some(Bytes::from("1")));
        assert_eq!(store.alarm(&obj).unwrap(), Some(10));
        assert_eq!(store.next_alarm().unwrap(), Some((obj.clone(), 10)));
        assert_eq!(seqs(&store.read_log(&obj, 0, 10).unwrap()), [1]);

        // An empty batch is fine.
        store.apply(&obj, WriteBatch::new()).unwrap();
    });
}

#[test]
fn alarms() {
    each_engine(|store| {
        let (a, b, c) = (id("timer", "a"), id("timer", "b"), id("timer", "c"));
        assert_eq!(store.next_alarm().unwrap(), None);
        for (obj, at_ms) in [(&a, 300), (&b, 100), (&c, 200)] {
            apply(store, obj, |w| {
                w.push(Write::SetAlarm { at_ms });
            })
            .unwrap();
        }
        assert_eq!(store.alarm(&a).unwrap(), Some(300));
        assert_eq!(store.next_alarm().unwrap(), Some((b.clone(), 100)));
        assert_eq!(store.due_alarms(99, 10).unwrap(), []);
        assert_eq!(store.due_alarms(100, 10).unwrap(), [(b.clone(), 100)]);
        assert_eq!(
            store.due_alarms(1000, 10).unwrap(),
            [(b.clone(), 100), (c.clone(), 200), (a.clone(), 300)]
        );
        assert_eq!(store.due_alarms(u64::MAX, 2).unwrap().len(), 2);
        assert!(store.due_alarms(1000, 0).unwrap().is_empty());

        // Replacing moves the index entry; setting the same time twice leaves one entry.
        apply(store, &a, |w| {
            w.push(Write::SetAlarm { at_ms: 50 });
        })
        .unwrap();
        apply(store, &c, |w| {
            w.push(Write::SetAlarm { at_ms: 200 });
        })
        .unwrap();
        assert_eq!(store.next_alarm().unwrap(), Some((a.clone(), 50)));
        assert_eq!(
            store.due_alarms(u64::MAX, 10).unwrap(),
            [(a.clone(), 50), (b.clone(), 100), (c.clone(), 200)]
        );

        apply(store, &b, |w| {
            w.push(Write::DeleteAlarm);
        })
        .unwrap();
        assert_eq!(store.alarm(&b).unwrap(), None);
        assert_eq!(
            store.due_alarms(u64::MAX, 10).unwrap(),
            [(a.clone(), 50), (c.clone(), 200)]
        );

        // Set then delete in one batch, and deleting an absent alarm.
        apply(store, &c, |w| {
            w.push(Write::SetAlarm { at_ms: 1 })
                .push(Write::DeleteAlarm);
        })
        .unwrap();
        apply(store, &b, |w| {
            w.push(Write::DeleteAlarm);
        })
        .unwrap();
        assert_eq!(store.alarm(&c).unwrap(), None);
        assert_eq!(store.due_alarms(u64::MAX, 10).unwrap(), [(a.clone(), 50)]);
        assert_eq!(store.next_alarm().unwrap(), Some((a.clone(), 50)));
    });
}

#[test]
fn list_logs_pages_through_one_namespace() {
    each_engine(|store| {
        for name in ["b", "a", "cc", "aa", "z", "é"] {
            append_n(store, &id("channel", name), 1..=1, 1);
        }
        // Neighbouring namespaces, and an object with only key/value records.
        append_n(store, &id("chan", "x"), 1..=1, 1);
        append_n(store, &id("channel2", "y"), 1..=1, 1);
        apply(store, &id("channel", "kv-only"), |b| {
            b.put("k", "v");
        })
        .unwrap();

        // Storage order: by byte length, then bytes ("é" is two bytes).
        let expected = ["a", "b", "z", "aa", "cc", "é"];
        assert_eq!(store.list_logs("channel", None, 100).unwrap(), expected);
        let mut paged = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = store.list_logs("channel", cursor.as_deref(), 2).unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            cursor = Some(last.clone());
            paged.extend(page);
        }
        assert_eq!(paged, expected);
        // A cursor that is not an existing name still pages from its position.
        assert_eq!(
            store.list_logs("channel", Some("c"), 2).unwrap(),
            ["z", "aa"]
        );
        assert!(store.list_logs("channel", None, 0).unwrap().is_empty());
        assert_eq!(store.list_logs("chan", None, 10).unwrap(), ["x"]);
        assert!(store.list_logs("nothing", None, 10).unwrap().is_empty());
    });
}

#[test]
fn names_too_long_for_a_key_are_errors_not_panics() {
    each_engine(|store| {
        let long = id("channel", &"n".repeat(70_000));
        let err = apply(store, &long, |b| {
            b.append(1, 0, "x");
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NameTooLong {
                    what: "name",
                    len: 70_000
                }
            ),
            "{err}"
        );
        assert!(store.log_meta(&long).is_err());
        assert!(store.read_log(&long, 0, 1).is_err());
        assert!(store.list_logs(&"n".repeat(70_000), None, 1).is_err());
    });
}

#[test]
fn sync_resolves() {
    each_engine(|store| {
        apply(store, &id("channel", "c"), |b| {
            b.append(1, 0, "x");
        })
        .unwrap();
        futures::executor::block_on(store.sync()).unwrap();
    });
}

#[test]
fn a_log_created_with_an_allocated_epoch_knows_it_before_commit() {
    each_engine(|store| {
        let chan = id("channel", "fresh");
        append_n(store, &chan, 1..=3, 8);
        let old = store.log_meta(&chan).unwrap().unwrap().epoch;

        let epoch = store.allocate_epoch().unwrap();
        assert!(epoch > old, "allocated {epoch} after {old}");
        let again = store.allocate_epoch().unwrap();
        assert!(again > epoch);

        // Replaces the old log: entries gone, the chosen epoch in place, seqs restart at 1.
        apply(store, &chan, |b| {
            b.push(Write::CreateLog { epoch });
            b.append(1, 0, payload(0, 1, 8));
        })
        .unwrap();
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert_eq!(
            (meta.epoch, meta.first_seq, meta.last_seq, meta.count),
            (epoch, 1, 1, 1)
        );
        assert_eq!(seqs(&store.read_log(&chan, 0, 10).unwrap()), [1]);

        // An empty created log reads as empty with first = last + 1.
        let empty = id("channel", "empty");
        let epoch = store.allocate_epoch().unwrap();
        apply(store, &empty, |b| {
            b.push(Write::CreateLog { epoch });
        })
        .unwrap();
        let meta = store.log_meta(&empty).unwrap().unwrap();
        assert_eq!((meta.first_seq, meta.last_seq, meta.count), (1, 0, 0));

        // Epochs handed out later still increase past every one used.
        let later = id("channel", "later");
        append_n(store, &later, 1..=1, 8);
        assert!(store.log_meta(&later).unwrap().unwrap().epoch > again);
    });
}
