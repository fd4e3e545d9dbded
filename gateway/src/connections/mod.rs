//! The connection table: every WebSocket and SSE connection this node serves, by id, by
//! subject and by channel, so a backend can reach one client, or every connection of one
//! user, with a plain HTTP call (`/v1/connections/...`, `/v1/subjects/...`; docs/API.md).
//!
//! A connection's id names the node that serves it and that node's incarnation
//! (`{node}.{incarnation}.{seq}`): unique across restarts and across a cluster's nodes, and
//! enough for any node to send a call about it to the one node that can act on it. An id
//! whose node restarted or left names a connection that is gone: 404, never another
//! client's connection.
//!
//! The table holds, per connection, an [`Outlet`] into its outbound queue (not one of the
//! object's sockets: it never keeps a connection open) and what the API lists about it.
//! Entries come and go with the connection's [`Connection`](crate::telemetry::Connection)
//! guard, which owns its [`Registration`].
//!
//! In cluster mode the operations travel between nodes as JSON ([`Op`], [`Outcome`]) under
//! the node-to-node call kind [`CALL_KIND`]: an operation on one connection goes to its node,
//! one on a subject or a channel to every live node, and the answers are added up.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dormouse_actors::channel::direct_frame;
use dormouse_cluster::NodeId;
use dormouse_cluster::ownership::token;
use dormouse_runtime::{Outbound, Outlet, SendOutcome, Transport};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

mod api;
mod entries;

use entries::{Entries, Entry, Kind};

pub(crate) use api::{
    channel_connections, connection_close, connection_info, connection_send, subject_close,
    subject_list, subject_send,
};

/// The node-to-node call kind that carries an [`Op`].
pub(crate) const CALL_KIND: &str = "connections";

/// Most connections one listing returns; `?limit=` goes up to it.
pub(crate) const MAX_LIST: usize = 10_000;

/// What a connection is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A channel subscriber (SSE or WebSocket).
    Channel(Arc<str>),
    /// A WebSocket accepted by a user object, as `namespace/name`.
    Object(Arc<str>),
    /// A hook's own WebSocket (`/v1/hooks/{name}/ws`), by the hook's name.
    Hook(Arc<str>),
}

/// This node's connections; see the module doc.
pub struct ConnectionTable {
    me: NodeId,
    /// `{node}.{incarnation}.`: every id this node hands out starts with it.
    prefix: String,
    entries: Mutex<Entries>,
}

impl std::fmt::Debug for ConnectionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionTable")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A connection id taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedId {
    /// The node's name as it appears in ids ([`token`] of the name).
    pub(crate) node: String,
    pub(crate) incarnation: u64,
    pub(crate) seq: u64,
}

impl ParsedId {
    /// Whether `node` (name and incarnation) handed this id out.
    pub(crate) fn is_of(&self, node: &NodeId) -> bool {
        self.incarnation == node.incarnation && self.node == token(&node.name)
    }
}

/// Parses a connection id, or says what is wrong with it (400: a malformed id is the
/// caller's mistake; a well-formed one that names nothing is a 404 later).
pub(crate) fn parse_id(id: &str) -> Result<ParsedId, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "bad_connection_id",
            format!(
                "{id:?} is not a connection id; ids look like `node.0123456789abcdef.2a`, \
                 as a connection's first frame or event gives them"
            ),
        )
    };
    if id.len() > 256 {
        return Err(bad());
    }
    let mut parts = id.rsplitn(3, '.');
    let (Some(seq), Some(incarnation), Some(node)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let hex = |s: &str| {
        (!s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    let node_ok = !node.is_empty()
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'='));
    match (node_ok, hex(incarnation), hex(seq)) {
        (true, Some(incarnation), Some(seq)) => Ok(ParsedId {
            node: node.to_string(),
            incarnation,
            seq,
        }),
        _ => Err(bad()),
    }
}

/// What the API shows of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ConnectionInfo {
    pub(crate) connection_id: String,
    /// Who connected: the credential's subject (`sub`), or `anonymous`.
    pub(crate) subject: String,
    /// `websocket` or `sse`.
    pub(crate) transport: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) channel: Option<String>,
    /// The other channels it follows, on one connection (listed under each of them).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub(crate) also_follows: Vec<String>,
    /// `namespace/name` of the object a WebSocket is connected to.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) object: Option<String>,
    /// The hook whose own WebSocket it is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) hook: Option<String>,
    pub(crate) connected_at_ms: u64,
    /// The node serving it.
    pub(crate) node: String,
}

/// An operation on connections, as one node asks another (and as a node does it itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    Info {
        seq: u64,
    },
    Send {
        seq: u64,
        #[serde(flatten)]
        message: Direct,
    },
    Close {
        seq: u64,
        #[serde(flatten)]
        close: CloseRequest,
    },
    SendSubject {
        subject: String,
        #[serde(flatten)]
        message: Direct,
    },
    CloseSubject {
        subject: String,
        #[serde(flatten)]
        close: CloseRequest,
    },
    ListSubject {
        subject: String,
        limit: usize,
    },
    ListChannel {
        channel: String,
        limit: usize,
    },
}

/// A message a backend sends to connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Direct {
    /// The event type a channel's client sees it as.
    pub(crate) event: String,
    #[serde(with = "base64_bytes")]
    pub(crate) data: Bytes,
}

/// How a backend closes connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CloseRequest {
    /// The WebSocket close code: 1000, or 3000 to 4999.
    #[serde(default = "normal_close")]
    pub(crate) code: u16,
    /// Up to 123 bytes, as a WebSocket close frame carries.
    #[serde(default = "default_reason")]
    pub(crate) reason: String,
}

fn normal_close() -> u16 {
    1000
}

fn default_reason() -> String {
    "closed by the server".to_string()
}

impl Default for CloseRequest {
    fn default() -> Self {
        Self {
            code: normal_close(),
            reason: default_reason(),
        }
    }
}

impl CloseRequest {
    /// Refuses what a WebSocket close frame cannot carry, or what would tell the client
    /// something the server does not mean: 1001–2999 belong to the protocol, and 4000–4099
    /// to Dormouse (4000 heartbeat timeout, 4001 token expired), which clients act on.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        let allowed = self.code == 1000
            || (3000..=3999).contains(&self.code)
            || (4100..=4999).contains(&self.code);
        if !allowed {
            return Err(ApiError::bad_request(
                "bad_close_code",
                format!(
                    "close code {} is not one a backend may send; use 1000, 3000 to 3999 or \
                     4100 to 4999 (4000 to 4099 are Dormouse's own)",
                    self.code
                ),
            ));
        }
        if self.reason.len() > 123 {
            return Err(ApiError::bad_request(
                "bad_close_reason",
                format!(
                    "the close reason is {} bytes; a WebSocket close frame carries at most 123",
                    self.reason.len()
                ),
            ));
        }
        Ok(())
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(data))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        BASE64
            .decode(text.as_bytes())
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// What an [`Op`] did, on one node or added up over several.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// Connections the operation applied to (queued a message or a close).
    pub(crate) done: usize,
    /// Connections cut off because their queue was full (a slow client), for sends.
    pub(crate) slow: usize,
    /// Listed connections (at most the listing's limit).
    pub(crate) connections: Vec<ConnectionInfo>,
    /// Connections that matched a listing, also beyond its limit.
    pub(crate) total: usize,
}

impl Outcome {
    /// Adds another node's answer to this one, keeping a listing within `limit`.
    pub(crate) fn add(&mut self, other: Outcome, limit: usize) {
        self.done += other.done;
        self.slow += other.slow;
        self.total += other.total;
        let room = limit.saturating_sub(self.connections.len());
        self.connections
            .extend(other.connections.into_iter().take(room));
    }
}

/// Keeps a connection in the table while it lives; dropping it takes it out.
pub(crate) struct Registration {
    table: Arc<ConnectionTable>,
    /// Its key in the table, the number at the end of its id.
    key: u64,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .finish()
    }
}

impl Registration {
    /// The connection's id, as clients and backends see it.
    pub(crate) fn id(&self) -> String {
        self.table.id_of(self.key)
    }

    /// The connection's credential was replaced by one with another subject (a WebSocket
    /// client's `auth` message): sends to the new subject reach it, to the old one no more.
    /// A subject a hook chose stays: see [`Registration::pin_subject`].
    pub(crate) fn set_subject(&self, subject: &Arc<str>) {
        self.table
            .lock()
            .set_subject(self.key, subject.clone(), false);
    }

    /// The channels a channel connection follows besides the one it was opened for changed
    /// (`subscribe`, `unsubscribe`, a hook's picks, a stream of several): it is listed under
    /// each.
    pub(crate) fn set_also(&self, channels: &[String]) {
        self.table.lock().set_also(self.key, channels);
    }

    /// A `connect` hook chose the connection's subject: it keeps it for its life, whatever
    /// credential the client sends later.
    pub(crate) fn pin_subject(&self, subject: &Arc<str>) {
        self.table
            .lock()
            .set_subject(self.key, subject.clone(), true);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(self.key);
    }
}

impl ConnectionTable {
    /// A table for the node `me`.
    pub(crate) fn new(me: NodeId) -> Arc<Self> {
        let prefix = format!("{}.{:x}.", token(&me.name), me.incarnation);
        Arc::new(Self {
            me,
            prefix,
            entries: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node this table belongs to.
    pub(crate) fn me(&self) -> &NodeId {
        &self.me
    }

    /// The public id of this node's connection `seq`.
    pub(crate) fn id_of(&self, seq: u64) -> String {
        format!("{}{seq:x}", self.prefix)
    }

    /// Enters a connection; it stays until the registration is dropped.
    pub(crate) fn register(
        self: &Arc<Self>,
        subject: Arc<str>,
        target: Target,
        transport: Transport,
        outlet: Outlet,
    ) -> Registration {
        let (target, kind) = match (target, transport) {
            (Target::Channel(channel), transport) => (channel, Kind::Channel(transport)),
            (Target::Object(object), _) => (object, Kind::ObjectWs),
            (Target::Hook(hook), _) => (hook, Kind::HookWs),
        };
        let key = self.lock().insert(subject, target, kind, now_ms(), outlet);
        Registration {
            table: self.clone(),
            key,
        }
    }

    fn info(&self, key: u64, entry: &Entry) -> ConnectionInfo {
        let target = Some(entry.target.to_string());
        let (channel, object, hook, transport) = match entry.kind {
            Kind::Channel(Transport::Sse | Transport::SseMulti) => (target, None, None, "sse"),
            Kind::Channel(_) => (target, None, None, "websocket"),
            Kind::ObjectWs => (None, target, None, "websocket"),
            Kind::HookWs => (None, None, target, "websocket"),
        };
        ConnectionInfo {
            connection_id: self.id_of(key),
            subject: entry.subject.to_string(),
            transport: transport.to_string(),
            channel,
            also_follows: entry
                .also
                .as_ref()
                .map(|also| also.iter().map(|c| c.to_string()).collect())
                .unwrap_or_default(),
            object,
            hook,
            connected_at_ms: entry.opened_ms,
            node: self.me.name.clone(),
        }
    }

    /// Does `op` to this node's connections. Messages and closes are queued behind what the
    /// connections already have; nothing here waits for a client.
    pub(crate) fn apply(&self, op: &Op) -> Outcome {
        let entries = self.lock();
        let open = |entry: &Entry| !entry.outlet.is_closed();
        let live = |seq: &u64| entries.get(*seq).filter(|e| open(e)).map(|e| (*seq, e));
        let of_subject = |subject: &str| -> Vec<(u64, &Entry)> {
            let mut found = entries.of_subject(subject);
            found.retain(|(_, e)| open(e));
            found
        };
        let mut outcome = Outcome::default();
        match op {
            Op::Info { seq } => {
                if let Some((seq, entry)) = live(seq) {
                    outcome.total = 1;
                    outcome.connections.push(self.info(seq, entry));
                }
            }
            Op::Send { seq, message } => {
                send_all(live(seq), message, &mut outcome);
            }
            Op::SendSubject { subject, message } => {
                send_all(of_subject(subject), message, &mut outcome);
            }
            Op::Close { seq, close } => close_all(live(seq), close, &mut outcome),
            Op::CloseSubject { subject, close } => {
                close_all(of_subject(subject), close, &mut outcome);
            }
            Op::ListSubject { subject, limit } => {
                let found = of_subject(subject);
                self.list(found, *limit, &mut outcome);
            }
            Op::ListChannel { channel, limit } => {
                let mut found: Vec<_> = entries
                    .all()
                    .filter(|(_, e)| e.follows(channel) && open(e))
                    .collect();
                found.sort_by_key(|(key, e)| (e.opened_ms, *key));
                self.list(found, *limit, &mut outcome);
            }
        }
        outcome
    }

    fn list(&self, found: Vec<(u64, &Entry)>, limit: usize, outcome: &mut Outcome) {
        outcome.total = found.len();
        outcome.connections = found
            .into_iter()
            .take(limit)
            .map(|(seq, entry)| self.info(seq, entry))
            .collect();
    }
}

/// Queues `message` on each connection, framed once per kind of connection and shared.
fn send_all<'a>(
    to: impl IntoIterator<Item = (u64, &'a Entry)>,
    message: &Direct,
    outcome: &mut Outcome,
) {
    let mut frames: [Option<Outbound>; 4] = Default::default();
    for (_, entry) in to {
        let (slot, transport) = match entry.kind {
            Kind::ObjectWs | Kind::HookWs => (0, None),
            Kind::Channel(Transport::WebSocket) => (1, Some(Transport::WebSocket)),
            // A direct message carries no id: the same frame on either kind of stream.
            Kind::Channel(Transport::Sse | Transport::SseMulti) => (2, Some(Transport::Sse)),
            Kind::Channel(Transport::WebSocketBinary) => (3, Some(Transport::WebSocketBinary)),
        };
        let frame = frames[slot]
            .get_or_insert_with(|| match transport {
                Some(transport) => direct_frame(transport, &message.event, &message.data),
                // An object's client speaks the object's protocol: the bytes as they are.
                None => match std::str::from_utf8(&message.data) {
                    Ok(_) => Outbound::Text(message.data.clone()),
                    Err(_) => Outbound::Binary(message.data.clone()),
                },
            })
            .clone();
        match entry.outlet.send(frame) {
            SendOutcome::Queued => outcome.done += 1,
            SendOutcome::Overflowed => outcome.slow += 1,
            SendOutcome::Closed => {}
        }
    }
}

fn close_all<'a>(
    to: impl IntoIterator<Item = (u64, &'a Entry)>,
    close: &CloseRequest,
    outcome: &mut Outcome,
) {
    for (_, entry) in to {
        let queued = entry.outlet.send(Outbound::Close {
            code: close.code,
            reason: close.reason.clone(),
        });
        if queued == SendOutcome::Queued {
            outcome.done += 1;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dormouse_runtime::Socket;

    fn table() -> Arc<ConnectionTable> {
        ConnectionTable::new(NodeId {
            name: "node a".into(),
            incarnation: 0xabc,
        })
    }

    #[test]
    fn ids_name_their_node_and_parse_back() {
        let table = table();
        let id = table.id_of(42);
        assert_eq!(id, "node=20a.abc.2a");
        let parsed = parse_id(&id).unwrap();
        assert!(parsed.is_of(table.me()));
        assert_eq!(parsed.seq, 42);
        // Another incarnation of the same node did not hand it out.
        assert!(!parsed.is_of(&NodeId {
            name: "node a".into(),
            incarnation: 0xabd
        }));
        for bad in [
            "",
            "abc",
            "a.b",
            "node.xyz.1",
            "node.1.",
            ".1.1",
            "no de.1.1",
            "n.11111111111111111.1",
        ] {
            assert_eq!(
                parse_id(bad).unwrap_err().code,
                "bad_connection_id",
                "{bad}"
            );
        }
    }

    #[test]
    fn entries_leave_with_their_registration_and_follow_a_new_subject() {
        let table = table();
        let (_socket, receiver) = Socket::new(Transport::WebSocket, 1 << 20, Bytes::new());
        let registration = table.register(
            Arc::from("alice"),
            Target::Channel(Arc::from("room")),
            Transport::WebSocket,
            receiver.outlet(),
        );
        let list = |subject: &str| {
            table
                .apply(&Op::ListSubject {
                    subject: subject.into(),
                    limit: 10,
                })
                .total
        };
        let channel = || {
            table
                .apply(&Op::ListChannel {
                    channel: "room".into(),
                    limit: 10,
                })
                .total
        };
        assert_eq!((list("alice"), channel()), (1, 1));
        registration.set_subject(&Arc::from("bob"));
        assert_eq!((list("alice"), list("bob"), channel()), (0, 1, 1));
        drop(registration);
        assert_eq!((list("bob"), channel()), (0, 0));
    }
}
