//! Runs over the wire: a real server, a producer over HTTP, viewers over SSE (the run's
//! channel) and WebSocket (the run itself) that drop mid-run and resume.

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use support::{
    ChildServer, PATIENCE, Producer, Runs, Seen, SseClient, Viewer, WsClient, assert_ids_increase,
    assert_same_events, id_order, pseudo_random, start,
};

/// The example's binary, for the tests that kill it like a crash.
const BINARY: &str = env!("CARGO_BIN_EXE_example-agent_stream");

const ARTIFACT_SIZE: usize = 5 << 20;

fn token(i: usize) -> String {
    format!("token {i}{}", if i % 10 == 9 { "\n" } else { " " })
}

/// Ids strictly increase, and the artifact decodes to exactly the bytes sent.
fn check_stream(who: &str, seen: &[Seen], artifact: &[u8]) {
    assert_ids_increase(who, seen);
    let event = seen
        .iter()
        .find(|s| s.event["type"] == "artifact")
        .unwrap_or_else(|| panic!("{who}: no artifact"));
    let decoded = BASE64
        .decode(event.event["data_base64"].as_str().expect("data_base64"))
        .expect("base64");
    assert_eq!(decoded.len(), artifact.len(), "{who}: artifact size");
    assert!(decoded == artifact, "{who}: artifact bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_that_drop_mid_run_resume_with_exactly_the_missed_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_secs(2)).await;
    let mut producer = Producer::new("run-1");
    let artifact = pseudo_random(ARTIFACT_SIZE);

    // Both viewers are there before the first token: SSE from the channel's next event,
    // WebSocket from the start of the run.
    let mut sse = SseClient::connect(&server, "/v1/channels/run:run-1/events", None).await;
    let mut ws = WsClient::connect(&server, "/v1/objects/runs/run-1/ws").await;
    for i in 0..80 {
        producer.chunk(&server, &token(i)).await;
    }

    // Each viewer reads part of what was produced, then drops.
    let mut sse_seen = sse.take(50).await;
    drop(sse);
    let mut ws_seen = ws.take(60).await;
    ws.close().await;

    // The run goes on without them: more tokens, a 5 MiB artifact, more tokens.
    for i in 80..120 {
        producer.chunk(&server, &token(i)).await;
    }
    producer
        .artifact(&server, "report.bin", artifact.clone())
        .await;
    for i in 120..150 {
        producer.chunk(&server, &token(i)).await;
    }

    // Both resume mid-run with their last id: SSE with the header, WebSocket with the query.
    let sse_last = sse_seen.last().unwrap().id.clone();
    let mut sse =
        SseClient::connect(&server, "/v1/channels/run:run-1/events", Some(&sse_last)).await;
    let ws_last = ws_seen.last().unwrap().id.clone();
    let mut ws = WsClient::connect(
        &server,
        &format!("/v1/objects/runs/run-1/ws?last_event_id={ws_last}"),
    )
    .await;

    for i in 150..200 {
        producer.chunk(&server, &token(i)).await;
    }
    let state = json!({"answer": "forty-two", "tokens": 200, "artifacts": ["report.bin"]});
    producer.finish(&server, state.clone()).await;
    let expected = &producer.expected;
    assert_eq!(expected.len(), 202);

    sse_seen.extend(sse.take(expected.len() - sse_seen.len()).await);
    ws_seen.extend(ws.take(expected.len() - ws_seen.len()).await);
    ws.expect_close(1000).await;
    assert_same_events("sse", &sse_seen, expected);
    assert_same_events("websocket", &ws_seen, expected);
    check_stream("sse", &sse_seen, &artifact);
    check_stream("websocket", &ws_seen, &artifact);
    // The channel holds each event once, so no viewer could ever have got a duplicate.
    let history = server.all_history("run:run-1").await;
    assert_eq!(history.len(), expected.len());
    assert_eq!(
        history.last().unwrap()["id"].as_str(),
        sse_seen.last().map(|s| s.id.as_str())
    );

    // Finished is final.
    let res = server.post("run-1", "/chunks", "late").await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "finished");
    assert_eq!(server.post("run-1", "/finish", "{}").await.status(), 409);
    let status = server.get_json("/v1/objects/runs/run-1/state", 200).await;
    assert_eq!(status["status"], "finished");
    assert_eq!(status["state"], state);
    assert_eq!(status["chunks"], 200);
    assert_eq!(status["artifacts"], 1);
    assert_eq!(status["artifact_bytes"], ARTIFACT_SIZE);
    assert_eq!(
        status["last_id"].as_str(),
        ws_seen.last().map(|s| s.id.as_str())
    );
    assert_eq!(status["channel"], "run:run-1");

    // The final state and the whole run survive a restart.
    let server = server.restart().await;
    let after = server.get_json("/v1/objects/runs/run-1/state", 200).await;
    assert_eq!(after, status);
    let mut ws = WsClient::connect(&server, "/v1/objects/runs/run-1/ws").await;
    let replay = ws.take(expected.len()).await;
    ws.expect_close(1000).await;
    assert_same_events("replay after restart", &replay, expected);
    assert_eq!(
        replay.iter().map(|s| &s.id).collect::<Vec<_>>(),
        ws_seen.iter().map(|s| &s.id).collect::<Vec<_>>(),
        "ids are stable across restarts"
    );
    server.stop().await;
}

/// A crash can lose publishes the channel had queued but not stored. Deleting the channel
/// stands in for that loss here; the run notices when it next wakes and republishes.
#[tokio::test]
async fn a_run_republishes_what_its_channel_lacks_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    // A long mirror check, so only the wake-up repairs.
    let server = start(dir.path(), Duration::from_secs(600)).await;
    let mut producer = Producer::new("run-2");
    for i in 0..10 {
        producer.chunk(&server, &token(i)).await;
    }
    producer.finish(&server, json!({"ok": true})).await;
    let wait = async {
        while server.all_history("run:run-2").await.len() < 11 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("mirrored");
    let res = server
        .client
        .delete(server.url("/v1/channels/run:run-2"))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert!(server.all_history("run:run-2").await.is_empty());

    let server = server.restart().await;
    let status = server.get_json("/v1/objects/runs/run-2/state", 200).await;
    assert_eq!(status["status"], "finished");
    let wait = async {
        loop {
            let history = server.all_history("run:run-2").await;
            if history.len() >= 11 {
                return history;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let history = tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("repaired");
    let events: Vec<Value> = history
        .iter()
        .map(|e| {
            let value: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
            assert_eq!(e["event"], value["type"]);
            value
        })
        .collect();
    assert_eq!(events, producer.expected, "every event, once, in order");

    // Waking the run again finds the channel complete and publishes nothing.
    let server = server.restart().await;
    server.get_json("/v1/objects/runs/run-2/state", 200).await;
    assert_eq!(server.all_history("run:run-2").await.len(), 11);
    server.stop().await;
}

/// The example binary killed with SIGKILL right after acknowledging the last event: after a
/// restart, with nobody touching the run, its alarm wakes it and the channel ends up with
/// every event; a WebSocket viewer resumes across the crash with its last id, and the next
/// event's id lies past anything the crashed process could have handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_reach_both_kinds_of_viewer_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(Path::new(BINARY), dir.path(), &[]).await;
    let mut producer = Producer::new("run-k");
    let mut ws = WsClient::connect(&server, "/v1/objects/runs/run-k/ws").await;
    for i in 0..100 {
        producer.chunk(&server, &token(i)).await;
    }
    let seen = ws.take(100).await;
    assert_same_events("before the crash", &seen, &producer.expected);
    server.kill();
    drop(ws);

    let server = ChildServer::start(Path::new(BINARY), dir.path(), &[]).await;
    let wait = async {
        loop {
            let history = server.all_history("run:run-k").await;
            if history.len() >= 100 {
                return history;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let history = tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("mirrored");
    let events: Vec<Value> = history
        .iter()
        .map(|e| serde_json::from_str(e["data"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(
        events, producer.expected,
        "the channel has every event, once, in order"
    );

    let last = seen.last().unwrap().id.clone();
    let mut ws = WsClient::connect_with(
        &server,
        "/v1/objects/runs/run-k/ws",
        &[("Last-Event-ID", &last)],
    )
    .await;
    producer.chunk(&server, "after the crash").await;
    let next = ws.take(1).await;
    assert_same_events("after the crash", &next, &producer.expected[100..]);
    assert!(id_order(&next[0].id) > id_order(&last));
    server.kill();
}

#[tokio::test]
async fn bad_requests_and_cursors_get_clear_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_secs(2)).await;
    let code = |res: reqwest::Response| async move {
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        (status, body["error"]["code"].as_str().unwrap().to_string())
    };
    let bad = |status: u16, c: &str| (status, c.to_string());

    let res = server.post("r", "/chunks", vec![0xff, 0xfe]).await;
    assert_eq!(code(res).await, bad(400, "bad_chunk"));
    let res = server.post("r", "/artifacts", "x").await;
    assert_eq!(code(res).await, bad(400, "bad_query"));
    let res = server.post("r", "/artifacts?name=a/b", "x").await;
    assert_eq!(code(res).await, bad(400, "bad_query"));
    let res = server.post("r", "/finish", "not json").await;
    assert_eq!(code(res).await, bad(400, "bad_state"));
    let res = server.post("r", "/nope", "").await;
    assert_eq!(code(res).await, bad(404, "not_found"));
    let res = server
        .client
        .get(server.url("/v1/objects/runs/r/ws"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(res).await, bad(426, "websocket_upgrade_required"));
    let res = server
        .client
        .delete(server.url("/v1/objects/runs/r/state"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(res).await, bad(405, "method_not_allowed"));
    let status = server.get_json("/v1/objects/runs/r/state", 200).await;
    assert_eq!(status["status"], "running");
    assert_eq!(status["chunks"], 0);
    assert_eq!(status["last_id"], Value::Null);

    let mut producer = Producer::new("r");
    producer.chunk(&server, "one").await;
    producer.chunk(&server, "two").await;

    // A malformed cursor is refused, never silently replaced by a fresh start.
    let mut ws = WsClient::connect(&server, "/v1/objects/runs/r/ws?last_event_id=nope").await;
    let value = ws.next().await.expect("an error message");
    assert_eq!(value["code"], "bad_event_id", "{value}");
    ws.expect_close(4400).await;

    // An id from elsewhere gets a gap notice, then the whole run.
    let mut ws = WsClient::connect_with(
        &server,
        "/v1/objects/runs/r/ws",
        &[("Last-Event-ID", "1-5")],
    )
    .await;
    let value = ws.next().await.expect("a gap notice");
    assert_eq!(value["type"], "gap", "{value}");
    assert_eq!(value["reason"], "epoch_changed");
    assert_eq!(value["requested_id"], "1-5");
    let seen = ws.take(2).await;
    assert_same_events("after the gap", &seen, &producer.expected);

    // The header wins over the query, and a viewer at the head gets only new events.
    let head = seen[1].id.clone();
    let mut ws = WsClient::connect_with(
        &server,
        "/v1/objects/runs/r/ws?last_event_id=1-1",
        &[("Last-Event-ID", &head)],
    )
    .await;
    producer.chunk(&server, "three").await;
    let live = ws.take(1).await;
    assert_same_events("live", &live, &producer.expected[2..]);
    server.stop().await;
}

/// The viewer's page in headless Chromium: what was produced before it opened (from the
/// channel's history) and what comes after (live, through the JavaScript client), once
/// each, then the artifact and the final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_viewers_page_shows_the_run_from_its_start_in_a_browser() {
    use dormouse_testkit::browser::Browser;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_millis(500)).await;
    let mut producer = Producer::new("page-run");
    producer.chunk(&server, "Hello").await;
    producer.chunk(&server, ", ").await;
    let browser = Browser::launch().await;
    let mut page = browser.open(&server.url("/v1/objects/runs/page-run")).await;
    page.until(
        "the stored chunks",
        "document.getElementById('output').textContent",
        |v| v == "Hello, ",
    )
    .await;
    page.until(
        "live",
        "document.getElementById('status').textContent",
        |v| v == "live",
    )
    .await;
    producer.chunk(&server, "world").await;
    producer
        .artifact(&server, "notes.txt", b"some notes".to_vec())
        .await;
    producer.finish(&server, json!({"answer": 42})).await;
    page.until(
        "finished",
        "document.getElementById('status').textContent",
        |v| v == "finished",
    )
    .await;
    let shown = page
        .eval(
            "[document.getElementById('output').textContent,
              document.getElementById('artifacts').innerText,
              JSON.parse(document.getElementById('state').textContent)]",
        )
        .await;
    assert_eq!(
        shown,
        json!(["Hello, world", "notes.txt (10 bytes)", {"answer": 42}])
    );
    browser.close().await;
    server.stop().await;
}
