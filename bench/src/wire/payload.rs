//! The body every load scenario publishes: when it was sent and which message it is, as 32
//! hex digits, then padding up to the requested size. Hex keeps it text that needs no JSON
//! escaping and has no line break, so every transport carries it as is and a subscriber
//! finds it without decoding.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes at the start of every payload that carry the send time and the index.
pub(crate) const HEADER_LEN: usize = 32;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide origin. Publishers and subscribers live in this one
/// process, so a send time read from a payload compares directly with a receive time.
pub(crate) fn now_ns() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A payload of `size` bytes (at least [`HEADER_LEN`]) for message `index` sent at `sent_ns`.
pub(crate) fn encode(size: usize, sent_ns: u64, index: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(size.max(HEADER_LEN));
    put_hex(&mut out, sent_ns);
    put_hex(&mut out, index);
    out.resize(size.max(HEADER_LEN), b'x');
    out.freeze()
}

/// The send time and index of a payload made by [`encode`].
pub(crate) fn decode(data: &[u8]) -> Option<(u64, u64)> {
    Some((hex(data.get(..16)?)?, hex(data.get(16..HEADER_LEN)?)?))
}

fn put_hex(out: &mut BytesMut, value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.put_u8(DIGITS[(value >> (shift * 4)) as usize & 0xf]);
    }
}

fn hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &c| {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = encode(40, 0x0123_4567_89ab_cdef, 42);
        assert_eq!(&p[..], b"0123456789abcdef000000000000002axxxxxxxx");
        assert_eq!(decode(&p), Some((0x0123_4567_89ab_cdef, 42)));
        assert_eq!(encode(1, 0, 0).len(), HEADER_LEN);
        assert_eq!(decode(b"0123"), None);
        assert_eq!(decode(&[b'g'; 32]), None);
    }
}
