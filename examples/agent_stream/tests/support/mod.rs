//! A real server with the runs mounted, on an ephemeral port with its own data dir (the
//! shared test kit's, in process or the example's binary as a child); a producer; and what
//! the two kinds of viewer (the kit's SSE and WebSocket clients) see of a run.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dormouse_gateway::ByteSize;
use dormouse_runtime::NamespaceConfig;
pub use dormouse_testkit::{ChildServer, Endpoint, SseClient, TestServer, WsClient};
use example_agent_stream::{NAMESPACE, Run, RunEnv};
use serde_json::{Value, json};

/// How long any single wait may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A server with the runs mounted, on `data_dir` (kept across restarts by the caller), the
/// shared test kit's server with this example's setup.
pub async fn start(data_dir: &Path, mirror_check: Duration) -> TestServer {
    TestServer::start_in(
        data_dir,
        // Viewers here read in bursts, with a 5 MiB artifact in the backlog: leave them room
        // so the slow-consumer cut-off is not what is being tested.
        |settings| settings.limits.subscriber_queue = ByteSize::mib(64),
        move |server| {
            let env = RunEnv {
                publisher: server.state().publisher.clone(),
                mirror_check,
            };
            server
                .mount::<Run>(NAMESPACE, NamespaceConfig::default(), env)
                .expect("mount runs");
        },
    )
    .await
}

/// The runs' routes, on any server (in-process, or the binary as a child process).
pub trait Runs {
    /// `POST /v1/objects/runs/{run}{rest}` with `body`.
    async fn post(
        &self,
        run: &str,
        rest: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response;
}

impl Runs for Endpoint {
    async fn post(
        &self,
        run: &str,
        rest: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/objects/{NAMESPACE}/{run}{rest}")))
            .body(body)
            .send()
            .await
            .expect("producer request")
    }
}

/// What a producer expects viewers to see, built from the producer's own answers.
#[derive(Debug, Default)]
pub struct Producer {
    pub run: String,
    /// The event JSON (without `id`) of every acknowledged event, in order.
    pub expected: Vec<Value>,
}

impl Producer {
    pub fn new(run: &str) -> Self {
        Self {
            run: run.to_string(),
            expected: Vec::new(),
        }
    }

    async fn appended(res: reqwest::Response) -> u64 {
        assert_eq!(res.status(), 201, "producer status");
        let body: Value = res.json().await.expect("JSON answer");
        assert!(body["id"].is_string(), "{body}");
        body["seq"].as_u64().expect("seq")
    }

    pub async fn chunk(&mut self, server: &Endpoint, text: &str) {
        let seq = Self::appended(server.post(&self.run, "/chunks", text.to_string()).await).await;
        self.expected
            .push(json!({"seq": seq, "type": "chunk", "text": text}));
    }

    pub async fn artifact(&mut self, server: &Endpoint, name: &str, data: Vec<u8>) {
        let size = data.len();
        let encoded = BASE64.encode(&data);
        let res = server
            .post(&self.run, &format!("/artifacts?name={name}"), data)
            .await;
        let seq = Self::appended(res).await;
        self.expected
            .push(json!({"seq": seq, "type": "artifact", "name": name,
            "size": size, "data_base64": encoded}));
    }

    pub async fn finish(&mut self, server: &Endpoint, state: Value) {
        let seq = Self::appended(server.post(&self.run, "/finish", state.to_string()).await).await;
        self.expected
            .push(json!({"seq": seq, "type": "finish", "state": state}));
    }
}

/// One event as a viewer saw it: the transport's id and the event JSON (without `id`).
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub event: Value,
}

/// Asserts `got` is exactly `expected`, naming the first difference without printing
/// megabytes of base64.
pub fn assert_same_events(who: &str, got: &[Seen], expected: &[Value]) {
    for (i, (seen, want)) in got.iter().zip(expected).enumerate() {
        if &seen.event != want {
            panic!(
                "{who}: event {i} differs:\n got  {}\n want {}",
                short(&seen.event),
                short(want)
            );
        }
    }
    assert_eq!(got.len(), expected.len(), "{who}: number of events");
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 200 {
        format!("{}... ({} bytes)", &text[..200], text.len())
    } else {
        text
    }
}

/// The transport's ids strictly increase along `seen`.
pub fn assert_ids_increase(who: &str, seen: &[Seen]) {
    for pair in seen.windows(2) {
        assert!(
            id_order(&pair[0].id) < id_order(&pair[1].id),
            "{who}: ids must increase: {} then {}",
            pair[0].id,
            pair[1].id
        );
    }
}

/// `(epoch, seq)` of an id in the `{epoch hex}-{seq}` form both channels and runs use; the
/// tests use it only to check ids increase.
pub fn id_order(id: &str) -> (u64, u64) {
    let (epoch, seq) = id.split_once('-').expect("an epoch-seq id");
    (
        u64::from_str_radix(epoch, 16).expect("hex epoch"),
        seq.parse().expect("decimal seq"),
    )
}

/// The next run events a viewer receives, in order, with the transport's id.
pub trait Viewer {
    async fn take(&mut self, n: usize) -> Vec<Seen>;
}

impl Viewer for SseClient {
    /// Events of type `chunk`, `artifact` or `finish`; a control event fails the test.
    async fn take(&mut self, n: usize) -> Vec<Seen> {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            let event = self.next().await.expect("the stream ended early");
            assert!(
                !event.event.starts_with("dormouse."),
                "unexpected control event {}: {}",
                event.event,
                event.data
            );
            let value: Value = serde_json::from_str(&event.data).expect("event data is JSON");
            assert_eq!(
                value["type"], event.event,
                "SSE event type is the JSON type"
            );
            seen.push(Seen {
                id: event.id.expect("events carry an id"),
                event: value,
            });
        }
        seen
    }
}

impl Viewer for WsClient {
    async fn take(&mut self, n: usize) -> Vec<Seen> {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            let mut value = self
                .next()
                .await
                .unwrap_or_else(|| panic!("the socket ended after {} events", seen.len()));
            let id = value
                .as_object_mut()
                .and_then(|o| o.remove("id"))
                .and_then(|id| id.as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("not a run event: {value}"));
            seen.push(Seen { id, event: value });
        }
        seen
    }
}

/// `len` bytes that are not text and not compressible: what an artifact might hold.
pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
