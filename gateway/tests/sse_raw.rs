//! SSE at the byte level: a subscription is served outside hyper (`conn::raw_sse`) when it opens
//! its connection or follows other requests on it, so these check the exact bytes a client
//! sees there, that a connection hyper keeps still serves subscriptions, and that a
//! subscriber who closes its socket is let go at once rather than at the next write.

use dormouse_testkit as support;

use std::time::Duration;

use serde_json::Value;
use support::{PATIENCE, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads from `stream` until `needle` has been seen; returns everything read.
async fn read_until(stream: &mut TcpStream, seen: &mut Vec<u8>, needle: &str) {
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(seen).contains(needle) {
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {needle:?}; got {}",
                String::from_utf8_lossy(seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {}", String::from_utf8_lossy(seen)));
}

async fn subscribers(server: &TestServer, channel: &str) -> u64 {
    let info = server
        .get_json(&format!("/v1/channels/{channel}"), 200)
        .await;
    info["subscribers"].as_u64().unwrap_or(0)
}

/// Waits until `channel` has no subscriber left.
async fn until_no_subscribers(server: &TestServer, channel: &str) {
    tokio::time::timeout(PATIENCE, async {
        while subscribers(server, channel).await != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{channel} still has a subscriber"));
}

#[tokio::test]
async fn a_first_request_subscription_streams_close_delimited_events() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/channels/raw/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;
    let text = String::from_utf8_lossy(&seen).to_string();
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");

    let id = server.publish("raw", "over raw tcp").await;
    read_until(&mut stream, &mut seen, "data: over raw tcp\n\n").await;
    assert!(String::from_utf8_lossy(&seen).contains(&format!("id: {id}\n")));
}

#[tokio::test]
async fn an_error_on_a_first_request_subscription_is_a_complete_json_answer() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/channels/raw/events HTTP/1.1\r\nLast-Event-ID: nonsense\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(answer).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    let error: Value = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["code"], "bad_event_id", "{body}");
}

/// Sends `request` on `stream` and reads its whole `Content-Length` answer.
async fn ask(stream: &mut TcpStream, request: &[u8]) -> (String, String) {
    stream.write_all(request).await.unwrap();
    read_answer(stream).await
}

/// Reads one whole `Content-Length` answer off `stream`; returns its head and body.
async fn read_answer(stream: &mut TcpStream) -> (String, String) {
    let mut seen = Vec::new();
    read_until(stream, &mut seen, "\r\n\r\n").await;
    let text = String::from_utf8_lossy(&seen).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = body.as_bytes().to_vec();
    while body.len() < length {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed inside a body");
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body.len(), length, "nothing after the answer");
    (head.to_ascii_lowercase(), String::from_utf8(body).unwrap())
}

/// Browsers may send an `EventSource`'s request on a pooled keep-alive connection, and
/// proxies with upstream keep-alive do: hyper gives such a connection back, and the
/// subscription is served as a first request is (close-delimited, written directly).
#[tokio::test]
async fn a_subscription_after_other_requests_is_taken_back_from_hyper() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let (head, body) = ask(&mut stream, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 200 ok"), "{head}");
    assert!(!head.contains("connection: close"), "kept alive: {head}");
    assert!(body.contains("ok"), "{body}");
    let (head, body) = ask(
        &mut stream,
        b"POST /v1/channels/kept/messages HTTP/1.1\r\nHost: x\r\n\
          Content-Length: 6\r\n\r\nbefore",
    )
    .await;
    assert!(head.starts_with("http/1.1 201"), "{head}");
    let before: Value = serde_json::from_str(&body).unwrap();
    let before = before["id"].as_str().unwrap().to_string();

    let request = format!(
        "GET /v1/channels/kept/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {before}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;
    let text = String::from_utf8_lossy(&seen).to_string();
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        head.contains("connection: close"),
        "served outside hyper: {head}"
    );
    assert!(
        !head.contains("transfer-encoding"),
        "not chunked by hyper: {head}"
    );
    let id = server.publish("kept", "after the handover").await;
    read_until(
        &mut stream,
        &mut seen,
        &format!("id: {id}\nevent: message\ndata: after the handover\n\n"),
    )
    .await;
    assert_eq!(subscribers(&server, "kept").await, 1);
    // Its close is noticed at once, as a first request's is.
    drop(stream);
    until_no_subscribers(&server, "kept").await;
    server.stop().await;
}

/// hyper holds on to a requested upgrade (and would hand it the socket at the end), so a
/// connection that asked for one, even refused, keeps being served by hyper: a subscription
/// on it still works, chunked.
#[tokio::test]
async fn a_connection_that_asked_for_an_upgrade_stays_with_hyper() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let (head, body) = ask(
        &mut stream,
        b"GET /v1/channels/kept/ws?last_event_id=nope HTTP/1.1\r\nHost: x\r\n\
          Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(body.contains("bad_event_id"), "{body}");
    stream
        .write_all(b"GET /v1/channels/kept/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    server.publish("kept", "via hyper").await;
    read_until(&mut stream, &mut seen, "data: via hyper\n\n").await;
    server.stop().await;
}

/// A stream of several channels that hyper serves (the connection asked for an upgrade
/// first) is written by its task, which writes the stream's cursor as each event's id as
/// the direct writer does.
#[tokio::test]
async fn a_stream_of_several_channels_served_by_hyper_writes_its_cursor_too() {
    let server = TestServer::start().await;
    let before = server.publish("one", "before").await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let (head, _) = ask(
        &mut stream,
        b"GET /v1/channels/one/ws?last_event_id=nope HTTP/1.1\r\nHost: x\r\n\
          Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    stream
        .write_all(b"GET /v1/events?channel=one&channel=two HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    let id = server.publish("two", "via hyper").await;
    read_until(
        &mut stream,
        &mut seen,
        &format!("id: {before},{id}\nevent: message\n"),
    )
    .await;
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(
        !text.contains(":two "),
        "the tag line is not written: {text}"
    );
    server.stop().await;
}

/// A stop closes an idle kept-alive connection (hyper's graceful shutdown, started by the
/// server's stop signal) rather than waiting for the client.
#[tokio::test]
async fn a_stop_closes_an_idle_kept_alive_connection() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let (head, _) = ask(&mut stream, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 200 ok"), "{head}");
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("the server stopped with an idle connection open");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("the connection was closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without another answer");
}

#[tokio::test]
async fn a_subscriber_that_closes_its_socket_is_dropped_at_once() {
    let server = TestServer::start_with(|s| {
        // No keep-alive write for a long time: only noticing the close can drop it.
        s.sse.keepalive = Duration::from_secs(3600);
    })
    .await;
    server.publish("leaving", "x").await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/channels/leaving/events HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;
    assert_eq!(subscribers(&server, "leaving").await, 1);
    drop(stream);
    // Dropped without waiting for a write to fail.
    until_no_subscribers(&server, "leaving").await;
}

#[tokio::test]
async fn a_subscription_head_sent_in_pieces_is_still_served() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    for piece in [
        "GET /v1/channels/slow/ev",
        "ents HTTP/1.1\r\nHo",
        "st: x\r\n",
        "\r\n",
    ] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;
    server.publish("slow", "in pieces").await;
    read_until(&mut stream, &mut seen, "data: in pieces\n\n").await;
}

/// Events of a first-request subscription are written straight to its socket by whichever
/// thread released them, while its own task writes the keep-alives. Here the client reads
/// nothing while 15 MB are published, so the socket fills and writes stop part-way through
/// an event; with a keep-alive due every millisecond, the bytes must still come out as
/// whole events, in the channel's order, with comments only between them.
#[tokio::test]
async fn directly_written_events_and_keep_alives_never_interleave() {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 60;
    const PAD: usize = 60_000;
    let server = TestServer::start_with(|s| {
        s.sse.keepalive = Duration::from_millis(1);
        // Room for everything unread, so the subscriber is not cut off as slow.
        s.limits.subscriber_queue = dormouse_gateway::ByteSize(64 << 20);
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/channels/woven/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, ": connected").await;

    let publishing: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let client = server.client.clone();
            let url = server.url("/v1/channels/woven/messages");
            tokio::spawn(async move {
                for i in 0..EACH {
                    let body = format!("p{p}-{i}:{}", "x".repeat(PAD + i));
                    let res = client.post(&url).body(body).send().await.unwrap();
                    assert_eq!(res.status(), 201);
                }
            })
        })
        .collect();
    tokio::time::timeout(PATIENCE, async {
        for task in publishing {
            task.await.unwrap();
        }
    })
    .await
    .expect("every publish is answered");
    // Every event ends with a blank line; read until all of them have.
    let events_done = |seen: &[u8]| {
        let text = String::from_utf8_lossy(seen);
        text.matches("\nevent: message\n").count() == PUBLISHERS * EACH && text.ends_with("\n\n")
    };
    tokio::time::timeout(PATIENCE, async {
        while !events_done(&seen) {
            let mut buf = vec![0u8; 1 << 16];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("every event arrives");

    let text = String::from_utf8(seen).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let mut seqs = Vec::new();
    let mut next_of = [0usize; PUBLISHERS];
    let mut comments = 0;
    for block in body.trim_end_matches('\n').split("\n\n") {
        if block.starts_with(':') {
            // `: connected` (with its retry line) or a keep-alive; nothing else.
            assert!(
                block == ": keep-alive" || block.starts_with(": connected\nretry: "),
                "a comment block with more in it: {block:.80?}"
            );
            comments += 1;
            continue;
        }
        if block.starts_with("event: dormouse.connected\n") {
            continue;
        }
        let lines: Vec<&str> = block.split('\n').collect();
        assert_eq!(lines.len(), 3, "an event cut or mixed: {block:.120?}");
        let id = lines[0].strip_prefix("id: ").expect("id line");
        assert_eq!(lines[1], "event: message", "{block:.120?}");
        let data = lines[2].strip_prefix("data: ").expect("data line");
        let (tag, pad) = data.split_once(':').expect("tag");
        let (p, i) = tag[1..].split_once('-').unwrap();
        let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next_of[p], "publisher {p}'s messages in order");
        assert_eq!(pad.len(), PAD + i, "whole payload of {tag}");
        next_of[p] += 1;
        seqs.push(id.rsplit_once('-').unwrap().1.parse::<u64>().unwrap());
    }
    assert_eq!(next_of, [EACH; PUBLISHERS], "every message once");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "consecutive ids");
    assert!(comments > 1, "keep-alives were written among the events");
}

/// HTTP/2 with prior knowledge (h2c) is told apart by its preface and served by hyper's
/// HTTP/2 connection: plain requests answer, and a subscription streams its events (HTTP/2
/// multiplexes, so it stays in hyper).
#[tokio::test]
async fn http2_with_prior_knowledge_serves_requests_and_subscriptions() {
    let server = TestServer::start().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let get = |path: &str| {
        http::Request::get(format!("http://{}{path}", server.addr))
            .body(())
            .unwrap()
    };

    let (answer, _) = client.send_request(get("/healthz"), true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), http::Version::HTTP_2);
    let mut body = answer.into_body();
    let mut text = Vec::new();
    while let Some(data) = body.data().await {
        text.extend_from_slice(&data.unwrap());
    }
    assert!(String::from_utf8_lossy(&text).contains("ok"));

    let mut client = client.ready().await.unwrap();
    let (answer, _) = client
        .send_request(get("/v1/channels/over-h2/events"), true)
        .unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let mut body = answer.into_body();
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(&seen).contains(": connected") {
            seen.extend_from_slice(&body.data().await.unwrap().unwrap());
        }
    })
    .await
    .expect("the stream opened");
    let id = server.publish("over-h2", "multiplexed").await;
    let want = format!("id: {id}\nevent: message\ndata: multiplexed\n\n");
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(&seen).contains(&want) {
            let data = body.data().await.unwrap().unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            seen.extend_from_slice(&data);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event in {}", String::from_utf8_lossy(&seen)));
    assert_eq!(subscribers(&server, "over-h2").await, 1);
    server.stop().await;
}
