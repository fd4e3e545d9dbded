//! A WebSocket to a user object (`/v1/objects/{namespace}/{name}/...`), reconnected with
//! backoff until a backend closes it for good.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::follow::{Item, backoff};
use super::websocket::{self, Items, WebSocket, by_the_app, is_final_close};
use super::{Client, Error};

const RETRY: Duration = Duration::from_secs(1);
/// The gateway pings every `websocket.ping_interval` (20 s), whatever the object does.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What an object sent: its frames as they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectMessage {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Bytes),
}

/// A WebSocket to one instance of a user object (docs/OBJECTS.md), the counterpart of the
/// JavaScript client's `client.object()`: the object's own protocol, with the reconnection
/// done here. It reconnects with backoff after a drop, a restart or a `4001` (the token
/// provider gives the next credential), and what the app sends while it is down is queued
/// and sent when it is back. An object keeps no cursor, so a frame sent just as the
/// connection broke may be lost: an object that needs more says so in its protocol (the
/// chat example answers a `join` with the recent history).
///
/// A backend's close (`1000`, `3000`–`3999`, `4100`–`4999`) ends it with
/// [`Error::Closed`]; the first connection must succeed.
///
/// ```no_run
/// # async fn run() -> Result<(), dormouse_client::http::Error> {
/// use dormouse_client::http::{Client, Item, ObjectMessage, parse_base_url};
/// let client = Client::new(parse_base_url("http://127.0.0.1:8080").unwrap(), None, "app/1")?;
/// let mut room = client.object("rooms", "lobby", "ws", &[("name", "ada")]);
/// room.send_text(r#"{"type":"say","text":"hi"}"#);
/// loop {
///     match room.next().await? {
///         Item::Message(ObjectMessage::Text(text)) => println!("{text}"),
///         Item::Lost { reason, wait } => eprintln!("{reason}; again in {wait:?}"),
///         _ => {}
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct ObjectSocket {
    commands: mpsc::UnboundedSender<Outbound>,
    items: Items<Item<ObjectMessage>>,
}

#[derive(Debug)]
enum Outbound {
    Frame(Frame),
    Close(oneshot::Sender<()>),
}

impl ObjectSocket {
    pub(super) fn new(client: Client, url: reqwest::Url) -> Self {
        let (commands, inbox) = mpsc::unbounded_channel();
        let (items, out) = mpsc::channel(64);
        tokio::spawn(
            Task {
                client,
                url,
                inbox,
                items,
                queue: VecDeque::new(),
                ready: VecDeque::new(),
                failures: 0,
                connected_once: false,
            }
            .run(),
        );
        Self {
            commands,
            items: Items::new(out),
        }
    }

    /// Sends a text frame (queued while the socket is down).
    pub fn send_text(&self, text: impl Into<String>) {
        let _ = self
            .commands
            .send(Outbound::Frame(Frame::text(text.into())));
    }

    /// Sends a binary frame (queued while the socket is down).
    pub fn send_binary(&self, data: impl Into<Bytes>) {
        let _ = self
            .commands
            .send(Outbound::Frame(Frame::binary(data.into())));
    }

    /// The next item: the object's frames ([`Item::Message`]), and [`Item::Lost`] /
    /// [`Item::Reconnected`] around each reconnection. An error ends the socket.
    pub async fn next(&mut self) -> Result<Item<ObjectMessage>, Error> {
        self.items.next().await
    }

    /// Closes the socket for good (code 1000) and waits until the close frame went out.
    /// Frames sent before it went out first; while the socket is down (reconnecting),
    /// what was queued is dropped.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Outbound::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

struct Task {
    client: Client,
    url: reqwest::Url,
    inbox: mpsc::UnboundedReceiver<Outbound>,
    items: mpsc::Sender<Result<Item<ObjectMessage>, Error>>,
    /// Frames the app sent while the socket was down.
    queue: VecDeque<Frame>,
    ready: VecDeque<Item<ObjectMessage>>,
    failures: u32,
    connected_once: bool,
}

enum End {
    Lost(String),
    Stop(Error),
}

impl Task {
    async fn run(mut self) {
        let error = loop {
            let opened = match self.client.token().await {
                Ok(token) => websocket::open(&self.client, self.url.clone(), None, token).await,
                Err(e) => Err(e),
            };
            let end = match opened {
                Err(e) if !self.connected_once => break e,
                Err(Error::Server(e)) if !e.is_transient() => break Error::Server(e),
                Err(e) => End::Lost(format!("{e}")),
                Ok(ws) => {
                    self.failures = 0;
                    if std::mem::replace(&mut self.connected_once, true) {
                        self.ready.push_back(Item::Reconnected);
                    }
                    self.session(ws).await
                }
            };
            match end {
                End::Stop(e) => break e,
                End::Lost(reason) => {
                    self.failures = self.failures.saturating_add(1);
                    let wait = backoff(RETRY, self.failures - 1);
                    self.ready.push_back(Item::Lost { reason, wait });
                    if let Some(stop) = self.wait(wait).await {
                        break stop;
                    }
                }
            }
        };
        for item in self.ready.drain(..) {
            if self.items.send(Ok(item)).await.is_err() {
                return;
            }
        }
        let _ = self.items.send(Err(error)).await;
    }

    /// Waits out the backoff, queueing what the app sends; `Some` when it closed.
    async fn wait(&mut self, wait: Duration) -> Option<Error> {
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return None,
                permit = self.items.reserve(), if !self.ready.is_empty() => match permit {
                    Ok(permit) => permit.send(Ok(self.ready.pop_front().expect("not empty"))),
                    Err(_) => return Some(by_the_app()),
                },
                command = self.inbox.recv() => match command {
                    Some(Outbound::Frame(frame)) => self.queue.push_back(frame),
                    Some(Outbound::Close(done)) => {
                        let _ = done.send(());
                        return Some(by_the_app());
                    }
                    None => return Some(by_the_app()),
                },
            }
        }
    }

    async fn session(&mut self, ws: WebSocket) -> End {
        let (mut sink, mut stream) = ws.split();
        // Taken off the queue once written: a connection that fails on the way leaves
        // them for the next.
        for frame in &self.queue {
            if let Err(e) = sink.feed(frame.clone()).await {
                return End::Lost(format!("sending: {e}"));
            }
        }
        if let Err(e) = sink.flush().await {
            return End::Lost(format!("sending: {e}"));
        }
        self.queue.clear();
        // Silence from the server for this long (not the app's activity) ends it.
        let idle = tokio::time::sleep(IDLE_TIMEOUT);
        tokio::pin!(idle);
        loop {
            let reading = self.ready.len() < 1024;
            if !reading {
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
            }
            tokio::select! {
                permit = self.items.reserve(), if !self.ready.is_empty() => match permit {
                    Ok(permit) => permit.send(Ok(self.ready.pop_front().expect("not empty"))),
                    Err(_) => return close(&mut sink).await,
                },
                () = &mut idle, if reading => {
                    return End::Lost(format!("nothing received for {IDLE_TIMEOUT:?}"));
                }
                read = stream.next(), if reading => {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                    match read {
                        None => return End::Lost("the connection ended".into()),
                        Some(Err(e)) => return End::Lost(format!("{e}")),
                        Some(Ok(Frame::Text(text))) => self
                            .ready
                            .push_back(Item::Message(ObjectMessage::Text(text.as_str().to_string()))),
                        Some(Ok(Frame::Binary(data))) => {
                            self.ready.push_back(Item::Message(ObjectMessage::Binary(data)));
                        }
                        Some(Ok(Frame::Close(frame))) => {
                            let (code, reason) = frame.map_or((1005, String::new()), |c| {
                                (u16::from(c.code), c.reason.as_str().to_string())
                            });
                            if is_final_close(code) {
                                return End::Stop(Error::Closed { code, reason });
                            }
                            return End::Lost(format!(
                                "the server closed the connection ({code}): {reason}"
                            ));
                        }
                        Some(Ok(_)) => {}
                    }
                },
                command = self.inbox.recv() => match command {
                    Some(Outbound::Frame(frame)) => {
                        if let Err(e) = sink.send(frame).await {
                            return End::Lost(format!("sending: {e}"));
                        }
                    }
                    Some(Outbound::Close(done)) => {
                        let end = close(&mut sink).await;
                        let _ = done.send(());
                        return end;
                    }
                    None => return close(&mut sink).await,
                },
            }
        }
    }
}

async fn close(sink: &mut futures::stream::SplitSink<WebSocket, Frame>) -> End {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "closed by the app".into(),
    };
    let _ = sink.send(Frame::Close(Some(frame))).await;
    End::Stop(by_the_app())
}
