//! Abuse limits over the wire: connections per IP and in total, oversized request targets
//! and headers, publish rates per address and per credential (HTTP, batch, WebSocket), and
//! shedding under overload.

use dormouse_testkit as support;

use std::time::Duration;

use dormouse_gateway::ApiKeySettings;
use serde_json::json;
use support::{SseClient, TestServer, WsClient, error_of};

/// (status, code, Retry-After) of an error answer.
async fn refusal(res: reqwest::Response) -> (u16, String, Option<u64>) {
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let (status, code, _) = error_of(res).await;
    (status, code, retry)
}

#[tokio::test]
async fn connections_beyond_the_per_ip_and_total_limits_get_a_503() {
    let server = TestServer::start_with(|s| s.limits.max_connections_per_ip = 4).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(SseClient::connect(&server, "/v1/channels/c/events", None).await);
    }
    // The fourth place: the test's publishing connection, kept alive in its pool.
    let id = server.publish("c", "still here").await;
    // A fresh client, so no pooled connection is reused.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let res = fresh().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(
        refusal(res).await,
        (503, "too_many_connections".to_string(), Some(5))
    );
    // Existing subscribers are unaffected.
    for sse in &mut open {
        assert_eq!(sse.next().await.unwrap().id.as_deref(), Some(id.as_str()));
    }
    // A closed connection frees its place.
    drop(open.pop());
    let mut admitted = false;
    for _ in 0..100 {
        if fresh()
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        admitted,
        "a place freed by a closed connection is given to a new one"
    );
    drop(open);
    server.stop().await;

    let server = TestServer::start_with(|s| s.limits.max_connections = 1).await;
    let _held = SseClient::connect(&server, "/v1/channels/c/events", None).await;
    let res = fresh().get(server.url("/healthz")).send().await.unwrap();
    let (status, code, _) = refusal(res).await;
    assert_eq!((status, code.as_str()), (503, "too_many_connections"));
    drop(_held);
    server.stop().await;
}

#[tokio::test]
async fn oversized_targets_and_headers_are_refused_precisely() {
    let server = TestServer::start().await;
    let long = "a".repeat(9 * 1024);
    let res = server
        .client
        .get(server.url(&format!("/v1/channels/c/messages?after={long}")))
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (414, "url_too_long"));
    assert!(message.contains("limits.max_url_size"), "{message}");

    let mut req = server.client.get(server.url("/v1/channels/c/messages"));
    for i in 0..40 {
        req = req.header(format!("x-filler-{i}"), "f".repeat(1000));
    }
    let (status, code, message) = error_of(req.send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (431, "headers_too_large"));
    assert!(message.contains("limits.max_header_size"), "{message}");

    // And the server keeps serving.
    server.publish("c", "fine").await;
    server.stop().await;
}

#[tokio::test]
async fn publishers_over_their_rate_get_429_with_retry_after() {
    let server = TestServer::start_with(|s| {
        s.limits.publish_rate_per_ip = 5;
    })
    .await;
    let post = |data: &'static str| {
        server
            .client
            .post(server.url("/v1/channels/r/messages"))
            .body(data)
            .send()
    };
    for _ in 0..5 {
        assert_eq!(post("ok").await.unwrap().status(), 201);
    }
    let (status, code, retry) = refusal(post("too fast").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert_eq!(retry, Some(1));
    // A batch counts each message; over the rate, none of it is published.
    let res = server
        .client
        .post(server.url("/v1/publish"))
        .json(&json!([{"channel": "r", "data": "1"}, {"channel": "r", "data": "2"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(res).await.0, 429);
    // A batch of more messages than the burst could never pass: 413, naming the setting.
    let six: Vec<_> = (0..6)
        .map(|i| json!({"channel": "r", "data": i.to_string()}))
        .collect();
    let res = server
        .client
        .post(server.url("/v1/publish"))
        .json(&six)
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    assert!(message.contains("limits.publish_burst"), "{message}");
    // WebSocket publishes share the budget of the address.
    let mut ws = WsClient::connect(&server, "/v1/channels/r/ws").await;
    ws.send_json(json!({"type": "publish", "data": "x", "ref": 1}))
        .await;
    let got = ws.next().await.unwrap();
    assert_eq!(
        (got["type"].as_str(), got["code"].as_str()),
        (Some("error"), Some("rate_limited")),
        "{got}"
    );
    // The budget refills at the rate.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(post("later").await.unwrap().status(), 201);
    let history = server.history("r", "").await;
    assert_eq!(history["events"].as_array().unwrap().len(), 6, "{history}");
    server.stop().await;

    // Per credential: two keys, each with its own budget, whatever their address.
    let server = TestServer::start_with(|s| {
        s.limits.publish_rate_per_credential = 2;
        s.auth.api_keys = ["key-one-0123456789", "key-two-0123456789"]
            .iter()
            .map(|k| ApiKeySettings {
                publish: vec!["*".to_string()],
                ..ApiKeySettings::new(*k, *k)
            })
            .collect();
    })
    .await;
    let post = |key: &'static str| {
        server
            .client
            .post(server.url("/v1/channels/k/messages"))
            .bearer_auth(key)
            .body("m")
            .send()
    };
    for _ in 0..2 {
        assert_eq!(post("key-one-0123456789").await.unwrap().status(), 201);
    }
    let (status, code, _) = refusal(post("key-one-0123456789").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert_eq!(post("key-two-0123456789").await.unwrap().status(), 201);
    server.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_inflight_limit_are_shed_and_subscribers_keep_receiving() {
    let server = TestServer::start_with(|s| s.limits.max_inflight_requests = 1).await;
    // Subscribers' streams do not count once they are open.
    let mut sse = SseClient::connect(&server, "/v1/channels/o/events", None).await;
    // One publish whose body never finishes holds the only slot.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(b"partial".to_vec())).unwrap();
    let slow = tokio::spawn(
        server
            .client
            .post(server.url("/v1/channels/o/messages"))
            .body(reqwest::Body::wrap_stream(rx))
            .send(),
    );
    let mut shed = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let res = server
            .client
            .post(server.url("/v1/channels/o/messages"))
            .body("fast")
            .send()
            .await
            .unwrap();
        if res.status() == 503 {
            shed = Some(refusal(res).await);
            break;
        }
    }
    assert_eq!(shed, Some((503, "overloaded".to_string(), Some(1))));
    // Finish the slow one: it is published and the subscriber receives it.
    tx.unbounded_send(Ok(b" body".to_vec())).unwrap();
    drop(tx);
    let res = slow.await.unwrap().unwrap();
    assert_eq!(res.status(), 201);
    let event = sse.next().await.unwrap();
    assert_eq!(event.data, "partial body");
    server.stop().await;
}

#[tokio::test]
async fn a_full_channel_refuses_new_subscribers_until_one_leaves() {
    let server = TestServer::start_with(|s| s.limits.max_subscribers_per_channel = 2).await;
    let first = SseClient::connect(&server, "/v1/channels/full/events", None).await;
    let mut second = SseClient::connect(&server, "/v1/channels/full/events", None).await;
    let res = server
        .client
        .get(server.url("/v1/channels/full/events"))
        .send()
        .await
        .unwrap();
    let retry = res.headers().get("retry-after").cloned();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (503, "channel_full"));
    assert!(
        message.contains("limits.max_subscribers_per_channel"),
        "{message}"
    );
    assert_eq!(retry.unwrap(), "5");
    // Other channels are not affected, and the subscribers keep receiving.
    let _other = SseClient::connect(&server, "/v1/channels/other/events", None).await;
    let id = server.publish("full", "x").await;
    assert_eq!(
        second.next().await.unwrap().id.as_deref(),
        Some(id.as_str())
    );
    // A subscriber that leaves frees its place.
    drop(first);
    let mut admitted = false;
    for _ in 0..100 {
        let res = server
            .client
            .get(server.url("/v1/channels/full/events"))
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_trickles_its_request_head_is_disconnected() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server =
        TestServer::start_with(|s| s.limits.header_read_timeout = Duration::from_millis(300)).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // The server ends the connection (an error or EOF both mean it is gone) well before
    // the test's patience runs out; the client never finished its head.
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
        .await
        .expect("the server closed the connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A complete request on another connection is served as usual.
    let res = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    server.stop().await;
}
