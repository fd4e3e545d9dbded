//! A client that stops reading is cut off, not buffered forever.

use dormouse_testkit as support;

use std::time::Duration;

use dormouse_gateway::ByteSize;
use futures::StreamExt;
use support::{PATIENCE, TestServer};

/// A server whose subscriber queues are large enough that the queue bound is not what cuts
/// a slow client off.
async fn roomy_server(tweak: impl FnOnce(&mut dormouse_gateway::Settings)) -> TestServer {
    TestServer::start_with(|s| {
        s.limits.subscriber_queue = ByteSize::mib(256);
        tweak(s);
    })
    .await
}

/// A WebSocket subscriber that accepts messages of many MiB.
async fn subscriber(server: &TestServer, path: &str) -> support::WsClient {
    support::WsClient::try_connect_with(server, path, &[], Some(support::large_ws_config()))
        .await
        .unwrap()
}

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

/// A WebSocket subscriber that stops reading: the frames the server writes for it from the
/// publishing side fill its socket, the rest waits in the connection, and the connection is
/// closed once its writes have made no progress for the write timeout.
#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let server = roomy_server(|s| s.limits.write_timeout = Duration::from_millis(300)).await;
    let mut ws = subscriber(&server, "/v1/channels/stall-ws/ws").await;
    let chunk = "x".repeat(512 * 1024);
    for _ in 0..40 {
        server.publish("stall-ws", chunk.clone()).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut messages = 0;
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(message)) = ws.ws.next().await {
            if message.is_text() {
                messages += 1;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was never closed");
    assert!(
        messages < 40,
        "received all {messages} messages: the stalled client was not cut off"
    );
    let id = server.publish("stall-ws", "after").await;
    assert!(!id.is_empty());
    server.stop().await;
}

/// A WebSocket subscriber that falls behind for a while (its socket fills up) and then
/// reads gets every message whole and in order, with answers to its own publishes in
/// between: frames never interleave, whoever writes them.
#[tokio::test]
async fn a_late_websocket_reader_gets_every_frame_whole_and_in_order() {
    let server = roomy_server(|_| {}).await;
    let mut ws = subscriber(&server, "/v1/channels/late/ws").await;
    // Enough to fill the socket's buffers many times over: most of it is written while
    // the client is not reading.
    let total = 60;
    let publisher = {
        let client = server.client.clone();
        let url = server.url("/v1/channels/late/messages");
        tokio::spawn(async move {
            for n in 0..total {
                let body = format!("{n:04}:{}", "y".repeat(256 * 1024 + n * 997));
                let res = client.post(&url).body(body).send().await.unwrap();
                assert_eq!(res.status(), 201);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A publish of its own, so an ack frame from the connection's task is written among
    // the data frames.
    ws.send_json(serde_json::json!({"type": "publish", "data": "mine", "ref": 1}))
        .await;
    let mut seen = Vec::new();
    let mut acked = false;
    // The ack may come before or after the last message, depending on how far the
    // publisher got before the client's own publish: wait for both.
    while seen.len() < total + 1 || !acked {
        let message = ws.next().await.expect("the socket stays open");
        match message["type"].as_str() {
            Some("message") => {
                let data = message["data"].as_str().unwrap();
                if data == "mine" {
                    seen.push(usize::MAX);
                    continue;
                }
                let n: usize = data[..4].parse().unwrap();
                assert_eq!(
                    data.len(),
                    5 + 256 * 1024 + n * 997,
                    "message {n} arrived whole"
                );
                assert!(
                    data[5..].bytes().all(|b| b == b'y'),
                    "message {n} is intact"
                );
                seen.push(n);
            }
            Some("ack") => acked = true,
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
    publisher.await.unwrap();
    assert!(acked, "the client's own publish was acknowledged");
    let published: Vec<usize> = seen.iter().copied().filter(|&n| n != usize::MAX).collect();
    assert_eq!(
        published,
        (0..total).collect::<Vec<_>>(),
        "in order, none missing"
    );
    server.stop().await;
}

/// A burst that fills a WebSocket subscriber's socket while it is not reading, and then
/// nothing more: what the socket could not take at once still arrives as soon as the client
/// reads, not at the next ping or publish.
#[tokio::test]
async fn a_burst_larger_than_the_socket_arrives_without_further_traffic() {
    let server = roomy_server(|_| {}).await;
    let mut ws = subscriber(&server, "/v1/channels/burst/ws").await;
    // Several messages, the last one larger than the socket's buffers can take at once.
    let total = 4;
    for n in 0..total {
        let size = if n + 1 == total { 12 << 20 } else { 64 * 1024 };
        let body = format!("{n:04}:{}", "z".repeat(size));
        server.publish("burst", body).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Well under the 20 s ping interval: nothing else would push the rest out.
    let read_all = tokio::time::timeout(Duration::from_secs(5), async {
        let mut got = Vec::new();
        while got.len() < total {
            match ws.ws.next().await {
                Some(Ok(message)) if message.is_text() => {
                    let value: serde_json::Value =
                        serde_json::from_str(message.to_text().unwrap()).unwrap();
                    if value["type"] == "connected" {
                        continue;
                    }
                    let data = value["data"].as_str().unwrap().to_string();
                    got.push(data[..4].parse::<usize>().unwrap());
                }
                Some(Ok(_)) => {}
                other => panic!("the socket ended: {other:?}"),
            }
        }
        got
    })
    .await
    .expect("the rest of the burst never arrived");
    assert_eq!(read_all, (0..total).collect::<Vec<_>>());
    server.stop().await;
}
