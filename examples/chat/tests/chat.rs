//! Chat over the wire: real WebSocket clients against a real server.

mod support;

use std::time::Duration;

use dormouse_runtime::NamespaceConfig;
use dormouse_testkit::TestServer;
use example_chat::{NAMESPACE, Room};
use futures::SinkExt;
use serde_json::{Value, json};
use support::{Ws, next, say};
use tokio_tungstenite::tungstenite::Message;

async fn start(idle: Duration) -> TestServer {
    TestServer::start_mounted(move |server| {
        server
            .mount::<Room>(NAMESPACE, NamespaceConfig::with_idle_timeout(idle), ())
            .expect("mount the rooms");
    })
    .await
}

async fn join(server: &TestServer, room: &str, name: &str) -> (Ws, Value) {
    let url = format!(
        "ws://{}/v1/objects/{NAMESPACE}/{room}/ws?name={name}",
        server.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let welcome = next(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

#[tokio::test]
async fn people_chat_and_presence_and_history_survive_hibernation() {
    let server = start(Duration::from_millis(50)).await;
    let (mut alice, welcome) = join(&server, "lobby", "alice").await;
    assert_eq!(welcome["members"], json!(["alice"]));
    assert_eq!(welcome["history"], json!([]));

    let (mut bob, welcome) = join(&server, "lobby", "bob").await;
    assert_eq!(welcome["members"], json!(["alice", "bob"]));
    assert_eq!(
        next(&mut alice).await,
        json!({"type": "join", "name": "bob"})
    );

    say(&mut alice, "hi bob").await;
    for ws in [&mut alice, &mut bob] {
        let m = next(ws).await;
        assert_eq!(
            (
                m["type"].as_str(),
                m["name"].as_str(),
                m["text"].as_str(),
                m["id"].as_u64()
            ),
            (Some("message"), Some("alice"), Some("hi bob"), Some(1))
        );
    }

    // Let the room hibernate with both still connected.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let members = server
        .get_json(&format!("/v1/objects/{NAMESPACE}/lobby/members"), 200)
        .await;
    assert_eq!(
        members["members"],
        json!(["alice", "bob"]),
        "presence survived hibernation"
    );

    // A message from a parked socket wakes the room; attachments (names) are intact.
    say(&mut bob, "still here").await;
    for ws in [&mut alice, &mut bob] {
        let m = next(ws).await;
        assert_eq!(
            (m["name"].as_str(), m["text"].as_str(), m["id"].as_u64()),
            (Some("bob"), Some("still here"), Some(2))
        );
    }

    let (mut carol, welcome) = join(&server, "lobby", "carol").await;
    assert_eq!(welcome["members"], json!(["alice", "bob", "carol"]));
    let texts: Vec<&str> = welcome["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hi bob", "still here"]);
    for ws in [&mut alice, &mut bob] {
        assert_eq!(next(ws).await, json!({"type": "join", "name": "carol"}));
    }

    alice.close(None).await.unwrap();
    assert_eq!(
        next(&mut bob).await,
        json!({"type": "leave", "name": "alice"})
    );
    assert_eq!(
        next(&mut carol).await,
        json!({"type": "leave", "name": "alice"})
    );

    // A bad message gets an error and the connection stays usable.
    bob.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(next(&mut bob).await["type"], "error");
    say(&mut bob, "ok").await;
    assert_eq!(next(&mut carol).await["text"], "ok");

    server.stop().await;
}

#[tokio::test]
async fn the_page_is_served_and_a_nameless_join_is_refused() {
    let server = start(Duration::from_secs(30)).await;
    let res = reqwest::get(format!(
        "http://{}/v1/objects/{NAMESPACE}/lobby",
        server.addr
    ))
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = res.text().await.unwrap();
    assert!(
        page.contains("dormouse.js"),
        "the page talks through the client"
    );
    let client = reqwest::get(format!(
        "http://{}/v1/objects/{NAMESPACE}/lobby/dormouse.js",
        server.addr
    ))
    .await
    .unwrap();
    assert_eq!(client.status(), 200);
    assert!(
        client.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(
        client
            .text()
            .await
            .unwrap()
            .contains("export class Dormouse")
    );

    let url = format!("ws://{}/v1/objects/{NAMESPACE}/lobby/ws", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let refused = next(&mut ws).await;
    assert_eq!(refused["type"], "error");
    assert!(refused["message"].as_str().unwrap().contains("?name="));
    assert_eq!(next(&mut ws).await["type"], "closed");

    server.stop().await;
}

/// The page in a browser: headless Chromium joins through the JavaScript client, sees a
/// second person (a plain WebSocket) come in, and the two talk both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_chats_in_a_browser_through_the_javascript_client() {
    use dormouse_testkit::browser::Browser;
    let server = start(Duration::from_secs(30)).await;
    let browser = Browser::launch().await;
    let url = format!("http://{}/v1/objects/{NAMESPACE}/lobby", server.addr);
    let mut page = browser.open(&url).await;
    // The page's script has its client once it names the room.
    page.until(
        "the page's script",
        "document.getElementById('room').textContent",
        |v| v == "#lobby",
    )
    .await;
    page.eval(
        r#"document.getElementById("name").value = "ann";
           document.getElementById("join").requestSubmit(); true"#,
    )
    .await;
    page.until(
        "ann connected",
        "document.getElementById('status').textContent",
        |v| v == "connected as ann",
    )
    .await;
    let (mut bob, welcome) = join(&server, "lobby", "bob").await;
    assert_eq!(welcome["members"], json!(["ann", "bob"]), "{welcome}");
    page.until(
        "bob in the list",
        "document.getElementById('members').innerText",
        |v| v.as_str().is_some_and(|t| t.contains("bob")),
    )
    .await;
    page.eval(
        r#"document.getElementById("text").value = "hello from the page";
           document.getElementById("say").requestSubmit(); true"#,
    )
    .await;
    let heard = next(&mut bob).await;
    assert_eq!(
        (&heard["type"], &heard["name"], &heard["text"]),
        (
            &json!("message"),
            &json!("ann"),
            &json!("hello from the page")
        ),
        "{heard}"
    );
    say(&mut bob, "hi ann").await;
    page.until(
        "bob's answer",
        "document.getElementById('log').innerText",
        |v| v.as_str().is_some_and(|t| t.contains("bob: hi ann")),
    )
    .await;
    browser.close().await;
    server.stop().await;
}
