//! What the chat's tests share: a WebSocket client's view of a room.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next message the room sends, as JSON; a close comes back as `{"type":"closed"}`.
pub async fn next(ws: &mut Ws) -> Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(frame) => {
                    return json!({"type": "closed", "frame": format!("{frame:?}")});
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a message in time")
}

/// Says `text` in the room.
pub async fn say(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(
        json!({"type": "message", "text": text}).to_string().into(),
    ))
    .await
    .unwrap();
}
