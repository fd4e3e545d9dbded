//! Objects' storage in cluster mode on a real three-server NATS cluster: an object's records
//! move between nodes whole (log bounds, entries, key/value records), through images and
//! records split over several messages; a former owner's write is refused and never seen by
//! the next owner; a channel's event ids stay valid from one node to the next.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dormouse_actors::channel::{
    Channel, ChannelEnv, ChannelRequest, ChannelResponse, NewMessage, Range, Start,
};
use dormouse_cluster::{
    ClusterStorage, Directory, DirectorySpec, FencedLog, JournalSpec, LogSpec, Membership,
    NatsSettings, NodeId, connect, take_over,
};
use dormouse_runtime::{NamespaceConfig, Runtime};
use dormouse_storage::{
    Error, LogEntry, LogMeta, MemoryStorage, ObjectId, Retention, Storage, Write, WriteBatch,
};
use dormouse_testkit::nats::NatsCluster;

fn directory_spec() -> DirectorySpec {
    DirectorySpec {
        prefix: "dm".into(),
        replicas: 3,
        node_ttl: Duration::from_secs(2),
    }
}

fn journal_spec() -> JournalSpec {
    JournalSpec {
        shards: 2,
        // Small, so the tests write images and load through them.
        image_every: 4,
        image_min_bytes: 4 * 1024,
        ..JournalSpec::new("dm", 3)
    }
}

/// One Dormouse node's storage, with its own connection and membership.
async fn node(cluster: &NatsCluster, name: &str) -> ClusterStorage {
    let nats = connect(&NatsSettings::new(cluster.urls(), name))
        .await
        .expect("connect");
    let me = NodeId::start(name);
    let spec = directory_spec();
    let membership =
        Arc::new(retrying("join", || Membership::join(&nats, &spec, me.clone())).await);
    let directory = retrying("open the directory", || Directory::open(&nats, &spec)).await;
    retrying("open the journal", || {
        ClusterStorage::open(&nats, membership.clone(), directory.clone(), journal_spec())
    })
    .await
}

/// `step` until it succeeds, for a while: a NATS cluster that just formed may still be
/// electing the leaders of new streams, and a node retries the same way at start.
async fn retrying<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    step: impl Fn() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match step().await {
            Ok(done) => return done,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// The stream that holds `subject`, opened by a third party (as another node would).
async fn journal_stream(cluster: &NatsCluster, subject: &str) -> FencedLog {
    let nats = connect(&NatsSettings::new(cluster.urls(), "c"))
        .await
        .unwrap();
    let shard = subject.split('.').nth(2).unwrap();
    FencedLog::open(
        &nats,
        &LogSpec {
            name: format!("DM_OBJ_{shard}"),
            subjects: vec![format!("dm.obj.{shard}.>")],
            replicas: 3,
            duplicate_window: journal_spec().duplicate_window,
            republish: true,
        },
    )
    .await
    .unwrap()
}

/// Everything a reader can see of one object.
#[derive(Debug, PartialEq)]
struct Contents {
    meta: Option<LogMeta>,
    entries: Vec<LogEntry>,
    kv: Vec<(Vec<u8>, Bytes)>,
    alarm: Option<u64>,
}

fn contents(storage: &dyn Storage, id: &ObjectId) -> Contents {
    Contents {
        meta: storage.log_meta(id).unwrap(),
        entries: storage.read_log(id, 0, usize::MAX).unwrap(),
        kv: storage.list(id, b"", None, usize::MAX).unwrap(),
        alarm: storage.alarm(id).unwrap(),
    }
}

/// Applies `batch` and waits for the journal to acknowledge it.
async fn commit(storage: &ClusterStorage, id: &ObjectId, batch: WriteBatch) -> Result<(), Error> {
    storage.apply(id, batch)?;
    storage.sync_object(id).await
}

/// A small deterministic generator, so a failure names a seed that replays it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A batch like the ones objects make: appends with increasing seqs, trims, puts and
/// deletes, now and then a log recreated or every key dropped.
fn random_batch(rng: &mut Rng, next_seq: &mut u64, round: u64) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for _ in 0..1 + rng.below(4) {
        match rng.below(20) {
            0 => {
                batch.push(Write::CreateLog {
                    epoch: 1_000 + round,
                });
                *next_seq = 2;
            }
            1 => {
                batch.push(Write::DeleteAllKv);
            }
            2..=4 => {
                batch.trim(
                    Retention {
                        max_events: Some(1 + rng.below(12)),
                        max_bytes: Some(200 + rng.below(2_000)),
                        max_age: None,
                    },
                    round,
                );
            }
            5..=7 => {
                batch.delete(format!("k{}", rng.below(10)).into_bytes());
            }
            8..=12 => {
                let value = vec![b'v'; rng.below(300) as usize];
                batch.put(format!("k{}", rng.below(10)).into_bytes(), value);
            }
            _ => {
                let data = vec![b'e'; rng.below(500) as usize];
                batch.append(*next_seq, round, data);
                *next_seq += 1 + rng.below(2);
            }
        }
    }
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_moves_between_nodes_whole_through_commits_and_images() {
    let cluster = NatsCluster::start(3).await;
    let nodes = [node(&cluster, "a").await, node(&cluster, "b").await];
    let model = MemoryStorage::new();
    let ids: Vec<ObjectId> = (0..3)
        .map(|i| ObjectId::new("test", format!("obj.{i}:x")))
        .collect();
    let mut seqs = vec![1u64; ids.len()];
    let mut holder = vec![0usize; ids.len()];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for id in &ids {
        nodes[0].acquire(id).await.expect("acquire on a");
    }
    for round in 1..=60u64 {
        let which = rng.below(ids.len() as u64) as usize;
        let id = &ids[which];
        let storage = &nodes[holder[which]];
        let mut batch = WriteBatch::new();
        if seqs[which] == 1 {
            // Every log is created with its epoch named, so the model gets the very
            // writes the journal carries.
            batch.push(Write::CreateLog { epoch: round });
        }
        for write in random_batch(&mut rng, &mut seqs[which], round).into_writes() {
            batch.push(write);
        }
        model.apply(id, batch.clone()).unwrap();
        commit(storage, id, batch)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(
            contents(storage, id),
            contents(&model, id),
            "round {round}: {id} differs from the model"
        );
        if rng.below(5) == 0 {
            // Hibernate on this node, wake on the other: the records must come along.
            storage.release(id);
            let other = 1 - holder[which];
            eventually_acquired(&nodes[other], id).await;
            holder[which] = other;
            assert_eq!(
                contents(&nodes[other], id),
                contents(&model, id),
                "round {round}: {id} changed on its way between nodes"
            );
        }
    }
    let images: u64 = nodes
        .iter()
        .map(|n| n.stats().images.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(
        images > 0,
        "no image was written: the test did not load through one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owners_write_is_refused_and_the_next_owner_never_sees_it() {
    let cluster = NatsCluster::start(3).await;
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let id = ObjectId::new("test", "contended");
    a.acquire(&id).await.unwrap();
    let mut first = WriteBatch::new();
    first.put(b"who".to_vec(), Bytes::from_static(b"a"));
    commit(&a, &id, first).await.unwrap();

    // b cannot take it while a is alive and holds it.
    match b.acquire(&id).await {
        Err(Error::NotOwner { owner, .. }) => assert_eq!(owner.as_deref(), Some("a")),
        other => panic!("b acquired a live node's object: {other:?}"),
    }

    // A node that believes a dead (a paused a, as the directory saw it) puts its fence in
    // the journal: from then on a's writes name a stale sequence.
    let subject = a.subject(&id);
    let log = journal_stream(&cluster, &subject).await;
    take_over(&log, &subject, &NodeId::start("c"))
        .await
        .unwrap();

    let mut late = WriteBatch::new();
    late.put(b"who".to_vec(), Bytes::from_static(b"a, late"));
    match commit(&a, &id, late).await {
        Err(Error::NotOwner { .. }) => {}
        other => panic!("a former owner's write was not refused: {other:?}"),
    }
    // Broken until acquired again: no more writes on the old fence.
    let mut later = WriteBatch::new();
    later.put(b"x".to_vec(), Bytes::new());
    assert!(matches!(a.apply(&id, later), Err(Error::NotOwner { .. })));
    assert_eq!(
        a.stats().fenced.load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Acquiring again re-reads the journal: the refused write is gone.
    a.acquire(&id).await.unwrap();
    assert_eq!(
        a.get(&id, b"who").unwrap(),
        Some(Bytes::from_static(b"a")),
        "the refused write survived"
    );
    let mut next = WriteBatch::new();
    next.put(b"who".to_vec(), Bytes::from_static(b"a again"));
    commit(&a, &id, next).await.unwrap();
    a.release(&id);
    eventually_acquired(&b, &id).await;
    assert_eq!(
        b.get(&id, b"who").unwrap(),
        Some(Bytes::from_static(b"a again"))
    );
}

/// The directory is released in the background after a release: acquires until it is.
async fn eventually_acquired(storage: &ClusterStorage, id: &ObjectId) {
    let deadline = tokio::time::Instant::now() + dormouse_testkit::PATIENCE;
    loop {
        match storage.acquire(id).await {
            Ok(()) => return,
            Err(Error::NotOwner { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("acquiring {id}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_larger_than_a_message_are_split_and_a_cut_short_one_is_never_applied() {
    let cluster = NatsCluster::start(3).await;
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let id = ObjectId::new("test", "big");
    a.acquire(&id).await.unwrap();
    let limit = a.part_limit();
    let big = Bytes::from(
        (0..limit * 5 / 2)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let mut batch = WriteBatch::new();
    batch.append(1, 1, big.clone());
    commit(&a, &id, batch).await.unwrap();
    assert!(
        a.stats().appends.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "a record of 2.5 messages went out in fewer parts"
    );

    // A writer fenced half-way through a split record leaves its first parts behind; the
    // next owner must apply none of it. Write such a record by hand: part 1 of 2 of a
    // commit that would delete the log, then a fence.
    let subject = a.subject(&id);
    let log = journal_stream(&cluster, &subject).await;
    let end = log.last_sequence(&subject).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Dm-Kind", "commit");
    headers.insert("Dm-Part", "1/2");
    // "DMC1", one batch of one write: DeleteLog (kind 3); complete on its own, so only
    // the part header keeps a reader from applying it.
    let payload = Bytes::from_static(b"DMC1\0\0\0\x01\0\0\0\x01\x03");
    log.append_headed(&subject, headers, payload, end, "half-1")
        .await
        .unwrap();
    take_over(&log, &subject, &NodeId::start("c"))
        .await
        .unwrap();

    a.release(&id);
    eventually_acquired(&b, &id).await;
    let entries = b.read_log(&id, 0, 10).unwrap();
    assert_eq!(entries.len(), 1, "the half-written delete was applied");
    assert_eq!(entries[0].data, big, "the split record came back different");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_an_exact_copy_through_lost_republishes_images_and_parts() {
    let cluster = NatsCluster::start(3).await;
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let id = ObjectId::new("test", "followed");
    a.acquire(&id).await.unwrap();
    let mut seq = 1;
    let mut rng = Rng(0xf011_0e5e_eed0_0002);
    let mut first = WriteBatch::new();
    first.push(Write::CreateLog { epoch: 9 });
    commit(&a, &id, first).await.unwrap();
    for round in 0..5 {
        commit(&a, &id, random_batch(&mut rng, &mut seq, round))
            .await
            .unwrap();
    }
    let copy = Arc::new(MemoryStorage::new());
    let mut follower = b.follow(&id, copy.clone()).await.unwrap();
    assert_eq!(contents(&*copy, &id), contents(&a, &id), "the backlog");
    follower.drop_live_every(3);
    let big = Bytes::from(vec![7u8; a.part_limit() * 2]);
    for round in 5..40 {
        let mut batch = random_batch(&mut rng, &mut seq, round);
        if round == 20 {
            batch.append(seq, round, big.clone());
            seq += 1;
        }
        commit(&a, &id, batch).await.unwrap();
        let want = contents(&a, &id);
        let deadline = tokio::time::Instant::now() + dormouse_testkit::PATIENCE;
        while contents(&*copy, &id) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the copy fell behind"
            );
            tokio::time::timeout(Duration::from_secs(5), follower.step())
                .await
                .expect("a step")
                .unwrap();
        }
    }
    let images = a.stats().images.load(std::sync::atomic::Ordering::Relaxed);
    assert!(images > 0, "no image went by the follower");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_continues_on_another_node_with_the_same_ids() {
    let cluster = NatsCluster::start(3).await;
    let config = NamespaceConfig {
        idle_timeout: Duration::from_millis(200),
        max_active: 0,
    };
    let a = Runtime::new(Arc::new(node(&cluster, "a").await));
    let b = Runtime::new(Arc::new(node(&cluster, "b").await));
    let on_a = a.namespace::<Channel>("channel", config.clone(), ChannelEnv::default());
    let on_b = b.namespace::<Channel>("channel", config, ChannelEnv::default());
    let publish = |text: &str, key: &str| {
        ChannelRequest::Publish(vec![NewMessage {
            event: None,
            data: Bytes::from(text.to_string()),
            idempotency_key: Some(key.to_string()),
        }])
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        match on_a
            .call("news", publish(&format!("m{i}"), &format!("k{i}")))
            .await
            .unwrap()
        {
            ChannelResponse::Published(p) => ids.push(p[0].id.clone()),
            other => panic!("{other:?}"),
        }
    }
    // b may not serve it while a holds it.
    let refused = on_b.call("news", ChannelRequest::Info).await;
    assert!(
        refused.is_err(),
        "two nodes served one channel: {refused:?}"
    );

    // a hibernates the channel; b takes it and continues the same history.
    let deadline = tokio::time::Instant::now() + dormouse_testkit::PATIENCE;
    let history = loop {
        match on_b
            .call(
                "news",
                ChannelRequest::History {
                    range: Range::forward(Start::Oldest),
                    limit: 100,
                },
            )
            .await
        {
            Ok(ChannelResponse::History(page)) => break page,
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "b never got it: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let seen: Vec<String> = history.events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(seen, ids, "the history moved with other ids");
    // An idempotency key used on a is remembered on b.
    match on_b.call("news", publish("m0 again", "k0")).await.unwrap() {
        ChannelResponse::Published(p) => {
            assert!(p[0].duplicate, "a retry on another node was stored twice");
            assert_eq!(p[0].id, ids[0]);
        }
        other => panic!("{other:?}"),
    }
    match on_b.call("news", publish("m5", "k5")).await.unwrap() {
        ChannelResponse::Published(p) => {
            let (epoch, seq) = p[0].id.split_once('-').unwrap();
            let (last_epoch, last_seq) = ids[4].split_once('-').unwrap();
            assert_eq!(epoch, last_epoch, "a new epoch for the same log");
            assert_eq!(
                seq.parse::<u64>().unwrap(),
                last_seq.parse::<u64>().unwrap() + 1
            );
        }
        other => panic!("{other:?}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until `done` holds, polling: the alarm index reaches other nodes through a watch.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + dormouse_testkit::PATIENCE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An alarm outlives its object's activation and its node: the node that set it finds it
/// due after releasing the object (no records of it left in memory), no other node fires it
/// while that node lives, and once it is dead exactly the node placement picks does, finding
/// the alarm in the journal when it acquires the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_is_fired_by_its_writer_after_release_and_by_a_survivor_once_the_writer_died() {
    let cluster = NatsCluster::start(3).await;
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let id = ObjectId::new("timers", "t1");
    a.acquire(&id).await.unwrap();
    let at = now_ms() + 300;
    let mut batch = WriteBatch::new();
    batch.push(Write::SetAlarm { at_ms: at });
    commit(&a, &id, batch).await.unwrap();
    // Moved earlier: the index follows, the old time leaves no trace.
    let at = at - 100;
    let mut batch = WriteBatch::new();
    batch.push(Write::SetAlarm { at_ms: at });
    commit(&a, &id, batch).await.unwrap();
    a.release(&id);
    assert_eq!(
        a.alarm(&id).unwrap(),
        None,
        "released: nothing of it in memory"
    );
    eventually("b sees the alarm", || b.alarms_indexed() == 1).await;
    assert_eq!(a.due_alarms(at - 1, 10).unwrap(), []);
    assert_eq!(a.due_alarms(at, 10).unwrap(), [(id.clone(), at)]);
    assert_eq!(a.next_alarm().unwrap(), Some((id.clone(), at)));
    assert_eq!(b.due_alarms(at, 10).unwrap(), [], "a is alive: a fires it");
    assert_eq!(b.next_alarm().unwrap(), None);

    drop(a);
    // Once a's announcement expires (node TTL 2 s), b is the only live node.
    eventually("b takes a's alarm", || {
        b.due_alarms(now_ms(), 10).unwrap() == [(id.clone(), at)]
    })
    .await;
    eventually_acquired(&b, &id).await;
    assert_eq!(b.alarm(&id).unwrap(), Some(at), "the journal's alarm");
    // Held: its records answer, not the index.
    assert_eq!(b.due_alarms(now_ms(), 10).unwrap(), [(id.clone(), at)]);
    let mut batch = WriteBatch::new();
    batch.push(Write::DeleteAlarm);
    commit(&b, &id, batch).await.unwrap();
    eventually("the entry leaves the index", || b.alarms_indexed() == 0).await;
    assert_eq!(b.next_alarm().unwrap(), None);
    b.release(&id);
    assert_eq!(b.due_alarms(u64::MAX, 10).unwrap(), []);
}
