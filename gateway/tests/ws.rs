//! WebSocket subscribers (and publishers) end to end: a real server, a real WebSocket client.

use dormouse_testkit as support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dormouse_gateway::ByteSize;
use futures::SinkExt as _;
use serde_json::{Value, json};
use support::{TestServer, WsClient, error_of, ws_handshake_error};
use tokio_tungstenite::tungstenite::Message;

const WS: &str = "/v1/channels/room-ws/ws";

/// Reads `n` messages and returns them sorted by `type`, for a publisher that receives both
/// its ack and (being subscribed too) the event, in either order.
async fn next_n_by_type(ws: &mut WsClient, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(ws.next().await.expect("a message"));
    }
    got.sort_by(|a, b| a["type"].as_str().cmp(&b["type"].as_str()));
    got
}

#[tokio::test]
async fn a_dropped_socket_resumes_with_exactly_the_missed_events_then_live_ones() {
    let server = TestServer::start().await;
    let mut ws = WsClient::connect(&server, WS).await;
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(server.publish("room-ws", format!("a{i}")).await);
    }
    for (i, id) in first.iter().enumerate() {
        ws.expect_event(id, "message", &format!("a{i}")).await;
    }
    drop(ws);

    let mut missed = Vec::new();
    for i in 0..4 {
        missed.push(server.publish("room-ws", format!("b{i}")).await);
    }
    let last = &first[2];
    let mut ws = WsClient::connect(&server, &format!("{WS}?last_event_id={last}")).await;
    for (i, id) in missed.iter().enumerate() {
        ws.expect_event(id, "message", &format!("b{i}")).await;
    }
    let live = server.publish_event("room-ws", "update", "c0").await;
    ws.expect_event(&live, "update", "c0").await;

    // The header cursor works on the WebSocket route as well.
    let mut by_header =
        WsClient::try_connect_with(&server, WS, &[("Last-Event-ID", &missed[2])], None)
            .await
            .expect("connect with a Last-Event-ID header");
    by_header.expect_event(&missed[3], "message", "b3").await;
    by_header.expect_event(&live, "update", "c0").await;
    drop((ws, by_header));
    server.stop().await;
}

#[tokio::test]
async fn text_arrives_as_readable_json_and_binary_as_exact_base64() {
    let server = TestServer::start().await;
    let mut ws = WsClient::connect(&server, WS).await;

    let json_text = r#"{"user":"zoë","said":"hi \"there\"","n":[1,2]}"#;
    let text_id = server.publish("room-ws", json_text).await;
    let got = ws.next().await.expect("text message");
    // The payload is the JSON string as published, not re-encoded or base64-encoded.
    assert_eq!(
        got,
        json!({"type": "message", "channel": "room-ws", "id": text_id, "event": "message", "data": json_text})
    );

    let multi = "line one\n\n  line three: with colon\n";
    let multi_id = server.publish("room-ws", multi).await;
    ws.expect_event(&multi_id, "message", multi).await;

    let binary: Vec<u8> = vec![0xff, 0x00, 0x80, 0xfe, b'a', 0xc3, 0x28, 0x00, 0x7f];
    let binary_id = server
        .publish_event("room-ws", "blob", binary.clone())
        .await;
    let got = ws.next().await.expect("binary message");
    assert_eq!(got["type"], "message");
    assert_eq!(got["id"], binary_id.as_str());
    assert_eq!(got["event"], "blob");
    assert!(
        got.get("data").is_none(),
        "binary must not travel as data: {got}"
    );
    let decoded = BASE64
        .decode(got["data_base64"].as_str().expect("data_base64"))
        .expect("valid base64");
    assert_eq!(decoded, binary);

    // A carriage return cannot travel over SSE, so such text goes base64 everywhere.
    let crlf = b"a\r\nb".to_vec();
    let crlf_id = server.publish("room-ws", crlf.clone()).await;
    let got = ws.next().await.expect("crlf message");
    assert_eq!(
        got,
        json!({"type": "message", "channel": "room-ws", "id": crlf_id, "event": "message", "data_base64": BASE64.encode(&crlf)})
    );
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn a_client_publishes_over_the_socket_and_gets_an_ack_with_its_ref() {
    let server = TestServer::start().await;
    let mut publisher = WsClient::connect(&server, WS).await;
    let mut other = WsClient::connect(&server, WS).await;

    publisher
        .send_json(json!({"type": "publish", "data": "x", "ref": 1}))
        .await;
    let got = next_n_by_type(&mut publisher, 2).await;
    let id = got[0]["id"].as_str().expect("ack id").to_string();
    assert_eq!(
        got,
        vec![
            json!({"type": "ack", "id": id, "duplicate": false, "ref": 1}),
            json!({"type": "message", "channel": "room-ws", "id": id, "event": "message", "data": "x"}),
        ]
    );
    other.expect_event(&id, "message", "x").await;

    // Event name, a string ref, and an idempotency key honoured on retry.
    let publish = json!({"type": "publish", "event": "chat", "data": "hi", "idempotency_key": "k-1", "ref": "r2"});
    publisher.send_json(publish.clone()).await;
    let got = next_n_by_type(&mut publisher, 2).await;
    let chat = got[0]["id"].as_str().expect("ack id").to_string();
    assert_ne!(chat, id);
    assert_eq!(
        got,
        vec![
            json!({"type": "ack", "id": chat, "duplicate": false, "ref": "r2"}),
            json!({"type": "message", "channel": "room-ws", "id": chat, "event": "chat", "data": "hi"}),
        ]
    );
    other.expect_event(&chat, "chat", "hi").await;
    publisher.send_json(publish).await;
    assert_eq!(
        publisher.next().await,
        Some(json!({"type": "ack", "id": chat, "duplicate": true, "ref": "r2"}))
    );

    // A binary frame is published as is, with the default event name.
    let bytes = vec![0u8, 1, 2, 0xff];
    publisher
        .ws
        .send(Message::Binary(bytes.clone().into()))
        .await
        .expect("send binary");
    let got = next_n_by_type(&mut publisher, 2).await;
    let blob = got[0]["id"].as_str().expect("ack id").to_string();
    let message = json!({"type": "message", "channel": "room-ws", "id": blob, "event": "message", "data_base64": "AAEC/w=="});
    assert_eq!(
        got,
        vec![
            json!({"type": "ack", "id": blob, "duplicate": false, "ref": null}),
            message.clone(),
        ]
    );
    assert_eq!(other.next().await, Some(message));

    // The log holds exactly the three distinct events, in order.
    let history = server.history("room-ws", "").await;
    let ids: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str(), chat.as_str(), blob.as_str()]);
    drop((publisher, other));
    server.stop().await;
}

/// A client that sends many messages without waiting gets one answer per message, in the
/// order it sent them, whether it was answered at once (bad JSON, a bad event name, a
/// credential) or waited for the channel.
#[tokio::test]
async fn pipelined_messages_are_answered_in_the_order_they_were_sent() {
    let server = TestServer::start().await;
    let mut client = WsClient::connect(&server, WS).await;
    const SENT: usize = 60;
    let mut published = Vec::new();
    for r in 0..SENT {
        let text = match r % 5 {
            1 => json!({"type": "publish", "event": "bad:name", "data": "x", "ref": r}).to_string(),
            2 => format!("{{\"type\":\"publish\",\"ref\":{r}"),
            3 => json!({"type": "auth", "token": "not-a-token", "ref": r}).to_string(),
            _ => {
                published.push(r);
                json!({"type": "publish", "data": format!("m{r}"), "ref": r}).to_string()
            }
        };
        client.ws.send(Message::text(text)).await.expect("send");
    }
    // The client is subscribed too: its messages arrive among the answers.
    let (mut answers, mut events) = (Vec::new(), Vec::new());
    while answers.len() < SENT || events.len() < published.len() {
        let got = client.next().await.expect("a frame");
        match got["type"].as_str() {
            Some("message") => events.push(got),
            _ => answers.push(got),
        }
    }
    let refs: Vec<Value> = answers.iter().map(|a| a["ref"].clone()).collect();
    // A frame too malformed to read has no ref to echo.
    let expected: Vec<Value> = (0..SENT)
        .map(|r| if r % 5 == 2 { Value::Null } else { json!(r) })
        .collect();
    assert_eq!(refs, expected, "answers: {answers:?}");
    let kinds: Vec<(&str, &str)> = answers
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap_or(""),
                a["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for (r, kind) in kinds.iter().enumerate() {
        let want = match r % 5 {
            1 => ("error", "bad_event_name"),
            2 => ("error", "bad_message"),
            // Auth is off on this server: any credential is taken.
            3 => ("auth_ok", ""),
            _ => ("ack", ""),
        };
        assert_eq!(*kind, want, "answer {r}: {:?}", answers[r]);
    }
    // Acks carry the ids the events got, in publish order.
    let acked: Vec<&Value> = answers
        .iter()
        .filter(|a| a["type"] == "ack")
        .map(|a| &a["id"])
        .collect();
    let delivered: Vec<&Value> = events.iter().map(|e| &e["id"]).collect();
    assert_eq!(acked, delivered);
    let data: Vec<String> = events
        .iter()
        .map(|e| e["data"].as_str().unwrap_or("").to_string())
        .collect();
    let want: Vec<String> = published.iter().map(|r| format!("m{r}")).collect();
    assert_eq!(data, want);
    drop(client);
    server.stop().await;
}

/// A client that keeps sending publishes without reading is slowed down by the server once
/// thousands wait for their answers (it stops reading the socket), and still gets every
/// answer, in order.
#[tokio::test]
async fn a_client_far_ahead_of_its_answers_is_held_back_and_answered_in_order() {
    use futures::StreamExt as _;
    let server = TestServer::start().await;
    let client = WsClient::connect(&server, "/v1/channels/flood/ws").await;
    let (mut tx, mut rx) = client.ws.split();
    const SENT: usize = 6000;
    let sender = tokio::spawn(async move {
        for r in 0..SENT {
            let text = json!({"type": "publish", "data": "x", "ref": r}).to_string();
            tx.feed(Message::text(text)).await.expect("send");
        }
        tx.flush().await.expect("flush");
        tx
    });
    let mut refs = Vec::new();
    while refs.len() < SENT {
        let frame = tokio::time::timeout(support::PATIENCE, rx.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        let Message::Text(text) = frame else { continue };
        let value: Value = serde_json::from_str(&text).expect("json");
        match value["type"].as_str() {
            Some("ack") => refs.push(value["ref"].as_u64().expect("ref") as usize),
            Some("message" | "connected") => {}
            _ => panic!("unexpected {value}"),
        }
    }
    assert_eq!(refs, (0..SENT).collect::<Vec<_>>());
    drop(sender.await.expect("sender"));
    let info = server.get_json("/v1/channels/flood", 200).await;
    assert_eq!(
        info["last_id"]
            .as_str()
            .map(|id| id.ends_with(&format!("-{SENT}"))),
        Some(true),
        "{info}"
    );
    server.stop().await;
}

/// The server reads sockets with a 1 KiB buffer (idle memory); a client message hundreds of
/// times larger must still arrive whole.
#[tokio::test]
async fn a_client_message_much_larger_than_the_read_buffer_arrives_whole() {
    let server = TestServer::start().await;
    let mut publisher =
        WsClient::try_connect_with(&server, WS, &[], Some(support::large_ws_config()))
            .await
            .expect("connect");
    let big = "0123456789abcdef".repeat(300 * 1024 / 16);
    publisher
        .send_json(json!({"type": "publish", "data": big, "ref": "big"}))
        .await;
    let got = next_n_by_type(&mut publisher, 2).await;
    let id = got[0]["id"].as_str().expect("ack id").to_string();
    assert_eq!(
        got[0],
        json!({"type": "ack", "id": id, "duplicate": false, "ref": "big"})
    );
    assert_eq!(got[1]["data"].as_str().map(str::len), Some(big.len()));
    assert_eq!(got[1]["data"].as_str(), Some(big.as_str()));
}

#[tokio::test]
async fn a_malformed_client_message_gets_an_error_and_the_socket_stays_usable() {
    let server = TestServer::start_with(|s| s.limits.max_message_size = ByteSize(1024)).await;
    let mut ws = WsClient::connect(&server, "/v1/channels/talk/ws").await;
    let mut watcher = WsClient::connect(&server, "/v1/channels/talk/ws").await;

    ws.ws
        .send(Message::Text("not json".into()))
        .await
        .expect("send");
    let got = ws.next().await.expect("error");
    assert_eq!(got["type"], "error");
    assert_eq!(got["code"], "bad_message");
    assert_eq!(got["ref"], Value::Null);
    let message = got["message"].as_str().unwrap();
    assert!(
        message.starts_with(r#"expected {"type":"publish","data":...}"#),
        "{message}"
    );

    let cases = [
        (
            json!({"type": "dance", "ref": 7}),
            "bad_message",
            Some(
                r#"unknown message type "dance"; clients may send "publish", "subscribe", "unsubscribe" or "auth""#,
            ),
        ),
        (
            json!({"type": "publish", "ref": 8}),
            "bad_message",
            Some("give exactly one of data and data_base64"),
        ),
        (
            json!({"type": "publish", "data": "a", "data_base64": "YQ==", "ref": 9}),
            "bad_message",
            Some("give exactly one of data and data_base64"),
        ),
        (
            json!({"type": "publish", "data_base64": "!!not base64", "ref": 10}),
            "bad_message",
            None,
        ),
        (
            json!({"type": "publish", "data": "x", "event": "bad:name", "ref": 11}),
            "bad_event_name",
            None,
        ),
        (
            json!({"type": "publish", "data": "x".repeat(1025), "ref": 12}),
            "payload_too_large",
            Some("the message is larger than the limit of 1024 bytes"),
        ),
    ];
    for (request, code, message) in &cases {
        ws.send_json(request.clone()).await;
        let got = ws.next().await.expect("error");
        assert_eq!(got["type"], "error", "{request} -> {got}");
        assert_eq!(got["code"], *code, "{request} -> {got}");
        assert_eq!(got["ref"], request["ref"], "{request} -> {got}");
        let text = got["message"].as_str().expect("message");
        assert!(!text.is_empty());
        if let Some(message) = message {
            assert_eq!(text, *message, "{request}");
        }
    }
    // An unknown field is refused too (deny_unknown_fields), naming the field.
    ws.send_json(json!({"type": "publish", "data": "x", "chanel": "y"}))
        .await;
    let got = ws.next().await.expect("error");
    assert_eq!(
        (&got["type"], &got["code"]),
        (&json!("error"), &json!("bad_message"))
    );
    assert!(got["message"].as_str().unwrap().contains("chanel"), "{got}");

    // Still usable: a good publish is acknowledged and delivered, and nothing else was.
    ws.send_json(json!({"type": "publish", "data": "ok", "ref": 13}))
        .await;
    let got = next_n_by_type(&mut ws, 2).await;
    let id = got[0]["id"].as_str().expect("ack id").to_string();
    assert_eq!(
        got[0],
        json!({"type": "ack", "id": id, "duplicate": false, "ref": 13})
    );
    assert_eq!(
        got[1],
        json!({"type": "message", "channel": "talk", "id": id, "event": "message", "data": "ok"})
    );
    watcher.expect_event(&id, "message", "ok").await;
    let history = server.history("talk", "").await;
    assert_eq!(history["events"].as_array().unwrap().len(), 1, "{history}");
    drop((ws, watcher));
    server.stop().await;
}

#[tokio::test]
async fn a_plain_http_get_gets_a_json_error() {
    let server = TestServer::start().await;
    let res = server.client.get(server.url(WS)).send().await.unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!(status, 400);
    assert_eq!(code, "websocket_upgrade_required");
    assert_eq!(
        message,
        "Connection header did not include 'upgrade': connect with a WebSocket client"
    );

    let res = server.client.post(server.url(WS)).send().await.unwrap();
    let (status, code, _) = error_of(res).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));

    // What is wrong with the URL itself is said first, so a client whose handshake was
    // refused (a browser cannot read why) learns it from a plain GET of the same URL.
    for (query, expected) in [
        ("?last_event_id=not-an-id", "bad_event_id"),
        ("?rewind=0", "bad_rewind"),
        ("?format=xml", "bad_format"),
    ] {
        let res = server
            .client
            .get(server.url(&format!("{WS}{query}")))
            .send()
            .await
            .unwrap();
        let (status, code, _) = error_of(res).await;
        assert_eq!((status, code.as_str()), (400, expected), "{query}");
    }

    // A real handshake with a bad cursor is refused before upgrading.
    let (status, code, message) =
        ws_handshake_error(&server, &format!("{WS}?last_event_id=nope"), &[]).await;
    assert_eq!((status, code.as_str()), (400, "bad_event_id"));
    assert!(
        message.starts_with(r#"last_event_id: malformed event id "nope""#),
        "{message}"
    );
    // The server still serves WebSockets.
    let mut ws = WsClient::connect(&server, WS).await;
    let id = server.publish("room-ws", "after").await;
    ws.expect_event(&id, "message", "after").await;
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn a_graceful_stop_closes_the_socket_with_1012() {
    let server = TestServer::start().await;
    let mut ws = WsClient::connect(&server, WS).await;
    let id = server.publish("room-ws", "before").await;
    ws.expect_event(&id, "message", "before").await;

    let stopping = tokio::spawn(server.stop());
    assert_eq!(
        ws.next().await,
        Some(json!({"type": "close", "code": 1012, "reason": "service restart"}))
    );
    assert_eq!(ws.next().await, None, "nothing after the close frame");
    tokio::time::timeout(support::PATIENCE, stopping)
        .await
        .expect("server stops in time")
        .expect("stop task");
}

#[tokio::test]
async fn binary_mode_carries_events_as_binary_frames_and_control_messages_as_json() {
    use dormouse_client::binary::{DIRECT, EVENT, Frame};
    let server = TestServer::start().await;
    let first = server.publish_event("bin", "old", "before").await;

    // Asked for by query, with a rewind: the newest event first, then live ones.
    let mut by_query =
        WsClient::connect(&server, "/v1/channels/bin/ws?format=binary&rewind=1").await;
    let frame = by_query.next_binary().await;
    assert_eq!(frame[0], EVENT);
    let got = Frame::parse(&frame).expect("a frame the client reads");
    assert_eq!(
        (got.id, got.event, got.data),
        (Some(first.as_str()), "old", &b"before"[..])
    );

    // Asked for by subprotocol, as a browser does: the handshake names it back (the
    // client refuses one that does not).
    let mut by_protocol = WsClient::connect_with(
        &server,
        "/v1/channels/bin/ws",
        &[("sec-websocket-protocol", "chat.v2, dormouse.binary")],
    )
    .await;
    // A megabyte of bytes that are not text: as published, not base64 (a third more).
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let id = server.publish_event("bin", "blob", payload.clone()).await;
    for client in [&mut by_query, &mut by_protocol] {
        let frame = client.next_binary().await;
        assert_eq!(
            frame.len(),
            payload.len() + 4 + id.len() + "bin".len() + "blob".len()
        );
        let got = Frame::parse(&frame).unwrap();
        assert_eq!(
            (got.id, got.channel, got.event),
            (Some(id.as_str()), Some("bin"), "blob")
        );
        assert!(
            got.data == payload.as_slice(),
            "the payload arrived changed"
        );
    }

    // A backend's message to one connection: a direct frame, without an id.
    let connection = by_query.connection_id.clone().unwrap();
    let res = server
        .client
        .post(server.url(&format!("/v1/connections/{connection}/messages?event=note")))
        .body("just you")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let frame = by_query.next_binary().await;
    assert_eq!(frame[0], DIRECT);
    let got = Frame::parse(&frame).unwrap();
    assert_eq!(
        (got.id, got.event, got.data),
        (None, "note", &b"just you"[..])
    );

    // Control messages stay JSON text: a cursor newer than the channel gets its gap.
    let epoch = first.split('-').next().unwrap();
    let mut resumed = WsClient::connect(
        &server,
        &format!("/v1/channels/bin/ws?format=binary&last_event_id={epoch}-999"),
    )
    .await;
    let gap = resumed.next().await.unwrap();
    assert_eq!(
        (gap["type"].as_str(), gap["reason"].as_str()),
        (Some("gap"), Some("unknown_id"))
    );

    // JSON stays the default; an unknown format, or one on an event stream, is refused.
    let mut plain = WsClient::connect(&server, "/v1/channels/bin/ws").await;
    let id = server.publish("bin", "text").await;
    plain.expect_event(&id, "message", "text").await;
    let (status, code, _) =
        ws_handshake_error(&server, "/v1/channels/bin/ws?format=xml", &[]).await;
    assert_eq!((status, code.as_str()), (400, "bad_format"));
    let res = server
        .client
        .get(server.url("/v1/channels/bin/events?format=binary"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 400);
    server.stop().await;
}

#[tokio::test]
async fn one_websocket_follows_many_channels_with_subscribe_and_unsubscribe() {
    let server = TestServer::start_with(|s| {
        s.limits.max_channels_per_connection = 4;
        // A channel with a hook is not added to a connection (the hook is never called).
        s.hooks = vec![dormouse_gateway::HookSettings {
            name: "app".into(),
            url: "http://127.0.0.1:9/hook".into(),
            secret: "0123456789abcdef0123456789abcdef".into(),
            channels: vec!["hooked:*".into()],
            events: vec!["subscribe".into()],
            timeout: std::time::Duration::from_secs(1),
        }];
    })
    .await;
    let old_c = server.publish("c", "c-old").await;
    let new_c = server.publish("c", "c-new").await;
    let mut ws = WsClient::connect(&server, "/v1/channels/a/ws").await;

    // Another channel, live; then one from a cursor, whose backlog comes first.
    ws.send_json(json!({"type": "subscribe", "channel": "b", "ref": 1}))
        .await;
    assert_eq!(
        ws.next().await.unwrap(),
        json!({"type": "subscribed", "channel": "b", "ref": 1})
    );
    ws.send_json(json!({"type": "subscribe", "channel": "c", "last_event_id": old_c, "ref": 2}))
        .await;
    let mut got = [ws.next().await.unwrap(), ws.next().await.unwrap()];
    got.sort_by_key(|m| m["type"].as_str().unwrap().to_string());
    assert_eq!(got[0]["type"], "message", "{got:?}");
    assert_eq!(
        (got[0]["channel"].as_str(), got[0]["id"].as_str()),
        (Some("c"), Some(new_c.as_str()))
    );
    // The answer says where the channel starts for this connection: just before its backlog.
    assert_eq!(
        got[1],
        json!({"type": "subscribed", "channel": "c", "starts_after": old_c, "ref": 2})
    );

    // Events of every followed channel arrive on the one socket, each naming its channel.
    for channel in ["a", "b", "c"] {
        let id = server.publish(channel, format!("to {channel}")).await;
        let event = ws.next().await.unwrap();
        assert_eq!(
            event,
            json!({"type": "message", "channel": channel, "id": id, "event": "message", "data": format!("to {channel}")})
        );
    }
    // A publish names its channel, which the connection must follow.
    ws.send_json(json!({"type": "publish", "channel": "b", "data": "from ws", "ref": 3}))
        .await;
    let mut got = [ws.next().await.unwrap(), ws.next().await.unwrap()];
    got.sort_by_key(|m| m["type"].as_str().unwrap().to_string());
    assert_eq!(
        (got[0]["type"].as_str(), got[0]["ref"].as_i64()),
        (Some("ack"), Some(3))
    );
    assert_eq!(
        (got[1]["channel"].as_str(), got[1]["data"].as_str()),
        (Some("b"), Some("from ws"))
    );

    // Refusals, each precise; the socket stays usable.
    let refusals = [
        (
            json!({"type": "subscribe", "channel": "b", "ref": 10}),
            "already_subscribed",
        ),
        (
            json!({"type": "subscribe", "channel": "a", "ref": 11}),
            "already_subscribed",
        ),
        (
            json!({"type": "subscribe", "channel": "bad name", "ref": 12}),
            "bad_channel_name",
        ),
        (
            json!({"type": "subscribe", "channel": "hooked:1", "ref": 13}),
            "hooked_channel",
        ),
        (
            json!({"type": "subscribe", "channel": "d", "last_event_id": "nope", "ref": 14}),
            "bad_event_id",
        ),
        (
            json!({"type": "subscribe", "channel": "d", "rewind": 0, "ref": 15}),
            "bad_rewind",
        ),
        (json!({"type": "subscribe", "ref": 16}), "bad_message"),
        (
            json!({"type": "unsubscribe", "channel": "a", "ref": 17}),
            "opened_for_channel",
        ),
        (
            json!({"type": "unsubscribe", "channel": "zzz", "ref": 18}),
            "not_subscribed",
        ),
        (
            json!({"type": "publish", "channel": "zzz", "data": "x", "ref": 19}),
            "not_subscribed",
        ),
    ];
    for (message, code) in &refusals {
        ws.send_json(message.clone()).await;
        let answer = ws.next().await.unwrap();
        assert_eq!(
            (
                answer["type"].as_str(),
                answer["code"].as_str(),
                &answer["ref"]
            ),
            (Some("error"), Some(*code), &message["ref"]),
            "{message}: {answer}"
        );
    }
    // The limit counts the channel the connection was opened for.
    ws.send_json(json!({"type": "subscribe", "channel": "d", "rewind": 5, "ref": 20}))
        .await;
    assert_eq!(ws.next().await.unwrap()["type"], "subscribed");
    ws.send_json(json!({"type": "subscribe", "channel": "e", "ref": 21}))
        .await;
    assert_eq!(ws.next().await.unwrap()["code"], "too_many_channels");

    // Unsubscribed: its events stop; the others go on.
    ws.send_json(json!({"type": "unsubscribe", "channel": "b", "ref": 22}))
        .await;
    assert_eq!(
        ws.next().await.unwrap(),
        json!({"type": "unsubscribed", "channel": "b", "ref": 22})
    );
    server.publish("b", "not for us").await;
    let id = server.publish("a", "still a").await;
    let event = ws.next().await.unwrap();
    assert_eq!(
        (event["channel"].as_str(), event["id"].as_str()),
        (Some("a"), Some(id.as_str()))
    );
    let info = server.get_json("/v1/channels/b", 200).await;
    assert_eq!(info["subscribers"], 0, "{info}");
    server.stop().await;
}
