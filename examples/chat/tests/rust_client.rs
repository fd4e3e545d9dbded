//! The Rust client's object socket (`dormouse-client`'s `websocket` feature) in a chat
//! room: it talks to the room, comes back by itself after a server restart (sending what
//! was said while it was down), and an unknown object is refused at once with its code.

use std::time::Duration;

use dormouse_client::http::{Client, Error, Item, ObjectMessage, ObjectSocket, parse_base_url};
use dormouse_runtime::NamespaceConfig;
use dormouse_testkit::{PATIENCE, TestServer};
use example_chat::{NAMESPACE, Room};
use serde_json::{Value, json};

/// The room's next JSON message, skipping reconnection notices.
async fn next(room: &mut ObjectSocket) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Item::Message(ObjectMessage::Text(text)) = room.next().await.unwrap() {
                return serde_json::from_str(&text).unwrap();
            }
        }
    })
    .await
    .expect("a message in time")
}

/// The next message of `kind`.
async fn next_of(room: &mut ObjectSocket, kind: &str) -> Value {
    loop {
        let message = next(room).await;
        if message["type"] == kind {
            return message;
        }
    }
}

#[tokio::test]
async fn an_object_socket_talks_to_a_room_and_comes_back_after_a_restart() {
    let mut server = TestServer::start_mounted(|server| {
        server
            .mount::<Room>(
                NAMESPACE,
                NamespaceConfig::with_idle_timeout(Duration::from_secs(5)),
                (),
            )
            .expect("mount the rooms");
    })
    .await;
    let client = Client::new(parse_base_url(&server.url("")).unwrap(), None, "test").unwrap();

    let mut unknown = client.object("no-such-namespace", "lobby", "ws", &[]);
    match unknown.next().await {
        Err(Error::Server(e)) => assert_eq!(e.status.as_u16(), 404, "{e}"),
        other => panic!("{other:?}"),
    }

    // A room turns away a join without a name: it says why, and the close is final (no
    // reconnecting to be turned away again).
    let mut nameless = client.object(NAMESPACE, "lobby", "ws", &[]);
    assert_eq!(next(&mut nameless).await["type"], "error");
    match tokio::time::timeout(PATIENCE, nameless.next())
        .await
        .unwrap()
    {
        Err(Error::Closed { code: 1000, .. }) => {}
        other => panic!("{other:?}"),
    }

    let mut ada = client.object(NAMESPACE, "lobby", "ws", &[("name", "ada")]);
    let welcome = next_of(&mut ada, "welcome").await;
    assert_eq!(welcome["members"], json!(["ada"]));
    ada.send_text(json!({"type": "message", "text": "before"}).to_string());
    let said = next_of(&mut ada, "message").await;
    assert_eq!(said["text"], "before");

    server = server.restart_in_place(|_| {}).await;
    // Said while the socket is down (it saw the restart's close): queued, sent once it is
    // back.
    tokio::time::timeout(PATIENCE, async {
        while !matches!(ada.next().await.unwrap(), Item::Lost { .. }) {}
    })
    .await
    .expect("the restart noticed");
    ada.send_text(json!({"type": "message", "text": "after"}).to_string());
    let mut reconnected = false;
    let welcome = tokio::time::timeout(PATIENCE, async {
        loop {
            match ada.next().await.unwrap() {
                Item::Reconnected => reconnected = true,
                Item::Message(ObjectMessage::Text(text)) => {
                    let message: Value = serde_json::from_str(&text).unwrap();
                    if message["type"] == "welcome" {
                        return message;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("welcomed again");
    assert!(reconnected);
    let history: Vec<&str> = welcome["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(history.contains(&"before"), "{welcome}");
    assert_eq!(next_of(&mut ada, "message").await["text"], "after");

    ada.close().await;
    assert!(matches!(
        ada.next().await,
        Err(Error::Closed { code: 1000, .. })
    ));
    server.stop().await;
}
