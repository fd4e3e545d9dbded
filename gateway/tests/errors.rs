//! Bad input gets the documented JSON error (exact status, code and a message that says what
//! was wrong), and the server keeps serving afterwards.

use dormouse_testkit as support;

use std::convert::Infallible;

use bytes::Bytes;
use dormouse_gateway::ByteSize;
use futures::StreamExt as _;
use serde_json::{Value, json};
use support::{SseClient, TestServer, error_of, ws_handshake_error};

const NAME_RULE: &str = "channel names are 1 to 200 characters from A-Z a-z 0-9 _ - . : @ =";

/// The server still publishes and reads back after the bad requests.
async fn still_serving(server: &TestServer, channel: &str) {
    let id = server.publish(channel, "still here").await;
    let page = server.history(channel, "").await;
    let events = page["events"].as_array().expect("events");
    let last = events.last().expect("an event");
    assert_eq!(
        (&last["id"], &last["data"]),
        (&json!(id), &json!("still here"))
    );
}

#[tokio::test]
async fn bad_channel_names_are_400_on_every_route() {
    let server = TestServer::start().await;
    let long = "x".repeat(201);
    let cases: Vec<(reqwest::Method, String, String)> = vec![
        (
            reqwest::Method::POST,
            "/v1/channels/a%20b/messages".into(),
            format!("{NAME_RULE}; got ' ' in \"a b\""),
        ),
        (
            reqwest::Method::GET,
            "/v1/channels/a%20b/messages".into(),
            format!("{NAME_RULE}; got ' ' in \"a b\""),
        ),
        (
            reqwest::Method::GET,
            "/v1/channels/a%20b/events".into(),
            format!("{NAME_RULE}; got ' ' in \"a b\""),
        ),
        (
            reqwest::Method::GET,
            "/v1/channels/a%20b".into(),
            format!("{NAME_RULE}; got ' ' in \"a b\""),
        ),
        (
            reqwest::Method::DELETE,
            "/v1/channels/a%20b".into(),
            format!("{NAME_RULE}; got ' ' in \"a b\""),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/channels/{long}/messages"),
            format!("{NAME_RULE}; got 201 characters"),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/channels/{long}/events"),
            format!("{NAME_RULE}; got 201 characters"),
        ),
        // An empty name reaches the handler on the SSE fast path as through the router.
        (
            reqwest::Method::GET,
            "/v1/channels//events".into(),
            format!("{NAME_RULE}; got 0 characters"),
        ),
        (
            reqwest::Method::POST,
            "/channel/caf%C3%A9/messages".into(),
            format!("{NAME_RULE}; got 'é' in \"café\""),
        ),
        (
            reqwest::Method::GET,
            "/sub?channel=a/b".into(),
            format!("{NAME_RULE}; got '/' in \"a/b\""),
        ),
    ];
    for (method, path, message) in cases {
        let res = server
            .client
            .request(method.clone(), server.url(&path))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(res).await,
            (400, "bad_channel_name".to_string(), message),
            "{method} {path}"
        );
    }
    let (status, code, _) = ws_handshake_error(&server, "/v1/channels/a%20b/ws", &[]).await;
    assert_eq!((status, code.as_str()), (400, "bad_channel_name"));

    // 200 characters is fine.
    still_serving(&server, &"x".repeat(200)).await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_cursors_are_400_bad_event_id_on_sse_ws_and_history() {
    let server = TestServer::start().await;
    let good = server.publish("cursors", "one").await;
    let malformed = |what: &str, raw: &str| format!("{what}: malformed event id \"{raw}\"");

    // SSE: header, then query.
    for raw in ["nope", "123", "ab-", "AB-1", "a-1-2"] {
        let res = SseClient::try_connect(
            &server,
            "/v1/channels/cursors/events",
            &[("Last-Event-ID", raw.as_bytes())],
        )
        .await
        .expect_err("refused");
        let (status, code, message) = error_of(res).await;
        assert_eq!((status, code.as_str()), (400, "bad_event_id"), "{raw}");
        assert!(
            message.starts_with(&malformed("Last-Event-ID", raw)),
            "{raw}: {message}"
        );
    }
    let res = SseClient::try_connect(
        &server,
        "/v1/channels/cursors/events",
        &[("Last-Event-ID", b"caf\xc3\xa9")],
    )
    .await
    .expect_err("refused");
    assert_eq!(
        error_of(res).await,
        (
            400,
            "bad_event_id".to_string(),
            "Last-Event-ID must be ASCII text".to_string()
        )
    );
    let res = SseClient::try_connect(
        &server,
        "/v1/channels/cursors/events?last_event_id=zz-1",
        &[],
    )
    .await
    .expect_err("refused");
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (400, "bad_event_id"));
    assert!(
        message.starts_with(&malformed("last_event_id", "zz-1")),
        "{message}"
    );
    // The header wins over the query: a bad header with a good query is still refused.
    let res = SseClient::try_connect(
        &server,
        &format!("/v1/channels/cursors/events?last_event_id={good}"),
        &[("Last-Event-ID", b"bad")],
    )
    .await
    .expect_err("refused");
    assert_eq!(error_of(res).await.1, "bad_event_id");
    // The compatibility route checks the same way.
    let res = SseClient::try_connect(&server, "/sub?channel=cursors&last_event_id=-1", &[])
        .await
        .expect_err("refused");
    assert_eq!(error_of(res).await.1, "bad_event_id");

    // WebSocket: a real client's handshake is refused with 400 ...
    for (path, headers) in [
        ("/v1/channels/cursors/ws?last_event_id=nope", vec![]),
        ("/v1/channels/cursors/ws", vec![("Last-Event-ID", "nope")]),
    ] {
        let err = support::WsClient::try_connect_with(&server, path, &headers, None)
            .await
            .expect_err("handshake refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(res) => {
                assert_eq!(res.status(), 400, "{path}")
            }
            other => panic!("expected an HTTP error answer, got {other:?}"),
        }
        // ... with the documented JSON body.
        let (status, code, message) = ws_handshake_error(&server, path, &headers).await;
        assert_eq!((status, code.as_str()), (400, "bad_event_id"), "{path}");
        let what = if headers.is_empty() {
            "last_event_id"
        } else {
            "Last-Event-ID"
        };
        assert!(message.starts_with(&malformed(what, "nope")), "{message}");
    }

    // History's `after`.
    let res = server
        .client
        .get(server.url("/v1/channels/cursors/messages?after=x1"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (400, "bad_event_id"));
    assert!(message.starts_with(&malformed("after", "x1")), "{message}");

    // A good cursor still works.
    let mut sse = SseClient::connect(
        &server,
        &format!("/v1/channels/cursors/events?last_event_id={good}"),
        None,
    )
    .await;
    let id = server.publish("cursors", "two").await;
    sse.expect_event(&id, "message", "two").await;
    drop(sse);
    still_serving(&server, "cursors").await;
    server.stop().await;
}

#[tokio::test]
async fn bodies_over_the_message_limit_are_413_with_or_without_content_length() {
    let server = TestServer::start_with(|s| s.limits.max_message_size = ByteSize(1024)).await;
    let url = server.url("/v1/channels/sizes/messages");
    let too_large = (
        413,
        "payload_too_large".to_string(),
        "the message is larger than the limit of 1024 bytes".to_string(),
    );

    // Exactly the limit is fine.
    let at_limit = server.publish("sizes", vec![b'a'; 1024]).await;

    // Content-Length over the limit.
    let res = server
        .client
        .post(&url)
        .body(vec![b'b'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await, too_large);

    // Chunked (no Content-Length), finite, larger than the limit.
    let chunks: Vec<Result<Bytes, Infallible>> =
        (0..32).map(|_| Ok(Bytes::from(vec![b'c'; 512]))).collect();
    let res = server
        .client
        .post(&url)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await, too_large);

    // Chunked and never ending: refused as soon as the limit is passed, not at the end.
    let endless = futures::stream::iter(vec![Ok::<_, Infallible>(Bytes::from(vec![b'd'; 2048]))])
        .chain(futures::stream::pending());
    let res = tokio::time::timeout(
        support::PATIENCE,
        server
            .client
            .post(&url)
            .body(reqwest::Body::wrap_stream(endless))
            .send(),
    )
    .await
    .expect("the server answers before the body ends")
    .unwrap();
    assert_eq!(error_of(res).await, too_large);

    // Chunked within the limit is accepted.
    let chunks: Vec<Result<Bytes, Infallible>> =
        (0..4).map(|_| Ok(Bytes::from(vec![b'e'; 256]))).collect();
    let res = server
        .client
        .post(&url)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let streamed: Value = res.json().await.unwrap();

    // Only the two good messages were stored.
    let page = server.history("sizes", "").await;
    let ids: Vec<&Value> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(ids, vec![&json!(at_limit), &streamed["id"]]);
    assert_eq!(page["events"][1]["data"], "e".repeat(1024));

    // A batch item over the limit is refused on its own.
    let res = server
        .client
        .post(server.url("/v1/publish"))
        .json(&json!([
            {"channel": "sizes", "data": "f".repeat(1025)},
            {"channel": "sizes", "data": "small"},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["published"], 1);
    assert_eq!(body["failed"], 1);
    assert_eq!(body["results"][0]["error"]["code"], "payload_too_large");
    still_serving(&server, "sizes").await;
    server.stop().await;
}

#[tokio::test]
async fn batch_publish_reports_bad_json_and_per_item_errors() {
    let server = TestServer::start().await;
    let publish = |body: &'static str, content_type: &'static str| {
        server
            .client
            .post(server.url("/v1/publish"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let (status, code, message) = error_of(
        publish(r#"[{"channel": "b1", "data": "x"}"#, "application/json")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "bad_json"));
    assert!(
        message.starts_with("the body must be a JSON array of messages (or NDJSON"),
        "{message}"
    );
    assert_eq!(
        error_of(
            publish(r#"{"channel": "b1", "data": "x"}"#, "application/json")
                .await
                .unwrap()
        )
        .await,
        (
            400,
            "bad_json".to_string(),
            "the body must be a JSON array of messages".to_string()
        )
    );
    // In NDJSON each line is an item: a bad line is that item's error, the others publish.
    let res = publish(
        "{\"channel\": \"b0\", \"data\": \"x\"}\n{not json}\n",
        "application/x-ndjson",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (&body["published"], &body["failed"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(body["results"][1]["channel"], Value::Null);
    assert_eq!(body["results"][1]["error"]["code"], "bad_json");
    let message = body["results"][1]["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("line 2: "), "{message}");
    let stored = server.all_history("b0").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (&stored[0]["id"], &stored[0]["data"]),
        (&body["results"][0]["id"], &json!("x"))
    );

    // One bad item among good ones: the good ones are published, in order.
    let res = publish(
        r#"[
            {"channel": "b1", "data": "one"},
            {"channel": "a b", "data": "bad name"},
            {"channel": "b1", "event": "tick", "data": "three"},
            {"channel": "b1"},
            {"channel": "b1", "data": "x", "colour": "red"},
            {"channel": "b1", "data_base64": "AAEC/w=="}
        ]"#,
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["published"], 3, "{body}");
    assert_eq!(body["failed"], 3, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    assert_eq!(results[1]["channel"], Value::Null);
    assert_eq!(results[1]["error"]["code"], "bad_channel_name");
    assert_eq!(
        results[1]["error"]["message"],
        format!("{NAME_RULE}; got ' ' in \"a b\"")
    );
    assert_eq!(
        results[3]["error"],
        json!({"code": "bad_message", "message": "give exactly one of data and data_base64"})
    );
    assert_eq!(results[4]["error"]["code"], "bad_message");
    assert!(
        results[4]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("unknown field \"colour\""),
        "{body}"
    );
    let ids: Vec<String> = [0, 2, 5]
        .iter()
        .map(|&i| {
            assert_eq!(results[i]["channel"], "b1", "{body}");
            assert_eq!(results[i]["duplicate"], false, "{body}");
            results[i]["id"].as_str().expect("id").to_string()
        })
        .collect();
    let page = server.history("b1", "").await;
    assert_eq!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| json!([e["id"], e["event"], e.get("data").or(e.get("data_base64"))]))
            .collect::<Vec<_>>(),
        vec![
            json!([ids[0], "message", "one"]),
            json!([ids[1], "tick", "three"]),
            json!([ids[2], "message", "AAEC/w=="]),
        ]
    );
    still_serving(&server, "b1").await;
    server.stop().await;
}

#[tokio::test]
async fn an_ndjson_batch_across_two_channels_gets_ids_in_order() {
    let server = TestServer::start().await;
    let body = concat!(
        r#"{"channel": "nd-a", "data": "a1"}"#,
        "\n",
        r#"{"channel": "nd-b", "data": "b1"}"#,
        "\n\n",
        r#"{"channel": "nd-a", "data": "a2", "event": "e"}"#,
        "\n",
        r#"{"channels": ["nd-b", "nd-a"], "data": "both"}"#,
        "\n",
        r#"{"channel": "nd-b", "data": {"n": 1}}"#,
        "\n",
    );
    let res = server
        .client
        .post(server.url("/v1/publish"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(
        (&answer["published"], &answer["failed"]),
        (&json!(6), &json!(0))
    );
    let results = answer["results"].as_array().unwrap();
    let channels: Vec<&str> = results
        .iter()
        .map(|r| r["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["nd-a", "nd-b", "nd-a", "nd-b", "nd-a", "nd-b"]);
    let id = |i: usize| results[i]["id"].as_str().unwrap().to_string();

    let a = server.all_history("nd-a").await;
    let b = server.all_history("nd-b").await;
    let pairs = |events: &[Value]| -> Vec<(String, String, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_string(),
                    e["event"].as_str().unwrap().to_string(),
                    e["data"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let m = |s: &str| s.to_string();
    assert_eq!(
        pairs(&a),
        vec![
            (id(0), m("message"), m("a1")),
            (id(2), m("e"), m("a2")),
            (id(4), m("message"), m("both")),
        ]
    );
    assert_eq!(
        pairs(&b),
        vec![
            (id(1), m("message"), m("b1")),
            (id(3), m("message"), m("both")),
            (id(5), m("message"), m(r#"{"n":1}"#)),
        ]
    );
    still_serving(&server, "nd-a").await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_methods_unknown_routes_and_unknown_query_parameters() {
    let server = TestServer::start().await;
    let request = |method: reqwest::Method, path: &str| {
        server
            .client
            .request(method, server.url(path))
            .body("x")
            .send()
    };
    use reqwest::Method;
    for (method, path) in [
        (Method::PUT, "/v1/channels/q/messages"),
        (Method::POST, "/v1/channels/q/events"),
        (Method::POST, "/v1/channels/q"),
        (Method::GET, "/v1/publish"),
        (Method::DELETE, "/v1/channels"),
        (Method::GET, "/channel/q/messages"),
    ] {
        assert_eq!(
            error_of(request(method.clone(), path).await.unwrap()).await,
            (
                405,
                "method_not_allowed".to_string(),
                format!("{method} is not allowed on {path}")
            )
        );
    }
    for (method, path) in [
        (Method::GET, "/v2/channels/q/messages"),
        (Method::GET, "/v1/channels/q/messages/extra"),
        (Method::POST, "/v1/channel/q/messages"),
    ] {
        assert_eq!(
            error_of(request(method.clone(), path).await.unwrap()).await,
            (
                404,
                "not_found".to_string(),
                format!("no route for {method} {path}")
            )
        );
    }
    for (method, path, field) in [
        (Method::GET, "/v1/channels/q/messages?foo=1", "foo"),
        (Method::POST, "/v1/channels/q/messages?evnt=x", "evnt"),
        (Method::GET, "/v1/channels/q/events?cursor=1", "cursor"),
        (Method::GET, "/v1/channels?page=2", "page"),
        (Method::GET, "/sub?channel=q&room=1", "room"),
        (Method::GET, "/v1/channels/q/messages?limit=ten", "limit"),
    ] {
        let (status, code, message) = error_of(request(method.clone(), path).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (400, "bad_query"), "{path}");
        assert!(message.contains(field), "{path}: {message}");
    }
    let (status, code, _) = error_of(request(Method::GET, "/sub").await.unwrap()).await;
    assert_eq!((status, code.as_str()), (400, "missing_channel"));
    // A bad event name or idempotency key on publish.
    let (status, code, _) = error_of(
        request(Method::POST, "/v1/channels/q/messages?event=a:b")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "bad_event_name"));
    let res = server
        .client
        .post(server.url("/v1/channels/q/messages"))
        .header("Idempotency-Key", "has space")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(res).await,
        (
            400,
            "bad_idempotency_key".to_string(),
            "idempotency keys are 1 to 200 printable ASCII characters".to_string()
        )
    );
    // Nothing above stored anything.
    assert_eq!(
        server.get_json("/v1/channels/q", 404).await["error"]["code"],
        "not_found"
    );
    still_serving(&server, "q").await;
    server.stop().await;
}

#[tokio::test]
async fn history_limits_and_unknown_channels() {
    let server = TestServer::start().await;
    server.publish("lim", "x").await;
    for query in ["?limit=0", "?limit=1001"] {
        let res = server
            .client
            .get(server.url(&format!("/v1/channels/lim/messages{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(res).await,
            (
                400,
                "bad_limit".to_string(),
                "limit must be between 1 and 1000".to_string()
            ),
            "{query}"
        );
    }
    let res = server
        .client
        .get(server.url("/v1/channels?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.1, "bad_limit");
    assert_eq!(
        server.history("lim", "?limit=1000").await["events"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let res = server
        .client
        .get(server.url("/v1/channels/never-used"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(res).await,
        (
            404,
            "not_found".to_string(),
            "channel \"never-used\" has no events and no subscribers".to_string()
        )
    );
    // Asking did not create it.
    let list = server.get_json("/v1/channels", 200).await;
    let names: Vec<&str> = list["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lim"]);
    still_serving(&server, "lim").await;
    server.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_twice_stores_one_event() {
    let server = TestServer::start().await;
    let send = |key: &'static str, data: &'static str| {
        server
            .client
            .post(server.url("/v1/channels/idem/messages"))
            .header("Idempotency-Key", key)
            .body(data)
            .send()
    };
    let first = send("order-42", "charge").await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["channel"], "idem");
    let id = first["id"].as_str().unwrap().to_string();

    let second = send("order-42", "charge").await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(
        second.json::<Value>().await.unwrap(),
        json!({"id": id, "channel": "idem", "duplicate": true})
    );
    // Another key is another event.
    let other = send("order-43", "charge").await.unwrap();
    assert_eq!(other.status(), 201);
    let other: Value = other.json().await.unwrap();
    assert_ne!(other["id"], json!(id));

    let events = server.all_history("idem").await;
    assert_eq!(
        events
            .iter()
            .map(|e| (e["id"].clone(), e["data"].clone()))
            .collect::<Vec<_>>(),
        vec![
            (json!(id), json!("charge")),
            (other["id"].clone(), json!("charge"))
        ]
    );
    // A batch item with the same key is a duplicate too.
    let res = server
        .client
        .post(server.url("/v1/publish"))
        .json(&json!([{"channel": "idem", "data": "charge", "idempotency_key": "order-42"}]))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body["results"][0],
        json!({"channel": "idem", "id": id, "duplicate": true})
    );
    assert_eq!(server.all_history("idem").await.len(), 2);
    still_serving(&server, "idem").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_with_content_length_always_gets_its_413_answer() {
    let server = TestServer::start_with(|s| s.limits.max_message_size = ByteSize(1024)).await;
    let url = server.url("/v1/channels/reset/messages");
    for attempt in 0..20 {
        let res = reqwest::Client::new()
            .post(&url)
            .body(vec![b'z'; 8 << 20])
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("attempt {attempt}: no answer, the connection broke: {e:?}")
            });
        assert_eq!(
            error_of(res).await,
            (
                413,
                "payload_too_large".to_string(),
                "the message is larger than the limit of 1024 bytes".to_string()
            ),
            "attempt {attempt}"
        );
    }
    still_serving(&server, "reset").await;
    server.stop().await;
}

#[test]
fn a_segment_size_out_of_range_is_refused_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    for size in [ByteSize(1024), ByteSize(2 << 30)] {
        let mut settings = support::settings(dir.path());
        settings.storage.segment_size = size;
        let Err(err) = dormouse_gateway::Dormouse::open(settings) else {
            panic!("a segment size of {} bytes was accepted", size.0);
        };
        let message = format!("{err:#}");
        assert!(message.contains("storage.segment_size"), "{message}");
    }
    assert!(
        !dir.path().join("segments").exists(),
        "nothing was created in the data dir"
    );
}
