//! The bytes of an object's journal messages: commits (write batches, as the runtime made
//! them) and images (every record of the object, as a snapshot), and how one record larger
//! than a NATS message is split into parts.
//!
//! Commits are logical, not the engine's records, so replaying them needs no knowledge of an
//! engine's layout; images are the in-memory engine's records and carry the storage schema
//! version they were written with, so a build with another layout refuses them by name.
//!
//! The primitives (big-endian integers, length-prefixed byte strings) are [`crate::wire`]'s.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use dormouse_storage::key::CURRENT_SCHEMA;
use dormouse_storage::{Retention, Write, WriteBatch};

use crate::wire::{Reader, Undecodable, len32, put_bytes, put_opt};

const COMMIT_MAGIC: &[u8; 4] = b"DMC1";
const IMAGE_MAGIC: &[u8; 4] = b"DMI1";

/// One commit message: the batches it carries, applied in order. A writer merges every
/// batch that waited while its previous append was in flight into one message.
pub(super) fn encode_commit(batches: &[WriteBatch]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(COMMIT_MAGIC);
    out.put_u32(len32(batches.len()));
    for batch in batches {
        out.put_u32(len32(batch.len()));
        for write in batch.writes() {
            encode_write(&mut out, write);
        }
    }
    out.freeze()
}

/// The batches of a commit message.
pub(super) fn decode_commit(bytes: &[u8]) -> Result<Vec<WriteBatch>, Undecodable> {
    let mut r = Reader::new(bytes);
    r.magic(COMMIT_MAGIC)?;
    let batches = r.u32()?;
    let mut out = Vec::with_capacity(batches.min(1024) as usize);
    for _ in 0..batches {
        let writes = r.u32()?;
        let mut batch = WriteBatch::new();
        for _ in 0..writes {
            batch.push(decode_write(&mut r)?);
        }
        out.push(batch);
    }
    r.end()?;
    Ok(out)
}

/// An image message: every record of one object.
pub(super) fn encode_image(records: &[(Vec<u8>, Bytes)]) -> Bytes {
    let size: usize = records.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = BytesMut::with_capacity(12 + size);
    out.put_slice(IMAGE_MAGIC);
    out.put_u32(CURRENT_SCHEMA);
    out.put_u32(len32(records.len()));
    for (key, value) in records {
        put_bytes(&mut out, key);
        put_bytes(&mut out, value);
    }
    out.freeze()
}

/// The records of an image message; refused when written with another storage schema.
pub(super) fn decode_image(bytes: &Bytes) -> Result<Vec<(Vec<u8>, Bytes)>, Undecodable> {
    let mut r = Reader::new(bytes);
    r.magic(IMAGE_MAGIC)?;
    let schema = r.u32()?;
    if schema != CURRENT_SCHEMA {
        return Err(Undecodable(format!(
            "an image written with storage schema {schema}; this build reads {CURRENT_SCHEMA}"
        )));
    }
    let count = r.u32()?;
    let mut out = Vec::with_capacity(count.min(65_536) as usize);
    for _ in 0..count {
        let key = r.bytes()?.to_vec();
        let (start, len) = r.span()?;
        // The value shares the message's buffer: an image of large events is not copied.
        out.push((key, bytes.slice(start..start + len)));
    }
    r.end()?;
    Ok(out)
}

/// `payload` cut into parts of at most `limit` bytes (at least one part, even when empty).
pub(super) fn split(payload: &Bytes, limit: usize) -> Vec<Bytes> {
    let limit = limit.max(1);
    if payload.len() <= limit {
        return vec![payload.clone()];
    }
    (0..payload.len())
        .step_by(limit)
        .map(|start| payload.slice(start..(start + limit).min(payload.len())))
        .collect()
}

fn encode_write(out: &mut BytesMut, write: &Write) {
    match write {
        Write::Append {
            seq,
            timestamp_ms,
            data,
        } => {
            out.put_u8(1);
            out.put_u64(*seq);
            out.put_u64(*timestamp_ms);
            put_bytes(out, data);
        }
        Write::Trim { retention, now_ms } => {
            out.put_u8(2);
            put_opt(out, retention.max_events);
            put_opt(out, retention.max_bytes);
            match retention.max_age {
                Some(age) => {
                    out.put_u8(1);
                    out.put_u64(age.as_secs());
                    out.put_u32(age.subsec_nanos());
                }
                None => out.put_u8(0),
            }
            out.put_u64(*now_ms);
        }
        Write::DeleteLog => out.put_u8(3),
        Write::CreateLog { epoch } => {
            out.put_u8(4);
            out.put_u64(*epoch);
        }
        Write::Put { key, value } => {
            out.put_u8(5);
            put_bytes(out, key);
            put_bytes(out, value);
        }
        Write::Delete { key } => {
            out.put_u8(6);
            put_bytes(out, key);
        }
        Write::DeleteAllKv => out.put_u8(7),
        Write::SetAlarm { at_ms } => {
            out.put_u8(8);
            out.put_u64(*at_ms);
        }
        Write::DeleteAlarm => out.put_u8(9),
    }
}

fn decode_write(r: &mut Reader<'_>) -> Result<Write, Undecodable> {
    Ok(match r.u8()? {
        1 => Write::Append {
            seq: r.u64()?,
            timestamp_ms: r.u64()?,
            data: Bytes::copy_from_slice(r.bytes()?),
        },
        2 => {
            let max_events = r.opt()?;
            let max_bytes = r.opt()?;
            let max_age = match r.u8()? {
                0 => None,
                1 => Some(Duration::new(r.u64()?, r.u32()?)),
                other => return Err(Undecodable(format!("age flag {other}"))),
            };
            Write::Trim {
                retention: Retention {
                    max_events,
                    max_bytes,
                    max_age,
                },
                now_ms: r.u64()?,
            }
        }
        3 => Write::DeleteLog,
        4 => Write::CreateLog { epoch: r.u64()? },
        5 => Write::Put {
            key: r.bytes()?.to_vec(),
            value: Bytes::copy_from_slice(r.bytes()?),
        },
        6 => Write::Delete {
            key: r.bytes()?.to_vec(),
        },
        7 => Write::DeleteAllKv,
        8 => Write::SetAlarm { at_ms: r.u64()? },
        9 => Write::DeleteAlarm,
        other => return Err(Undecodable(format!("unknown write kind {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch
            .push(Write::CreateLog { epoch: 7 })
            .append(1, 1000, Bytes::from_static(b"one"))
            .append(2, 1001, Bytes::new())
            .trim(
                Retention {
                    max_events: Some(10),
                    max_bytes: None,
                    max_age: Some(Duration::new(3, 5)),
                },
                1002,
            )
            .put(b"k".to_vec(), Bytes::from_static(b"v"))
            .delete(b"gone".to_vec())
            .push(Write::DeleteAllKv)
            .push(Write::SetAlarm { at_ms: 99 })
            .push(Write::DeleteAlarm)
            .push(Write::DeleteLog);
        batch
    }

    #[test]
    fn commits_round_trip_every_write_kind() {
        let batches = vec![every_kind(), WriteBatch::new(), every_kind()];
        let bytes = encode_commit(&batches);
        assert_eq!(decode_commit(&bytes).unwrap(), batches);
    }

    #[test]
    fn images_round_trip_and_another_schema_is_refused() {
        let records = vec![
            (b"a".to_vec(), Bytes::from_static(b"1")),
            (b"bb".to_vec(), Bytes::new()),
        ];
        let bytes = encode_image(&records);
        assert_eq!(decode_image(&bytes).unwrap(), records);
        let mut other = bytes.to_vec();
        other[4..8].copy_from_slice(&(CURRENT_SCHEMA + 1).to_be_bytes());
        let refused = decode_image(&Bytes::from(other)).unwrap_err();
        assert!(refused.0.contains("schema"), "{refused}");
    }

    #[test]
    fn damaged_messages_are_refused_never_panic() {
        let bytes = encode_commit(&[every_kind()]);
        for cut in 0..bytes.len() {
            assert!(decode_commit(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(decode_commit(&longer).is_err());
        assert!(decode_commit(b"DMI1").is_err());
        let mut bad_kind = encode_commit(&[]).to_vec();
        bad_kind[7] = 1;
        bad_kind.extend_from_slice(&[0, 0, 0, 1, 42]);
        assert!(decode_commit(&bad_kind).unwrap_err().0.contains("42"));
        // A length that points past the end.
        let image = encode_image(&[(b"k".to_vec(), Bytes::from_static(b"v"))]);
        let mut huge = image.to_vec();
        huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_image(&Bytes::from(huge)).is_err());
    }

    #[test]
    fn splitting_covers_the_payload_in_order() {
        let payload = Bytes::from((0..=250u8).collect::<Vec<_>>());
        for limit in [1, 7, 100, 251, 1000] {
            let parts = split(&payload, limit);
            assert!(parts.iter().all(|p| p.len() <= limit));
            assert_eq!(parts.concat(), payload.to_vec(), "limit {limit}");
        }
        assert_eq!(split(&Bytes::new(), 10), vec![Bytes::new()]);
    }
}
