//! What can be tuned per channel, and the naming rules.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dormouse_storage::Retention;

/// Longest channel name, in bytes. Long enough for `tenant:room:thread` schemes, short
/// enough to keep storage keys and logs small.
pub const MAX_CHANNEL_NAME: usize = 200;
/// Longest event type name, in bytes (it is stored with every event).
pub const MAX_EVENT_NAME: usize = 64;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Retention and deduplication of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSettings {
    /// Events kept for replay.
    pub max_events: u64,
    /// Bytes kept for replay, counting each event's payload, name and 3 header bytes (the
    /// newest event is always kept).
    pub max_bytes: u64,
    /// Events older than this are dropped from the replay buffer.
    pub max_age: Duration,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_window: Duration,
    /// Whether the channel keeps presence: its subscribers as members by subject, with
    /// join and leave events to every subscriber and a member list to query. Off by
    /// default: every join and leave is a message to every subscriber.
    pub presence: bool,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        Self {
            max_events: 1000,
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(24 * 3600),
            idempotency_window: Duration::from_secs(3600),
            presence: false,
        }
    }
}

impl ChannelSettings {
    /// The storage retention these settings imply.
    pub fn retention(&self) -> Retention {
        Retention {
            max_events: Some(self.max_events),
            max_bytes: Some(self.max_bytes),
            max_age: Some(self.max_age),
        }
    }
}

/// What every channel shares: settings (global, and per name prefix) and memory bounds.
#[derive(Debug, Clone, Default)]
pub struct ChannelEnv {
    /// Settings for channels no prefix matches.
    pub default: ChannelSettings,
    /// `(prefix, settings)`: the longest matching prefix wins.
    pub prefixes: Vec<(String, ChannelSettings)>,
    /// Bytes of recent events an active channel keeps in memory (older replay comes from
    /// storage); bounds the memory of an active channel whatever its retention.
    pub memory_tail_bytes: usize,
    /// Most subscribers one channel holds; a subscribe beyond it is refused, so one hot
    /// channel cannot take every connection's memory. 0: no limit.
    pub max_subscribers: usize,
    /// Told what channels do, for the embedding server's metrics; `None`: nobody counts.
    pub observer: Option<Arc<dyn ChannelObserver>>,
    /// All active channels' in-memory tails together; `None`: each is bounded by
    /// `memory_tail_bytes` alone. See [`TailBudget`].
    pub tails: Option<Arc<TailBudget>>,
}

/// Memory for the in-memory tails of all active channels together. When it is spent, a
/// channel that adds an event drops its own oldest ones (down to the newest), and one that
/// wakes loads only what is left; replay of what is not in memory comes from storage. So
/// memory while many channels are active is set by configuration, not by how many channels
/// are touched at once.
#[derive(Debug)]
pub struct TailBudget {
    limit: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl TailBudget {
    /// A budget of `limit` bytes, counted as events weigh in memory ([`Event::weight`]:
    /// payload, name and a fixed overhead).
    ///
    /// [`Event::weight`]: crate::channel::Event::weight
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Bytes held by tails now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes still free.
    pub(crate) fn left(&self) -> usize {
        self.limit.saturating_sub(self.used())
    }

    pub(crate) fn over(&self) -> bool {
        self.used() > self.limit
    }

    pub(crate) fn take(&self, bytes: usize) {
        self.used
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn give_back(&self, bytes: usize) {
        self.used
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a server embedding channels wants to count. Channels call it after the commit, so
/// what is reported happened; the implementation must be cheap (it runs on the channel's
/// output path) and must not call back into the channel.
pub trait ChannelObserver: Send + Sync + fmt::Debug {
    /// `events` new events with `bytes` of payload were stored in `channel` (duplicates
    /// refused by an idempotency key are not counted).
    fn published(&self, channel: &str, events: u64, bytes: u64);
    /// A gap notice (`reason`: `trimmed`, `epoch_changed`, `unknown_id`, `deleted`) was
    /// queued for one subscriber.
    fn gap_sent(&self, reason: &'static str);
}

impl ChannelEnv {
    /// The settings that apply to `channel`.
    pub fn settings_for(&self, channel: &str) -> &ChannelSettings {
        self.prefixes
            .iter()
            .filter(|(prefix, _)| channel.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(&self.default, |(_, settings)| settings)
    }
}

fn allowed(c: char, extra: &str) -> bool {
    c.is_ascii_alphanumeric() || extra.contains(c)
}

/// Checks a channel name: 1 to 200 bytes of ASCII letters, digits and `_ - . : @ =`. The
/// error states the rule, for a 400 body.
pub fn validate_channel_name(name: &str) -> Result<(), String> {
    let rule = "channel names are 1 to 200 characters from A-Z a-z 0-9 _ - . : @ =";
    if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
        return Err(format!("{rule}; got {} characters", name.chars().count()));
    }
    if let Some(c) = name.chars().find(|&c| !allowed(c, "_-.:@=")) {
        return Err(format!("{rule}; got {c:?} in {:?}", truncate(name)));
    }
    Ok(())
}

/// Checks an event type name: 1 to 64 bytes of ASCII letters, digits and `_ - .`. No `:`,
/// which the SSE encoding uses to mark base64 payloads.
pub fn validate_event_name(name: &str) -> Result<(), String> {
    let rule = "event names are 1 to 64 characters from A-Z a-z 0-9 _ - .";
    if name.is_empty() || name.len() > MAX_EVENT_NAME {
        return Err(format!("{rule}; got {} characters", name.chars().count()));
    }
    if let Some(c) = name.chars().find(|&c| !allowed(c, "_-.")) {
        return Err(format!("{rule}; got {c:?} in {:?}", truncate(name)));
    }
    // An SSE client tells the server's control events (`dormouse.gap`, `dormouse.close`,
    // ...) from messages by this prefix: a message named like one could pose as it.
    if name.starts_with(RESERVED_EVENT_PREFIX) {
        return Err(format!(
            "event names starting with {RESERVED_EVENT_PREFIX:?} are reserved for the \
             server's control events; got {:?}",
            truncate(name)
        ));
    }
    Ok(())
}

/// The prefix of the server's own control events on an event stream.
pub const RESERVED_EVENT_PREFIX: &str = "dormouse.";

/// Checks an idempotency key: 1 to 200 printable ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.chars().all(|c| c.is_ascii_graphic())
    {
        return Err("idempotency keys are 1 to 200 printable ASCII characters".to_string());
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for ok in [
            "a",
            "chat:room-1",
            "user@example.com",
            "a.b_c=d",
            &"x".repeat(200),
        ] {
            assert!(validate_channel_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", "a?b", &"x".repeat(201)] {
            let err = validate_channel_name(bad).unwrap_err();
            assert!(err.starts_with("channel names are 1 to 200"), "{err}");
        }
    }

    #[test]
    fn event_names() {
        assert!(validate_event_name("token.delta").is_ok());
        assert!(validate_event_name("base64:x").is_err());
        assert!(validate_event_name("").is_err());
        let reserved = validate_event_name("dormouse.close").unwrap_err();
        assert!(reserved.contains("reserved"), "{reserved}");
        assert!(validate_event_name("dormousey").is_ok());
        assert!(validate_event_name(&"e".repeat(65)).is_err());
    }

    #[test]
    fn longest_prefix_wins() {
        let small = ChannelSettings {
            max_events: 10,
            ..ChannelSettings::default()
        };
        let tiny = ChannelSettings {
            max_events: 1,
            ..ChannelSettings::default()
        };
        let env = ChannelEnv {
            prefixes: vec![
                ("chat:".into(), small.clone()),
                ("chat:vip:".into(), tiny.clone()),
            ],
            ..ChannelEnv::default()
        };
        assert_eq!(env.settings_for("chat:vip:1"), &tiny);
        assert_eq!(env.settings_for("chat:1"), &small);
        assert_eq!(env.settings_for("news"), &ChannelSettings::default());
    }
}
