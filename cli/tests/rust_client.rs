//! The Rust client (`dormouse-client` with its `http` feature) as a Rust app uses it,
//! against a real server: publish with an idempotency key, follow a channel across a server
//! restart, a gap, and a refusal.

use std::time::Duration;

use dormouse_client::http::{Client, Error, Item, parse_base_url};
use dormouse_testkit::{PATIENCE, TestServer};

fn client_of(server: &TestServer) -> Client {
    Client::new(parse_base_url(&server.url("")).unwrap(), None, "test").unwrap()
}

/// The next message, skipping controls and reconnection notices.
async fn next_message(follow: &mut dormouse_client::http::Follow) -> (String, String) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Item::Message(event) = follow.next().await.expect("following") {
                return (event.id.expect("an id"), event.data);
            }
        }
    })
    .await
    .expect("a message in time")
}

#[tokio::test]
async fn follows_a_channel_across_a_restart_and_publishes_once() {
    let tweak = |s: &mut dormouse_gateway::Settings| {
        s.sse.retry = Duration::from_millis(200);
        s.channels.max_events = 3;
    };
    let mut server = TestServer::start_with(tweak).await;
    let client = client_of(&server);
    let first = client
        .publish("news", "one", None, Some("key-1"))
        .await
        .unwrap();
    let again = client
        .publish("news", "one", None, Some("key-1"))
        .await
        .unwrap();
    assert_eq!(
        (again.id.as_str(), again.duplicate),
        (first.id.as_str(), true)
    );

    let mut follow = client.follow("news", Some(first.id.clone()));
    let two = client
        .publish("news", "two", Some("tick"), None)
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut follow).await,
        (two.id.clone(), "two".into())
    );

    server = server.restart_in_place(tweak).await;
    let three = client.publish("news", "three", None, None).await.unwrap();
    // The follower saw the stream end, waits, comes back after "two" and gets "three".
    let mut lost = false;
    let got = tokio::time::timeout(PATIENCE, async {
        loop {
            match follow.next().await.expect("following") {
                Item::Lost { .. } => lost = true,
                Item::Message(event) => return (event.id.unwrap(), event.data),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(lost, "the restart was noticed");
    assert_eq!(got, (three.id.clone(), "three".into()));
    assert_eq!(follow.last_id(), Some(three.id.as_str()));

    // A cursor the buffer no longer covers: the gap comes first, then what is kept.
    for n in 4..=8 {
        client
            .publish("news", n.to_string(), None, None)
            .await
            .unwrap();
    }
    let mut late = client.follow("news", Some(first.id.clone()));
    let Item::Control { kind, data } = late.next().await.unwrap() else {
        panic!("a control first")
    };
    let kind = if kind == "connected" {
        let Item::Control { kind, data } = late.next().await.unwrap() else {
            panic!("the gap")
        };
        assert_eq!(data["reason"], "trimmed", "{data}");
        kind
    } else {
        assert_eq!(data["reason"], "trimmed", "{data}");
        kind
    };
    assert_eq!(kind, "gap");
    assert_eq!(next_message(&mut late).await.1, "6");

    // A refusal the client cannot fix ends the following at once, with the server's words.
    let mut bad = client.follow("bad name", None);
    match bad.next().await {
        Err(Error::Server(e)) => {
            assert_eq!(
                (e.status.as_u16(), e.code.as_str()),
                (400, "bad_channel_name")
            );
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn follows_several_channels_on_one_stream_and_reads_history_and_presence() {
    let tweak = |s: &mut dormouse_gateway::Settings| {
        s.sse.retry = Duration::from_millis(200);
        s.channels.presence = true;
    };
    let mut server = TestServer::start_with(tweak).await;
    let client = client_of(&server);
    let a0 = client.publish("a", "a0", None, None).await.unwrap();
    // Channel a from after a0 (nothing to replay), channel b from now on.
    let mut both = client.follow_many(&[("a", Some(a0.id.clone())), ("b", None)]);
    // Its own join on each channel first (presence is on), then the messages.
    let mut joins = 0;
    while joins < 2 {
        if let Item::Control { kind, .. } = both.next().await.unwrap()
            && kind == "join"
        {
            joins += 1;
        }
    }
    let members = client.presence("a", &[]).await.unwrap();
    assert_eq!(members["subjects"], 1, "{members}");
    let b1 = client.publish("b", "b1", None, None).await.unwrap();
    let a1 = client.publish("a", "a1", None, None).await.unwrap();
    let message = |data: &str| -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        (
            v["channel"].as_str().unwrap().into(),
            v["data"].as_str().unwrap().into(),
        )
    };
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Item::Message(event) = both.next().await.unwrap() {
            got.push(message(&event.data));
        }
    }
    assert_eq!(got, [("b".into(), "b1".into()), ("a".into(), "a1".into())]);
    assert_eq!(
        (both.cursor("a"), both.cursor("b")),
        (Some(a1.id.as_str()), Some(b1.id.as_str()))
    );

    // Across a restart, each channel resumes from its own cursor.
    server = server.restart_in_place(tweak).await;
    client.publish("a", "a2", None, None).await.unwrap();
    client.publish("b", "b2", None, None).await.unwrap();
    let mut after = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while after.len() < 2 {
            if let Item::Message(event) = both.next().await.unwrap() {
                after.push(message(&event.data));
            }
        }
    })
    .await
    .unwrap();
    after.sort();
    assert_eq!(
        after,
        [("a".into(), "a2".into()), ("b".into(), "b2".into())]
    );

    let page = client
        .history("a", &[("direction", "backward"), ("limit", "2")])
        .await
        .unwrap();
    let texts: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["a2", "a1"]);
    server.stop().await;
}

#[tokio::test]
async fn a_token_provider_keeps_a_following_going_past_each_tokens_expiry() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    const SECRET: &str = "rust-client-test-secret-long-enough-hs256";
    let server = TestServer::start_with(|s| {
        s.auth.jwt_secret = SECRET.to_string();
        s.sse.retry = Duration::from_millis(100);
    })
    .await;
    let grants = serde_json::json!({"subscribe": ["news"], "publish": ["news"]});
    let asked = Arc::new(AtomicU32::new(0));
    let counter = asked.clone();
    let short_grants = grants.clone();
    let reader = client_of(&server).with_token_provider(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        let claims = serde_json::json!({"sub": "reader", "dormouse": short_grants.clone()});
        async move { Ok(dormouse_testkit::jwt(SECRET, 2, claims)) }
    });
    let writer = Client::new(
        parse_base_url(&server.url("")).unwrap(),
        Some(dormouse_testkit::jwt(
            SECRET,
            600,
            serde_json::json!({"sub": "writer", "dormouse": grants}),
        )),
        "test",
    )
    .unwrap();
    let mut follow = reader.follow("news", None);
    // Connected (the first control) before anything is published.
    assert!(matches!(follow.next().await.unwrap(), Item::Control { .. }));
    let first = writer.publish("news", "before", None, None).await.unwrap();
    assert_eq!(next_message(&mut follow).await.0, first.id);
    // Past the first token's expiry: the server ends the stream, the follower comes back
    // with a fresh token and its cursor.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let later = writer.publish("news", "after", None, None).await.unwrap();
    assert_eq!(next_message(&mut follow).await, (later.id, "after".into()));
    assert!(
        asked.load(Ordering::SeqCst) >= 2,
        "a fresh token was asked for"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_refused_channel_of_several_is_dropped_and_the_others_followed() {
    const SECRET: &str = "rust-client-test-secret-long-enough-hs256";
    let server = TestServer::start_with(|s| {
        s.auth.jwt_secret = SECRET.to_string();
    })
    .await;
    let claims =
        serde_json::json!({"sub": "app", "dormouse": {"subscribe": ["a"], "publish": ["a"]}});
    let client = Client::new(
        parse_base_url(&server.url("")).unwrap(),
        Some(dormouse_testkit::jwt(SECRET, 600, claims)),
        "test",
    )
    .unwrap();
    let mut both = client.follow_many(&[("a", None), ("b", None)]);
    match both.next().await.unwrap() {
        Item::Control { kind, data } => {
            assert_eq!(kind, "refused");
            assert_eq!(
                (data["channel"].as_str(), data["code"].as_str()),
                (Some("b"), Some("forbidden")),
                "{data}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Connected without b.
    assert!(
        matches!(both.next().await.unwrap(), Item::Control { kind, .. } if kind == "connected")
    );
    let a1 = client.publish("a", "a1", None, None).await.unwrap();
    let (_, data) = next_message(&mut both).await;
    let message: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        (message["channel"].as_str(), message["id"].as_str()),
        (Some("a"), Some(a1.id.as_str()))
    );
    // Every channel refused: an error, as for one channel.
    let mut none = client.follow_many(&[("b", None), ("c", None)]);
    assert!(matches!(none.next().await.unwrap(), Item::Control { kind, .. } if kind == "refused"));
    match none.next().await {
        Err(Error::Server(e)) => assert_eq!(e.code, "forbidden"),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}
