//! A hook's backend for tests: an HTTP server on loopback that checks each call's
//! `Dormouse-Signature`, records the call and answers as the test says (docs/HOOKS.md).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;

/// One call the backend received.
#[derive(Debug, Clone)]
pub struct Call {
    pub event: String,
    pub idempotency_key: String,
    pub body: Value,
}

/// What the backend answers a call with.
#[derive(Debug)]
pub enum Answer {
    /// This status and body.
    Json(u16, String),
    /// Nothing until this pause is over (then `{}`).
    Sleep(Duration),
}

type Behaviour = Box<dyn Fn(&Call) -> Answer + Send + Sync>;

/// The backend: checks signatures (a bad one fails the test), records calls, answers.
pub struct Upstream {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

fn expected_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut message = timestamp.as_bytes().to_vec();
    message.push(b'.');
    message.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &message);
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Upstream {
    /// Listens on a loopback port of its own; checks signatures with `secret`.
    pub async fn start(
        secret: &str,
        behaviour: impl Fn(&Call) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let secret = secret.to_string();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let behaviour: Arc<Mutex<Behaviour>> = Arc::new(Mutex::new(Box::new(behaviour)));
        let (recorded, decide) = (calls.clone(), behaviour.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (recorded, decide, secret) = (recorded.clone(), decide.clone(), secret.clone());
                async move {
                    let header = |name: &str| header_text(&headers, name);
                    let signature = header("dormouse-signature");
                    let (t, v1) = signature
                        .split_once(",v1=")
                        .expect("a signature t=...,v1=...");
                    let t = t.strip_prefix("t=").expect("t=");
                    assert_eq!(
                        v1,
                        expected_signature(&secret, t, &body),
                        "a valid signature"
                    );
                    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
                    let call = Call {
                        event: header("dormouse-event"),
                        idempotency_key: header("idempotency-key"),
                        body,
                    };
                    assert_eq!(call.body["event"], call.event.as_str());
                    let answer = (decide.lock().unwrap())(&call);
                    recorded.lock().unwrap().push(call);
                    match answer {
                        Answer::Json(status, text) => {
                            (StatusCode::from_u16(status).unwrap(), text).into_response()
                        }
                        Answer::Sleep(pause) => {
                            tokio::time::sleep(pause).await;
                            (StatusCode::OK, "{}").into_response()
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            calls,
            behaviour,
        }
    }

    /// Where the hook's calls go.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answers from now on with `behaviour`.
    pub fn answer(&self, behaviour: impl Fn(&Call) -> Answer + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Box::new(behaviour);
    }

    /// The calls of `event` so far.
    pub fn calls(&self, event: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.event == event)
            .cloned()
            .collect()
    }

    /// Waits until `count` calls of `event` arrived.
    pub async fn until(&self, event: &str, count: usize) -> Vec<Call> {
        for _ in 0..500 {
            let calls = self.calls(event);
            if calls.len() >= count {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{count} {event} calls did not arrive: {:?}",
            self.calls(event)
        );
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A request header as text, empty when it is missing or not ASCII: what a test backend
/// compares against.
pub fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
