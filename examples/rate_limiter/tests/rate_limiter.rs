//! The limiter over the wire: a real server, concurrent HTTP clients.

use std::time::Duration;

use dormouse_runtime::NamespaceConfig;
use dormouse_testkit::TestServer;
use example_rate_limiter::{Limits, NAMESPACE, TokenBucket};
use serde_json::Value;

async fn start(dir: &std::path::Path, limits: Limits, idle: Duration) -> TestServer {
    TestServer::start_in(
        dir,
        |_| {},
        move |server| {
            server
                .mount::<TokenBucket>(NAMESPACE, NamespaceConfig::with_idle_timeout(idle), limits)
                .expect("mount the limiters");
        },
    )
    .await
}

/// Where the limiters are: `{base}/{key}/take`.
fn base(server: &TestServer) -> String {
    server.url(&format!("/v1/objects/{NAMESPACE}"))
}

const SLOW: Limits = Limits {
    capacity: 10.0,
    refill_per_sec: 0.001,
};

#[tokio::test]
async fn concurrent_requests_to_one_key_get_exactly_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SLOW, Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let url = format!("{}/key-1/take", base(&server));
    let takes = (0..50).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move { client.post(&url).send().await.unwrap() }
    });
    let responses = futures::future::join_all(takes).await;
    let mut allowed = 0;
    let mut remaining_seen = Vec::new();
    for res in responses {
        match res.status().as_u16() {
            200 => {
                allowed += 1;
                let body: Value = res.json().await.unwrap();
                remaining_seen.push(body["remaining"].as_u64().unwrap());
            }
            429 => {
                assert!(res.headers().contains_key("retry-after"));
                let body: Value = res.json().await.unwrap();
                assert_eq!(body["allowed"], false);
                assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(allowed, 10, "exactly the burst is granted");
    remaining_seen.sort_unstable();
    assert_eq!(
        remaining_seen,
        (0..10).collect::<Vec<u64>>(),
        "each grant saw a distinct level"
    );

    // Other keys are independent.
    let res = client
        .post(format!("{}/key-2/take?n=3", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["remaining"], 7);
    server.stop().await;
}

#[tokio::test]
async fn the_budget_survives_hibernation_and_restart_and_refills() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        capacity: 5.0,
        refill_per_sec: 20.0,
    };
    let server = start(dir.path(), SLOW, Duration::from_millis(20)).await;
    let client = reqwest::Client::new();
    let take = |n: u32| {
        client
            .post(format!("{}/k/take?n={n}", base(&server)))
            .send()
    };
    assert_eq!(take(4).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await; // hibernates
    let body = server
        .get_json(&format!("/v1/objects/{NAMESPACE}/k"), 200)
        .await;
    assert_eq!(body["remaining"], 6);
    server.stop().await;

    // Restart with a fast refill: the stored level carries over, then refills.
    let server = start(dir.path(), limits, Duration::from_secs(30)).await;
    let res = client
        .post(format!("{}/k/take?n=5", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "a 5-token bucket refills at 20/s");
    let res = client
        .post(format!("{}/k/take?n=5", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = client
        .post(format!("{}/k/take?n=5", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SLOW, Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let res = client
        .post(format!("{}/k/take?n=0", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_query");
    let res = client
        .delete(format!("{}/k", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = client
        .post(format!("{}/bad%20key/take", base(&server)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_object_name");
    let base = base(&server).replace(NAMESPACE, "nope");
    let res = client.post(format!("{base}/k/take")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    server.stop().await;
}
