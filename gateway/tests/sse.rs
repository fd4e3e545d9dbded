//! Server-Sent Events end to end: a real server, a real SSE parser.

use dormouse_testkit as support;

use support::{SseClient, TestServer};

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
