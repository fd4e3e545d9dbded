//! Helpers for the channel's integration tests: a namespace over in-memory storage, typed
//! calls, and a subscriber that decodes what a client would read off the wire.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use dormouse_actors::channel::{
    ChannelInfo, ChannelRequest, ChannelResponse, ChannelSettings, EventId, HistoryPage,
    NewMessage, Published, Range, Start,
};
use dormouse_actors::{Channel, ChannelEnv};
use dormouse_runtime::storage::{MemoryStorage, Storage};
use dormouse_runtime::{
    Namespace, NamespaceConfig, ObjectState, Outbound, Socket, SocketReceiver, Transport,
};

/// Queue bound for subscribers that read everything: large enough never to overflow.
pub const ROOMY: usize = 16 << 20;

/// A channel namespace over `storage` with the given idle timeout, tail bound and settings.
pub fn channels_on(
    storage: Arc<dyn Storage>,
    idle: Duration,
    memory_tail_bytes: usize,
    settings: ChannelSettings,
) -> Namespace<Channel> {
    let runtime = dormouse_runtime::Runtime::new(storage);
    runtime.namespace::<Channel>(
        "channel",
        NamespaceConfig::with_idle_timeout(idle),
        ChannelEnv {
            default: settings,
            memory_tail_bytes,
            ..Default::default()
        },
    )
}

/// A channel namespace over fresh in-memory storage, default settings, 1 MiB tail.
pub fn channels(idle: Duration) -> Namespace<Channel> {
    channels_on(
        Arc::new(MemoryStorage::new()),
        idle,
        1 << 20,
        ChannelSettings::default(),
    )
}

/// A text message with the default event type and no idempotency key.
pub fn text(data: &str) -> NewMessage {
    NewMessage {
        event: None,
        data: Bytes::copy_from_slice(data.as_bytes()),
        idempotency_key: None,
    }
}

/// A text message carrying an idempotency key.
pub fn keyed(data: &str, key: &str) -> NewMessage {
    NewMessage {
        idempotency_key: Some(key.to_string()),
        ..text(data)
    }
}

pub async fn publish(
    ns: &Namespace<Channel>,
    name: &str,
    messages: Vec<NewMessage>,
) -> Vec<Published> {
    match ns.call(name, ChannelRequest::Publish(messages)).await {
        Ok(ChannelResponse::Published(results)) => results,
        other => panic!("publish to {name}: {other:?}"),
    }
}

/// Publishes one text message per payload, one request each; returns their ids.
pub async fn publish_each(ns: &Namespace<Channel>, name: &str, payloads: &[String]) -> Vec<String> {
    let mut ids = Vec::new();
    for payload in payloads {
        let results = publish(ns, name, vec![text(payload)]).await;
        assert_eq!(results.len(), 1);
        assert!(!results[0].duplicate);
        ids.push(results[0].id.clone());
    }
    ids
}

pub async fn info(ns: &Namespace<Channel>, name: &str) -> ChannelInfo {
    match ns.call(name, ChannelRequest::Info).await {
        Ok(ChannelResponse::Info(info)) => info,
        other => panic!("info of {name}: {other:?}"),
    }
}

pub async fn history(
    ns: &Namespace<Channel>,
    name: &str,
    start: Start,
    limit: usize,
) -> HistoryPage {
    match ns
        .call(
            name,
            ChannelRequest::History {
                range: Range::forward(start),
                limit,
            },
        )
        .await
    {
        Ok(ChannelResponse::History(page)) => page,
        other => panic!("history of {name}: {other:?}"),
    }
}

pub async fn delete(ns: &Namespace<Channel>, name: &str) {
    match ns.call(name, ChannelRequest::Delete).await {
        Ok(ChannelResponse::Deleted) => {}
        other => panic!("delete of {name}: {other:?}"),
    }
}

/// Subscribes a new client with a queue bound of `max_bytes`.
pub async fn subscribe_bounded(
    ns: &Namespace<Channel>,
    name: &str,
    transport: Transport,
    start: Start,
    max_bytes: usize,
) -> Subscriber {
    let (socket, rx) = Socket::new(transport, max_bytes, Bytes::new());
    match ns
        .call(name, ChannelRequest::Subscribe { socket, start })
        .await
    {
        Ok(ChannelResponse::Subscribed { .. }) => {}
        other => panic!("subscribe to {name}: {other:?}"),
    }
    Subscriber { transport, rx }
}

pub async fn subscribe(
    ns: &Namespace<Channel>,
    name: &str,
    transport: Transport,
    start: Start,
) -> Subscriber {
    subscribe_bounded(ns, name, transport, start, ROOMY).await
}

pub fn id(s: &str) -> EventId {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not an id: {e}"))
}

/// Checks that `ids` read `{epoch:x}-{seq}`, one epoch, `seq` counting up from `first_seq`;
/// returns the epoch.
pub fn assert_consecutive(ids: &[String], first_seq: u64) -> u64 {
    let epoch = id(&ids[0]).epoch;
    assert_ne!(epoch, 0, "epoch 0 means 'no log'");
    let expected: Vec<String> = (first_seq..first_seq + ids.len() as u64)
        .map(|seq| format!("{epoch:x}-{seq}"))
        .collect();
    assert_eq!(ids, expected.as_slice());
    epoch
}

/// Waits (in paused time) until `name` hibernates; panics after `idle * 50`.
pub async fn until_hibernated(ns: &Namespace<Channel>, name: &str) {
    let idle = ns.config().idle_timeout;
    for _ in 0..50 {
        if ns.state(name) == ObjectState::Hibernated {
            return;
        }
        tokio::time::sleep(idle).await;
    }
    panic!("{name} never hibernated: {:?}", ns.stats());
}

/// One thing a client reads: an event, a control message, or the end of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Event {
        id: String,
        event: String,
        data: Vec<u8>,
    },
    Gap {
        reason: String,
        earliest_id: Option<String>,
        requested_id: Option<String>,
    },
    Close {
        code: u16,
    },
}

/// An event of the default type with a text payload.
pub fn message(id: &str, data: &str) -> Frame {
    Frame::Event {
        id: id.to_string(),
        event: "message".to_string(),
        data: data.as_bytes().to_vec(),
    }
}

pub fn gap(reason: &str, earliest_id: Option<&str>, requested_id: Option<&str>) -> Frame {
    Frame::Gap {
        reason: reason.to_string(),
        earliest_id: earliest_id.map(str::to_string),
        requested_id: requested_id.map(str::to_string),
    }
}

/// The test's end of a subscription.
#[derive(Debug)]
pub struct Subscriber {
    pub transport: Transport,
    pub rx: SocketReceiver,
}

impl Subscriber {
    /// Everything queued now. The channel sends in after-commit effects, which the runtime
    /// runs before it releases the reply, so once a call returned its frames are all here.
    pub fn drain(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(outbound) = self.rx.try_recv() {
            frames.push(decode(self.transport, outbound));
        }
        frames
    }

    /// Waits for the connection to end (every `Socket` clone dropped), failing on any frame.
    pub async fn assert_ended(&mut self) {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.recv()).await {
            Ok(None) => {}
            Ok(Some(outbound)) => panic!("unexpected frame {outbound:?}"),
            Err(_) => panic!("the connection is still open"),
        }
    }
}

/// Decodes one outbound message exactly as the documented wire format says a client must.
pub fn decode(transport: Transport, outbound: Outbound) -> Frame {
    let bytes = match outbound {
        Outbound::Text(bytes) => bytes,
        Outbound::Close { code, .. } => return Frame::Close { code },
        Outbound::Binary(bytes) => {
            assert_eq!(
                transport,
                Transport::WebSocketBinary,
                "binary frames only in binary mode"
            );
            let frame = dormouse_client::binary::Frame::parse(&bytes)
                .unwrap_or_else(|| panic!("a binary frame a client reads: {bytes:?}"));
            return Frame::Event {
                id: frame.id.expect("a channel event has an id").to_string(),
                event: frame.event.to_string(),
                data: frame.data.to_vec(),
            };
        }
    };
    let text = std::str::from_utf8(&bytes).expect("text frames are UTF-8");
    match transport {
        Transport::Sse => decode_sse(text),
        Transport::SseMulti => decode_sse_multi(text),
        // Control messages are JSON text in both WebSocket modes.
        Transport::WebSocket | Transport::WebSocketBinary => decode_ws(text),
    }
}

/// A stream of several channels: an event is its tag line (`:{channel} {id}`, which the
/// connection turns into the stream's cursor), then `event:` and the WebSocket JSON as
/// `data:`; a control is as on one channel.
fn decode_sse_multi(text: &str) -> Frame {
    let Some(tagged) = text.strip_prefix(':') else {
        return decode_sse(text);
    };
    let (tag, rest) = tagged.split_once('\n').expect("a tag line");
    let (channel, id) = tag.split_once(' ').expect("the tag names channel and id");
    let json = rest
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .expect("a data line");
    let frame = decode_ws(json);
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        value["channel"], channel,
        "the tag and the data agree: {text}"
    );
    match &frame {
        Frame::Event { id: event_id, .. } => assert_eq!(event_id, id, "{text}"),
        other => panic!("a tagged frame is an event: {other:?}"),
    }
    frame
}

fn decode_sse(text: &str) -> Frame {
    let body = text
        .strip_suffix("\n\n")
        .unwrap_or_else(|| panic!("an SSE frame ends with a blank line: {text:?}"));
    let (mut id, mut event, mut data) = (None, None, Vec::<&str>::new());
    for line in body.split('\n') {
        let (field, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("bad SSE line {line:?} in {text:?}"));
        match field {
            "id" => assert!(id.replace(value).is_none(), "two ids: {text:?}"),
            "event" => assert!(event.replace(value).is_none(), "two events: {text:?}"),
            "data" => data.push(value),
            _ => panic!("unknown SSE field {field:?} in {text:?}"),
        }
    }
    let event = event.unwrap_or_else(|| panic!("no event type: {text:?}"));
    let data = data.join("\n");
    if let Some(kind) = event.strip_prefix("dormouse.") {
        assert!(
            id.is_none(),
            "a control frame must not move the cursor: {text:?}"
        );
        let control: serde_json::Value = serde_json::from_str(&data).expect("control is JSON");
        assert_eq!(control["type"], kind, "{text:?}");
        return control_frame(&control);
    }
    let id = id
        .unwrap_or_else(|| panic!("an event carries its id: {text:?}"))
        .to_string();
    match event.strip_prefix("base64:") {
        Some(name) => Frame::Event {
            id,
            event: name.to_string(),
            data: BASE64.decode(&data).expect("base64 payload"),
        },
        None => Frame::Event {
            id,
            event: event.to_string(),
            data: data.into_bytes(),
        },
    }
}

fn decode_ws(text: &str) -> Frame {
    let value: serde_json::Value = serde_json::from_str(text).expect("WebSocket text is JSON");
    if value["type"] != "message" {
        assert!(value.get("id").is_none(), "a control has no id: {text}");
        return control_frame(&value);
    }
    let field = |name: &str| value[name].as_str().map(str::to_string);
    let data = match (field("data"), field("data_base64")) {
        (Some(data), None) => data.into_bytes(),
        (None, Some(encoded)) => BASE64.decode(encoded).expect("base64 payload"),
        _ => panic!("exactly one of data and data_base64: {text}"),
    };
    Frame::Event {
        id: field("id").unwrap_or_else(|| panic!("no id: {text}")),
        event: field("event").unwrap_or_else(|| panic!("no event: {text}")),
        data,
    }
}

fn control_frame(value: &serde_json::Value) -> Frame {
    assert_eq!(value["type"], "gap", "the only control type sent: {value}");
    assert!(
        value["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a control explains itself: {value}"
    );
    let field = |name: &str| value.get(name).map(|v| v.as_str().unwrap().to_string());
    Frame::Gap {
        reason: field("reason").unwrap_or_else(|| panic!("no reason: {value}")),
        earliest_id: field("earliest_id"),
        requested_id: field("requested_id"),
    }
}

/// A history page as the frames a subscriber starting at the same place would read.
pub fn page_frames(page: &HistoryPage) -> Vec<Frame> {
    let gap = page.gap.as_ref().map(|control| {
        assert_eq!(control.r#type, "gap");
        Frame::Gap {
            reason: control.reason.to_string(),
            earliest_id: control.earliest_id.clone(),
            requested_id: control.requested_id.clone(),
        }
    });
    gap.into_iter()
        .chain(page.events.iter().map(|event| Frame::Event {
            id: event.id.to_string(),
            event: event.name.clone(),
            data: event.data.to_vec(),
        }))
        .collect()
}
