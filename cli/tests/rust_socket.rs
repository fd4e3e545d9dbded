//! The Rust client's WebSocket transport (`dormouse-client` with its `websocket` feature)
//! as an app uses it, against a real server: publishing acknowledged on the socket and
//! stored once across a cut connection, several channels resumed across a restart, a
//! token replaced in place, a refused handshake read with its code, and a backend's close.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dormouse_client::http::{Client, Error, Item, Message, Socket, parse_base_url};
use dormouse_testkit::relay::Relay;
use dormouse_testkit::{PATIENCE, TestServer};

fn client_at(base: &str) -> Client {
    Client::new(parse_base_url(base).unwrap(), None, "test").unwrap()
}

/// The next message, skipping controls and reconnection notices.
async fn next_message(socket: &mut Socket) -> Message {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Item::Message(message) = socket.next().await.expect("following") {
                return message;
            }
        }
    })
    .await
    .expect("a message in time")
}

/// The next control of `kind`, skipping everything else.
async fn next_control(socket: &mut Socket, wanted: &str) -> serde_json::Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Item::Control { kind, data } = socket.next().await.expect("following")
                && kind == wanted
            {
                return data;
            }
        }
    })
    .await
    .expect("the control in time")
}

#[tokio::test]
async fn publishes_are_acknowledged_on_the_socket_and_stored_once_across_a_cut() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.addr).await;
    let direct = client_at(&server.url(""));
    let mut socket = client_at(&relay.url()).socket(&[("room", None)]);
    let connected = next_control(&mut socket, "connected").await;
    assert!(connected["connection_id"].is_string(), "{connected}");

    // Acknowledged after it is stored; text and bytes arrive as published.
    let hello = socket.publish("room", "hello", Some("chat")).await.unwrap();
    assert!(!hello.duplicate);
    let got = next_message(&mut socket).await;
    assert_eq!(
        (
            got.channel.as_deref(),
            got.id.as_deref(),
            got.event.as_str()
        ),
        (Some("room"), Some(hello.id.as_str()), "chat")
    );
    assert_eq!(&got.data[..], b"hello");
    let bytes: &'static [u8] = &[0, 159, 146, 150, 255, b'\r'];
    let raw = socket.publish("room", bytes, None).await.unwrap();
    let got = next_message(&mut socket).await;
    assert_eq!((got.id.unwrap(), &got.data[..]), (raw.id, bytes));

    // Forty publishes in flight, then the connection is cut under them, and new publishes
    // are made while it is down: every one is answered once it is back, and stored once.
    let handle = socket.handle();
    let mut publishes = Vec::new();
    for n in 0..40 {
        let handle = handle.clone();
        publishes.push(tokio::spawn(async move {
            handle.publish("room", format!("n{n}"), None).await
        }));
        if n == 20 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            relay.cut();
        }
    }
    // The socket notices and keeps retrying while the relay refuses. What it delivers
    // meanwhile counts below.
    let mut seen = std::collections::HashSet::new();
    let take = |seen: &mut std::collections::HashSet<String>, message: Message| {
        let data = String::from_utf8(message.data.to_vec()).unwrap();
        assert!(seen.insert(data.clone()), "{data} twice");
    };
    let lost = tokio::time::timeout(PATIENCE, async {
        loop {
            match socket.next().await.unwrap() {
                Item::Lost { .. } => break,
                Item::Message(message) => take(&mut seen, message),
                _ => {}
            }
        }
    })
    .await;
    assert!(lost.is_ok(), "the cut was noticed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.heal();
    let mut ids = Vec::new();
    for publish in publishes {
        let published = tokio::time::timeout(PATIENCE, publish)
            .await
            .expect("answered in time")
            .unwrap()
            .expect("acknowledged");
        ids.push(published.id);
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 40, "one id per publish: {ids:?}");
    let history = direct.history("room", &[("limit", "100")]).await.unwrap();
    let stored: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["data"].as_str())
        .filter(|d| d.starts_with('n'))
        .collect();
    assert_eq!(stored.len(), 40, "each stored once: {stored:?}");

    // And the socket delivered every one of them exactly once, resuming after the cut.
    while seen.len() < 40 {
        take(&mut seen, next_message(&mut socket).await);
    }
    socket.close();
    server.stop().await;
}

#[tokio::test]
async fn several_channels_resume_across_a_restart() {
    let tweak = |s: &mut dormouse_gateway::Settings| {
        s.channels.max_events = 100;
    };
    let mut server = TestServer::start_with(tweak).await;
    let client = client_at(&server.url(""));
    let a0 = client.publish("a", "a0", None, None).await.unwrap();
    let mut socket = client.socket(&[("a", Some(a0.id.clone()))]);
    next_control(&mut socket, "connected").await;
    socket.subscribe("b", None).await.unwrap();
    // A channel it already follows, and one it does not.
    let again = socket.subscribe("b", None).await.unwrap_err();
    assert!(
        matches!(&again, Error::Refused { code, .. } if code == "already_subscribed"),
        "{again}"
    );
    let bad = socket
        .handle()
        .subscribe("no spaces", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&bad, Error::Refused { code, .. } if code == "bad_channel_name"),
        "{bad}"
    );
    let b1 = client.publish("b", "b1", None, None).await.unwrap();
    let got = next_message(&mut socket).await;
    assert_eq!((got.channel.as_deref(), got.id), (Some("b"), Some(b1.id)));

    server = server.restart_in_place(tweak).await;
    // Published while the socket waits to reconnect: both channels resume past them.
    let a1 = client.publish("a", "a1", None, None).await.unwrap();
    let b2 = client.publish("b", "b2", None, None).await.unwrap();
    let mut reconnected = false;
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while got.len() < 2 {
            match socket.next().await.unwrap() {
                Item::Reconnected => reconnected = true,
                Item::Message(m) => got.push((m.channel.unwrap(), m.id.unwrap())),
                _ => {}
            }
        }
    })
    .await
    .expect("both in time");
    assert!(reconnected);
    got.sort();
    assert_eq!(got, vec![("a".into(), a1.id), ("b".into(), b2.id)]);

    // Unsubscribed: b's events stop; a's go on. The channel it was opened for stays.
    socket.unsubscribe("b").await.unwrap();
    let stays = socket.unsubscribe("a").await.unwrap_err();
    assert!(
        matches!(&stays, Error::Refused { code, .. } if code == "opened_for_channel"),
        "{stays}"
    );
    client.publish("b", "b3", None, None).await.unwrap();
    let a2 = client.publish("a", "a2", None, None).await.unwrap();
    assert_eq!(next_message(&mut socket).await.id, Some(a2.id));
    server.stop().await;
}

#[tokio::test]
async fn a_refused_handshake_is_read_with_its_code_and_a_backends_close_ends_the_socket() {
    let server = TestServer::start().await;
    let client = client_at(&server.url(""));
    let mut bad = client.socket(&[("a", Some("not-an-id".into()))]);
    match bad.next().await {
        Err(Error::Server(e)) => {
            assert_eq!((e.status.as_u16(), e.code.as_str()), (400, "bad_event_id"))
        }
        other => panic!("{other:?}"),
    }

    let mut socket = client.socket(&[("a", None)]);
    let connected = next_control(&mut socket, "connected").await;
    let id = connected["connection_id"].as_str().unwrap();
    let url = client.url(&["v1", "connections", id, "close"]);
    client
        .send(client.request(reqwest::Method::POST, url, true))
        .await
        .unwrap();
    let close = next_control(&mut socket, "close").await;
    assert_eq!(close["code"], 1000);
    // Ended for good: no reconnection.
    assert!(matches!(
        socket.next().await,
        Err(Error::Closed { code: 1000, .. })
    ));
    assert!(matches!(
        socket.next().await,
        Err(Error::Closed { code: 1000, .. })
    ));
    server.stop().await;
}

#[tokio::test]
async fn a_token_provider_replaces_the_token_in_place_before_it_expires() {
    const SECRET: &str = "rust-client-test-secret-long-enough-hs256";
    let server = TestServer::start_with(|s| {
        s.auth.jwt_secret = SECRET.to_string();
    })
    .await;
    let asked = Arc::new(AtomicU32::new(0));
    let counter = asked.clone();
    let client = client_at(&server.url("")).with_token_provider(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        let claims = serde_json::json!({
            "sub": "app",
            "dormouse": {"subscribe": ["news"], "publish": ["news"]},
        });
        async move { Ok(dormouse_testkit::jwt(SECRET, 3, claims)) }
    });
    let mut socket = client.socket(&[("news", None)]);
    next_control(&mut socket, "connected").await;
    // Past two tokens' lives on one connection: no reconnection, publishing goes on.
    let until = tokio::time::Instant::now() + Duration::from_secs(7);
    let mut published = 0;
    while tokio::time::Instant::now() < until {
        let ack = socket.publish("news", "tick", None).await.unwrap();
        loop {
            match tokio::time::timeout(PATIENCE, socket.next())
                .await
                .unwrap()
                .unwrap()
            {
                Item::Message(m) if m.id.as_deref() == Some(ack.id.as_str()) => break,
                Item::Message(_) => {}
                Item::Lost { reason, .. } => panic!("reconnected: {reason}"),
                Item::Control { kind, data } if kind == "auth_refused" => panic!("{data}"),
                _ => {}
            }
        }
        published += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(published > 10);
    assert!(
        asked.load(Ordering::SeqCst) >= 3,
        "refreshed at least twice"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_app_that_waits_for_its_ack_before_reading_is_answered_and_big_payloads_go_through() {
    let server = TestServer::start_with(|s| {
        s.limits.max_message_size = dormouse_gateway::ByteSize::kib(256);
        // What the socket leaves unread past its read-ahead comes again from the channel.
        s.channels.max_events = 10_000;
    })
    .await;
    let client = client_at(&server.url(""));
    let mut socket = client.socket(&[("busy", None)]);
    next_control(&mut socket, "connected").await;
    // 3,000 events arrive while the app does not read: more than the socket reads ahead.
    let batch: Vec<serde_json::Value> = (0..3000)
        .map(|n| serde_json::json!({"channel": "busy", "data": format!("e{n}")}))
        .collect();
    let url = client.url(&["v1", "publish"]);
    client
        .send(
            client
                .request(reqwest::Method::POST, url, true)
                .json(&batch),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Its own publish is answered all the same (the ack comes after those events).
    let ack = tokio::time::timeout(PATIENCE, socket.publish("busy", "mine", None))
        .await
        .expect("answered while 3,000 events wait to be read")
        .unwrap();
    for n in 0..3000 {
        let message = next_message(&mut socket).await;
        assert_eq!(&message.data[..], format!("e{n}").as_bytes());
    }
    assert_eq!(next_message(&mut socket).await.id, Some(ack.id));

    // Control characters are valid UTF-8 but grow sixfold in JSON: sent as base64.
    let zeros = vec![0u8; 150 * 1024];
    let ack = socket.publish("busy", zeros.clone(), None).await.unwrap();
    let got = next_message(&mut socket).await;
    assert_eq!((got.id, got.data.len()), (Some(ack.id), zeros.len()));
    assert!(got.data.iter().all(|b| *b == 0));
    // Over the server's limit: refused with its reason.
    let refused = socket
        .publish("busy", vec![b'x'; 300 * 1024], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Refused { code, .. } if code == "payload_too_large"),
        "{refused}"
    );
    // A frame beyond what the server reads at all ends each connection instead of being
    // answered: after a few connections it fails, rather than being sent forever, and the
    // socket goes on.
    let started = tokio::time::Instant::now();
    let unanswered = socket
        .publish("busy", vec![b'y'; 1024 * 1024], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&unanswered, Error::Refused { code, .. } if code == "unanswered"),
        "{unanswered}"
    );
    eprintln!("failed unanswered after {:?}", started.elapsed());
    let after = socket.publish("busy", "after", None).await.unwrap();
    assert_eq!(next_message(&mut socket).await.id, Some(after.id));
    server.stop().await;
}

#[tokio::test]
async fn an_app_that_only_publishes_keeps_getting_acks_and_later_reads_everything() {
    let server = TestServer::start_with(|s| {
        s.channels.max_events = 10_000;
        s.storage.durability = dormouse_storage::Durability::Never;
    })
    .await;
    let client = client_at(&server.url(""));
    let mut socket = client.socket(&[("feed", None)]);
    next_control(&mut socket, "connected").await;
    // 2,500 publishes, each awaited, none of the socket's own deliveries read meanwhile
    // (more than it reads ahead): every ack still comes.
    let mut ids = Vec::new();
    for n in 0..2500 {
        let ack = tokio::time::timeout(PATIENCE, socket.publish("feed", format!("p{n}"), None))
            .await
            .expect("acknowledged while nothing is read")
            .unwrap();
        ids.push(ack.id);
    }
    // Then every one of them is read, in order, once (what was left unread past the
    // read-ahead comes again from the channel).
    for id in &ids {
        assert_eq!(next_message(&mut socket).await.id.as_ref(), Some(id));
    }
    server.stop().await;
}
