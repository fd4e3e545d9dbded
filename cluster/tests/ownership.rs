//! Ownership on a real three-server NATS cluster: one claim wins a race, a dead node's
//! objects are taken over once its membership expires, and a former owner's append after a
//! take-over is refused by the log, whatever it still believes.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use dormouse_cluster::{
    AppendError, Claim, Directory, DirectorySpec, FencedLog, LogSpec, Membership, Nats,
    NatsSettings, NodeId, connect, take_over,
};
use dormouse_testkit::PATIENCE;
use dormouse_testkit::nats::NatsCluster;

fn spec() -> DirectorySpec {
    DirectorySpec {
        prefix: "dm".into(),
        replicas: 3,
        node_ttl: Duration::from_secs(2),
    }
}

/// One node's connection, as each Dormouse node has its own.
async fn node(cluster: &NatsCluster, name: &str) -> Nats {
    connect(&NatsSettings::new(cluster.urls(), name))
        .await
        .expect("connect")
}

/// The directory's reads may come from a replica a moment behind: waits until `object`'s
/// recorded owner is `expected`.
async fn owner_becomes(dir: &Directory, object: &str, expected: Option<&NodeId>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let owner = dir.owner(object).await.unwrap();
        if owner.as_ref().map(|(node, _)| node) == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{object}: owner {owner:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_live(live: &BTreeMap<String, NodeId>) -> impl Fn(&NodeId) -> bool + '_ {
    move |owner| live.get(&owner.name) == Some(owner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_wins_and_a_dead_nodes_objects_are_taken_over() {
    let cluster = NatsCluster::start(3).await;
    let (nats_a, nats_b) = (node(&cluster, "a").await, node(&cluster, "b").await);
    let (a, b) = (NodeId::start("a"), NodeId::start("b"));
    let member_a = Membership::join(&nats_a, &spec(), a.clone()).await.unwrap();
    let member_b = Membership::join(&nats_b, &spec(), b.clone()).await.unwrap();
    let (dir_a, dir_b) = (
        Directory::open(&nats_a, &spec()).await.unwrap(),
        Directory::open(&nats_b, &spec()).await.unwrap(),
    );
    let live = member_b.live_nodes().await.unwrap();
    assert_eq!(live.keys().collect::<Vec<_>>(), ["a", "b"]);

    // Both claim 20 objects at once: each goes to exactly one, and the other sees it.
    for i in 0..20 {
        let object = format!("chan:{i}");
        let (claim_a, claim_b) = tokio::join!(
            dir_a.claim(&object, &a, is_live(&live)),
            dir_b.claim(&object, &b, is_live(&live)),
        );
        match (claim_a.unwrap(), claim_b.unwrap()) {
            (Claim::Mine { .. }, Claim::Theirs(owner)) => assert_eq!(owner, a),
            (Claim::Theirs(owner), Claim::Mine { .. }) => assert_eq!(owner, b),
            other => panic!("{object}: {other:?}"),
        }
    }
    // A claims one more; B cannot take it while A lives.
    let Claim::Mine { .. } = dir_a.claim("only-a", &a, |_| true).await.unwrap() else {
        panic!("a free object is claimed");
    };
    assert_eq!(
        dir_b.claim("only-a", &b, is_live(&live)).await.unwrap(),
        Claim::Theirs(a.clone())
    );

    // A stops announcing itself (as a killed or paused node does): once its entry expires,
    // B sees it gone and takes its objects over.
    drop(member_a);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let live = loop {
        let live = member_b.live_nodes().await.unwrap();
        if !live.contains_key("a") {
            break live;
        }
        assert!(tokio::time::Instant::now() < deadline, "a never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let Claim::Mine { revision } = dir_b.claim("only-a", &b, is_live(&live)).await.unwrap() else {
        panic!("a dead node's object is taken over");
    };
    owner_becomes(&dir_a, "only-a", Some(&b)).await;
    // Released (as on hibernation), it is free for anyone.
    dir_b.release("only-a", revision).await.unwrap();
    owner_becomes(&dir_a, "only-a", None).await;
    let Claim::Mine { .. } = dir_a.claim("only-a", &a, |_| true).await.unwrap() else {
        panic!("a released object is claimed again");
    };
}

/// A owns a log and keeps appending; B takes over (as after A looked dead). A, which has not
/// noticed, appends with the expectation it holds: the log refuses it, and nothing of A's
/// lands after B's marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owners_append_after_a_take_over_is_refused() {
    let cluster = NatsCluster::start(3).await;
    let spec = LogSpec {
        name: "objects".into(),
        subjects: vec!["objects.>".into()],
        replicas: 3,
        duplicate_window: Duration::from_secs(30),
        republish: false,
    };
    let log_a = FencedLog::open(&node(&cluster, "a").await, &spec)
        .await
        .unwrap();
    let log_b = FencedLog::open(&node(&cluster, "b").await, &spec)
        .await
        .unwrap();
    let (a, b) = (NodeId::start("a"), NodeId::start("b"));
    let subject = "objects.counter.c1";

    let mut a_expects = take_over(&log_a, subject, &a).await.unwrap();
    for n in 0..5 {
        a_expects = log_a
            .append(
                subject,
                Bytes::from(format!("a{n}")),
                a_expects,
                &format!("a{n}"),
            )
            .await
            .unwrap()
            .sequence;
    }
    let b_marker = take_over(&log_b, subject, &b).await.unwrap();
    assert!(b_marker > a_expects);

    let late = log_a
        .append(subject, Bytes::from_static(b"late"), a_expects, "a-late")
        .await;
    assert!(
        matches!(late, Err(AppendError::Fenced { .. })),
        "the former owner's append: {late:?}"
    );
    let next = log_b
        .append(subject, Bytes::from_static(b"b0"), b_marker, "b0")
        .await
        .unwrap();
    assert_eq!(log_a.last_sequence(subject).await.unwrap(), next.sequence);
    let (_, marker) = log_a.get(b_marker).await.unwrap();
    assert_eq!(marker, Bytes::from(format!("owner {b}")));
}

/// The NATS server that leads `stream` now.
async fn leader_of(nats: &Nats, stream: &str) -> String {
    let js = async_nats::jetstream::new(nats.client.clone());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(mut handle) = js.get_stream(stream).await
            && let Ok(info) = handle.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
        {
            return leader;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stream} has no leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Killing the NATS server that leads the nodes bucket stops every heartbeat until a new
/// leader is elected (longer than the node TTL here): no node may take that silence for
/// the death of the others, since each hears its own heartbeats stop too. A node that
/// really stops is still found dead once the bucket works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nodes_bucket_kills_nobody_and_a_stopped_node_is_still_found_dead() {
    let mut cluster = NatsCluster::start(3).await;
    let (nats_a, nats_b) = (node(&cluster, "a").await, node(&cluster, "b").await);
    let (a, b) = (NodeId::start("a"), NodeId::start("b"));
    let member_a = Membership::join(&nats_a, &spec(), a.clone()).await.unwrap();
    let member_b = Membership::join(&nats_b, &spec(), b.clone()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !(member_a.alive(&b) && member_b.alive(&a)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw each other"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = leader_of(&nats_a, "KV_dm_nodes").await;
    cluster.kill(cluster.index_of(&leader).expect("one of ours"));
    // Three node TTLs: the election (4 to 7 s on this machine) falls inside.
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < 3 * spec().node_ttl {
        assert!(
            member_a.alive(&b) && member_b.alive(&a),
            "a node counted dead {:?} after the bucket's leader was killed",
            watched.elapsed()
        );
        assert!(member_a.alive_nodes().contains_key("b"));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // b stops for good: a, hearing its own heartbeats again, finds it dead.
    drop(member_b);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while member_a.alive(&b) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a stopped node still counts as alive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
