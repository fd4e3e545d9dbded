//! The one way into a channel's log: every publish (HTTP, the compat route, batch,
//! WebSocket client frames, and objects that feed a channel, such as the agent_stream
//! example's mirror) goes through [`Publisher`].
//!
//! A client's publish passes the same checks whichever way it came ([`Publisher::authorize`],
//! [`Publisher::charge`], [`Publisher::check`]), so a rule changes in one place; what differs
//! per way is only how the request is read and how the answer is written.
//!
//! Then the publishes that arrive for one channel while its previous call is still on its
//! way to disk are merged into a single call.
//!
//! Under `durability = "always"` a channel answers after the group commit's fsync. Called
//! once per message, a busy channel ran one handler, one planned batch, one segment write
//! and one output-gate item per message, all waiting on the same fsync anyway. Merged, the
//! messages that queue up during one commit cost one of each, in the order they arrived;
//! an idle channel's publish goes straight through (one task hop more than a direct call).
//! Each caller still gets its own results, and a failure of the merged call (storage, a
//! shutdown) is reported to every caller in it, none of whose messages were stored.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use dormouse_actors::Channel;
use dormouse_actors::channel::{
    ChannelRequest, ChannelResponse, NewMessage, Published, validate_event_name,
    validate_idempotency_key,
};
use dormouse_runtime::{Error, Namespace, Result};
use tokio::sync::oneshot;

use crate::auth::{Need, Principal};
use crate::cluster::{ChannelCall, ClusterNode};
use crate::error::ApiError;
use crate::limits::Limits;

/// Most messages in one merged call: keeps one commit (and the handler that builds it)
/// short, so the publishes that queue behind it wait little.
const MAX_MESSAGES: usize = 512;

/// Most payload bytes in one merged call; a single larger publish still goes, alone.
const MAX_BYTES: usize = 4 << 20;

const SHARDS: usize = 16;

/// Publishes to channels, one call in flight per channel; see the module docs. Cheap to
/// clone: clones share the queues.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

struct Inner {
    channels: Namespace<Channel>,
    /// Cluster mode: where each call goes (here, or the channel's owner).
    cluster: Option<Arc<ClusterNode>>,
    /// Publish rates per address and per credential.
    limits: Arc<Limits>,
    /// The largest payload a client may publish (`limits.max_message_size`).
    max_message_size: usize,
    /// Channels with a call in flight, and what waits behind it; sharded by name so
    /// publishes to different channels rarely meet on a lock.
    shards: Vec<Mutex<HashMap<Arc<str>, VecDeque<Waiting>>>>,
}

/// One caller's work, waiting for the channel's current call to finish.
enum Waiting {
    /// Messages, merged with the publishes queued next to them.
    Publish {
        messages: Vec<NewMessage>,
        bytes: usize,
        reply: oneshot::Sender<Result<Vec<Published>>>,
    },
    /// Any other request (a read, a delete), sent alone, in its place in the order.
    Call {
        request: ChannelRequest,
        reply: oneshot::Sender<Result<ChannelResponse>>,
    },
}

/// A client asking to publish: whose grant it is and where it connects from, which is what
/// the checks before a channel need to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client<'a> {
    pub(crate) principal: &'a Principal,
    pub(crate) ip: Option<IpAddr>,
}

impl Publisher {
    /// A publisher for the channels of `channels`, holding clients to `limits` and to
    /// payloads of at most `max_message_size` bytes.
    pub(crate) fn new(
        channels: Namespace<Channel>,
        cluster: Option<Arc<ClusterNode>>,
        limits: Arc<Limits>,
        max_message_size: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                channels,
                cluster,
                limits,
                max_message_size,
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            }),
        }
    }

    /// Whether `channel` keeps presence (its settings say so), so its subscribers are
    /// members who join and leave.
    pub(crate) fn keeps_presence(&self, channel: &str) -> bool {
        self.inner.channels.env().settings_for(channel).presence
    }

    /// Whether any channel keeps presence: only then does a connection carry who it is to
    /// its channels (a socket attachment each).
    pub(crate) fn any_presence(&self) -> bool {
        let env = self.inner.channels.env();
        env.default.presence || env.prefixes.iter().any(|(_, s)| s.presence)
    }

    /// Whether `client` may publish to `channel` (403 when its credential does not grant it).
    pub(crate) fn authorize(
        &self,
        client: Client<'_>,
        channel: &str,
    ) -> std::result::Result<(), ApiError> {
        client.principal.require(Need::Publish(channel))
    }

    /// Takes `count` messages from the client's publish budgets (per address and per
    /// credential), or says when to retry (429). Checked before a body is read, so that a
    /// publisher over its rate costs as little as possible.
    pub(crate) fn charge(
        &self,
        client: Client<'_>,
        count: usize,
    ) -> std::result::Result<(), ApiError> {
        self.inner
            .limits
            .publish(client.ip, client.principal, count)
    }

    /// The largest payload a client may publish, for readers that stop reading a body
    /// past it.
    pub(crate) fn max_message_size(&self) -> usize {
        self.inner.max_message_size
    }

    /// Validates a client's message: its event name, its idempotency key and its size.
    pub(crate) fn check(&self, message: &NewMessage) -> std::result::Result<(), ApiError> {
        check_message(message, self.inner.max_message_size)
    }

    /// A client's one message, through every check, to the channel: the answer is the
    /// message's id, or the error to show the client. Checks fail at once, before anything
    /// is queued; the returned future only waits for the channel.
    pub(crate) fn publish_one(
        &self,
        client: Client<'_>,
        channel: &str,
        message: NewMessage,
    ) -> std::result::Result<Reply, ApiError> {
        self.authorize(client, channel)?;
        self.charge(client, 1)?;
        self.check(&message)?;
        Ok(self.publish(channel, vec![message]))
    }

    /// Publishes `messages` to `channel`, in order, after every message handed to this
    /// publisher for the same channel before; resolves with one result per message once
    /// the channel has stored them (durably, under `always`). The work goes on if the
    /// returned future is dropped: the messages may still be published.
    ///
    /// This is the trusted way in, for the server's own code (an object feeding a channel);
    /// a client's messages pass the publisher's checks (grant, rate, validation) first.
    pub fn publish(&self, channel: &str, messages: Vec<NewMessage>) -> Reply {
        let (reply, answer) = oneshot::channel();
        let bytes = messages.iter().map(|m| m.data.len()).sum();
        let name = self.enqueue(
            channel,
            Waiting::Publish {
                messages,
                bytes,
                reply,
            },
        );
        Reply { answer, name }
    }

    /// Sends `request` (a read such as `Info` or `History`, a delete) to `channel` after
    /// every publish handed to this publisher for the same channel before, so the server's
    /// own code reads what it published. A call straight to the namespace could overtake
    /// publishes still waiting here.
    pub fn call(&self, channel: &str, request: ChannelRequest) -> Reply<ChannelResponse> {
        let (reply, answer) = oneshot::channel();
        let name = self.enqueue(channel, Waiting::Call { request, reply });
        Reply { answer, name }
    }

    /// Queues `waiting` behind the channel's call in flight, or starts a driver for it.
    fn enqueue(&self, channel: &str, waiting: Waiting) -> Arc<str> {
        let name: Arc<str> = Arc::from(channel);
        let start = {
            let mut lanes = self.inner.shard(&name);
            match lanes.get_mut(&name) {
                // A call is in flight: its driver takes this one next.
                Some(queue) => {
                    queue.push_back(waiting);
                    false
                }
                None => {
                    lanes.insert(name.clone(), VecDeque::from([waiting]));
                    true
                }
            }
        };
        if start {
            // A task of its own, so that a caller that goes away (a client hanging up)
            // cannot leave the channel's queue without a driver.
            tokio::spawn(drive(self.inner.clone(), name.clone()));
        }
        name
    }
}

/// [`Publisher::check`] with the size limit given, for the batch parser, which the fuzz
/// target drives without a server.
pub(crate) fn check_message(
    message: &NewMessage,
    max_message_size: usize,
) -> std::result::Result<(), ApiError> {
    check_names(message.event.as_deref(), message.idempotency_key.as_deref())?;
    if message.data.len() > max_message_size {
        return Err(ApiError::too_large(format!(
            "the message is larger than the limit of {max_message_size} bytes"
        )));
    }
    Ok(())
}

/// Validates an optional event name and idempotency key: the part of [`Publisher::check`]
/// that needs no payload, for readers that check the names before reading a body.
pub(crate) fn check_names(
    event: Option<&str>,
    key: Option<&str>,
) -> std::result::Result<(), ApiError> {
    if let Some(event) = event {
        validate_event_name(event).map_err(|m| ApiError::bad_request("bad_event_name", m))?;
    }
    if let Some(key) = key {
        validate_idempotency_key(key)
            .map_err(|m| ApiError::bad_request("bad_idempotency_key", m))?;
    }
    Ok(())
}

/// The answer to one publish (one result per message, once the channel stored them) or to
/// one call. A named future (not an `async` block) so a connection can keep its publishes'
/// answers in order without a task each.
#[derive(Debug)]
pub struct Reply<T = Vec<Published>> {
    answer: oneshot::Receiver<Result<T>>,
    name: Arc<str>,
}

impl<T> Future for Reply<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| answer.unwrap_or_else(|_| Err(Error::Unavailable(self.name.to_string()))))
    }
}

impl Inner {
    /// Sends `request` to the channel: its activation here, or in cluster mode wherever
    /// the channel is owned (a subscriber goes to this node's copy of it).
    fn call(
        &self,
        name: &str,
        request: ChannelRequest,
    ) -> futures::future::BoxFuture<'static, Result<ChannelResponse>> {
        let Some(cluster) = &self.cluster else {
            return Box::pin(self.channels.call(name, request));
        };
        let (cluster, channels, name) = (cluster.clone(), self.channels.clone(), name.to_string());
        Box::pin(async move {
            match ChannelCall::from_request(request) {
                Ok(call) => cluster.channel_call(&channels, &name, call).await,
                Err(ChannelRequest::Subscribe { socket, start }) => {
                    cluster.subscribe(&name, socket, start).await
                }
                Err(other) => cluster.copy_call(&name, other).await,
            }
        })
    }

    fn shard(&self, name: &str) -> MutexGuard<'_, HashMap<Arc<str>, VecDeque<Waiting>>> {
        let mut hasher = DefaultHasher::new();
        name.hash(&mut hasher);
        let shard = &self.shards[hasher.finish() as usize % SHARDS];
        // Nothing panics while holding a shard's lock.
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the next merged call's worth of waiting publishes, or the one other call at
    /// the front. With none waiting and
    /// `retire` set (no call of the driver's in flight), removes the channel's queue, under
    /// the lock: a publish either lands in a batch this driver takes or finds no queue and
    /// starts a new driver.
    fn next_batch(&self, name: &Arc<str>, retire: bool) -> Vec<Waiting> {
        let mut lanes = self.shard(name);
        let Some(queue) = lanes.get_mut(name) else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let (mut messages, mut bytes) = (0, 0);
        while let Some(next) = queue.front() {
            let fits = match next {
                Waiting::Publish {
                    messages: more,
                    bytes: size,
                    ..
                } => {
                    let fits = batch.is_empty()
                        || (messages + more.len() <= MAX_MESSAGES && bytes + size <= MAX_BYTES);
                    messages += more.len();
                    bytes += size;
                    fits
                }
                // A call goes alone: it ends a batch of publishes, or is one.
                Waiting::Call { .. } => {
                    if batch.is_empty() {
                        batch.extend(queue.pop_front());
                    }
                    break;
                }
            };
            if !fits {
                break;
            }
            batch.extend(queue.pop_front());
        }
        if batch.is_empty() && retire {
            lanes.remove(name);
        }
        batch
    }
}

/// Calls a driver keeps in flight per channel. Two: while one waits for its commit, the
/// next is already appended and joins the following group commit, as separate calls
/// would; a third would only split the publishes waiting behind them into smaller calls.
const DEPTH: usize = 2;

/// One call on its way, and whom to answer.
struct InFlight {
    response: futures::future::BoxFuture<'static, Result<ChannelResponse>>,
    answer: Answer,
}

/// Whom a call in flight answers.
enum Answer {
    /// The callers merged into one publish, each with how many of its messages it sent.
    Publishes {
        replies: Vec<(oneshot::Sender<Result<Vec<Published>>>, usize)>,
        messages: usize,
    },
    /// The one caller of another request.
    Call(oneshot::Sender<Result<ChannelResponse>>),
}

impl InFlight {
    /// Sends `batch` as one call. The channel's mailbox takes it now, so calls keep the
    /// order in which they were sent.
    fn send(inner: &Inner, name: &str, batch: Vec<Waiting>) -> Self {
        let mut replies = Vec::with_capacity(batch.len());
        let mut messages = Vec::new();
        for waiting in batch {
            match waiting {
                Waiting::Publish {
                    messages: more,
                    reply,
                    ..
                } => {
                    replies.push((reply, more.len()));
                    messages.extend(more);
                }
                // `next_batch` hands a call over alone.
                Waiting::Call { request, reply } => {
                    return Self {
                        response: inner.call(name, request),
                        answer: Answer::Call(reply),
                    };
                }
            }
        }
        let count = messages.len();
        Self {
            response: inner.call(name, ChannelRequest::Publish(messages)),
            answer: Answer::Publishes {
                replies,
                messages: count,
            },
        }
    }

    /// Waits for the channel's answer and hands each caller its part of it.
    async fn finish(self, name: &str) {
        let response = self.response.await;
        let (replies, messages) = match self.answer {
            Answer::Call(reply) => {
                // A caller that went away no longer needs the answer.
                let _ = reply.send(response);
                return;
            }
            Answer::Publishes { replies, messages } => (replies, messages),
        };
        let outcome = match response {
            Ok(ChannelResponse::Published(results)) if results.len() == messages => Ok(results),
            Ok(_) => Err(Error::Handler {
                id: name.to_string(),
                message: "the channel answered a publish with something else".into(),
            }),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(results) => {
                let mut results = results.into_iter();
                for (reply, count) in replies {
                    // A caller that went away no longer needs its ids.
                    let _ = reply.send(Ok(results.by_ref().take(count).collect()));
                }
            }
            Err(e) => {
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Sends the channel's waiting publishes, merged, at most [`DEPTH`] calls at a time, until
/// none wait and none are in flight.
async fn drive(inner: Arc<Inner>, name: Arc<str>) {
    let guard = Driving {
        inner: &inner,
        name: &name,
        done: false,
    };
    let mut in_flight = VecDeque::with_capacity(DEPTH);
    loop {
        while in_flight.len() < DEPTH {
            let batch = inner.next_batch(&name, in_flight.is_empty());
            if batch.is_empty() {
                break;
            }
            in_flight.push_back(InFlight::send(&inner, &name, batch));
        }
        let Some(oldest) = in_flight.pop_front() else {
            // Nothing waited and nothing was in flight: the queue is gone.
            guard.finished();
            return;
        };
        oldest.finish(&name).await;
    }
}

/// Removes the channel's queue if its driver ends without emptying it (a panic, or its
/// runtime shutting down), so the next publish starts a new driver instead of waiting
/// forever behind one that is gone. The callers still queued get `Unavailable` (their
/// reply senders are dropped with the queue).
struct Driving<'a> {
    inner: &'a Inner,
    name: &'a Arc<str>,
    done: bool,
}

impl Driving<'_> {
    fn finished(mut self) {
        self.done = true;
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.shard(self.name).remove(self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use dormouse_actors::ChannelEnv;
    use dormouse_runtime::{NamespaceConfig, Runtime};
    use dormouse_storage::MemoryStorage;

    use super::*;

    fn publisher() -> Publisher {
        let runtime = Runtime::new(Arc::new(MemoryStorage::new()));
        Publisher::new(
            runtime.namespace::<Channel>(
                "channel",
                NamespaceConfig::with_idle_timeout(Duration::from_secs(30)),
                ChannelEnv::default(),
            ),
            None,
            Arc::new(Limits::new(&crate::config::LimitsSettings::default())),
            1 << 20,
        )
    }

    fn message(len: usize) -> NewMessage {
        NewMessage {
            event: None,
            data: Bytes::from(vec![b'x'; len]),
            idempotency_key: None,
        }
    }

    /// Queues a caller's messages as a publish that finds a call in flight would.
    fn queue(publisher: &Publisher, name: &Arc<str>, messages: Vec<NewMessage>) {
        let (reply, _) = oneshot::channel();
        let bytes = messages.iter().map(|m| m.data.len()).sum();
        publisher
            .inner
            .shard(name)
            .entry(name.clone())
            .or_default()
            .push_back(Waiting::Publish {
                messages,
                bytes,
                reply,
            });
    }

    #[tokio::test]
    async fn merged_calls_stay_within_their_bounds_and_never_split_a_caller() {
        let publisher = publisher();
        let name: Arc<str> = Arc::from("bounded");
        let sizes = |batch: Vec<Waiting>| -> Vec<usize> {
            batch
                .iter()
                .map(|w| match w {
                    Waiting::Publish { messages, .. } => messages.len(),
                    Waiting::Call { .. } => 0,
                })
                .collect()
        };
        // By count: 300 + 200 fit, the next 100 would not.
        for n in [300, 200, 100] {
            queue(&publisher, &name, (0..n).map(|_| message(1)).collect());
        }
        assert_eq!(sizes(publisher.inner.next_batch(&name, false)), [300, 200]);
        assert_eq!(sizes(publisher.inner.next_batch(&name, false)), [100]);
        // By bytes: a publish larger than the bound goes, alone.
        queue(&publisher, &name, vec![message(MAX_BYTES + 1)]);
        queue(&publisher, &name, vec![message(1)]);
        assert_eq!(sizes(publisher.inner.next_batch(&name, false)), [1]);
        assert_eq!(sizes(publisher.inner.next_batch(&name, false)), [1]);
        // Nothing waits: the queue stays while a call is in flight, goes when none is.
        assert!(publisher.inner.next_batch(&name, false).is_empty());
        assert!(publisher.inner.shard(&name).contains_key(&name));
        assert!(publisher.inner.next_batch(&name, true).is_empty());
        assert!(!publisher.inner.shard(&name).contains_key(&name));
    }

    #[tokio::test]
    async fn a_call_goes_alone_after_the_publishes_queued_before_it() {
        let publisher = publisher();
        let name: Arc<str> = Arc::from("ordered");
        queue(&publisher, &name, vec![message(1)]);
        queue(&publisher, &name, vec![message(1)]);
        let (reply, _) = oneshot::channel();
        publisher
            .inner
            .shard(&name)
            .get_mut(&name)
            .expect("queue")
            .push_back(Waiting::Call {
                request: ChannelRequest::Info,
                reply,
            });
        queue(&publisher, &name, vec![message(1)]);
        let kinds = |batch: Vec<Waiting>| -> Vec<&'static str> {
            batch
                .iter()
                .map(|w| match w {
                    Waiting::Publish { .. } => "publish",
                    Waiting::Call { .. } => "call",
                })
                .collect()
        };
        assert_eq!(
            kinds(publisher.inner.next_batch(&name, false)),
            ["publish", "publish"]
        );
        assert_eq!(kinds(publisher.inner.next_batch(&name, false)), ["call"]);
        assert_eq!(kinds(publisher.inner.next_batch(&name, false)), ["publish"]);

        // Through the driver: a read sent right after publishes (not awaited) sees them.
        let published: Vec<Reply> = (0..20)
            .map(|_| publisher.publish("seen", vec![message(2)]))
            .collect();
        let info = publisher.call("seen", ChannelRequest::Info).await;
        match info {
            Ok(ChannelResponse::Info(info)) => assert_eq!(info.events, 20, "{info:?}"),
            other => panic!("expected info, got {other:?}"),
        }
        for reply in published {
            reply.await.expect("published");
        }
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_leaves_the_channel_working() {
        let publisher = publisher();
        // Dropped before it was ever polled: its message is still published, and the
        // channel's queue does not wait for a driver that never comes.
        drop(publisher.publish("left", vec![message(3)]));
        let ids = publisher
            .publish("left", vec![message(3), message(3)])
            .await
            .expect("published");
        assert_eq!(ids.len(), 2);
        assert!(
            ids[0].id.ends_with("-2") && ids[1].id.ends_with("-3"),
            "{ids:?}"
        );
    }
}
