//! A client that stops reading is cut off, not buffered forever.

mod support;

use std::time::Duration;

use dormouse_gateway::ByteSize;
use futures::StreamExt;
use support::{PATIENCE, TestServer};

#[tokio::test]
async fn an_sse_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let server = TestServer::start_with(|s| {
        s.limits.write_timeout = Duration::from_millis(300);
        // Large enough that the queue bound is not what cuts the client off.
        s.limits.subscriber_queue = ByteSize::mib(256);
    })
    .await;
    let res = server
        .client
        .get(server.url("/v1/channels/stall/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let chunk = "x".repeat(512 * 1024);
    let total = 40 * chunk.len();
    for _ in 0..40 {
        server.publish("stall", chunk.clone()).await;
    }
    // Stay away long enough for the server's writes to stall past the timeout.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stream = res.bytes_stream();
    let mut received = 0usize;
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => received += bytes.len(),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was never closed");
    assert!(
        received < total,
        "received {received} of {total} bytes: the stalled client was not cut off"
    );
    // The server is fine and the channel goes on.
    let id = server.publish("stall", "after").await;
    assert!(!id.is_empty());
    server.stop().await;
}
