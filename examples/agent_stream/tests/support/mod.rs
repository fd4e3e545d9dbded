//! A real server with the runs mounted, on an ephemeral port with its own data dir; a
//! producer; and the two kinds of viewer: an SSE client (WHATWG parsing over reqwest) and a
//! WebSocket client (tokio-tungstenite).
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use dormouse_gateway::ByteSize;
use dormouse_runtime::NamespaceConfig;
pub use dormouse_testkit::{Endpoint, TestServer};
use example_agent_stream::{NAMESPACE, Run, RunEnv};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

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

/// The example's binary as a child process, configured like an operator would (environment
/// variables). Dropping it kills it, so no test leaves one behind whatever way it ends.
pub struct ChildServer {
    child: Child,
    endpoint: Endpoint,
}

impl std::ops::Deref for ChildServer {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildServer {
    /// Starts the binary on a free port and `data_dir`, and waits until it is healthy.
    pub async fn start(data_dir: &Path) -> Self {
        // A port nobody listens on right now: bind port 0, read it, let it go.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let child = Command::new(env!("CARGO_BIN_EXE_example-agent_stream"))
            .env("DORMOUSE_LISTEN", addr.to_string())
            .env("DORMOUSE_DATA_DIR", data_dir)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the example binary");
        let mut server = Self {
            child,
            endpoint: Endpoint::new(addr),
        };
        let health = server.url("/healthz");
        let ready = async {
            loop {
                if let Some(status) = server.child.try_wait().expect("child status") {
                    panic!("the server exited early: {status}");
                }
                if let Ok(res) = server.endpoint.client.get(&health).send().await
                    && res.status() == 200
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .expect("the server did not become ready");
        server
    }

    /// SIGKILL: no shutdown, no flush, exactly like a crash.
    pub fn kill(mut self) {
        self.child.kill().expect("kill -9 the server");
        self.child.wait().expect("reap the server");
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

/// `(epoch, seq)` of an id in the `{epoch hex}-{seq}` form both channels and runs use; the
/// tests use it only to check ids increase.
pub fn id_order(id: &str) -> (u64, u64) {
    let (epoch, seq) = id.split_once('-').expect("an epoch-seq id");
    (
        u64::from_str_radix(epoch, 16).expect("hex epoch"),
        seq.parse().expect("decimal seq"),
    )
}

/// An SSE client that parses the stream incrementally and keeps the last id.
pub struct SseClient {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    buf: BytesMut,
    /// Bytes of `buf` already searched for a blank line, so a multi-MiB event arriving in
    /// many chunks is parsed in linear time.
    scanned: usize,
}

impl SseClient {
    /// Connects; `last_id` is sent as the `Last-Event-ID` header.
    pub async fn connect(server: &Endpoint, path: &str, last_id: Option<&str>) -> Self {
        let mut request = server.client.get(server.url(path));
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let res = request.send().await.expect("sse request");
        assert_eq!(res.status(), 200, "sse status");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Self {
            stream: res.bytes_stream().boxed(),
            buf: BytesMut::new(),
            scanned: 0,
        }
    }

    /// The next `n` events (of type `chunk`, `artifact` or `finish`), in order.
    pub async fn take(&mut self, n: usize) -> Vec<Seen> {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            let (id, event, data) = tokio::time::timeout(PATIENCE, self.next())
                .await
                .expect("timed out waiting for an SSE event")
                .expect("the stream ended early");
            assert!(
                !event.starts_with("dormouse."),
                "unexpected control event {event}: {data}"
            );
            let value: Value = serde_json::from_str(&data).expect("event data is JSON");
            assert_eq!(
                value["type"],
                event.as_str(),
                "SSE event type is the JSON type"
            );
            seen.push(Seen {
                id: id.expect("events carry an id"),
                event: value,
            });
        }
        seen
    }

    /// The next event with data: `(id, event type, data)`; `None` at the end of the stream.
    async fn next(&mut self) -> Option<(Option<String>, String, String)> {
        loop {
            if let Some(event) = self.parse_one() {
                return Some(event);
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    fn parse_one(&mut self) -> Option<(Option<String>, String, String)> {
        loop {
            let from = self.scanned.saturating_sub(1);
            let Some(end) = self.buf[from..].windows(2).position(|w| w == b"\n\n") else {
                self.scanned = self.buf.len();
                return None;
            };
            let block = self.buf.split_to(from + end);
            let _ = self.buf.split_to(2);
            self.scanned = 0;
            let text = String::from_utf8(block.to_vec()).expect("SSE is UTF-8");
            let (mut id, mut event, mut data) = (None, None, Vec::new());
            for line in text.split('\n').filter(|l| !l.starts_with(':')) {
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "id" => id = Some(value.to_string()),
                    "event" => event = Some(value.to_string()),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            if !data.is_empty() {
                let event = event.unwrap_or_else(|| "message".to_string());
                return Some((id, event, data.join("\n")));
            }
        }
    }
}

/// A WebSocket viewer.
pub struct WsClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// What a WebSocket viewer received next.
#[derive(Debug)]
pub enum WsNext {
    /// A text message, as JSON.
    Json(Value),
    /// The server closed the socket.
    Closed { code: Option<u16>, reason: String },
}

impl WsClient {
    /// Connects to `path` with extra request headers.
    pub async fn connect(server: &Endpoint, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut request = server
            .ws_url(path)
            .into_client_request()
            .expect("ws request");
        for (name, value) in headers {
            request.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let (ws, res) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect");
        assert_eq!(res.status(), 101);
        Self { ws }
    }

    pub async fn next(&mut self) -> WsNext {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return WsNext::Json(serde_json::from_str(&text).expect("JSON message"));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return WsNext::Closed {
                            code: frame.as_ref().map(|f| u16::from(f.code)),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        };
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("websocket error: {e}"),
                    None => {
                        return WsNext::Closed {
                            code: None,
                            reason: String::new(),
                        };
                    }
                }
            }
        })
        .await
        .expect("timed out waiting for a WebSocket message")
    }

    /// The next `n` run events, in order.
    pub async fn take(&mut self, n: usize) -> Vec<Seen> {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            match self.next().await {
                WsNext::Json(mut value) => {
                    let id = value
                        .as_object_mut()
                        .and_then(|o| o.remove("id"))
                        .and_then(|id| id.as_str().map(str::to_string))
                        .unwrap_or_else(|| panic!("not a run event: {value}"));
                    seen.push(Seen { id, event: value });
                }
                closed => panic!("closed after {} events: {closed:?}", seen.len()),
            }
        }
        seen
    }

    /// Asserts the server closes the socket with `code`.
    pub async fn expect_close(&mut self, code: u16) {
        match self.next().await {
            WsNext::Closed { code: got, .. } => assert_eq!(got, Some(code)),
            other => panic!("expected a close with {code}, got {other:?}"),
        }
    }

    /// Leaves like a browser tab that is closed.
    pub async fn close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
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
