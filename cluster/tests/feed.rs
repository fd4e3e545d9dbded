//! Following a subject on a real three-server NATS cluster: the backlog, then live, each
//! message once and in order; republishes that are lost (dropped on purpose here, or lost in
//! a leader change) are filled from the stream.

use std::time::Duration;

use bytes::Bytes;
use dormouse_cluster::{Feed, FencedLog, LogSpec, NatsSettings, connect};
use dormouse_testkit::PATIENCE;
use dormouse_testkit::nats::NatsCluster;

async fn open(cluster: &NatsCluster, who: &str) -> FencedLog {
    let nats = connect(&NatsSettings::new(cluster.urls(), who))
        .await
        .expect("connect");
    let spec = LogSpec {
        name: "channels".into(),
        subjects: vec!["chan.>".into()],
        replicas: 3,
        duplicate_window: Duration::from_secs(30),
        republish: true,
    };
    FencedLog::open(&nats, &spec).await.expect("open")
}

/// Appends `payloads` to `subject` one after another, as its owner does: from the last
/// sequence it wrote (read once at the start), retrying through elections with the same id
/// and expectation. Returns each one's sequence.
async fn append_all(log: &FencedLog, subject: &str, payloads: &[String]) -> Vec<u64> {
    let mut expected = log.last_sequence(subject).await.unwrap();
    append_from(log, subject, payloads, &mut expected).await
}

async fn append_from(
    log: &FencedLog,
    subject: &str,
    payloads: &[String],
    expected: &mut u64,
) -> Vec<u64> {
    let mut sequences = Vec::new();
    for payload in payloads {
        let stored = log
            .append_retrying(
                subject,
                Bytes::from(payload.clone()),
                *expected,
                payload,
                PATIENCE,
            )
            .await
            .unwrap_or_else(|e| panic!("append {payload}: {e}"));
        *expected = stored.sequence;
        sequences.push(stored.sequence);
    }
    sequences
}

async fn take(feed: &mut Feed, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let entry = tokio::time::timeout(PATIENCE, feed.next())
            .await
            .unwrap_or_else(|_| panic!("stuck after {} messages", got.len()))
            .expect("next");
        got.push((
            entry.sequence,
            String::from_utf8(entry.payload.to_vec()).unwrap(),
        ));
    }
    got
}

fn payloads(tag: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("{tag}-{n}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gets_the_backlog_then_every_live_append_once_in_order() {
    let cluster = NatsCluster::start(3).await;
    let (writer, reader) = (open(&cluster, "w").await, open(&cluster, "r").await);
    let subject = "chan.news";
    let mut sequences = append_all(&writer, subject, &payloads("m", 0..10)).await;
    let mut feed = reader.follow(subject, 0).await.unwrap();
    // Another channel's appends interleave in the same stream: links are per subject.
    let (more, other) = (payloads("m", 10..50), payloads("o", 0..40));
    let (mine, _other) = tokio::join!(
        append_all(&writer, subject, &more),
        append_all(&writer, "chan.other", &other),
    );
    sequences.extend(mine);
    let got = take(&mut feed, 50).await;
    let expected: Vec<(u64, String)> = sequences.into_iter().zip(payloads("m", 0..50)).collect();
    assert_eq!(got, expected);
    // Long enough for a few tail checks, which must not repeat anything either.
    feed.set_tail_check(Duration::from_millis(100));
    assert!(
        tokio::time::timeout(Duration::from_millis(600), feed.next())
            .await
            .is_err(),
        "nothing more, and nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_republishes_are_filled_from_the_stream_and_a_silence_is_checked() {
    let cluster = NatsCluster::start(3).await;
    let (writer, reader) = (open(&cluster, "w").await, open(&cluster, "r").await);
    let subject = "chan.lossy";
    let mut feed = reader.follow(subject, 0).await.unwrap();
    feed.drop_live_every(3);
    let sequences = append_all(&writer, subject, &payloads("m", 0..60)).await;
    let got = take(&mut feed, 60).await;
    let expected: Vec<(u64, String)> = sequences.into_iter().zip(payloads("m", 0..60)).collect();
    assert_eq!(got, expected);
    assert!(feed.filled >= 19, "filled {}", feed.filled);

    // Every republish lost and then silence: the tail check finds the last ones.
    let mut feed = reader.follow(subject, feed.delivered()).await.unwrap();
    feed.drop_live_every(1);
    feed.set_tail_check(Duration::from_millis(200));
    let sequences = append_all(&writer, subject, &payloads("m", 60..65)).await;
    let got = take(&mut feed, 5).await;
    let expected: Vec<(u64, String)> = sequences.into_iter().zip(payloads("m", 60..65)).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gets_every_acknowledged_append_across_a_leader_loss() {
    let mut cluster = NatsCluster::start(3).await;
    let (writer, reader) = (open(&cluster, "w").await, open(&cluster, "r").await);
    let subject = "chan.failover";
    let mut feed = reader.follow(subject, 0).await.unwrap();
    feed.set_tail_check(Duration::from_millis(500));
    let mut expected = 0;
    let mut sequences = append_from(&writer, subject, &payloads("m", 0..30), &mut expected).await;
    let leader = writer.leader().await.unwrap().expect("a leader");
    cluster.kill(cluster.index_of(&leader).expect("a server"));
    let more = payloads("m", 30..60);
    sequences.extend(append_from(&writer, subject, &more, &mut expected).await);
    let got = take(&mut feed, 60).await;
    let expected: Vec<(u64, String)> = sequences.into_iter().zip(payloads("m", 0..60)).collect();
    assert_eq!(got, expected);
}
