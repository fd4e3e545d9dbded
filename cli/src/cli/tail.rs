//! `dormouse tail`: follows a channel over SSE and prints each event. Any interruption (a
//! server restart, a dropped connection, a proxy timeout, being cut off as a slow reader) is
//! followed by a reconnect with the last id received, so the output has no gap and no
//! duplicate as long as the server still retains what was missed (else the server's `gap`
//! event says so).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt as _;
use reqwest::Method;
use serde::Serialize;
use serde_json::Value;

use super::client::{Client, ConnArgs, ServerError, error_of};
use super::output;
use dormouse_client::sse::{Event, Parser};

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

/// Wait before reconnecting until the server sends its `retry:` hint.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between attempts, however many failed in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why one connection ended.
enum End {
    /// `--count` messages were printed.
    Done,
    /// The connection ended or failed; reconnect.
    Lost(String),
}

struct Tail {
    args: TailArgs,
    client: Client,
    /// The cursor: the id of the last event printed (or `--from`).
    last_id: Option<String>,
    /// The server's `retry:` hint, the base of the backoff.
    retry: Duration,
    printed: u64,
}

pub(crate) async fn run(args: TailArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.conn)?;
    let mut tail = Tail {
        last_id: args.from.clone(),
        args,
        client,
        retry: DEFAULT_RETRY,
        printed: 0,
    };
    if tail.args.count == Some(0) {
        return Ok(());
    }
    // The first connection must work: a wrong URL, channel or token is an error at once,
    // not a silent retry loop.
    let response = tail.connect().await?;
    let mut end = tail.follow(response).await?;
    let mut failures: u32 = 0;
    loop {
        let reason = match end {
            End::Done => return Ok(()),
            End::Lost(reason) => reason,
        };
        let wait = backoff(tail.retry, failures);
        eprintln!(
            "connection lost ({reason}); reconnecting in {} {}",
            humantime::format_duration(wait),
            match &tail.last_id {
                Some(id) => format!("after {id}"),
                None => "(no event received yet: live events only)".to_string(),
            }
        );
        tokio::time::sleep(wait).await;
        end = match tail.connect().await {
            Ok(response) => {
                failures = 0;
                eprintln!("reconnected");
                tail.follow(response).await?
            }
            Err(e) => {
                // A refusal that retrying cannot fix (bad credential, forbidden, bad id)
                // ends the command; anything else (server down, restarting) is retried.
                if let Some(server) = e.downcast_ref::<ServerError>()
                    && !server.is_transient()
                {
                    return Err(e);
                }
                failures = failures.saturating_add(1);
                End::Lost(format!("{e:#}"))
            }
        };
    }
}

/// The wait before the next attempt: the server's hint, doubled for each failure in a row.
fn backoff(retry: Duration, failures: u32) -> Duration {
    retry
        .saturating_mul(1 << failures.min(6))
        .min(MAX_BACKOFF.max(retry))
}

impl Tail {
    async fn connect(&self) -> anyhow::Result<reqwest::Response> {
        let url = self
            .client
            .url(&["v1", "channels", &self.args.channel, "events"]);
        let mut request = self
            .client
            .request(Method::GET, url.clone(), false)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = &self.last_id {
            request = request.header("last-event-id", id);
        }
        let response = self.client.send(request).await?;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            // A proxy's page, say: treat like an error answer.
            return Err(error_of(Method::GET, url, response).await.into());
        }
        Ok(response)
    }

    /// Prints the events of one connection until it ends or `--count` is reached.
    async fn follow(&mut self, response: reqwest::Response) -> anyhow::Result<End> {
        let mut body = response.bytes_stream();
        let mut parser = Parser::default();
        let mut reconnect_reason = None;
        loop {
            let chunk = match tokio::time::timeout(self.args.idle_timeout, body.next()).await {
                Err(_) => {
                    return Ok(End::Lost(format!(
                        "nothing received for {}",
                        humantime::format_duration(self.args.idle_timeout)
                    )));
                }
                Ok(None) => {
                    return Ok(End::Lost(
                        reconnect_reason.unwrap_or_else(|| "the server closed the stream".into()),
                    ));
                }
                Ok(Some(Err(e))) => return Ok(End::Lost(format!("{e:#}"))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            for event in parser.feed(&chunk) {
                if let Some(reason) = self.handle(event)? {
                    reconnect_reason = Some(reason);
                }
                if self.args.count.is_some_and(|n| self.printed >= n) {
                    return Ok(End::Done);
                }
            }
            if let Some(ms) = parser.take_retry() {
                self.retry = Duration::from_millis(ms);
            }
        }
    }

    /// Prints one event; returns the reason the server gave when it asks for a reconnect.
    fn handle(&mut self, event: Event) -> anyhow::Result<Option<String>> {
        if let Some(kind) = event.event.strip_prefix("dormouse.") {
            let control: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            let field = |name: &str| control[name].as_str().unwrap_or("").to_string();
            return match kind {
                "reconnect" => Ok(Some(format!(
                    "server asked to reconnect: {}: {}",
                    field("reason"),
                    field("message")
                ))),
                // Said on standard error only: standard output carries the events.
                "connected" => {
                    eprintln!("connected as {}", field("connection_id"));
                    Ok(None)
                }
                // Presence: who joined or left, on standard error (with --json, as a line).
                "join" | "leave" => {
                    eprintln!("{kind}: {}", field("subject"));
                    if self.args.json {
                        output::line(&event.data)?;
                    }
                    Ok(None)
                }
                // A backend ended this connection on purpose: not a reason to reconnect.
                "close" => Err(anyhow::anyhow!(
                    "the server closed the connection: {} {}",
                    control["code"],
                    field("reason")
                )),
                _ => {
                    eprintln!("{kind}: {}: {}", field("reason"), field("message"));
                    if self.args.json {
                        output::line(&event.data)?;
                    }
                    Ok(None)
                }
            };
        }
        let text = if self.args.json {
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
        if let Some(id) = event.id {
            self.last_id = Some(id);
        }
        self.printed += 1;
        Ok(None)
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

    #[test]
    fn backoff_starts_at_the_hint_and_doubles_to_a_cap() {
        let hint = Duration::from_millis(500);
        assert_eq!(backoff(hint, 0), hint);
        assert_eq!(backoff(hint, 1), Duration::from_secs(1));
        assert_eq!(backoff(hint, 3), Duration::from_secs(4));
        assert_eq!(backoff(hint, 40), MAX_BACKOFF);
        // A server asking for more than the cap gets what it asked for.
        assert_eq!(backoff(Duration::from_secs(60), 3), Duration::from_secs(60));
    }

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
            serde_json::from_str::<Value>(&json_line(&text)).unwrap(),
            json!({"type":"message","id":"e-3","event":"message","data":"hi"})
        );
    }
}
