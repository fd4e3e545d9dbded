//! The client commands of the `dormouse` binary, as a user meets them: the real binary runs
//! as a child process against a real server, and the tests read what it prints and how it
//! exits.

use dormouse_testkit as support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use dormouse_gateway::{ByteSize, Settings};
use serde_json::{Value, json};
use support::{PATIENCE, TestServer};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

const SECRET: &str = "cli-test-secret-long-enough-for-hs256!!";

/// The binary with none of the caller's `DORMOUSE_*` settings, pointed at `url`.
fn dormouse(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dormouse"));
    for (key, _) in std::env::vars() {
        if key.starts_with("DORMOUSE_") {
            command.env_remove(key);
        }
    }
    command
        .env("DORMOUSE_URL", url)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    /// Asserts exit 0 and returns stdout's lines.
    fn ok_lines(&self) -> Vec<String> {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self.stdout.lines().map(str::to_string).collect()
    }

    /// Asserts a failure with exit code `code` whose stderr has every one of `needles`.
    fn assert_fails(&self, code: i32, needles: &[&str]) {
        assert_eq!(self.code, code, "exit code: {self:?}");
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "stderr lacks {needle:?}: {self:?}"
            );
        }
    }
}

/// Runs `args` to completion, with `stdin` as its standard input.
async fn run(url: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_command(dormouse(url), args, stdin).await
}

async fn run_command(mut command: Command, args: &[&str], stdin: Option<&[u8]>) -> Output {
    command.args(args);
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().expect("spawn dormouse");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        // Written concurrently: a large input must not block on a full pipe while the
        // child waits for us to read its output.
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
        });
    }
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("dormouse {args:?} did not finish in time"))
        .expect("wait for dormouse");
    Output {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Publishes with the CLI and returns the id it printed.
async fn publish(url: &str, args: &[&str]) -> String {
    let lines = run(url, args, None).await.ok_lines();
    assert_eq!(lines.len(), 1, "one id: {lines:?}");
    lines[0].clone()
}

/// A running `dormouse tail`, read line by line while it runs.
struct Tail {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
}

impl Tail {
    fn spawn(url: &str, args: &[&str]) -> Self {
        let mut command = dormouse(url);
        command.arg("tail").args(args);
        let mut child = command.spawn().expect("spawn dormouse tail");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// The next line printed, as JSON (`--json` mode).
    async fn next_json(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.stdout.next_line())
            .await
            .expect("tail printed nothing in time")
            .expect("read tail output")
            .expect("tail ended early");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// Waits for the exit; returns the exit code, the rest of stdout and all of stderr.
    async fn finish(mut self) -> (i32, String, String) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("tail exits in time")
            .expect("wait for tail");
        let mut rest = String::new();
        while let Ok(Some(line)) = self.stdout.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        let stderr = self.stderr.await.expect("stderr reader");
        (status.code().expect("exited"), rest, stderr)
    }
}

fn message(id: &str, event: &str, data: &str) -> Value {
    json!({"type": "message", "id": id, "event": event, "data": data})
}

/// Quick reconnects: a test waits for the retry hint after each interruption.
fn fast_retry(s: &mut Settings) {
    s.sse.retry = Duration::from_millis(100);
}

#[tokio::test]
async fn publish_then_tail_prints_exactly_the_events_after_the_cursor() {
    let server = TestServer::start().await;
    let url = server.url("");
    let files = tempfile::tempdir().unwrap();
    let blob = files.path().join("blob.bin");
    std::fs::write(&blob, [0u8, 1, 2, 255]).unwrap();

    let first = publish(&url, &["publish", "news", "first"]).await;
    let second = publish(&url, &["publish", "news", "second", "--event", "greeting"]).await;
    // No DATA: the message is standard input, line breaks and all.
    let third = run(&url, &["publish", "news"], Some(b"third\nline two"))
        .await
        .ok_lines()
        .remove(0);
    let fourth = run(&url, &["publish", "news", "-"], Some(b"fourth"))
        .await
        .ok_lines()
        .remove(0);
    let fifth = publish(&url, &["publish", "news", "--file", blob.to_str().unwrap()]).await;

    let ids = [&first, &second, &third, &fourth, &fifth];
    for pair in ids.windows(2) {
        assert_ne!(pair[0], pair[1]);
    }
    let history = server.all_history("news").await;
    let stored: Vec<&str> = history.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(stored, ids.map(String::as_str));

    let mut tail = Tail::spawn(&url, &["news", "--from", &first, "--count", "4", "--json"]);
    assert_eq!(
        tail.next_json().await,
        message(&second, "greeting", "second")
    );
    assert_eq!(
        tail.next_json().await,
        message(&third, "message", "third\nline two")
    );
    assert_eq!(
        tail.next_json().await,
        message(&fourth, "message", "fourth")
    );
    assert_eq!(
        tail.next_json().await,
        json!({"type": "message", "id": fifth, "event": "message", "data_base64": "AAEC/w=="})
    );
    let (code, rest, stderr) = tail.finish().await;
    assert_eq!((code, rest.as_str()), (0, ""), "{stderr}");
    // The connection's id goes to standard error, never among the events.
    assert!(stderr.contains("connected as "), "{stderr}");

    // Text output: id, event and data, tab-separated.
    let text = run(
        &url,
        &["tail", "news", "--from", &first, "--count", "1"],
        None,
    )
    .await;
    assert_eq!(text.ok_lines(), vec![format!("{second}\tgreeting\tsecond")]);

    // Live: events published after tail connected arrive too (the cursor makes the order
    // of connecting and publishing irrelevant).
    let mut live = Tail::spawn(&url, &["news", "--from", &fifth, "--count", "1", "--json"]);
    let sixth = server.publish("news", "sixth").await;
    assert_eq!(live.next_json().await, message(&sixth, "message", "sixth"));
    assert_eq!(live.finish().await.0, 0);

    server.stop().await;
}

#[tokio::test]
async fn tail_resumes_with_its_last_id_after_a_server_restart() {
    let server = TestServer::start_with(fast_retry).await;
    let url = server.url("");
    let base = server.publish("news", "before").await;
    let mut tail = Tail::spawn(&url, &["news", "--from", &base, "--count", "3", "--json"]);
    let one = server.publish("news", "one").await;
    assert_eq!(tail.next_json().await, message(&one, "message", "one"));

    let server = server.restart_in_place(fast_retry).await;
    let two = server.publish("news", "two").await;
    let three = server.publish("news", "three").await;
    assert_eq!(tail.next_json().await, message(&two, "message", "two"));
    assert_eq!(tail.next_json().await, message(&three, "message", "three"));
    let (code, rest, stderr) = tail.finish().await;
    assert_eq!((code, rest.as_str()), (0, ""), "{stderr}");
    assert!(
        stderr.contains("server asked to reconnect: shutdown"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("after {one}")), "{stderr}");
    assert!(stderr.contains("reconnected"), "{stderr}");

    server.stop().await;
}

/// A TCP forwarder whose open connections can be cut at once, as a network blip or a proxy
/// restart would, without the server saying goodbye.
struct Cutter {
    addr: std::net::SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Cutter {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let list = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            connections,
            accept,
        }
    }

    /// Drops every open connection; new ones are still forwarded.
    fn cut(&self) -> usize {
        let tasks = std::mem::take(&mut *self.connections.lock().unwrap());
        let live = tasks.iter().filter(|t| !t.is_finished()).count();
        for task in tasks {
            task.abort();
        }
        live
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test]
async fn tail_resumes_with_its_last_id_after_a_dropped_connection() {
    let server = TestServer::start_with(fast_retry).await;
    let cutter = Cutter::start(server.addr).await;
    let via = format!("http://{}", cutter.addr);
    let base = server.publish("news", "before").await;
    let mut tail = Tail::spawn(&via, &["news", "--from", &base, "--count", "3", "--json"]);
    let one = server.publish("news", "one").await;
    assert_eq!(tail.next_json().await, message(&one, "message", "one"));

    assert_eq!(cutter.cut(), 1, "tail's one connection was cut");
    // Published while tail is away: it gets them on resuming, from the replay buffer.
    let two = server.publish("news", "two").await;
    let three = server.publish("news", "three").await;
    assert_eq!(tail.next_json().await, message(&two, "message", "two"));
    assert_eq!(tail.next_json().await, message(&three, "message", "three"));
    let (code, rest, stderr) = tail.finish().await;
    assert_eq!((code, rest.as_str()), (0, ""), "{stderr}");
    assert!(stderr.contains("connection lost"), "{stderr}");
    assert!(stderr.contains(&format!("after {one}")), "{stderr}");
    assert!(stderr.contains("reconnected"), "{stderr}");

    drop(cutter);
    server.stop().await;
}

#[tokio::test]
async fn bulk_lines_are_published_in_order_one_id_per_line() {
    // Retain every line, to compare all of them.
    let server = TestServer::start_with(|s| s.channels.max_events = 10_000).await;
    let url = server.url("");
    // 2,500 lines: three batches of at most 1,000, with an empty line (skipped), a CRLF
    // ending, and bytes that are not UTF-8.
    let mut input = Vec::new();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for i in 0..2500 {
        let line = match i {
            10 => b"windows line".to_vec(),
            20 => vec![0xff, 0xfe, b'x'],
            _ => format!("row {i}").into_bytes(),
        };
        input.extend_from_slice(&line);
        input.extend_from_slice(if i == 10 { b"\r\n" } else { b"\n" });
        if i == 30 {
            input.push(b'\n');
        }
        expected.push(line);
    }
    let out = run(
        &url,
        &["publish", "rows", "--lines", "--event", "row"],
        Some(&input),
    )
    .await;
    let ids = out.ok_lines();
    assert_eq!(ids.len(), 2500, "one id per non-empty line");
    assert_eq!(
        out.stderr, "",
        "no progress bar or chatter without a terminal"
    );

    let history = server.all_history("rows").await;
    assert_eq!(history.len(), 2500);
    for (i, ((event, id), data)) in history.iter().zip(&ids).zip(&expected).enumerate() {
        assert_eq!(event["id"], id.as_str(), "line {i}");
        assert_eq!(event["event"], "row", "line {i}");
        let stored = match event["data"].as_str() {
            Some(text) => text.as_bytes().to_vec(),
            None => base64::engine::general_purpose::STANDARD
                .decode(event["data_base64"].as_str().unwrap())
                .unwrap(),
        };
        assert_eq!(&stored, data, "line {i}");
    }

    // From a file, with no trailing newline.
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("rows.txt");
    std::fs::write(&path, "a\nb\nc").unwrap();
    let ids = run(
        &url,
        &[
            "publish",
            "file-rows",
            "--lines",
            "--file",
            path.to_str().unwrap(),
        ],
        None,
    )
    .await
    .ok_lines();
    let history = server.all_history("file-rows").await;
    let stored: Vec<(&str, &str)> = history
        .iter()
        .map(|e| (e["id"].as_str().unwrap(), e["data"].as_str().unwrap()))
        .collect();
    assert_eq!(
        stored,
        vec![(&*ids[0], "a"), (&*ids[1], "b"), (&*ids[2], "c")]
    );

    // An import run again with the same key (as after a cut) stores only the lines not
    // stored yet, and prints the ids the others got the first time.
    let keyed = [
        "publish",
        "imports",
        "--lines",
        "--idempotency-key",
        "import-1",
    ];
    let first = run(&url, &keyed, Some(b"one\ntwo\n")).await.ok_lines();
    let again = run(&url, &keyed, Some(b"one\ntwo\nthree\n"))
        .await
        .ok_lines();
    assert_eq!(again[..2], first[..]);
    let stored: Vec<String> = server
        .all_history("imports")
        .await
        .iter()
        .map(|e| e["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored, ["one", "two", "three"]);
    // A key too long to carry every line's number is refused before anything is sent.
    let long = "k".repeat(190);
    run(
        &url,
        &["publish", "imports", "--lines", "--idempotency-key", &long],
        Some(b"x\n"),
    )
    .await
    .assert_fails(1, &["at most 179 characters"]);
    // Without a key, each run is its own: the same lines are stored again.
    let plain = ["publish", "imports", "--lines"];
    run(&url, &plain, Some(b"one\n")).await.ok_lines();
    run(&url, &plain, Some(b"one\n")).await.ok_lines();
    assert_eq!(server.all_history("imports").await.len(), 5);

    server.stop().await;
}

#[tokio::test]
async fn bulk_lines_from_a_slow_producer_are_sent_when_it_pauses() {
    let server = TestServer::start().await;
    let mut command = dormouse(&server.url(""));
    command
        .args(["publish", "logs", "--lines"])
        .stdin(Stdio::piped());
    let mut child = command.spawn().expect("spawn dormouse");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_id = async || {
        tokio::time::timeout(PATIENCE, stdout.next_line())
            .await
            .expect("an id while the input is still open")
            .unwrap()
            .expect("a line")
    };
    // Far fewer lines than a batch, and the input stays open: they go out anyway.
    stdin.write_all(b"one\ntwo\n").await.unwrap();
    let (one, two) = (next_id().await, next_id().await);
    stdin.write_all(b"three\n").await.unwrap();
    let three = next_id().await;
    drop(stdin);
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let history = server.all_history("logs").await;
    let stored: Vec<(&str, &str)> = history
        .iter()
        .map(|e| (e["id"].as_str().unwrap(), e["data"].as_str().unwrap()))
        .collect();
    assert_eq!(stored, [(&*one, "one"), (&*two, "two"), (&*three, "three")]);
    server.stop().await;
}

#[tokio::test]
async fn bulk_lines_report_each_refused_line_and_exit_1() {
    let server = TestServer::start_with(|s| s.limits.max_message_size = ByteSize(64)).await;
    let url = server.url("");
    let long = "x".repeat(100);
    let input = format!("ok 1\n{long}\nok 3\n");
    let out = run(
        &url,
        &["publish", "rows", "--lines", "--batch-size", "2"],
        Some(input.as_bytes()),
    )
    .await;
    out.assert_fails(
        1,
        &[
            "line 2: payload_too_large",
            "1 of 3 lines were not published",
        ],
    );
    let history = server.all_history("rows").await;
    let data: Vec<&str> = history
        .iter()
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["ok 1", "ok 3"]);
    let printed: Vec<&str> = out.stdout.lines().collect();
    let stored: Vec<&str> = history.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(printed, stored, "ids of what was published, nothing else");

    server.stop().await;
}

#[tokio::test]
async fn channels_lists_every_channel_with_its_state_and_describes_one() {
    let server = TestServer::start().await;
    let url = server.url("");
    server.publish("news", "1").await;
    server.publish("news", "2").await;
    let last = server.publish("chat:room-7", "hi").await;
    server.publish("a", "x").await;

    let mut rows: Vec<Value> = run(&url, &["channels", "--json"], None)
        .await
        .ok_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    rows.sort_by_key(|r| r["channel"].as_str().unwrap().to_string());
    let summary: Vec<(&str, &str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["channel"].as_str().unwrap(),
                r["state"].as_str().unwrap(),
                r["events"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a", "active", 1),
            ("chat:room-7", "active", 1),
            ("news", "active", 2)
        ]
    );

    let table = run(&url, &["channels"], None).await.ok_lines();
    assert!(table[0].starts_with("CHANNEL"), "{table:?}");
    assert!(
        table
            .iter()
            .any(|l| l.starts_with("chat:room-7") && l.contains("active") && l.ends_with(&last)),
        "{table:?}"
    );
    assert!(
        table.last().unwrap().starts_with("3 channels with events"),
        "{table:?}"
    );

    let one = run(&url, &["channels", "chat:room-7", "--json"], None)
        .await
        .ok_lines();
    let info: Value = serde_json::from_str(&one[0]).unwrap();
    assert_eq!(info["last_id"], last.as_str());
    assert_eq!(info["events"], 1);

    run(&url, &["channels", "missing"], None)
        .await
        .assert_fails(
            1,
            &[
                "404",
                "not_found",
                "channel \"missing\" has no events and no subscribers",
            ],
        );

    server.stop().await;
}

/// The claims of a JWT, read without verifying (the server does that).
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn minted_tokens_are_accepted_and_hold_exactly_their_capabilities() {
    let server = TestServer::start_with(|s| s.auth.jwt_secret = SECRET.to_string()).await;
    let url = server.url("");

    let token = run(
        &url,
        &[
            "token",
            "--secret",
            SECRET,
            "--publish",
            "chat:*",
            "--subscribe",
            "chat:*",
            "--sub",
            "alice",
            "--ttl",
            "10m",
        ],
        None,
    )
    .await
    .ok_lines()
    .remove(0);
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(
        claims["dormouse"],
        json!({"publish": ["chat:*"], "subscribe": ["chat:*"], "history": [], "objects": [],
               "admin": false, "metrics": false, "connections": false})
    );
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 600);

    // Accepted: publish and tail on a granted channel.
    let id = publish(&url, &["publish", "chat:1", "hi", "--token", &token]).await;
    let mut tail = Tail::spawn(
        &url,
        &[
            "chat:1", "--from", &id, "--count", "1", "--json", "--token", &token,
        ],
    );
    let next = server
        .client
        .post(server.url("/v1/channels/chat:1/messages"))
        .bearer_auth(&token)
        .body("there")
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 201);
    let next: Value = next.json().await.unwrap();
    let next = next["id"].as_str().unwrap();
    assert_eq!(tail.next_json().await, message(next, "message", "there"));
    assert_eq!(tail.finish().await.0, 0);

    // Refused with the server's own reason: another channel, and the admin-only list.
    run(&url, &["publish", "news", "hi", "--token", &token], None)
        .await
        .assert_fails(
            1,
            &[
                "403",
                "forbidden",
                "alice lacks the publish capability for channel \"news\"",
            ],
        );
    run(&url, &["tail", "news", "--token", &token], None)
        .await
        .assert_fails(1, &["403", "forbidden", "subscribe capability"]);
    run(&url, &["channels", "--token", &token], None)
        .await
        .assert_fails(1, &["403", "alice lacks the admin capability"]);
    // No token at all.
    run(&url, &["publish", "chat:1", "hi"], None)
        .await
        .assert_fails(1, &["401", "missing_credential"]);

    // The secret and the token from the environment; an admin token lists channels.
    let mut command = dormouse(&url);
    command.env("DORMOUSE_AUTH_JWT_SECRET", SECRET);
    let admin = run_command(command, &["token", "--admin"], None)
        .await
        .ok_lines()
        .remove(0);
    let mut command = dormouse(&url);
    command.env("DORMOUSE_TOKEN", &admin);
    let lines = run_command(command, &["channels", "--json"], None)
        .await
        .ok_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&lines[0]).unwrap()["channel"],
        "chat:1"
    );

    // Signed with another secret: refused by signature.
    let forged = run(
        &url,
        &["token", "--secret", &"y".repeat(40), "--publish", "*"],
        None,
    )
    .await
    .ok_lines()
    .remove(0);
    run(&url, &["publish", "chat:1", "hi", "--token", &forged], None)
        .await
        .assert_fails(1, &["401", "bad_token", "signature"]);

    server.stop().await;
}

#[tokio::test]
async fn issuer_and_audience_claims_match_what_the_server_requires() {
    let server = TestServer::start_with(|s| {
        s.auth.jwt_secret = SECRET.to_string();
        s.auth.issuer = "https://issuer.test".to_string();
        s.auth.audience = "dormouse".to_string();
    })
    .await;
    let url = server.url("");
    let mint = |extra: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut args = vec!["token", "--secret", SECRET, "--publish", "*"];
            args.extend_from_slice(extra);
            run(&url, &args, None).await.ok_lines().remove(0)
        }
    };
    let good = mint(&["--iss", "https://issuer.test", "--aud", "dormouse"]).await;
    publish(&url, &["publish", "jobs", "x", "--token", &good]).await;
    let wrong_aud = mint(&["--iss", "https://issuer.test", "--aud", "other"]).await;
    run(&url, &["publish", "jobs", "x", "--token", &wrong_aud], None)
        .await
        .assert_fails(1, &["401", "bad_token"]);
    let no_iss = mint(&["--aud", "dormouse"]).await;
    run(&url, &["publish", "jobs", "x", "--token", &no_iss], None)
        .await
        .assert_fails(1, &["401", "bad_token", "iss"]);
    let no_aud = mint(&["--iss", "https://issuer.test"]).await;
    run(&url, &["publish", "jobs", "x", "--token", &no_aud], None)
        .await
        .assert_fails(1, &["401", "bad_token", "aud"]);

    server.stop().await;
}

#[tokio::test]
async fn eddsa_tokens_minted_from_a_pem_private_key_are_accepted() {
    use ring::signature::KeyPair as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    // SubjectPublicKeyInfo for Ed25519: a fixed 12-byte prefix, then the 32-byte key.
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    let keys = tempfile::tempdir().unwrap();
    let public = keys.path().join("issuer.pem");
    let private = keys.path().join("issuer.key");
    std::fs::write(
        &public,
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            b64.encode(&spki)
        ),
    )
    .unwrap();
    std::fs::write(
        &private,
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64.encode(pkcs8.as_ref())
        ),
    )
    .unwrap();
    let server = TestServer::start_with(|s| s.auth.jwt_public_key_file = public.clone()).await;
    let url = server.url("");

    let token = run(
        &url,
        &[
            "token",
            "--key",
            private.to_str().unwrap(),
            "--history",
            "jobs",
            "--publish",
            "jobs",
        ],
        None,
    )
    .await
    .ok_lines()
    .remove(0);
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    publish(&url, &["publish", "jobs", "done", "--token", &token]).await;
    // The public key is not a private key.
    run(
        &url,
        &["token", "--key", public.to_str().unwrap(), "--publish", "*"],
        None,
    )
    .await
    .assert_fails(1, &["not a PEM private key"]);

    server.stop().await;
}

#[tokio::test]
async fn failures_exit_nonzero_with_a_clear_reason() {
    let server = TestServer::start().await;
    let url = server.url("");

    // Nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    for args in [
        &["publish", "news", "x"][..],
        &["tail", "news"],
        &["channels"],
    ] {
        run(&closed, args, None)
            .await
            .assert_fails(1, &["cannot reach the server at"]);
    }

    // Usage errors exit 2.
    run(
        &url,
        &["publish", "news", "x", "--url", "localhost:8080"],
        None,
    )
    .await
    .assert_fails(2, &["--url"]);
    run(&url, &["publish"], None)
        .await
        .assert_fails(2, &["CHANNEL"]);
    run(&url, &["publish", "news", "x", "--file", "f"], None)
        .await
        .assert_fails(2, &["cannot be used with"]);
    run(&url, &["token", "--publish", "*"], None)
        .await
        .assert_fails(2, &["--secret"]);
    run(
        &url,
        &["token", "--secret", "short", "--publish", "*"],
        None,
    )
    .await
    .assert_fails(2, &["at least 32"]);

    // The server's refusals, with its code and message.
    run(&url, &["publish", "bad name", "x"], None)
        .await
        .assert_fails(1, &["400", "bad_channel_name", "got ' ' in \"bad name\""]);
    run(
        &url,
        &["publish", "news", "x", "--event", "no:colons"],
        None,
    )
    .await
    .assert_fails(1, &["bad_event_name"]);
    run(&url, &["tail", "news", "--from", "not-an-id"], None)
        .await
        .assert_fails(1, &["400", "bad_event_id"]);
    let missing = files_path("missing.txt");
    run(&url, &["publish", "news", "--file", &missing], None)
        .await
        .assert_fails(1, &["reading", "missing.txt"]);

    server.stop().await;
}

/// A path in a directory that exists but holds no such file.
fn files_path(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("dormouse-cli-test-absent-{}", std::process::id()))
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// `dormouse cluster check` against a real three-server NATS cluster: every server
/// qualifies, and a replicated fenced append works while a stale one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_check_passes_on_a_nats_cluster_that_fences() {
    let cluster = support::nats::NatsCluster::start(3).await;
    let mut args = vec!["cluster", "check", "--json"];
    let urls = cluster.urls();
    for url in &urls {
        args.extend(["--nats-url", url.as_str()]);
    }
    let lines = run("http://unused", &args, None).await.ok_lines();
    let report: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["replicas"], 3);
    assert!(report["append_ms"].as_f64().unwrap() > 0.0, "{report}");
    let servers = report["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 3);
    for server in servers {
        assert_eq!(server["version"], "2.15.1", "{server}");
        assert_eq!(server["problem"], Value::Null, "{server}");
    }
}

/// One server of the list runs a release that cannot fence: the check fails, naming it,
/// though the others would do; without any URL it is a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_check_names_a_server_that_cannot_fence() {
    let cluster = support::nats::NatsCluster::start(3).await;
    let old = support::nats::fake_nats_server(
        r#"{"server_id":"OLD","server_name":"old-nats","version":"2.9.10","proto":1,"headers":true,"jetstream":true,"max_payload":1048576}"#,
    )
    .await;
    let first = cluster.url(0);
    let out = run(
        "http://unused",
        &["cluster", "check", "--nats-url", &first, "--nats-url", &old],
        None,
    )
    .await;
    out.assert_fails(1, &["cannot carry cluster mode"]);
    let refused = out
        .stdout
        .lines()
        .find(|line| line.starts_with("refused"))
        .unwrap_or_else(|| panic!("a refused server: {out:?}"));
    assert!(
        refused.contains(&old) && refused.contains("old-nats") && refused.contains("2.9.10"),
        "{refused}"
    );
    assert!(out.stdout.contains(&format!("ok       {first}")), "{out:?}");

    run("http://unused", &["cluster", "check"], None)
        .await
        .assert_fails(2, &["cluster.nats_urls is empty"]);
}

/// A server configured for a cluster whose NATS servers cannot carry it refuses to start,
/// naming the server and why, rather than run alone: one too old to fence, none answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_refuses_to_start_on_nats_that_cannot_carry_it_saying_why() {
    let old = support::nats::fake_nats_server(
        r#"{"server_id":"OLD","server_name":"old-nats","version":"2.9.10","proto":1,"headers":true,"jetstream":true,"max_payload":1048576}"#,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    for (url, says) in [
        (old.as_str(), ["old-nats", "2.9.10"]),
        (
            "nats://127.0.0.1:1",
            ["nats://127.0.0.1:1", "joining the cluster"],
        ),
    ] {
        let mut command = dormouse("http://unused");
        command
            .env("DORMOUSE_CLUSTER_NATS_URLS", url)
            .env("DORMOUSE_DATA_DIR", dir.path());
        let out = run_command(command, &["serve", "--listen", "127.0.0.1:0"], None).await;
        assert_ne!(out.code, 0, "{out:?}");
        assert!(
            says.iter().all(|s| out.stderr.contains(s)),
            "{url}: {out:?}"
        );
    }
}

/// Presence as `tail` shows it: joins and leaves on standard error, and as lines with
/// `--json`, between the events.
#[tokio::test]
async fn tail_shows_who_joins_and_leaves_a_channel_with_presence() {
    let server = TestServer::start_with(|s| {
        s.auth.jwt_secret = SECRET.to_string();
        s.channels.presence = true;
    })
    .await;
    let url = server.url("");
    let mint = |sub: &'static str| {
        let url = url.clone();
        async move {
            let args = [
                "token",
                "--secret",
                SECRET,
                "--subscribe",
                "room",
                "--publish",
                "room",
                "--sub",
                sub,
            ];
            run(&url, &args, None).await.ok_lines().remove(0)
        }
    };
    let (alice, bob) = (mint("alice").await, mint("bob").await);
    let mut tail = Tail::spawn(&url, &["room", "--count", "1", "--json", "--token", &alice]);
    assert_eq!(
        tail.next_json().await,
        json!({"type": "join", "channel": "room", "subject": "alice"})
    );
    let visitor =
        support::WsClient::connect(&server, &format!("/v1/channels/room/ws?access_token={bob}"))
            .await;
    assert_eq!(
        tail.next_json().await,
        json!({"type": "join", "channel": "room", "subject": "bob"})
    );
    visitor.close().await;
    assert_eq!(
        tail.next_json().await,
        json!({"type": "leave", "channel": "room", "subject": "bob"})
    );
    let id = publish(&url, &["publish", "room", "bye", "--token", &alice]).await;
    assert_eq!(tail.next_json().await, message(&id, "message", "bye"));
    let (code, _, stderr) = tail.finish().await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("join: bob") && stderr.contains("leave: bob"),
        "{stderr}"
    );
}
