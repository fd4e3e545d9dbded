//! Many subscribers on one channel: every one of them receives the same events, in the same
//! order, with nothing missing and nothing extra.

use dormouse_testkit as support;

use std::time::Instant;

use futures::{StreamExt as _, stream};
use support::{PATIENCE, SseClient, TestServer, WsClient};

const SSE_CLIENTS: usize = 1000;
const WS_CLIENTS: usize = 1000;
const EVENTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sse_and_a_thousand_websocket_subscribers_receive_the_same_events_in_the_same_order()
 {
    // Each subscriber costs two descriptors here (client and server side of one socket).
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
    let needed = 2 * (SSE_CLIENTS + WS_CLIENTS) as u64 + 256;
    assert!(
        limit >= needed,
        "RLIMIT_NOFILE is {limit}, this test needs {needed}"
    );
    let started = Instant::now();
    let server = TestServer::start().await;
    let sse: Vec<SseClient> = stream::iter(0..SSE_CLIENTS)
        .map(|_| SseClient::connect(&server, "/v1/channels/crowd/events", None))
        .buffer_unordered(64)
        .collect()
        .await;
    let ws: Vec<WsClient> = stream::iter(0..WS_CLIENTS)
        .map(|_| WsClient::connect(&server, "/v1/channels/crowd/ws"))
        .buffer_unordered(64)
        .collect()
        .await;
    let connected = started.elapsed();
    let info = server.get_json("/v1/channels/crowd", 200).await;
    assert_eq!(info["subscribers"], SSE_CLIENTS + WS_CLIENTS, "{info}");

    let mut expected = Vec::new();
    for i in 0..EVENTS {
        let data = format!("event {i}\nof {EVENTS}");
        let id = server.publish("crowd", data.clone()).await;
        expected.push((id, data));
    }

    let mut readers = Vec::new();
    for mut client in sse {
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..EVENTS {
                let event = client.next().await.expect("SSE event");
                assert_eq!(event.event, "message");
                got.push((event.id.expect("id"), event.data));
            }
            got
        }));
    }
    for mut client in ws {
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..EVENTS {
                let message = client.next().await.expect("WebSocket message");
                assert_eq!(message["type"], "message", "{message}");
                assert_eq!(message["event"], "message", "{message}");
                got.push((
                    message["id"].as_str().expect("id").to_string(),
                    message["data"].as_str().expect("data").to_string(),
                ));
            }
            got
        }));
    }
    for (n, reader) in readers.into_iter().enumerate() {
        let got = tokio::time::timeout(PATIENCE, reader)
            .await
            .expect("subscriber finished in time")
            .expect("reader task");
        assert_eq!(got, expected, "subscriber {n}");
    }
    eprintln!(
        "{} subscribers connected in {connected:?}; all received {EVENTS} events after {:?}",
        SSE_CLIENTS + WS_CLIENTS,
        started.elapsed()
    );
    server.stop().await;
}
