//! Fenced appends against a real three-server NATS cluster (the pinned nats-server; see
//! `testkit::nats`): what the log refuses, what it recognises as a retry, and that two
//! writers with the same expectation never both get in, also across a leader's loss.

use std::time::Duration;

use bytes::Bytes;
use dormouse_cluster::{AppendError, Appended, FencedLog, LogSpec, NatsSettings, connect};
use dormouse_testkit::PATIENCE;
use dormouse_testkit::nats::NatsCluster;

fn spec(name: &str) -> LogSpec {
    LogSpec {
        name: name.to_string(),
        subjects: vec![format!("{name}.>")],
        replicas: 3,
        duplicate_window: Duration::from_secs(30),
        republish: false,
    }
}

async fn open(cluster: &NatsCluster, name: &str) -> FencedLog {
    let nats = connect(&NatsSettings::new(cluster.urls(), "test"))
        .await
        .expect("connect");
    FencedLog::open(&nats, &spec(name)).await.expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expectation_is_refused_and_a_retry_is_recognised() {
    let cluster = NatsCluster::start(3).await;
    let log = open(&cluster, "fence").await;
    let subject = "fence.chan-a";
    assert_eq!(log.last_sequence(subject).await.unwrap(), 0);

    let first = log
        .append(subject, Bytes::from_static(b"one"), 0, "a-1")
        .await
        .expect("the first append to an empty subject");
    assert!(!first.duplicate);
    // A second writer that also believed the subject empty is refused.
    let stale = log
        .append(subject, Bytes::from_static(b"two"), 0, "b-1")
        .await;
    assert!(
        matches!(stale, Err(AppendError::Fenced { expected: 0 })),
        "{stale:?}"
    );
    // The writer that holds the right expectation goes on; the same append sent again (as
    // after a lost acknowledgement) is recognised, with the sequence it was stored at.
    let second = log
        .append(subject, Bytes::from_static(b"two"), first.sequence, "a-2")
        .await
        .unwrap();
    let retried = log
        .append(subject, Bytes::from_static(b"two"), first.sequence, "a-2")
        .await
        .unwrap();
    assert_eq!(
        retried,
        Appended {
            sequence: second.sequence,
            duplicate: true
        }
    );
    assert_eq!(log.last_sequence(subject).await.unwrap(), second.sequence);
    // Other subjects are fenced on their own.
    let other = log
        .append("fence.chan-b", Bytes::from_static(b"x"), 0, "c-1")
        .await
        .unwrap();
    assert!(other.sequence > second.sequence, "one stream, one sequence");
    assert_eq!(
        log.get(second.sequence).await.unwrap(),
        (subject.to_string(), Bytes::from_static(b"two"))
    );
    // The stream exists now: opening it with other settings is refused, not ignored.
    let nats = connect(&NatsSettings::new(cluster.urls(), "test"))
        .await
        .unwrap();
    let mut other = spec("fence");
    other.replicas = 1;
    let refused = FencedLog::open(&nats, &other)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("replicas"), "{refused}");
}

/// nats-server before 2.9.21 accepted both appends of a pair sent together with the same
/// expectation (80 of 100 pairs on Debian's 2.9.10): two owners could both write. Here
/// exactly one of each pair must get in, on every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_with_one_expectation_never_both_get_in() {
    const ROUNDS: usize = 100;
    let cluster = NatsCluster::start(3).await;
    let log = open(&cluster, "race").await;
    let subject = "race.chan";
    let (mut fenced, mut contended) = (0, 0);
    for round in 0..ROUNDS {
        let expected = log.last_sequence(subject).await.unwrap();
        let payload = Bytes::from(format!("round {round}"));
        let (id_a, id_b) = (format!("a-{round}"), format!("b-{round}"));
        let (a, b) = tokio::join!(
            log.append(subject, payload.clone(), expected, &id_a),
            log.append(subject, payload, expected, &id_b),
        );
        let accepted = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(accepted, 1, "round {round}: {a:?} and {b:?}");
        for refused in [a, b].into_iter().filter_map(Result::err) {
            match refused {
                AppendError::Fenced { .. } => fenced += 1,
                AppendError::Contended => contended += 1,
                other => panic!("round {round}: refused for another reason: {other}"),
            }
        }
    }
    assert_eq!(fenced + contended, ROUNDS);
    println!("{ROUNDS} pairs: {fenced} fenced, {contended} contended");
}

/// The stream's leader is killed: appends are refused or unacknowledged while a new one is
/// elected, then go on with the same expectation chain; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_the_loss_of_the_stream_leader() {
    let mut cluster = NatsCluster::start(3).await;
    let log = open(&cluster, "failover").await;
    let subject = "failover.chan";
    let mut acked = Vec::new();
    let mut expected = 0;
    for n in 0..20 {
        let stored = log
            .append(
                subject,
                Bytes::from(format!("m{n}")),
                expected,
                &format!("m{n}"),
            )
            .await
            .unwrap();
        acked.push((stored.sequence, format!("m{n}")));
        expected = stored.sequence;
    }
    let leader = log.leader().await.unwrap().expect("a leader");
    let leader = cluster.index_of(&leader).expect("a server of the cluster");
    cluster.kill(leader);
    // The client may have been connected to the killed server: it fails over by itself.
    let started = tokio::time::Instant::now();
    for n in 20..30 {
        let id = format!("m{n}");
        let stored = log
            .append_retrying(subject, Bytes::from(id.clone()), expected, &id, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("append {n} after the leader's loss: {e}"));
        acked.push((stored.sequence, id));
        expected = stored.sequence;
    }
    println!(
        "writes resumed {:?} after the leader was killed",
        started.elapsed()
    );
    for (sequence, payload) in &acked {
        let (got_subject, got) = log.get(*sequence).await.unwrap();
        assert_eq!(got_subject, subject);
        assert_eq!(got, Bytes::from(payload.clone()), "sequence {sequence}");
    }
    assert_eq!(log.last_sequence(subject).await.unwrap(), expected);
    cluster.restart(leader);
}
