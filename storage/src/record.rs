//! Value encodings of the records described in [`crate::key`]. Fixed-size big-endian fields:
//! no serde format to version, and a truncated value is detected by its length.

use bytes::Bytes;

use crate::{Error, LogEntry, LogMeta, Result};

const U64_LEN: usize = 8;
/// Meta records before `oldest_ms` was added had five fields; they still decode.
const META_LEN_V1: usize = 5 * U64_LEN;
const META_LEN: usize = 6 * U64_LEN;

pub(crate) fn encode_meta(meta: &LogMeta) -> Bytes {
    let mut value = Vec::with_capacity(META_LEN);
    for field in [
        meta.epoch,
        meta.first_seq,
        meta.last_seq,
        meta.count,
        meta.bytes,
        meta.oldest_ms,
    ] {
        value.extend_from_slice(&field.to_be_bytes());
    }
    value.into()
}

pub(crate) fn decode_meta(value: &[u8]) -> Result<LogMeta> {
    if value.len() != META_LEN && value.len() != META_LEN_V1 {
        return Err(Error::Corrupt(format!(
            "log meta record is {} bytes, expected {META_LEN} (or {META_LEN_V1})",
            value.len()
        )));
    }
    let field = |i: usize| read_u64(&value[i * U64_LEN..]);
    Ok(LogMeta {
        epoch: field(0),
        first_seq: field(1),
        last_seq: field(2),
        count: field(3),
        bytes: field(4),
        oldest_ms: if value.len() == META_LEN { field(5) } else { 0 },
    })
}

pub(crate) fn encode_entry(timestamp_ms: u64, data: &[u8]) -> Bytes {
    let mut value = Vec::with_capacity(U64_LEN + data.len());
    value.extend_from_slice(&timestamp_ms.to_be_bytes());
    value.extend_from_slice(data);
    value.into()
}

/// The timestamp and payload length of an entry value, without copying the payload: what
/// trimming by age needs.
pub(crate) fn entry_header(value: &[u8]) -> Result<(u64, u64)> {
    let len = entry_payload_len(value.len() as u64)?;
    Ok((read_u64(value), len))
}

/// The payload length of an entry whose stored value is `value_len` bytes: what trimming
/// by count or bytes needs, known without reading the value.
pub(crate) fn entry_payload_len(value_len: u64) -> Result<u64> {
    value_len.checked_sub(U64_LEN as u64).ok_or_else(|| {
        Error::Corrupt(format!(
            "log entry value is {value_len} bytes, shorter than its timestamp"
        ))
    })
}

pub(crate) fn decode_entry(seq: u64, value: &[u8]) -> Result<LogEntry> {
    let (timestamp_ms, _) = entry_header(value)?;
    Ok(LogEntry {
        seq,
        timestamp_ms,
        data: Bytes::copy_from_slice(&value[U64_LEN..]),
    })
}

pub(crate) fn encode_u64(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

pub(crate) fn decode_u64(what: &str, value: &[u8]) -> Result<u64> {
    if value.len() != U64_LEN {
        return Err(Error::Corrupt(format!(
            "{what} record is {} bytes, expected {U64_LEN}",
            value.len()
        )));
    }
    Ok(read_u64(value))
}

pub(crate) fn decode_u32(what: &str, value: &[u8]) -> Result<u32> {
    <[u8; 4]>::try_from(value)
        .map(u32::from_be_bytes)
        .map_err(|_| {
            Error::Corrupt(format!(
                "{what} record is {} bytes, expected 4",
                value.len()
            ))
        })
}

/// Callers have checked that at least 8 bytes are there.
fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0; U64_LEN];
    buf.copy_from_slice(&bytes[..U64_LEN]);
    u64::from_be_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let meta = LogMeta {
            epoch: 1_700_000_000_000_000,
            first_seq: 5,
            last_seq: u64::MAX,
            count: 3,
            bytes: 12,
            oldest_ms: 1_700_000_000_000,
        };
        assert_eq!(decode_meta(&encode_meta(&meta)).unwrap(), meta);
        assert!(decode_meta(&[0; 39]).is_err());
        assert!(decode_meta(&[0; 41]).is_err());
        // A record from before `oldest_ms`: the bound is unknown, the rest reads as written.
        let old = &encode_meta(&meta)[..META_LEN_V1];
        let read = decode_meta(old).unwrap();
        assert_eq!(read.oldest_ms, 0);
        assert_eq!((read.epoch, read.count, read.bytes), (meta.epoch, 3, 12));
    }

    #[test]
    fn entry_round_trips() {
        let value = encode_entry(42, b"hello");
        assert_eq!(entry_header(&value).unwrap(), (42, 5));
        let entry = decode_entry(7, &value).unwrap();
        assert_eq!(entry.seq, 7);
        assert_eq!(entry.timestamp_ms, 42);
        assert_eq!(&entry.data[..], b"hello");
        assert!(decode_entry(1, &[1, 2, 3]).is_err());
    }
}
