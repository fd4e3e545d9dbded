//! `dormouse tail`: follows a channel over SSE and prints each event. Any interruption (a
//! server restart, a dropped connection, a proxy timeout, being cut off as a slow reader) is
//! followed by a reconnect with the last id received, so the output has no gap and no
//! duplicate as long as the server still retains what was missed (else the server's `gap`
//! event says so).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;

use super::client::{ConnArgs, client};
use super::output;
use dormouse_client::http::Item;
use dormouse_client::sse::Event;

#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Channel to follow.
    channel: String,
    /// Start after this event id (retained events after it first); without it, only events
    /// published from now on.
    #[arg(long, value_name = "ID")]
    from: Option<String>,
    /// Exit (0) after this many messages.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// One JSON object per line, shaped like the WebSocket messages of docs/API.md
    /// (`{"type":"message","id","event","data"}`, `data_base64` for binary; gaps too).
    #[arg(long)]
    json: bool,
    /// Reconnect when nothing, not even a keep-alive comment, arrives for this long (the
    /// server sends one every sse.keepalive, 15 s by default).
    #[arg(long, value_name = "DURATION", default_value = "45s",
          value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
}

pub(crate) async fn run(args: TailArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let client = client(&args.conn)?;
    // The client's follower resumes by itself; this prints what it yields.
    let mut follow = client
        .follow(&args.channel, args.from.clone())
        .idle_timeout(args.idle_timeout);
    let mut printed: u64 = 0;
    loop {
        match follow.next().await? {
            Item::Message(event) => {
                let text = if args.json {
                    json_line(&event)
                } else {
                    format!(
                        "{}\t{}\t{}",
                        event.id.as_deref().unwrap_or("-"),
                        event.event,
                        event.data
                    )
                };
                output::line(&text)?;
                printed += 1;
                if args.count.is_some_and(|n| printed >= n) {
                    return Ok(());
                }
            }
            Item::Control { kind, data } => {
                let field = |name: &str| data[name].as_str().unwrap_or("").to_string();
                match kind.as_str() {
                    // Said on standard error only: standard output carries the events.
                    "connected" => eprintln!("connected as {}", field("connection_id")),
                    // A backend ended this connection on purpose: not a reason to reconnect.
                    "close" => anyhow::bail!(
                        "the server closed the connection: {} {}",
                        data["code"],
                        field("reason")
                    ),
                    // Presence: who joined or left, on standard error (with --json, as a
                    // line).
                    "join" | "leave" => {
                        eprintln!("{kind}: {}", field("subject"));
                        if args.json {
                            output::line(&data.to_string())?;
                        }
                    }
                    _ => {
                        eprintln!("{kind}: {}: {}", field("reason"), field("message"));
                        if args.json {
                            output::line(&data.to_string())?;
                        }
                    }
                }
            }
            Item::Lost { reason, wait } => eprintln!(
                "connection lost ({reason}); reconnecting in {} {}",
                humantime::format_duration(wait),
                match follow.last_id() {
                    Some(id) => format!("after {id}"),
                    None => "(no event received yet: live events only)".to_string(),
                }
            ),
            Item::Reconnected => eprintln!("reconnected"),
        }
    }
}

/// One message as `--json` prints it: the WebSocket message shape, fields in that order.
#[derive(Serialize)]
struct JsonMessage<'a> {
    r#type: &'static str,
    id: Option<&'a str>,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<&'a str>,
}

/// The WebSocket message shape for one SSE event: a `base64:` event type marks a payload the
/// server had to encode, which becomes `data_base64` under the plain event name.
fn json_line(event: &Event) -> String {
    let mut message = JsonMessage {
        r#type: "message",
        id: event.id.as_deref(),
        event: &event.event,
        data: Some(&event.data),
        data_base64: None,
    };
    if let Some(name) = event.event.strip_prefix("base64:")
        && BASE64.decode(&event.data).is_ok()
    {
        message.event = name;
        message.data = None;
        message.data_base64 = Some(&event.data);
    }
    serde_json::to_string(&message).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    #[test]
    fn binary_events_become_data_base64_like_on_websocket() {
        let binary = Event {
            id: Some("e-2".into()),
            event: "base64:blob".into(),
            data: "AAEC/w==".into(),
        };
        assert_eq!(
            json_line(&binary),
            r#"{"type":"message","id":"e-2","event":"blob","data_base64":"AAEC/w=="}"#
        );
        let text = Event {
            id: Some("e-3".into()),
            event: "message".into(),
            data: "hi".into(),
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json_line(&text)).unwrap(),
            json!({"type":"message","id":"e-3","event":"message","data":"hi"})
        );
    }
}
