//! The chat unchanged on a cluster (three NATS servers, three chat processes): people
//! connected to a room through any node share it (the room runs on one node, which relays
//! the others' sockets); a room hibernates and wakes where it runs, whichever node a later
//! call arrives at; a node's death is a `leave` for its people, and the death of the
//! room's node closes the others' sockets so they rejoin.

mod support;

use std::path::Path;
use std::time::Duration;

use dormouse_cluster::{ClusterStorage, place};
use dormouse_storage::ObjectId;
use dormouse_testkit::ChildServer;
use dormouse_testkit::nats::NatsCluster;
use example_chat::NAMESPACE;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{Ws, next, say};
use tokio_tungstenite::tungstenite::Message;

const NODES: [&str; 3] = ["a", "b", "c"];

async fn join(node: &ChildServer, room: &str, name: &str) -> Ws {
    let url = node.ws_url(&format!("/v1/objects/{NAMESPACE}/{room}/ws?name={name}"));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// The next message that is not a join or a leave.
async fn next_said(ws: &mut Ws) -> Value {
    loop {
        let m = next(ws).await;
        if m["type"] != "join" && m["type"] != "leave" {
            return m;
        }
    }
}

/// The close code the server ends `ws` with, skipping what comes before it.
async fn close_code(ws: &mut Ws) -> u16 {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return 1006,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .expect("the socket closed in time")
}

async fn start_node(nats: &NatsCluster, dir: &Path, name: &str) -> ChildServer {
    start_node_idle(nats, dir, name, "1s").await
}

async fn start_node_idle(nats: &NatsCluster, dir: &Path, name: &str, idle: &str) -> ChildServer {
    let binary = Path::new(env!("CARGO_BIN_EXE_example-chat"));
    nats.node(binary, dir, name, &[("CHAT_IDLE_TIMEOUT", idle)])
        .await
}

/// Joins `room` through `node`, retrying while the cluster settles who runs it (a call to a
/// paused owner is answered 503 once its membership expires); the welcome message.
async fn join_when_served(node: &ChildServer, room: &str, name: &str) -> (Ws, Value) {
    let url = node.ws_url(&format!("/v1/objects/{NAMESPACE}/{room}/ws?name={name}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await {
            let welcome = next(&mut ws).await;
            if welcome["type"] == "welcome" {
                return (ws, welcome);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} could not join {room} through {}",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signal(node: &ChildServer, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &node.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {}", node.pid());
}

/// The node placement gives `room` to among `nodes`.
fn placed<'a>(room: &str, nodes: &[&'a str]) -> &'a str {
    let key = ClusterStorage::object_key(&ObjectId::new(NAMESPACE, room));
    place(&key, nodes.iter().copied()).expect("a node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_room_wakes_where_its_people_are_connected() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    // A room that placement gives to a while a and c run, and to b once b joins.
    let room = (0..)
        .map(|i| format!("room-{i}"))
        .find(|room| placed(room, &["a", "c"]) == "a" && placed(room, &NODES) == "b")
        .unwrap();
    let (a, c) = (
        start_node(&nats, dir.path(), "a").await,
        start_node(&nats, dir.path(), "c").await,
    );
    let mut alice = join(&a, &room, "alice").await;
    assert_eq!(next(&mut alice).await["members"], json!(["alice"]));
    let mut bob = join(&a, &room, "bob").await;
    assert_eq!(next(&mut bob).await["members"], json!(["alice", "bob"]));
    assert_eq!(next(&mut alice).await["type"], "join");
    a.until_metric("dormouse_cluster_objects_held", 1.0).await;
    let b = start_node(&nats, dir.path(), "b").await;
    a.until_metric("dormouse_cluster_nodes_alive", 3.0).await;
    b.until_metric("dormouse_cluster_nodes_alive", 3.0).await;
    let nodes = [a, b, c];

    // The room hibernates on a with both people connected: its records leave a's memory.
    nodes[0]
        .until_metric("dormouse_cluster_objects_held", 0.0)
        .await;
    // A call through b (placement's choice for an unowned room) is served by a, where the
    // people are, not by a fresh room on b that knows nobody.
    let members = nodes[1]
        .get_json(&format!("/v1/objects/{NAMESPACE}/{room}/members"), 200)
        .await;
    assert_eq!(members["members"], json!(["alice", "bob"]), "{members}");
    assert_eq!(nodes[1].metric("dormouse_cluster_objects_held").await, 0.0);

    // Hibernated again, a message from a socket wakes it on a and reaches everyone.
    nodes[0]
        .until_metric("dormouse_cluster_objects_held", 0.0)
        .await;
    say(&mut alice, "after the nap").await;
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
    while nodes[0].get_json(&members_path, 200).await["members"] != json!([]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closes never reached the room"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes[0]
        .until_metric("dormouse_cluster_objects_held", 0.0)
        .await;
    // Giving the directory entry up happens just after the records leave memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let members = nodes[2]
        .get_json(&format!("/v1/objects/{NAMESPACE}/{room}/members"), 200)
        .await;
    assert_eq!(members["members"], json!([]), "{members}");
    nodes[1]
        .until_metric("dormouse_cluster_objects_held", 1.0)
        .await;
    let history = nodes[2]
        .get_json(&format!("/v1/objects/{NAMESPACE}/{room}/history"), 200)
        .await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["after the nap"], "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_on_every_node_share_a_room_and_a_dead_node_leaves_it() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let room = "plaza";
    let path = |rest: &str| format!("/v1/objects/{NAMESPACE}/{room}{rest}");
    // The room runs on the node placement picks; Alice joins there, Bob and Carol through
    // the other two.
    let owner = placed(room, &NODES);
    let mut order: Vec<&str> = NODES.to_vec();
    order.sort_by_key(|n| *n != owner);
    let mut nodes = Vec::new();
    for name in &order {
        nodes.push(start_node(&nats, dir.path(), name).await);
    }
    for node in &nodes {
        node.until_metric("dormouse_cluster_nodes_alive", 3.0).await;
    }
    let mut alice = join(&nodes[0], room, "alice").await;
    assert_eq!(next(&mut alice).await["members"], json!(["alice"]));
    let mut bob = join(&nodes[1], room, "bob").await;
    assert_eq!(next(&mut bob).await["members"], json!(["alice", "bob"]));
    assert_eq!(
        next(&mut alice).await,
        json!({"type": "join", "name": "bob"})
    );
    let mut carol = join(&nodes[2], room, "carol").await;
    assert_eq!(
        next(&mut carol).await["members"],
        json!(["alice", "bob", "carol"])
    );
    for ws in [&mut alice, &mut bob] {
        assert_eq!(next(ws).await, json!({"type": "join", "name": "carol"}));
    }
    assert_eq!(
        nodes[0].metric("dormouse_cluster_relayed_sockets").await,
        2.0
    );
    assert_eq!(
        nodes[1]
            .metric("dormouse_cluster_relayed_connections")
            .await,
        1.0
    );
    assert_eq!(nodes[1].metric("dormouse_cluster_objects_held").await, 0.0);

    // A message from a relayed socket reaches everyone, in order, once.
    say(&mut bob, "one").await;
    say(&mut bob, "two").await;
    for ws in [&mut alice, &mut bob, &mut carol] {
        for text in ["one", "two"] {
            let m = next_said(ws).await;
            assert_eq!(
                (m["name"].as_str(), m["text"].as_str()),
                (Some("bob"), Some(text))
            );
        }
    }
    let members = nodes[2].get_json(&path("/members"), 200).await;
    assert_eq!(members["members"], json!(["alice", "bob", "carol"]));

    // Asleep on a with its relayed sockets parked there, Carol's message wakes it there.
    nodes[0]
        .until_metric("dormouse_cluster_objects_held", 0.0)
        .await;
    say(&mut carol, "wake up").await;
    for ws in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(next_said(ws).await["text"], "wake up");
    }

    // Carol's node dies: the room hears her leave (her node's membership expires).
    nodes.remove(2).kill();
    for ws in [&mut alice, &mut bob] {
        assert_eq!(next(ws).await, json!({"type": "leave", "name": "carol"}));
    }
    assert_eq!(
        nodes[0].metric("dormouse_cluster_relayed_sockets").await,
        1.0
    );

    // The room's node dies: Bob's connection is closed as "service restart", and he
    // rejoins the room, now run by his node, with its history.
    nodes.remove(0).kill();
    assert_eq!(close_code(&mut bob).await, 1012);
    let mut bob = join(&nodes[0], room, "bob").await;
    let welcome = next(&mut bob).await;
    assert_eq!(welcome["members"], json!(["bob"]), "{welcome}");
    let texts: Vec<&str> = welcome["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["one", "two", "wake up"], "{welcome}");
    drop(alice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_nodes_people_are_sent_to_the_rooms_new_node() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let room = "hall";
    let owner = placed(room, &NODES);
    let mut order: Vec<&str> = NODES.to_vec();
    order.sort_by_key(|n| *n != owner);
    let mut nodes = Vec::new();
    for name in &order {
        // Rooms stay awake: the paused node must come back with the room still running.
        nodes.push(start_node_idle(&nats, dir.path(), name, "60s").await);
    }
    for node in &nodes {
        node.until_metric("dormouse_cluster_nodes_alive", 3.0).await;
    }
    // Alice is on the room's node, Bob on another.
    let mut alice = join(&nodes[0], room, "alice").await;
    assert_eq!(next(&mut alice).await["members"], json!(["alice"]));
    let mut bob = join(&nodes[1], room, "bob").await;
    assert_eq!(next(&mut bob).await["members"], json!(["alice", "bob"]));
    assert_eq!(next(&mut alice).await["type"], "join");

    // The room's node stops past its TTL: Bob's next message finds it gone, his connection
    // is closed to reconnect, and his rejoin takes the room over on another node.
    signal(&nodes[0], "-STOP");
    say(&mut bob, "anyone there?").await;
    assert_eq!(close_code(&mut bob).await, 1012);
    let (mut bob, welcome) = join_when_served(&nodes[1], room, "bob").await;
    assert_eq!(welcome["members"], json!(["bob"]), "{welcome}");

    // Back, the paused node still runs its copy of the room: Alice's message is refused by
    // the journal there, and her connection is closed so she rejoins the room's new node.
    signal(&nodes[0], "-CONT");
    say(&mut alice, "I was away").await;
    assert_eq!(close_code(&mut alice).await, 1012);
    let (_alice, welcome) = join_when_served(&nodes[0], room, "alice").await;
    assert_eq!(welcome["members"], json!(["alice", "bob"]), "{welcome}");
    assert_eq!(
        next(&mut bob).await,
        json!({"type": "join", "name": "alice"})
    );
    // Only what the room's journal took is in its history.
    let texts: Vec<&str> = welcome["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(!texts.contains(&"I was away"), "{welcome}");
}
