//! The limiter unchanged on a cluster: three NATS servers and three limiter processes. Takes
//! sent to all three nodes at once share one bucket per key, because each key has one owner
//! that every other node forwards to.

use std::path::Path;
use std::time::Instant;

use dormouse_testkit::nats::NatsCluster;
use example_rate_limiter::NAMESPACE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_through_every_node_share_one_bucket() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let binary = Path::new(env!("CARGO_BIN_EXE_example-rate_limiter"));
        nodes.push(nats.node(binary, dir.path(), name, &[]).await);
    }
    let started = Instant::now();
    // 45 takes of one token, 15 through each node, all at once.
    let takes = (0..45).map(|i| {
        let node = &nodes[i % 3];
        let url = node.url(&format!("/v1/objects/{NAMESPACE}/shared-key/take?n=1"));
        let client = node.client.clone();
        async move { client.post(url).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures::future::join_all(takes).await;
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(allowed + refused, 45, "other answers: {statuses:?}");
    // A burst of 10, and 1 more per second the takes took.
    let most = 10 + elapsed.ceil() as usize;
    assert!(
        (10..=most).contains(&allowed),
        "{allowed} takes allowed in {elapsed:.1} s through three nodes: more than one bucket?"
    );
}
