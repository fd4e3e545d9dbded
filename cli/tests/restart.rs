//! Restarts: a graceful restart that subscribers ride through with their last ids, and
//! `kill -9` of the real binary in the middle of publishing, after which every acknowledged
//! message is there exactly once and in order.

use dormouse_testkit as support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{ChildServer, PATIENCE, SseClient, TestServer, WsClient};

/// The binary under test.
const DORMOUSE: &str = env!("CARGO_BIN_EXE_dormouse");

const EVENTS: &str = "/v1/channels/durable/events";
const WS: &str = "/v1/channels/durable/ws";

#[tokio::test]
async fn subscribers_resume_across_a_graceful_restart_with_exactly_the_missed_events() {
    let server = TestServer::start().await;
    let mut sse = SseClient::connect(&server, EVENTS, None).await;
    let mut ws = WsClient::connect(&server, WS).await;
    let mut a = Vec::new();
    for i in 0..3 {
        a.push(server.publish("durable", format!("a{i}")).await);
    }
    for (i, id) in a.iter().enumerate() {
        sse.expect_event(id, "message", &format!("a{i}")).await;
        ws.expect_event(id, "message", &format!("a{i}")).await;
    }
    // A client that left earlier, with an older cursor.
    let early = a[0].clone();

    let (server, ()) = tokio::join!(server.restart_with(|_| {}), async {
        assert_eq!(
            sse.expect_control("reconnect").await,
            json!({
                "type": "reconnect", "reason": "shutdown",
                "message": "the server is restarting; reconnect with your last event id",
            })
        );
        assert_eq!(
            sse.next().await,
            None,
            "the stream ends after the reconnect hint"
        );
        assert_eq!(
            ws.next().await,
            Some(json!({"type": "close", "code": 1012, "reason": "service restart"}))
        );
        assert_eq!(ws.next().await, None);
    });
    // The control event did not move the cursor.
    assert_eq!(sse.last_id.as_deref(), Some(a[2].as_str()));

    let mut b = Vec::new();
    for i in 0..3 {
        b.push(server.publish("durable", format!("b{i}")).await);
    }
    assert!(b.iter().all(|id| !a.contains(id)), "{a:?} {b:?}");

    let mut sse = SseClient::connect(&server, EVENTS, sse.last_id.as_deref()).await;
    let mut ws = WsClient::connect(&server, &format!("{WS}?last_event_id={}", a[2])).await;
    let mut early = SseClient::connect(&server, EVENTS, Some(&early)).await;
    for (i, id) in b.iter().enumerate() {
        sse.expect_event(id, "message", &format!("b{i}")).await;
        ws.expect_event(id, "message", &format!("b{i}")).await;
    }
    early.expect_event(&a[1], "message", "a1").await;
    early.expect_event(&a[2], "message", "a2").await;
    for (i, id) in b.iter().enumerate() {
        early.expect_event(id, "message", &format!("b{i}")).await;
    }
    let live = server.publish("durable", "c0").await;
    sse.expect_event(&live, "message", "c0").await;
    ws.expect_event(&live, "message", "c0").await;
    early.expect_event(&live, "message", "c0").await;

    let info = server.get_json("/v1/channels/durable", 200).await;
    assert_eq!(
        (&info["events"], &info["earliest_id"], &info["last_id"]),
        (&json!(7), &json!(a[0]), &json!(live))
    );
    drop((sse, ws, early));
    server.stop().await;
}

/// Publishes 1 MiB messages to `channel` until its only subscriber, which does not read, has
/// been cut off as a slow consumer: by then its connection is stuck writing to a full socket.
async fn stall(server: &TestServer, channel: &str) {
    for _ in 0..64 {
        server.publish(channel, vec![b'x'; 1 << 20]).await;
        let info = server
            .get_json(&format!("/v1/channels/{channel}"), 200)
            .await;
        if info["subscribers"] == 0 {
            return;
        }
    }
    panic!("the subscriber that does not read was never cut off");
}

#[tokio::test]
async fn a_graceful_stop_finishes_while_an_sse_client_has_stopped_reading() {
    let server = TestServer::start().await;
    let stalled = SseClient::connect(&server, "/v1/channels/stalled/events", None).await;
    stall(&server, "stalled").await;
    // Fails the test if the server has not stopped within PATIENCE.
    let dir = server.stop().await;
    drop((stalled, dir));
}

#[tokio::test]
async fn a_graceful_restart_reopens_the_data_dir_while_a_websocket_client_has_stopped_reading() {
    let server = TestServer::start().await;
    let stalled = WsClient::connect(&server, "/v1/channels/stalled/ws").await;
    stall(&server, "stalled").await;
    let server = server.restart_with(|_| {}).await;
    let id = server.publish("stalled", "after").await;
    let page = server.history("stalled", &format!("?after={id}")).await;
    assert_eq!(page["events"], json!([]));
    drop(stalled);
    server.stop().await;
}

/// What one publisher got acknowledged: `(n, id)` for its messages `{tag}-{n}`, in order.
type Acked = Vec<(usize, String)>;

/// Publishes `{tag}-0`, `{tag}-1`, ... one at a time until a request fails (the server was
/// killed) or `max` messages; counts acknowledgements in `acks`.
async fn publisher(url: String, tag: String, acks: Arc<AtomicUsize>, max: usize) -> Acked {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut acked = Vec::new();
    for n in 0..max {
        let Ok(res) = client.post(&url).body(format!("{tag}-{n}")).send().await else {
            break;
        };
        if res.status() != 201 {
            break;
        }
        let Ok(body) = res.json::<Value>().await else {
            break;
        };
        acked.push((n, body["id"].as_str().expect("id").to_string()));
        acks.fetch_add(1, Ordering::SeqCst);
    }
    acked
}

fn seq_of(id: &str) -> (String, u64) {
    let (epoch, seq) = id.split_once('-').expect("id shaped epoch-seq");
    (epoch.to_string(), seq.parse().expect("seq"))
}

/// Every retained event of the channel, oldest first, as `(id, data)`.
async fn read_all(server: &ChildServer, channel: &str) -> Vec<(String, String)> {
    let events = server.all_history(channel).await;
    events
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_string(),
                e["data"].as_str().expect("text data").to_string(),
            )
        })
        .collect()
}

/// Checks the log against what was acknowledged: each publisher's messages form a
/// contiguous run `0..m` in order, with `m` the acknowledged count or one more (the request
/// in flight at the kill may have been committed without its answer arriving); each
/// acknowledged message has the acknowledged id; no message appears twice; ids increase.
fn check_log(events: &[(String, String)], acked: &BTreeMap<String, Acked>, sentinels: usize) {
    let mut seen = HashSet::new();
    let mut previous: Option<(String, u64)> = None;
    let mut by_tag: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    let mut sentinels_seen = 0;
    for (id, data) in events {
        assert!(seen.insert(data.clone()), "{data} appears twice");
        let (epoch, seq) = seq_of(id);
        if let Some((e, s)) = &previous {
            assert_eq!(&epoch, e, "one epoch across crashes");
            assert!(seq > *s, "ids increase: {id} after seq {s}");
        }
        previous = Some((epoch, seq));
        if data.starts_with("sentinel-") {
            sentinels_seen += 1;
            continue;
        }
        let (tag, n) = data.rsplit_once('-').expect("tag-n");
        by_tag
            .entry(tag.to_string())
            .or_default()
            .push((n.parse().expect("n"), id.clone()));
    }
    assert_eq!(sentinels_seen, sentinels);
    for (tag, acked) in acked {
        let stored = by_tag.remove(tag).unwrap_or_default();
        let ns: Vec<usize> = stored.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            ns,
            (0..ns.len()).collect::<Vec<_>>(),
            "{tag}: in order, without holes"
        );
        assert!(
            ns.len() == acked.len() || ns.len() == acked.len() + 1,
            "{tag}: {} acknowledged, {} stored",
            acked.len(),
            ns.len()
        );
        assert_eq!(
            &stored[..acked.len()],
            &acked[..],
            "{tag}: acknowledged ids"
        );
    }
    assert!(by_tag.is_empty(), "messages nobody sent: {by_tag:?}");
}

/// Reads the channel twice, by history and by an SSE subscription resuming from the first
/// id, and checks both against the acknowledgements.
async fn verify(server: &ChildServer, acked: &BTreeMap<String, Acked>, sentinels: &mut usize) {
    let client = reqwest::Client::new();
    let events = read_all(server, "crash").await;
    check_log(&events, acked, *sentinels);

    let first = events.first().expect("some events").0.clone();
    let mut sse = SseClient::connect_to(
        &client,
        &server.url("/v1/channels/crash/events"),
        Some(&first),
    )
    .await;
    *sentinels += 1;
    let sentinel = format!("sentinel-{sentinels}");
    let res = client
        .post(server.url("/v1/channels/crash/messages"))
        .body(sentinel.clone())
        .send()
        .await
        .expect("publish sentinel");
    assert_eq!(res.status(), 201);
    let sentinel_id = res.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut streamed = Vec::new();
    loop {
        let event = sse.next().await.expect("an event");
        assert_eq!(event.event, "message");
        let id = event.id.expect("id");
        if event.data == sentinel {
            assert_eq!(id, sentinel_id);
            break;
        }
        streamed.push((id, event.data));
    }
    assert_eq!(streamed, events[1..].to_vec(), "SSE replay equals history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_loses_no_acknowledged_message() {
    const PUBLISHERS: usize = 4;
    let data = tempfile::tempdir().expect("data dir");
    let mut acked: BTreeMap<String, Acked> = BTreeMap::new();
    let mut sentinels = 0;

    // Two kill points: early (few messages) and later (after a first crash and recovery).
    for (cycle, kill_after) in [(0, 37), (1, 151)] {
        let server = ChildServer::start(Path::new(DORMOUSE), data.path(), &[]).await;
        if cycle > 0 {
            verify(&server, &acked, &mut sentinels).await;
        }
        let acks = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                tokio::spawn(publisher(
                    server.url("/v1/channels/crash/messages"),
                    format!("c{cycle}-p{p}"),
                    acks.clone(),
                    400,
                ))
            })
            .collect();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while acks.load(Ordering::SeqCst) < kill_after {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} acknowledged in time",
                acks.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.kill();
        for (p, task) in tasks.into_iter().enumerate() {
            let got = tokio::time::timeout(PATIENCE, task)
                .await
                .expect("publisher stops after the kill")
                .expect("publisher task");
            assert!(got.len() < 400, "the kill happened mid-stream");
            acked.insert(format!("c{cycle}-p{p}"), got);
        }
        let total: usize = acked.values().map(Vec::len).sum();
        assert!(total >= kill_after, "{total} acknowledged");
    }
    let server = ChildServer::start(Path::new(DORMOUSE), data.path(), &[]).await;
    verify(&server, &acked, &mut sentinels).await;
    drop(server);
}

/// Publishes `messages` to channel `legacy` of a data dir on the sled engine, as a server
/// from before the segment engine did; returns their ids.
async fn publish_on_sled(data_dir: &Path, messages: &[&str]) -> Vec<String> {
    use dormouse_actors::channel::{ChannelRequest, ChannelResponse, NewMessage};
    use dormouse_actors::{Channel, ChannelEnv};
    let storage = Arc::new(
        dormouse_storage::SledStorage::open(dormouse_storage::SledConfig::new(data_dir))
            .expect("create a sled data dir"),
    );
    let runtime = dormouse_runtime::Runtime::new(storage.clone());
    let channels = runtime.namespace::<Channel>(
        "channel",
        dormouse_runtime::NamespaceConfig::with_idle_timeout(Duration::from_secs(30)),
        ChannelEnv::default(),
    );
    let batch = messages
        .iter()
        .map(|m| NewMessage {
            event: None,
            data: bytes::Bytes::copy_from_slice(m.as_bytes()),
            idempotency_key: None,
        })
        .collect();
    let ChannelResponse::Published(published) = channels
        .call("legacy", ChannelRequest::Publish(batch))
        .await
        .expect("publish on sled")
    else {
        panic!("a publish answers with ids");
    };
    channels.shutdown().await;
    drop(channels);
    drop(runtime);
    dormouse_storage::Storage::close(&*storage).expect("close sled");
    published.into_iter().map(|p| p.id).collect()
}

#[tokio::test]
async fn a_data_dir_written_by_the_sled_engine_is_migrated_and_keeps_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let before = publish_on_sled(&data, &["one", "two"]).await;

    let server = TestServer::start_with(|s| s.data_dir = data.clone()).await;
    assert!(
        !data.join("sled").exists(),
        "sled's directory was set aside"
    );
    assert!(data.join("sled.migrated").is_dir(), "and kept");
    let third = server.publish("legacy", "three").await;
    let server = server.restart_with(|_| {}).await;
    let fourth = server.publish("legacy", "four").await;
    let history = server.all_history("legacy").await;
    let ids: Vec<_> = history.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let data_read: Vec<_> = history
        .iter()
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = before
        .iter()
        .map(String::as_str)
        .chain([third.as_str(), fourth.as_str()])
        .collect();
    assert_eq!(
        ids, expected,
        "ids from before the move resume the same history"
    );
    assert_eq!(data_read, ["one", "two", "three", "four"]);
}

#[tokio::test]
async fn a_new_data_dir_uses_the_segment_engine() {
    let server = TestServer::start().await;
    server.publish("fresh", "x").await;
    assert!(server.data_dir.join("segments").is_dir());
    assert!(!server.data_dir.join("sled").exists());
}
