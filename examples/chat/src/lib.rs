//! Chat rooms as objects. Each room is one object (namespace `rooms`); people join over
//! WebSocket with a name, which the room stores as the socket's attachment. So the presence
//! list is simply the room's sockets: it survives hibernation (the runtime parks the sockets
//! with their attachments) and costs the room no memory while nobody speaks. The last
//! messages are kept in the room's log for newcomers.
//!
//! - `GET /v1/objects/rooms/{room}` serves a small web page to chat from, which talks to
//!   the room with the JavaScript client (`clients/js`, served at `.../dormouse.js`).
//! - WebSocket `/v1/objects/rooms/{room}/ws?name=NAME`: the server sends
//!   `{"type":"welcome","you","members","history"}`, then `join`, `leave` and `message`
//!   events; the client sends `{"type":"message","text":"..."}`.
//! - `GET .../members` and `GET .../history` answer JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use dormouse_runtime::http::{Method, StatusCode, request::Parts};
use dormouse_runtime::respond;
use dormouse_runtime::storage::Retention;
use dormouse_runtime::{
    Bytes, Context, HttpRequest, HttpResponse, Inbound, Object, Outbound, Socket,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The namespace rooms are mounted under.
pub const NAMESPACE: &str = "rooms";
/// Messages a room keeps for newcomers.
pub const HISTORY: u64 = 50;
/// Longest name and message, in characters.
const MAX_NAME: usize = 32;
const MAX_TEXT: usize = 2000;

const PAGE: &str = include_str!("../static/index.html");
/// The JavaScript client the page talks to the room with (`clients/js`), served beside it.
const CLIENT: &str = include_str!("../../../clients/js/dormouse.js");

/// One chat room.
#[derive(Debug)]
pub struct Room {
    next_seq: u64,
}

/// A stored chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// Position in the room.
    pub id: u64,
    /// Who said it.
    pub name: String,
    /// What they said.
    pub text: String,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
}

impl Object for Room {
    type Env = ();
    type Request = ();
    type Response = ();

    async fn activate(ctx: &mut Context<'_>, _env: &()) -> anyhow::Result<Self> {
        let next_seq = ctx.log_meta()?.map_or(1, |m| m.last_seq + 1);
        Ok(Self { next_seq })
    }

    async fn handle(&mut self, _ctx: &mut Context<'_>, _request: ()) -> anyhow::Result<()> {
        Ok(())
    }

    async fn fetch(
        &mut self,
        ctx: &mut Context<'_>,
        request: HttpRequest,
    ) -> anyhow::Result<HttpResponse> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/") => {
                with_type(StatusCode::OK, "text/html; charset=utf-8", PAGE.into())
            }
            (&Method::GET, "/dormouse.js") => with_type(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                CLIENT.into(),
            ),
            (&Method::GET, "/members") => {
                respond::json(StatusCode::OK, &json!({"members": members(ctx)}))
            }
            (&Method::GET, "/history") => {
                respond::json(StatusCode::OK, &json!({"messages": history(ctx)?}))
            }
            (method, path) => respond::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no route for {method} {path}: try GET /, /members, /history or a WebSocket on /ws?name=NAME"
                ),
            ),
        }
    }

    async fn websocket(
        &mut self,
        ctx: &mut Context<'_>,
        socket: Socket,
        request: Parts,
    ) -> anyhow::Result<()> {
        let name = match joining_name(request.uri.query()) {
            Ok(name) => name,
            Err(message) => {
                // Refused: tell the client why; not accepting the socket closes it.
                socket.send(text(&json!({"type": "error", "message": message})));
                return Ok(());
            }
        };
        socket.set_attachment(Bytes::from(name.clone()));
        let others = ctx.sockets();
        ctx.accept_socket(socket.clone());
        let welcome = json!({
            "type": "welcome",
            "you": name,
            "members": members(ctx),
            "history": history(ctx)?,
        });
        let joined = json!({"type": "join", "name": name});
        ctx.after_commit(move || {
            socket.send(text(&welcome));
            broadcast(&others, &joined);
        });
        Ok(())
    }

    async fn socket_message(
        &mut self,
        ctx: &mut Context<'_>,
        socket: &Socket,
        message: Inbound,
    ) -> anyhow::Result<()> {
        let name = String::from_utf8_lossy(&socket.attachment()).into_owned();
        let said: Result<Said, String> = match &message {
            Inbound::Text(t) => serde_json::from_str(t)
                .map_err(|e| format!("expected {{\"type\":\"message\",\"text\":...}}: {e}")),
            Inbound::Binary(_) => Err("send text messages".to_string()),
        };
        let said = match said {
            Ok(s)
                if s.r#type == "message"
                    && !s.text.trim().is_empty()
                    && s.text.chars().count() <= MAX_TEXT =>
            {
                s
            }
            Ok(_) => {
                return reply_error(
                    socket,
                    &format!(
                        "a message needs \"type\":\"message\" and 1 to {MAX_TEXT} characters of text"
                    ),
                );
            }
            Err(e) => return reply_error(socket, &e),
        };
        let message = ChatMessage {
            id: self.next_seq,
            name,
            text: said.text,
            at: now_ms(),
        };
        self.next_seq += 1;
        ctx.append_log(message.id, message.at, serde_json::to_vec(&message)?);
        ctx.trim_log(
            Retention {
                max_events: Some(HISTORY),
                ..Retention::default()
            },
            message.at,
        );
        let everyone = ctx.sockets();
        let event = json!({"type": "message", "id": message.id, "name": message.name, "text": message.text, "at": message.at});
        ctx.after_commit(move || broadcast(&everyone, &event));
        Ok(())
    }

    async fn socket_close(&mut self, ctx: &mut Context<'_>, socket: &Socket) -> anyhow::Result<()> {
        let name = String::from_utf8_lossy(&socket.attachment()).into_owned();
        let everyone = ctx.sockets();
        let left = json!({"type": "leave", "name": name});
        ctx.after_commit(move || broadcast(&everyone, &left));
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Said {
    r#type: String,
    text: String,
}

fn joining_name(query: Option<&str>) -> Result<String, String> {
    let name = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("name="))
        .map(percent_decode)
        .unwrap_or_default();
    let name = name.trim().to_string();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "join with ?name=NAME, 1 to {MAX_NAME} printable characters"
        ));
    }
    Ok(name)
}

/// Decodes `%XX` escapes and `+` (enough for names typed in a browser form).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn members(ctx: &Context<'_>) -> Vec<String> {
    let mut names: Vec<String> = ctx
        .sockets()
        .iter()
        .filter(|s| !s.is_closed())
        .map(|s| String::from_utf8_lossy(&s.attachment()).into_owned())
        .collect();
    names.sort();
    names
}

fn history(ctx: &Context<'_>) -> anyhow::Result<Vec<ChatMessage>> {
    ctx.read_log_tail(HISTORY as usize)?
        .iter()
        .map(|entry| serde_json::from_slice(&entry.data).context("corrupt chat message"))
        .collect()
}

fn text(value: &Value) -> Outbound {
    Outbound::Text(Bytes::from(value.to_string()))
}

fn broadcast(sockets: &[Socket], value: &Value) {
    let frame = Bytes::from(value.to_string());
    for socket in sockets {
        socket.send(Outbound::Text(frame.clone()));
    }
}

fn reply_error(socket: &Socket, message: &str) -> anyhow::Result<()> {
    socket.send(text(&json!({"type": "error", "message": message})));
    Ok(())
}

fn with_type(status: StatusCode, content_type: &str, body: Bytes) -> anyhow::Result<HttpResponse> {
    Ok(dormouse_runtime::http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body)?)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
