//! Log output of the real binary: with `--log-format json` every stderr line is one JSON
//! object, connections are logged when they open and close (transport, reason, duration),
//! and a fatal error carries its cause chain.

use dormouse_testkit as support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{PATIENCE, SseClient};

/// The `dormouse` binary as a child process whose stderr lines are parsed as JSON.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<Value>,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dormouse"))
            .args(args)
            .env("RUST_LOG", "info,dormouse_gateway=debug")
            .env_remove("DORMOUSE_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dormouse");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one matches; every line read must be a JSON log object.
    fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {what}; saw {:#?}", self.seen));
            let value = parse(&line);
            self.seen.push(value.clone());
            if matches(&value) {
                return value;
            }
        }
    }

    /// Waits for the process to exit and reads the rest of its log.
    fn finish(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "dormouse did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(parse(&line));
        }
        status
    }

    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only if a test failed half-way: never leave the child behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One log line as JSON, with the fields every line must have.
fn parse(line: &str) -> Value {
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line:?}"));
    for key in ["timestamp", "level", "target"] {
        assert!(value[key].is_string(), "no {key} in {line}");
    }
    assert!(
        value["fields"]["message"].is_string(),
        "no message in {line}"
    );
    value
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn json_logs_record_each_connection_and_every_line_parses() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = Server::start(&[
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    let listening = server.wait_for("listening", |v| message(v) == "listening");
    assert_eq!(listening["level"], "INFO");
    let addr = listening["fields"]["addr"].as_str().unwrap().to_string();

    let client = reqwest::Client::new();
    let res = client
        .get(format!("http://{addr}/healthz"))
        // So the connection ends right after the answer rather than idling.
        .header("connection", "close")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(client);
    let opened = server.wait_for("http connection opened", |v| {
        message(v) == "connection opened" && v["fields"]["transport"] == "http"
    });
    let conn = opened["fields"]["conn"].as_u64().expect("a connection id");
    assert_eq!(opened["level"], "DEBUG");
    let closed = server.wait_for("http connection closed", |v| {
        message(v) == "connection closed" && v["fields"]["conn"] == conn
    });
    assert_eq!(closed["fields"]["transport"], "http");
    assert_eq!(closed["fields"]["reason"], "closed", "{:#?}", server.seen);
    assert!(closed["fields"]["duration_ms"].is_u64(), "{closed}");

    // An SSE subscriber still connected at shutdown is told to reconnect; its close says so.
    let sse_client = reqwest::Client::new();
    let mut sse = SseClient::connect_to(
        &sse_client,
        &format!("http://{addr}/v1/channels/logged/events"),
        None,
    )
    .await;
    let opened = server.wait_for("sse connection opened", |v| {
        message(v) == "connection opened" && v["fields"]["transport"] == "sse"
    });
    assert_eq!(opened["fields"]["what"], "logged");
    let sse_conn = opened["fields"]["conn"].as_u64().unwrap();
    server.terminate();
    let reconnect = sse.next().await.expect("a reconnect hint");
    assert_eq!(reconnect.event, "dormouse.reconnect");
    drop(sse);
    assert!(server.finish().success());
    let sse_closed = server
        .seen
        .iter()
        .find(|v| message(v) == "connection closed" && v["fields"]["conn"] == sse_conn)
        .unwrap_or_else(|| panic!("no close line for the SSE stream: {:#?}", server.seen));
    assert_eq!(sse_closed["fields"]["transport"], "sse");
    assert_eq!(sse_closed["fields"]["reason"], "shutdown");
    assert!(
        server.seen.iter().any(|v| message(v) == "stopped"),
        "{:#?}",
        server.seen
    );
}

#[test]
fn a_fatal_error_is_one_json_line_with_its_cause_chain() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let data_dir = file.join("data");
    let mut server = Server::start(&[
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    let status = server.finish();
    assert!(!status.success());
    let error = server
        .seen
        .iter()
        .find(|v| v["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error line: {:#?}", server.seen));
    let text = error["fields"]["error"].as_str().expect("an error field");
    // The context, then the cause underneath it.
    assert!(
        text.starts_with(&format!("opening data dir {}: ", data_dir.display())),
        "{text}"
    );
    assert!(text.contains("Not a directory"), "{text}");
}
