//! The admin dashboard: routes and credentials over HTTP, then the page itself driven in
//! headless Chromium over the DevTools protocol: a token is pasted, messages are published
//! while the page is open, and its figures, busiest-channel list, latency chart, channel
//! inspector and test-publish form are checked to follow.
//!
//! Needs Chromium (`apt-get install -y chromium`); the test fails, rather than skipping, when
//! it is missing. `DORMOUSE_CHROMIUM` may name another binary.

use dormouse_testkit as support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dormouse_gateway::ApiKeySettings;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use support::{PATIENCE, SseClient, TestServer, WsClient, error_of};
use tokio_tungstenite::tungstenite::Message;

const OPERATOR: &str = "operator-key-0123456789";
const PUBLISHER: &str = "publisher-key-0123456789";

fn key(name: &str, key: &str, admin: bool) -> ApiKeySettings {
    let all = vec!["*".to_string()];
    ApiKeySettings {
        name: name.to_string(),
        key: key.to_string(),
        publish: all.clone(),
        subscribe: if admin { all.clone() } else { Vec::new() },
        history: if admin { all } else { Vec::new() },
        objects: Vec::new(),
        admin,
        metrics: false,
    }
}

async fn start_admin_server() -> TestServer {
    TestServer::start_with(|s| {
        s.admin.enabled = true;
        s.auth.api_keys = vec![
            key("operator", OPERATOR, true),
            key("publisher", PUBLISHER, false),
        ];
    })
    .await
}

#[tokio::test]
async fn the_page_is_served_only_when_enabled_and_its_figures_need_the_admin_capability() {
    let off = TestServer::start().await;
    for path in ["/admin", "/admin/api/stats"] {
        let res = off.client.get(off.url(path)).send().await.unwrap();
        assert_eq!(error_of(res).await.1, "not_found", "{path}");
    }
    off.stop().await;

    let server = start_admin_server().await;
    let page = server
        .client
        .get(server.url("/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("<canvas id=\"latency\""));
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "self-contained: nothing loaded from elsewhere"
    );

    let stats = |key: Option<&'static str>| {
        let mut req = server.client.get(server.url("/admin/api/stats"));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let (status, code, _) = error_of(stats(None).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "missing_credential"));
    let (status, code, _) = error_of(stats(Some(PUBLISHER)).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let res = stats(Some(OPERATOR)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["auth"], true);
    assert_eq!(body["figures"]["published_total"], 0);
    assert_eq!(body["namespaces"][0]["namespace"], "channel");
    server.stop().await;
}

/// A headless Chromium, closed over DevTools (which ends its helper processes too), or
/// killed by its pid if it does not close.
struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("DORMOUSE_CHROMIUM") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "DORMOUSE_CHROMIUM names {}, which is not a file; install Chromium with \
             `apt-get install -y chromium` or point DORMOUSE_CHROMIUM at one",
            path.display()
        );
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "this test drives the admin page in headless Chromium, which is not installed: \
         run `apt-get install -y chromium` (or set DORMOUSE_CHROMIUM to a Chromium binary)"
    );
}

impl Browser {
    async fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let mut browser = Self {
            child,
            port: 0,
            _profile: profile,
        };
        browser.port = browser
            .devtools_port(&browser._profile.path().join("DevToolsActivePort"))
            .await;
        browser
    }

    /// Chromium writes the port it picked to this file once DevTools listens.
    async fn devtools_port(&mut self, file: &Path) -> u16 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(text) = std::fs::read_to_string(file)
                && let Some(Ok(port)) = text.lines().next().map(str::parse)
            {
                return port;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("chromium exited at start: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromium never opened its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A DevTools session on the browser's one page.
    async fn page(&self) -> Cdp {
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        Cdp::connect(&url).await
    }

    /// Asks the browser to close and waits for it; kills it by pid if it will not.
    async fn close(mut self) {
        if let Ok(version) = reqwest::get(format!("http://127.0.0.1:{}/json/version", self.port))
            .await
            .and_then(|r| r.error_for_status())
            && let Ok(version) = version.json::<Value>().await
            && let Some(url) = version["webSocketDebuggerUrl"].as_str()
        {
            let mut cdp = Cdp::connect(url).await;
            cdp.send("Browser.close", json!({})).await;
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal DevTools protocol client: one request at a time, events ignored.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("devtools websocket");
        Self { ws, next_id: 1 }
    }

    /// Sends a command without waiting for its answer (the browser may close first).
    async fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("devtools send");
        id
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params).await;
        tokio::time::timeout(PATIENCE, async {
            loop {
                let Some(Ok(Message::Text(text))) = self.ws.next().await else {
                    panic!("devtools connection ended during {method}");
                };
                let reply: Value = serde_json::from_str(&text).unwrap();
                if reply["id"] == id {
                    assert!(reply["error"].is_null(), "{method}: {reply}");
                    return reply["result"].clone();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method}"))
    }

    /// Evaluates `expression` in the page: its value, or the exception it threw.
    async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match result.get("exceptionDetails") {
            Some(exception) => Err(exception.clone()),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// Re-evaluates `expression` (a snapshot of the page as JSON) until `ready` accepts it.
    async fn until(
        &mut self,
        what: &str,
        expression: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            // Until the page has loaded, its elements are missing and the snapshot throws.
            let value = self.try_eval(expression).await.unwrap_or_else(|e| e);
            if ready(&value) {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!("the page never showed {what}; last {value}; page text:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The page's live figures, as the data attributes the script keeps next to the text.
const FIGURES: &str = r#"(() => {
  const v = (id) => document.getElementById(id).dataset.value;
  const n = (id) => v(id) === "" || v(id) === undefined ? null : Number(v(id));
  return {
    status: document.getElementById("status").dataset.state,
    published: n("published-total"), delivered: n("delivered-total"),
    rate_in: n("rate-in"), sse: n("conn-sse"), ws: n("conn-ws"),
    subscribers: n("subscribers"), storage: n("storage"),
    busiest: [...document.querySelectorAll('#busiest tr')].map((r) => [...r.cells].map((c) => c.innerText)),
    objects: [...document.querySelectorAll('#objects tr')].map((r) => [...r.cells].map((c) => c.innerText)),
    points: Number(document.getElementById("latency").dataset.points),
  };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_messages_published_while_it_is_open() {
    let server = start_admin_server().await;
    let browser = Browser::launch().await;
    let mut page = browser.page().await;
    page.call("Page.enable", json!({})).await;
    page.call("Page.navigate", json!({"url": server.url("/admin")}))
        .await;

    // Auth is on: the page asks for a token, and takes the pasted one.
    page.until("the token prompt", FIGURES, |f| f["status"] == "auth")
        .await;
    page.eval(&format!(
        r#"document.getElementById("token").value = "{OPERATOR}";
           document.getElementById("token-form").requestSubmit(); true"#
    ))
    .await;
    let before = page
        .until("the first figures", FIGURES, |f| {
            f["status"] == "ok" && f["published"].is_number()
        })
        .await;
    assert_eq!(before["published"], 0, "{before}");
    assert_eq!(before["sse"], 0, "{before}");
    assert_eq!(
        page.eval(r#"sessionStorage.getItem("dormouse.admin.token")"#)
            .await,
        OPERATOR,
        "kept for this tab only"
    );

    // Two subscribers and six messages, while the page watches.
    let token = format!("access_token={OPERATOR}");
    let mut sse = SseClient::connect(
        &server,
        &format!("/v1/channels/dash-hot/events?{token}"),
        None,
    )
    .await;
    let mut ws = WsClient::connect(&server, &format!("/v1/channels/dash-hot/ws?{token}")).await;
    let publish = |channel: &'static str, data: String| {
        let request = server
            .client
            .post(server.url(&format!("/v1/channels/{channel}/messages")))
            .bearer_auth(OPERATOR)
            .body(data);
        async move {
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 201);
        }
    };
    for i in 0..5 {
        publish("dash-hot", format!("m{i}")).await;
    }
    publish("dash-cold", "only one".to_string()).await;
    for i in 0..5 {
        assert_eq!(sse.next().await.unwrap().data, format!("m{i}"));
        assert_eq!(ws.next().await.unwrap()["data"], format!("m{i}"));
    }

    let after = page
        .until("the published messages", FIGURES, |f| {
            f["published"] == 6
                && f["delivered"].as_u64() >= Some(10)
                && f["points"].as_u64() > Some(0)
                && f["storage"].as_u64() > Some(0)
        })
        .await;
    assert_eq!(after["sse"], 1, "{after}");
    assert_eq!(after["ws"], 1, "{after}");
    assert_eq!(after["subscribers"], 2, "{after}");
    let busiest = after["busiest"].as_array().unwrap();
    assert_eq!(busiest[0][0], "dash-hot", "{after}");
    assert_eq!(busiest[0][2], "5", "{after}");
    assert_eq!(busiest[1][0], "dash-cold", "{after}");
    assert_eq!(after["objects"][0][0], "channel", "{after}");
    assert_eq!(after["objects"][0][1], "2", "two active channels: {after}");

    // The inspector, opened from the busiest list, shows the channel's recent events.
    page.eval(r#"document.querySelector('#busiest button').click(); true"#)
        .await;
    let inspector = r#"(() => ({
      subscribers: document.querySelector('#channel-info dd[data-field="subscribers"]')?.innerText,
      state: document.querySelector('#channel-info dd[data-field="state"]')?.innerText,
      events: [...document.querySelectorAll('#channel-events tr')].map((r) => r.cells[3]?.innerText),
    }))()"#;
    let inspected = page
        .until("the inspected channel", inspector, |v| {
            v["events"].as_array().is_some_and(|e| e.len() == 5)
        })
        .await;
    assert_eq!(inspected["subscribers"], "2", "{inspected}");
    assert_eq!(inspected["state"], "active", "{inspected}");
    assert_eq!(
        inspected["events"],
        json!(["m4", "m3", "m2", "m1", "m0"]),
        "newest first"
    );

    // The test-publish form goes through the real publish route: subscribers get it.
    page.eval(
        r#"document.getElementById("publish-event").value = "note";
           document.getElementById("publish-data").value = "from the page";
           document.getElementById("publish-form").requestSubmit(); true"#,
    )
    .await;
    let sent = sse.next().await.unwrap();
    assert_eq!(
        (sent.event.as_str(), sent.data.as_str()),
        ("note", "from the page")
    );
    let result = page
        .until(
            "the publish result",
            r#"document.getElementById("publish-result").dataset.state || "" "#,
            |s| s == "ok",
        )
        .await;
    assert_eq!(result, "ok");
    page.until("the seventh message", FIGURES, |f| f["published"] == 7)
        .await;

    drop(page);
    browser.close().await;
    drop((sse, ws));
    server.stop().await;
}
