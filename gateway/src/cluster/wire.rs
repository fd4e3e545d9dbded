//! What a node sends the owner of a channel or object, and what comes back: the calls
//! that can be served by another node ([`Forwarded`]), their answers ([`Answer`]), and
//! the runtime's errors, kept apart by kind so the client gets the status it would have
//! got from the owner itself.
//!
//! Built on [`dormouse_cluster::wire`]'s primitives; every message starts with a version
//! byte, so a node refuses (rather than misreads) a message from a build that speaks
//! another.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use dormouse_actors::channel::{
    ChannelInfo, ChannelRequest, ChannelResponse, Control, Direction, Event, EventId, HistoryPage,
    NewMessage, Published, Range, Start,
};
use dormouse_cluster::NodeId;
use dormouse_cluster::wire::{Reader, Undecodable, len32, put_bytes, put_opt_str, put_str};
use dormouse_runtime::{Error, HttpRequest, HttpResponse, Inbound};

/// 2: history calls carry a direction and a time range, gaps their channel.
const VERSION: u8 = 2;

/// A call another node may serve for this one.
#[derive(Debug, Clone)]
pub(crate) enum Forwarded {
    /// A request to a channel.
    Channel { name: String, call: ChannelCall },
    /// An HTTP request to a user object.
    Fetch {
        namespace: String,
        name: String,
        request: Box<HttpRequest>,
    },
    /// A WebSocket to a user object, connected to `node` (the sender) as its connection
    /// `conn`: the owner gives the object a socket whose frames it relays there.
    Connect {
        namespace: String,
        name: String,
        node: NodeId,
        conn: u64,
        request: Box<HttpRequest>,
    },
    /// A client's message on a socket relayed by the owner (`socket` is the owner's id).
    SocketMessage {
        namespace: String,
        name: String,
        socket: u64,
        message: Inbound,
    },
    /// The client of a relayed socket went away.
    SocketClosed {
        namespace: String,
        name: String,
        socket: u64,
    },
}

/// The channel requests that make sense on another node (a subscriber's socket stays on the
/// node it connected to; see `copies`).
#[derive(Debug, Clone)]
pub(crate) enum ChannelCall {
    Publish(Vec<NewMessage>),
    History { range: Range, limit: usize },
    Info,
    Delete,
}

impl ChannelCall {
    /// The call for `request`, or the request back when it cannot be forwarded.
    pub(crate) fn from_request(request: ChannelRequest) -> Result<Self, ChannelRequest> {
        Ok(match request {
            ChannelRequest::Publish(messages) => Self::Publish(messages),
            ChannelRequest::History { range, limit } => Self::History { range, limit },
            ChannelRequest::Info => Self::Info,
            ChannelRequest::Delete => Self::Delete,
            other => return Err(other),
        })
    }

    pub(crate) fn into_request(self) -> ChannelRequest {
        match self {
            Self::Publish(messages) => ChannelRequest::Publish(messages),
            Self::History { range, limit } => ChannelRequest::History { range, limit },
            Self::Info => ChannelRequest::Info,
            Self::Delete => ChannelRequest::Delete,
        }
    }
}

/// What the serving node answers.
#[derive(Debug)]
pub(crate) enum Answer {
    Channel(ChannelResponse),
    Http(HttpResponse),
    Failed(Error),
    /// A [`Forwarded::Connect`] accepted: the owner and its id for the socket.
    Socket {
        owner: NodeId,
        socket: u64,
    },
    /// A socket message or close delivered.
    Done,
}

fn start_bytes(out: &mut BytesMut) {
    out.put_u8(VERSION);
}

fn check_version(r: &mut Reader<'_>) -> Result<(), Undecodable> {
    match r.u8()? {
        VERSION => Ok(()),
        other => Err(Undecodable(format!(
            "a forwarded call of version {other}; this node speaks {VERSION} (mixed builds?)"
        ))),
    }
}

pub(crate) fn encode_forwarded(call: &Forwarded) -> Bytes {
    let mut out = BytesMut::new();
    start_bytes(&mut out);
    match call {
        Forwarded::Channel { name, call } => {
            out.put_u8(1);
            put_str(&mut out, name);
            match call {
                ChannelCall::Publish(messages) => {
                    out.put_u8(1);
                    out.put_u32(len32(messages.len()));
                    for message in messages {
                        put_opt_str(&mut out, message.event.as_deref());
                        put_bytes(&mut out, &message.data);
                        put_opt_str(&mut out, message.idempotency_key.as_deref());
                    }
                }
                ChannelCall::History { range, limit } => {
                    out.put_u8(2);
                    match range.direction {
                        Direction::Forward(start) => {
                            out.put_u8(0);
                            match start {
                                Start::Live => out.put_u8(0),
                                Start::Oldest => out.put_u8(1),
                                Start::After(id) => {
                                    out.put_u8(2);
                                    out.put_u64(id.epoch);
                                    out.put_u64(id.seq);
                                }
                                Start::Latest(n) => {
                                    out.put_u8(3);
                                    out.put_u64(n as u64);
                                }
                            }
                        }
                        Direction::Backward(None) => out.put_u8(1),
                        Direction::Backward(Some(id)) => {
                            out.put_u8(2);
                            out.put_u64(id.epoch);
                            out.put_u64(id.seq);
                        }
                    }
                    for bound in [range.since_ms, range.until_ms] {
                        match bound {
                            None => out.put_u8(0),
                            Some(ms) => {
                                out.put_u8(1);
                                out.put_u64(ms);
                            }
                        }
                    }
                    out.put_u64(*limit as u64);
                }
                ChannelCall::Info => out.put_u8(3),
                ChannelCall::Delete => out.put_u8(4),
            }
        }
        Forwarded::Fetch {
            namespace,
            name,
            request,
        } => {
            out.put_u8(2);
            put_str(&mut out, namespace);
            put_str(&mut out, name);
            put_request(&mut out, request);
        }
        Forwarded::Connect {
            namespace,
            name,
            node,
            conn,
            request,
        } => {
            out.put_u8(3);
            put_str(&mut out, namespace);
            put_str(&mut out, name);
            put_node(&mut out, node);
            out.put_u64(*conn);
            put_request(&mut out, request);
        }
        Forwarded::SocketMessage {
            namespace,
            name,
            socket,
            message,
        } => {
            out.put_u8(4);
            put_str(&mut out, namespace);
            put_str(&mut out, name);
            out.put_u64(*socket);
            match message {
                Inbound::Text(text) => {
                    out.put_u8(0);
                    put_str(&mut out, text);
                }
                Inbound::Binary(bytes) => {
                    out.put_u8(1);
                    put_bytes(&mut out, bytes);
                }
            }
        }
        Forwarded::SocketClosed {
            namespace,
            name,
            socket,
        } => {
            out.put_u8(5);
            put_str(&mut out, namespace);
            put_str(&mut out, name);
            out.put_u64(*socket);
        }
    }
    out.freeze()
}

fn put_request(out: &mut BytesMut, request: &HttpRequest) {
    put_str(out, request.method().as_str());
    put_str(out, &request.uri().to_string());
    put_headers(out, request.headers());
    put_bytes(out, request.body());
}

fn read_request(r: &mut Reader<'_>) -> Result<HttpRequest, Undecodable> {
    let method = r.str()?;
    let uri = r.str()?;
    let headers = read_headers(r)?;
    let body = Bytes::copy_from_slice(r.bytes()?);
    let mut request = http::Request::builder()
        .method(method.as_str())
        .uri(uri.as_str())
        .body(body)
        .map_err(|e| Undecodable(format!("a forwarded request: {e}")))?;
    *request.headers_mut() = headers;
    Ok(request)
}

fn put_node(out: &mut BytesMut, node: &NodeId) {
    put_str(out, &node.name);
    out.put_u64(node.incarnation);
}

fn read_node(r: &mut Reader<'_>) -> Result<NodeId, Undecodable> {
    Ok(NodeId {
        name: r.str()?,
        incarnation: r.u64()?,
    })
}

pub(crate) fn decode_forwarded(bytes: &[u8]) -> Result<Forwarded, Undecodable> {
    let mut r = Reader::new(bytes);
    check_version(&mut r)?;
    let call = match r.u8()? {
        1 => {
            let name = r.str()?;
            let call = match r.u8()? {
                1 => {
                    let count = r.u32()?;
                    let mut messages = Vec::with_capacity(count.min(1024) as usize);
                    for _ in 0..count {
                        messages.push(NewMessage {
                            event: r.opt_str()?,
                            data: Bytes::copy_from_slice(r.bytes()?),
                            idempotency_key: r.opt_str()?,
                        });
                    }
                    ChannelCall::Publish(messages)
                }
                2 => {
                    let direction = match r.u8()? {
                        0 => Direction::Forward(match r.u8()? {
                            0 => Start::Live,
                            1 => Start::Oldest,
                            2 => Start::After(EventId {
                                epoch: r.u64()?,
                                seq: r.u64()?,
                            }),
                            3 => Start::Latest(usize::try_from(r.u64()?).unwrap_or(usize::MAX)),
                            other => return Err(Undecodable(format!("start kind {other}"))),
                        }),
                        1 => Direction::Backward(None),
                        2 => Direction::Backward(Some(EventId {
                            epoch: r.u64()?,
                            seq: r.u64()?,
                        })),
                        other => return Err(Undecodable(format!("direction kind {other}"))),
                    };
                    let mut bound = || -> Result<Option<u64>, Undecodable> {
                        Ok(match r.u8()? {
                            0 => None,
                            1 => Some(r.u64()?),
                            other => return Err(Undecodable(format!("time bound kind {other}"))),
                        })
                    };
                    let (since_ms, until_ms) = (bound()?, bound()?);
                    let range = Range {
                        direction,
                        since_ms,
                        until_ms,
                    };
                    let limit = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
                    ChannelCall::History { range, limit }
                }
                3 => ChannelCall::Info,
                4 => ChannelCall::Delete,
                other => return Err(Undecodable(format!("channel call kind {other}"))),
            };
            Forwarded::Channel { name, call }
        }
        2 => Forwarded::Fetch {
            namespace: r.str()?,
            name: r.str()?,
            request: Box::new(read_request(&mut r)?),
        },
        3 => Forwarded::Connect {
            namespace: r.str()?,
            name: r.str()?,
            node: read_node(&mut r)?,
            conn: r.u64()?,
            request: Box::new(read_request(&mut r)?),
        },
        4 => Forwarded::SocketMessage {
            namespace: r.str()?,
            name: r.str()?,
            socket: r.u64()?,
            message: match r.u8()? {
                0 => Inbound::Text(r.str()?),
                1 => Inbound::Binary(Bytes::copy_from_slice(r.bytes()?)),
                other => return Err(Undecodable(format!("socket message kind {other}"))),
            },
        },
        5 => Forwarded::SocketClosed {
            namespace: r.str()?,
            name: r.str()?,
            socket: r.u64()?,
        },
        other => return Err(Undecodable(format!("call kind {other}"))),
    };
    r.end()?;
    Ok(call)
}

pub(crate) fn encode_answer(answer: &Answer) -> Bytes {
    let mut out = BytesMut::new();
    start_bytes(&mut out);
    match answer {
        Answer::Failed(error) => {
            out.put_u8(0);
            encode_error(&mut out, error);
        }
        Answer::Channel(response) => {
            out.put_u8(1);
            encode_channel_response(&mut out, response);
        }
        Answer::Http(response) => {
            out.put_u8(2);
            out.put_u16(response.status().as_u16());
            put_headers(&mut out, response.headers());
            put_bytes(&mut out, response.body());
        }
        Answer::Socket { owner, socket } => {
            out.put_u8(3);
            put_node(&mut out, owner);
            out.put_u64(*socket);
        }
        Answer::Done => out.put_u8(4),
    }
    out.freeze()
}

pub(crate) fn decode_answer(bytes: &[u8]) -> Result<Answer, Undecodable> {
    let mut r = Reader::new(bytes);
    check_version(&mut r)?;
    let answer = match r.u8()? {
        0 => Answer::Failed(decode_error(&mut r)?),
        1 => Answer::Channel(decode_channel_response(&mut r)?),
        2 => {
            let status = r.u16()?;
            let headers = read_headers(&mut r)?;
            let body = Bytes::copy_from_slice(r.bytes()?);
            let mut response = http::Response::builder()
                .status(status)
                .body(body)
                .map_err(|e| Undecodable(format!("a forwarded response: {e}")))?;
            *response.headers_mut() = headers;
            Answer::Http(response)
        }
        3 => Answer::Socket {
            owner: read_node(&mut r)?,
            socket: r.u64()?,
        },
        4 => Answer::Done,
        other => return Err(Undecodable(format!("answer kind {other}"))),
    };
    r.end()?;
    Ok(answer)
}

fn put_headers(out: &mut BytesMut, headers: &http::HeaderMap) {
    out.put_u32(len32(headers.len()));
    for (name, value) in headers {
        put_str(out, name.as_str());
        put_bytes(out, value.as_bytes());
    }
}

fn read_headers(r: &mut Reader<'_>) -> Result<http::HeaderMap, Undecodable> {
    let count = r.u32()?;
    let mut headers = http::HeaderMap::with_capacity(count.min(256) as usize);
    for _ in 0..count {
        let name = http::HeaderName::from_bytes(r.bytes()?)
            .map_err(|_| Undecodable("a header name".into()))?;
        let value = http::HeaderValue::from_bytes(r.bytes()?)
            .map_err(|_| Undecodable("a header value".into()))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn encode_channel_response(out: &mut BytesMut, response: &ChannelResponse) {
    match response {
        ChannelResponse::Published(results) => {
            out.put_u8(1);
            out.put_u32(len32(results.len()));
            for result in results {
                put_str(out, &result.id);
                out.put_u8(u8::from(result.duplicate));
            }
        }
        ChannelResponse::History(page) => {
            out.put_u8(2);
            match &page.gap {
                Some(gap) => {
                    out.put_u8(1);
                    put_str(out, gap.r#type);
                    put_str(out, gap.reason);
                    put_str(out, &gap.message);
                    put_opt_str(out, gap.earliest_id.as_deref());
                    put_opt_str(out, gap.requested_id.as_deref());
                    put_opt_str(out, gap.channel.as_deref());
                }
                None => out.put_u8(0),
            }
            out.put_u32(len32(page.events.len()));
            for event in &page.events {
                out.put_u64(event.id.epoch);
                out.put_u64(event.id.seq);
                out.put_u64(event.timestamp_ms);
                put_str(out, &event.name);
                put_bytes(out, &event.data);
            }
        }
        ChannelResponse::Info(info) => {
            out.put_u8(3);
            put_opt_str(out, info.last_id.as_deref());
            put_opt_str(out, info.earliest_id.as_deref());
            out.put_u64(info.events);
            out.put_u64(info.bytes);
            out.put_u64(info.subscribers as u64);
        }
        ChannelResponse::Deleted => out.put_u8(4),
        // Never forwarded: subscribing, refreshing and presence happen on the node
        // itself.
        ChannelResponse::Subscribed { .. }
        | ChannelResponse::Presence(_)
        | ChannelResponse::Unsubscribed { .. }
        | ChannelResponse::Full { .. }
        | ChannelResponse::Refreshed { .. } => out.put_u8(0),
    }
}

fn decode_channel_response(r: &mut Reader<'_>) -> Result<ChannelResponse, Undecodable> {
    Ok(match r.u8()? {
        1 => {
            let count = r.u32()?;
            let mut results = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                results.push(Published {
                    id: r.str()?,
                    duplicate: r.u8()? != 0,
                });
            }
            ChannelResponse::Published(results)
        }
        2 => {
            let gap = match r.u8()? {
                0 => None,
                _ => Some(Control {
                    r#type: known(&r.str()?, &["gap", "reconnect"]),
                    reason: known(
                        &r.str()?,
                        &["epoch_changed", "unknown_id", "trimmed", "deleted"],
                    ),
                    message: r.str()?,
                    earliest_id: r.opt_str()?,
                    requested_id: r.opt_str()?,
                    channel: r.opt_str()?,
                }),
            };
            let count = r.u32()?;
            let mut events = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                let id = EventId {
                    epoch: r.u64()?,
                    seq: r.u64()?,
                };
                let timestamp_ms = r.u64()?;
                let name = r.str()?;
                let data = Bytes::copy_from_slice(r.bytes()?);
                events.push(Arc::new(Event::new(id, name, data, timestamp_ms)));
            }
            ChannelResponse::History(HistoryPage { gap, events })
        }
        3 => ChannelResponse::Info(ChannelInfo {
            last_id: r.opt_str()?,
            earliest_id: r.opt_str()?,
            events: r.u64()?,
            bytes: r.u64()?,
            subscribers: usize::try_from(r.u64()?).unwrap_or(usize::MAX),
        }),
        4 => ChannelResponse::Deleted,
        other => return Err(Undecodable(format!("channel response kind {other}"))),
    })
}

/// The one of `names` that `text` is; the wire carries a gap's type and reason as text,
/// and the API keeps them as constants.
fn known(text: &str, names: &[&'static str]) -> &'static str {
    names.iter().find(|n| **n == text).copied().unwrap_or("gap")
}

/// Errors keep their kind across nodes: a full disk on the owner is a 507 here too, a
/// handler's failure a 500, an owner that moved is retried elsewhere.
fn encode_error(out: &mut BytesMut, error: &Error) {
    use dormouse_storage::Error as Storage;
    match error {
        Error::Handler { id, message } => {
            out.put_u8(1);
            put_str(out, id);
            put_str(out, message);
        }
        Error::Panicked { id, message } => {
            out.put_u8(2);
            put_str(out, id);
            put_str(out, message);
        }
        Error::Unavailable(message) => {
            out.put_u8(3);
            put_str(out, message);
        }
        Error::Storage(inner) => match &**inner {
            Storage::NotOwner { id, owner, reason } => {
                out.put_u8(4);
                put_str(out, id.namespace());
                put_str(out, id.name());
                put_opt_str(out, owner.as_deref());
                put_str(out, reason);
            }
            other if other.is_disk_full() => {
                out.put_u8(5);
                put_str(out, &other.to_string());
            }
            other => {
                out.put_u8(6);
                put_str(out, &other.to_string());
            }
        },
    }
}

fn decode_error(r: &mut Reader<'_>) -> Result<Error, Undecodable> {
    use dormouse_storage::Error as Storage;
    Ok(match r.u8()? {
        1 => Error::Handler {
            id: r.str()?,
            message: r.str()?,
        },
        2 => Error::Panicked {
            id: r.str()?,
            message: r.str()?,
        },
        3 => Error::Unavailable(r.str()?),
        4 => {
            let namespace = r.str()?;
            let name = r.str()?;
            Storage::NotOwner {
                id: dormouse_storage::ObjectId::new(namespace, name),
                owner: r.opt_str()?,
                reason: r.str()?,
            }
            .into()
        }
        5 => Storage::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("on the owner: {}", r.str()?),
        ))
        .into(),
        6 => Storage::Engine(format!("on the owner: {}", r.str()?)).into(),
        other => return Err(Undecodable(format!("error kind {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_answers_cross_unchanged() {
        let publish = Forwarded::Channel {
            name: "news:1".into(),
            call: ChannelCall::Publish(vec![
                NewMessage {
                    event: Some("e".into()),
                    data: Bytes::from_static(b"\0bin\r\n"),
                    idempotency_key: Some("k".into()),
                },
                NewMessage {
                    event: None,
                    data: Bytes::new(),
                    idempotency_key: None,
                },
            ]),
        };
        for range in [
            Range::forward(Start::Latest(7)),
            Range::forward(Start::After(EventId { epoch: 3, seq: 9 })),
            Range {
                direction: Direction::Backward(Some(EventId { epoch: 2, seq: 5 })),
                since_ms: Some(10),
                until_ms: None,
            },
            Range {
                direction: Direction::Backward(None),
                since_ms: None,
                until_ms: Some(u64::MAX),
            },
        ] {
            let history = Forwarded::Channel {
                name: "h".into(),
                call: ChannelCall::History { range, limit: 42 },
            };
            let Forwarded::Channel {
                call: ChannelCall::History { range: back, limit },
                ..
            } = decode_forwarded(&encode_forwarded(&history)).unwrap()
            else {
                panic!("another call came out");
            };
            assert_eq!((back, limit), (range, 42));
        }
        let bytes = encode_forwarded(&publish);
        let Forwarded::Channel {
            name,
            call: ChannelCall::Publish(messages),
        } = decode_forwarded(&bytes).unwrap()
        else {
            panic!("another call came out");
        };
        assert_eq!(name, "news:1");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].data, Bytes::from_static(b"\0bin\r\n"));
        assert_eq!(messages[0].idempotency_key.as_deref(), Some("k"));
        assert_eq!(messages[1].event, None);

        let mut request = http::Request::builder()
            .method("PUT")
            .uri("/x?y=1")
            .body(Bytes::from_static(b"body"))
            .unwrap();
        request
            .headers_mut()
            .append("x-a", http::HeaderValue::from_static("1"));
        request
            .headers_mut()
            .append("x-a", http::HeaderValue::from_static("2"));
        let fetch = Forwarded::Fetch {
            namespace: "rooms".into(),
            name: "r".into(),
            request: Box::new(request),
        };
        let Forwarded::Fetch { request, .. } = decode_forwarded(&encode_forwarded(&fetch)).unwrap()
        else {
            panic!("another call came out");
        };
        assert_eq!(request.method(), "PUT");
        assert_eq!(request.uri(), "/x?y=1");
        assert_eq!(request.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(request.body(), &Bytes::from_static(b"body"));

        let page = ChannelResponse::History(HistoryPage {
            gap: Some(Control {
                r#type: "gap",
                reason: "trimmed",
                message: "m".into(),
                channel: Some("c".into()),
                earliest_id: Some("1-2".into()),
                requested_id: None,
            }),
            events: vec![Arc::new(Event::new(
                EventId { epoch: 1, seq: 2 },
                "message".into(),
                Bytes::from_static(b"hi"),
                7,
            ))],
        });
        let Answer::Channel(ChannelResponse::History(back)) =
            decode_answer(&encode_answer(&Answer::Channel(page))).unwrap()
        else {
            panic!("another answer came out");
        };
        assert_eq!(back.gap.unwrap().reason, "trimmed");
        assert_eq!(back.events[0].id, EventId { epoch: 1, seq: 2 });
        assert_eq!(back.events[0].data, Bytes::from_static(b"hi"));

        let moved = Error::from(dormouse_storage::Error::NotOwner {
            id: dormouse_storage::ObjectId::new("channel", "c"),
            owner: Some("n2".into()),
            reason: "r".into(),
        });
        let Answer::Failed(Error::Storage(inner)) =
            decode_answer(&encode_answer(&Answer::Failed(moved))).unwrap()
        else {
            panic!("another answer came out");
        };
        assert!(
            matches!(&*inner, dormouse_storage::Error::NotOwner { owner: Some(o), .. } if o == "n2")
        );
    }

    #[test]
    fn socket_calls_and_answers_cross_unchanged() {
        let node = NodeId {
            name: "n-1".into(),
            incarnation: u64::MAX,
        };
        let connect = Forwarded::Connect {
            namespace: "rooms".into(),
            name: "lobby".into(),
            node: node.clone(),
            conn: 77,
            request: Box::new(
                http::Request::builder()
                    .uri("/ws?name=ann")
                    .body(Bytes::new())
                    .unwrap(),
            ),
        };
        let Forwarded::Connect {
            node: back,
            conn,
            request,
            ..
        } = decode_forwarded(&encode_forwarded(&connect)).unwrap()
        else {
            panic!("another call came out");
        };
        assert_eq!((back, conn), (node.clone(), 77));
        assert_eq!(request.uri(), "/ws?name=ann");
        for message in [
            Inbound::Text("hé".into()),
            Inbound::Binary(Bytes::from_static(b"\0\xff")),
        ] {
            let call = Forwarded::SocketMessage {
                namespace: "rooms".into(),
                name: "lobby".into(),
                socket: 5,
                message: message.clone(),
            };
            let Forwarded::SocketMessage {
                socket, message: m, ..
            } = decode_forwarded(&encode_forwarded(&call)).unwrap()
            else {
                panic!("another call came out");
            };
            assert_eq!((socket, m), (5, message));
        }
        let closed = Forwarded::SocketClosed {
            namespace: "rooms".into(),
            name: "lobby".into(),
            socket: 9,
        };
        assert!(matches!(
            decode_forwarded(&encode_forwarded(&closed)).unwrap(),
            Forwarded::SocketClosed { socket: 9, .. }
        ));
        let Answer::Socket { owner, socket } = decode_answer(&encode_answer(&Answer::Socket {
            owner: node.clone(),
            socket: 3,
        }))
        .unwrap() else {
            panic!("another answer came out");
        };
        assert_eq!((owner, socket), (node, 3));
        assert!(matches!(
            decode_answer(&encode_answer(&Answer::Done)).unwrap(),
            Answer::Done
        ));
    }

    #[test]
    fn a_damaged_or_foreign_message_is_refused() {
        let bytes = encode_forwarded(&Forwarded::Channel {
            name: "c".into(),
            call: ChannelCall::Info,
        });
        for cut in 0..bytes.len() {
            assert!(decode_forwarded(&bytes[..cut]).is_err());
        }
        let mut other = bytes.to_vec();
        other[0] = VERSION + 1;
        assert!(decode_forwarded(&other).unwrap_err().0.contains("version"));
    }
}
