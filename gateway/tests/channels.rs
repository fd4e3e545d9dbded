//! Channels end to end: history, info, list, delete and epochs, retention gaps, hibernation
//! with connected subscribers, the compatibility routes, and the largest allowed message.

use dormouse_testkit as support;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt as _;
use serde_json::{Value, json};
use support::{
    PATIENCE, SseClient, SseEvent, TestServer, WsClient, error_of, large_ws_config, raw_request,
};

/// `(id, event, data)` of each event in a history page.
fn triples(page: &Value) -> Vec<(String, String, String)> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_string(),
                e["event"].as_str().expect("event").to_string(),
                e["data"].as_str().expect("text data").to_string(),
            )
        })
        .collect()
}

fn triple(id: &str, event: &str, data: &str) -> (String, String, String) {
    (id.to_string(), event.to_string(), data.to_string())
}

/// Polls the channel's info until its state is `state`. The interval is longer than the
/// test's idle timeout, because asking an active channel is a request that keeps it awake.
async fn wait_for_state(server: &TestServer, channel: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let info = server
            .get_json(&format!("/v1/channels/{channel}"), 200)
            .await;
        if info["state"] == state {
            return info;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "channel {channel} never became {state}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn history_pages_through_the_exact_events() {
    let server = TestServer::start().await;
    let mut ids = Vec::new();
    ids.push(server.publish("hist", "one").await);
    ids.push(server.publish_event("hist", "tick", "two\nlines").await);
    let res = server
        .client
        .post(server.url("/v1/channels/hist/messages"))
        .header("X-Dormouse-Event", "tock")
        .body("three")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    ids.push(
        res.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    ids.push(server.publish("hist", vec![0xffu8, 0x00]).await);
    ids.push(server.publish("hist", "five").await);

    let page = server.history("hist", "").await;
    assert_eq!(page["channel"], "hist");
    assert_eq!(page["gap"], Value::Null);
    assert_eq!(page["next_after"], ids[4].as_str());
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 5);
    for e in events {
        assert!(
            e["timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000,
            "{e}"
        );
    }
    let without_time: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("timestamp_ms");
            e
        })
        .collect();
    assert_eq!(
        without_time,
        vec![
            json!({"id": ids[0], "event": "message", "data": "one"}),
            json!({"id": ids[1], "event": "tick", "data": "two\nlines"}),
            json!({"id": ids[2], "event": "tock", "data": "three"}),
            json!({"id": ids[3], "event": "message", "data_base64": "/wA="}),
            json!({"id": ids[4], "event": "message", "data": "five"}),
        ]
    );

    // Pages of two, following next_after.
    let page = server.history("hist", "?limit=2").await;
    assert_eq!(
        triples(&page),
        vec![
            triple(&ids[0], "message", "one"),
            triple(&ids[1], "tick", "two\nlines")
        ]
    );
    assert_eq!(page["next_after"], ids[1].as_str());
    let page = server
        .history("hist", &format!("?after={}&limit=2", ids[1]))
        .await;
    assert_eq!(page["events"][0]["id"], ids[2].as_str());
    assert_eq!(page["events"][1]["id"], ids[3].as_str());
    assert_eq!(page["next_after"], ids[3].as_str());
    let page = server
        .history("hist", &format!("?after={}&limit=2", ids[3]))
        .await;
    assert_eq!(triples(&page), vec![triple(&ids[4], "message", "five")]);
    assert_eq!(page["next_after"], ids[4].as_str());
    let page = server
        .history("hist", &format!("?after={}&limit=2", ids[4]))
        .await;
    assert_eq!(
        page,
        json!({"channel": "hist", "direction": "forward", "events": [], "gap": null, "next_after": null})
    );
    server.stop().await;
}

/// The ids of a history page's events, in the page's order.
fn ids_of(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// The backward and time-range pages of `history_pages_back...`'s channel.
async fn check_pages(server: &TestServer, ids: &[String], times: &[u64]) {
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    // "The last 5": newest first, then page back with next_before.
    let page = server.history("talk", "?direction=backward&limit=5").await;
    assert_eq!(page["direction"], "backward");
    assert_eq!(ids_of(&page), newest_first[..5]);
    assert_eq!(page["next_before"], ids[7].as_str());
    let page = server
        .history("talk", &format!("?before={}&limit=5", ids[7]))
        .await;
    assert_eq!(ids_of(&page), newest_first[5..10]);
    let page = server
        .history("talk", &format!("?before={}&limit=5", ids[2]))
        .await;
    assert_eq!(ids_of(&page), newest_first[10..]);
    assert_eq!(page["next_before"], Value::Null, "nothing older");

    // The middle burst by time, either way; RFC 3339 bounds are accepted too.
    let (since, until) = (times[4], times[8]);
    let page = server
        .history("talk", &format!("?since={since}&until={until}"))
        .await;
    assert_eq!(ids_of(&page), ids[4..8]);
    let page = server
        .history(
            "talk",
            &format!("?direction=backward&since={since}&until={until}&limit=3"),
        )
        .await;
    assert_eq!(ids_of(&page), newest_first[4..7]);
    let page = server
        .history(
            "talk",
            &format!("?before={}&since={since}&until={until}&limit=3", ids[5]),
        )
        .await;
    assert_eq!(ids_of(&page), [ids[4].clone()]);
    assert_eq!(page["next_before"], Value::Null);
    let rfc =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(times[8]));
    let page = server.history("talk", &format!("?since={rfc}")).await;
    assert_eq!(ids_of(&page), ids[8..]);
    // A cursor before the range: the page starts where the range does.
    let page = server
        .history("talk", &format!("?after={}&since={since}&limit=2", ids[1]))
        .await;
    assert_eq!(ids_of(&page), ids[4..6]);
}

#[tokio::test]
async fn history_pages_back_from_the_newest_and_within_a_time_range() {
    let server = TestServer::start_with(|s| {
        // A small memory tail: the older pages come from the log.
        s.channels.memory_tail = dormouse_gateway::ByteSize(64);
    })
    .await;
    // Three bursts, far enough apart in time to tell apart.
    let mut ids = Vec::new();
    for burst in 0..3 {
        for n in 0..4 {
            ids.push(server.publish("talk", format!("{burst}.{n}")).await);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let all = server.history("talk", "?limit=100").await;
    let times: Vec<u64> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["timestamp_ms"].as_u64().unwrap())
        .collect();
    check_pages(&server, &ids, &times).await;
    // The same from a cold start, where every page comes from storage.
    let server = server.restart().await;
    check_pages(&server, &ids, &times).await;

    // Said precisely when wrong.
    for (query, code) in [
        ("?direction=sideways", "bad_direction"),
        ("?after=1-1&before=1-2", "bad_range"),
        ("?direction=forward&before=1-2", "bad_range"),
        ("?since=yesterday", "bad_time"),
        ("?since=20&until=10", "bad_range"),
        ("?before=nonsense", "bad_event_id"),
    ] {
        let res = server
            .client
            .get(server.url(&format!("/v1/channels/talk/messages{query}")))
            .send()
            .await
            .unwrap();
        let (status, got, message) = error_of(res).await;
        assert_eq!((status, got.as_str()), (400, code), "{query}: {message}");
    }
    server.stop().await;
}

#[tokio::test]
async fn rewind_starts_a_subscription_with_the_last_n_events_unless_a_cursor_is_given() {
    let server = TestServer::start().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(server.publish("replay", format!("m{n}")).await);
    }
    let mut ws = WsClient::connect(&server, "/v1/channels/replay/ws?rewind=2").await;
    ws.expect_event(&ids[3], "message", "m3").await;
    ws.expect_event(&ids[4], "message", "m4").await;
    let mut sse = SseClient::connect(&server, "/v1/channels/replay/events?rewind=3", None).await;
    for (n, id) in ids.iter().enumerate().skip(2) {
        sse.expect_event(id, "message", &format!("m{n}")).await;
    }
    // More than the channel holds: everything it holds.
    let mut all = SseClient::connect(&server, "/sub?channel=replay&rewind=50", None).await;
    for (n, id) in ids.iter().enumerate() {
        all.expect_event(id, "message", &format!("m{n}")).await;
    }
    // A reconnect resumes exactly: the cursor wins over rewind.
    let mut resumed = SseClient::connect(
        &server,
        "/v1/channels/replay/events?rewind=1",
        Some(ids[1].as_str()),
    )
    .await;
    for (n, id) in ids.iter().enumerate().skip(2) {
        resumed.expect_event(id, "message", &format!("m{n}")).await;
    }
    // Then live, for all of them.
    let live = server.publish("replay", "live").await;
    ws.expect_event(&live, "message", "live").await;
    sse.expect_event(&live, "message", "live").await;
    resumed.expect_event(&live, "message", "live").await;

    for rewind in ["0", "-1", "1001", "many"] {
        let res = server
            .client
            .get(server.url(&format!("/v1/channels/replay/events?rewind={rewind}")))
            .send()
            .await
            .unwrap();
        let (status, code, _) = error_of(res).await;
        assert_eq!((status, code.as_str()), (400, "bad_rewind"), "{rewind}");
    }
    server.stop().await;
}

#[tokio::test]
async fn info_describes_an_active_channel_and_list_pages_channels() {
    let server = TestServer::start().await;
    let sse = SseClient::connect(&server, "/v1/channels/list-b/events", None).await;
    let ws = WsClient::connect(&server, "/v1/channels/list-b/ws").await;
    let first = server.publish("list-b", "one").await;
    server.publish_event("list-b", "tick", "two").await;
    let last = server.publish("list-b", "three").await;
    let info = server.get_json("/v1/channels/list-b", 200).await;
    let bytes = info["bytes"].as_u64().expect("bytes");
    // Payload bytes, plus at most a small per-event record overhead.
    assert!((11..=11 + 3 * 80).contains(&bytes), "{info}");
    assert_eq!(
        info,
        json!({
            "channel": "list-b", "state": "active", "last_id": last, "earliest_id": first,
            "events": 3, "bytes": bytes, "subscribers": 2,
        })
    );

    let a = server.publish("list-a", "a").await;
    let c = server.publish("list-c", "c").await;
    let zz = server.publish("zz", "z").await;
    let entry = |name: &str, last: &str, events: u64| json!({"channel": name, "state": "active", "last_id": last, "events": events});
    // Ordered by name length, then name.
    let list = server.get_json("/v1/channels", 200).await;
    assert_eq!(
        list,
        json!({
            "channels": [entry("zz", &zz, 1), entry("list-a", &a, 1), entry("list-b", &last, 3), entry("list-c", &c, 1)],
            "next_after": null, "active": 4, "hibernated": 0,
        })
    );
    let page = server.get_json("/v1/channels?limit=2", 200).await;
    assert_eq!(
        page["channels"],
        json!([entry("zz", &zz, 1), entry("list-a", &a, 1)])
    );
    assert_eq!(page["next_after"], "list-a");
    let page = server
        .get_json("/v1/channels?after=list-a&limit=2", 200)
        .await;
    assert_eq!(
        page["channels"],
        json!([entry("list-b", &last, 3), entry("list-c", &c, 1)])
    );
    assert_eq!(page["next_after"], "list-c");
    let page = server
        .get_json("/v1/channels?after=list-c&limit=2", 200)
        .await;
    assert_eq!(
        (&page["channels"], &page["next_after"]),
        (&json!([]), &json!(null))
    );
    drop((sse, ws));
    server.stop().await;
}

#[tokio::test]
async fn after_a_delete_old_cursors_get_an_epoch_changed_gap_then_the_new_events() {
    let server = TestServer::start().await;
    let mut live = SseClient::connect(&server, "/v1/channels/del/events", None).await;
    let old1 = server.publish("del", "old-1").await;
    let old2 = server.publish("del", "old-2").await;
    live.expect_event(&old1, "message", "old-1").await;
    live.expect_event(&old2, "message", "old-2").await;

    let res = server
        .client
        .delete(server.url("/v1/channels/del"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"channel": "del", "deleted": true})
    );
    // A connected subscriber is told, and stays connected.
    assert_eq!(
        live.expect_control("gap").await,
        json!({"type": "gap", "reason": "deleted", "channel": "del", "message": "the channel was deleted; its history is gone"})
    );
    let info = server.get_json("/v1/channels/del", 200).await;
    assert_eq!(
        (&info["events"], &info["last_id"], &info["earliest_id"]),
        (&json!(0), &Value::Null, &Value::Null),
        "{info}"
    );

    let new1 = server.publish("del", "new-1").await;
    let new2 = server.publish("del", "new-2").await;
    // The new incarnation has a new epoch: its first id is not the old first id.
    assert_ne!(new1, old1);
    assert_ne!(new2, old2);
    live.expect_event(&new1, "message", "new-1").await;
    live.expect_event(&new2, "message", "new-2").await;

    let gap = json!({
        "type": "gap", "reason": "epoch_changed", "channel": "del",
        "message": "the id is from an earlier incarnation of this channel; replaying everything retained",
        "earliest_id": new1, "requested_id": old2,
    });
    let mut sse = SseClient::connect(&server, "/v1/channels/del/events", Some(&old2)).await;
    assert_eq!(sse.expect_control("gap").await, gap);
    // The gap does not move the cursor; the stream's first event set it to where the
    // stream starts, just before the new incarnation's first event.
    let (new_epoch, _) = new1.rsplit_once('-').unwrap();
    assert_eq!(sse.last_id, Some(format!("{new_epoch}-0")));
    sse.expect_event(&new1, "message", "new-1").await;
    sse.expect_event(&new2, "message", "new-2").await;

    let mut ws = WsClient::connect(
        &server,
        &format!("/v1/channels/del/ws?last_event_id={old1}"),
    )
    .await;
    let mut ws_gap = gap.clone();
    ws_gap["requested_id"] = json!(old1);
    assert_eq!(ws.next().await, Some(ws_gap));
    ws.expect_event(&new1, "message", "new-1").await;
    ws.expect_event(&new2, "message", "new-2").await;

    let page = server.history("del", &format!("?after={old2}")).await;
    assert_eq!(page["gap"], gap);
    assert_eq!(
        triples(&page),
        vec![
            triple(&new1, "message", "new-1"),
            triple(&new2, "message", "new-2")
        ]
    );

    // Everyone sees the next live event once.
    let new3 = server.publish("del", "new-3").await;
    live.expect_event(&new3, "message", "new-3").await;
    sse.expect_event(&new3, "message", "new-3").await;
    ws.expect_event(&new3, "message", "new-3").await;
    drop((live, sse, ws));
    server.stop().await;
}

#[tokio::test]
async fn a_cursor_older_than_the_buffer_gets_a_trimmed_gap_then_the_retained_events() {
    let server = TestServer::start_with(|s| s.channels.max_events = 5).await;
    let mut ids = Vec::new();
    for i in 1..=20 {
        ids.push(server.publish("trim", format!("e{i}")).await);
    }
    let gap = json!({
        "type": "gap", "reason": "trimmed", "channel": "trim",
        "message": "events after the id were dropped from the replay buffer; replaying from the oldest retained",
        "earliest_id": ids[15], "requested_id": ids[1],
    });

    let mut sse = SseClient::connect(&server, "/v1/channels/trim/events", Some(&ids[1])).await;
    assert_eq!(sse.expect_control("gap").await, gap);
    for i in 16..=20 {
        sse.expect_event(&ids[i - 1], "message", &format!("e{i}"))
            .await;
    }
    let mut ws = WsClient::connect(
        &server,
        &format!("/v1/channels/trim/ws?last_event_id={}", ids[1]),
    )
    .await;
    assert_eq!(ws.next().await, Some(gap.clone()));
    for i in 16..=20 {
        ws.expect_event(&ids[i - 1], "message", &format!("e{i}"))
            .await;
    }
    let page = server.history("trim", &format!("?after={}", ids[1])).await;
    assert_eq!(page["gap"], gap);
    assert_eq!(
        triples(&page),
        (16..=20)
            .map(|i| triple(&ids[i - 1], "message", &format!("e{i}")))
            .collect::<Vec<_>>()
    );
    // A cursor still inside the buffer resumes without a gap.
    let mut inside = SseClient::connect(&server, "/v1/channels/trim/events", Some(&ids[17])).await;
    inside.expect_event(&ids[18], "message", "e19").await;
    inside.expect_event(&ids[19], "message", "e20").await;

    let info = server.get_json("/v1/channels/trim", 200).await;
    assert_eq!(
        (&info["events"], &info["earliest_id"], &info["last_id"]),
        (&json!(5), &json!(ids[15]), &json!(ids[19]))
    );
    let next = server.publish("trim", "e21").await;
    sse.expect_event(&next, "message", "e21").await;
    ws.expect_event(&next, "message", "e21").await;
    inside.expect_event(&next, "message", "e21").await;
    drop((sse, ws, inside));
    server.stop().await;
}

#[tokio::test]
async fn a_hibernated_channel_keeps_its_subscribers_and_wakes_on_publish() {
    let server =
        TestServer::start_with(|s| s.channels.idle_timeout = Duration::from_millis(50)).await;
    let first = server.publish("sleepy", "first").await;
    let mut sse = Vec::new();
    for _ in 0..3 {
        sse.push(SseClient::connect(&server, "/v1/channels/sleepy/events", None).await);
    }
    let mut ws = Vec::new();
    for _ in 0..2 {
        ws.push(WsClient::connect(&server, "/v1/channels/sleepy/ws").await);
    }

    let mut last = first.clone();
    for round in 0..2 {
        let info = wait_for_state(&server, "sleepy", "hibernated").await;
        let bytes = info["bytes"].clone();
        let events = 1 + round;
        assert_eq!(
            info,
            json!({
                "channel": "sleepy", "state": "hibernated", "last_id": last,
                "earliest_id": first, "events": events, "bytes": bytes, "subscribers": 5,
            })
        );
        let list = server.get_json("/v1/channels", 200).await;
        assert_eq!(list["channels"][0]["state"], "hibernated", "{list}");
        assert_eq!(
            (&list["active"], &list["hibernated"]),
            (&json!(0), &json!(1))
        );

        let data = format!("wake-{round}");
        let id = server.publish("sleepy", data.clone()).await;
        last = id.clone();
        for client in &mut sse {
            client.expect_event(&id, "message", &data).await;
        }
        for client in &mut ws {
            client.expect_event(&id, "message", &data).await;
        }
    }
    drop((sse, ws));
    server.stop().await;
}

#[tokio::test]
async fn the_compatibility_routes_behave_like_the_v1_ones() {
    let server = TestServer::start().await;
    let mut compat = SseClient::connect(&server, "/sub?channel=legacy", None).await;
    let mut v1 = SseClient::connect(&server, "/v1/channels/legacy/events", None).await;

    let publish = |event: Option<&'static str>, key: Option<&'static str>, data: &'static str| {
        let mut req = server
            .client
            .post(server.url("/channel/legacy/messages"))
            .body(data);
        if let Some(event) = event {
            req = req.header("X-Dormouse-Event", event);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        req.send()
    };
    let res = publish(None, None, "one").await.unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let one = body["id"].as_str().unwrap().to_string();
    assert_eq!(
        body,
        json!({"id": one, "channel": "legacy", "duplicate": false})
    );
    let res = publish(Some("chat"), Some("k1"), "two\nlines")
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let two = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = publish(Some("chat"), Some("k1"), "two\nlines")
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"id": two, "channel": "legacy", "duplicate": true})
    );
    let v1_id = server.publish("legacy", "three").await;

    for client in [&mut compat, &mut v1] {
        client.expect_event(&one, "message", "one").await;
        client.expect_event(&two, "chat", "two\nlines").await;
        client.expect_event(&v1_id, "message", "three").await;
        assert_eq!(client.retry, Some(2000));
    }

    // Resuming through /sub, by query and by header.
    let mut by_query = SseClient::connect(
        &server,
        &format!("/sub?channel=legacy&last_event_id={one}"),
        None,
    )
    .await;
    by_query.expect_event(&two, "chat", "two\nlines").await;
    by_query.expect_event(&v1_id, "message", "three").await;
    let mut by_header = SseClient::connect(&server, "/sub?channel=legacy", Some(&two)).await;
    by_header.expect_event(&v1_id, "message", "three").await;

    let page = server.history("legacy", "").await;
    assert_eq!(
        triples(&page),
        vec![
            triple(&one, "message", "one"),
            triple(&two, "chat", "two\nlines"),
            triple(&v1_id, "message", "three"),
        ]
    );
    drop((compat, v1, by_query, by_header));
    server.stop().await;
}

/// A deterministic xorshift generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Exactly `len` bytes of pseudo-random UTF-8 text: multi-byte characters, blank lines,
/// lines that look like SSE fields, quotes and backslashes; never a carriage return.
fn text_payload(len: usize, seed: u64) -> String {
    const PIECES: [&str; 16] = [
        "lorem ",
        "ipsum",
        "\n",
        "\n\n",
        "é",
        "日本語",
        "🦀",
        ": ",
        "data: x",
        "id: 1",
        "\"q\"",
        "\\",
        "{\"k\":[1,2]}",
        "\t",
        " ",
        "0123456789",
    ];
    let mut rng = Rng(seed);
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let piece = PIECES[(rng.next() % PIECES.len() as u64) as usize];
        if out.len() + piece.len() <= len {
            out.push_str(piece);
        } else {
            out.push('x');
        }
    }
    assert_eq!(out.len(), len);
    out
}

fn binary_payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_message_arrives_intact_over_sse_and_websocket() {
    const MAX: usize = 16 * 1024 * 1024;
    let server = TestServer::start().await;
    let before = server.publish("big", "small").await;
    let mut sse = SseClient::connect(&server, "/v1/channels/big/events", None).await;
    let mut ws =
        WsClient::try_connect_with(&server, "/v1/channels/big/ws", &[], Some(large_ws_config()))
            .await
            .expect("ws connect");

    let text = text_payload(MAX, 0x9e37_79b9_7f4a_7c15);
    assert!(text.contains("\n\n") && text.contains('🦀'));
    let text_id = server.publish("big", text.clone()).await;
    let got = sse.next().await.expect("text over SSE");
    assert_eq!(got.id.as_deref(), Some(text_id.as_str()));
    assert_eq!(got.event, "message");
    assert!(
        got.data == text,
        "SSE text differs (len {} vs {})",
        got.data.len(),
        text.len()
    );
    let got = ws.next().await.expect("text over WebSocket");
    assert_eq!(
        (&got["type"], &got["id"]),
        (&json!("message"), &json!(text_id))
    );
    assert!(got.get("data_base64").is_none());
    assert!(
        got["data"].as_str() == Some(text.as_str()),
        "WebSocket text differs"
    );
    // A client resuming from just before it gets it too (replayed, not live).
    let mut resumed = SseClient::connect(&server, "/v1/channels/big/events", Some(&before)).await;
    let got = resumed.next().await.expect("replayed text");
    assert_eq!(got.id.as_deref(), Some(text_id.as_str()));
    assert!(got.data == text, "replayed SSE text differs");
    drop(resumed);

    let binary = binary_payload(MAX, 42);
    assert!(std::str::from_utf8(&binary).is_err());
    let binary_id = server.publish("big", binary.clone()).await;
    let got = sse.next().await.expect("binary over SSE");
    assert_eq!(got.id.as_deref(), Some(binary_id.as_str()));
    assert_eq!(got.event, "base64:message");
    assert!(
        BASE64.decode(&got.data).expect("base64") == binary,
        "SSE bytes differ"
    );
    let got = ws.next().await.expect("binary over WebSocket");
    assert_eq!(
        (&got["type"], &got["id"]),
        (&json!("message"), &json!(binary_id))
    );
    let decoded = BASE64
        .decode(got["data_base64"].as_str().expect("data_base64"))
        .expect("base64");
    assert!(decoded == binary, "WebSocket bytes differ");

    // The text, now read back from storage rather than the in-memory tail.
    let page = server
        .history("big", &format!("?after={before}&limit=1"))
        .await;
    assert_eq!(page["events"][0]["id"], text_id.as_str());
    assert!(
        page["events"][0]["data"].as_str() == Some(text.as_str()),
        "stored text differs"
    );

    // One byte more is refused, and nothing is stored: announced by Content-Length (the
    // server decides from the header alone) ...
    let (status, body) = raw_request(
        server.addr,
        &format!(
            "POST /v1/channels/big/messages HTTP/1.1\r\nContent-Length: {}",
            MAX + 1
        ),
    )
    .await;
    let too_large = json!({"error": {
        "code": "payload_too_large",
        "message": format!("the message is larger than the limit of {MAX} bytes"),
    }});
    assert_eq!(status, 413);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("JSON"),
        too_large
    );
    // ... or streamed without a length: refused once the extra byte arrives. The stream then
    // stays open, so the answer cannot be lost to a reset of unread request bytes.
    let mut chunks: Vec<Result<Vec<u8>, std::convert::Infallible>> =
        binary.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    chunks.push(Ok(vec![0]));
    let body = futures::stream::iter(chunks).chain(futures::stream::pending());
    let res = server
        .client
        .post(server.url("/v1/channels/big/messages"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("an answer before the body ends");
    assert_eq!(
        error_of(res).await,
        (
            413,
            "payload_too_large".to_string(),
            format!("the message is larger than the limit of {MAX} bytes")
        )
    );
    let info = server.get_json("/v1/channels/big", 200).await;
    assert_eq!(
        (&info["events"], &info["last_id"]),
        (&json!(3), &json!(binary_id))
    );
    let after = server.publish("big", "after").await;
    assert_eq!(
        sse.next().await,
        Some(SseEvent {
            id: Some(after.clone()),
            event: "message".into(),
            data: "after".into()
        })
    );
    ws.expect_event(&after, "message", "after").await;
    drop((sse, ws));
    server.stop().await;
}

/// The sequence number of an event id (`{epoch:x}-{seq}`).
fn seq_of(id: &str) -> u64 {
    id.rsplit_once('-')
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or_else(|| panic!("not an event id: {id}"))
}

/// Publishes that meet on one channel are merged into shared commits (gateway/src/publisher.rs);
/// none of that may show: each publisher gets its own id, in the order it published, the log
/// holds every message once in an order that agrees with every publisher's, subscribers see
/// that same order, and an idempotency key sent twice at once is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_to_one_channel_each_get_their_own_ordered_ids() {
    const HTTP_PUBLISHERS: usize = 12;
    const PER_PUBLISHER: usize = 40;
    const WS_PIPELINED: usize = 60;
    let server = TestServer::start().await;
    let mut watcher = WsClient::connect(&server, "/v1/channels/busy/ws").await;
    let mut ws_publisher = WsClient::connect(&server, "/v1/channels/busy/ws").await;

    // HTTP publishers, each waiting for its ack before the next; a WebSocket publisher
    // that sends all of its messages without waiting; and the same idempotency key twice.
    let http = (0..HTTP_PUBLISHERS).map(|p| {
        let client = server.client.clone();
        let url = server.url("/v1/channels/busy/messages");
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..PER_PUBLISHER {
                let res = client
                    .post(&url)
                    .body(format!("http-{p}-{i}"))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(res.status(), 201);
                let body: Value = res.json().await.expect("json");
                ids.push(body["id"].as_str().expect("id").to_string());
            }
            ids
        })
    });
    let keyed = (0..2).map(|_| {
        let client = server.client.clone();
        let url = server.url("/v1/channels/busy/messages");
        tokio::spawn(async move {
            let res = client
                .post(&url)
                .header("Idempotency-Key", "once")
                .body("keyed")
                .send()
                .await
                .expect("publish");
            let status = res.status().as_u16();
            let body: Value = res.json().await.expect("json");
            (status, body["id"].as_str().expect("id").to_string())
        })
    });
    let http: Vec<_> = http.collect();
    let keyed: Vec<_> = keyed.collect();
    for i in 0..WS_PIPELINED {
        ws_publisher
            .send_json(json!({"type": "publish", "data": format!("ws-{i}"), "ref": i}))
            .await;
    }

    let mut ws_acks = vec![None; WS_PIPELINED];
    let mut acked = 0;
    while acked < WS_PIPELINED {
        let frame = ws_publisher.next().await.expect("socket open");
        if frame["type"] == "ack" {
            let r = frame["ref"].as_u64().expect("ref") as usize;
            assert!(ws_acks[r].is_none(), "ref {r} acknowledged twice");
            ws_acks[r] = Some(frame["id"].as_str().expect("id").to_string());
            acked += 1;
        } else {
            assert_eq!(frame["type"], "message", "unexpected frame {frame}");
        }
    }
    let mut publishers: Vec<Vec<String>> = Vec::new();
    for task in http {
        publishers.push(task.await.expect("publisher"));
    }
    publishers.push(ws_acks.into_iter().map(Option::unwrap).collect());
    let mut keyed_answers = Vec::new();
    for task in keyed {
        keyed_answers.push(task.await.expect("keyed publisher"));
    }
    keyed_answers.sort();
    assert_eq!(
        keyed_answers.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [200, 201],
        "one stores, the other is told it is a duplicate"
    );
    assert_eq!(
        keyed_answers[0].1, keyed_answers[1].1,
        "the same id for both"
    );

    // Each publisher's ids rise in the order it published.
    for ids in &publishers {
        assert!(
            ids.windows(2).all(|w| seq_of(&w[0]) < seq_of(&w[1])),
            "ids out of order: {ids:?}"
        );
    }

    // The log: every message once, at the id its publisher was given.
    let total = HTTP_PUBLISHERS * PER_PUBLISHER + WS_PIPELINED + 1;
    // ... in fewer calls to the channel than messages (two more calls subscribed the
    // sockets, and the keyed message was sent twice): publishes were merged.
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let calls: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dormouse_object_requests_total{namespace=\"channel\"} "))
        .expect("channel requests counted")
        .parse()
        .expect("a number");
    assert!(
        (calls as usize) < total,
        "{calls} channel calls for {total} messages: nothing was merged"
    );
    let history = server.all_history("busy").await;
    assert_eq!(history.len(), total);
    let logged: std::collections::HashMap<String, String> = history
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_string(),
                e["data"].as_str().expect("data").to_string(),
            )
        })
        .collect();
    assert_eq!(logged.len(), total, "ids are unique");
    for (p, ids) in publishers.iter().enumerate() {
        for (i, id) in ids.iter().enumerate() {
            let expected = if p < HTTP_PUBLISHERS {
                format!("http-{p}-{i}")
            } else {
                format!("ws-{i}")
            };
            assert_eq!(logged.get(id), Some(&expected), "message at {id}");
        }
    }
    assert_eq!(
        logged.get(&keyed_answers[0].1).map(String::as_str),
        Some("keyed")
    );

    // A subscriber saw the log's order.
    let history_ids: Vec<&str> = history.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut seen = Vec::new();
    while seen.len() < total {
        let frame = watcher.next().await.expect("watcher open");
        if frame["type"] == "message" {
            seen.push(frame["id"].as_str().expect("id").to_string());
        }
    }
    assert_eq!(seen, history_ids);
    server.stop().await;
}

/// `channels.max_active` bounds the channels in memory: a burst across many channels sends
/// the least recently used to sleep before their idle timeout, and one of them keeps its
/// subscriber and its events and wakes on the next publish.
#[tokio::test]
async fn past_max_active_channels_hibernate_early_and_keep_their_subscribers() {
    const MAX: u64 = 5;
    let server = TestServer::start_with(|s| {
        s.channels.idle_timeout = Duration::from_secs(600);
        s.channels.max_active = MAX as usize;
    })
    .await;
    let first = server.publish("burst-0", "first").await;
    let mut sse = SseClient::connect(&server, "/v1/channels/burst-0/events", None).await;
    for c in 1..30 {
        server.publish(&format!("burst-{c}"), "x").await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let list = server.get_json("/v1/channels?limit=100", 200).await;
        let active = list["active"].as_u64().expect("active count");
        if active <= MAX {
            assert!(
                list["hibernated"].as_u64().expect("hibernated") >= 25,
                "{list}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {active} active: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = server.get_json("/v1/channels/burst-0", 200).await;
    assert_eq!(
        (&info["state"], &info["subscribers"], &info["last_id"]),
        (&json!("hibernated"), &json!(1), &json!(first)),
        "{info}"
    );
    let id = server.publish("burst-0", "second").await;
    sse.expect_event(&id, "message", "second").await;
    assert_eq!(server.all_history("burst-0").await.len(), 2);
    drop(sse);
    server.stop().await;
}
