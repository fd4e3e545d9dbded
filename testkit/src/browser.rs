//! Headless Chromium driven over the DevTools protocol, for tests of pages (the admin
//! dashboard) in a real browser. Chromium must be installed (`apt-get install -y chromium`,
//! or `DORMOUSE_CHROMIUM` naming a binary): a test that needs it fails, never skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::PATIENCE;

/// A headless Chromium, closed over DevTools (which ends its helper processes too), or
/// killed by its pid if it does not close.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

/// The Chromium binary: `DORMOUSE_CHROMIUM`, else one on `PATH`; panics with how to
/// install one when there is none.
pub fn chromium() -> PathBuf {
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
    /// Starts a headless Chromium with a fresh profile on a DevTools port it picks.
    pub async fn launch() -> Self {
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

    /// Chromium writes the port it picked to this file once DevTools listens. A first start
    /// on a fresh machine builds its caches, and a test binary may run it beside five NATS
    /// clusters on two cores: it gets three times the usual patience (a start that fails
    /// still fails, and says so).
    async fn devtools_port(&mut self, file: &Path) -> u16 {
        let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
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
    pub async fn page(&self) -> Cdp {
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

    /// The browser's page, its events on, navigated to `url`: how every browser test
    /// starts. The page is still loading when this returns; wait for what it shows.
    pub async fn open(&self, url: &str) -> Cdp {
        let mut page = self.page().await;
        page.call("Page.enable", json!({})).await;
        page.call("Page.navigate", json!({"url": url})).await;
        page
    }

    /// Asks the browser to close and waits for it; kills it by pid if it will not.
    pub async fn close(mut self) {
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
#[derive(Debug)]
pub struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    /// Connects to a DevTools WebSocket URL.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("devtools websocket");
        Self { ws, next_id: 1 }
    }

    /// Sends a command without waiting for its answer (the browser may close first).
    pub async fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("devtools send");
        id
    }

    /// Sends a command and waits for its result; a DevTools error fails the test.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
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
    pub async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
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
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// Re-evaluates `expression` (a snapshot of the page as JSON) until `ready` accepts it.
    pub async fn until(
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
