//! The batcher unchanged on a cluster (three NATS servers, three batcher processes): a
//! stream's flush is its object's alarm, so batches waiting for a failing sink are shipped
//! by a surviving node after the node that owned their stream is killed, with no request to
//! wake them. (An alarm firing on its own node after its object hibernated is tested in
//! `dormouse-cluster`'s journal tests.)

mod support;

use std::collections::HashSet;
use std::path::Path;

use dormouse_cluster::{ClusterStorage, place};
use dormouse_storage::ObjectId;
use dormouse_testkit::nats::NatsCluster;
use example_batcher::NAMESPACE;
use support::{BINARY, ChildServer, FakeUpstream, base, post_rows, row_number, rows};

const NODES: [&str; 3] = ["a", "b", "c"];

/// Two stream names that placement gives to each node while all three are alive.
fn streams_per_node() -> Vec<(String, &'static str)> {
    let mut picked = Vec::new();
    for i in 0.. {
        let stream = format!("stream-{i}");
        let key = ClusterStorage::object_key(&ObjectId::new(NAMESPACE, stream.as_str()));
        let owner = place(&key, NODES).expect("a node");
        if picked.iter().filter(|(_, o)| *o == owner).count() < 2 {
            picked.push((stream, owner));
        }
        if picked.len() == 6 {
            return picked;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_waiting_batches_are_shipped_by_a_survivor() {
    let upstream = FakeUpstream::start().await;
    // Every batch waits (its alarm set again and again) until the sink recovers.
    upstream.set_failing(true);
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<ChildServer> = Vec::new();
    for name in NODES {
        nodes.push(
            nats.node(
                Path::new(BINARY),
                dir.path(),
                name,
                &[
                    ("BATCHER_UPSTREAM", upstream.url.as_str()),
                    ("BATCHER_MAX_ROWS", "50"),
                    ("BATCHER_MAX_DELAY", "200ms"),
                    ("BATCHER_MAX_BACKOFF", "400ms"),
                    ("BATCHER_REQUEST_TIMEOUT", "2s"),
                ],
            )
            .await,
        );
    }
    let streams = streams_per_node();
    // Every row through node a, whoever owns the stream: 202 means it is in the journal.
    for (stream, _) in &streams {
        for from in [0, 5] {
            let response = post_rows(
                &nodes[0].client,
                &base(&nodes[0]),
                stream,
                &rows(stream, from, 5),
            )
            .await
            .unwrap();
            assert_eq!(
                response.status(),
                202,
                "{stream}: {}",
                response.text().await.unwrap()
            );
        }
    }
    // The sink was asked (and failed) at least once per stream: every alarm is live.
    upstream
        .wait_until("a failed attempt for every stream", |log| {
            streams
                .iter()
                .all(|(s, _)| log.refused.iter().any(|b| &b.stream == s))
        })
        .await;
    // Each node runs its own two streams (their alarms keep them awake), and every node
    // sees all six alarms in the index.
    for node in &nodes {
        assert_eq!(node.metric("dormouse_cluster_objects_held").await, 2.0);
        assert_eq!(node.metric("dormouse_cluster_alarms_indexed").await, 6.0);
    }
    nodes.remove(1).kill();
    upstream.set_failing(false);
    let log = upstream
        .wait_until("every acknowledged row", |log| {
            streams.iter().all(|(s, _)| {
                let got: HashSet<usize> = log.rows_of(s).iter().map(|r| row_number(r)).collect();
                (0..10).all(|n| got.contains(&n))
            })
        })
        .await;
    for (stream, owner) in &streams {
        let numbers: Vec<usize> = log.rows_of(stream).iter().map(|r| row_number(r)).collect();
        let mut seen = HashSet::new();
        let first_seen: Vec<usize> = numbers
            .iter()
            .copied()
            .filter(|n| seen.insert(*n))
            .collect();
        assert_eq!(
            first_seen,
            (0..10).collect::<Vec<_>>(),
            "{stream} (owned by {owner} before the kill): rows out of order or foreign"
        );
    }
    // Nothing is left waiting on the survivors.
    for node in &nodes {
        for (stream, _) in &streams {
            let status = node
                .get_json(&format!("/v1/objects/{NAMESPACE}/{stream}"), 200)
                .await;
            assert_eq!(
                status["buffered"], 0,
                "{stream} through {}: {status}",
                node.addr
            );
        }
    }
}
