//! Channels followed over one WebSocket, with publishing acknowledged on the same
//! connection, resume built in, and the credential replaced in place before it expires.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt as _, StreamExt as _};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::follow::{Item, backoff};
use super::websocket::{
    self, Items, WebSocket, again, by_the_app, is_final_close, refresh_in, token_expiry,
};
use super::{Client, Error, Published};
use crate::binary;

/// The wait before reconnecting: the server sends no hint over a WebSocket.
const RETRY: Duration = Duration::from_secs(1);
/// Reconnect when nothing, not even a ping, arrives for this long (the server pings every
/// `websocket.ping_interval`, 20 s by default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Items read ahead of the app; beyond them the socket is not read, TCP pushes back, and a
/// server that finds this connection too slow closes it, to be resumed from its cursor.
const READ_AHEAD: usize = 1024;
/// Connections a publish is sent on before it fails unanswered: a frame the server cannot
/// take (say, beyond its `limits.max_message_size`) ends the connection instead of getting
/// an answer, and must not be sent again forever.
const MAX_SENDS: u32 = 4;

/// A message of a channel (or, with `channel` and `id` `None`, one a backend sent to this
/// connection alone), its payload as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The channel it was published to.
    pub channel: Option<String>,
    /// Its id: the cursor to resume after it.
    pub id: Option<String>,
    /// Its event type.
    pub event: String,
    /// Its payload, byte for byte.
    pub data: Bytes,
}

/// Channels followed over one WebSocket (`/v1/channels/{c}/ws`), the counterpart of
/// [`super::Follow`] for an app that also publishes, or follows channels it picks as it
/// goes:
///
/// - each channel resumes from the last id it delivered after any interruption (the
///   first channel with the URL's cursor, the others with a `subscribe` each), so nothing
///   still retained is missed or delivered twice; what is no longer retained arrives as a
///   `gap` control;
/// - [`SocketHandle::publish`] waits for the server's acknowledgement (the message is
///   durable), and a publish that the connection's loss left unanswered is sent again on
///   the next connection with the same idempotency key, so it is stored exactly once;
/// - with a token provider ([`Client::with_token_provider`]), a JWT is replaced in place
///   (the `auth` message) before it expires, without reconnecting.
///
/// Payloads arrive as bytes, as published (the connection asks for binary frames).
/// The first connection must succeed: a wrong URL, channel, cursor or credential is an
/// error at once, with the server's `code`. Later, a refusal that waiting cannot fix ends
/// the socket with an error; a backend's close ends it with [`Error::Closed`].
///
/// ```no_run
/// # async fn run() -> Result<(), dormouse_client::http::Error> {
/// use dormouse_client::http::{Client, Item, parse_base_url};
/// let client = Client::new(parse_base_url("http://127.0.0.1:8080").unwrap(), None, "app/1")?;
/// let mut socket = client.socket(&[("room:1", None)]);
/// let sender = socket.handle();
/// tokio::spawn(async move { sender.publish("room:1", "hello", None).await });
/// loop {
///     match socket.next().await? {
///         Item::Message(m) => println!("{:?} {:?}", m.id, m.data),
///         Item::Lost { reason, wait } => eprintln!("{reason}; again in {wait:?}"),
///         _ => {}
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Socket {
    handle: SocketHandle,
    items: Items<Item<Message>>,
}

/// Sends on a [`Socket`]'s connection from anywhere (it is cheap to clone): publishes,
/// subscribes, unsubscribes, closes. Each call waits for the server's answer.
#[derive(Debug, Clone)]
pub struct SocketHandle {
    commands: mpsc::UnboundedSender<Command>,
}

#[derive(Debug)]
enum Command {
    Publish {
        channel: String,
        event: Option<String>,
        data: Bytes,
        key: String,
        answer: oneshot::Sender<Result<Published, Error>>,
    },
    Subscribe {
        channel: String,
        from: Option<String>,
        answer: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        channel: String,
        answer: oneshot::Sender<Result<(), Error>>,
    },
    Close,
}

impl Socket {
    pub(super) fn new(client: Client, channels: Vec<(String, Option<String>)>) -> Self {
        let (commands, inbox) = mpsc::unbounded_channel();
        let (items, out) = mpsc::channel(64);
        let followed = channels
            .into_iter()
            .map(|(name, cursor)| Followed {
                name,
                cursor,
                waiting: Vec::new(),
            })
            .collect();
        let task = Task {
            client,
            followed,
            inbox,
            items,
            ready: VecDeque::new(),
            outbox: VecDeque::new(),
            pending: HashMap::new(),
            next_ref: 0,
            failures: 0,
            connected_once: false,
            healthy: false,
            skipping: false,
        };
        tokio::spawn(task.run());
        Self {
            handle: SocketHandle { commands },
            items: Items::new(out),
        }
    }

    /// A handle to publish, subscribe and unsubscribe while this socket is read.
    pub fn handle(&self) -> SocketHandle {
        self.handle.clone()
    }

    /// The next item, in order: messages (each channel's in order), controls (`connected`,
    /// `gap`, `join`, `leave`, and `close` before the socket ends), and [`Item::Lost`] /
    /// [`Item::Reconnected`] around each reconnection. An error ends the socket, and is
    /// answered again by every later call.
    pub async fn next(&mut self) -> Result<Item<Message>, Error> {
        self.items.next().await
    }
}

/// A socket is also its handle: `socket.publish(..)`, `socket.subscribe(..)` and the rest
/// work on it directly; [`Socket::handle`] is for other tasks.
impl std::ops::Deref for Socket {
    type Target = SocketHandle;

    fn deref(&self) -> &SocketHandle {
        &self.handle
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.handle.close();
    }
}

impl SocketHandle {
    /// Publishes `data` to `channel` (one the socket follows) as event type `event`
    /// (`message` when `None`), and waits until the server stored it. Sent again with the
    /// same idempotency key after a reconnection if no answer came, so it is stored once
    /// however often the connection drops; an `error` answer (say `rate_limited`, which
    /// [`Error::is_transient`] tells apart) is returned as is.
    pub async fn publish(
        &self,
        channel: &str,
        data: impl Into<Bytes>,
        event: Option<&str>,
    ) -> Result<Published, Error> {
        let (answer, answered) = oneshot::channel();
        self.send(Command::Publish {
            channel: channel.to_string(),
            event: event.map(str::to_string),
            data: data.into(),
            key: tokio_tungstenite::tungstenite::handshake::client::generate_key(),
            answer,
        })?;
        answered.await.unwrap_or_else(|_| Err(by_the_app()))
    }

    /// Follows one more channel on this connection, from after `from` (or from now on),
    /// and waits until the server accepted it (its backlog is on the way). Kept across
    /// reconnections like the others; a refusal (`forbidden`, `too_many_channels`, ...)
    /// is returned and the channel is not followed.
    pub async fn subscribe(&self, channel: &str, from: Option<String>) -> Result<(), Error> {
        let (answer, answered) = oneshot::channel();
        self.send(Command::Subscribe {
            channel: channel.to_string(),
            from,
            answer,
        })?;
        answered.await.unwrap_or_else(|_| Err(by_the_app()))
    }

    /// Stops following `channel` (events already on their way may still arrive). The
    /// channel the socket was opened for stays until it closes (`opened_for_channel`).
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        let (answer, answered) = oneshot::channel();
        self.send(Command::Unsubscribe {
            channel: channel.to_string(),
            answer,
        })?;
        answered.await.unwrap_or_else(|_| Err(by_the_app()))
    }

    /// Closes the connection for good (code 1000); what was not yet answered fails.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }

    fn send(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).map_err(|_| by_the_app())
    }
}

/// A channel followed, and where it resumes.
#[derive(Debug)]
struct Followed {
    name: String,
    /// The id of its last message delivered (or where its stream started).
    cursor: Option<String>,
    /// `subscribe` calls waiting for its first `subscribed` answer.
    waiting: Vec<oneshot::Sender<Result<(), Error>>>,
}

/// A publish not answered yet; sent again after a reconnection.
#[derive(Debug)]
struct Outgoing {
    reference: u64,
    frame: String,
    /// Connections it was sent on.
    sends: u32,
    answer: oneshot::Sender<Result<Published, Error>>,
}

/// What an answer with a `ref` belongs to.
#[derive(Debug)]
enum Pending {
    Publish,
    Subscribe(String),
    Unsubscribe(oneshot::Sender<Result<(), Error>>),
    Auth,
}

/// Why a connection ended.
enum End {
    /// Reconnect (after the backoff).
    Lost(String),
    /// Stop, with this error for the app.
    Stop(Error),
}

/// The connection's task: owns the WebSocket, reconnects, keeps the cursors and what is
/// unanswered.
struct Task {
    client: Client,
    followed: Vec<Followed>,
    inbox: mpsc::UnboundedReceiver<Command>,
    items: mpsc::Sender<Result<Item<Message>, Error>>,
    /// Items read and not yet taken by the app.
    ready: VecDeque<Item<Message>>,
    /// Publishes not answered yet, in the order they were made.
    outbox: VecDeque<Outgoing>,
    /// What each `ref` sent on this connection belongs to.
    pending: HashMap<u64, Pending>,
    next_ref: u64,
    failures: u32,
    connected_once: bool,
    /// The connection was accepted (`connected`) and nothing of it was refused for now.
    healthy: bool,
    /// Messages were dropped past the read-ahead bound while answers were still owed: the
    /// cursors stay at the last message kept, and every later message is dropped too
    /// until the connection is made again from them.
    skipping: bool,
}

type Sink = SplitSink<WebSocket, Frame>;

impl Task {
    async fn run(mut self) {
        let error = loop {
            let (ws, expires) = match self.connect().await {
                Ok(opened) => opened,
                Err(e) if !self.connected_once => break e,
                Err(Error::Server(e)) if !e.is_transient() => break Error::Server(e),
                Err(e) => match self.wait_and_retry(format!("{e}")).await {
                    Some(stop) => break stop,
                    None => continue,
                },
            };
            if std::mem::replace(&mut self.connected_once, true) {
                self.ready.push_back(Item::Reconnected);
            }
            self.healthy = false;
            match self.session(ws, expires).await {
                End::Stop(e) => break e,
                End::Lost(reason) => {
                    // The backoff starts again only after a connection that worked: one
                    // refused again at once (a channel still full) waits longer each time.
                    if self.healthy {
                        self.failures = 0;
                    }
                    if let Some(stop) = self.wait_and_retry(reason).await {
                        break stop;
                    }
                }
            }
        };
        // Everything still waiting learns the end; the app gets what was read, then it.
        self.forget_pending();
        for out in self.outbox.drain(..) {
            let _ = out.answer.send(Err(again(&error)));
        }
        for followed in &mut self.followed {
            for waiting in followed.waiting.drain(..) {
                let _ = waiting.send(Err(again(&error)));
            }
        }
        for item in self.ready.drain(..) {
            if self.items.send(Ok(item)).await.is_err() {
                return;
            }
        }
        let _ = self.items.send(Err(error)).await;
    }

    /// Says the connection was lost, then waits out the backoff while still taking the
    /// app's commands (queued for the next connection). `Some` when the app closed.
    async fn wait_and_retry(&mut self, reason: String) -> Option<Error> {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(RETRY, self.failures - 1);
        self.ready.push_back(Item::Lost { reason, wait });
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            let command = tokio::select! {
                () = &mut sleep => return None,
                permit = self.items.reserve(), if !self.ready.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(Ok(self.ready.pop_front().expect("not empty")));
                        continue;
                    }
                    Err(_) => return Some(by_the_app()),
                },
                command = self.inbox.recv() => command,
            };
            match command {
                None | Some(Command::Close) => return Some(by_the_app()),
                Some(command) => {
                    if let Err(e) = self.take(command, None).await {
                        return Some(e);
                    }
                }
            }
        }
    }

    /// Opens the connection; also when its token expires, if it is a JWT.
    async fn connect(&mut self) -> Result<(WebSocket, Option<u64>), Error> {
        let first = self.followed.first().ok_or_else(|| Error::Refused {
            code: "missing_channel".into(),
            message: "a socket follows at least one channel".into(),
        })?;
        let mut url: Url = self.client.url(&["v1", "channels", &first.name, "ws"]);
        url.query_pairs_mut().append_pair("format", "binary");
        if let Some(cursor) = &first.cursor {
            url.query_pairs_mut().append_pair("last_event_id", cursor);
        }
        let token = self.client.token().await?;
        let expires = token.as_deref().and_then(token_expiry);
        Ok((
            websocket::open(&self.client, url, None, token).await?,
            expires,
        ))
    }

    /// One connection, until it ends.
    async fn session(&mut self, ws: WebSocket, expires: Option<u64>) -> End {
        let (mut sink, mut stream) = ws.split();
        self.forget_pending();
        self.skipping = false;
        // The other channels, each from its cursor; then what was left unanswered, in order.
        for at in 1..self.followed.len() {
            let (name, cursor) = (
                self.followed[at].name.clone(),
                self.followed[at].cursor.clone(),
            );
            if let Err(end) = self.send_subscribe(&mut sink, name, cursor).await {
                return end;
            }
        }
        let mut resend = Vec::new();
        let mut kept = VecDeque::with_capacity(self.outbox.len());
        for mut out in self.outbox.drain(..) {
            if out.sends >= MAX_SENDS {
                let _ = out.answer.send(Err(Error::Refused {
                    code: "unanswered".into(),
                    message: format!(
                        "no answer after it was sent on {MAX_SENDS} connections, each of \
                         which ended first (is it larger than the server takes?)"
                    ),
                }));
                continue;
            }
            out.sends += 1;
            resend.push((out.reference, out.frame.clone()));
            kept.push_back(out);
        }
        self.outbox = kept;
        for (reference, frame) in resend {
            self.pending.insert(reference, Pending::Publish);
            if let Err(e) = sink.feed(Frame::text(frame)).await {
                return End::Lost(format!("sending: {e}"));
            }
        }
        if let Err(e) = sink.flush().await {
            return End::Lost(format!("sending: {e}"));
        }
        // A provider's JWT is replaced in place before it expires.
        let mut expires = expires;
        let refresh = tokio::time::sleep_until(refresh_at(expires));
        tokio::pin!(refresh);
        let mut token_refreshes = self.client.refreshes_tokens() && expires.is_some();
        // Silence from the server (not activity of the app's) for this long ends the
        // connection: the server pings every 20 s.
        let idle_timeout = IDLE_TIMEOUT;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        enum Wake {
            Delivered,
            AppGone,
            Read(Option<Result<Frame, String>>),
            Idle,
            Command(Option<Command>),
            Refresh,
        }
        loop {
            // Read ahead of the app up to a bound, but always while an answer is owed: an
            // app waiting for an ack before it reads would otherwise wait forever.
            if self.skipping && self.ready.len() < READ_AHEAD / 2 {
                return End::Lost(
                    "messages were left unread past the read-ahead bound; resuming from the cursors"
                        .into(),
                );
            }
            let reading = self.ready.len() < READ_AHEAD || !self.pending.is_empty();
            if !reading {
                // Not reading is not silence.
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + idle_timeout);
            }
            // Each branch only says what happened; it is handled once the select is over
            // (its futures borrow parts of `self`).
            let wake = tokio::select! {
                permit = self.items.reserve(), if !self.ready.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(Ok(self.ready.pop_front().expect("not empty")));
                        Wake::Delivered
                    }
                    Err(_) => Wake::AppGone,
                },
                read = stream.next(), if reading => {
                    Wake::Read(read.map(|r| r.map_err(|e| e.to_string())))
                }
                () = &mut idle, if reading => Wake::Idle,
                command = self.inbox.recv() => Wake::Command(command),
                () = &mut refresh, if token_refreshes => Wake::Refresh,
            };
            match wake {
                Wake::Delivered => {}
                Wake::AppGone | Wake::Command(None | Some(Command::Close)) => {
                    return self.close(&mut sink, by_the_app()).await;
                }
                Wake::Idle => {
                    return End::Lost(format!("nothing received for {idle_timeout:?}"));
                }
                Wake::Read(None) => return End::Lost("the connection ended".into()),
                Wake::Read(Some(Err(e))) => return End::Lost(e),
                Wake::Read(Some(Ok(frame))) => {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + idle_timeout);
                    if let Some(end) = self.read(frame) {
                        return end;
                    }
                }
                Wake::Command(Some(command)) => {
                    if let Err(end) = self.take_connected(command, &mut sink).await {
                        return end;
                    }
                }
                Wake::Refresh => match self.refresh_token(&mut sink).await {
                    Err(end) => return end,
                    // Armed again only for a token that lives longer than the last: one
                    // that does not (a provider caching its token, a clock ahead of the
                    // server's) is left to expire, and the `4001` close reconnects.
                    Ok(next) if next > expires => {
                        expires = next;
                        refresh.as_mut().reset(refresh_at(expires));
                    }
                    Ok(_) => token_refreshes = false,
                },
            }
        }
    }

    /// Sends the provider's next token (`auth`), and answers when it expires. The server
    /// keeps the old one if it refuses the new, and closes with `4001` at its expiry,
    /// which reconnects with whatever the provider gives then.
    async fn refresh_token(&mut self, sink: &mut Sink) -> Result<Option<u64>, End> {
        let token = match self.client.token().await {
            Ok(Some(token)) => token,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.ready.push_back(Item::Control {
                    kind: "auth_refused".into(),
                    data: json!({"type": "auth_refused", "code": "token_provider", "message": e.to_string()}),
                });
                return Ok(None);
            }
        };
        let reference = self.reference();
        self.pending.insert(reference, Pending::Auth);
        let frame = json!({"type": "auth", "token": token, "ref": reference}).to_string();
        sink.send(Frame::text(frame))
            .await
            .map_err(|e| End::Lost(format!("sending: {e}")))?;
        Ok(token_expiry(&token))
    }

    /// Forgets the answers a lost connection owed; an unsubscribe is done anyway, since
    /// the next connection does not follow the channel.
    fn forget_pending(&mut self) {
        for (_, pending) in self.pending.drain() {
            if let Pending::Unsubscribe(answer) = pending {
                let _ = answer.send(Ok(()));
            }
        }
    }

    async fn close(&mut self, sink: &mut Sink, error: Error) -> End {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "closed by the app".into(),
        };
        let _ = sink.send(Frame::Close(Some(frame))).await;
        End::Stop(error)
    }

    fn reference(&mut self) -> u64 {
        self.next_ref += 1;
        self.next_ref
    }

    /// A command while disconnected (`sink` is `None`): queued for the next connection.
    async fn take(&mut self, command: Command, sink: Option<&mut Sink>) -> Result<(), Error> {
        match command {
            Command::Publish {
                channel,
                event,
                data,
                key,
                answer,
            } => {
                let reference = self.reference();
                let mut frame = json!({
                    "type": "publish",
                    "channel": channel,
                    "idempotency_key": key,
                    "ref": reference,
                });
                // Text as is, unless escaping it in JSON costs more than base64 would (a
                // payload of control characters grows up to six times).
                let base64_len = data.len().div_ceil(3) * 4;
                match std::str::from_utf8(&data)
                    .ok()
                    .map(|text| serde_json::Value::String(text.to_string()))
                    .filter(|text| text.to_string().len() <= base64_len + 2)
                {
                    Some(text) => frame["data"] = text,
                    None => {
                        use base64::Engine as _;
                        frame["data_base64"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(&data));
                    }
                }
                if let Some(event) = event {
                    frame["event"] = json!(event);
                }
                let frame = frame.to_string();
                // Kept until answered, so a send that fails is sent again on the next
                // connection.
                self.outbox.push_back(Outgoing {
                    reference,
                    frame: frame.clone(),
                    sends: u32::from(sink.is_some()),
                    answer,
                });
                if let Some(sink) = sink {
                    self.pending.insert(reference, Pending::Publish);
                    sink.send(Frame::text(frame))
                        .await
                        .map_err(|e| Error::Refused {
                            code: "network".into(),
                            message: format!("sending: {e}"),
                        })?;
                }
            }
            Command::Subscribe {
                channel,
                from,
                answer,
            } => {
                if self.followed.iter().any(|f| f.name == channel) {
                    let _ = answer.send(Err(Error::Refused {
                        code: "already_subscribed".into(),
                        message: format!("the socket already follows {channel:?}"),
                    }));
                    return Ok(());
                }
                self.followed.push(Followed {
                    name: channel.clone(),
                    cursor: from.clone(),
                    waiting: vec![answer],
                });
                if let Some(sink) = sink {
                    self.send_subscribe(sink, channel, from)
                        .await
                        .map_err(|_| Error::Refused {
                            code: "network".into(),
                            message: "sending failed".into(),
                        })?;
                }
            }
            Command::Unsubscribe { channel, answer } => {
                let Some(at) = self.followed.iter().position(|f| f.name == channel) else {
                    let _ = answer.send(Err(Error::Refused {
                        code: "not_subscribed".into(),
                        message: format!("the socket does not follow {channel:?}"),
                    }));
                    return Ok(());
                };
                if at == 0 {
                    let _ = answer.send(Err(Error::Refused {
                        code: "opened_for_channel".into(),
                        message: format!(
                            "the socket was opened for {channel:?}; it stays until the socket closes"
                        ),
                    }));
                    return Ok(());
                }
                let followed = self.followed.remove(at);
                for waiting in followed.waiting {
                    let _ = waiting.send(Err(Error::Refused {
                        code: "unsubscribed".into(),
                        message: format!("{channel:?} was unsubscribed before it was followed"),
                    }));
                }
                match sink {
                    Some(sink) => {
                        let reference = self.reference();
                        self.pending.insert(reference, Pending::Unsubscribe(answer));
                        let frame =
                            json!({"type": "unsubscribe", "channel": channel, "ref": reference});
                        sink.send(Frame::text(frame.to_string()))
                            .await
                            .map_err(|e| Error::Refused {
                                code: "network".into(),
                                message: format!("sending: {e}"),
                            })?;
                    }
                    // Not subscribed on the next connection: done.
                    None => {
                        let _ = answer.send(Ok(()));
                    }
                }
            }
            Command::Close => return Err(by_the_app()),
        }
        Ok(())
    }

    async fn take_connected(&mut self, command: Command, sink: &mut Sink) -> Result<(), End> {
        // A failed send loses the connection; what it carried waits for the next one.
        self.take(command, Some(sink))
            .await
            .map_err(|e| End::Lost(format!("{e}")))
    }

    async fn send_subscribe(
        &mut self,
        sink: &mut Sink,
        channel: String,
        cursor: Option<String>,
    ) -> Result<(), End> {
        let reference = self.reference();
        let mut frame = json!({"type": "subscribe", "channel": channel, "ref": reference});
        if let Some(cursor) = cursor {
            frame["last_event_id"] = json!(cursor);
        }
        self.pending.insert(reference, Pending::Subscribe(channel));
        sink.send(Frame::text(frame.to_string()))
            .await
            .map_err(|e| End::Lost(format!("sending: {e}")))
    }

    /// One frame from the server; `Some` ends the connection.
    fn read(&mut self, frame: Frame) -> Option<End> {
        match frame {
            Frame::Binary(bytes) => {
                let Some(parsed) = binary::Frame::parse(&bytes) else {
                    return Some(End::Lost(
                        "the server sent a binary frame it could not have".into(),
                    ));
                };
                if parsed.id.is_some() && (self.skipping || self.ready.len() >= READ_AHEAD) {
                    // Read past the bound only for the answers behind it (the app may be
                    // awaiting one before it reads): this and every later message of the
                    // connection is left for the next one, from the cursors.
                    self.skipping = true;
                    return None;
                }
                let data = bytes.slice_ref(parsed.data);
                let message = Message {
                    channel: parsed.channel.map(str::to_string),
                    id: parsed.id.map(str::to_string),
                    event: parsed.event.to_string(),
                    data,
                };
                if let (Some(channel), Some(id)) = (&message.channel, &message.id)
                    && let Some(followed) = self.followed.iter_mut().find(|f| &f.name == channel)
                {
                    followed.cursor = Some(id.clone());
                }
                self.ready.push_back(Item::Message(message));
                None
            }
            Frame::Text(text) => {
                let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                self.control(value)
            }
            Frame::Close(close) => {
                let (code, reason) = close.map_or((1005, String::new()), |c| {
                    (u16::from(c.code), c.reason.as_str().to_string())
                });
                if is_final_close(code) {
                    self.ready.push_back(Item::Control {
                        kind: "close".into(),
                        data: json!({"type": "close", "code": code, "reason": reason}),
                    });
                    return Some(End::Stop(Error::Closed { code, reason }));
                }
                Some(End::Lost(format!(
                    "the server closed the connection ({code}): {reason}"
                )))
            }
            Frame::Ping(_) | Frame::Pong(_) | Frame::Frame(_) => None,
        }
    }

    /// A JSON text frame: an answer to something sent, or a control for the app; `Some`
    /// ends the connection.
    fn control(&mut self, value: Value) -> Option<End> {
        let kind = value["type"].as_str().unwrap_or("").to_string();
        let text = |name: &str| value[name].as_str().map(str::to_string);
        let pending = value["ref"].as_u64().and_then(|r| self.pending.remove(&r));
        match (kind.as_str(), pending) {
            ("ack", Some(Pending::Publish)) | ("error", Some(Pending::Publish)) => {
                let reference = value["ref"].as_u64();
                let at = self
                    .outbox
                    .iter()
                    .position(|out| Some(out.reference) == reference)?;
                let out = self.outbox.remove(at).expect("found");
                let result = if kind == "ack" {
                    Ok(Published {
                        id: text("id").unwrap_or_default(),
                        duplicate: value["duplicate"].as_bool().unwrap_or(false),
                    })
                } else {
                    Err(refused(&value))
                };
                let _ = out.answer.send(result);
            }
            ("subscribed", Some(Pending::Subscribe(channel))) => {
                if let Some(followed) = self.followed.iter_mut().find(|f| f.name == channel) {
                    if followed.cursor.is_none() {
                        followed.cursor = text("starts_after");
                    }
                    for waiting in followed.waiting.drain(..) {
                        let _ = waiting.send(Ok(()));
                    }
                }
            }
            ("error", Some(Pending::Subscribe(channel))) => {
                let at = self.followed.iter().position(|f| f.name == channel)?;
                let transient = refused(&value).is_transient();
                if transient && self.followed[at].waiting.is_empty() {
                    // Followed before, refused for now on a reconnection (the channel is
                    // full, the server shedding load): try again after the backoff.
                    let code = value["code"].as_str().unwrap_or("error");
                    self.healthy = false;
                    return Some(End::Lost(format!(
                        "resubscribing to {channel:?} was refused for now ({code})"
                    )));
                }
                // Refused: not followed any more; whoever asked learns why, and the app
                // sees it among the items when the refusal came on a reconnection.
                {
                    let followed = self.followed.remove(at);
                    if followed.waiting.is_empty() {
                        let mut data = value.clone();
                        data["channel"] = json!(channel);
                        self.ready.push_back(Item::Control {
                            kind: "refused".into(),
                            data,
                        });
                    }
                    for waiting in followed.waiting {
                        let _ = waiting.send(Err(refused(&value)));
                    }
                }
            }
            ("unsubscribed", Some(Pending::Unsubscribe(answer))) => {
                let _ = answer.send(Ok(()));
            }
            ("error", Some(Pending::Unsubscribe(answer))) => {
                let _ = answer.send(Err(refused(&value)));
            }
            ("auth_ok", Some(Pending::Auth)) => {}
            ("error", Some(Pending::Auth)) => {
                // The old token stays in force until it expires; then `4001` reconnects
                // with whatever the provider gives then.
                let mut data = value.clone();
                data["type"] = json!("auth_refused");
                self.ready.push_back(Item::Control {
                    kind: "auth_refused".into(),
                    data,
                });
            }
            ("connected", _) => {
                self.healthy = true;
                if let Some(first) = self.followed.first_mut()
                    && first.cursor.is_none()
                {
                    first.cursor = text("starts_after");
                }
                self.ready.push_back(Item::Control { kind, data: value });
            }
            // `gap`, `join`, `leave`, and whatever a newer server adds.
            (_, _) if !kind.is_empty() => self.ready.push_back(Item::Control { kind, data: value }),
            _ => {}
        }
        None
    }
}

/// An `error` answer as an [`Error`].
fn refused(value: &Value) -> Error {
    Error::Refused {
        code: value["code"].as_str().unwrap_or("error").to_string(),
        message: value["message"].as_str().unwrap_or("").to_string(),
    }
}

/// When to replace a token expiring at `expires` (never, for one without an expiry).
fn refresh_at(expires: Option<u64>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match expires {
        Some(exp) => now + refresh_in(exp),
        None => now + Duration::from_secs(100 * 365 * 24 * 3600),
    }
}
