//! An incremental Server-Sent Events parser (the WHATWG rules a browser's EventSource
//! follows), fed the body as it arrives in chunks of any size.
//!
//! ```
//! use dormouse_client::sse::Parser;
//!
//! let mut parser = Parser::default();
//! assert!(parser.feed(b": connected\nretry: 2000\n\nid: 1-1\ndata: he").is_empty());
//! let events = parser.feed(b"llo\n\n");
//! assert_eq!(events[0].id.as_deref(), Some("1-1"));
//! assert_eq!((events[0].event.as_str(), events[0].data.as_str()), ("message", "hello"));
//! assert_eq!(parser.take_retry(), Some(2000));
//! ```

/// How an event of a stream of several channels (`GET /v1/events?channel=a&channel=b`)
/// starts as the server's channel encodes it, shared by every subscriber: a comment line
/// `:{channel} {id}` naming the event's channel and its own id. The server's connection reads
/// it to move the stream's cursor, which it writes in its place as the event's `id:`; a
/// client never sees it.
pub const CHANNEL_TAG: u8 = b':';

/// The channel and id of an event's [`CHANNEL_TAG`] line, if `frame` starts with one, and
/// the length of the line (with its line feed).
pub fn channel_tag(frame: &[u8]) -> Option<(&str, &str, usize)> {
    let rest = frame.strip_prefix(&[CHANNEL_TAG])?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    let (channel, id) = std::str::from_utf8(&rest[..end]).ok()?.split_once(' ')?;
    Some((channel, id, end + 2))
}

/// One dispatched event: the fields of one block, `data` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The block's `id:`, if it had one (control events have none).
    pub id: Option<String>,
    /// `event:`, or `message` when absent.
    pub event: String,
    pub data: String,
}

/// Parser state between chunks.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes after the last complete line.
    partial: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    /// The latest `retry:` hint, in milliseconds; taken by the caller.
    retry: Option<u64>,
    /// The previous chunk ended with `\r`, so a `\n` starting this one belongs to it.
    after_cr: bool,
}

impl Parser {
    /// Feeds one chunk; returns the events it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr && rest.first() == Some(&b'\n') {
            rest = &rest[1..];
        }
        self.after_cr = false;
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..end]);
            let mut next = end + 1;
            if rest[end] == b'\r' {
                if next < rest.len() {
                    if rest[next] == b'\n' {
                        next += 1;
                    }
                } else {
                    self.after_cr = true;
                }
            }
            rest = &rest[next..];
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        self.partial.extend_from_slice(rest);
        events
    }

    /// The latest `retry:` hint, once.
    pub fn take_retry(&mut self) -> Option<u64> {
        self.retry.take()
    }

    fn line(&mut self, line: &[u8]) -> Option<Event> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
        None
    }

    /// Ends a block: an event if it had data, else nothing (a block with only an id or a
    /// comment dispatches nothing).
    fn dispatch(&mut self) -> Option<Event> {
        let id = self.id.take();
        let event = self.event.take();
        let data = self.data.take()?;
        Some(Event {
            id,
            event: event.unwrap_or_else(|| "message".to_string()),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Option<&str>, event: &str, data: &str) -> Event {
        Event {
            id: id.map(str::to_string),
            event: event.to_string(),
            data: data.to_string(),
        }
    }

    #[test]
    fn parses_what_the_server_sends_split_anywhere() {
        let stream = b": connected\nretry: 2000\n\nid: e-1\nevent: message\ndata: first\ndata: second\n\n: keep-alive\n\nevent: dormouse.gap\ndata: {\"type\":\"gap\"}\n\n";
        let whole = {
            let mut p = Parser::default();
            let events = p.feed(stream);
            assert_eq!(p.take_retry(), Some(2000));
            events
        };
        assert_eq!(
            whole,
            vec![
                event(Some("e-1"), "message", "first\nsecond"),
                event(None, "dormouse.gap", "{\"type\":\"gap\"}"),
            ]
        );
        // Byte by byte gives the same events.
        let mut p = Parser::default();
        let mut events = Vec::new();
        for b in stream {
            events.extend(p.feed(std::slice::from_ref(b)));
        }
        assert_eq!(events, whole);
    }

    #[test]
    fn crlf_and_cr_line_ends_and_fields_without_space() {
        let mut p = Parser::default();
        let mut events = p.feed(b"id:7\r\ndata:a\r");
        events.extend(p.feed(b"\ndata\r\r"));
        assert_eq!(events, vec![event(Some("7"), "message", "a\n")]);
    }

    #[test]
    fn blocks_without_data_dispatch_nothing() {
        let mut p = Parser::default();
        assert!(p.feed(b"id: 1\n\nevent: x\n\n").is_empty());
    }
}
