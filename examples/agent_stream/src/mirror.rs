//! The run's copy in a Dormouse channel, `run:{run}`, which is what SSE viewers read: the
//! gateway streams SSE only from channels, while a user object answers HTTP with whole
//! responses.
//!
//! Publishes happen in after-commit effects, so the channel only ever receives events the
//! run has made durable, in log order (the gateway's `Publisher` keeps each channel's
//! publishes in the order they were handed to it, and effects run in commit order). Each
//! carries the run's event id as its idempotency key, so publishing an event twice (a
//! repair racing a late effect) stores it once.
//!
//! What a crash can cost is the tail of publishes that were queued but not yet stored by the
//! channel. The run finds it by reading the channel's newest event (its payload names the
//! run's `seq`) and publishes what follows; see `Run::repair_mirror`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dormouse_actors::channel::{
    ChannelRequest, ChannelResponse, Direction, NewMessage, Range, validate_channel_name,
};
use dormouse_gateway::Publisher;

use crate::event::{RunEvent, payload_seq};

/// Prefix of every run's channel name.
pub const CHANNEL_PREFIX: &str = "run:";

/// A run's handle on its channel.
#[derive(Debug, Clone)]
pub(crate) struct Mirror {
    publisher: Publisher,
    channel: Arc<str>,
    /// Set by a publish that failed (the channel could not store it), so the run's next
    /// handler repairs the copy instead of waiting for its next wake.
    broken: Arc<AtomicBool>,
}

impl Mirror {
    pub(crate) fn new(publisher: Publisher, run: &str) -> anyhow::Result<Self> {
        let channel = format!("{CHANNEL_PREFIX}{run}");
        validate_channel_name(&channel).map_err(|rule| {
            anyhow::anyhow!("run {run:?} cannot have a channel ({rule}); use a shorter name")
        })?;
        Ok(Self {
            publisher,
            channel: channel.into(),
            broken: Arc::default(),
        })
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Queues `events` on the channel, in order, as one publish. Call it from an
    /// after-commit effect only, so nothing undurable is ever published.
    pub(crate) fn publish(&self, events: &[Arc<RunEvent>]) {
        if events.is_empty() {
            return;
        }
        let messages = events
            .iter()
            .map(|event| NewMessage {
                event: Some(event.body.kind().to_string()),
                data: event.payload(),
                idempotency_key: Some(event.id.to_string()),
            })
            .collect();
        let reply = self.publisher.publish(&self.channel, messages);
        let (broken, channel) = (self.broken.clone(), self.channel.clone());
        tokio::spawn(async move {
            if let Err(e) = reply.await {
                broken.store(true, Ordering::Release);
                tracing::warn!(channel = %channel, error = %e, "mirroring to the channel failed; the run will repair it");
            }
        });
    }

    /// True (once) when a publish failed since the last call.
    pub(crate) fn take_broken(&self) -> bool {
        self.broken.swap(false, Ordering::AcqRel)
    }

    /// The `seq` of the newest run event the channel holds: `None` when it holds none, or
    /// when its newest event is not one of ours.
    pub(crate) async fn last_seq(&self) -> anyhow::Result<Option<u64>> {
        // One page of one event, walking back from the newest.
        let range = Range {
            direction: Direction::Backward(None),
            since_ms: None,
            until_ms: None,
        };
        match self
            .publisher
            .call(&self.channel, ChannelRequest::History { range, limit: 1 })
            .await?
        {
            ChannelResponse::History(page) => Ok(page
                .events
                .last()
                .and_then(|event| payload_seq(&event.data))),
            other => anyhow::bail!("the channel answered {other:?} to history"),
        }
    }
}
