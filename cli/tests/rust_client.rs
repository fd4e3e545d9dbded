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
