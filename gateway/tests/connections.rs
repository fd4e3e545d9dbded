//! Connection ids and the server-side connection API, as a backend meets them: a real
//! server, real WebSocket and SSE clients holding JWTs for their subjects, and a backend
//! calling `/v1/connections/...` and `/v1/subjects/...` with an API key that has the
//! `connections` capability.

use dormouse_testkit as support;

use std::time::Duration;

use dormouse_gateway::{ApiKeySettings, ByteSize, Settings};
use serde_json::{Value, json};
use support::{SseClient, TestServer, WsClient, error_of};

const SECRET: &str = "connections-test-secret-long-enough-for-hs256";
const BACKEND_KEY: &str = "backend-key-0123456789";
const ADMIN_KEY: &str = "admin-key-0123456789ab";

/// A token for `sub` that may subscribe to and publish on every `chat:*` channel.
fn token(sub: &str) -> String {
    let grants = json!({"subscribe": ["chat:*"], "publish": ["chat:*"]});
    support::jwt(SECRET, 3600, json!({"sub": sub, "dormouse": grants}))
}

fn key(name: &str, key: &str, connections: bool, admin: bool) -> ApiKeySettings {
    ApiKeySettings {
        publish: vec!["*".to_string()],
        admin,
        connections,
        ..ApiKeySettings::new(name, key)
    }
}

fn secured(s: &mut Settings) {
    s.limits.max_message_size = ByteSize(64 * 1024);
    s.auth.jwt_secret = SECRET.to_string();
    s.auth.api_keys = vec![
        key("backend", BACKEND_KEY, true, false),
        key("admin", ADMIN_KEY, false, true),
    ];
}

async fn ws(server: &TestServer, sub: &str, channel: &str) -> WsClient {
    let mut client = WsClient::connect(
        server,
        &format!("/v1/channels/{channel}/ws?access_token={}", token(sub)),
    )
    .await;
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut client.ws),
    )
    .await
    .expect("a first frame")
    .expect("the socket is open")
    .expect("a frame");
    let first: Value = serde_json::from_str(first.to_text().expect("text")).expect("JSON");
    assert_eq!(
        first["type"], "connected",
        "the first frame names the connection"
    );
    assert_eq!(
        first["connection_id"].as_str(),
        client.connection_id.as_deref(),
        "the frame and the handshake's header agree"
    );
    client
}

async fn sse(server: &TestServer, sub: &str, channel: &str) -> SseClient {
    let url = server.url(&format!(
        "/v1/channels/{channel}/events?access_token={}",
        token(sub)
    ));
    let mut client = SseClient::connect_to(&server.client, &url, None).await;
    client.connection_id().await;
    client
}

/// A backend's call: `POST path` with `body`, as the backend key; the JSON answer.
async fn post(
    server: &TestServer,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    server
        .client
        .post(server.url(path))
        .bearer_auth(BACKEND_KEY)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn get(server: &TestServer, path: &str) -> reqwest::Response {
    server
        .client
        .get(server.url(path))
        .bearer_auth(BACKEND_KEY)
        .send()
        .await
        .unwrap()
}

async fn ok_json(res: reqwest::Response) -> Value {
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    res.json().await.unwrap()
}

#[tokio::test]
async fn every_connection_gets_an_id_first_and_no_restart_reuses_one() {
    let server = TestServer::start().await;
    let mut a = WsClient::connect(&server, "/v1/channels/news/ws").await;
    let mut b = SseClient::connect(&server, "/v1/channels/news/events", None).await;
    let a_id = a.connection_id.clone().expect("the handshake's header");
    let b_id = b.connection_id().await;
    assert_ne!(a_id, b_id);
    // The id comes before anything the channel sends, and does not move the SSE cursor.
    let published = server.publish("news", "first").await;
    a.expect_event(&published, "message", "first").await;
    b.expect_event(&published, "message", "first").await;
    assert_eq!(b.last_id.as_deref(), Some(published.as_str()));

    // Without auth, everyone has every capability, the connection API included.
    let info = server
        .get_json(&format!("/v1/connections/{a_id}"), 200)
        .await;
    assert_eq!(info["connection_id"], a_id.as_str());
    assert_eq!(info["subject"], "anonymous");
    assert_eq!(info["transport"], "websocket");
    assert_eq!(info["channel"], "news");
    let info = server
        .get_json(&format!("/v1/connections/{b_id}"), 200)
        .await;
    assert_eq!(info["transport"], "sse");

    // A restart hands out ids of a new incarnation: the old ones name nothing.
    drop((a, b));
    let server = server.restart().await;
    let c = WsClient::connect(&server, "/v1/channels/news/ws").await;
    let c_id = c.connection_id.clone().unwrap();
    assert_ne!(c_id, a_id);
    let prefix = |id: &str| id.rsplit_once('.').unwrap().0.to_string();
    assert_ne!(prefix(&c_id), prefix(&a_id), "a new incarnation");
    let res = server
        .client
        .get(server.url(&format!("/v1/connections/{a_id}")))
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "connection_not_found"),
        "{message}"
    );
}

#[tokio::test]
async fn a_backend_sends_to_one_connection_and_closes_it() {
    let server = TestServer::start_with(secured).await;
    let mut alice = ws(&server, "alice", "chat:1").await;
    let mut alice_sse = sse(&server, "alice", "chat:1").await;
    let mut bob = ws(&server, "bob", "chat:1").await;
    let alice_id = alice.connection_id.clone().unwrap();
    let sse_id = alice_sse.connection_id.clone().unwrap();

    // Text, with an event type: a `direct` frame with no id, to that connection only.
    let answer = ok_json(
        post(
            &server,
            &format!("/v1/connections/{alice_id}/messages?event=note"),
            "hi alice",
        )
        .await,
    )
    .await;
    assert_eq!(answer, json!({"connection_id": alice_id, "queued": true}));
    assert_eq!(
        alice.next().await.unwrap(),
        json!({"type": "direct", "event": "note", "data": "hi alice"})
    );
    // Bytes travel base64, as events do.
    ok_json(
        post(
            &server,
            &format!("/v1/connections/{alice_id}/messages"),
            vec![0u8, 255],
        )
        .await,
    )
    .await;
    assert_eq!(
        alice.next().await.unwrap(),
        json!({"type": "direct", "event": "message", "data_base64": "AP8="})
    );
    // SSE: an event of that type with no id, so the client's cursor stays where it was.
    let published = server
        .client
        .post(server.url("/v1/channels/chat:1/messages"))
        .bearer_auth(BACKEND_KEY)
        .body("to everyone")
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    let published: Value = published.json().await.unwrap();
    let event_id = published["id"].as_str().unwrap().to_string();
    alice_sse
        .expect_event(&event_id, "message", "to everyone")
        .await;
    ok_json(
        post(
            &server,
            &format!("/v1/connections/{sse_id}/messages?event=note"),
            "line one\nline two",
        )
        .await,
    )
    .await;
    let direct = alice_sse.next().await.unwrap();
    assert_eq!(
        (
            direct.id.as_deref(),
            direct.event.as_str(),
            direct.data.as_str()
        ),
        (None, "note", "line one\nline two")
    );
    assert_eq!(alice_sse.last_id.as_deref(), Some(event_id.as_str()));
    // Bob got the channel's event and nothing sent to Alice.
    bob.expect_event(&event_id, "message", "to everyone").await;
    alice
        .expect_event(&event_id, "message", "to everyone")
        .await;

    // Closing: the WebSocket with the code and reason given, the SSE stream with a
    // `dormouse.close` event saying them.
    let answer = ok_json(
        post(
            &server,
            &format!("/v1/connections/{alice_id}/close"),
            r#"{"code": 4100, "reason": "signed out"}"#,
        )
        .await,
    )
    .await;
    assert_eq!(answer, json!({"connection_id": alice_id, "closing": true}));
    let close = alice.next().await.unwrap();
    assert_eq!(
        (close["code"].as_u64(), close["reason"].as_str()),
        (Some(4100), Some("signed out"))
    );
    ok_json(post(&server, &format!("/v1/connections/{sse_id}/close"), "").await).await;
    let closing = alice_sse.next().await.unwrap();
    assert_eq!(closing.event, "dormouse.close");
    let closing: Value = serde_json::from_str(&closing.data).unwrap();
    assert_eq!(
        closing,
        json!({"type": "close", "code": 1000, "reason": "closed by the server"})
    );
    assert!(alice_sse.next().await.is_none(), "the stream ends");

    // Gone: 404 for every call about it, once the connection has ended.
    for id in [&alice_id, &sse_id] {
        let mut status = 0;
        for _ in 0..100 {
            status = get(&server, &format!("/v1/connections/{id}"))
                .await
                .status()
                .as_u16();
            if status == 404 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, 404);
        let (status, code, _) =
            error_of(post(&server, &format!("/v1/connections/{id}/messages"), "late").await).await;
        assert_eq!((status, code.as_str()), (404, "connection_not_found"));
        let (status, code, _) =
            error_of(post(&server, &format!("/v1/connections/{id}/close"), "").await).await;
        assert_eq!((status, code.as_str()), (404, "connection_not_found"));
    }
    // Bob is still connected and still served.
    let bob_id = bob.connection_id.clone().unwrap();
    ok_json(
        post(
            &server,
            &format!("/v1/connections/{bob_id}/messages"),
            "still here",
        )
        .await,
    )
    .await;
    assert_eq!(bob.next().await.unwrap()["data"], "still here");
}

#[tokio::test]
async fn a_subjects_connections_are_listed_sent_to_and_closed_together() {
    let server = TestServer::start_with(secured).await;
    let mut a1 = ws(&server, "alice", "chat:1").await;
    let mut a2 = ws(&server, "alice", "chat:2").await;
    let mut a3 = sse(&server, "alice", "chat:1").await;
    let mut bob = ws(&server, "bob", "chat:1").await;
    let ids = [
        a1.connection_id.clone().unwrap(),
        a2.connection_id.clone().unwrap(),
        a3.connection_id.clone().unwrap(),
    ];

    let listed = ok_json(get(&server, "/v1/subjects/alice/connections").await).await;
    assert_eq!(listed["subject"], "alice");
    assert_eq!(listed["total"], 3);
    assert_eq!(listed["truncated"], false);
    let mut listed_ids: Vec<String> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["subject"], "alice");
            c["connection_id"].as_str().unwrap().to_string()
        })
        .collect();
    listed_ids.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(listed_ids, expected);
    let page = ok_json(get(&server, "/v1/subjects/alice/connections?limit=2").await).await;
    assert_eq!(
        (
            page["connections"].as_array().unwrap().len(),
            page["total"].as_u64(),
            page["truncated"].as_bool()
        ),
        (2, Some(3), Some(true))
    );

    // A channel's connections, whoever they are.
    let listed = ok_json(get(&server, "/v1/channels/chat:1/connections").await).await;
    assert_eq!(listed["channel"], "chat:1");
    assert_eq!(listed["total"], 3, "{listed}");

    // One call reaches every connection of the subject, on whatever channel.
    let sent = ok_json(
        post(
            &server,
            "/v1/subjects/alice/messages?event=notice",
            "maintenance at noon",
        )
        .await,
    )
    .await;
    assert_eq!(
        sent,
        json!({"subject": "alice", "queued": 3, "slow_consumers": 0})
    );
    for client in [&mut a1, &mut a2] {
        assert_eq!(
            client.next().await.unwrap(),
            json!({"type": "direct", "event": "notice", "data": "maintenance at noon"})
        );
    }
    let got = a3.next().await.unwrap();
    assert_eq!(
        (got.event.as_str(), got.data.as_str()),
        ("notice", "maintenance at noon")
    );

    // A subject with no connections is not an error: nothing to reach.
    let sent = ok_json(post(&server, "/v1/subjects/nobody/messages", "x").await).await;
    assert_eq!(sent["queued"], 0);

    let closed = ok_json(
        post(
            &server,
            "/v1/subjects/alice/close",
            r#"{"code": 4101, "reason": "account suspended"}"#,
        )
        .await,
    )
    .await;
    assert_eq!(closed, json!({"subject": "alice", "closing": 3}));
    for client in [&mut a1, &mut a2] {
        let close = client.next().await.unwrap();
        assert_eq!(
            (close["type"].as_str(), close["code"].as_u64()),
            (Some("close"), Some(4101))
        );
    }
    assert_eq!(a3.next().await.unwrap().event, "dormouse.close");
    // Bob heard nothing of it: the next thing he gets is a channel event.
    let res = post(&server, "/v1/channels/chat:1/messages", "after").await;
    assert_eq!(res.status(), 201);
    let next = bob.next().await.unwrap();
    assert_eq!(
        (next["type"].as_str(), next["data"].as_str()),
        (Some("message"), Some("after"))
    );

    let mut total = u64::MAX;
    for _ in 0..100 {
        total = ok_json(get(&server, "/v1/subjects/alice/connections").await).await["total"]
            .as_u64()
            .unwrap();
        if total == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(total, 0, "the closed connections leave the table");
}

#[tokio::test]
async fn a_fresh_credential_for_another_subject_moves_the_connection_to_it() {
    let server = TestServer::start_with(secured).await;
    let mut client = ws(&server, "alice", "chat:1").await;
    client
        .send_json(json!({"type": "auth", "token": token("carol"), "ref": 1}))
        .await;
    assert_eq!(client.next().await.unwrap()["type"], "auth_ok");
    let carol = ok_json(get(&server, "/v1/subjects/carol/connections").await).await;
    assert_eq!(carol["total"], 1);
    let alice = ok_json(get(&server, "/v1/subjects/alice/connections").await).await;
    assert_eq!(alice["total"], 0);
}

#[tokio::test]
async fn bad_calls_get_a_precise_status_and_code() {
    let server = TestServer::start_with(secured).await;
    let client = ws(&server, "alice", "chat:1").await;
    let id = client.connection_id.clone().unwrap();
    let c = &server.client;

    // The capability is the connection API's own: neither a subscriber's token nor an
    // admin key carries it.
    for auth in [token("alice"), ADMIN_KEY.to_string()] {
        let res = c
            .get(server.url(&format!("/v1/connections/{id}")))
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_of(res).await;
        assert_eq!((status, code.as_str()), (403, "forbidden"));
        assert!(message.contains("connections capability"), "{message}");
    }
    let res = c
        .post(server.url("/v1/subjects/alice/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let expect = |status: u16, code: &'static str| {
        move |got: (u16, String, String)| {
            assert_eq!((got.0, got.1.as_str()), (status, code), "{}", got.2);
        }
    };
    // Malformed ids: 400, before any body is read.
    for bad in [
        "nonsense",
        "a..c",
        "node.1.zz",
        "n%20x.1.1",
        &"x".repeat(300),
    ] {
        expect(400, "bad_connection_id")(
            error_of(get(&server, &format!("/v1/connections/{bad}")).await).await,
        );
        expect(400, "bad_connection_id")(
            error_of(post(&server, &format!("/v1/connections/{bad}/messages"), "x").await).await,
        );
    }
    // A well-formed id of this node that was never handed out.
    let unused = format!("{}.fffff", id.rsplit_once('.').unwrap().0);
    expect(404, "connection_not_found")(
        error_of(post(&server, &format!("/v1/connections/{unused}/messages"), "x").await).await,
    );
    // Close requests.
    for (body, code) in [
        (r#"{"code": 1001}"#, "bad_close_code"),
        (r#"{"code": 5000}"#, "bad_close_code"),
        (r#"{"code": 2999}"#, "bad_close_code"),
        (
            r#"{"code": 4100, "reason": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
            "bad_close_reason",
        ),
        ("{not json", "bad_json"),
        (r#"{"code": 4100, "extra": 1}"#, "bad_json"),
        (r#"{"code": 4000}"#, "bad_close_code"),
        (r#"{"code": 4099}"#, "bad_close_code"),
    ] {
        expect(400, code)(
            error_of(post(&server, &format!("/v1/connections/{id}/close"), body).await).await,
        );
        expect(400, code)(error_of(post(&server, "/v1/subjects/alice/close", body).await).await);
    }
    // Messages: the event type is checked as a publish's, the size too.
    expect(400, "bad_event_name")(
        error_of(
            post(
                &server,
                &format!("/v1/connections/{id}/messages?event=has%20space"),
                "x",
            )
            .await,
        )
        .await,
    );
    expect(400, "bad_query")(
        error_of(
            post(
                &server,
                &format!("/v1/connections/{id}/messages?what=1"),
                "x",
            )
            .await,
        )
        .await,
    );
    let too_big = vec![b'x'; 64 * 1024 + 1];
    let res = post(&server, "/v1/subjects/alice/messages", too_big).await;
    assert_eq!(res.status(), 413);
    // Listings.
    expect(400, "bad_limit")(
        error_of(get(&server, "/v1/subjects/alice/connections?limit=0").await).await,
    );
    expect(400, "bad_limit")(
        error_of(get(&server, "/v1/channels/chat:1/connections?limit=10001").await).await,
    );
    expect(400, "bad_subject")(
        error_of(
            get(
                &server,
                &format!("/v1/subjects/{}/connections", "s".repeat(257)),
            )
            .await,
        )
        .await,
    );
    // Wrong method.
    let res = c
        .get(server.url(&format!("/v1/connections/{id}/messages")))
        .bearer_auth(BACKEND_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    // None of it touched the connection.
    let answer =
        ok_json(post(&server, &format!("/v1/connections/{id}/messages"), "fine").await).await;
    assert_eq!(answer["queued"], true);
}

#[tokio::test]
async fn a_connection_of_several_channels_is_listed_under_each() {
    let server = TestServer::start_with(secured).await;
    let listed = |channel: &'static str| {
        let server = &server;
        async move {
            let page =
                ok_json(get(server, &format!("/v1/channels/{channel}/connections")).await).await;
            page["connections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["connection_id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    // A WebSocket opened for one channel, following another with `subscribe`.
    let mut socket = ws(&server, "alice", "chat:a").await;
    let id = socket.connection_id.clone().unwrap();
    socket
        .send_json(json!({"type": "subscribe", "channel": "chat:b", "ref": 1}))
        .await;
    loop {
        if socket.next().await.expect("an answer")["type"] == "subscribed" {
            break;
        }
    }
    assert_eq!(listed("chat:a").await, std::slice::from_ref(&id));
    assert_eq!(listed("chat:b").await, std::slice::from_ref(&id));
    let page = ok_json(get(&server, "/v1/channels/chat:b/connections").await).await;
    assert_eq!(page["connections"][0]["channel"], "chat:a", "{page}");
    assert_eq!(
        page["connections"][0]["also_follows"],
        json!(["chat:b"]),
        "{page}"
    );
    socket
        .send_json(json!({"type": "unsubscribe", "channel": "chat:b", "ref": 2}))
        .await;
    loop {
        if socket.next().await.expect("an answer")["type"] == "unsubscribed" {
            break;
        }
    }
    assert!(listed("chat:b").await.is_empty());
    assert_eq!(listed("chat:a").await, [id]);

    // An event stream of several channels.
    let url = server.url(&format!(
        "/v1/events?channel=chat:c&channel=chat:d&access_token={}",
        token("bob")
    ));
    let mut stream = SseClient::connect_to(&server.client, &url, None).await;
    let stream_id = stream.connection_id().await;
    assert_eq!(listed("chat:c").await, std::slice::from_ref(&stream_id));
    assert_eq!(listed("chat:d").await, [stream_id]);
    server.stop().await;
}
