//! Server-Sent Events end to end: a real server, a real SSE parser.

use dormouse_testkit as support;
use std::time::Duration;

use support::{SseClient, TestServer, error_of};

const EVENTS: &str = "/v1/channels/room-1/events";

#[tokio::test]
async fn a_dropped_client_resumes_with_exactly_the_missed_events_then_live_ones() {
    let server = TestServer::start().await;
    let mut client = SseClient::connect(&server, EVENTS, None).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push((
            server.publish("room-1", format!("a{i}")).await,
            format!("a{i}"),
        ));
    }
    for (id, data) in &sent {
        let event = client.next().await.expect("event");
        assert_eq!(
            (event.id.as_deref(), event.data.as_str()),
            (Some(id.as_str()), data.as_str())
        );
        assert_eq!(event.event, "message");
    }
    assert_eq!(client.retry, Some(2000));
    let last = client.last_id.clone().unwrap();
    drop(client);

    let mut missed = Vec::new();
    for i in 0..3 {
        missed.push((
            server.publish("room-1", format!("b{i}")).await,
            format!("b{i}"),
        ));
    }
    let mut client = SseClient::connect(&server, EVENTS, Some(&last)).await;
    for (id, data) in &missed {
        let event = client.next().await.expect("missed event");
        assert_eq!(
            (event.id.as_deref(), event.data.as_str()),
            (Some(id.as_str()), data.as_str())
        );
    }
    let live = server.publish("room-1", "c0").await;
    let event = client.next().await.expect("live event");
    assert_eq!((event.id, event.data.as_str()), (Some(live), "c0"));
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn the_query_cursor_works_for_clients_that_cannot_set_headers() {
    let server = TestServer::start().await;
    let first = server.publish("room-1", "one").await;
    let second = server.publish("room-1", "two\nlines").await;
    let mut client =
        SseClient::connect(&server, &format!("{EVENTS}?last_event_id={first}"), None).await;
    let event = client.next().await.unwrap();
    assert_eq!(
        (event.id, event.data.as_str()),
        (Some(second), "two\nlines")
    );
    drop(client);
    server.stop().await;
}

/// An event of a stream of several channels: `(cursor, channel, id, data)`.
async fn next_of_many(sse: &mut SseClient) -> (String, String, String, String) {
    let event = sse.next().await.expect("an event");
    let data: serde_json::Value = serde_json::from_str(&event.data).expect("JSON data");
    assert_eq!(data["type"], "message", "{data}");
    (
        event.id.expect("an id: the cursor"),
        data["channel"].as_str().unwrap().to_string(),
        data["id"].as_str().unwrap().to_string(),
        data["data"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn one_stream_follows_many_channels_and_its_cursor_resumes_each_exactly() {
    let server = TestServer::start().await;
    let a1 = server.publish("a", "a1").await;
    let many = "/v1/events?channel=a&channel=b";
    let mut sse = SseClient::connect(&server, many, None).await;
    sse.connection_id().await;
    let b1 = server.publish("b", "b1").await;
    let a2 = server.publish("a", "a2").await;
    // Each event names its channel and id; its SSE id holds every channel's position, a's
    // from before the stream (where it started) and b's from its first event.
    assert_eq!(
        next_of_many(&mut sse).await,
        (format!("{a1},{b1}"), "b".into(), b1.clone(), "b1".into())
    );
    assert_eq!(
        next_of_many(&mut sse).await,
        (format!("{a2},{b1}"), "a".into(), a2.clone(), "a2".into())
    );
    let cursor = sse.last_id.clone().unwrap();
    drop(sse);

    // Missed while away, in both channels: the cursor resumes each exactly.
    let b2 = server.publish("b", "b2").await;
    let a3 = server.publish("a", "a3").await;
    let b3 = server.publish("b", "b3").await;
    let mut sse = SseClient::connect(&server, many, Some(&cursor)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let (_, channel, id, _) = next_of_many(&mut sse).await;
        got.push((channel, id));
    }
    let of = |c: &str| -> Vec<String> {
        got.iter()
            .filter(|(channel, _)| channel == c)
            .map(|(_, id)| id.clone())
            .collect()
    };
    assert_eq!(of("a"), std::slice::from_ref(&a3));
    assert_eq!(of("b"), [b2, b3.clone()], "in order within a channel");
    assert_eq!(sse.last_id.as_deref(), Some(format!("{a3},{b3}").as_str()));
    // Then live.
    let a4 = server.publish("a", "a4").await;
    assert_eq!(next_of_many(&mut sse).await.2, a4);

    // Each channel gets its own gap (b's cursor is from another epoch); an empty position
    // is a channel that had no event yet.
    let mut other =
        SseClient::connect(&server, "/v1/events?channel=b&channel=empty", Some("0-1,")).await;
    let gap = other.expect_control("gap").await;
    assert_eq!(
        (gap["channel"].as_str(), gap["reason"].as_str()),
        (Some("b"), Some("epoch_changed"))
    );
    let empty = server.publish("empty", "first").await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_of_many(&mut other).await.2);
    }
    assert_eq!(
        seen.last(),
        Some(&empty),
        "b's retained events, then empty's: {seen:?}"
    );

    // rewind: the newest N of each channel, then live.
    let mut rewound =
        SseClient::connect(&server, "/v1/events?channel=a&channel=b&rewind=1", None).await;
    let first = next_of_many(&mut rewound).await;
    // Every position is known from the start: the other channel's is just before its
    // rewound event, so a drop now would not replay its whole history.
    assert!(!first.0.split(',').any(str::is_empty), "{}", first.0);
    let mut latest = vec![first.2, next_of_many(&mut rewound).await.2];
    latest.sort();
    let mut want = vec![a4.clone(), b3.clone()];
    want.sort();
    assert_eq!(latest, want);

    // The compatibility route takes several channels too.
    let mut compat = SseClient::connect(&server, "/sub?channel=a&channel=b", None).await;
    compat.connection_id().await;
    let b4 = server.publish("b", "b4").await;
    assert_eq!(
        next_of_many(&mut compat).await,
        (format!("{a4},{b4}"), "b".into(), b4.clone(), "b4".into())
    );

    // Refused, precisely.
    for (query, code, last_event_id) in [
        ("", "missing_channel", None),
        ("?channel=a&channel=a", "bad_query", None),
        ("?channel=a&colour=red", "bad_query", None),
        ("?channel=a&channel=bad%20name", "bad_channel_name", None),
        ("?channel=a&rewind=0", "bad_rewind", None),
        ("?channel=a&channel=b", "bad_event_id", Some(a1.as_str())),
        ("?channel=a&channel=b", "bad_event_id", Some("x,y")),
    ] {
        let mut request = server.client.get(server.url(&format!("/v1/events{query}")));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let (status, got, message) = error_of(request.send().await.unwrap()).await;
        assert_eq!((status, got.as_str()), (400, code), "{query}: {message}");
    }
    server.stop().await;
}

/// A browser's own EventSource on one stream of two channels: the composite id it sends
/// back after a server restart resumes both, so what was published before it reconnected
/// arrives, once, in order per channel.
#[tokio::test]
async fn a_browsers_eventsource_follows_two_channels_across_a_server_restart() {
    use support::browser::Browser;
    // Long enough that the publishes after the restart happen before the browser is back.
    let tweak = |s: &mut dormouse_gateway::Settings| s.sse.retry = Duration::from_millis(1500);
    let server = TestServer::start_with(tweak).await;
    let browser = Browser::launch().await;
    // Same origin as the stream: a page of the server's own.
    let mut page = browser.open(&server.url("/healthz")).await;
    page.until("the page", "document.readyState", |v| v == "complete")
        .await;
    page.eval(
        r#"window.got = [];
           window.source = new EventSource("/v1/events?channel=news&channel=chat");
           source.onmessage = e => got.push({cursor: e.lastEventId, event: JSON.parse(e.data)});
           true"#,
    )
    .await;
    page.until("the stream open", "source.readyState", |v| v == 1)
        .await;
    let n1 = server.publish("news", "n1").await;
    let c1 = server.publish("chat", "c1").await;
    let got = page
        .until("two events", "got", |v| {
            v.as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    assert_eq!(got[1]["cursor"], format!("{n1},{c1}"));

    let server = server.restart_in_place(tweak).await;
    let n2 = server.publish("news", "n2").await;
    let c2 = server.publish("chat", "c2").await;
    let n3 = server.publish("news", "n3").await;
    let got = page
        .until("five events", "got", |v| {
            v.as_array().is_some_and(|a| a.len() >= 5)
        })
        .await;
    let ids_of = |channel: &str| -> Vec<String> {
        got.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"]["channel"] == channel)
            .map(|e| e["event"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids_of("news"), [n1, n2, n3.clone()], "{got}");
    assert_eq!(ids_of("chat"), [c1, c2.clone()], "{got}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = page.eval("got[got.length - 1].cursor").await;
    assert_eq!(last, format!("{n3},{c2}"));
    assert_eq!(page.eval("got.length").await, 5, "nothing twice");
    browser.close().await;
    server.stop().await;
}
