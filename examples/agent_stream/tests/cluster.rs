//! A run unchanged on a cluster (three NATS servers, three processes of the example): the
//! producer posts through one node, a WebSocket viewer watches through another (the run
//! relays its socket there), an SSE viewer follows the run's channel; the node running the
//! run is killed mid-run, the viewers resume with their last ids, and both see every
//! acknowledged event once, in order.

mod support;

use std::path::Path;

use dormouse_cluster::{ClusterStorage, place};
use dormouse_storage::ObjectId;
use dormouse_testkit::nats::NatsCluster;
use example_agent_stream::NAMESPACE;
use serde_json::json;
use support::{
    ChildServer, Producer, SseClient, Viewer, WsClient, assert_ids_increase, assert_same_events,
};

const BINARY: &str = env!("CARGO_BIN_EXE_example-agent_stream");
const NODES: [&str; 3] = ["a", "b", "c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_on_other_nodes_miss_nothing_when_the_runs_node_dies() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let run = "run-c";
    let key = ClusterStorage::object_key(&ObjectId::new(NAMESPACE, run));
    let owner = place(&key, NODES).expect("a node");
    let mut nodes: Vec<Option<ChildServer>> = Vec::new();
    for name in NODES {
        nodes.push(Some(
            nats.node(Path::new(BINARY), dir.path(), name, &[]).await,
        ));
    }
    let owner_at = NODES.iter().position(|n| *n == owner).unwrap();
    let (producer_at, viewer_at) = ((owner_at + 1) % 3, (owner_at + 2) % 3);
    let run_node = nodes[owner_at].take().unwrap();
    let node = |i: usize| nodes[i].as_ref().expect("a node that stays up");

    let mut producer = Producer::new(run);
    let ws_path = format!("/v1/objects/{NAMESPACE}/{run}/ws");
    let mut ws = WsClient::connect(node(viewer_at), &ws_path).await;
    let sse_path = format!("/v1/channels/run:{run}/events");
    let mut sse = SseClient::connect(node(producer_at), &sse_path, None).await;
    for i in 0..40 {
        producer
            .chunk(node(producer_at), &format!("token {i} "))
            .await;
    }
    let mut by_ws = ws.take(40).await;
    let mut by_sse = sse.take(40).await;
    assert_same_events("WebSocket before", &by_ws, &producer.expected);
    assert_same_events("SSE before", &by_sse, &producer.expected);

    // The run's node dies: the relayed WebSocket is closed as "service restart".
    run_node.kill();
    ws.expect_close(1012).await;
    for i in 40..80 {
        producer
            .chunk(node(producer_at), &format!("token {i} "))
            .await;
    }
    producer
        .finish(node(producer_at), json!({"answer": 42}))
        .await;

    // Both viewers resume from their last ids and get the rest, once, in order.
    let last = by_ws.last().unwrap().id.clone();
    let mut ws =
        WsClient::connect_with(node(viewer_at), &ws_path, &[("Last-Event-ID", &last)]).await;
    by_ws.extend(ws.take(41).await);
    by_sse.extend(sse.take(41).await);
    assert_same_events("WebSocket", &by_ws, &producer.expected);
    assert_same_events("SSE", &by_sse, &producer.expected);
    assert_ids_increase("WebSocket", &by_ws);
    assert_ids_increase("SSE", &by_sse);
    ws.expect_close(1000).await;
}
