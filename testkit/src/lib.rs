//! What Dormouse's tests share, so each is written once: a real server on an ephemeral port
//! with its own data dir (or a binary run as a child process), and real clients: an SSE
//! client over reqwest, reading with the parser `dormouse tail` uses
//! ([`dormouse_client::sse`]), and a WebSocket client (tokio-tungstenite). Used as a
//! dev-dependency by the gateway's, the `dormouse` binary's and the examples' tests; tests
//! meet the server as a user would.
#![allow(missing_docs)]

pub mod browser;
pub mod nats;
pub mod relay;
pub mod upstream;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dormouse_client::sse::Parser;
use dormouse_gateway::{Dormouse, Settings};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Where a server listens and the HTTP client that talks to it. Every HTTP helper is a
/// method of this, so a test of an in-process [`TestServer`] (which derefs to one) and a test
/// of a server run as a child process (build one from its address) use the same helpers.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
}

/// What a test does to a server once it is open and before it listens, typically mounting
/// its object types; run again on every restart.
type Setup = Arc<dyn Fn(&Dormouse) + Send + Sync>;

/// A running server; [`TestServer::stop`] shuts it down gracefully and checks it exited well.
/// Its [`Endpoint`] methods (`url`, `publish`, `history`, ...) are reached through `Deref`.
pub struct TestServer {
    endpoint: Endpoint,
    pub data_dir: PathBuf,
    /// Kept so the directory lives as long as the server (and across restarts).
    _dir: Option<tempfile::TempDir>,
    /// The settings it was started with, for [`TestServer::restart`].
    settings: Settings,
    setup: Option<Setup>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.endpoint.addr)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for TestServer {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
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
        Self::launch(s, Some(dir), None).await
    }

    /// A server with the test defaults in a temporary data dir of its own, and `setup` run
    /// once it is open and before it listens (mounting the test's objects), again on every
    /// restart.
    pub async fn start_mounted(setup: impl Fn(&Dormouse) + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = settings(dir.path());
        Self::launch(s, Some(dir), Some(Arc::new(setup))).await
    }

    /// A server on `data_dir` (which the caller keeps, say across servers), with the test
    /// defaults changed by `tweak`, and `setup` run once it is open and before it listens
    /// (mounting the test's objects), again on every restart.
    pub async fn start_in(
        data_dir: &Path,
        tweak: impl FnOnce(&mut Settings),
        setup: impl Fn(&Dormouse) + Send + Sync + 'static,
    ) -> Self {
        let mut s = settings(data_dir);
        tweak(&mut s);
        Self::launch(s, None, Some(Arc::new(setup))).await
    }

    async fn launch(
        settings: Settings,
        dir: Option<tempfile::TempDir>,
        setup: Option<Setup>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::launch_on(listener, settings, dir, setup)
    }

    fn launch_on(
        listener: TcpListener,
        settings: Settings,
        dir: Option<tempfile::TempDir>,
        setup: Option<Setup>,
    ) -> Self {
        let data_dir = settings.data_dir.clone();
        let server = Dormouse::open(settings.clone()).expect("open server");
        if let Some(setup) = &setup {
            setup(&server);
        }
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            endpoint: Endpoint::new(addr),
            data_dir,
            _dir: dir,
            settings,
            setup,
            stop: Some(stop),
            task,
        }
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

    /// Stops and starts again as it was started: the same data dir, settings and setup.
    pub async fn restart(mut self) -> Self {
        let (settings, setup) = (self.settings.clone(), self.setup.take());
        let dir = self.stop().await;
        Self::launch(settings, dir, setup).await
    }

    /// Stops and starts again on the same data dir and with the same setup, with the test
    /// defaults changed by `tweak` (the earlier start's tweak is not kept: pass it again if
    /// it still applies).
    pub async fn restart_with(mut self, tweak: impl FnOnce(&mut Settings)) -> Self {
        let (data_dir, setup) = (self.data_dir.clone(), self.setup.take());
        let dir = self.stop().await;
        let mut s = settings(&data_dir);
        tweak(&mut s);
        Self::launch(s, dir, setup).await
    }

    /// Stops and starts again on the same data dir and the same address, for clients that
    /// only know the old URL (a child process) and must find the new server there. The port
    /// was ours a moment ago; another test taking it in between would make this panic.
    pub async fn restart_in_place(mut self, tweak: impl FnOnce(&mut Settings)) -> Self {
        let (addr, data_dir, setup) = (self.addr, self.data_dir.clone(), self.setup.take());
        let dir = self.stop().await;
        let mut s = settings(&data_dir);
        tweak(&mut s);
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the same address again");
        Self::launch_on(listener, s, dir, setup)
    }
}

/// One parsed SSE event (WHATWG: fields joined, `data` lines joined with `\n`), as the
/// CLI's `tail` reads it too.
pub use dormouse_client::sse::Event as SseEvent;

/// An SSE client: parses the stream incrementally, keeps the last id like EventSource.
pub struct SseClient {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    parser: Parser,
    /// Events parsed from a chunk and not yet returned.
    ready: VecDeque<SseEvent>,
    pub last_id: Option<String>,
    pub retry: Option<u64>,
    /// The id the server gave this connection in its `dormouse.connected` event, once read
    /// (`next` takes that event in passing; [`SseClient::connection_id`] waits for it).
    pub connection_id: Option<String>,
}

impl SseClient {
    /// Connects; `last_id` is sent as the `Last-Event-ID` header.
    pub async fn connect(server: &Endpoint, path: &str, last_id: Option<&str>) -> Self {
        Self::connect_to(&server.client, &server.url(path), last_id).await
    }

    /// Connects to any URL (a server run as a child process, say).
    pub async fn connect_to(client: &reqwest::Client, url: &str, last_id: Option<&str>) -> Self {
        let mut req = client.get(url);
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.expect("sse request");
        assert_eq!(res.status(), 200, "sse status for {url}");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert_eq!(res.headers()["cache-control"], "no-cache");
        assert_eq!(res.headers()["x-accel-buffering"], "no");
        Self::reading(res, last_id.map(str::to_string))
    }

    fn reading(res: reqwest::Response, last_id: Option<String>) -> Self {
        Self {
            stream: res.bytes_stream().boxed(),
            parser: Parser::default(),
            ready: VecDeque::new(),
            last_id,
            retry: None,
            connection_id: None,
        }
    }

    /// The next event (comments, retry lines and the `dormouse.connected` event are
    /// consumed on the way); `None` at EOF.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let event = self.next_inner().await?;
                if event.event == "dormouse.connected" {
                    self.note_connected(&event);
                    continue;
                }
                return Some(event);
            }
        })
        .await
        .expect("timed out waiting for an SSE event")
    }

    /// The connection's id, from its first event (read now if it was not yet).
    pub async fn connection_id(&mut self) -> String {
        while self.connection_id.is_none() {
            let event = tokio::time::timeout(PATIENCE, self.next_inner())
                .await
                .expect("timed out waiting for the dormouse.connected event")
                .expect("the stream ended before its dormouse.connected event");
            assert_eq!(
                event.event, "dormouse.connected",
                "the first event names the connection: {event:?}"
            );
            self.note_connected(&event);
        }
        self.connection_id.clone().unwrap_or_default()
    }

    fn note_connected(&mut self, event: &SseEvent) {
        // Its id, when it has one, is where the stream starts (kept as the last id, as
        // EventSource does).
        let value: Value = serde_json::from_str(&event.data).expect("connected JSON");
        assert_eq!(value["type"], "connected", "{value}");
        let id = value["connection_id"].as_str().expect("a connection_id");
        self.connection_id = Some(id.to_string());
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                if let Some(id) = &event.id {
                    self.last_id = Some(id.clone());
                }
                return Some(event);
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => {
                    self.ready.extend(self.parser.feed(&chunk));
                    if let Some(retry) = self.parser.take_retry() {
                        self.retry = Some(retry);
                    }
                }
                _ => return None,
            }
        }
    }
}

/// A WebSocket client.
impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseClient")
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct WsClient {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// The id from the `dormouse-connection-id` header of the handshake's answer (a
    /// channel's socket also says it in its first frame, which `next` takes in passing).
    pub connection_id: Option<String>,
}

impl WsClient {
    pub async fn connect(server: &Endpoint, path: &str) -> Self {
        let (ws, res) = tokio_tungstenite::connect_async(server.ws_url(path))
            .await
            .expect("websocket connect");
        assert_eq!(res.status(), 101);
        Self::from_handshake(ws, &res)
    }

    fn from_handshake(
        ws: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        res: &tokio_tungstenite::tungstenite::handshake::client::Response,
    ) -> Self {
        let connection_id = res
            .headers()
            .get("dormouse-connection-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Self { ws, connection_id }
    }

    /// The next text message parsed as JSON, skipping pings; `None` when the socket closes
    /// (the close frame, if any, is returned as `{"type":"close","code","reason"}`).
    pub async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await? {
                    Ok(Message::Text(t)) => {
                        let value: Value = serde_json::from_str(&t).expect("json");
                        if value["type"] == "connected" {
                            assert_eq!(
                                value["connection_id"].as_str(),
                                self.connection_id.as_deref(),
                                "the first frame names the connection as the header did"
                            );
                            continue;
                        }
                        return Some(value);
                    }
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

    /// The next binary message (a binary-mode event or direct message), skipping the
    /// `connected` greeting and pings; panics on any other text message, which a test
    /// reading binary frames did not expect.
    pub async fn next_binary(&mut self) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Binary(bytes))) => return bytes.to_vec(),
                    Some(Ok(Message::Text(t))) if t.contains(r#""type":"connected""#) => {}
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("expected a binary message, got {other:?}"),
                }
            }
        })
        .await
        .expect("timed out waiting for a binary WebSocket message")
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send");
    }
}

/// A JWT of `claims`, signed HS256 with `secret` (what a server whose `auth.jwt_secret` is
/// `secret` accepts), expiring `ttl_secs` from now (negative: already expired) unless the
/// claims set `exp` themselves. Tests build the claims (`sub`, `dormouse` grants, `info`)
/// and sign them here.
pub fn jwt(secret: &str, ttl_secs: i64, mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_secs();
        claims["exp"] = Value::from(now.saturating_add_signed(ttl_secs));
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a test token")
}

/// A JSON error answer taken apart: (status, `error.code`, `error.message`). Panics when the
/// body is not the documented `{"error": {"code", "message"}}` shape.
pub async fn error_of(res: reqwest::Response) -> (u16, String, String) {
    let status = res.status().as_u16();
    let text = res.text().await.expect("error body");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text:?}"));
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_string();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {body}"))
        .to_string();
    (status, code, message)
}

impl Endpoint {
    /// The endpoint of a server listening at `addr`, with a client of its own.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Publishes `data` to `channel` and returns the id, asserting 201.
    pub async fn publish(&self, channel: &str, data: impl Into<reqwest::Body>) -> String {
        self.publish_to(&format!("/v1/channels/{channel}/messages"), data)
            .await
    }

    pub async fn publish_to(&self, path: &str, data: impl Into<reqwest::Body>) -> String {
        let res = self
            .client
            .post(self.url(path))
            .body(data)
            .send()
            .await
            .expect("publish request");
        assert_eq!(res.status(), 201, "publish status");
        let body: Value = res.json().await.expect("publish json");
        body["id"].as_str().expect("id").to_string()
    }

    /// One unlabelled value of the server's `/metrics`; panics, showing them all, when it
    /// is missing.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics");
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    /// Waits (up to [`PATIENCE`]) until [`Endpoint::metric`] of `name` is `value`.
    pub async fn until_metric(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let now = self.metric(name).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} at {} stays {now}, not {value}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET path` as JSON, asserting `status`.
    pub async fn get_json(&self, path: &str, status: u16) -> Value {
        let res = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("GET request");
        assert_eq!(res.status(), status, "status of GET {path}");
        res.json().await.expect("JSON body")
    }

    /// One page of history as JSON; `query` is `""` or starts with `?`.
    pub async fn history(&self, channel: &str, query: &str) -> Value {
        self.get_json(&format!("/v1/channels/{channel}/messages{query}"), 200)
            .await
    }

    /// Every retained event of `channel`, oldest first, read page by page.
    pub async fn all_history(&self, channel: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = match &after {
                Some(id) => format!("?after={id}&limit=1000"),
                None => "?limit=1000".to_string(),
            };
            let page = self.history(channel, &query).await;
            assert!(page["gap"].is_null(), "unexpected gap: {page}");
            let batch = page["events"].as_array().expect("events").clone();
            if batch.is_empty() {
                return events;
            }
            after = page["next_after"].as_str().map(str::to_string);
            events.extend(batch);
        }
    }

    /// Publishes with an event name (`?event=`), returning the id.
    pub async fn publish_event(
        &self,
        channel: &str,
        event: &str,
        data: impl Into<reqwest::Body>,
    ) -> String {
        self.publish_to(
            &format!("/v1/channels/{channel}/messages?event={event}"),
            data,
        )
        .await
    }
}

impl SseClient {
    /// Connects with extra request headers and returns the raw response when it is not a
    /// stream (for error answers).
    pub async fn try_connect(
        server: &Endpoint,
        path: &str,
        headers: &[(&str, &[u8])],
    ) -> Result<Self, reqwest::Response> {
        let mut req = server.client.get(server.url(path));
        let mut last_id = None;
        for (name, value) in headers {
            let value = reqwest::header::HeaderValue::from_bytes(value).expect("header value");
            if name.eq_ignore_ascii_case("last-event-id") {
                last_id = value.to_str().ok().map(str::to_string);
            }
            req = req.header(*name, value);
        }
        let res = req.send().await.expect("sse request");
        if res.status() != 200 {
            return Err(res);
        }
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Ok(Self::reading(res, last_id))
    }

    /// The next event, asserting it is a message with exactly this id, type and data.
    pub async fn expect_event(&mut self, id: &str, event: &str, data: &str) {
        let got = self
            .next()
            .await
            .expect("an event, not the end of the stream");
        assert_eq!(
            got,
            SseEvent {
                id: Some(id.to_string()),
                event: event.to_string(),
                data: data.to_string(),
            }
        );
    }

    /// The next event, asserting it is the control event `dormouse.<kind>`; returns its JSON.
    pub async fn expect_control(&mut self, kind: &str) -> Value {
        let got = self.next().await.expect("a control event");
        assert_eq!(
            got.event,
            format!("dormouse.{kind}"),
            "control event: {got:?}"
        );
        assert_eq!(got.id, None, "control events carry no id: {got:?}");
        let value: Value = serde_json::from_str(&got.data).expect("control JSON");
        assert_eq!(value["type"], kind, "{value}");
        value
    }
}

/// Frame and message limits for a client that receives very large messages (a 16 MiB payload
/// is larger than one default-sized frame once JSON-escaped or base64-encoded).
pub fn large_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

impl WsClient {
    /// Connects with a custom request (extra headers) and client config; the handshake error
    /// (an HTTP answer other than 101) is returned as is.
    pub async fn try_connect_with(
        server: &Endpoint,
        path: &str,
        headers: &[(&str, &str)],
        config: Option<tokio_tungstenite::tungstenite::protocol::WebSocketConfig>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
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
        let (ws, res) =
            tokio_tungstenite::connect_async_with_config(request, config, false).await?;
        assert_eq!(res.status(), 101);
        Ok(Self::from_handshake(ws, &res))
    }

    /// Connects with extra request headers (`Last-Event-ID`, a credential).
    pub async fn connect_with(server: &Endpoint, path: &str, headers: &[(&str, &str)]) -> Self {
        Self::try_connect_with(server, path, headers, None)
            .await
            .expect("websocket connect")
    }

    /// Asserts the server closes the socket next, with `code`.
    pub async fn expect_close(&mut self, code: u16) {
        let got = self
            .next()
            .await
            .expect("a close frame, not a dropped socket");
        assert_eq!(
            got["type"], "close",
            "expected a close with {code}, got {got}"
        );
        assert_eq!(got["code"], code, "{got}");
    }

    /// Leaves like a browser tab that is closed.
    pub async fn close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
    }

    /// The next message, asserting it is the event with exactly this id, type and text data.
    pub async fn expect_event(&mut self, id: &str, event: &str, data: &str) {
        let got = self
            .next()
            .await
            .expect("a message, not the end of the socket");
        assert_eq!(
            without_channel(got),
            serde_json::json!({"type": "message", "id": id, "event": event, "data": data})
        );
    }
}

/// A WebSocket event without its `channel` field, after checking it names a channel: for
/// tests of one channel, which compare the rest exactly.
pub fn without_channel(mut event: Value) -> Value {
    let channel = event
        .as_object_mut()
        .and_then(|fields| fields.remove("channel"));
    assert!(
        channel
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty()),
        "a WebSocket event names its channel: {event}"
    );
    event
}

/// The handshake a WebSocket client sends, made with reqwest so that an error answer can be
/// read whole: (status, code, message).
pub async fn ws_handshake_error(
    server: &Endpoint,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = server
        .client
        .get(server.url(path))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    error_of(req.send().await.expect("handshake request")).await
}

/// Sends `head` (a request line and headers, without the blank line) over a fresh TCP
/// connection, with `Connection: close`, and no body, whatever the headers announce; returns
/// the status and the body of the answer. For testing what the server decides from the
/// headers alone.
pub async fn raw_request(addr: SocketAddr, head: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes in time")
        .expect("read answer");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, answer[split + 4..].to_vec())
}

/// A server binary run as a child process, configured as an operator configures one
/// (`DORMOUSE_*` variables), for tests that must kill it the way a crash does. Its stdout
/// and stderr go to a log file, shown when it fails to start. Dropping it kills it, so no
/// test leaves one behind whichever way it ends.
pub struct ChildServer {
    child: std::process::Child,
    endpoint: Endpoint,
    log: tempfile::NamedTempFile,
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

impl std::fmt::Debug for ChildServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildServer")
            .field("pid", &self.child.id())
            .field("addr", &self.endpoint.addr)
            .finish()
    }
}

impl ChildServer {
    /// Starts `binary` on a free port with `data_dir` and `vars` (the test's own
    /// `DORMOUSE_*` variables are not passed on), and waits until it says it listens on that
    /// port and answers `/healthz`. A port taken between choosing and binding makes the
    /// child exit; then another port is tried.
    pub async fn start(binary: &Path, data_dir: &Path, vars: &[(&str, &str)]) -> Self {
        for _ in 0..5 {
            // A port nobody listens on right now: bind port 0, read it, let it go.
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let mut command = std::process::Command::new(binary);
            for (key, _) in std::env::vars() {
                if key.starts_with("DORMOUSE_") {
                    command.env_remove(key);
                }
            }
            command
                .env("DORMOUSE_LISTEN", addr.to_string())
                .env("DORMOUSE_DATA_DIR", data_dir)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .envs(vars.iter().copied())
                .stdin(std::process::Stdio::null())
                .stdout(log.reopen().expect("log file"))
                .stderr(log.reopen().expect("log file"));
            let mut server = Self {
                child: command
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn {binary:?}: {e}")),
                endpoint: Endpoint::new(addr),
                log,
            };
            if server.wait_until_serving().await {
                return server;
            }
            let log = server.log_text();
            assert!(
                log.contains("binding"),
                "{binary:?} exited before serving:\n{log}"
            );
        }
        panic!("could not start {binary:?} on a free port in 5 attempts");
    }

    /// True once the child says it listens on its port and answers `/healthz` (so the
    /// answer is its own, not another process's on a reused port); false if it exited.
    async fn wait_until_serving(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let address = self.endpoint.addr.to_string();
        loop {
            if self.child.try_wait().expect("child status").is_some() {
                return false;
            }
            let log = self.log_text();
            if log.contains("listening") && log.contains(&address) {
                let healthy = self
                    .endpoint
                    .client
                    .get(self.endpoint.url("/healthz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if healthy {
                    return true;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server did not start serving in time:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The child's process id (to pause it with SIGSTOP, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap: no shutdown, no flush, exactly like a crash.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().expect("reap the server");
        assert!(!status.success(), "killed, not exited: {status}");
    }
}
