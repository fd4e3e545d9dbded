//! Event ids: opaque strings to clients, `{epoch in hex}-{seq in decimal}` inside.
//!
//! The epoch is the channel log's incarnation, so an id from a deleted-and-recreated channel
//! is recognised as foreign instead of silently pointing into the new history.

use std::fmt;
use std::str::FromStr;

/// The position of one event in one incarnation of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// The log incarnation.
    pub epoch: u64,
    /// The event's sequence number, from 1.
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.epoch, self.seq)
    }
}

/// Why a string is not an event id; the message is shown to clients as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed event id {0:?}: expected an id this server sent, like \"18a3f09c2b1d4-42\" \
     (omit the cursor to start from live events)"
)]
pub struct BadEventId(pub String);

impl FromStr for EventId {
    type Err = BadEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEventId(s.chars().take(100).collect());
        let (epoch, seq) = s.split_once('-').ok_or_else(bad)?;
        let valid = |part: &str, hex: bool| {
            !part.is_empty()
                && part.len() <= 20
                && part.chars().all(|c| {
                    if hex {
                        c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
                    } else {
                        c.is_ascii_digit()
                    }
                })
        };
        if !valid(epoch, true) || !valid(seq, false) {
            return Err(bad());
        }
        Ok(EventId {
            epoch: u64::from_str_radix(epoch, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = EventId {
            epoch: 0x0001_8a3f_09c2_b1d4,
            seq: 42,
        };
        assert_eq!(id.to_string(), "18a3f09c2b1d4-42");
        assert_eq!("18a3f09c2b1d4-42".parse::<EventId>(), Ok(id));
        let max = EventId {
            epoch: u64::MAX,
            seq: u64::MAX,
        };
        assert_eq!(max.to_string().parse::<EventId>(), Ok(max));
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            "",
            "-",
            "42",
            "abc-",
            "-42",
            "xyz-1",
            "a-b",
            "a-1-2",
            "A-1",
            "a- 1",
            " a-1",
            "a-+1",
            "a--1",
            "10000000000000000-1",
            "1-18446744073709551616",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} parsed");
        }
        let err = "nope".parse::<EventId>().unwrap_err();
        assert!(err.to_string().contains("malformed event id \"nope\""));
    }
}
