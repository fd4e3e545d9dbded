//! Presence: who follows a channel, by subject, with join and leave events.
//!
//! A channel with presence on ([`super::ChannelSettings::presence`]) counts its subscribers
//! by subject: a subject's first connection joins, its last one leaves, so one person with
//! three tabs open is one member. Who a connection is travels in its socket's attachment
//! ([`Member::attachment`], set by the server that authenticated it), and attachments stay
//! with parked sockets while the channel hibernates, so the member list is rebuilt on wake
//! from the sockets themselves: nothing is written to storage, and nothing outlives the
//! connections it describes (after a crash there are none).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use dormouse_runtime::{Outbound, Transport};
use serde::Serialize;

/// Format of [`Member::attachment`]; a socket whose attachment does not start with it is
/// not a member (it was not set up for presence).
const ATTACHMENT_VERSION: u8 = 1;

/// Longest client info, as JSON, a member carries: it is kept for the connection's life
/// and sent with every join, leave and presence page.
pub const MAX_INFO: usize = 1024;

/// Who a connection is, as presence shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The subject its credential (or its hook) named; members are counted by it.
    pub subject: Arc<str>,
    /// Client info as JSON text (a token's `info` claim, or a hook's answer), if any.
    pub info: Option<Bytes>,
}

impl Member {
    /// The socket attachment that makes a connection this member on every channel with
    /// presence it follows: version, the subject's length (2 bytes) and bytes, then the
    /// info's JSON.
    pub fn attachment(&self) -> Bytes {
        let info = self.info.as_deref().unwrap_or_default();
        let mut out = BytesMut::with_capacity(3 + self.subject.len() + info.len());
        out.put_u8(ATTACHMENT_VERSION);
        out.put_u16(self.subject.len().min(u16::MAX as usize) as u16);
        out.put_slice(&self.subject.as_bytes()[..self.subject.len().min(u16::MAX as usize)]);
        out.put_slice(info);
        out.freeze()
    }

    /// Reads [`Member::attachment`]; `None` for any other attachment.
    pub fn from_attachment(attachment: &Bytes) -> Option<Member> {
        let (&version, rest) = attachment.split_first()?;
        if version != ATTACHMENT_VERSION || rest.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let subject = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        let info = attachment.slice(3 + len..);
        Some(Member {
            subject: Arc::from(subject),
            info: (!info.is_empty()).then_some(info),
        })
    }
}

/// One subject's entry.
#[derive(Debug)]
struct Entry {
    info: Option<Bytes>,
    /// Its connections (socket ids) on this channel.
    sockets: Vec<u64>,
}

/// The members of one channel, as its activation holds them.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    members: BTreeMap<Arc<str>, Entry>,
    by_socket: HashMap<u64, Arc<str>>,
}

impl Presence {
    /// Adds a connection of `member`; true when it is the subject's first (a join). The
    /// info is the latest connection's.
    pub(crate) fn add(&mut self, socket: u64, member: &Member) -> bool {
        if self.by_socket.contains_key(&socket) {
            return false;
        }
        self.by_socket.insert(socket, member.subject.clone());
        match self.members.get_mut(&member.subject) {
            Some(entry) => {
                entry.sockets.push(socket);
                entry.info.clone_from(&member.info);
                false
            }
            None => {
                self.members.insert(
                    member.subject.clone(),
                    Entry {
                        info: member.info.clone(),
                        sockets: vec![socket],
                    },
                );
                true
            }
        }
    }

    /// Removes a connection; the member that left when it was the subject's last.
    pub(crate) fn remove(&mut self, socket: u64) -> Option<Member> {
        let subject = self.by_socket.remove(&socket)?;
        let entry = self.members.get_mut(&subject)?;
        entry.sockets.retain(|s| *s != socket);
        if !entry.sockets.is_empty() {
            return None;
        }
        let entry = self.members.remove(&subject)?;
        Some(Member {
            subject,
            info: entry.info,
        })
    }

    /// Members after `after` (by subject, in byte order), at most `limit`, with counts.
    pub(crate) fn page(&self, after: Option<&str>, limit: usize) -> PresencePage {
        use std::ops::Bound;
        let from = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let members: Vec<PresenceMember> = self
            .members
            .range::<str, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|(subject, entry)| PresenceMember {
                subject: subject.to_string(),
                info: entry.info.clone(),
                connections: entry.sockets.len(),
            })
            .collect();
        let next_after = (members.len() == limit)
            .then(|| members.last().map(|m| m.subject.clone()))
            .flatten()
            .filter(|last| {
                self.members
                    .range::<str, _>((Bound::Excluded(last.as_str()), Bound::Unbounded))
                    .next()
                    .is_some()
            });
        PresencePage {
            members,
            subjects: self.members.len(),
            connections: self.by_socket.len(),
            next_after,
        }
    }
}

/// A page of a channel's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresencePage {
    /// Members in subject order.
    pub members: Vec<PresenceMember>,
    /// Members in all (subjects).
    pub subjects: usize,
    /// Their connections in all.
    pub connections: usize,
    /// The subject to page on from, when more members follow.
    pub next_after: Option<String>,
}

/// One member of a [`PresencePage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    /// Its subject.
    pub subject: String,
    /// Its client info, JSON text.
    pub info: Option<Bytes>,
    /// Its connections to the channel (tabs, devices).
    pub connections: usize,
}

/// A `join` or `leave` for a subscriber on `transport`: no id, so it is never retained and
/// never moves a client's cursor. A WebSocket client reads
/// `{"type":"join","channel","subject","info"?}`; an SSE client an event
/// `dormouse.join` whose data is the same JSON.
pub(crate) fn frame(kind: &str, channel: &str, member: &Member) -> PresenceFrames {
    #[derive(Serialize)]
    struct Json<'a> {
        r#type: &'a str,
        channel: &'a str,
        subject: &'a str,
    }
    let head = serde_json::to_vec(&Json {
        r#type: kind,
        channel,
        subject: &member.subject,
    })
    .unwrap_or_default();
    let mut json =
        BytesMut::with_capacity(head.len() + 16 + member.info.as_ref().map_or(0, Bytes::len));
    match &member.info {
        // The info is JSON the server checked when the connection came in: spliced in as is.
        Some(info) => {
            json.put_slice(&head[..head.len() - 1]);
            json.put_slice(b",\"info\":");
            json.put_slice(info);
            json.put_u8(b'}');
        }
        None => json.put_slice(&head),
    }
    let json = json.freeze();
    let mut sse = BytesMut::with_capacity(json.len() + kind.len() + 24);
    sse.put_slice(b"event: dormouse.");
    sse.put_slice(kind.as_bytes());
    sse.put_slice(b"\ndata: ");
    sse.put_slice(&json);
    sse.put_slice(b"\n\n");
    PresenceFrames {
        json,
        sse: sse.freeze(),
    }
}

/// One presence event encoded once for every subscriber.
#[derive(Debug, Clone)]
pub(crate) struct PresenceFrames {
    json: Bytes,
    sse: Bytes,
}

impl PresenceFrames {
    /// The frame for a subscriber on `transport`. Control messages stay JSON text on a
    /// binary-mode WebSocket.
    pub(crate) fn for_transport(&self, transport: Transport) -> Outbound {
        match transport {
            Transport::Sse | Transport::SseMulti => Outbound::Text(self.sse.clone()),
            Transport::WebSocket | Transport::WebSocketBinary => Outbound::Text(self.json.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(subject: &str, info: Option<&str>) -> Member {
        Member {
            subject: Arc::from(subject),
            info: info.map(|i| Bytes::copy_from_slice(i.as_bytes())),
        }
    }

    #[test]
    fn an_attachment_reads_back_and_others_are_not_members() {
        for m in [
            member("alice", Some(r#"{"name":"Alice"}"#)),
            member("b", None),
            member("", None),
        ] {
            assert_eq!(Member::from_attachment(&m.attachment()), Some(m));
        }
        for other in [
            &b""[..],
            b"\x01",
            b"\x02\x00\x01a",
            b"\x01\x00\x05ab",
            b"{\"x\":1}",
        ] {
            assert_eq!(
                Member::from_attachment(&Bytes::copy_from_slice(other)),
                None
            );
        }
    }

    #[test]
    fn three_tabs_are_one_member_who_leaves_with_the_last() {
        let mut p = Presence::default();
        let alice = member("alice", None);
        assert!(p.add(1, &alice));
        assert!(!p.add(2, &alice));
        assert!(!p.add(3, &alice));
        assert!(!p.add(3, &alice), "the same socket twice counts once");
        assert!(p.add(4, &member("bob", None)));
        let page = p.page(None, 10);
        assert_eq!((page.subjects, page.connections), (2, 4));
        assert_eq!(page.members[0].connections, 3);
        assert_eq!(p.remove(1), None);
        assert_eq!(p.remove(3), None);
        assert_eq!(p.remove(9), None);
        assert_eq!(p.remove(2), Some(alice));
        assert_eq!(p.page(None, 10).subjects, 1);
    }

    #[test]
    fn pages_follow_subject_order() {
        let mut p = Presence::default();
        for (i, s) in ["c", "a", "d", "b"].iter().enumerate() {
            p.add(i as u64, &member(s, None));
        }
        let first = p.page(None, 2);
        let names: Vec<_> = first.members.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(first.next_after.as_deref(), Some("b"));
        let second = p.page(first.next_after.as_deref(), 2);
        let names: Vec<_> = second.members.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(names, ["c", "d"]);
        assert_eq!(second.next_after, None, "nothing follows the last page");
    }

    #[test]
    fn frames_splice_the_info_into_valid_json() {
        let frames = frame("join", "room", &member("al\"ice", Some(r#"{"n":[1,2]}"#)));
        let Outbound::Text(json) = frames.for_transport(Transport::WebSocket) else {
            panic!()
        };
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type":"join","channel":"room","subject":"al\"ice","info":{"n":[1,2]}})
        );
        let Outbound::Text(sse) =
            frame("leave", "room", &member("bob", None)).for_transport(Transport::Sse)
        else {
            panic!()
        };
        assert_eq!(
            &sse[..],
            b"event: dormouse.leave\ndata: {\"type\":\"leave\",\"channel\":\"room\",\"subject\":\"bob\"}\n\n"
        );
    }
}
