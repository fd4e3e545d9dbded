//! WebSockets to user objects across nodes: the connection stays on the node the client
//! reached, the object keeps a socket on the node that owns it, and frames are relayed
//! between the two over NATS.
//!
//! - The connection's node subscribes to a subject of its own for the connection
//!   ([`frames_subject`]), then forwards the upgrade to the owner ([`super::wire::Forwarded::Connect`]).
//! - The owner gives the object a socket of its own (a proxy: attachment, listing and
//!   closing work as for a local socket, and it hibernates with the object) and relays
//!   everything the object queues on it to that subject, in order ([`Relays`]).
//! - The client's messages and its close go to the owner as node-to-node calls naming the
//!   proxy, one at a time, in the order the client sent them.
//! - A node that dies takes its connections with it: the owner notices through membership
//!   and reports each of its proxies closed to its object (`socket_close`), at least once
//!   (retried until the object was told). A close lost on the way from a live node (an
//!   upgrade cancelled after the owner accepted, a call that timed out) is found by the
//!   owner's probe of each connection's subject every [`PROBE_EVERY`].
//!   An owner that dies (or restarts) takes the proxies with it: the connection's node
//!   notices and closes the client with 1012 (service restart), and the client reconnects.
//!
//! Frames travel on core NATS, in order and at most once: a frame lost when a NATS server
//! dies under a connection is lost as it would be if the client's own network dropped it,
//! and what the object stored is not affected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use dormouse_cluster::{Nats, NodeId, ownership::token};
use dormouse_runtime::{DynNamespace, Outbound, Socket, SocketReceiver};
use futures::StreamExt as _;
use tracing::debug;

/// Header: what a relayed frame is (`text`, `binary`, `close`, `end`), or `probe` on the
/// owner's question whether the connection is still there.
const FRAME: &str = "Dm-Frame";
/// Header on a `close` frame: its WebSocket close code.
const CODE: &str = "Dm-Code";
/// How often each side checks that the other side's node is still alive.
pub(super) const LIVENESS_EVERY: Duration = Duration::from_secs(1);
/// How often the owner asks whether each relayed connection is still there.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(15);
/// Probes sent at once, so thousands of relayed sockets do not burst at the servers.
const PROBES_IN_FLIGHT: usize = 64;
/// How long a probe waits; only "no responders" counts as gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Room a relayed frame keeps for its headers.
const FRAME_ROOM: usize = 1024;
/// The close code a client gets when the node owning its object went away: "service
/// restart", which clients take as "reconnect".
pub(super) const OWNER_GONE: u16 = 1012;

/// The subject `node` receives the frames of its connection `conn` on. The incarnation is
/// part of it, so a restarted node never receives its former self's frames.
pub(super) fn frames_subject(node: &NodeId, conn: u64) -> String {
    format!(
        "dm.sock.{}.{:x}.{conn:x}",
        token(&node.name),
        node.incarnation
    )
}

/// One frame as it travels: headers saying what it is, and its payload.
fn encode(frame: Option<&Outbound>) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    let payload = match frame {
        Some(Outbound::Text(bytes)) => {
            headers.insert(FRAME, "text");
            bytes.clone()
        }
        Some(Outbound::Binary(bytes)) => {
            headers.insert(FRAME, "binary");
            bytes.clone()
        }
        Some(Outbound::Close { code, reason }) => {
            headers.insert(FRAME, "close");
            headers.insert(CODE, code.to_string().as_str());
            Bytes::from(reason.clone())
        }
        None => {
            headers.insert(FRAME, "end");
            Bytes::new()
        }
    };
    (headers, payload)
}

/// What a received message carries: a frame, or `None` for the end (the object dropped
/// the socket). A message that is neither is ignored.
fn decode(message: &async_nats::Message) -> Option<Option<Outbound>> {
    let headers = message.headers.as_ref()?;
    let frame = headers.get(FRAME)?.as_str();
    Some(match frame {
        "text" => Some(Outbound::Text(message.payload.clone())),
        "binary" => Some(Outbound::Binary(message.payload.clone())),
        "close" => Some(Outbound::Close {
            code: headers.get(CODE)?.as_str().parse().ok()?,
            reason: String::from_utf8_lossy(&message.payload).into_owned(),
        }),
        "end" => None,
        _ => return None,
    })
}

/// Where a client's connection is: a node, and the connection's id there.
pub(super) struct Connection {
    pub(super) node: NodeId,
    pub(super) conn: u64,
}

/// A proxy socket held here for a connection on another node.
struct Relayed {
    node: NodeId,
    target: Arc<dyn DynNamespace>,
    name: String,
    relay: tokio::task::JoinHandle<()>,
    subject: String,
    /// Its client is gone and the object is being told; retried until it is.
    closing: bool,
}

/// The owner's side: every proxy socket this node holds for connections elsewhere, by the
/// proxy's id.
#[derive(Default)]
pub(super) struct Relays {
    held: Arc<Mutex<HashMap<u64, Relayed>>>,
}

impl Relays {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Relayed>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Proxies held here.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the proxy `socket` is held here, its client still connected.
    pub(super) fn holds(&self, socket: u64) -> bool {
        self.lock().get(&socket).is_some_and(|r| !r.closing)
    }

    /// Starts relaying what the object queues on `proxy` (whose receiving half is
    /// `receiver`) to the client's connection `to`. A frame larger than the NATS servers
    /// take cannot be relayed, and skipping it would break the order: the connection is
    /// closed with 1009 (message too big) instead.
    pub(super) fn start(
        &self,
        nats: &Nats,
        proxy: u64,
        mut receiver: SocketReceiver,
        to: Connection,
        target: Arc<dyn DynNamespace>,
        name: String,
    ) {
        let Connection { node, conn } = to;
        let subject = frames_subject(&node, conn);
        let client = nats.client.clone();
        let max_payload = client.server_info().max_payload;
        let to = subject.clone();
        let held = self.held.clone();
        // Registered before the relay can end, so its end always finds its entry.
        let mut entries = self.lock();
        let relay = tokio::spawn(async move {
            loop {
                let mut frame = receiver.recv().await;
                let size = match &frame {
                    Some(Outbound::Text(b) | Outbound::Binary(b)) => b.len(),
                    _ => 0,
                };
                if size + FRAME_ROOM > max_payload {
                    frame = Some(Outbound::Close {
                        code: 1009,
                        reason: format!(
                            "a message of {size} bytes cannot travel between nodes (the NATS \
                             servers take at most {max_payload})"
                        ),
                    });
                }
                let (headers, payload) = encode(frame.as_ref());
                if let Err(e) = client
                    .publish_with_headers(to.clone(), headers, payload)
                    .await
                {
                    debug!(error = %e, "a relayed frame was not sent");
                }
                if frame.is_none() || size + FRAME_ROOM > max_payload {
                    break;
                }
            }
            // The object let the socket go (or it was cut off): nothing more to relay.
            held.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&proxy);
        });
        entries.insert(
            proxy,
            Relayed {
                node,
                target,
                name,
                relay,
                subject,
                closing: false,
            },
        );
    }

    /// The client of `socket` went away (its node said so, died, or stopped answering
    /// probes): stop relaying, close the client if it is in fact still there, and tell the
    /// object, as a local connection's close would. Kept (as closing, see
    /// [`Relays::orphans`]) and retried until the object has been told.
    pub(super) async fn closed(&self, nats: &Nats, socket: u64) -> dormouse_runtime::Result<()> {
        let (first, subject, target, name) = {
            let mut entries = self.lock();
            let Some(relayed) = entries.get_mut(&socket) else {
                return Ok(());
            };
            let first = !relayed.closing;
            relayed.closing = true;
            // The receiver goes with the task, so the proxy reads as closed from now on.
            relayed.relay.abort();
            (
                first,
                relayed.subject.clone(),
                relayed.target.clone(),
                relayed.name.clone(),
            )
        };
        if first {
            // A node wrongly believed gone still has its client: close it so it reconnects.
            for frame in [
                Some(Outbound::Close {
                    code: OWNER_GONE,
                    reason: "this connection lost its object; reconnect".into(),
                }),
                None,
            ] {
                let (headers, payload) = encode(frame.as_ref());
                let _ = nats
                    .client
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await;
            }
        }
        target.socket_closed(&name, socket).await?;
        self.lock().remove(&socket);
        Ok(())
    }

    /// Proxies to close: those whose connection's node no longer counts as alive, and those
    /// whose close did not reach their object yet.
    pub(super) fn orphans(&self, alive: impl Fn(&NodeId) -> bool) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|(_, relayed)| relayed.closing || !alive(&relayed.node))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Proxies whose connection nobody listens for any more: its node is alive but lost the
    /// connection's close on the way (a cancelled upgrade, a call that timed out). Asks
    /// each connection's subject, [`PROBES_IN_FLIGHT`] at a time; "no responders" means it
    /// is gone.
    pub(super) async fn unheard(&self, nats: &Nats) -> Vec<u64> {
        let asks: Vec<(u64, String)> = self
            .lock()
            .iter()
            .filter(|(_, relayed)| !relayed.closing)
            .map(|(id, relayed)| (*id, relayed.subject.clone()))
            .collect();
        let probes = asks.into_iter().map(|(id, subject)| async move {
            let mut headers = HeaderMap::new();
            headers.insert(FRAME, "probe");
            for _ in 0..2 {
                let asked = nats.client.request_with_headers(
                    subject.clone(),
                    headers.clone(),
                    Bytes::new(),
                );
                match tokio::time::timeout(PROBE_TIMEOUT, asked).await {
                    Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // Answered, or busy: there.
                    _ => return None,
                }
            }
            Some(id)
        });
        futures::stream::iter(probes)
            .buffer_unordered(PROBES_IN_FLIGHT)
            .filter_map(std::future::ready)
            .collect()
            .await
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for (_, relayed) in self.lock().drain() {
            relayed.relay.abort();
        }
    }
}

/// The connection's side: feeds the frames the owner relays into the local `socket` (the
/// connection task drains it), until the object lets the socket go, the client leaves, or
/// the owner stops counting as alive. Dropping the socket at the end lets the connection
/// finish what is queued and close.
pub(super) async fn feed(
    client: async_nats::Client,
    mut frames: async_nats::Subscriber,
    socket: Socket,
    owner_alive: impl Fn() -> bool,
) {
    let mut check = tokio::time::interval(LIVENESS_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = frames.next() => {
                let Some(message) = message else { break };
                if let Some(reply) = message.reply.clone() {
                    // The owner asks whether this connection is still here: it is.
                    let _ = client.publish(reply, Bytes::new()).await;
                    continue;
                }
                match decode(&message) {
                    Some(Some(frame)) => {
                        if socket.send(frame) != dormouse_runtime::SendOutcome::Queued {
                            break;
                        }
                    }
                    Some(None) => break,
                    None => debug!("an unreadable relayed frame; ignored"),
                }
            }
            _ = check.tick() => {
                if !owner_alive() {
                    socket.send(Outbound::Close {
                        code: OWNER_GONE,
                        reason: "the node running this object went away; reconnect".into(),
                    });
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_unchanged() {
        let frames = [
            Some(Outbound::Text(Bytes::from_static(b"{\"a\":1}"))),
            Some(Outbound::Binary(Bytes::from_static(b"\0\xff"))),
            Some(Outbound::Close {
                code: 4000,
                reason: "bye".into(),
            }),
            None,
        ];
        for frame in frames {
            let (headers, payload) = encode(frame.as_ref());
            let message = async_nats::Message {
                subject: "s".into(),
                reply: None,
                payload,
                headers: Some(headers),
                status: None,
                description: None,
                length: 0,
            };
            assert_eq!(decode(&message), Some(frame));
        }
    }

    #[test]
    fn a_restarted_node_has_other_subjects() {
        let before = NodeId {
            name: "n.1".into(),
            incarnation: 1,
        };
        let after = NodeId {
            incarnation: 2,
            ..before.clone()
        };
        assert_ne!(frames_subject(&before, 5), frames_subject(&after, 5));
        assert!(!frames_subject(&before, 5).contains("n.1"));
    }
}
