//! Following channels over Server-Sent Events with resume built in.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use reqwest::Method;
use serde_json::Value;

use super::{Client, Error, error_of};
use crate::sse::{Event, Parser};

/// Wait before reconnecting until the server sends its `retry:` hint.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between attempts, however many failed in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Reconnect when nothing, not even a keep-alive comment, arrives for this long (the
/// server sends one every `sse.keepalive`, 15 s by default).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// What following a channel yields, in order. `M` is how a message arrives: an SSE
/// [`Event`] for [`Follow`]; with the `websocket` feature, a `Message` (bytes as
/// published) for a `Socket`, an `ObjectMessage` for an `ObjectSocket`.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<M = Event> {
    /// An event: a message (with its id), or a message a backend sent to this connection
    /// alone (without one). Over SSE, binary payloads keep the `base64:` prefix of their
    /// event type (docs/API.md).
    Message(M),
    /// A control event the app may want to know of, by kind: `connected` (the connection's
    /// id), `gap` (events were lost: what and from where), `join` and `leave` (presence),
    /// `close` (a backend ended the connection for good; the next call answers
    /// [`Error::Closed`]), `refused` (one of several channels was refused for good, with
    /// the server's `code`: it is not followed any more, the others are), and over a
    /// WebSocket `auth_refused` (a refreshed token was refused; the old one stays until it
    /// expires). Its JSON.
    Control {
        /// The kind, without the `dormouse.` prefix.
        kind: String,
        /// The event's data.
        data: Value,
    },
    /// The connection ended (`reason`); the next call waits `wait`, then reconnects with
    /// the last id seen.
    Lost {
        /// Why, for a person.
        reason: String,
        /// How long the next call waits before it reconnects.
        wait: Duration,
    },
    /// Connected again after a [`Item::Lost`].
    Reconnected,
}

/// Channels followed over Server-Sent Events (one, or several on one stream), each resumed
/// from the last id it delivered after
/// any interruption (a server restart, a dropped connection, a proxy timeout, a
/// slow-consumer cut, silence beyond the idle timeout), so nothing the server still retains
/// is missed or delivered twice; what it no longer retains arrives as a `gap` control.
///
/// The first connection must succeed: a wrong URL, channel, cursor or credential is an
/// error at once. Later, a refusal that waiting cannot fix (an expired or insufficient
/// token) is an error, and a backend's close (the `close` control) ends it with
/// [`Error::Closed`]; anything else is retried, waiting the server's `retry:` hint doubled
/// for each failure in a row (up to 30 s).
///
/// ```no_run
/// # async fn run() -> Result<(), dormouse_client::http::Error> {
/// use dormouse_client::http::{Client, Item, parse_base_url};
/// let url = parse_base_url("http://127.0.0.1:8080").unwrap();
/// let client = Client::new(url, None, "my-app/1.0")?;
/// let mut news = client.follow("news", None);
/// loop {
///     match news.next().await? {
///         Item::Message(event) => println!("{:?} {}", event.id, event.data),
///         Item::Control { kind, data } if kind == "gap" => eprintln!("lost: {data}"),
///         Item::Lost { reason, wait } => eprintln!("{reason}; again in {wait:?}"),
///         _ => {}
///     }
/// }
/// # }
/// ```
pub struct Follow {
    client: Client,
    /// The channels followed, and each one's cursor: the id of its last message delivered.
    /// One channel is followed on its own route; several on one stream (`/v1/events`),
    /// whose cursor is theirs joined in this order.
    channels: Vec<(String, Option<String>)>,
    /// Followed on one `/v1/events` stream (a message's data is its JSON), even when it is
    /// one channel.
    many: bool,
    retry: Duration,
    idle_timeout: Duration,
    failures: u32,
    connected_once: bool,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    parser: Parser,
    ready: VecDeque<Item>,
    /// What the server said when it asked for a reconnect, for the [`Item::Lost`] after it.
    reconnect_reason: Option<String>,
    /// The wait before the next connection attempt.
    wait: Option<Duration>,
    /// A backend closed the connection for good (`dormouse.close`): its code and reason,
    /// answered as [`Error::Closed`] once the items before it are taken.
    closed: Option<(u16, String)>,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl Follow {
    pub(super) fn new(client: Client, channels: Vec<(String, Option<String>)>, many: bool) -> Self {
        Self {
            client,
            channels,
            many,
            retry: DEFAULT_RETRY,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            failures: 0,
            connected_once: false,
            body: None,
            parser: Parser::default(),
            ready: VecDeque::new(),
            reconnect_reason: None,
            wait: None,
            closed: None,
        }
    }

    /// Reconnects when nothing at all arrives for `timeout` (45 s by default; the server's
    /// keep-alives come every 15 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The id of the last message delivered of the (first) channel, or its starting
    /// cursor: where a reconnect resumes it.
    pub fn last_id(&self) -> Option<&str> {
        self.channels.first().and_then(|(_, id)| id.as_deref())
    }

    /// [`Follow::last_id`] of one of the channels followed.
    pub fn cursor(&self, channel: &str) -> Option<&str> {
        self.channels
            .iter()
            .find(|(c, _)| c == channel)
            .and_then(|(_, id)| id.as_deref())
    }

    /// The next item; an error ends the following (see [`Follow`]).
    pub async fn next(&mut self) -> Result<Item, Error> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(item);
            }
            if let Some((code, reason)) = &self.closed {
                self.body = None;
                return Err(Error::Closed {
                    code: *code,
                    reason: reason.clone(),
                });
            }
            let Some(body) = self.body.as_mut() else {
                if let Some(wait) = self.wait.take() {
                    tokio::time::sleep(wait).await;
                }
                match self.connect().await {
                    Ok(response) => {
                        self.body = Some(response.bytes_stream().boxed());
                        self.parser = Parser::default();
                        self.failures = 0;
                        if std::mem::replace(&mut self.connected_once, true) {
                            return Ok(Item::Reconnected);
                        }
                        continue;
                    }
                    Err(Error::Server(e)) if self.drops_refused(&e) => {
                        // One channel of several refused (the server named it): the
                        // others go on without it, and the app learns which and why.
                        let data = serde_json::json!({
                            "type": "refused",
                            "channel": e.channel,
                            "code": e.code,
                            "message": e.message,
                        });
                        return Ok(Item::Control {
                            kind: "refused".into(),
                            data,
                        });
                    }
                    Err(e) if !self.connected_once => return Err(e),
                    Err(Error::Server(e)) if !e.is_transient() => return Err(Error::Server(e)),
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        return Ok(self.lost(format!("{e}")));
                    }
                }
            };
            let chunk = match tokio::time::timeout(self.idle_timeout, body.next()).await {
                Err(_) => {
                    let reason = format!("nothing received for {:?}", self.idle_timeout);
                    return Ok(self.lost(reason));
                }
                Ok(None) => {
                    let reason = self
                        .reconnect_reason
                        .take()
                        .unwrap_or_else(|| "the server closed the stream".into());
                    return Ok(self.lost(reason));
                }
                Ok(Some(Err(e))) => return Ok(self.lost(format!("{e}"))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            for event in self.parser.feed(&chunk) {
                self.take(event);
            }
            if let Some(ms) = self.parser.take_retry() {
                self.retry = Duration::from_millis(ms);
            }
        }
    }

    /// Whether `e` refuses one channel of several for good (a `400` or `403` naming it):
    /// then that one is no longer followed, and true is answered.
    fn drops_refused(&mut self, e: &super::ServerError) -> bool {
        let refuses = matches!(e.status.as_u16(), 400 | 403) && self.channels.len() > 1;
        let Some(at) = e
            .channel
            .as_deref()
            .and_then(|named| self.channels.iter().position(|(c, _)| c == named))
            .filter(|_| refuses)
        else {
            return false;
        };
        self.channels.remove(at);
        true
    }

    /// Ends the connection; the next call waits, then reconnects.
    fn lost(&mut self, reason: String) -> Item {
        self.body = None;
        let wait = backoff(self.retry, self.failures);
        self.wait = Some(wait);
        Item::Lost { reason, wait }
    }

    fn take(&mut self, event: Event) {
        // No message is named `dormouse.*` (the server refuses such names).
        let Some(kind) = event.event.strip_prefix("dormouse.") else {
            if !self.many
                && let [(_, cursor)] = self.channels.as_mut_slice()
            {
                if let Some(id) = &event.id {
                    *cursor = Some(id.clone());
                }
            } else if event.id.is_some() {
                // A stream of several channels: the data is the message as JSON, naming its
                // channel and its own id (the `id:` line is the whole stream's cursor).
                let message: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                if let (Some(channel), Some(id)) =
                    (message["channel"].as_str(), message["id"].as_str())
                    && let Some((_, cursor)) = self.channels.iter_mut().find(|(c, _)| c == channel)
                {
                    *cursor = Some(id.to_string());
                }
            }
            self.ready.push_back(Item::Message(event));
            return;
        };
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        if let (Some(start), "connected") = (&event.id, kind) {
            // Where the stream starts: each channel without a cursor of its own takes its
            // position, so losing the stream before its first message loses nothing.
            let positions: Vec<&str> = if self.many {
                start.split(',').collect()
            } else {
                vec![start.as_str()]
            };
            if positions.len() == self.channels.len() {
                for ((_, cursor), position) in self.channels.iter_mut().zip(positions) {
                    if cursor.is_none() && !position.is_empty() {
                        *cursor = Some(position.to_string());
                    }
                }
            }
        }
        if kind == "close" {
            self.closed = Some((
                data["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(1000),
                data["reason"].as_str().unwrap_or("").to_string(),
            ));
        }
        if kind == "reconnect" {
            // The stream ends next; say why then.
            let field = |name: &str| data[name].as_str().unwrap_or("").to_string();
            self.reconnect_reason = Some(format!(
                "server asked to reconnect: {}: {}",
                field("reason"),
                field("message")
            ));
            return;
        }
        self.ready.push_back(Item::Control {
            kind: kind.to_string(),
            data,
        });
    }

    async fn connect(&mut self) -> Result<reqwest::Response, Error> {
        // In a cursor, an empty position means "everything retained": a channel without one
        // beside channels with one starts instead after its newest event.
        if self.many && self.channels.iter().any(|(_, id)| id.is_some()) {
            for at in 0..self.channels.len() {
                if self.channels[at].1.is_none() {
                    let url = self.client.url(&["v1", "channels", &self.channels[at].0]);
                    match self.client.get_json(url).await {
                        Ok(info) => {
                            self.channels[at].1 = info["last_id"].as_str().map(str::to_string);
                        }
                        // A channel with no events and no subscribers: nothing to skip.
                        Err(Error::Server(e)) if e.status == reqwest::StatusCode::NOT_FOUND => {}
                        // Refused for this channel: say which, so only it is dropped.
                        Err(Error::Server(mut e)) if matches!(e.status.as_u16(), 400 | 403) => {
                            e.channel = Some(self.channels[at].0.clone());
                            return Err(Error::Server(e));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let (url, cursor) = match self.channels.as_slice() {
            [(channel, id)] if !self.many => (
                self.client.url(&["v1", "channels", channel, "events"]),
                id.clone(),
            ),
            many => {
                let mut url = self.client.url(&["v1", "events"]);
                for (channel, _) in many {
                    url.query_pairs_mut().append_pair("channel", channel);
                }
                // Every channel's position in the URL's order, empty for one with none.
                let cursor = many.iter().any(|(_, id)| id.is_some()).then(|| {
                    many.iter()
                        .map(|(_, id)| id.as_deref().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                (url, cursor)
            }
        };
        let mut request = self
            .client
            .request(Method::GET, url.clone(), false)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(cursor) = cursor {
            request = request.header("last-event-id", cursor);
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
}

/// The wait before the next attempt: the server's hint, doubled for each failure in a row.
pub(super) fn backoff(retry: Duration, failures: u32) -> Duration {
    retry
        .saturating_mul(1 << failures.min(6))
        .min(MAX_BACKOFF.max(retry))
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
}
