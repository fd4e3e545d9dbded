//! Binary-mode WebSocket frames (docs/API.md, "Binary frames"): how a subscriber that asked
//! for `?format=binary` (or the `dormouse.binary` subprotocol) reads an event. The server
//! writes them with these constants, so the format has one definition.
//!
//! A frame is: one byte of kind ([`EVENT`] or [`DIRECT`]); then three short fields, each
//! one byte of length and that many bytes: the id (ASCII; empty for a direct message, which
//! has no id), the channel (empty for a direct message), the event name; then the payload
//! exactly as published. Control messages (`connected`, `gap`,
//! acks, errors) stay JSON text frames, so the frame type tells them apart.

/// The kind byte of a channel event.
pub const EVENT: u8 = 1;
/// The kind byte of a message a backend sent to this connection (no id: never replayed,
/// never a cursor).
pub const DIRECT: u8 = 2;

/// One binary frame, read without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The event's id, the resume cursor; `None` for a direct message.
    pub id: Option<&'a str>,
    /// The channel the event was published to (a connection may follow several); `None`
    /// for a direct message.
    pub channel: Option<&'a str>,
    /// The event name.
    pub event: &'a str,
    /// The payload as published.
    pub data: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Reads a frame; `None` when it is not one the server writes (a kind it does not
    /// use, a length past the end, an id on a direct message or none on an event).
    pub fn parse(frame: &'a [u8]) -> Option<Self> {
        let (&kind, rest) = frame.split_first()?;
        let (id, rest) = short_field(rest)?;
        let (channel, rest) = short_field(rest)?;
        let (event, data) = short_field(rest)?;
        let (id, channel) = match kind {
            EVENT if !id.is_empty() && !channel.is_empty() => (Some(id), Some(channel)),
            DIRECT if id.is_empty() && channel.is_empty() => (None, None),
            _ => return None,
        };
        Some(Self {
            id,
            channel,
            event,
            data,
        })
    }
}

/// A field of one length byte and that many UTF-8 bytes; the field and what follows it.
fn short_field(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let len = usize::from(len);
    let field = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((field, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_and_junk_is_refused() {
        let frame = [
            &[EVENT, 4][..],
            b"ab-7",
            &[2],
            b"c1",
            &[4],
            b"tick",
            b"\0\xff",
        ]
        .concat();
        assert_eq!(
            Frame::parse(&frame),
            Some(Frame {
                id: Some("ab-7"),
                channel: Some("c1"),
                event: "tick",
                data: b"\0\xff"
            })
        );
        let direct = [&[DIRECT, 0, 0, 4][..], b"note", b"hi"].concat();
        let direct = Frame::parse(&direct).unwrap();
        assert_eq!(
            (direct.id, direct.channel, direct.data),
            (None, None, &b"hi"[..])
        );
        for junk in [
            &b""[..],
            &[EVENT, 9, b'x'],
            &[7, 0, 0, 0],
            &[DIRECT, 1, b'x', 0, 0],
            &[EVENT, 1, b'x', 0, 0],
            &[EVENT, 0, 1, b'c', 0],
        ] {
            assert_eq!(Frame::parse(junk), None, "{junk:?}");
        }
    }
}
