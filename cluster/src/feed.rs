//! Following one subject's appends from any node, in order and each once: the way a node
//! with subscribers to a channel it does not own will see the owner's events.
//!
//! Live messages come from JetStream's RePublish (the stream's leader publishes each message
//! once stored, with `Nats-Sequence` and `Nats-Last-Sequence`, the previous sequence on the
//! same subject). That is at-most-once: a republish can be lost (a leader change, a slow
//! subscriber cut off by its server). So the feed checks each live message's link to the one
//! before; when it does not join what was delivered, the missing messages are read from the
//! stream's leader first. A quiet subject is checked against the stream's tail every
//! `tail_check`, so the last messages before a silence are not lost either.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use futures::StreamExt as _;

use crate::fenced::{FencedLog, LIVE_PREFIX, LogError};

/// One message of the followed subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its headers as appended (a republished message also carries JetStream's `Nats-*`).
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// A subject's messages after a given sequence, live; see the module doc.
pub struct Feed {
    log: FencedLog,
    subject: String,
    live: async_nats::Subscriber,
    /// The sequence of the last message returned.
    delivered: u64,
    /// Read from the stream, not yet returned.
    ready: VecDeque<Entry>,
    tail_check: Duration,
    /// Fault injection for tests and the chaos harness: every `n`th live message is
    /// dropped as if its republish had been lost.
    drop_every: Option<u64>,
    live_seen: u64,
    /// Messages read from the stream rather than received live: the backlog at start, and
    /// what lost republishes left out.
    pub filled: u64,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("subject", &self.subject)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl FencedLog {
    /// Follows `subject` from the message after `after` (0: from its start). The stream
    /// must republish ([`crate::LogSpec::republish`]). The backlog is read, one leader read
    /// per message, before this returns: meant for the bounded tail a subject retains, not
    /// for replaying a long history.
    pub async fn follow(&self, subject: &str, after: u64) -> Result<Feed, LogError> {
        // Live first, so nothing stored while the backlog is read slips between the two.
        let live = self
            .client
            .subscribe(format!("{LIVE_PREFIX}{subject}"))
            .await
            .map_err(|e| LogError::new(format!("subscribing to {subject}"), e))?;
        let mut feed = Feed {
            log: self.clone(),
            subject: subject.to_string(),
            live,
            delivered: after,
            ready: VecDeque::new(),
            tail_check: Duration::from_secs(1),
            drop_every: None,
            live_seen: 0,
            filled: 0,
        };
        let tail = self.last_sequence(subject).await?;
        feed.fill_to(tail).await?;
        Ok(feed)
    }
}

impl Feed {
    /// How long a silent subject goes before its tail is read to look for missed messages.
    pub fn set_tail_check(&mut self, every: Duration) {
        self.tail_check = every;
    }

    /// Drops every `n`th live message, as a lost republish (for tests and chaos runs).
    pub fn drop_live_every(&mut self, n: u64) {
        self.drop_every = Some(n);
    }

    /// The sequence of the last message returned.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The next message after the last one returned.
    pub async fn next(&mut self) -> Result<Entry, LogError> {
        loop {
            if let Some(entry) = self.ready.pop_front() {
                self.delivered = entry.sequence;
                return Ok(entry);
            }
            let message = match tokio::time::timeout(self.tail_check, self.live.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Err(LogError::new(
                        format!("following {}", self.subject),
                        "the live subscription ended (connection closed)",
                    ));
                }
                Err(_quiet) => {
                    // Best effort: while a leader is being elected the tail cannot be read,
                    // and the next silence looks again.
                    match self.log.last_sequence(&self.subject).await {
                        Ok(tail) => self.fill_to(tail).await?,
                        Err(e) => tracing::debug!(error = %e, "tail check failed; retrying"),
                    }
                    continue;
                }
            };
            self.live_seen += 1;
            if self
                .drop_every
                .is_some_and(|n| n > 0 && self.live_seen.is_multiple_of(n))
            {
                continue;
            }
            let header = |name| crate::header(&message, name).and_then(|v| v.parse::<u64>().ok());
            let (Some(sequence), Some(previous)) =
                (header("Nats-Sequence"), header("Nats-Last-Sequence"))
            else {
                // Not a republished message: nothing to link; the tail check covers it.
                continue;
            };
            if sequence <= self.delivered {
                // Already returned (read from the stream before its republish came).
                continue;
            }
            if previous != self.delivered {
                // Messages between were stored but their republishes never came.
                self.fill_to(sequence).await?;
                continue;
            }
            self.delivered = sequence;
            return Ok(Entry {
                sequence,
                headers: message.headers.unwrap_or_default(),
                payload: message.payload,
            });
        }
    }

    /// Queues every message of the subject after what was delivered (or queued) up to and
    /// including `upto`, read from the stream's leader; waits through a leader election
    /// (up to [`FILL_PATIENCE`]) rather than deliver out of order.
    async fn fill_to(&mut self, upto: u64) -> Result<(), LogError> {
        let started = tokio::time::Instant::now();
        let mut from = self.ready.back().map_or(self.delivered, |e| e.sequence) + 1;
        while from <= upto {
            let message = match self
                .log
                .stream
                .get_first_raw_message_by_subject(&self.subject, from)
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) if started.elapsed() < FILL_PATIENCE => {
                    tracing::debug!(error = %e, "filling from the stream failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    return Err(LogError::new(
                        format!("reading {} from {from}", self.subject),
                        e,
                    ));
                }
            };
            if message.sequence > upto {
                break;
            }
            from = message.sequence + 1;
            self.filled += 1;
            self.ready.push_back(Entry {
                sequence: message.sequence,
                headers: message.headers,
                payload: message.payload,
            });
        }
        Ok(())
    }
}

/// How long a fill waits for the stream's leader (an election took 4-7 s here).
pub const FILL_PATIENCE: Duration = Duration::from_secs(30);
