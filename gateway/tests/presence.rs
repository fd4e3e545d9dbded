//! Presence over the wire: members by subject with their token's info, join and leave events
//! on WebSocket (JSON and binary mode) and SSE (one channel and several), one member for
//! several tabs, members kept while the channel hibernates, the presence query and its
//! errors.

use dormouse_testkit as support;

use std::time::Duration;

use dormouse_gateway::{PrefixSettings, Settings};
use serde_json::{Value, json};
use support::{PATIENCE, SseClient, TestServer, WsClient, error_of};

const SECRET: &str = "test-secret-that-is-long-enough-for-hs256!";

/// A token for `sub` that may subscribe and publish to `room:*` and `plain`, with `info`.
fn token(sub: &str, info: Value) -> String {
    let grants = json!({"subscribe": ["room:*", "plain"], "publish": ["room:*"]});
    let mut claims = json!({"sub": sub, "dormouse": grants});
    if !info.is_null() {
        claims["info"] = info;
    }
    support::jwt(SECRET, 600, claims)
}

/// Presence on channels whose names start `room:`, nothing else changed.
fn room_presence() -> PrefixSettings {
    PrefixSettings {
        prefix: "room:".to_string(),
        max_events: None,
        max_bytes: None,
        max_age: None,
        idempotency_window: None,
        presence: Some(true),
    }
}

/// Presence on `room:` channels only; channels hibernate a moment after their last request.
fn with_presence(s: &mut Settings) {
    s.auth.jwt_secret = SECRET.to_string();
    s.channels.idle_timeout = Duration::from_millis(100);
    s.channels.prefix = vec![room_presence()];
}

/// `GET path` with the token `as_who` (empty: no credential).
async fn get_as(server: &TestServer, path: &str, as_who: &str) -> reqwest::Response {
    let mut request = server.client.get(server.url(path));
    if !as_who.is_empty() {
        request = request.bearer_auth(as_who);
    }
    request.send().await.unwrap()
}

async fn presence(server: &TestServer, channel: &str, as_who: &str) -> Value {
    let res = get_as(server, &format!("/v1/channels/{channel}/presence"), as_who).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn publish(server: &TestServer, channel: &str, as_who: &str, data: &str) -> String {
    let res = server
        .client
        .post(server.url(&format!("/v1/channels/{channel}/messages")))
        .bearer_auth(as_who)
        .body(data.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// Waits until the channel has hibernated (describing an active channel asks it, which
/// counts as a request: so it is asked less often than its idle timeout).
async fn hibernated(server: &TestServer, channel: &str, as_who: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let res = get_as(server, &format!("/v1/channels/{channel}"), as_who).await;
        let info: Value = res.json().await.unwrap();
        if info["state"] == "hibernated" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} never hibernated: {info}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn one_member_per_subject_across_tabs_and_hibernation() {
    let server = TestServer::start_with(with_presence).await;
    let alice = token("alice", json!({"name": "Alice", "avatar": "a.png"}));
    let bob = token("bob", Value::Null);
    let first = publish(&server, "room:1", &bob, "before anyone").await;

    // Bob comes in and hears of himself; a join carries no id.
    let mut bob_ws = WsClient::connect(
        &server,
        &format!("/v1/channels/room:1/ws?access_token={bob}"),
    )
    .await;
    assert_eq!(
        bob_ws.next().await.unwrap(),
        json!({"type": "join", "channel": "room:1", "subject": "bob"})
    );

    // Alice's first tab (a WebSocket) joins, with her token's info; both hear it.
    let mut alice_ws = WsClient::connect(
        &server,
        &format!("/v1/channels/room:1/ws?access_token={alice}"),
    )
    .await;
    let join = json!({"type": "join", "channel": "room:1", "subject": "alice",
                      "info": {"name": "Alice", "avatar": "a.png"}});
    assert_eq!(alice_ws.next().await.unwrap(), join);
    assert_eq!(bob_ws.next().await.unwrap(), join);

    // Her second tab (an event stream resuming from an id) is not a second member: the
    // next thing anyone hears is the next message. Its own stream starts with the backlog,
    // and the presence events it hears move no cursor.
    let mut alice_sse = SseClient::connect(
        &server,
        &format!("/v1/channels/room:1/events?access_token={alice}"),
        Some(&first),
    )
    .await;
    let second = publish(&server, "room:1", &bob, "hello").await;
    alice_sse.expect_event(&second, "message", "hello").await;
    for ws in [&mut bob_ws, &mut alice_ws] {
        ws.expect_event(&second, "message", "hello").await;
    }
    let listed = presence(&server, "room:1", &bob).await;
    assert_eq!(
        listed,
        json!({
            "channel": "room:1",
            "members": [
                {"subject": "alice", "info": {"name": "Alice", "avatar": "a.png"}, "connections": 2},
                {"subject": "bob", "info": null, "connections": 1},
            ],
            "subjects": 2,
            "connections": 3,
            "next_after": null,
        })
    );

    // While the channel sleeps, alice closes her WebSocket tab: she is still here (her
    // other tab), so nobody hears a leave; the next thing is the next message.
    hibernated(&server, "room:1", &bob).await;
    alice_ws.close().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let listed = presence(&server, "room:1", &bob).await;
        if listed["connections"] == 2 {
            assert_eq!(listed["members"][0]["connections"], 1, "{listed}");
            assert_eq!(listed["subjects"], 2, "{listed}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let third = publish(&server, "room:1", &bob, "still here?").await;
    bob_ws.expect_event(&third, "message", "still here?").await;
    alice_sse
        .expect_event(&third, "message", "still here?")
        .await;

    // Asleep again, her last tab goes: bob hears her leave, with her info, woken by it.
    hibernated(&server, "room:1", &bob).await;
    drop(alice_sse);
    assert_eq!(
        bob_ws.next().await.unwrap(),
        json!({"type": "leave", "channel": "room:1", "subject": "alice",
               "info": {"name": "Alice", "avatar": "a.png"}})
    );
    let listed = presence(&server, "room:1", &bob).await;
    assert_eq!(
        listed["members"],
        json!([{"subject": "bob", "info": null, "connections": 1}])
    );
    assert_eq!(
        (&listed["subjects"], &listed["connections"]),
        (&json!(1), &json!(1))
    );
}

#[tokio::test]
async fn presence_on_event_streams_binary_sockets_and_many_channels() {
    let server = TestServer::start_with(with_presence).await;
    let carol = token("carol", json!("Carol"));
    let dave = token("dave", Value::Null);

    // Carol follows two channels with presence and one without on one event stream.
    let mut carol_sse = SseClient::connect(
        &server,
        &format!("/v1/events?channel=room:a&channel=plain&channel=room:b&access_token={carol}"),
        None,
    )
    .await;
    for room in ["room:a", "room:b"] {
        let join = carol_sse.expect_control("join").await;
        assert_eq!(
            join,
            json!({"type": "join", "channel": room, "subject": "carol", "info": "Carol"})
        );
    }
    // Dave, on a binary-mode WebSocket opened for room:a, then subscribing to room:b too:
    // presence events stay JSON text there, as every control message does.
    let mut dave_ws = WsClient::connect(
        &server,
        &format!("/v1/channels/room:a/ws?format=binary&access_token={dave}"),
    )
    .await;
    assert_eq!(
        dave_ws.next().await.unwrap(),
        json!({"type": "join", "channel": "room:a", "subject": "dave"})
    );
    let join_a = carol_sse.expect_control("join").await;
    assert_eq!(
        join_a,
        json!({"type": "join", "channel": "room:a", "subject": "dave"})
    );
    dave_ws
        .send_json(json!({"type": "subscribe", "channel": "room:b", "ref": 1}))
        .await;
    let mut seen = vec![dave_ws.next().await.unwrap(), dave_ws.next().await.unwrap()];
    seen.sort_by_key(|v| v["type"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        seen[0],
        json!({"type": "join", "channel": "room:b", "subject": "dave"})
    );
    assert_eq!(seen[1]["type"], "subscribed", "{seen:?}");
    let join_b = carol_sse.expect_control("join").await;
    assert_eq!(join_b["channel"], "room:b");
    // The stream's cursor is only ever moved by events.
    assert_eq!(carol_sse.last_id, None);
    let id = publish(&server, "room:b", &dave, "hi").await;
    let event = carol_sse.next().await.unwrap();
    assert_eq!(event.event, "message");
    assert!(
        event
            .id
            .as_deref()
            .is_some_and(|cursor| cursor.contains(&id)),
        "{event:?}"
    );

    // Dave leaves room:b by unsubscribing: carol hears it there, and only there.
    dave_ws
        .send_json(json!({"type": "unsubscribe", "channel": "room:b", "ref": 2}))
        .await;
    let leave = carol_sse.expect_control("leave").await;
    assert_eq!(
        leave,
        json!({"type": "leave", "channel": "room:b", "subject": "dave"})
    );
    assert_eq!(presence(&server, "room:b", &dave).await["subjects"], 1);
    assert_eq!(presence(&server, "room:a", &dave).await["subjects"], 2);

    // He closes the socket: he leaves room:a too.
    dave_ws.close().await;
    let leave = carol_sse.expect_control("leave").await;
    assert_eq!(
        leave,
        json!({"type": "leave", "channel": "room:a", "subject": "dave"})
    );
    let listed = presence(&server, "room:a", &carol).await;
    assert_eq!(
        listed["members"],
        json!([{"subject": "carol", "info": "Carol", "connections": 1}])
    );
}

#[tokio::test]
async fn presence_pages_and_errors() {
    let server = TestServer::start_with(with_presence).await;
    let mut tabs = Vec::new();
    for who in ["erin", "bill", "chen", "ann"] {
        let t = token(who, Value::Null);
        tabs.push(
            SseClient::connect(
                &server,
                &format!("/v1/channels/room:p/events?access_token={t}"),
                None,
            )
            .await,
        );
    }
    let reader = token("reader", Value::Null);
    // Every join has happened once the last tab heard its own.
    tabs[3].expect_control("join").await;
    let page = |query: &'static str| {
        let (server, reader) = (&server, &reader);
        async move {
            let res = get_as(
                server,
                &format!("/v1/channels/room:p/presence{query}"),
                reader,
            )
            .await;
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = page("?limit=3").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = first["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["subject"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ann", "bill", "chen"]);
    assert_eq!(
        (&first["next_after"], &first["subjects"]),
        (&json!("chen"), &json!(4))
    );
    let (_, rest) = page("?limit=3&after=chen").await;
    assert_eq!(
        rest["members"],
        json!([{"subject": "erin", "info": null, "connections": 1}])
    );
    assert_eq!(rest["next_after"], Value::Null);

    for (query, code) in [
        ("?limit=0", "bad_limit"),
        ("?limit=1001", "bad_limit"),
        ("?limit=x", "bad_query"),
        ("?color=red", "bad_query"),
    ] {
        let res = get_as(
            &server,
            &format!("/v1/channels/room:p/presence{query}"),
            &reader,
        )
        .await;
        let (status, got, _) = error_of(res).await;
        assert_eq!((status, got.as_str()), (400, code), "{query}");
    }
    // A channel without presence says how to turn it on.
    let res = get_as(&server, "/v1/channels/plain/presence", &reader).await;
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (404, "presence_not_enabled"));
    assert!(message.contains("presence = true"), "{message}");
    // Who is in a channel is for those who may subscribe to it.
    let res = get_as(&server, "/v1/channels/other:1/presence", &reader).await;
    assert_eq!(error_of(res).await.0, 403);
    let res = get_as(&server, "/v1/channels/room:p/presence", "").await;
    assert_eq!(error_of(res).await.0, 401);

    // An info claim too large to travel with every presence event refuses the token.
    let big = token("big", json!({"bio": "x".repeat(2000)}));
    let res = get_as(&server, "/v1/channels/room:p/presence", &big).await;
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (401, "bad_token"));
    assert!(message.contains("info claim"), "{message}");
}

#[tokio::test]
async fn a_connect_hook_names_the_member_and_its_info() {
    use dormouse_gateway::HookSettings;
    use support::upstream::{Answer, Upstream};
    const HOOK_SECRET: &str = "hook-secret-0123456789-0123456789-abc";
    let upstream = Upstream::start(HOOK_SECRET, |call| match call.event.as_str() {
        "connect" if call.body["query"] == "big=1" => Answer::Json(
            200,
            json!({"subject": "big", "info": {"bio": "x".repeat(2000)}}).to_string(),
        ),
        "connect" => Answer::Json(
            200,
            json!({"subject": "moderator-7", "info": {"role": "mod"}, "channels": ["room:h2"]})
                .to_string(),
        ),
        _ => Answer::Json(200, "{}".into()),
    })
    .await;
    let url = upstream.url();
    let server = TestServer::start_with(move |s| {
        s.channels.prefix = vec![room_presence()];
        s.hooks = vec![HookSettings {
            name: "app".into(),
            url,
            secret: HOOK_SECRET.into(),
            channels: vec!["room:h*".into()],
            events: HookSettings::default_events(),
            timeout: Duration::from_secs(2),
        }];
    })
    .await;

    // The hook's own WebSocket, following the channel its answer picked, as its subject.
    let mut own = WsClient::connect(&server, "/v1/hooks/app/ws").await;
    assert_eq!(
        own.next().await.unwrap(),
        json!({"type": "join", "channel": "room:h2", "subject": "moderator-7", "info": {"role": "mod"}})
    );
    // A channel's WebSocket through the hook: the same member, so no second join on
    // room:h2; a join on its own channel.
    let mut ws = WsClient::connect(&server, "/v1/channels/room:h1/ws").await;
    assert_eq!(
        ws.next().await.unwrap(),
        json!({"type": "join", "channel": "room:h1", "subject": "moderator-7", "info": {"role": "mod"}})
    );
    let listed = server.get_json("/v1/channels/room:h2/presence", 200).await;
    assert_eq!(
        listed["members"],
        json!([{"subject": "moderator-7", "info": {"role": "mod"}, "connections": 2}])
    );
    // An info too large to carry is the hook's mistake, said as such.
    let res = get_as(&server, "/v1/channels/room:h1/events?big=1", "").await;
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (502, "hook_failed"));
    assert!(message.contains("\"info\" is"), "{message}");
}

#[tokio::test]
async fn a_member_that_leaves_before_its_subscribe_is_answered_still_leaves() {
    let server = TestServer::start_with(with_presence).await;
    let carol = token("carol", Value::Null);
    let dave = token("dave", Value::Null);
    let mut watcher = SseClient::connect(
        &server,
        &format!("/v1/channels/room:z/events?access_token={carol}"),
        None,
    )
    .await;
    assert_eq!(watcher.expect_control("join").await["subject"], "carol");
    // Each time: a WebSocket opened for another channel asks to follow room:z and is gone
    // at once, before (or while) its subscribe is answered.
    for round in 0..20 {
        let mut ws = WsClient::connect(
            &server,
            &format!("/v1/channels/plain/ws?access_token={dave}"),
        )
        .await;
        ws.send_json(json!({"type": "subscribe", "channel": "room:z", "ref": round}))
            .await;
        drop(ws);
    }
    // Whatever got in went out: every join of dave's is followed by his leave.
    let mut present = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let event = tokio::time::timeout(Duration::from_millis(500), watcher.next()).await;
        match event {
            Ok(Some(event)) => {
                let value: Value = serde_json::from_str(&event.data).unwrap();
                assert_eq!(value["subject"], "dave", "{value}");
                match event.event.as_str() {
                    "dormouse.join" => {
                        assert!(!present, "two joins in a row: {value}");
                        present = true;
                    }
                    "dormouse.leave" => {
                        assert!(present, "a leave without a join: {value}");
                        present = false;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            Ok(None) => panic!("the watcher's stream ended"),
            Err(_) if !present => break,
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "dave joined and never left"
            ),
        }
    }
    let listed = get_as(&server, "/v1/channels/room:z/presence", &carol)
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(listed["subjects"], 1, "{listed}");
}
