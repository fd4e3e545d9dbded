//! A node refuses, at start and with a message that names the server, a NATS cluster it
//! cannot trust: unreachable, a release that does not fence appends, JetStream off. The
//! misbehaving servers are a few lines of TCP that speak the start of the NATS protocol.

use std::time::Duration;

use dormouse_cluster::{ConnectError, NatsSettings, connect};
use dormouse_testkit::nats::{NatsCluster, fake_nats_server};

fn settings(urls: Vec<String>) -> NatsSettings {
    let mut settings = NatsSettings::new(urls, "test");
    settings.connect_timeout = Duration::from_secs(2);
    settings
}

#[tokio::test]
async fn a_server_that_cannot_fence_is_refused_by_name_and_version() {
    let url = fake_nats_server(
        r#"{"server_id":"OLD","server_name":"old-nats","version":"2.9.10","proto":1,"headers":true,"jetstream":true,"max_payload":1048576}"#,
    )
    .await;
    let error = connect(&settings(vec![url])).await.unwrap_err();
    assert!(
        matches!(&error, ConnectError::TooOld { server, .. } if server == "old-nats"),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("2.9.10") && message.contains("2.14.4"),
        "{message}"
    );
}

/// A cluster whose first server qualifies but whose second, also listed, runs an old
/// release: the connection could fail over to it, so it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_listed_server_that_cannot_fence_is_refused_not_only_the_first() {
    let cluster = NatsCluster::start(3).await;
    let old = fake_nats_server(
        r#"{"server_id":"OLD","server_name":"old-nats","version":"2.9.10","proto":1,"headers":true,"jetstream":true,"max_payload":1048576}"#,
    )
    .await;
    let error = connect(&settings(vec![cluster.url(0), old]))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ConnectError::TooOld { server, .. } if server == "old-nats"),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_server_without_jetstream_is_refused() {
    let url = fake_nats_server(
        r#"{"server_id":"X","server_name":"plain","version":"2.15.1","proto":1,"headers":true,"max_payload":1048576}"#,
    )
    .await;
    let error = connect(&settings(vec![url])).await.unwrap_err();
    assert!(
        matches!(&error, ConnectError::NoJetStream { server } if server == "plain"),
        "{error:?}"
    );
    assert!(error.to_string().contains("JetStream"), "{error}");
}

#[tokio::test]
async fn an_unreachable_cluster_and_an_empty_list_are_refused_with_what_was_tried() {
    // A port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("nats://{addr}");
    let error = connect(&settings(vec![url.clone()])).await.unwrap_err();
    assert!(
        matches!(error, ConnectError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(&url), "{error}");

    let error = connect(&settings(Vec::new())).await.unwrap_err();
    assert!(matches!(error, ConnectError::NoUrls), "{error:?}");
    let error = connect(&settings(vec!["nats://[::1".into()]))
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::BadUrl { .. }), "{error:?}");
}

#[tokio::test]
async fn the_pinned_server_qualifies_and_a_dead_one_in_the_list_is_passed_over() {
    let cluster = NatsCluster::start(3).await;
    let dead = {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        format!("nats://{addr}")
    };
    let mut urls = vec![dead];
    urls.extend(cluster.urls());
    let nats = connect(&settings(urls)).await.expect("connect");
    assert!(nats.version.qualifies(), "{}", nats.version);
    assert!(nats.server.starts_with('n'), "{}", nats.server);
}
