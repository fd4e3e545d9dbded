//! The segment engine against `MemoryStorage`, op by op: random batches on a handful of
//! objects, with checkpoints, cleaning and reopening mixed in, and after every step the
//! whole contents read back through the `Storage` trait must be the same (logs entry by
//! entry, key/value records, alarms, the alarm index, the list of logs). Tiny segments,
//! cache and change budget make every step go through rotation, eviction, checkpoints and
//! the cleaner.

use std::path::Path;

use dormouse_storage::{
    Bytes, Durability, MemoryStorage, ObjectId, Retention, SegmentConfig, SegmentStorage, Storage,
    Write, WriteBatch,
};
use proptest::prelude::*;

const OBJECTS: [(&str, &str); 5] = [
    ("channel", "a"),
    ("channel", "bb"),
    ("channel", "c"),
    ("room", "a"),
    ("room", "zz"),
];

#[derive(Debug, Clone)]
enum Step {
    Batch(usize, Vec<Op>),
    Checkpoint,
    Clean,
    Reopen,
}

#[derive(Debug, Clone)]
enum Op {
    Append { count: u64, len: usize },
    Trim { keep: u64 },
    TrimBytes { max: u64 },
    Put { key: u8, len: usize },
    Delete { key: u8 },
    DeleteAllKv,
    SetAlarm { at: u64 },
    DeleteAlarm,
    DeleteLog,
    CreateLog,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1..5u64, prop_oneof![0..20usize, 20..300usize, 1000..5000usize])
            .prop_map(|(count, len)| Op::Append { count, len }),
        3 => (1..30u64).prop_map(|keep| Op::Trim { keep }),
        1 => (100..3000u64).prop_map(|max| Op::TrimBytes { max }),
        4 => (any::<u8>(), prop_oneof![0..20usize, 20..500usize]).prop_map(|(key, len)| Op::Put { key, len }),
        2 => any::<u8>().prop_map(|key| Op::Delete { key }),
        1 => Just(Op::DeleteAllKv),
        2 => (0..1000u64).prop_map(|at| Op::SetAlarm { at }),
        1 => Just(Op::DeleteAlarm),
        1 => Just(Op::DeleteLog),
        1 => Just(Op::CreateLog),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        40 => (0..OBJECTS.len(), proptest::collection::vec(op(), 1..4)).prop_map(|(o, ops)| Step::Batch(o, ops)),
        2 => Just(Step::Checkpoint),
        2 => Just(Step::Clean),
        1 => Just(Step::Reopen),
    ]
}

fn open(path: &Path) -> SegmentStorage {
    SegmentStorage::open(SegmentConfig {
        durability: Durability::Never,
        segment_bytes: 4096,
        clean_above_bytes: 0,
        cache_bytes: 4096,
        dirty_bytes: 2048,
        checkpoint_bytes: 16 * 1024,
        ..SegmentConfig::new(path)
    })
    .unwrap()
}

/// Turns ops into a batch for both engines, keeping each object's next seq and epochs
/// deterministic (epochs come from the test, not the clock, so both engines agree).
struct Gen {
    next_seq: [u64; OBJECTS.len()],
    next_epoch: u64,
    value: u8,
}

impl Gen {
    fn batch(&mut self, o: usize, ops: &[Op]) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for op in ops {
            match *op {
                Op::Append { count, len } => {
                    for _ in 0..count {
                        self.next_seq[o] += 1;
                        let seq = self.next_seq[o];
                        self.value = self.value.wrapping_add(1);
                        batch.append(seq, seq * 10, vec![self.value; len]);
                    }
                }
                Op::Trim { keep } => {
                    batch.trim(
                        Retention {
                            max_events: Some(keep),
                            ..Retention::default()
                        },
                        0,
                    );
                }
                Op::TrimBytes { max } => {
                    batch.trim(
                        Retention {
                            max_bytes: Some(max),
                            ..Retention::default()
                        },
                        0,
                    );
                }
                Op::Put { key, len } => {
                    self.value = self.value.wrapping_add(1);
                    batch.put(vec![b'k', key % 40], vec![self.value; len]);
                }
                Op::Delete { key } => {
                    batch.delete(vec![b'k', key % 40]);
                }
                Op::DeleteAllKv => {
                    batch.push(Write::DeleteAllKv);
                }
                Op::SetAlarm { at } => {
                    batch.push(Write::SetAlarm { at_ms: at });
                }
                Op::DeleteAlarm => {
                    batch.push(Write::DeleteAlarm);
                }
                Op::DeleteLog => {
                    batch.push(Write::DeleteLog);
                }
                Op::CreateLog => {
                    self.next_epoch += 1;
                    batch.push(Write::CreateLog {
                        epoch: self.next_epoch,
                    });
                    self.next_seq[o] = 0;
                }
            }
        }
        batch
    }
}

/// Everything a store holds for the objects, read through the trait.
#[derive(Debug, PartialEq)]
struct Contents {
    objects: Vec<ObjectContents>,
    due: Vec<(ObjectId, u64)>,
    logs: Vec<(String, Vec<String>)>,
}

#[derive(Debug, PartialEq)]
struct ObjectContents {
    meta: Option<(u64, u64, u64, u64)>,
    entries: Vec<(u64, u64, Bytes)>,
    tail: Vec<u64>,
    kv: Vec<(Vec<u8>, Bytes)>,
    alarm: Option<u64>,
}

fn contents(store: &dyn Storage) -> Contents {
    let objects = OBJECTS
        .iter()
        .map(|(ns, name)| {
            let id = ObjectId::new(*ns, *name);
            ObjectContents {
                // The epoch of a log begun by an append comes from the clock: compare the
                // bounds, not the epoch.
                meta: store
                    .log_meta(&id)
                    .unwrap()
                    .map(|m| (m.first_seq, m.last_seq, m.count, m.bytes)),
                entries: store
                    .read_log(&id, 0, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.seq, e.timestamp_ms, e.data))
                    .collect(),
                tail: store
                    .read_log_tail(&id, 3)
                    .unwrap()
                    .into_iter()
                    .map(|e| e.seq)
                    .collect(),
                kv: store.list(&id, b"", None, usize::MAX).unwrap(),
                alarm: store.alarm(&id).unwrap(),
            }
        })
        .collect();
    let logs = ["channel", "room"]
        .into_iter()
        .map(|ns| {
            (
                ns.to_owned(),
                store.list_logs(ns, None, usize::MAX).unwrap(),
            )
        })
        .collect();
    Contents {
        objects,
        due: store.due_alarms(u64::MAX, usize::MAX).unwrap(),
        logs,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn the_segment_engine_holds_what_memory_storage_holds_after_every_step(
        steps in proptest::collection::vec(step(), 1..250),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = open(dir.path());
        let model = MemoryStorage::new();
        let mut batches = Gen { next_seq: [0; OBJECTS.len()], next_epoch: 1_000, value: 0 };
        for step in steps {
            match step {
                Step::Batch(o, ops) => {
                    let batch = batches.batch(o, &ops);
                    let id = ObjectId::new(OBJECTS[o].0, OBJECTS[o].1);
                    let ours = engine.apply(&id, batch.clone()).map_err(|e| e.to_string());
                    let theirs = model.apply(&id, batch).map_err(|e| e.to_string());
                    prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?} vs {:?}", ours, theirs);
                }
                Step::Checkpoint => engine.checkpoint().unwrap(),
                Step::Clean => engine.clean().unwrap(),
                Step::Reopen => {
                    drop(engine);
                    engine = open(dir.path());
                }
            }
            prop_assert_eq!(contents(&engine), contents(&model));
        }
        engine.clean().unwrap();
        engine.checkpoint().unwrap();
        let stats = engine.stats();
        prop_assert!(stats.disk_bytes <= 2 * stats.live_bytes + 3 * 4096 + 8192, "{:?}", stats);
        drop(engine);
        let engine = open(dir.path());
        prop_assert_eq!(contents(&engine), contents(&model));
    }
}
