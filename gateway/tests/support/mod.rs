//! A real server on an ephemeral port with its own data dir, and real clients: an SSE stream
//! parser (WHATWG rules) over reqwest, and a WebSocket client (tokio-tungstenite).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dormouse_gateway::{Dormouse, Settings};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A running server; [`TestServer::stop`] shuts it down gracefully and checks it exited well.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Kept so the directory lives as long as the server (and across restarts).
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    pub client: reqwest::Client,
}

/// Test defaults: small limits where that makes tests fast, the rest as shipped.
pub fn settings(data_dir: &Path) -> Settings {
    Settings {
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Settings::default()
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = settings(dir.path());
        tweak(&mut s);
        Self::launch(s, Some(dir)).await
    }

    async fn launch(settings: Settings, dir: Option<tempfile::TempDir>) -> Self {
        let data_dir = settings.data_dir.clone();
        let server = Dormouse::open(settings).expect("open server");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            data_dir,
            _dir: dir,
            stop: Some(stop),
            task,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Graceful stop; returns the data dir's owner so the caller may restart on it.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server exits cleanly");
        self._dir.take()
    }

    /// Stops and starts again on the same data dir with the same settings tweak.
    pub async fn restart_with(self, tweak: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = self.data_dir.clone();
        let dir = self.stop().await;
        let mut s = settings(&data_dir);
        tweak(&mut s);
        Self::launch(s, dir).await
    }

    /// Publishes `data` to `channel` and returns the id, asserting 201.
    pub async fn publish(&self, channel: &str, data: impl Into<reqwest::Body>) -> String {
        let res = self
            .client
            .post(self.url(&format!("/v1/channels/{channel}/messages")))
            .body(data)
            .send()
            .await
            .expect("publish request");
        assert_eq!(res.status(), 201, "publish status");
        let body: Value = res.json().await.expect("publish json");
        body["id"].as_str().expect("id").to_string()
    }
}

/// One parsed SSE event (WHATWG: fields joined, `data` lines joined with `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// An SSE client: parses the stream incrementally, keeps the last id like EventSource.
pub struct SseClient {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    buf: BytesMut,
    pub last_id: Option<String>,
    pub retry: Option<u64>,
    pub comments: usize,
}

impl SseClient {
    /// Connects; `last_id` is sent as the `Last-Event-ID` header.
    pub async fn connect(server: &TestServer, path: &str, last_id: Option<&str>) -> Self {
        let mut req = server.client.get(server.url(path));
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.expect("sse request");
        assert_eq!(res.status(), 200, "sse status for {path}");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert_eq!(res.headers()["cache-control"], "no-cache");
        assert_eq!(res.headers()["x-accel-buffering"], "no");
        Self {
            stream: res.bytes_stream().boxed(),
            buf: BytesMut::new(),
            last_id: last_id.map(str::to_string),
            retry: None,
            comments: 0,
        }
    }

    /// The next event (comments and retry lines are consumed on the way); `None` at EOF.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(PATIENCE, self.next_inner())
            .await
            .expect("timed out waiting for an SSE event")
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
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

    /// Parses one complete event block from the buffer, if there is one.
    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = find_blank_line(&self.buf)?;
            let block = self.buf.split_to(end.0);
            let _ = self.buf.split_to(end.1);
            let text = String::from_utf8(block.to_vec()).expect("SSE is UTF-8");
            let mut id = None;
            let mut event = None;
            let mut data: Vec<&str> = Vec::new();
            for line in text.split('\n') {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "id" => id = Some(value.to_string()),
                    "event" => event = Some(value.to_string()),
                    "data" => data.push(value),
                    "retry" => self.retry = value.parse().ok(),
                    _ => {}
                }
            }
            if let Some(id) = &id {
                self.last_id = Some(id.clone());
            }
            if !data.is_empty() {
                return Some(SseEvent {
                    id,
                    event: event.unwrap_or_else(|| "message".to_string()),
                    data: data.join("\n"),
                });
            }
        }
    }
}

/// (end of block, length of the blank-line terminator) for `\n\n` (the server only sends LF).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2))
}

/// A WebSocket client.
pub struct WsClient {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl WsClient {
    pub async fn connect(server: &TestServer, path: &str) -> Self {
        let (ws, res) = tokio_tungstenite::connect_async(server.ws_url(path))
            .await
            .expect("websocket connect");
        assert_eq!(res.status(), 101);
        Self { ws }
    }

    /// The next text message parsed as JSON, skipping pings; `None` when the socket closes
    /// (the close frame, if any, is returned as `{"type":"close","code","reason"}`).
    pub async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await? {
                    Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("json")),
                    Ok(Message::Close(frame)) => {
                        return Some(serde_json::json!({
                            "type": "close",
                            "code": frame.as_ref().map(|f| u16::from(f.code)),
                            "reason": frame.as_ref().map(|f| f.reason.to_string()),
                        }));
                    }
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        })
        .await
        .expect("timed out waiting for a WebSocket message")
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send");
    }
}
