//! Upstream hooks against a real backend: an HTTP server in the test that checks every
//! call's signature, records it and answers as each test says. Real WebSocket and SSE
//! clients connect through it.

use dormouse_testkit as support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormouse_gateway::{HookSettings, Settings};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::upstream::{Answer, Call, Upstream};
use support::{SseClient, TestServer, WsClient, error_of};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "hook-secret-0123456789-0123456789-abc";

/// A backend's usual answers: let `user` in under that subject (from `?user=`), refuse
/// `mallory`, echo messages, acknowledge disconnects.
fn usual(call: &Call) -> Answer {
    match call.event.as_str() {
        "connect" => {
            let query = call.body["query"].as_str().unwrap_or_default();
            let user = query
                .split('&')
                .find_map(|p| p.strip_prefix("user="))
                .unwrap_or("guest");
            if user == "mallory" {
                Answer::Json(
                    200,
                    r#"{"allow": false, "reason": "mallory is banned"}"#.into(),
                )
            } else {
                let answer = json!({"subject": user, "attachment": {"user": user, "n": 7}});
                Answer::Json(200, answer.to_string())
            }
        }
        "message" => match call.body["data"].as_str() {
            Some("boom") => Answer::Json(500, "backend exploded".into()),
            Some("quiet") => Answer::Json(200, String::new()),
            Some(text) => Answer::Json(200, json!({"reply": format!("echo:{text}")}).to_string()),
            None => Answer::Json(
                200,
                json!({"reply_base64": call.body["data_base64"]}).to_string(),
            ),
        },
        _ => Answer::Json(200, "{}".into()),
    }
}

fn hooked(url: String, channels: &[&str], timeout: Duration) -> impl FnOnce(&mut Settings) {
    let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    move |s: &mut Settings| {
        s.hooks = vec![HookSettings {
            name: "app".into(),
            url,
            secret: SECRET.into(),
            channels,
            events: HookSettings::default_events(),
            timeout,
        }];
    }
}

#[tokio::test]
async fn connect_decides_who_comes_in_and_disconnect_follows_every_admitted_connection() {
    let upstream = Upstream::start(SECRET, usual).await;
    let server =
        TestServer::start_with(hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))).await;

    // Admitted, under the subject the hook set.
    let mut alice = WsClient::connect(&server, "/v1/channels/chat:1/ws?user=alice").await;
    let alice_id = alice.connection_id.clone().unwrap();
    let connect = upstream.until("connect", 1).await.remove(0);
    assert_eq!(connect.body["connection_id"], alice_id.as_str());
    assert_eq!(connect.body["channel"], "chat:1");
    assert_eq!(connect.body["transport"], "websocket");
    assert_eq!(connect.body["subject"], "anonymous");
    assert_eq!(connect.idempotency_key, format!("{alice_id}/connect"));
    assert!(
        connect.body["headers"]["host"].is_string(),
        "{}",
        connect.body
    );
    let listed = server.get_json("/v1/subjects/alice/connections", 200).await;
    assert_eq!(listed["total"], 1, "{listed}");
    // An admitted subscriber is a subscriber like any other.
    let id = server.publish("chat:1", "hello").await;
    alice.expect_event(&id, "message", "hello").await;

    // SSE goes through the same hook.
    let mut bob = SseClient::connect(&server, "/v1/channels/chat:1/events?user=bob", None).await;
    let bob_id = bob.connection_id().await;
    let listed = server.get_json("/v1/subjects/bob/connections", 200).await;
    assert_eq!(listed["connections"][0]["connection_id"], bob_id.as_str());

    // Refused: 403 with the hook's reason, before any upgrade or stream; no disconnect owed.
    let refused =
        support::ws_handshake_error(&server, "/v1/channels/chat:1/ws?user=mallory", &[]).await;
    assert_eq!(
        (refused.0, refused.1.as_str(), refused.2.as_str()),
        (403, "hook_refused", "mallory is banned")
    );
    let res = server
        .client
        .get(server.url("/v1/channels/chat:1/events?user=mallory"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!(
        (status, code.as_str(), message.as_str()),
        (403, "hook_refused", "mallory is banned")
    );

    // Channels outside the hook's patterns do not call it.
    let before = upstream.calls("connect").len();
    let _plain = WsClient::connect(&server, "/v1/channels/news/ws").await;
    assert_eq!(upstream.calls("connect").len(), before);

    // A client that leaves: its disconnect, with the subject and attachment from connect.
    alice.close().await;
    let disconnect = upstream.until("disconnect", 1).await.remove(0);
    assert_eq!(disconnect.body["connection_id"], alice_id.as_str());
    assert_eq!(disconnect.body["subject"], "alice");
    assert_eq!(
        disconnect.body["attachment"],
        json!({"user": "alice", "n": 7})
    );
    assert_eq!(disconnect.body["reason"], "client_left");
    assert_eq!(disconnect.idempotency_key, format!("{alice_id}/disconnect"));
    drop(bob);
    let disconnects = upstream.until("disconnect", 2).await;
    assert_eq!(disconnects[1].body["connection_id"], bob_id.as_str());
    // Exactly one each: the refused one owed none.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.calls("disconnect").len(), 2);
}

#[tokio::test]
async fn a_hook_that_fails_refuses_the_connection_with_what_went_wrong() {
    let upstream = Upstream::start(SECRET, usual).await;
    let server = TestServer::start_with(hooked(
        upstream.url(),
        &["chat:*"],
        Duration::from_millis(300),
    ))
    .await;
    let cases: Vec<(Answer, &str)> = vec![
        (
            Answer::Sleep(Duration::from_secs(2)),
            "did not answer within",
        ),
        (
            Answer::Json(500, "database down".into()),
            "answered 500 (the server's log says more)",
        ),
        (
            Answer::Json(200, "{not json".into()),
            "not the documented JSON",
        ),
        (Answer::Json(200, "[1, 2]".into()), "expected a JSON object"),
        (
            Answer::Json(200, r#"{"allow": "yes"}"#.into()),
            "\"allow\" must be true or false",
        ),
        (
            Answer::Json(200, r#"{"allow": true, "role": "admin"}"#.into()),
            "unknown field \"role\"",
        ),
        (
            Answer::Json(200, r#"{"subject": 42}"#.into()),
            "\"subject\" must be a string",
        ),
    ];
    for (answer, expected) in cases {
        let answer = Arc::new(Mutex::new(Some(answer)));
        upstream.answer(move |_| {
            answer
                .lock()
                .unwrap()
                .take()
                .unwrap_or(Answer::Json(200, "{}".into()))
        });
        let res = server
            .client
            .get(server.url("/v1/channels/chat:1/events"))
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_of(res).await;
        assert_eq!((status, code.as_str()), (502, "hook_failed"), "{message}");
        assert!(message.contains(expected), "{expected:?} in {message:?}");
    }
    // Nobody listening at all.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let server = server
        .restart_with(hooked(nowhere, &["chat:*"], Duration::from_millis(300)))
        .await;
    let refused = support::ws_handshake_error(&server, "/v1/channels/chat:1/ws", &[]).await;
    assert_eq!(
        (refused.0, refused.1.as_str()),
        (502, "hook_failed"),
        "{refused:?}"
    );
    assert!(refused.2.contains("could not be reached"), "{refused:?}");
    // The server is unharmed: a channel without the hook still works.
    let _ = server.publish("other", "still fine").await;
}

#[tokio::test]
async fn a_hooks_websocket_sends_every_message_to_the_hook_and_its_replies_back() {
    let upstream = Upstream::start(SECRET, usual).await;
    // With auth on: the hook decides who comes in, no credential needed.
    let server = TestServer::start_with(|s| {
        hooked(upstream.url(), &[], Duration::from_secs(2))(s);
        s.auth.jwt_secret = "a-jwt-secret-that-is-long-enough-for-hs256".into();
    })
    .await;
    let (mut ws, response) =
        tokio_tungstenite::connect_async(server.ws_url("/v1/hooks/app/ws?user=carol"))
            .await
            .expect("the hook lets carol in");
    let id = response.headers()["dormouse-connection-id"]
        .to_str()
        .unwrap()
        .to_string();

    for text in ["one", "two", "quiet", "boom", "three"] {
        ws.send(Message::text(text)).await.unwrap();
    }
    ws.send(Message::binary(vec![0u8, 1, 255])).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => got.push(t.to_string()),
            Message::Binary(b) => got.push(format!("binary:{:?}", b.to_vec())),
            _ => {}
        }
    }
    // In order; nothing for "quiet"; an error frame for the failed call.
    assert_eq!(got[0], "echo:one");
    assert_eq!(got[1], "echo:two");
    let error: Value = serde_json::from_str(&got[2]).unwrap();
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("hook_failed")),
        "{error}"
    );
    assert_eq!(got[3], "echo:three");
    assert_eq!(got[4], "binary:[0, 1, 255]");
    let messages = upstream.until("message", 6).await;
    for (n, call) in messages.iter().enumerate() {
        assert_eq!(call.body["connection_id"], id.as_str());
        assert_eq!(call.body["subject"], "carol");
        assert_eq!(call.body["seq"], n);
        assert_eq!(call.body["attachment"], json!({"user": "carol", "n": 7}));
        assert_eq!(call.idempotency_key, format!("{id}/message/{n}"));
    }
    assert_eq!(messages[5].body["data_base64"], "AAH/");

    // A backend's send reaches it as a plain frame, and the connection is listed under the
    // hook.
    let info = server
        .client
        .get(server.url(&format!("/v1/connections/{id}")))
        .bearer_auth(support_token(&server))
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 200);
    let info: Value = info.json().await.unwrap();
    assert_eq!(
        (info["hook"].as_str(), info["subject"].as_str()),
        (Some("app"), Some("carol"))
    );

    // Refused by the hook; unknown hook names are 404.
    let refused = support::ws_handshake_error(&server, "/v1/hooks/app/ws?user=mallory", &[]).await;
    assert_eq!((refused.0, refused.1.as_str()), (403, "hook_refused"));
    let unknown = support::ws_handshake_error(&server, "/v1/hooks/nope/ws", &[]).await;
    assert_eq!(
        unknown.0, 401,
        "an unknown hook decides nothing: a credential is needed"
    );

    ws.close(None).await.unwrap();
    let disconnect = upstream.until("disconnect", 1).await.remove(0);
    assert_eq!(disconnect.body["connection_id"], id.as_str());
}

/// A token with the connections capability, for the test server's JWT secret.
fn support_token(_server: &TestServer) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "backend", "exp": exp, "dormouse": {"connections": true}}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-jwt-secret-that-is-long-enough-for-hs256"),
    )
    .unwrap()
}

#[tokio::test]
async fn a_disconnect_is_retried_with_the_same_key_until_the_backend_takes_it() {
    let upstream = Upstream::start(SECRET, usual).await;
    let server =
        TestServer::start_with(hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))).await;
    let client = WsClient::connect(&server, "/v1/channels/chat:9/ws?user=dave").await;
    let id = client.connection_id.clone().unwrap();
    // The backend fails the first two tries.
    let failures = Arc::new(Mutex::new(2));
    upstream.answer(move |call| {
        if call.event == "disconnect" {
            let mut left = failures.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Answer::Json(503, "busy".into());
            }
        }
        usual(call)
    });
    client.close().await;
    let tries = upstream.until("disconnect", 3).await;
    for call in &tries {
        assert_eq!(call.idempotency_key, format!("{id}/disconnect"));
        assert_eq!(call.body["connection_id"], id.as_str());
    }
    // Delivered: no fourth try, and a restart owes nothing.
    let server = server.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(upstream.calls("disconnect").len(), 3);
    drop(server);
}

#[tokio::test]
async fn disconnects_owed_when_the_server_stopped_are_sent_by_its_next_start() {
    let upstream = Upstream::start(SECRET, usual).await;
    let server =
        TestServer::start_with(hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))).await;
    // The backend is down for disconnects while the server stops.
    upstream.answer(|call| match call.event.as_str() {
        "disconnect" => Answer::Json(503, "down".into()),
        _ => usual(call),
    });
    let client = WsClient::connect(&server, "/v1/channels/chat:2/ws?user=erin").await;
    let id = client.connection_id.clone().unwrap();
    let server = server.stop().await;
    upstream.answer(usual);
    let dir = server.expect("the data dir");
    let settings_dir = dir.path().to_path_buf();
    let server = TestServer::start_in(
        &settings_dir,
        hooked(upstream.url(), &["chat:*"], Duration::from_secs(2)),
        |_| {},
    )
    .await;
    let delivered = loop {
        let calls = upstream.until("disconnect", 1).await;
        if let Some(ok) = calls.iter().find(|c| c.body["reason"] == "server_restart") {
            break ok.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(delivered.body["connection_id"], id.as_str());
    assert_eq!(delivered.idempotency_key, format!("{id}/disconnect"));
    assert_eq!(delivered.body["subject"], "erin");
    drop((server, dir));
}

#[tokio::test]
async fn a_subject_a_hook_chose_stays_when_the_client_refreshes_its_credential() {
    const JWT: &str = "a-jwt-secret-that-is-long-enough-for-hs256";
    let upstream = Upstream::start(SECRET, usual).await;
    let server = TestServer::start_with(|s| {
        hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))(s);
        s.auth.jwt_secret = JWT.into();
    })
    .await;
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let grants = json!({"subscribe": ["chat:*"], "connections": true});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": sub, "exp": exp, "dormouse": grants}),
            &jsonwebtoken::EncodingKey::from_secret(JWT.as_bytes()),
        )
        .unwrap()
    };
    let path = format!(
        "/v1/channels/chat:1/ws?user=alice&access_token={}",
        token("guest")
    );
    let mut client = WsClient::connect(&server, &path).await;
    client
        .send_json(json!({"type": "auth", "token": token("mallory"), "ref": 1}))
        .await;
    assert_eq!(client.next().await.unwrap()["type"], "auth_ok");
    let count = |subject: &'static str| {
        let (server, token) = (&server, token("backend"));
        async move {
            let res = server
                .client
                .get(server.url(&format!("/v1/subjects/{subject}/connections")))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            res.json::<Value>().await.unwrap()["total"].clone()
        }
    };
    assert_eq!(count("alice").await, 1, "the hook's subject holds");
    assert_eq!(count("mallory").await, 0);
}

/// A backend that screens publishes: refuses "spam", rewrites "upper:..." to upper case
/// under the event `shout`, and takes its time over "slow..." ones.
fn moderator(call: &Call) -> Answer {
    if call.event != "publish" {
        return usual(call);
    }
    let data = call.body["data"].as_str().unwrap_or_default();
    if data == "spam" {
        Answer::Json(200, r#"{"allow": false, "reason": "no spam here"}"#.into())
    } else if let Some(rest) = data.strip_prefix("upper:") {
        let answer = json!({"data": rest.to_uppercase(), "event": "shout"});
        Answer::Json(200, answer.to_string())
    } else if data.starts_with("slow") {
        Answer::Sleep(Duration::from_millis(150))
    } else if data == "bad-rewrite" {
        Answer::Json(200, r#"{"event": "has space"}"#.into())
    } else {
        Answer::Json(200, String::new())
    }
}

#[tokio::test]
async fn a_publish_hook_refuses_or_rewrites_every_way_a_client_publishes_in_order() {
    let upstream = Upstream::start(SECRET, moderator).await;
    let server = TestServer::start_with(|s| {
        hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))(s);
        s.hooks[0].events.push("publish".into());
    })
    .await;
    let c = &server.client;
    let post = |body: &'static str| {
        c.post(server.url("/v1/channels/chat:1/messages"))
            .body(body)
            .send()
    };
    // HTTP: allowed, refused with the backend's reason, rewritten, a bad rewrite.
    assert_eq!(post("hello").await.unwrap().status(), 201);
    let (status, code, message) = error_of(post("spam").await.unwrap()).await;
    assert_eq!(
        (status, code.as_str(), message.as_str()),
        (403, "hook_refused", "no spam here")
    );
    assert_eq!(post("upper:hi").await.unwrap().status(), 201);
    let (status, code, message) = error_of(post("bad-rewrite").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (502, "hook_failed"), "{message}");
    assert!(
        message.contains("not one a client may publish"),
        "{message}"
    );
    let calls = upstream.calls("publish");
    assert_eq!(calls[0].body["channel"], "chat:1");
    assert_eq!(calls[0].body["subject"], "anonymous");
    assert_eq!(calls[0].body["data"], "hello");

    // A batch: each item on its own.
    let batch = c
        .post(server.url("/v1/publish"))
        .json(&json!([
            {"channel": "chat:1", "data": "second"},
            {"channel": "chat:1", "data": "spam"},
            {"channel": "chat:1", "data": "upper:batch"},
            {"channel": "news", "data": "spam"},
        ]))
        .send()
        .await
        .unwrap();
    let batch: Value = batch.json().await.unwrap();
    assert_eq!(batch["published"], 3, "{batch}");
    assert_eq!(
        batch["results"][1]["error"]["code"], "hook_refused",
        "{batch}"
    );
    assert!(
        batch["results"][3]["id"].is_string(),
        "news has no hook: {batch}"
    );

    // A WebSocket client pipelining: the slow calls do not let later messages overtake.
    let mut ws = WsClient::connect(&server, "/v1/channels/chat:1/ws").await;
    let sent = ["slow-1", "w2", "spam", "slow-4", "upper:w5", "w6"];
    for (n, data) in sent.iter().enumerate() {
        ws.send_json(json!({"type": "publish", "data": data, "ref": n}))
            .await;
    }
    let mut answers = Vec::new();
    while answers.len() < sent.len() {
        let frame = ws.next().await.unwrap();
        if frame["type"] == "message" {
            continue;
        }
        answers.push(frame);
    }
    for (n, answer) in answers.iter().enumerate() {
        assert_eq!(answer["ref"], n, "answers in order: {answers:?}");
        let expected = if sent[n] == "spam" { "error" } else { "ack" };
        assert_eq!(answer["type"], expected, "{answer}");
    }
    assert_eq!(answers[2]["code"], "hook_refused");
    let stored: Vec<(String, String)> = server
        .all_history("chat:1")
        .await
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["data"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("message", "hello"),
        ("shout", "HI"),
        ("message", "second"),
        ("shout", "BATCH"),
        ("message", "slow-1"),
        ("message", "w2"),
        ("message", "slow-4"),
        ("shout", "W5"),
        ("message", "w6"),
    ]
    .iter()
    .map(|(e, d)| (e.to_string(), d.to_string()))
    .collect();
    assert_eq!(stored, expected);
}

#[tokio::test]
async fn a_subscribe_hook_decides_each_subscription_after_connect() {
    let upstream = Upstream::start(SECRET, |call| match call.event.as_str() {
        "subscribe" if call.body["channel"] == "chat:secret" => {
            Answer::Json(200, r#"{"allow": false, "reason": "members only"}"#.into())
        }
        "subscribe" => Answer::Json(200, "{}".into()),
        _ => usual(call),
    })
    .await;
    let server = TestServer::start_with(|s| {
        hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))(s);
        s.hooks[0].events.push("subscribe".into());
    })
    .await;
    let _open = SseClient::connect(&server, "/v1/channels/chat:open/events?user=erin", None).await;
    let call = upstream.until("subscribe", 1).await.remove(0);
    assert_eq!(call.body["channel"], "chat:open");
    assert_eq!(call.body["subject"], "erin", "the subject connect chose");
    assert_eq!(call.body["attachment"], json!({"user": "erin", "n": 7}));
    let refused =
        support::ws_handshake_error(&server, "/v1/channels/chat:secret/ws?user=erin", &[]).await;
    assert_eq!(
        (refused.0, refused.1.as_str(), refused.2.as_str()),
        (403, "hook_refused", "members only")
    );
    // Admitted by connect, refused by subscribe: the backend hears it ended.
    let ended = upstream.until("disconnect", 1).await.remove(0);
    assert_eq!(ended.body["reason"], "refused");
    assert_eq!(ended.body["channel"], "chat:secret");
}

#[tokio::test]
async fn past_the_memory_bound_disconnects_wait_in_storage_and_are_all_sent() {
    let upstream = Upstream::start(SECRET, |call| match call.event.as_str() {
        "disconnect" => Answer::Json(503, "down".into()),
        _ => usual(call),
    })
    .await;
    let server = TestServer::start_with(|s| {
        hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))(s);
        s.limits.hook_disconnects_in_memory = 1;
    })
    .await;
    let mut ids = std::collections::BTreeSet::new();
    for n in 0..5 {
        let client =
            WsClient::connect(&server, &format!("/v1/channels/chat:{n}/ws?user=u{n}")).await;
        ids.insert(client.connection_id.clone().unwrap());
        client.close().await;
    }
    // The backend is down: one disconnect is retried from memory, the rest wait on disk.
    upstream.until("disconnect", 2).await;
    assert_eq!(
        server.metric("dormouse_hook_disconnects_pending").await,
        1.0
    );
    upstream.answer(usual);
    let mut delivered = std::collections::BTreeSet::new();
    for _ in 0..600 {
        delivered = upstream
            .calls("disconnect")
            .iter()
            .filter(|c| c.body["reason"] == "client_left")
            .map(|c| c.body["connection_id"].as_str().unwrap().to_string())
            .collect();
        if delivered == ids {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        delivered, ids,
        "every disconnect, with the reason it ended for"
    );
}

fn occupancy(url: String) -> impl FnOnce(&mut Settings) {
    move |s: &mut Settings| {
        s.hooks = vec![HookSettings {
            name: "app".into(),
            url,
            secret: SECRET.into(),
            channels: vec!["room:*".into()],
            events: vec!["occupied".into(), "vacated".into()],
            timeout: Duration::from_secs(2),
        }];
    }
}

/// The occupancy events heard so far, as `(channel, event, seq)` in arrival order.
fn occupancy_events(upstream: &Upstream) -> Vec<(String, String, u64)> {
    let mut calls = upstream.calls("occupied");
    calls.extend(upstream.calls("vacated"));
    calls.sort_by_key(|c| c.body["time_ms"].as_u64());
    calls
        .iter()
        .map(|c| {
            (
                c.body["channel"].as_str().unwrap().to_string(),
                c.event.clone(),
                c.body["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn occupied_and_vacated_follow_a_channels_first_and_last_subscriber_in_order() {
    let upstream = Upstream::start(SECRET, usual).await;
    let server = TestServer::start_with(occupancy(upstream.url())).await;

    // The first subscriber occupies the channel, over either transport.
    let ws = WsClient::connect(&server, "/v1/channels/room:1/ws").await;
    let occupied = upstream.until("occupied", 1).await.remove(0);
    assert_eq!(occupied.body["channel"], "room:1", "{}", occupied.body);
    assert_eq!(occupied.body["hook"], "app");
    assert_eq!(occupied.body["seq"], 1);
    assert!(occupied.body["time_ms"].as_u64().unwrap() > 0);
    assert_eq!(occupied.idempotency_key, "room:1/occupied/1");
    // A second subscriber, the first one leaving, a channel outside the patterns: nothing.
    let sse = SseClient::connect(&server, "/v1/channels/room:1/events", None).await;
    let _other = WsClient::connect(&server, "/v1/channels/lobby/ws").await;
    ws.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        occupancy_events(&upstream),
        [("room:1".into(), "occupied".into(), 1)]
    );
    // The last one leaving vacates it; coming back occupies it again, numbered on.
    drop(sse);
    let vacated = upstream.until("vacated", 1).await.remove(0);
    assert_eq!(vacated.body["seq"], 2, "{}", vacated.body);
    assert_eq!(vacated.idempotency_key, "room:1/vacated/2");

    // A backend that fails: each event is retried with its key, and they arrive in order.
    let failures = Arc::new(Mutex::new(2));
    upstream.answer(move |call| {
        let mut left = failures.lock().unwrap();
        if call.event == "occupied" && *left > 0 {
            *left -= 1;
            return Answer::Json(503, "busy".into());
        }
        usual(call)
    });
    let again = WsClient::connect(&server, "/v1/channels/room:1/ws").await;
    again.close().await;
    upstream.until("vacated", 2).await;
    let tries = upstream.calls("occupied");
    assert_eq!(tries.len(), 4, "one, then three tries of the next");
    for call in &tries[1..] {
        assert_eq!(call.idempotency_key, "room:1/occupied/3");
    }
    let vacated = upstream.calls("vacated");
    assert_eq!(vacated[1].idempotency_key, "room:1/vacated/4");
    assert_eq!(
        occupancy_events(&upstream).last().cloned(),
        Some(("room:1".into(), "vacated".into(), 4)),
        "the vacated waited for the occupied before it"
    );

    // Clients cannot reach the occupancy objects.
    let res = server
        .client
        .post(server.url("/v1/objects/dormouse.occupancy/room:1/change"))
        .body(r#"{"node":"x","occupied":true,"hook":"app"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 404);
}

#[tokio::test]
async fn an_occupancy_event_the_backend_had_not_taken_is_sent_by_the_next_start() {
    let upstream = Upstream::start(SECRET, |call| match call.event.as_str() {
        "vacated" => Answer::Json(503, "down".into()),
        _ => usual(call),
    })
    .await;
    let server = TestServer::start_with(occupancy(upstream.url())).await;
    let client = WsClient::connect(&server, "/v1/channels/room:7/ws").await;
    upstream.until("occupied", 1).await;
    // Stopping closes the client: the channel is vacated, and the backend refuses it.
    drop(client);
    let server = server.stop().await;
    let refused = upstream.until("vacated", 1).await.len();
    upstream.answer(usual);
    let dir = server.expect("the data dir");
    let server = TestServer::start_in(dir.path(), occupancy(upstream.url()), |_| {}).await;
    let delivered = upstream.until("vacated", refused + 1).await.remove(refused);
    assert_eq!(delivered.idempotency_key, "room:7/vacated/2");
    assert_eq!(delivered.body["channel"], "room:7");
    drop((server, dir));
}

#[tokio::test]
async fn a_connect_answer_picks_more_channels_for_a_websocket() {
    let upstream = Upstream::start(SECRET, |call| match call.event.as_str() {
        "connect" => {
            let query = call.body["query"].as_str().unwrap_or_default();
            let channels = match query {
                "pick=other" => json!(["chat:lobby", "other:1"]),
                _ => json!(["chat:lobby", "news", "chat:lobby"]),
            };
            Answer::Json(
                200,
                json!({"subject": "picked", "channels": channels}).to_string(),
            )
        }
        "publish" if call.body["data"] == "forbidden" => Answer::Json(
            200,
            json!({"allow": false, "reason": "screened"}).to_string(),
        ),
        _ => Answer::Json(200, "{}".into()),
    })
    .await;
    let server = TestServer::start_with(|s| {
        hooked(upstream.url(), &["chat:*"], Duration::from_secs(2))(s);
        s.hooks[0].events.push("publish".into());
        s.hooks.push(HookSettings {
            name: "other".into(),
            url: upstream.url(),
            secret: SECRET.into(),
            channels: vec!["other:*".into()],
            events: vec!["connect".into()],
            timeout: Duration::from_secs(2),
        });
    })
    .await;

    // A channel's WebSocket: its own channel, and the ones the hook picked (a channel of
    // no hook too), each event naming its channel.
    let mut ws = WsClient::connect(&server, "/v1/channels/chat:1/ws").await;
    for channel in ["chat:1", "chat:lobby", "news"] {
        let id = server.publish(channel, format!("to {channel}")).await;
        let got = ws.next().await.unwrap();
        assert_eq!(
            (got["channel"].as_str(), got["id"].as_str()),
            (Some(channel), Some(id.as_str())),
            "{got}"
        );
    }
    // A picked channel stays until the connection closes.
    ws.send_json(json!({"type": "unsubscribe", "channel": "chat:lobby", "ref": 1}))
        .await;
    assert_eq!(ws.next().await.unwrap()["code"], "picked_channel");
    // A publish to a picked channel of the hook's goes through its publish hook too.
    ws.send_json(
        json!({"type": "publish", "channel": "chat:lobby", "data": "forbidden", "ref": 2}),
    )
    .await;
    let refused = ws.next().await.unwrap();
    assert_eq!(
        (refused["code"].as_str(), refused["message"].as_str()),
        (Some("hook_refused"), Some("screened"))
    );
    // A client that reconnected catches a picked channel up from its cursor.
    let seen = server.publish("chat:lobby", "seen").await;
    assert_eq!(ws.next().await.unwrap()["id"], seen.as_str());
    let missed = server.publish("chat:lobby", "missed").await;
    ws.send_json(
        json!({"type": "subscribe", "channel": "chat:lobby", "last_event_id": seen, "ref": 3}),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let frame = ws.next().await.unwrap();
        if frame["type"] == "subscribed" {
            got.push("subscribed".to_string());
        } else {
            got.push(frame["id"].as_str().unwrap().to_string());
        }
    }
    assert!(
        got.contains(&missed),
        "the missed event came again: {got:?}"
    );
    assert!(got.contains(&"subscribed".to_string()), "{got:?}");

    // The hook's own WebSocket gets the picked channels' events too.
    let mut own = WsClient::connect(&server, "/v1/hooks/app/ws").await;
    let id = server.publish("news", "for both").await;
    for client in [&mut ws, &mut own] {
        let got = client.next().await.unwrap();
        assert_eq!(
            (got["channel"].as_str(), got["id"].as_str()),
            (Some("news"), Some(id.as_str()))
        );
    }

    // An event stream follows the channels its URL names: the answer cannot add any.
    let res = server
        .client
        .get(server.url("/v1/channels/chat:2/events"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (502, "hook_failed"), "{message}");
    assert!(message.contains("WebSocket connections only"), "{message}");
    // Another hook's channel was not the hook's to give.
    let refused =
        support::ws_handshake_error(&server, "/v1/channels/chat:3/ws?pick=other", &[]).await;
    assert_eq!((refused.0, refused.1.as_str()), (502, "hook_failed"));
    assert!(
        refused.2.contains("goes through hook other"),
        "{}",
        refused.2
    );
    server.stop().await;
}
