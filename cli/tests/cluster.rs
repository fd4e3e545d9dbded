//! Cluster mode end to end, as an operator runs it: three NATS servers and three `dormouse`
//! processes on loopback, each given every NATS URL. Any node serves any client; subscribers
//! on every node get every event once, in order; a client resumes on any node; a killed
//! owner's channel is served by another node with its history and ids intact.

use std::path::Path;
use std::time::{Duration, Instant};

use dormouse_testkit::browser::Browser;
use dormouse_testkit::nats::NatsCluster;
use dormouse_testkit::{ChildServer, PATIENCE, SseClient, WsClient};
use serde_json::{Value, json};

/// One Dormouse node of the cluster.
async fn node(nats: &NatsCluster, name: &str, dir: &Path) -> ChildServer {
    nats.node(
        Path::new(env!("CARGO_BIN_EXE_dormouse")),
        dir,
        name,
        &[
            ("DORMOUSE_CHANNELS_IDLE_TIMEOUT", "2s"),
            ("DORMOUSE_ADMIN_ENABLED", "true"),
        ],
    )
    .await
}

/// Nodes n1, n2 and n3 with the kit's defaults and `vars`.
async fn nodes_with(nats: &NatsCluster, dir: &Path, vars: &[(&str, &str)]) -> Vec<ChildServer> {
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let binary = Path::new(env!("CARGO_BIN_EXE_dormouse"));
        nodes.push(nats.node(binary, dir, name, vars).await);
    }
    nodes
}

async fn three_nodes(nats: &NatsCluster, dir: &Path) -> Vec<ChildServer> {
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(node(nats, name, dir).await);
    }
    nodes
}

/// Publishes one message through `node`; its id.
async fn publish(node: &ChildServer, channel: &str, body: &str, key: Option<&str>) -> Value {
    let mut request = node
        .client
        .post(node.url(&format!("/v1/channels/{channel}/messages")))
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("publish");
    let status = response.status();
    let json: Value = response.json().await.expect("a JSON answer");
    // 201 stored, 200 a duplicate of an earlier publish.
    let want = if json["duplicate"] == true { 200 } else { 201 };
    assert_eq!(status, want, "publish through {:?}: {json}", node.addr);
    json
}

/// Reads `count` events from `client`, as (id, data).
async fn take(client: &mut SseClient, count: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < count {
        let event = client.next().await.expect("the stream ended");
        if event.event.starts_with("dormouse.") {
            panic!("a control event where events were due: {event:?}");
        }
        out.push((event.id.clone().expect("an id"), event.data.clone()));
    }
    out
}

fn parse(id: &str) -> (u64, u64) {
    let (epoch, seq) = id.split_once('-').expect("epoch-seq");
    // The epoch is hex, the seq decimal.
    (
        u64::from_str_radix(epoch, 16).unwrap(),
        seq.parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_client_and_every_subscriber_gets_every_event_once_in_order() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&nats, dir.path()).await;

    // Subscribers on two nodes before anything is published.
    let mut on_two = SseClient::connect(&nodes[1], "/v1/channels/news/events", None).await;
    let mut on_three = SseClient::connect(&nodes[2], "/v1/channels/news/events", None).await;

    let mut sent = Vec::new();
    for i in 0..24 {
        let node = &nodes[i % 3];
        let json = publish(node, "news", &format!("m{i}"), None).await;
        sent.push((json["id"].as_str().unwrap().to_string(), format!("m{i}")));
    }
    // One history, one epoch, increasing ids, whichever node took each publish.
    let epoch = parse(&sent[0].0).0;
    for pair in sent.windows(2) {
        let ((e1, s1), (e2, s2)) = (parse(&pair[0].0), parse(&pair[1].0));
        assert_eq!((e1, e2), (epoch, epoch), "{pair:?}");
        assert_eq!(s2, s1 + 1, "{pair:?}");
    }
    assert_eq!(take(&mut on_two, 24).await, sent, "the subscriber on n2");
    assert_eq!(take(&mut on_three, 24).await, sent, "the subscriber on n3");

    // History from any node.
    for node in &nodes {
        let events = node.all_history("news").await;
        let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        let want: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, want, "history through {:?}", node.addr);
        // Backward, by whichever node owns the channel.
        let page = node.history("news", "?direction=backward&limit=3").await;
        let ids: Vec<&str> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [want[23], want[22], want[21]]);
    }
    // A subscriber that rewinds on a node that does not own the channel.
    let mut rewound =
        SseClient::connect(&nodes[2], "/v1/channels/news/events?rewind=2", None).await;
    assert_eq!(take(&mut rewound, 2).await, sent[22..]);

    // A retry with the same idempotency key through another node is recognised.
    let first = publish(&nodes[0], "news", "once", Some("key-1")).await;
    let again = publish(&nodes[2], "news", "once", Some("key-1")).await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true, "{again}");

    // A client resumes on a node it never used, from an id another node acknowledged.
    let cursor = sent[9].0.clone();
    let mut resumed =
        SseClient::connect(&nodes[0], "/v1/channels/news/events", Some(&cursor)).await;
    let mut want: Vec<(String, String)> = sent[10..].to_vec();
    want.push((first["id"].as_str().unwrap().to_string(), "once".into()));
    assert_eq!(take(&mut resumed, want.len()).await, want);

    // The live subscribers got the keyed publish once, not twice.
    assert_eq!(take(&mut on_two, 1).await[0].1, "once");
    let later = publish(&nodes[1], "news", "after", None).await;
    assert_eq!(
        take(&mut on_two, 1).await[0].0,
        later["id"].as_str().unwrap(),
        "the duplicate reached a subscriber"
    );

    // /readyz names the node; /metrics shows the calls that crossed nodes.
    let ready = nodes[0].get_json("/readyz", 200).await;
    assert_eq!(
        ready["cluster"]["nodes_alive"].as_array().unwrap().len(),
        3,
        "{ready}"
    );
    let forwarded: u64 = metric_sum(&nodes, "dormouse_cluster_forwarded_total").await;
    assert!(forwarded > 0, "no call crossed nodes");
}

/// The sum of one metric over `nodes`.
async fn metric_sum(nodes: &[ChildServer], name: &str) -> u64 {
    let mut sum = 0;
    for node in nodes {
        sum += node.metric(name).await as u64;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_channel_is_served_by_another_node_with_its_history() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(&nats, dir.path()).await;

    let mut sent = Vec::new();
    for i in 0..10 {
        let json = publish(&nodes[i % 3], "orders", &format!("o{i}"), None).await;
        sent.push((json["id"].as_str().unwrap().to_string(), format!("o{i}")));
    }
    // Which node owns it: the one holding it.
    let mut owner = None;
    for (i, node) in nodes.iter().enumerate() {
        if node.metric("dormouse_cluster_objects_held").await > 0.0 {
            owner = Some(i);
        }
    }
    let owner = owner.expect("some node holds the channel");
    let survivor = (owner + 1) % 3;
    let mut watching = SseClient::connect(
        &nodes[survivor],
        "/v1/channels/orders/events",
        Some(&sent[9].0),
    )
    .await;

    nodes.remove(owner).kill();
    let survivor = if survivor > owner {
        survivor - 1
    } else {
        survivor
    };
    let started = Instant::now();
    let after = loop {
        let response = nodes[survivor]
            .client
            .post(nodes[survivor].url("/v1/channels/orders/messages"))
            .body("after the kill")
            .send()
            .await
            .unwrap();
        if response.status() == 201 {
            break response.json::<Value>().await.unwrap();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no node took the channel over: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("served again {:?} after the kill", started.elapsed());
    let (epoch, seq) = parse(after["id"].as_str().unwrap());
    assert_eq!((epoch, seq), (parse(&sent[9].0).0, parse(&sent[9].0).1 + 1));
    // The subscriber on a surviving node never noticed.
    assert_eq!(
        take(&mut watching, 1).await,
        [(
            after["id"].as_str().unwrap().to_string(),
            "after the kill".to_string()
        )]
    );
    for node in &nodes {
        let events = node.all_history("orders").await;
        assert_eq!(events.len(), 11, "history through {:?}", node.addr);
    }
}

/// What the cluster panel of the admin page shows, as the data attributes its script keeps.
const CLUSTER_PANEL: &str = r#"(() => {
  const v = (id) => document.getElementById(id).dataset.value;
  const t = (id) => document.getElementById(id).textContent;
  return {
    hidden: document.getElementById("cluster").hidden,
    node: t("cluster-node"), nodes: t("cluster-nodes"),
    alive: Number(v("cluster-alive")), held: Number(v("cluster-held")),
    rtt: Number(v("cluster-rtt")), forwarded: Number(v("cluster-forwarded")),
    fenced: Number(v("cluster-fenced")), nats: t("cluster-nats"),
  };
})()"#;

/// The operator's view: `/metrics` and `/admin` (JSON and the page, in Chromium) show the
/// nodes, what this node holds, forwards, fencing refusals and NATS latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_the_admin_page_show_the_cluster() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&nats, dir.path()).await;
    for i in 0..6 {
        publish(&nodes[i % 3], "dashboard", &format!("m{i}"), None).await;
    }
    let metrics = nodes[0]
        .client
        .get(nodes[0].url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "dormouse_cluster_nodes_alive 3",
        "dormouse_cluster_journal_append_seconds_total ",
        "dormouse_cluster_nats_rtt_seconds ",
        "dormouse_cluster_fenced_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "no {name:?} in:\n{metrics}"
        );
    }
    // Every node's own view: the one that owns the channel appended, the others forwarded.
    let mut appends = 0;
    let mut forwarded = 0;
    for node in &nodes {
        let stats = node.get_json("/admin/api/stats", 200).await;
        let cluster = &stats["cluster"];
        assert_eq!(cluster["nodes_alive"], json!(["n1", "n2", "n3"]), "{stats}");
        assert_eq!(cluster["nats_connected"], true);
        assert_eq!(cluster["fenced_total"], 0);
        appends += cluster["appends_total"].as_u64().unwrap();
        forwarded += cluster["forwarded_total"].as_u64().unwrap();
    }
    assert!(appends >= 6, "six publishes, {appends} appends");
    assert!(
        forwarded >= 4,
        "two of three nodes forwarded theirs: {forwarded}"
    );

    // The page shows the cluster panel (it stays hidden on one node).
    let browser = Browser::launch().await;
    let mut page = browser.open(&nodes[1].url("/admin")).await;
    let panel = page
        .until(
            "the cluster panel with three nodes and a NATS round trip",
            CLUSTER_PANEL,
            |v| {
                v["hidden"] == false
                    && v["alive"] == 3
                    && v["rtt"].as_f64().is_some_and(|r| r > 0.0)
            },
        )
        .await;
    assert_eq!(panel["node"], "n2", "{panel}");
    assert_eq!(panel["nodes"], "n1, n2, n3", "{panel}");
    assert_eq!(panel["fenced"], 0, "{panel}");
    assert!(
        panel["nats"].as_str().unwrap().starts_with("connected to "),
        "{panel}"
    );
    browser.close().await;
}

/// `GET /v1/channels` on any node lists every channel with a log, cluster-wide, hibernated
/// or not, in the single node's order and pages; a deleted channel is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_lists_every_channel_of_the_cluster() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(&nats, dir.path()).await;
    let mut last = std::collections::BTreeMap::new();
    for (i, channel) in ["b22", "c", "a1", "gone"].iter().enumerate() {
        for n in 0..=i {
            let sent = publish(&nodes[(i + n) % 3], channel, &format!("m{n}"), None).await;
            last.insert(*channel, sent["id"].as_str().unwrap().to_string());
        }
    }
    let deleted = nodes[1]
        .client
        .delete(nodes[1].url("/v1/channels/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    // Every channel hibernates (idle timeout 2 s): the listing asks the index, not memory.
    for node in &nodes {
        node.until_metric("dormouse_cluster_objects_held", 0.0)
            .await;
    }
    let first = nodes[2].get_json("/v1/channels?limit=2", 200).await;
    let names = |page: &Value| -> Vec<String> {
        page["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["channel"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&first), ["c", "a1"], "{first}");
    assert_eq!(first["next_after"], "a1");
    assert_eq!(first["channels"][0]["state"], "hibernated", "{first}");
    let second = nodes[0]
        .get_json("/v1/channels?limit=2&after=a1", 200)
        .await;
    assert_eq!(names(&second), ["b22"], "{second}");
    assert_eq!(second["next_after"], Value::Null);
    for page in [&first, &second] {
        for channel in page["channels"].as_array().unwrap() {
            let name = channel["channel"].as_str().unwrap();
            assert_eq!(channel["last_id"], last[name].as_str(), "{channel}");
            let events = ["b22", "c", "a1"].iter().position(|c| *c == name).unwrap() + 1;
            assert_eq!(channel["events"], events, "{channel}");
        }
    }
}

const JWT_SECRET: &str = "cluster-connections-secret-long-enough";

/// An HS256 token for `sub` with `grants`, valid for an hour.
fn token(sub: &str, grants: Value) -> String {
    dormouse_testkit::jwt(JWT_SECRET, 3600, json!({"sub": sub, "dormouse": grants}))
}

/// A backend's call to `node`, with a token that has the `connections` capability.
async fn backend(node: &ChildServer, method: &str, path: &str, body: &str) -> (u16, Value) {
    let response = node
        .client
        .request(method.parse().unwrap(), node.url(path))
        .bearer_auth(token("backend", json!({"connections": true})))
        .body(body.to_string())
        .send()
        .await
        .expect("a connections call");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// Connection ids work from any node: a backend lists a subject's connections on every
/// node, sends to one connection through a node that does not serve it, reaches a subject
/// on two nodes with one call, closes a connection remotely; a killed node's ids name
/// nothing any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reaches_connections_on_any_node_and_a_dead_nodes_are_gone() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nodes_with(
        &nats,
        dir.path(),
        &[("DORMOUSE_AUTH_JWT_SECRET", JWT_SECRET)],
    )
    .await;
    let subscriber = |sub: &str| token(sub, json!({"subscribe": ["room"]}));
    let mut alice_ws = WsClient::connect(
        &nodes[0],
        &format!("/v1/channels/room/ws?access_token={}", subscriber("alice")),
    )
    .await;
    let alice_ws_id = alice_ws.connection_id.clone().expect("an id");
    let mut alice_sse = SseClient::connect_to(
        &nodes[1].client,
        &nodes[1].url(&format!(
            "/v1/channels/room/events?access_token={}",
            subscriber("alice")
        )),
        None,
    )
    .await;
    let alice_sse_id = alice_sse.connection_id().await;
    let mut bob = WsClient::connect(
        &nodes[2],
        &format!("/v1/channels/room/ws?access_token={}", subscriber("bob")),
    )
    .await;
    let bob_id = bob.connection_id.clone().expect("an id");
    assert!(alice_ws_id.starts_with("n1."), "{alice_ws_id}");
    assert!(alice_sse_id.starts_with("n2."), "{alice_sse_id}");

    // Listings from any node cover every node.
    let (status, listed) = backend(&nodes[2], "GET", "/v1/subjects/alice/connections", "").await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["total"], 2, "{listed}");
    let mut served_by: Vec<&str> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    served_by.sort();
    assert_eq!(served_by, ["n1", "n2"]);
    let (_, room) = backend(&nodes[0], "GET", "/v1/channels/room/connections", "").await;
    assert_eq!(room["total"], 3, "{room}");

    // One connection, through a node that does not serve it.
    let (status, sent) = backend(
        &nodes[2],
        "POST",
        &format!("/v1/connections/{alice_ws_id}/messages?event=note"),
        "via n3",
    )
    .await;
    assert_eq!((status, &sent["queued"]), (200, &json!(true)), "{sent}");
    assert_eq!(
        alice_ws.next().await.unwrap(),
        json!({"type": "direct", "event": "note", "data": "via n3"})
    );
    let (status, info) = backend(&nodes[1], "GET", &format!("/v1/connections/{bob_id}"), "").await;
    assert_eq!(
        (status, info["node"].as_str(), info["subject"].as_str()),
        (200, Some("n3"), Some("bob"))
    );

    // A subject on two nodes, with one call.
    let (_, sent) = backend(
        &nodes[0],
        "POST",
        "/v1/subjects/alice/messages",
        "to all of alice",
    )
    .await;
    assert_eq!(sent["queued"], 2, "{sent}");
    assert_eq!(alice_ws.next().await.unwrap()["data"], "to all of alice");
    assert_eq!(alice_sse.next().await.unwrap().data, "to all of alice");

    // Closing remotely.
    let (status, _) = backend(
        &nodes[0],
        "POST",
        &format!("/v1/connections/{bob_id}/close"),
        r#"{"code": 4200, "reason": "moved"}"#,
    )
    .await;
    assert_eq!(status, 200);
    bob.expect_close(4200).await;

    // A dead node took its connections with it: its ids are gone from every survivor.
    nodes.remove(0).kill();
    let started = Instant::now();
    loop {
        let (status, answer) = backend(
            &nodes[1],
            "POST",
            &format!("/v1/connections/{alice_ws_id}/messages"),
            "x",
        )
        .await;
        if status == 404 {
            assert_eq!(answer["error"]["code"], "connection_not_found");
            break;
        }
        assert!(started.elapsed() < PATIENCE, "still {status}: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, listed) = backend(&nodes[0], "GET", "/v1/subjects/alice/connections", "").await;
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(
        listed["connections"][0]["connection_id"],
        alice_sse_id.as_str()
    );
}

/// A node that dies owes its hooked connections their disconnects: another node takes its
/// records over and sends them (reason `node_lost`), with the keys the dead node would have
/// used. A channel is occupied once whatever the number of nodes its subscribers are on,
/// and vacated when the last of them leaves, even by dying with its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_hooked_connections_get_their_disconnects_from_a_survivor() {
    use dormouse_testkit::upstream::{Answer, Upstream};
    const SECRET: &str = "cluster-hook-secret-0123456789abcdefgh";
    let upstream = Upstream::start(SECRET, |_| Answer::Json(200, "{}".into())).await;
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dormouse.toml");
    std::fs::write(
        &config,
        format!(
            "[[hooks]]\nname = \"app\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\nchannels = [\"room:*\"]\n\
             events = [\"connect\", \"disconnect\", \"occupied\", \"vacated\"]\n",
            upstream.url()
        ),
    )
    .unwrap();
    let mut nodes = nodes_with(
        &nats,
        dir.path(),
        &[("DORMOUSE_CONFIG", config.to_str().unwrap())],
    )
    .await;
    let doomed = WsClient::connect(&nodes[0], "/v1/channels/room:1/ws").await;
    let doomed_id = doomed.connection_id.clone().expect("an id");
    let mut survivor = WsClient::connect(&nodes[1], "/v1/channels/room:1/ws").await;
    let survivor_id = survivor.connection_id.clone().expect("an id");
    let alone = WsClient::connect(&nodes[0], "/v1/channels/room:2/ws").await;
    let alone_id = alone.connection_id.clone().expect("an id");
    upstream.until("connect", 3).await;
    let keys = |event: &str| -> Vec<String> {
        let mut keys: Vec<String> = upstream
            .calls(event)
            .iter()
            .map(|c| c.idempotency_key.clone())
            .collect();
        keys.sort();
        keys
    };
    upstream.until("occupied", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        keys("occupied"),
        ["room:1/occupied/1", "room:2/occupied/1"],
        "once per channel, whatever the nodes"
    );

    nodes.remove(0).kill();
    // room:2's only subscriber died with its node: vacated by a survivor.
    let vacated = upstream.until("vacated", 1).await.remove(0);
    assert_eq!(vacated.idempotency_key, "room:2/vacated/2");
    let disconnects = upstream.until("disconnect", 2).await;
    let mut lost: Vec<&str> = disconnects
        .iter()
        .map(|c| c.body["connection_id"].as_str().unwrap())
        .collect();
    lost.sort();
    let mut expected = [doomed_id.as_str(), alone_id.as_str()];
    expected.sort();
    assert_eq!(lost, expected);
    let disconnect = disconnects
        .into_iter()
        .find(|c| c.body["connection_id"] == doomed_id.as_str())
        .unwrap();
    assert_eq!(disconnect.body["connection_id"], doomed_id.as_str());
    assert_eq!(disconnect.body["reason"], "node_lost");
    assert_eq!(
        disconnect.idempotency_key,
        format!("{doomed_id}/disconnect")
    );
    // The connection on a live node was not reported, and keeps room:1 occupied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(upstream.calls("disconnect").len(), 2);
    assert_eq!(keys("vacated"), ["room:2/vacated/2"]);
    let id = publish(&nodes[0], "room:1", "still here", None).await;
    let got = survivor.next().await.unwrap();
    assert_eq!(
        (got["id"].as_str(), got["data"].as_str()),
        (id["id"].as_str(), Some("still here"))
    );
    drop(survivor);
    let disconnects = upstream.until("disconnect", 3).await;
    assert_eq!(disconnects[2].body["connection_id"], survivor_id.as_str());
    assert_eq!(disconnects[2].body["reason"], "client_left");
    upstream.until("vacated", 2).await;
    assert_eq!(keys("vacated"), ["room:1/vacated/2", "room:2/vacated/2"]);
}

/// Presence in cluster mode: each node keeps the members it serves, from its copy of the
/// channel (joins, leaves and the presence query), whichever node owns the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_covers_the_members_each_node_serves() {
    let nats = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_with(
        &nats,
        dir.path(),
        &[
            ("DORMOUSE_AUTH_JWT_SECRET", JWT_SECRET),
            ("DORMOUSE_CHANNELS_PRESENCE", "true"),
        ],
    )
    .await;
    let member = |sub: &str| token(sub, json!({"subscribe": ["room"], "publish": ["room"]}));
    let ws_path = |sub: &str| format!("/v1/channels/room/ws?access_token={}", member(sub));
    // The channel is owned by whichever node its first publish reached: n3 here.
    let sent = nodes[2]
        .client
        .post(nodes[2].url("/v1/channels/room/messages"))
        .bearer_auth(member("owner"))
        .body("first")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 201);

    let mut alice = WsClient::connect(&nodes[0], &ws_path("alice")).await;
    assert_eq!(alice.next().await.unwrap()["subject"], "alice");
    let mut bob = WsClient::connect(&nodes[0], &ws_path("bob")).await;
    let join = json!({"type": "join", "channel": "room", "subject": "bob"});
    assert_eq!(bob.next().await.unwrap(), join);
    assert_eq!(alice.next().await.unwrap(), join);
    let mut carol = WsClient::connect(&nodes[1], &ws_path("carol")).await;
    assert_eq!(carol.next().await.unwrap()["subject"], "carol");

    let listed = |i: usize| {
        let node = &nodes[i];
        let who = member("reader");
        async move {
            let res = node
                .client
                .get(node.url("/v1/channels/room/presence"))
                .bearer_auth(who)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            let body: Value = res.json().await.unwrap();
            body["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["subject"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(0).await, ["alice", "bob"]);
    assert_eq!(listed(1).await, ["carol"]);
    assert!(listed(2).await.is_empty());

    // A leave reaches the members of the node that served it.
    bob.close().await;
    assert_eq!(
        alice.next().await.unwrap(),
        json!({"type": "leave", "channel": "room", "subject": "bob"})
    );
    assert_eq!(listed(0).await, ["alice"]);
    // Events still reach every node's members, after the presence events.
    let id = nodes[1]
        .client
        .post(nodes[1].url("/v1/channels/room/messages"))
        .bearer_auth(member("carol"))
        .body("hello")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .clone();
    for ws in [&mut alice, &mut carol] {
        let got = ws.next().await.unwrap();
        assert_eq!(
            (&got["type"], &got["id"]),
            (&json!("message"), &id),
            "{got}"
        );
    }
}
