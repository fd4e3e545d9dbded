//! One event of a run and its encodings: the log record (raw bytes, no base64 on disk), the
//! JSON payload mirrored to the run's channel, and the WebSocket message (the payload plus the
//! run's own event id).

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dormouse_actors::channel::EventId;
use dormouse_runtime::Bytes;
use serde::Serialize;
use serde_json::Value;

const RECORD_VERSION: u8 = 1;

/// What happened in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A piece of the model's output, as text.
    Chunk(String),
    /// A file the agent produced.
    Artifact {
        /// Its name, as the producer gave it.
        name: String,
        /// Its bytes.
        data: Bytes,
    },
    /// The run ended with this state.
    Finish(Value),
}

impl Body {
    /// The event type: the SSE `event:` field and the JSON `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Chunk(_) => "chunk",
            Self::Artifact { .. } => "artifact",
            Self::Finish(_) => "finish",
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Self::Chunk(_) => 1,
            Self::Artifact { .. } => 2,
            Self::Finish(_) => 3,
        }
    }
}

/// An event with its place in the run.
#[derive(Debug)]
pub struct RunEvent {
    /// Its position: the run log's epoch and the event's sequence number.
    pub id: EventId,
    /// What happened.
    pub body: Body,
    /// The WebSocket message, built on first use and shared by every viewer.
    ws: OnceLock<Bytes>,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    seq: u64,
    #[serde(flatten)]
    body: WireBody<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBody<'a> {
    Chunk {
        text: &'a str,
    },
    Artifact {
        name: &'a str,
        size: usize,
        data_base64: String,
    },
    Finish {
        state: &'a Value,
    },
}

impl RunEvent {
    /// A new event.
    pub fn new(id: EventId, body: Body) -> Self {
        Self {
            id,
            body,
            ws: OnceLock::new(),
        }
    }

    /// The log record: version, type, name length, name, then the raw data (chunk text,
    /// artifact bytes, or the final state's JSON).
    pub fn record(&self) -> Bytes {
        let state;
        let (name, data): (&str, &[u8]) = match &self.body {
            Body::Chunk(text) => ("", text.as_bytes()),
            Body::Artifact { name, data } => (name, data),
            Body::Finish(value) => {
                state = value.to_string();
                ("", state.as_bytes())
            }
        };
        let mut out = Vec::with_capacity(3 + name.len() + data.len());
        out.push(RECORD_VERSION);
        out.push(self.body.tag());
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        Bytes::from(out)
    }

    /// Rebuilds an event from its log entry.
    pub fn from_record(epoch: u64, seq: u64, record: &Bytes) -> anyhow::Result<Self> {
        let bad = |why: &str| anyhow::anyhow!("corrupt run record at seq {seq}: {why}");
        if record.len() < 3 || record[0] != RECORD_VERSION {
            return Err(bad("unknown record version"));
        }
        let name_len = record[2] as usize;
        let name = record
            .get(3..3 + name_len)
            .ok_or_else(|| bad("truncated name"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| bad("name is not UTF-8"))?
            .to_string();
        let data = record.slice(3 + name_len..);
        let body = match record[1] {
            1 => Body::Chunk(
                String::from_utf8(data.to_vec()).map_err(|_| bad("chunk is not UTF-8"))?,
            ),
            2 => Body::Artifact { name, data },
            3 => Body::Finish(serde_json::from_slice(&data).map_err(|_| bad("state is not JSON"))?),
            _ => return Err(bad("unknown event type")),
        };
        Ok(Self::new(EventId { epoch, seq }, body))
    }

    /// The JSON the run's channel carries (its `data`), and the base of the WebSocket
    /// message: `{"seq", "type", ...}`.
    pub fn payload(&self) -> Bytes {
        self.encode(None)
    }

    /// The WebSocket message: the payload with the run's event id, `{"id", "seq", "type",
    /// ...}`, encoded once.
    pub fn ws_message(&self) -> Bytes {
        self.ws
            .get_or_init(|| self.encode(Some(self.id.to_string())))
            .clone()
    }

    fn encode(&self, id: Option<String>) -> Bytes {
        let body = match &self.body {
            Body::Chunk(text) => WireBody::Chunk { text },
            Body::Artifact { name, data } => WireBody::Artifact {
                name,
                size: data.len(),
                data_base64: BASE64.encode(data),
            },
            Body::Finish(state) => WireBody::Finish { state },
        };
        let wire = Wire {
            id,
            seq: self.id.seq,
            body,
        };
        // Serialising strings and a `Value` cannot fail.
        Bytes::from(serde_json::to_vec(&wire).unwrap_or_default())
    }
}

/// The `seq` of a payload made by [`RunEvent::payload`], if it is one.
pub fn payload_seq(payload: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(payload).ok().map(|s| s.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> EventId {
        EventId { epoch: 0xab, seq }
    }

    #[test]
    fn records_round_trip() {
        for body in [
            Body::Chunk("héllo\r\n".to_string()),
            Body::Chunk(String::new()),
            Body::Artifact {
                name: "a.bin".to_string(),
                data: Bytes::from_static(&[0, 255, 10, 13]),
            },
            Body::Finish(serde_json::json!({"answer": 42, "ok": true})),
        ] {
            let event = RunEvent::new(id(7), body.clone());
            let back = RunEvent::from_record(0xab, 7, &event.record()).unwrap();
            assert_eq!((back.id, back.body), (id(7), body));
        }
        assert!(RunEvent::from_record(1, 1, &Bytes::from_static(b"\x01\x09\x00")).is_err());
    }

    #[test]
    fn wire_formats() {
        let chunk = RunEvent::new(id(3), Body::Chunk("to\"ken".to_string()));
        assert_eq!(
            chunk.payload(),
            r#"{"seq":3,"type":"chunk","text":"to\"ken"}"#
        );
        assert_eq!(
            chunk.ws_message(),
            r#"{"id":"ab-3","seq":3,"type":"chunk","text":"to\"ken"}"#
        );
        assert_eq!(payload_seq(&chunk.payload()), Some(3));
        let artifact = RunEvent::new(
            id(4),
            Body::Artifact {
                name: "x".to_string(),
                data: Bytes::from_static(&[1, 2, 255]),
            },
        );
        assert_eq!(
            artifact.payload(),
            r#"{"seq":4,"type":"artifact","name":"x","size":3,"data_base64":"AQL/"}"#
        );
        let finish = RunEvent::new(id(5), Body::Finish(serde_json::json!({"a": [1]})));
        assert_eq!(
            finish.payload(),
            r#"{"seq":5,"type":"finish","state":{"a":[1]}}"#
        );
        assert_eq!(payload_seq(b"not ours"), None);
    }
}
