//! The batcher over the wire: a real server (in-process, or the binary as a child process
//! for the crash test), real HTTP clients, and a fake upstream sink that records every batch.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    BINARY, ChildServer, FakeUpstream, PATIENCE, Server, base, config, post_rows, row_number, rows,
};

#[tokio::test]
async fn a_full_batch_is_shipped_at_once_with_exactly_its_rows_in_order() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rules = config(&upstream);
    rules.max_rows = 5;
    rules.max_delay = Duration::from_secs(60);
    let server = Server::start(dir.path(), rules).await;

    let sent = rows("clicks", 0, 17);
    let res = server.post("clicks", &sent[..3]).await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"accepted": 3, "buffered": 3}));
    assert!(
        upstream.log().delivered.is_empty(),
        "3 of 5 rows do not make a batch"
    );

    let res = server.post("clicks", &sent[3..5]).await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["buffered"], 5);
    let log = upstream
        .wait_until("one batch", |log| !log.delivered.is_empty())
        .await;
    assert_eq!(log.delivered.len(), 1);
    let batch = &log.delivered[0];
    assert_eq!(batch.rows, sent[..5]);
    assert_eq!(batch.stream, "clicks");
    let key = batch
        .key
        .strip_prefix("ingest/clicks/")
        .expect("key names the stream");
    assert!(key.ends_with("-1-5"), "key names rows 1 to 5: {key}");

    // Twelve rows at once: two full batches leave, two rows wait for more or for the delay.
    let res = server.post("clicks", &sent[5..]).await;
    assert_eq!(res.status(), 202);
    let log = upstream
        .wait_until("three batches", |log| log.delivered.len() >= 3)
        .await;
    assert_eq!(log.delivered[1].rows, sent[5..10]);
    assert_eq!(log.delivered[2].rows, sent[10..15]);
    let status = server
        .wait_for_status("clicks", |s| s["buffered"] == 2)
        .await;
    assert_eq!(status["consecutive_failures"], 0);
    assert_eq!(upstream.log().delivered.len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn a_partial_batch_is_shipped_after_max_delay() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rules = config(&upstream);
    rules.max_rows = 100;
    rules.max_delay = Duration::from_millis(200);
    let server = Server::start(dir.path(), rules).await;

    let sent = rows("views", 0, 3);
    let started = Instant::now();
    assert_eq!(server.post("views", &sent).await.status(), 202);
    if started.elapsed() < Duration::from_millis(150) {
        assert!(upstream.log().delivered.is_empty(), "nothing leaves early");
    }
    let log = upstream
        .wait_until("the delayed batch", |log| !log.delivered.is_empty())
        .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "shipped after {waited:?}, before max_delay"
    );
    assert_eq!(log.delivered.len(), 1);
    assert_eq!(log.delivered[0].rows, sent);
    let status = server
        .wait_for_status("views", |s| s["buffered"] == 0)
        .await;
    assert_eq!(
        status["next_attempt_in_ms"],
        Value::Null,
        "no alarm when empty"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_failing_upstream_keeps_the_rows_and_gets_them_all_in_order_when_it_recovers() {
    let upstream = FakeUpstream::start().await;
    upstream.set_failing(true);
    let dir = tempfile::tempdir().unwrap();
    let mut rules = config(&upstream);
    rules.max_rows = 5;
    rules.max_delay = Duration::from_millis(100);
    rules.max_backoff = Duration::from_millis(300);
    let server = Server::start(dir.path(), rules).await;

    let sent = rows("orders", 0, 12);
    for chunk in sent.chunks(3) {
        assert_eq!(server.post("orders", chunk).await.status(), 202);
    }
    upstream
        .wait_until("three refused attempts", |log| log.refused.len() >= 3)
        .await;
    let status = server.status("orders").await;
    assert_eq!(status["buffered"], 12, "nothing is dropped while failing");
    assert!(status["consecutive_failures"].as_u64().unwrap() >= 1);
    assert!(upstream.log().delivered.is_empty());

    upstream.set_failing(false);
    let log = upstream
        .wait_until("every row", |log| log.rows_of("orders").len() >= 12)
        .await;
    assert_eq!(log.rows_of("orders"), sent, "all rows, once each, in order");
    assert!(log.delivered.iter().all(|b| b.rows.len() <= 5));
    let keys: HashSet<&str> = log.delivered.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(
        keys.len(),
        log.delivered.len(),
        "every batch has its own key"
    );
    assert!(
        log.delivered[0].key.contains("-1-"),
        "the retry starts at row 1"
    );
    let status = server
        .wait_for_status("orders", |s| s["buffered"] == 0)
        .await;
    assert_eq!(status["consecutive_failures"], 0);
    server.stop().await;
}

#[tokio::test]
async fn a_full_buffer_answers_429_with_retry_after_and_stores_nothing() {
    let upstream = FakeUpstream::start().await;
    upstream.set_failing(true);
    let dir = tempfile::tempdir().unwrap();
    let mut rules = config(&upstream);
    rules.max_rows = 10;
    rules.max_buffered = 10;
    rules.max_delay = Duration::from_secs(30);
    rules.max_backoff = Duration::from_secs(30);
    let server = Server::start(dir.path(), rules).await;

    let sent = rows("logs", 0, 30);
    let res = server.post("logs", &sent[..8]).await;
    assert_eq!(res.status(), 202);

    let res = server.post("logs", &sent[8..11]).await;
    assert_eq!(res.status(), 429);
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "buffer_full");
    assert_eq!(body["buffered"], 8);

    // What fits is still taken.
    let res = server.post("logs", &sent[8..10]).await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["buffered"], 10);
    let res = server.post("logs", &sent[10..11]).await;
    assert_eq!(res.status(), 429);

    let res = server.post("other", &sent[..11]).await;
    assert_eq!(res.status(), 413, "more rows than a stream may ever hold");
    assert_eq!(server.status("logs").await["buffered"], 10);
    assert_eq!(server.status("other").await["buffered"], 0);
    server.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_naming_the_line_and_store_nothing() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), config(&upstream)).await;
    let post = |body: &'static str| {
        server
            .client
            .post(format!("{}/s/events", server.base))
            .body(body)
            .send()
    };

    let res = post("{\"a\":1}\n\n[1,2]\n{\"b\":2}\n").await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_event");
    assert_eq!(body["error"]["line"], 3);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("line 3 is not a JSON object"),
        "{message}"
    );

    let res = post("{\"a\":1}\n{\"a\":").await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["line"], 2);

    let res = post("\n\n").await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_events");

    assert_eq!(server.status("s").await["buffered"], 0);
    let res = server
        .client
        .get(format!("{}/s/nope", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = server
        .client
        .delete(format!("{}/s", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    server.stop().await;
}

/// Clients post to three streams while the server is killed with SIGKILL twice; a client
/// resends from its last acknowledged row after a restart, as a real one would. In the end
/// every row reaches the sink at least once, in order per stream, and nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_row_reaches_the_upstream_across_kill_9() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("BATCHER_UPSTREAM", upstream.url.as_str()),
        ("BATCHER_MAX_ROWS", "20"),
        ("BATCHER_MAX_DELAY", "100ms"),
        ("BATCHER_MAX_BACKOFF", "400ms"),
        ("BATCHER_REQUEST_TIMEOUT", "5s"),
    ];
    let streams = ["alpha", "beta", "gamma"];
    // Per stream: rows acknowledged (a prefix, as each client posts one request at a time),
    // and rows ever sent (acknowledged or in flight when the server died).
    let mut acked = [0usize; 3];
    let mut sent = [0usize; 3];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    for round in 0..3 {
        let server = ChildServer::start(Path::new(BINARY), dir.path(), &vars).await;
        let last_round = round == 2;
        let progress = Arc::new(AtomicUsize::new(0));
        let mut producers = Vec::new();
        for (i, stream) in streams.iter().enumerate() {
            let (client, base, progress) = (client.clone(), base(&server), progress.clone());
            let (stream, mut next, mut sent_here) = (stream.to_string(), acked[i], sent[i]);
            producers.push(tokio::spawn(async move {
                for request in 0.. {
                    if last_round && request == 20 {
                        break;
                    }
                    let batch = rows(&stream, next, 1 + (next + request) % 4);
                    sent_here = sent_here.max(next + batch.len());
                    match post_rows(&client, &base, &stream, &batch).await {
                        Ok(res) if res.status() == 202 => {
                            next += batch.len();
                            progress.fetch_add(batch.len(), Ordering::Relaxed);
                        }
                        Ok(res) if !last_round => {
                            // A server that is dying may answer 5xx: no acknowledgement.
                            assert!(res.status().is_server_error(), "{}", res.status());
                            break;
                        }
                        Ok(res) => panic!("{stream}: unexpected {}", res.status()),
                        Err(e) => {
                            assert!(!last_round, "{stream}: {e}");
                            break;
                        }
                    }
                }
                (next, sent_here)
            }));
        }
        if !last_round {
            // Kill mid-stream, once a few hundred rows were acknowledged in this round.
            let target = 150 + 100 * round;
            let deadline = Instant::now() + PATIENCE;
            while progress.load(Ordering::Relaxed) < target && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            server.kill();
            for (i, producer) in producers.into_iter().enumerate() {
                (acked[i], sent[i]) = producer.await.unwrap();
            }
            continue;
        }
        for (i, producer) in producers.into_iter().enumerate() {
            (acked[i], sent[i]) = producer.await.unwrap();
        }
        let log = upstream
            .wait_until("every acknowledged row", |log| {
                streams.iter().enumerate().all(|(i, s)| {
                    let got: HashSet<usize> =
                        log.rows_of(s).iter().map(|r| row_number(r)).collect();
                    (0..acked[i]).all(|n| got.contains(&n))
                })
            })
            .await;
        for (i, stream) in streams.iter().enumerate() {
            let numbers: Vec<usize> = log.rows_of(stream).iter().map(|r| row_number(r)).collect();
            assert!(
                numbers.iter().all(|&n| n < sent[i]),
                "{stream}: the sink got a row nobody sent"
            );
            let mut seen = HashSet::new();
            let first_seen: Vec<usize> = numbers
                .iter()
                .copied()
                .filter(|n| seen.insert(*n))
                .collect();
            assert_eq!(
                first_seen,
                (0..acked[i]).collect::<Vec<_>>(),
                "{stream}: every row, first delivered in order"
            );
        }
        server.kill();
    }
    assert!(
        acked.iter().all(|&n| n > 60),
        "rows acknowledged: {acked:?}"
    );
}
