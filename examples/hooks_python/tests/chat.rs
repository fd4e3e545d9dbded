//! The Python backend against a real server: who may connect, messages relayed to the
//! other clients through the connection API, replies, and a `left` notice sent from the
//! disconnect hook. Needs `python3` on the PATH (a fresh machine has it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dormouse_gateway::{ApiKeySettings, HookSettings};
use dormouse_testkit::{TestServer, error_of};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "python-hook-secret-0123456789abcdefgh";
const KEY: &str = "python-backend-key-0123456789";

/// The script, killed when the test ends.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_backend(port: u16, dormouse: &str) -> Backend {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/backend.py");
    let mut child = Command::new("python3")
        .args([script, "--port", &port.to_string(), "--dormouse", dormouse])
        .args(["--key", KEY, "--secret", SECRET])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the backend (install Python 3: apt-get install -y python3)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("listening"),
        "the backend did not start: {line:?}"
    );
    Backend(child)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn join(server: &TestServer, name: &str) -> Ws {
    let url = server.ws_url(&format!("/v1/hooks/chat/ws?name={name}"));
    tokio_tungstenite::connect_async(url)
        .await
        .expect("let in")
        .0
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("a frame");
        if let Message::Text(text) = frame {
            return text.to_string();
        }
    }
}

#[tokio::test]
async fn a_python_backend_runs_the_chat_through_hooks_and_the_connection_api() {
    // The backend's port first, so the server can be told where its hook is.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = TestServer::start_with(|s| {
        s.hooks = vec![HookSettings {
            name: "chat".into(),
            url: format!("http://127.0.0.1:{port}/hook"),
            secret: SECRET.into(),
            channels: Vec::new(),
            events: HookSettings::default_events(),
            timeout: Duration::from_secs(5),
        }];
        s.auth.api_keys = vec![ApiKeySettings {
            connections: true,
            ..ApiKeySettings::new("backend", KEY)
        }];
    })
    .await;
    let _backend = start_backend(port, &server.url(""));

    let mut alice = join(&server, "alice").await;
    let mut bob = join(&server, "bob").await;
    // The backend decides: no name, or a name in use, is refused with its reason.
    let res = server
        .client
        .get(server.url("/v1/hooks/chat/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (403, "hook_refused"));
    assert!(message.contains("say who you are"), "{message}");

    alice.send(Message::text("hi bob")).await.unwrap();
    assert_eq!(next_text(&mut alice).await, "sent to 1");
    assert_eq!(next_text(&mut bob).await, "alice: hi bob");
    bob.send(Message::text("/who")).await.unwrap();
    assert_eq!(next_text(&mut bob).await, "alice, bob");

    // Alice leaves: the backend hears it and tells Bob.
    alice.close(None).await.unwrap();
    assert_eq!(next_text(&mut bob).await, "alice left");
    bob.send(Message::text("/who")).await.unwrap();
    assert_eq!(next_text(&mut bob).await, "bob");
}
