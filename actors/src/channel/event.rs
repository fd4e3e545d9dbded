//! One published event and its encodings: the storage record, an SSE frame and a WebSocket
//! message. A release to many subscribers encodes each event once per transport
//! ([`Frames`]) and shares it, as `Bytes`, by every subscriber's queue; the event itself
//! keeps no encoding from that, so one that waits in a channel's in-memory tail costs its
//! payload and a small fixed size, which is what the tails' budget counts. Only replays
//! (a subscriber catching up) keep theirs on the event, so a reconnect storm encodes and
//! holds each replayed event once, not once per subscriber.

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};
use dormouse_runtime::{Outbound, Transport};
use serde::Serialize;

use super::id::EventId;
use dormouse_client::binary;

/// The event type clients see when the publisher named none (EventSource's default).
pub const DEFAULT_EVENT: &str = "message";

const RECORD_VERSION: u8 = 1;
const FLAG_TEXT: u8 = 1;

/// A published event.
#[derive(Debug)]
pub struct Event {
    /// Its position.
    pub id: EventId,
    /// Its event type, validated at publish time.
    pub name: String,
    /// The payload, exactly as published.
    pub data: Bytes,
    /// Milliseconds since the Unix epoch when it was accepted.
    pub timestamp_ms: u64,
    /// True when the payload can travel as text on every transport: valid UTF-8 without
    /// carriage returns (which SSE cannot carry). Otherwise it travels base64-encoded.
    pub text: bool,
    /// Encodings made for replays, by transport; allocated on the first replay.
    replayed: OnceLock<Box<[OnceLock<Outbound>; 4]>>,
}

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("corrupt event record at seq {seq}: {why}")]
pub struct BadRecord {
    seq: u64,
    why: &'static str,
}

impl Event {
    /// A new event; decides once how its payload travels.
    pub fn new(id: EventId, name: String, data: Bytes, timestamp_ms: u64) -> Self {
        let text = is_text(&data);
        Self {
            id,
            name,
            data,
            timestamp_ms,
            text,
            replayed: OnceLock::new(),
        }
    }

    /// The log record: version, flags, event name, payload. The id and timestamp are the
    /// log entry's own seq and timestamp, so they are not repeated.
    pub fn record(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(3 + self.name.len() + self.data.len());
        out.put_u8(RECORD_VERSION);
        out.put_u8(if self.text { FLAG_TEXT } else { 0 });
        out.put_u8(self.name.len() as u8);
        out.put_slice(self.name.as_bytes());
        out.put_slice(&self.data);
        out.freeze()
    }

    /// Rebuilds an event from its log entry.
    pub fn from_record(
        epoch: u64,
        seq: u64,
        timestamp_ms: u64,
        record: &Bytes,
    ) -> Result<Self, BadRecord> {
        let bad = |why| BadRecord { seq, why };
        if record.len() < 3 {
            return Err(bad("too short"));
        }
        if record[0] != RECORD_VERSION {
            return Err(bad("unknown record version"));
        }
        let text = record[1] & FLAG_TEXT != 0;
        let name_len = record[2] as usize;
        let name = record
            .get(3..3 + name_len)
            .ok_or_else(|| bad("truncated event name"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| bad("event name is not UTF-8"))?
            .to_string();
        let data = record.slice(3 + name_len..);
        Ok(Self {
            id: EventId { epoch, seq },
            name,
            data,
            timestamp_ms,
            text,
            replayed: OnceLock::new(),
        })
    }

    /// The frame for a subscriber on `transport`, encoded anew (a release to many
    /// subscribers shares one per transport through [`Frames`]). A WebSocket frame names
    /// `channel` (the event's, always the same for one event), so a client following
    /// several channels on one connection tells them apart.
    pub fn frame(&self, transport: Transport, channel: &str) -> Outbound {
        match transport {
            Transport::Sse => Outbound::Text(self.encode_sse()),
            Transport::SseMulti => Outbound::Text(sse_multi_frame(
                channel,
                &self.id.to_string(),
                &self.name,
                &self.encode_ws(channel),
            )),
            Transport::WebSocket => Outbound::Text(self.encode_ws(channel)),
            Transport::WebSocketBinary => Outbound::Binary(binary_frame(
                binary::EVENT,
                &self.id.to_string(),
                channel,
                &self.name,
                &self.data,
            )),
        }
    }

    /// [`Event::frame`] for a replay: encoded once per transport and kept with the event,
    /// so every subscriber catching up on it shares one copy.
    pub fn replay_frame(&self, transport: Transport, channel: &str) -> Outbound {
        let slots = self
            .replayed
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        slots[slot(transport)]
            .get_or_init(|| self.frame(transport, channel))
            .clone()
    }

    fn encode_sse(&self) -> Bytes {
        sse_frame(
            Some(&self.id.to_string()),
            &self.name,
            &self.data,
            self.text,
        )
    }

    fn encode_ws(&self, channel: &str) -> Bytes {
        ws_frame(
            "message",
            Some(channel),
            Some(self.id.to_string()),
            &self.name,
            &self.data,
            self.text,
        )
    }

    /// The payload as JSON-friendly fields, for the history API.
    pub fn json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "id": self.id.to_string(),
            "event": self.name,
            "timestamp_ms": self.timestamp_ms,
        });
        if self.text {
            value["data"] = String::from_utf8_lossy(&self.data).into();
        } else {
            value["data_base64"] = BASE64.encode(&self.data).into();
        }
        value
    }

    /// Bytes this event keeps in memory while it waits in a tail, for the tails' bound:
    /// its slot in the tail, the event behind its `Arc`, its name and its payload. The
    /// encodings a replay leaves on it are not counted: only replayed events have them,
    /// one per transport however many subscribers caught up.
    pub fn weight(&self) -> usize {
        const SLOT_AND_ARC_COUNTS: usize = 3 * std::mem::size_of::<usize>();
        std::mem::size_of::<Self>() + SLOT_AND_ARC_COUNTS + self.name.capacity() + self.data.len()
    }
}

/// The frames of a release's events, each encoded once per transport however many
/// subscribers receive it, and dropped with the release.
#[derive(Debug)]
pub struct Frames<'a> {
    events: &'a [Arc<Event>],
    channel: &'a str,
    /// By event, then by transport.
    encoded: Vec<[Option<Outbound>; 4]>,
}

impl<'a> Frames<'a> {
    /// Frames for `events` of `channel`, none encoded yet.
    pub fn new(events: &'a [Arc<Event>], channel: &'a str) -> Self {
        Self {
            events,
            channel,
            encoded: (0..events.len())
                .map(|_| std::array::from_fn(|_| None))
                .collect(),
        }
    }

    /// The frame of the `at`th event for `transport`, encoded on first use.
    pub fn get(&mut self, at: usize, transport: Transport) -> Outbound {
        let (events, channel) = (self.events, self.channel);
        self.encoded[at][slot(transport)]
            .get_or_insert_with(|| events[at].frame(transport, channel))
            .clone()
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Where a transport's encoding is kept among four.
fn slot(transport: Transport) -> usize {
    match transport {
        Transport::Sse => 0,
        Transport::SseMulti => 1,
        Transport::WebSocket => 2,
        Transport::WebSocketBinary => 3,
    }
}

/// An event of a stream of several channels: the tag line (`:{channel} {id}`, as
/// `dormouse_client::sse::CHANNEL_TAG` defines it), the event
/// name, and the WebSocket JSON message as the data, which names the channel and the event's
/// own id (JSON has no raw line breaks, so it is one `data:` line).
fn sse_multi_frame(channel: &str, id: &str, name: &str, json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + channel.len() + id.len() + name.len() + 24);
    out.put_u8(dormouse_client::sse::CHANNEL_TAG);
    out.put_slice(channel.as_bytes());
    out.put_u8(b' ');
    out.put_slice(id.as_bytes());
    out.put_slice(b"\nevent: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(json);
    out.put_slice(b"\n\n");
    out.freeze()
}

/// An SSE frame: `id` (when given), `event` and one `data:` line per payload line. Binary
/// payloads go base64 with the event type prefixed `base64:` (event names cannot contain
/// `:`, so this is never ambiguous).
fn sse_frame(id: Option<&str>, name: &str, data: &[u8], text: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + name.len() + 64);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    if text {
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
        // `text` guarantees no CR, so LF is the only line break to split on.
        for line in data.split(|&b| b == b'\n') {
            out.put_slice(b"data: ");
            out.put_slice(line);
            out.put_u8(b'\n');
        }
    } else {
        out.put_slice(b"base64:");
        out.put_slice(name.as_bytes());
        out.put_slice(b"\ndata: ");
        out.put_slice(BASE64.encode(data).as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// A JSON text message of `type`: `data` holds the text as is, or `data_base64` the bytes.
fn ws_frame(
    r#type: &str,
    channel: Option<&str>,
    id: Option<String>,
    name: &str,
    data: &[u8],
    text: bool,
) -> Bytes {
    #[derive(Serialize)]
    struct Message<'a> {
        r#type: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        event: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    }
    let message = Message {
        r#type,
        channel,
        id,
        event: name,
        data: if text {
            std::str::from_utf8(data).ok()
        } else {
            None
        },
        data_base64: (!text).then(|| BASE64.encode(data)),
    };
    Bytes::from(serde_json::to_vec(&message).unwrap_or_default())
}

/// A message a backend sends to one connection (or to every connection of a subject) rather
/// than to a channel: framed like an event, so a client reads both with one parser, but
/// with no id, so it is never retained, never replayed and never moves the client's cursor.
/// A WebSocket client reads `{"type":"direct","event","data"|"data_base64"}`; an SSE client
/// an event of type `event` (`base64:event` for bytes) without an `id:` line.
pub fn direct_frame(transport: Transport, name: &str, data: &[u8]) -> Outbound {
    let text = is_text(data);
    match transport {
        Transport::Sse | Transport::SseMulti => Outbound::Text(sse_frame(None, name, data, text)),
        Transport::WebSocket => Outbound::Text(ws_frame("direct", None, None, name, data, text)),
        Transport::WebSocketBinary => {
            Outbound::Binary(binary_frame(binary::DIRECT, "", "", name, data))
        }
    }
}

/// A binary-mode WebSocket frame, as `dormouse_client::binary` defines it: the kind, the
/// id's length and ASCII bytes, the event name's length and bytes, then the payload exactly
/// as published, so bytes travel without base64's third and a client reads them without a
/// JSON parser. Ids and event names are far shorter than 256 bytes.
fn binary_frame(kind: u8, id: &str, channel: &str, name: &str, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + id.len() + channel.len() + name.len() + data.len());
    out.put_u8(kind);
    for field in [id, channel, name] {
        let len = field.len().min(255);
        out.put_u8(len as u8);
        out.put_slice(&field.as_bytes()[..len]);
    }
    out.put_slice(data);
    out.freeze()
}

fn is_text(data: &[u8]) -> bool {
    !data.contains(&b'\r') && std::str::from_utf8(data).is_ok()
}

/// A control message: not an event, carries no id, so it never moves a client's cursor.
#[derive(Debug, Clone, Serialize)]
pub struct Control {
    /// `gap` or `reconnect`.
    pub r#type: &'static str,
    /// Machine-readable cause.
    pub reason: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The channel it is about (a client may follow several on one connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The oldest id still available, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub earliest_id: Option<String>,
    /// The cursor the client asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_id: Option<String>,
}

impl Control {
    /// The frame for `transport`: an SSE event of type `dormouse.<type>`, or a WebSocket text
    /// message with `"type": "<type>"`.
    pub fn frame(&self, transport: Transport) -> Outbound {
        let json = serde_json::to_string(self).unwrap_or_default();
        match transport {
            Transport::Sse | Transport::SseMulti => Outbound::Text(Bytes::from(format!(
                "event: dormouse.{}\ndata: {json}\n\n",
                self.r#type
            ))),
            // Control messages stay JSON text in binary mode: a client tells them from
            // events by the frame's type.
            Transport::WebSocket | Transport::WebSocketBinary => Outbound::Text(Bytes::from(json)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &[u8], name: &str) -> Event {
        Event::new(
            EventId {
                epoch: 0xab,
                seq: 7,
            },
            name.to_string(),
            Bytes::copy_from_slice(data),
            1000,
        )
    }

    #[test]
    fn binary_frames_carry_the_payload_as_published_and_read_back() {
        let e = event(b"\0\xffbytes\r\n", "tick");
        let Outbound::Binary(frame) = e.frame(Transport::WebSocketBinary, "c1") else {
            panic!("not binary");
        };
        let back = binary::Frame::parse(&frame).unwrap();
        assert_eq!(back.id, Some("ab-7"));
        assert_eq!(back.event, "tick");
        assert_eq!(back.data, b"\0\xffbytes\r\n");
        let Outbound::Binary(direct) = direct_frame(Transport::WebSocketBinary, "note", b"hi")
        else {
            panic!("not binary");
        };
        let back = binary::Frame::parse(&direct).unwrap();
        assert_eq!((back.id, back.event, back.data), (None, "note", &b"hi"[..]));
    }

    fn text(frame: Outbound) -> String {
        match frame {
            Outbound::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn sse_splits_lines_and_keeps_empty_ones() {
        let e = event(b"one\n\nthree\n", "update");
        assert_eq!(
            text(e.frame(Transport::Sse, "c1")),
            "id: ab-7\nevent: update\ndata: one\ndata: \ndata: three\ndata: \n\n"
        );
    }

    #[test]
    fn binary_and_carriage_returns_travel_base64() {
        for data in [&[0xff, 0x00, 0x80][..], b"a\r\nb"] {
            let e = event(data, "message");
            assert!(!e.text);
            let sse = text(e.frame(Transport::Sse, "c1"));
            assert_eq!(
                sse,
                format!(
                    "id: ab-7\nevent: base64:message\ndata: {}\n\n",
                    BASE64.encode(data)
                )
            );
            let ws: serde_json::Value =
                serde_json::from_str(&text(e.frame(Transport::WebSocket, "c1"))).unwrap();
            assert_eq!(ws["data_base64"], BASE64.encode(data));
            assert!(ws.get("data").is_none());
        }
    }

    #[test]
    fn websocket_text_is_readable_json() {
        let e = event("héllo \"world\"\n".as_bytes(), "chat");
        let ws: serde_json::Value =
            serde_json::from_str(&text(e.frame(Transport::WebSocket, "c1"))).unwrap();
        assert_eq!(ws["type"], "message");
        assert_eq!(ws["id"], "ab-7");
        assert_eq!(ws["event"], "chat");
        assert_eq!(ws["data"], "héllo \"world\"\n");
    }

    #[test]
    fn records_round_trip() {
        for data in [&b"text"[..], &[0xfe, 0xff][..], b""] {
            let e = event(data, "n");
            let back = Event::from_record(0xab, 7, 1000, &e.record()).unwrap();
            assert_eq!(
                (back.id, back.name.as_str(), &back.data[..], back.text),
                (e.id, "n", data, e.text)
            );
        }
        assert!(Event::from_record(1, 1, 0, &Bytes::from_static(b"\x01\x01\x09ab")).is_err());
        assert!(Event::from_record(1, 1, 0, &Bytes::from_static(b"\x02\x01\x00")).is_err());
    }

    #[test]
    fn a_releases_frames_are_encoded_once_per_transport_and_shared() {
        let events = [Arc::new(event(b"x", "message")), Arc::new(event(b"y", "m"))];
        let mut frames = Frames::new(&events, "c1");
        let (Outbound::Text(a), Outbound::Text(b)) =
            (frames.get(1, Transport::Sse), frames.get(1, Transport::Sse))
        else {
            panic!()
        };
        assert_eq!(a.as_ptr(), b.as_ptr());
        let Outbound::Text(ws) = frames.get(1, Transport::WebSocket) else {
            panic!()
        };
        assert_ne!(a, ws);
        assert_eq!(
            frames.get(0, Transport::Sse),
            events[0].frame(Transport::Sse, "c1")
        );
        // A replay keeps its encoding with the event: the next subscriber shares it.
        let (Outbound::Binary(c), Outbound::Binary(d)) = (
            events[0].replay_frame(Transport::WebSocketBinary, "c1"),
            events[0].replay_frame(Transport::WebSocketBinary, "c1"),
        ) else {
            panic!()
        };
        assert_eq!(c.as_ptr(), d.as_ptr());
        assert_eq!(
            Outbound::Binary(c),
            events[0].frame(Transport::WebSocketBinary, "c1")
        );
    }

    #[test]
    fn an_event_weighs_what_it_keeps_in_memory() {
        // Its slot, the event behind its Arc, the name and the payload: no encodings.
        let e = event(&[7; 64], "message");
        assert!(
            std::mem::size_of::<Event>() <= 112,
            "{}",
            std::mem::size_of::<Event>()
        );
        assert_eq!(
            e.weight(),
            std::mem::size_of::<Event>() + 24 + e.name.capacity() + 64
        );
    }
}
