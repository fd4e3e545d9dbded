//! A disconnect is owed even when the server dies: `kill -9` of the real binary with hooked
//! clients connected, then a start on the same data dir, and the backend hears every
//! disconnect, with the key it would have had, because the records were durable before the
//! clients were told they were connected. The same holds for the channels they occupied:
//! each is vacated after the restart.

use dormouse_testkit as support;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::json;
use support::upstream::{Answer, Upstream};
use support::{ChildServer, SseClient, WsClient};

/// The binary under test.
const DORMOUSE: &str = env!("CARGO_BIN_EXE_dormouse");
const SECRET: &str = "kill-nine-hook-secret-0123456789abcdef";

fn config(dir: &Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("dormouse.toml");
    let text = format!(
        "[[hooks]]\nname = \"app\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nchannels = [\"room:*\"]\n\
         events = [\"connect\", \"disconnect\", \"occupied\", \"vacated\"]\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn disconnects_and_vacated_channels_are_delivered_after_kill_9_with_their_keys() {
    let upstream = Upstream::start(SECRET, |_| Answer::Json(200, "{}".into())).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = config(dir.path(), &upstream.url());
    let vars = [("DORMOUSE_CONFIG", config.to_str().unwrap())];

    let server = ChildServer::start(Path::new(DORMOUSE), &data, &vars).await;
    let ws = WsClient::connect(&server, "/v1/channels/room:1/ws").await;
    let mut sse = SseClient::connect(&server, "/v1/channels/room:2/events", None).await;
    let mut owed = BTreeSet::from([
        ws.connection_id.clone().expect("an id"),
        sse.connection_id().await,
    ]);
    upstream.until("connect", 2).await;
    upstream.until("occupied", 2).await;
    server.kill();
    assert!(
        upstream.calls("disconnect").is_empty(),
        "nobody was left to send them yet"
    );

    let server = ChildServer::start(Path::new(DORMOUSE), &data, &vars).await;
    let delivered = upstream.until("disconnect", 2).await;
    for call in &delivered {
        let id = call.body["connection_id"].as_str().unwrap().to_string();
        assert_eq!(call.body["reason"], "server_restart", "{}", call.body);
        assert_eq!(call.idempotency_key, format!("{id}/disconnect"));
        assert!(owed.remove(&id), "one disconnect per connection: {id}");
    }
    assert!(owed.is_empty(), "not delivered: {owed:?}");
    assert_eq!(delivered[0].body["hook"], json!("app"));
    // The channels they occupied are vacated, numbered after their occupied.
    let mut vacated: Vec<String> = upstream
        .until("vacated", 2)
        .await
        .iter()
        .map(|c| c.idempotency_key.clone())
        .collect();
    vacated.sort();
    assert_eq!(vacated, ["room:1/vacated/2", "room:2/vacated/2"]);
    // Delivered and forgotten (the records go before the gauge falls): a second restart
    // owes nothing more.
    server
        .until_metric("dormouse_hook_disconnects_pending", 0.0)
        .await;
    drop(server);
    let again = ChildServer::start(Path::new(DORMOUSE), &data, &vars).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(upstream.calls("disconnect").len(), 2);
    drop(again);
}
