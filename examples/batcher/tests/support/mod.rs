//! A fake upstream sink that records what it is sent (and can be told to fail), the batcher
//! served in-process, and the batcher binary run as a child process that a test can
//! `kill -9` (the shared test kit's `ChildServer`).
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dormouse_runtime::NamespaceConfig;
pub use dormouse_testkit::ChildServer;
use dormouse_testkit::{Endpoint, TestServer};
use example_batcher::{Batcher, BatcherConfig, BatcherEnv, NAMESPACE};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long any single wait may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One batch the sink received: its headers of interest and its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub key: String,
    pub stream: String,
    pub rows: Vec<String>,
}

/// Everything the sink saw, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct SinkLog {
    /// Batches answered 200.
    pub delivered: Vec<Received>,
    /// Batches answered 503 while failing.
    pub refused: Vec<Received>,
    /// Requests that broke the wire contract (wrong content type, no final newline).
    pub malformed: Vec<String>,
}

impl SinkLog {
    /// Delivered rows of `stream`, in arrival order, duplicates included.
    pub fn rows_of(&self, stream: &str) -> Vec<String> {
        self.delivered
            .iter()
            .filter(|b| b.stream == stream)
            .flat_map(|b| b.rows.iter().cloned())
            .collect()
    }
}

struct Sink {
    failing: AtomicBool,
    log: Mutex<SinkLog>,
    /// Bumped on every request, so tests wait for conditions instead of sleeping.
    changed: watch::Sender<u64>,
}

/// An HTTP sink on 127.0.0.1:0 that records every batch.
pub struct FakeUpstream {
    pub url: String,
    sink: Arc<Sink>,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let sink = Arc::new(Sink {
            failing: AtomicBool::new(false),
            log: Mutex::new(SinkLog::default()),
            changed: watch::channel(0).0,
        });
        let app = Router::new()
            .route("/batches", post(receive))
            .with_state(sink.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/batches", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, sink, task }
    }

    /// While failing, every batch is answered 503 (and recorded as refused).
    pub fn set_failing(&self, failing: bool) {
        self.sink.failing.store(failing, Ordering::SeqCst);
    }

    pub fn log(&self) -> SinkLog {
        self.sink.log.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what the sink saw, and returns that.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&SinkLog) -> bool) -> SinkLog {
        let mut changed = self.sink.changed.subscribe();
        let wait = async {
            loop {
                let log = self.log();
                assert!(
                    log.malformed.is_empty(),
                    "malformed batches: {:?}",
                    log.malformed
                );
                if done(&log) {
                    return log;
                }
                changed.changed().await.unwrap();
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(log) => log,
            Err(_) => panic!(
                "timed out waiting for the sink: {what}; it saw {:?}",
                self.log()
            ),
        }
    }
}

async fn receive(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| dormouse_testkit::upstream::header_text(&headers, name);
    let text = String::from_utf8_lossy(&body).into_owned();
    if header("content-type") != "application/x-ndjson" || !text.ends_with('\n') {
        sink.log
            .lock()
            .unwrap()
            .malformed
            .push(format!("{headers:?} {text:?}"));
        sink.changed.send_modify(|n| *n += 1);
        return StatusCode::BAD_REQUEST;
    }
    let batch = Received {
        key: header("idempotency-key"),
        stream: header("dormouse-stream"),
        rows: text.lines().map(str::to_string).collect(),
    };
    let failing = sink.failing.load(Ordering::SeqCst);
    {
        let mut log = sink.log.lock().unwrap();
        if failing {
            log.refused.push(batch);
        } else {
            log.delivered.push(batch);
        }
    }
    sink.changed.send_modify(|n| *n += 1);
    if failing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Rules for tests: the given sink, the rest overridden per test.
pub fn config(upstream: &FakeUpstream) -> BatcherConfig {
    BatcherConfig {
        upstream: upstream.url.clone(),
        request_timeout: Duration::from_secs(5),
        ..BatcherConfig::default()
    }
}

/// The batcher served in-process on 127.0.0.1:0 (the shared test kit's server, with the
/// batcher mounted).
pub struct Server {
    server: TestServer,
    /// `http://addr/v1/objects/ingest`.
    pub base: String,
    pub client: reqwest::Client,
}

/// `http://addr/v1/objects/ingest` on `server`: where the batcher's streams live.
pub fn base(server: &Endpoint) -> String {
    server.url(&format!("/v1/objects/{NAMESPACE}"))
}

/// The batcher binary, for the test that kills it like a crash.
pub const BINARY: &str = env!("CARGO_BIN_EXE_example-batcher");

impl Server {
    pub async fn start(dir: &Path, config: BatcherConfig) -> Self {
        let server = TestServer::start_in(
            dir,
            |_| {},
            move |server| {
                server
                    .mount::<Batcher>(
                        NAMESPACE,
                        NamespaceConfig::default(),
                        BatcherEnv::new(config.clone()).expect("batcher config"),
                    )
                    .expect("mount the batcher");
            },
        )
        .await;
        Self {
            base: base(&server),
            client: server.client.clone(),
            server,
        }
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// Posts `rows` as NDJSON to `stream`.
    pub async fn post(&self, stream: &str, rows: &[String]) -> reqwest::Response {
        post_rows(&self.client, &self.base, stream, rows)
            .await
            .expect("ingest request")
    }

    /// The stream's status document.
    pub async fn status(&self, stream: &str) -> serde_json::Value {
        let path = format!("/v1/objects/{NAMESPACE}/{stream}");
        self.server.get_json(&path, 200).await
    }

    /// Polls the status until `done` holds for it.
    pub async fn wait_for_status(
        &self,
        stream: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let wait = async {
            loop {
                let status = self.status(stream).await;
                if done(&status) {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("timed out waiting for the stream's status")
    }
}

pub async fn post_rows(
    client: &reqwest::Client,
    base: &str,
    stream: &str,
    rows: &[String],
) -> reqwest::Result<reqwest::Response> {
    let mut body = rows.join("\n");
    body.push('\n');
    client
        .post(format!("{base}/{stream}/events"))
        .body(body)
        .send()
        .await
}

/// `count` distinct rows for `stream`, numbered from `from`.
pub fn rows(stream: &str, from: usize, count: usize) -> Vec<String> {
    (from..from + count)
        .map(|n| format!(r#"{{"stream":"{stream}","n":{n}}}"#))
        .collect()
}

/// The `n` of a row made by [`rows`].
pub fn row_number(row: &str) -> usize {
    let value: serde_json::Value = serde_json::from_str(row).expect("a JSON row");
    value["n"].as_u64().expect("n") as usize
}
