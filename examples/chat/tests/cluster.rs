//! The chat unchanged on a cluster (three NATS servers, three chat processes): people
//! connected to a room on one node stay in it while the room hibernates, and the room
//! wakes on that node, where their sockets are, whichever node a later call arrives at.

use std::path::Path;
use std::time::Duration;

use dormouse_cluster::{ClusterStorage, place};
use dormouse_storage::ObjectId;
use dormouse_testkit::ChildServer;
use dormouse_testkit::nats::NatsCluster;
use example_chat::NAMESPACE;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const NODES: [&str; 3] = ["a", "b", "c"];

async fn join(node: &ChildServer, room: &str, name: &str) -> Ws {
    let url = node.ws_url(&format!("/v1/objects/{NAMESPACE}/{room}/ws?name={name}"));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

async fn next(ws: &mut Ws) -> Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(frame) => {
                    return json!({"type": "closed", "frame": format!("{frame:?}")});
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a message in time")
}

async fn get(node: &ChildServer, path: &str) -> Value {
    let response = node.client.get(node.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// One value of a node's `/metrics`.
async fn metric(node: &ChildServer, name: &str) -> f64 {
    let text = node
        .client
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

async fn until_held(node: &ChildServer, held: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while metric(node, "dormouse_cluster_objects_held").await != held {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} does not come to hold {held} objects",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_room_wakes_where_its_people_are_connected() {
    let nats = NatsCluster::start(3).await;
    let urls = nats.urls().join(",");
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for name in NODES {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).unwrap();
        nodes.push(
            ChildServer::start(
                Path::new(env!("CARGO_BIN_EXE_example-chat")),
                &data,
                &[
                    ("DORMOUSE_CLUSTER_NATS_URLS", urls.as_str()),
                    ("DORMOUSE_CLUSTER_NODE_NAME", name),
                    ("DORMOUSE_LIMITS_MAX_MESSAGE_SIZE", "512KiB"),
                    ("CHAT_IDLE_TIMEOUT", "1s"),
                ],
            )
            .await,
        );
    }
    // A room that placement would give to node b, joined on node a: a claims it.
    let room = (0..)
        .map(|i| format!("room-{i}"))
        .find(|room| {
            let key = ClusterStorage::object_key(&ObjectId::new(NAMESPACE, room.as_str()));
            place(&key, NODES) == Some("b")
        })
        .unwrap();
    let mut alice = join(&nodes[0], &room, "alice").await;
    assert_eq!(next(&mut alice).await["members"], json!(["alice"]));
    let mut bob = join(&nodes[0], &room, "bob").await;
    assert_eq!(next(&mut bob).await["members"], json!(["alice", "bob"]));
    assert_eq!(next(&mut alice).await["type"], "join");
    until_held(&nodes[0], 1.0).await;

    // The room hibernates on a with both people connected: its records leave a's memory.
    until_held(&nodes[0], 0.0).await;
    // A call through b (placement's choice for an unowned room) is served by a, where the
    // people are, not by a fresh room on b that knows nobody.
    let members = get(
        &nodes[1],
        &format!("/v1/objects/{NAMESPACE}/{room}/members"),
    )
    .await;
    assert_eq!(members["members"], json!(["alice", "bob"]), "{members}");
    assert_eq!(
        metric(&nodes[1], "dormouse_cluster_objects_held").await,
        0.0
    );

    // Hibernated again, a message from a socket wakes it on a and reaches everyone.
    until_held(&nodes[0], 0.0).await;
    alice
        .send(Message::Text(
            json!({"type": "message", "text": "after the nap"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    for ws in [&mut alice, &mut bob] {
        let said = next(ws).await;
        assert_eq!(
            (said["type"].as_str(), said["text"].as_str()),
            (Some("message"), Some("after the nap")),
            "{said}"
        );
    }

    // Once everyone left and the room hibernated, it is nobody's: the next call is served
    // where placement says, with the history intact.
    alice.close(None).await.unwrap();
    bob.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let members_path = format!("/v1/objects/{NAMESPACE}/{room}/members");
    while get(&nodes[0], &members_path).await["members"] != json!([]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closes never reached the room"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_held(&nodes[0], 0.0).await;
    // Giving the directory entry up happens just after the records leave memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let members = get(
        &nodes[2],
        &format!("/v1/objects/{NAMESPACE}/{room}/members"),
    )
    .await;
    assert_eq!(members["members"], json!([]), "{members}");
    until_held(&nodes[1], 1.0).await;
    let history = get(
        &nodes[2],
        &format!("/v1/objects/{NAMESPACE}/{room}/history"),
    )
    .await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["after the nap"], "{history}");
}
