//! The JavaScript client (`clients/js`) against the real server: its own tests, in Node's
//! test runner, start this crate's `dormouse` binary (restarting it, cutting its network,
//! expiring tokens) and talk to it only through the library, as an app does.

use std::path::Path;
use std::process::Command;

/// `node` and the flags its WebSocket needs: Node 22 has one built in, Node 20 behind
/// `--experimental-websocket`.
fn node() -> (String, Vec<&'static str>) {
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".to_string());
    let probe = Command::new(&node)
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the JavaScript client's tests need Node.js 20 or later ({node}: {e}); install \
                 it (`.ci/run` installs the pinned one from PyPI, .ci/node.txt, when the \
                 machine has none: Debian 12's nodejs is 18) or name it with NODE=/path/to/node"
            )
        });
    let flags = if probe.status.success() {
        vec![]
    } else {
        vec!["--experimental-websocket"]
    };
    (node, flags)
}

#[test]
fn the_javascript_client_passes_its_tests_against_the_server() {
    let (node, args) = node();
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    // The test files by name: Node 20 expands a directory, Node 22 reads its arguments as
    // file patterns and does not.
    let mut files: Vec<String> = std::fs::read_dir(clients.join("test"))
        .expect("clients/js/test")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.mjs"))
        .map(|name| format!("test/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no clients/js/test/*.test.mjs");
    let output = Command::new(&node)
        .args(&args)
        .args(["--test", "--test-reporter=spec"])
        .args(&files)
        .current_dir(&clients)
        .env("DORMOUSE_BIN", env!("CARGO_BIN_EXE_dormouse"))
        .output()
        .expect("run node --test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "node --test failed:\n{text}");
    // Not vacuous: the runner found and ran the tests.
    assert!(text.contains("pass") && !text.contains("tests 0"), "{text}");
}

/// A page at `url` (the origin the library's client talks to) with the library imported
/// as `window.lib`, by URL, as a browser loads a module.
async fn with_library(
    browser: &dormouse_testkit::browser::Browser,
    url: &str,
) -> dormouse_testkit::browser::Cdp {
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js/dormouse.js"),
    )
    .expect("read clients/js/dormouse.js");
    let mut page = browser.open(url).await;
    page.until("the page", "document.readyState", |v| v == "complete")
        .await;
    let import = format!(
        "(async () => {{
            const url = URL.createObjectURL(new Blob([{}], {{type: 'text/javascript'}}));
            window.lib = await import(url);
            return typeof lib.Dormouse;
        }})()",
        serde_json::Value::String(source)
    );
    assert_eq!(page.eval(&import).await, "function");
    page
}

/// Asserts the page's `got` stays at `count` messages a while longer (nothing arrives
/// twice), then closes its client.
async fn nothing_more_then_close(
    page: &mut dormouse_testkit::browser::Cdp,
    count: u64,
    transport: &str,
) {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        page.eval("got.length").await,
        count,
        "{transport}: nothing twice"
    );
    page.eval("client.close(); true").await;
}

/// The library in the browser it is for: headless Chromium imports it (the page is the
/// server's own origin, as an app's would be behind one host), follows two channels on one
/// connection over each transport, publishes, and keeps every message exactly once across
/// a server restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_client_resumes_every_channel_across_a_server_restart() {
    use dormouse_testkit::TestServer;
    use dormouse_testkit::browser::Browser;
    use serde_json::Value;
    let tweak = |s: &mut dormouse_gateway::Settings| {
        s.sse.retry = std::time::Duration::from_millis(300);
        s.channels.presence = true;
    };
    let mut server = TestServer::start_with(tweak).await;
    let browser = Browser::launch().await;
    let mut page = with_library(&browser, &server.url("/healthz")).await;

    for transport in ["websocket", "sse"] {
        let (news, chat) = (format!("news-{transport}"), format!("chat-{transport}"));
        page.eval(&format!(
            r#"window.got = []; window.joins = [];
               window.client = new lib.Dormouse({{url: location.origin, transport: "{transport}",
                                                 backoff: {{initialMs: 100, maxMs: 500}}}});
               for (const name of ["{news}", "{chat}"]) {{
                 const sub = client.subscribe(name);
                 sub.on("message", m => got.push([m.channel, m.id, m.data]));
                 sub.on("join", m => joins.push(m.subject));
               }}
               true"#
        ))
        .await;
        page.until("both channels followed", "joins.length", |v| v == 2)
            .await;
        let n1 = server.publish(&news, "n1").await;
        let mine = page
            .eval(&format!(
                r#"client.publish("{chat}", "from the page").then(r => r.id)"#
            ))
            .await;
        page.until("two messages", "got.length", |v| v == 2).await;

        server = server.restart_in_place(tweak).await;
        // Published before the page is back: it comes from the replay buffers.
        let n2 = server.publish(&news, "n2").await;
        let c2 = server.publish(&chat, "c2").await;
        let got = page
            .until("four messages", "got", |v| {
                v.as_array().is_some_and(|a| a.len() >= 4)
            })
            .await;
        let of = |channel: &str| -> Vec<Value> {
            got.as_array()
                .unwrap()
                .iter()
                .filter(|m| m[0] == channel)
                .map(|m| m[1].clone())
                .collect()
        };
        assert_eq!(of(&news), [n1.as_str(), n2.as_str()], "{transport}: {got}");
        assert_eq!(
            of(&chat),
            [mine.clone(), Value::from(c2)],
            "{transport}: {got}"
        );
        nothing_more_then_close(&mut page, 4, transport).await;
    }
    browser.close().await;
    server.stop().await;
}

/// The library in Chromium when the network drops mid-stream and tokens expire: the page
/// reaches the server through a relay the test cuts, and its token function hands out a
/// token that expires in 4 s, then longer ones. Every message arrives exactly once, over
/// each transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_client_rides_out_a_network_drop_and_an_expiring_token() {
    use dormouse_client::http::{Client, parse_base_url};
    use dormouse_testkit::browser::Browser;
    use dormouse_testkit::relay::Relay;
    use dormouse_testkit::{TestServer, jwt};
    use serde_json::{Value, json};
    const SECRET: &str = "js-client-browser-test-secret-long-enough";
    let server = TestServer::start_with(|s| {
        s.auth.jwt_secret = SECRET.to_string();
        s.sse.retry = std::time::Duration::from_millis(300);
    })
    .await;
    let relay = Relay::start(server.addr).await;
    let grants = json!({"subscribe": ["drop-*"], "publish": ["drop-*"]});
    let writer = Client::new(
        parse_base_url(&server.url("")).unwrap(),
        Some(jwt(
            SECRET,
            600,
            json!({"sub": "writer", "dormouse": grants}),
        )),
        "test",
    )
    .unwrap();
    let browser = Browser::launch().await;
    // The page's origin is the relay: everything the page does goes through it.
    let mut page = with_library(&browser, &format!("{}/healthz", relay.url())).await;

    for transport in ["websocket", "sse"] {
        let channel = format!("drop-{transport}");
        let short = jwt(SECRET, 4, json!({"sub": "page", "dormouse": grants}));
        let long = jwt(SECRET, 600, json!({"sub": "page", "dormouse": grants}));
        page.eval(&format!(
            r#"window.got = []; window.asked = 0; window.states = [];
               window.tokens = [{short}, {long}];
               window.client = new lib.Dormouse({{
                 url: location.origin, transport: "{transport}",
                 token: () => {{ asked++; return tokens.length > 1 ? tokens.shift() : tokens[0]; }},
                 backoff: {{initialMs: 100, maxMs: 500}}}});
               client.on("state", s => states.push(s));
               window.sub = client.subscribe("{channel}");
               sub.on("message", m => got.push([m.id, m.data]));
               new Promise(r => sub.on("subscribed", () => r(true)))"#,
            short = Value::String(short),
            long = Value::String(long),
        ))
        .await;
        let m1 = writer.publish(&channel, "m1", None, None).await.unwrap().id;
        page.until("m1", "got.length", |v| v == 1).await;

        // The network drops mid-stream; m2 is published meanwhile, beside it.
        relay.cut();
        page.until("the drop noticed", "states.includes('connecting')", |v| {
            v == true
        })
        .await;
        let m2 = writer.publish(&channel, "m2", None, None).await.unwrap().id;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        relay.heal();
        page.until("m2 after the drop", "got.length", |v| v == 2)
            .await;

        // Past the first token's expiry (4 s from when it was minted).
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let m3 = writer.publish(&channel, "m3", None, None).await.unwrap().id;
        let got = page
            .until("m3 after the expiry", "got", |v| {
                v.as_array().is_some_and(|a| a.len() >= 3)
            })
            .await;
        let ids: Vec<&str> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[0].as_str().unwrap())
            .collect();
        assert_eq!(ids, [m1.as_str(), m2.as_str(), m3.as_str()], "{transport}");
        let asked = page.eval("asked").await;
        assert!(
            asked.as_u64().unwrap() >= 2,
            "{transport}: a fresh token ({asked})"
        );
        nothing_more_then_close(&mut page, 3, transport).await;
    }
    browser.close().await;
    server.stop().await;
}
