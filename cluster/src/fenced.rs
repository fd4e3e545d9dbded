//! Appends fenced by the log itself: each append to a subject names the sequence it expects
//! the subject's last message to have, and JetStream refuses it when another writer appended
//! since. This is what makes ownership safe in cluster mode without timing assumptions: a
//! former owner that was paused, partitioned or slow can never append after a new owner did,
//! because its expectation is stale; its actor stops when the refusal comes back.
//!
//! An append also carries an id (`Nats-Msg-Id`): sent again with the same id and expectation
//! after a timeout or a leader change, it is answered `duplicate` with the sequence it was
//! stored at the first time, so retrying never writes twice.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{
    Config, DiscardPolicy, LastRawMessageErrorKind, Republish, StorageType, Stream,
};
use async_nats::jetstream::{self, Context};
use bytes::Bytes;

use crate::connect::Nats;

/// A replicated stream of fenced subjects.
#[derive(Debug, Clone)]
pub struct LogSpec {
    /// The stream's name (letters, digits, `-` and `_`).
    pub name: String,
    /// The subjects it holds (`dm.log.>`).
    pub subjects: Vec<String>,
    /// Copies kept on different servers: 3 survives the loss of one; 1 is for development.
    pub replicas: usize,
    /// How long the servers remember append ids, so a retry within it is recognised.
    pub duplicate_window: Duration,
    /// Also publish every stored message to `live.<subject>` (JetStream's RePublish, sent by
    /// the stream's leader once the message is stored), for [`FencedLog::follow`]. Needs a
    /// single subject pattern.
    pub republish: bool,
}

/// Between two tries of an unacknowledged append.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Where a stored message is republished: `live.` before its subject.
pub(crate) const LIVE_PREFIX: &str = "live.";

/// One stream's fenced appends and the reads that go with them.
#[derive(Debug, Clone)]
pub struct FencedLog {
    js: Context,
    pub(crate) stream: Stream,
    pub(crate) client: async_nats::Client,
}

/// An append JetStream acknowledged: stored on a quorum of the stream's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream sequence it was stored at: the next append to its subject expects it.
    pub sequence: u64,
    /// It had been stored already (a retry with the same id): `sequence` is the first one.
    pub duplicate: bool,
}

/// Why an append was not stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The subject's last sequence is not the one expected: another writer appended since.
    /// A writer that gets this for an id it has not seen stored must stop writing.
    #[error("fenced: the subject's last sequence is no longer {expected}; another writer appended")]
    Fenced { expected: u64 },
    /// Another fenced append to the same subject was still being replicated; the server
    /// takes one at a time per subject. An owner tries again with the same expectation
    /// ([`FencedLog::append_retrying`] does): the other append may be a new owner's marker,
    /// and adopting the log's new end would write past it. Only a take-over re-reads the end.
    #[error("another fenced append to this subject is in flight")]
    Contended,
    /// No acknowledgement came (a timeout, a leader election, a lost connection): the
    /// append may or may not be stored. Retry with the same id and expectation.
    #[error("JetStream did not acknowledge the append: {0}")]
    Unacknowledged(#[source] PublishError),
    /// Refused for another reason (no such stream, too large, ...).
    #[error("JetStream refused the append: {0}")]
    Refused(#[source] PublishError),
}

/// A failure to create, find or read the stream.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct LogError {
    what: String,
    #[source]
    source: async_nats::Error,
}

impl LogError {
    pub(crate) fn new(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self {
            what: what.into(),
            source: source.into(),
        }
    }
}

impl FencedLog {
    /// Creates the stream if it does not exist (file storage, `allow_direct`, old messages
    /// discarded first), or opens it as it is.
    pub async fn open(nats: &Nats, spec: &LogSpec) -> Result<Self, LogError> {
        let js = jetstream::new(nats.client.clone());
        let republish = match (spec.republish, spec.subjects.as_slice()) {
            (false, _) => None,
            (true, [pattern]) => Some(Republish {
                source: pattern.clone(),
                destination: format!("{LIVE_PREFIX}{pattern}"),
                headers_only: false,
            }),
            (true, _) => {
                return Err(LogError::new(
                    format!("opening stream {}", spec.name),
                    "republishing needs exactly one subject pattern",
                ));
            }
        };
        let config = Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            num_replicas: spec.replicas,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            duplicate_window: spec.duplicate_window,
            allow_direct: true,
            republish,
            ..Config::default()
        };
        let stream = js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| LogError::new(format!("opening stream {}", spec.name), e))?;
        // An existing stream is returned as it is: one made with other settings (R1 in
        // development, no republish, a shorter dedupe window) must not pass for this one.
        let found = &stream.cached_info().config;
        let differs = [
            ("replicas", found.num_replicas != config.num_replicas),
            (
                "duplicate window",
                found.duplicate_window != config.duplicate_window,
            ),
            (
                "republish",
                found.republish.is_some() != config.republish.is_some(),
            ),
            ("subjects", found.subjects != config.subjects),
        ];
        if let Some((what, _)) = differs.iter().find(|(_, differs)| *differs) {
            return Err(LogError::new(
                format!("opening stream {}", spec.name),
                format!("it exists with another {what} than asked for; change or delete it"),
            ));
        }
        Ok(Self {
            js,
            stream,
            client: nats.client.clone(),
        })
    }

    /// Appends `payload` to `subject` if its last message is at `expected` (0: the subject
    /// is empty). `id` identifies this append across retries.
    pub async fn append(
        &self,
        subject: &str,
        payload: Bytes,
        expected: u64,
        id: &str,
    ) -> Result<Appended, AppendError> {
        self.append_headed(subject, HeaderMap::new(), payload, expected, id)
            .await
    }

    /// [`FencedLog::append`] with headers of the caller's own beside the payload (what kind
    /// of record it is, which part of a record split over several messages).
    pub async fn append_headed(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        expected: u64,
        id: &str,
    ) -> Result<Appended, AppendError> {
        let message = PublishMessage::build()
            .headers(headers)
            .payload(payload)
            .expected_last_subject_sequence(expected)
            .message_id(id);
        let sent = self
            .js
            .send_publish(subject.to_string(), message)
            .await
            .map_err(|e| classify(e, expected))?;
        let ack = sent.await.map_err(|e| classify(e, expected))?;
        Ok(Appended {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// [`FencedLog::append`] as an owner makes it: sent again, with the same id and
    /// expectation, while no acknowledgement comes (an election, a lost connection) or its
    /// own earlier attempt is still in flight, for up to `patience`. A retry of an append
    /// that was stored is answered with its first sequence, so this never writes twice.
    pub async fn append_retrying(
        &self,
        subject: &str,
        payload: Bytes,
        expected: u64,
        id: &str,
        patience: Duration,
    ) -> Result<Appended, AppendError> {
        self.append_headed_retrying(subject, HeaderMap::new(), payload, expected, id, patience)
            .await
    }

    /// [`FencedLog::append_retrying`] with headers, as [`FencedLog::append_headed`].
    pub async fn append_headed_retrying(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        expected: u64,
        id: &str,
        patience: Duration,
    ) -> Result<Appended, AppendError> {
        let started = tokio::time::Instant::now();
        loop {
            let attempt =
                self.append_headed(subject, headers.clone(), payload.clone(), expected, id);
            match attempt.await {
                Err(AppendError::Unacknowledged(_) | AppendError::Contended)
                    if started.elapsed() < patience =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                answer => return answer,
            }
        }
    }

    /// The sequence of `subject`'s last message, 0 when it has none, read from the stream's
    /// leader (a follower may be behind, and a fencing expectation must not be stale).
    pub async fn last_sequence(&self, subject: &str) -> Result<u64, LogError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(LogError::new(format!("reading the tail of {subject}"), e)),
        }
    }

    /// The message stored at `sequence`, read from the leader: its subject and payload.
    pub async fn get(&self, sequence: u64) -> Result<(String, Bytes), LogError> {
        let message = self
            .stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| LogError::new(format!("reading sequence {sequence}"), e))?;
        Ok((message.subject.to_string(), message.payload))
    }

    /// Deletes the stream and everything in it.
    pub async fn delete(&self) -> Result<(), LogError> {
        let name = self.stream.cached_info().config.name.clone();
        self.js
            .delete_stream(&name)
            .await
            .map_err(|e| LogError::new(format!("deleting stream {name}"), e))?;
        Ok(())
    }

    /// The name of the server that leads the stream now, if one does.
    pub async fn leader(&self) -> Result<Option<String>, LogError> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| LogError::new("reading the stream's state", e))?;
        Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()))
    }
}

/// Sorts a publish failure by what the writer must do next.
fn classify(error: PublishError, expected: u64) -> AppendError {
    match error.kind() {
        PublishErrorKind::WrongLastSequence => AppendError::Fenced { expected },
        // No responders: the stream (opened at start) has no leader to take the append
        // right now, as while one is elected.
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound => AppendError::Unacknowledged(error),
        PublishErrorKind::Other => match jetstream_code(&error) {
            Some(CONTENDED) => AppendError::Contended,
            Some(code) if ELECTING.contains(&code) || NOT_YET.contains(&code) => {
                AppendError::Unacknowledged(error)
            }
            _ => AppendError::Refused(error),
        },
        _ => AppendError::Refused(error),
    }
}

/// "One conditional append per subject in flight" (JSStreamWrongLastSequenceConstantErr).
const CONTENDED: ErrorCode = ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT;

/// Answers given while the stream or the cluster has no leader: nothing was stored.
const ELECTING: [ErrorCode; 4] = [
    ErrorCode::CLUSTER_NOT_ACTIVE,
    ErrorCode::CLUSTER_NOT_ASSIGNED,
    ErrorCode::CLUSTER_NOT_AVAILABLE,
    ErrorCode::CLUSTER_NOT_LEADER,
];

/// Answers that say "not now" about this very append: the same id still being replicated
/// (a retry sent while the first try is in flight), per-subject expectations not ready yet
/// after a leader change, too many requests. Nothing was stored by this try.
const NOT_YET: [ErrorCode; 3] = [
    ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT,
    ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_NOT_READY,
    ErrorCode::STREAM_TOO_MANY_REQUESTS,
];

/// The JetStream error code behind a publish failure, if the server sent one.
fn jetstream_code(error: &PublishError) -> Option<ErrorCode> {
    let source = std::error::Error::source(error)?;
    source
        .downcast_ref::<jetstream::Error>()
        .map(jetstream::Error::error_code)
}
