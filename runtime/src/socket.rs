//! Sockets: the runtime's handle on a client connection, which outlives the activation that
//! accepted it.
//!
//! The gateway owns the real connection (an SSE response or a WebSocket) and runs one task
//! per connection that drains a [`SocketReceiver`]. The object only ever holds a [`Socket`],
//! the sending half: a byte-bounded queue plus a small attachment. When the object
//! hibernates, the runtime parks its sockets (a few hundred bytes each) and hands them back on
//! wake, so clients stay connected while the object costs no memory of its own. Keep-alives
//! are the connection task's job, so idle clients never wake anything.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use futures::task::AtomicWaker;

/// How the client is connected; decides which encoding of an event an object sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A `text/event-stream` response: frames are SSE-encoded text.
    Sse,
    /// An event stream of several channels (`GET /v1/events?channel=a&channel=b`): each
    /// event's data names its channel and id, and the connection writes, as the event's
    /// `id:`, one cursor holding every channel's position.
    SseMulti,
    /// A WebSocket: frames are WebSocket messages.
    WebSocket,
    /// A WebSocket whose client asked for events as binary frames (a small header, then the
    /// payload as published) instead of JSON text, which would carry bytes as base64.
    WebSocketBinary,
}

impl Transport {
    /// True for both kinds of WebSocket.
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::WebSocket | Self::WebSocketBinary)
    }
}

/// One unit of output for a connection. Payloads are `Bytes` so an event encoded once is
/// shared by every subscriber's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// For SSE, an already-encoded frame; for WebSocket, a text message (valid UTF-8).
    Text(Bytes),
    /// A binary WebSocket message (never used for SSE).
    Binary(Bytes),
    /// Close the connection after what is queued, with a reason for the client.
    Close {
        /// WebSocket close code (SSE ignores it).
        code: u16,
        /// Human-readable reason.
        reason: String,
    },
}

/// Why a slow consumer's connection was closed, as its client reads it.
const SLOW_CONSUMER_REASON: &str = "slow consumer: reconnect with your last event id";

impl Outbound {
    /// The close code of a socket cut off because its queue overflowed (a slow consumer):
    /// WebSocket's "policy violation", which clients know as "reconnect, and resume". A
    /// connection that sees it counts a slow disconnect; SSE says `slow_consumer`.
    pub const SLOW_CONSUMER: u16 = 1008;

    fn cost(&self) -> usize {
        match self {
            Self::Text(b) | Self::Binary(b) => b.len(),
            Self::Close { reason, .. } => reason.len(),
        }
    }
}

/// A message a client sent on a WebSocket, for [`crate::Object::socket_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Bytes),
}

/// What happened to a [`Socket::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for the connection.
    Queued,
    /// The client is gone; the socket should be dropped.
    Closed,
    /// The client is too slow: its queue would exceed its byte bound, so the socket was
    /// marked overflowed and the connection will end after what it already has, telling the
    /// client to resume from its last id. Nothing is buffered beyond the bound.
    Overflowed,
}

static NEXT_SOCKET_ID: AtomicU64 = AtomicU64::new(1);

/// State shared by a socket and its receiver. Holds no sender: the receiver keeps an `Inner`,
/// and a sender in here would keep the queue open after every [`Socket`] is gone.
struct Inner {
    id: u64,
    transport: Transport,
    /// Bytes queued and not yet taken by the connection task.
    queued: AtomicUsize,
    /// The bound on `queued`; beyond it the client is cut off rather than buffered.
    max_queued: usize,
    overflowed: AtomicBool,
    /// The outbound queue. A plain deque plus a waker rather than a tokio channel: an
    /// idle connection's empty deque allocates nothing, where a channel preallocates a
    /// block of slots (about 2 KB) for every connection. Each message carries the instant
    /// its cause was accepted, when the sender gave one (see [`Socket::send_stamped`]).
    queue: Mutex<VecDeque<(Outbound, Option<Instant>)>>,
    /// Wakes the receiver on a new message or when the last sender goes. An `AtomicWaker`
    /// (one swap to wake, one to register) rather than tokio's `Notify`, whose waiter list
    /// sits behind a mutex: there is only ever one receiver.
    waker: AtomicWaker,
    /// Live `Socket` handles; at zero the receiver sees the end of the stream.
    senders: AtomicUsize,
    /// Cleared when the connection task drops its receiver (the client is gone).
    receiver_alive: AtomicBool,
    /// Small per-connection state the object keeps across hibernation (a user name, a
    /// subscription filter): the equivalent of a hibernatable WebSocket's attachment; and
    /// what runs once the receiver goes (see [`Socket::when_closed`]). One lock for both:
    /// a lock of its own would take this struct past a size class of the allocator, which
    /// every idle connection would pay (measured: about 370 bytes per WebSocket with it).
    kept: Mutex<Kept>,
    /// Set by a connection that writes released messages itself (see [`WriteOnRelease`]).
    on_release: OnceLock<Arc<dyn WriteOnRelease>>,
}

/// A connection that can write its socket's messages on the thread that released them.
///
/// Messages released together (a group commit's events, in one pass of the output gate)
/// normally wake the connection's task, which then writes them: under fan-out to a thousand
/// subscribers that is a thousand task wake-ups, polls and hand-offs between cores per
/// group. A connection that registers a `WriteOnRelease` ([`SocketReceiver::write_on_release`]) is
/// offered the messages first, on the releasing thread, when the batch ends; it writes what
/// the socket takes without blocking, and only when it cannot (its task is writing, the
/// socket is full, a close is queued) is the task woken as before.
pub trait WriteOnRelease: Send + Sync {
    /// Writes what it can of `queued` now, without blocking; true if the connection's task
    /// need not be woken (everything queued was written or handed to the socket).
    fn write_released(&self, queued: Queued<'_>) -> bool;
}

/// A socket's queue, as a [`WriteOnRelease`] sees it.
#[derive(Debug)]
pub struct Queued<'a> {
    inner: &'a Inner,
}

impl Queued<'_> {
    /// Moves queued messages into `into` as [`SocketReceiver::try_recv_many`] does, but
    /// stops before a close: ending the connection is the connection task's job.
    pub fn take(
        &self,
        into: &mut Vec<(Outbound, Option<Instant>)>,
        max_messages: usize,
        max_bytes: usize,
    ) -> usize {
        self.inner.take(into, max_messages, max_bytes, false)
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.lock_queue().is_empty()
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner").field("id", &self.id).finish()
    }
}

/// What runs when a socket's client is gone, each under the key it was registered with.
type Watchers = Vec<(Box<str>, Box<dyn FnOnce() + Send>)>;

/// What a socket keeps under its small lock.
struct Kept {
    attachment: Bytes,
    /// Boxed, so a connection nobody watches pays one pointer.
    on_close: Option<Box<Watchers>>,
}

/// The object's side of a client connection. Cheap to clone; clones are the same socket.
/// The receiver sees the end of the stream once the last clone is dropped.
pub struct Socket {
    inner: Arc<Inner>,
    /// This handle's object hears of the close as an event (`Object::socket_close`), so the
    /// runtime must not drop the handle silently when it sees it closed. Per handle: one
    /// connection following several objects (channels) may report its close to some of
    /// them only.
    close_reported: bool,
}

impl Clone for Socket {
    fn clone(&self) -> Self {
        self.inner.senders.fetch_add(1, Ordering::AcqRel);
        Self {
            inner: self.inner.clone(),
            close_reported: self.close_reported,
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.inner.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.waker.wake();
        }
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("id", &self.inner.id)
            .field("transport", &self.inner.transport)
            .field("queued", &self.inner.queued.load(Ordering::Relaxed))
            .finish()
    }
}

/// The connection task's side: yields what the object sent, in order.
pub struct SocketReceiver {
    inner: Arc<Inner>,
}

impl Drop for SocketReceiver {
    fn drop(&mut self) {
        self.inner.receiver_alive.store(false, Ordering::Release);
        // Nobody will read what is queued: free it now, not when the last Socket goes.
        let dropped: Vec<(Outbound, Option<Instant>)> = self.inner.lock_queue().drain(..).collect();
        let bytes: usize = dropped.iter().map(|(message, _)| message.cost()).sum();
        self.inner.queued.fetch_sub(bytes, Ordering::AcqRel);
        // Taken under the lock after `receiver_alive` went false: a watcher registered
        // meanwhile either is in this list or saw the socket closed and ran itself.
        let watchers = self.inner.lock_kept().on_close.take();
        for (_, watcher) in watchers.into_iter().flat_map(|w| *w) {
            watcher();
        }
    }
}

impl Inner {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(Outbound, Option<Instant>)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pops one message and accounts for it.
    fn pop(&self) -> Option<(Outbound, Option<Instant>)> {
        let (message, stamp) = self.lock_queue().pop_front()?;
        self.queued.fetch_sub(message.cost(), Ordering::AcqRel);
        Some((message, stamp))
    }

    /// Ready with what `look` finds, else registers `cx` and looks again: a push or a last
    /// drop between the first look and the registration woke nobody, and is seen by the
    /// second look instead.
    fn poll_until<T>(
        &self,
        cx: &mut std::task::Context<'_>,
        look: impl Fn() -> Option<T>,
    ) -> Poll<T> {
        if let Some(outcome) = look() {
            return Poll::Ready(outcome);
        }
        self.waker.register(cx.waker());
        match look() {
            Some(outcome) => Poll::Ready(outcome),
            None => Poll::Pending,
        }
    }

    /// Moves queued messages into `into` under one lock; see
    /// [`SocketReceiver::try_recv_many`].
    fn take(
        &self,
        into: &mut Vec<(Outbound, Option<Instant>)>,
        max_messages: usize,
        max_bytes: usize,
        with_close: bool,
    ) -> usize {
        let mut moved = 0;
        let mut bytes = 0;
        {
            let mut queue = self.lock_queue();
            while into.len() < max_messages && bytes < max_bytes {
                if !with_close && matches!(queue.front(), Some((Outbound::Close { .. }, _))) {
                    break;
                }
                let Some(item) = queue.pop_front() else { break };
                bytes += item.0.cost();
                into.push(item);
                moved += 1;
            }
        }
        if bytes > 0 {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
        }
        moved
    }

    /// Queues a message unless the receiver is gone.
    ///
    /// Only a push into an empty queue wakes the receiver: a receiver waits only after it
    /// found the queue empty, so while anything is queued it will come back for more
    /// without being told. Inside a [`WakeBatch`] on this thread the wake is held until the
    /// batch ends.
    fn push(self: &Arc<Self>, message: Outbound, stamp: Option<Instant>) -> bool {
        if !self.receiver_alive.load(Ordering::Acquire) {
            return false;
        }
        let was_empty = {
            let mut queue = self.lock_queue();
            queue.push_back((message, stamp));
            queue.len() == 1
        };
        if was_empty && !WakeBatch::defer(self) {
            self.waker.wake();
        }
        true
    }
}

thread_local! {
    /// What to do for each fed socket when the outermost [`WakeBatch`] on this thread ends;
    /// `None` when no batch is open.
    static DEFERRED_WAKES: RefCell<Option<Vec<Deferred>>> = const { RefCell::new(None) };
}

/// A fed socket, at the end of a [`WakeBatch`].
enum Deferred {
    /// Wake its receiver. The waker is taken out of the receiver's slot at once (no
    /// reference to the socket is held): a receiver that looks at its queue before the
    /// batch ends finds the message, and the wake it then gets is a spare one.
    Wake(Waker),
    /// Offer its queue to its [`WriteOnRelease`], and wake the receiver if that declines.
    Offer(Arc<Inner>),
}

/// Holds back the wake-ups of sockets fed on this thread until it is dropped.
///
/// The output gate releases every handler whose commit is already durable inside one batch.
/// Without it, the first event of a group commit would wake each subscriber's connection
/// task, and a task running on another worker would write that event alone before the next
/// one is queued: one socket write per event per subscriber. With it, each connection is
/// woken once and writes the whole group in one flush. Nothing may `.await` while a batch
/// is open: the batch belongs to the thread, not the task.
pub(crate) struct WakeBatch {
    /// Only the outermost batch wakes; nested ones are no-ops.
    outermost: bool,
}

impl WakeBatch {
    pub(crate) fn begin() -> Self {
        let outermost = DEFERRED_WAKES.with(|d| {
            let mut d = d.borrow_mut();
            let outermost = d.is_none();
            if outermost {
                *d = Some(Vec::new());
            }
            outermost
        });
        Self { outermost }
    }

    /// Arranges for `inner` to be written or woken at the end of the open batch; false
    /// when none is open.
    fn defer(inner: &Arc<Inner>) -> bool {
        DEFERRED_WAKES.with(|d| match d.borrow_mut().as_mut() {
            Some(pending) => {
                if inner.on_release.get().is_some() {
                    pending.push(Deferred::Offer(Arc::clone(inner)));
                } else if let Some(waker) = inner.waker.take() {
                    // None: the receiver is not waiting, and looks at its queue before it
                    // does.
                    pending.push(Deferred::Wake(waker));
                }
                true
            }
            None => false,
        })
    }
}

impl Drop for WakeBatch {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        let pending = DEFERRED_WAKES
            .with(|d| d.borrow_mut().take())
            .unwrap_or_default();
        let mut offers = Vec::new();
        for deferred in pending {
            match deferred {
                Deferred::Wake(waker) => waker.wake(),
                Deferred::Offer(inner) => offers.push(inner),
            }
        }
        // Writing to a thousand sockets takes a few milliseconds on one thread; the other
        // workers take a share each, so a group reaches every subscriber about as fast as
        // when each connection's task wrote its own.
        let workers = tokio::runtime::Handle::try_current()
            .map(|handle| handle.metrics().num_workers())
            .unwrap_or(1);
        let parts = workers.min(offers.len() / OFFERS_PER_PART).max(1);
        if parts == 1 {
            offer_all(&offers);
            return;
        }
        // Every share is spawned, this thread's too. A task spawned on a worker goes to
        // that worker's LIFO slot, which other workers cannot steal from: one helper spawned
        // beside an inline share would wait there until this thread had written its own
        // share, and the two would run one after the other. Each later spawn pushes the one
        // before into the stealable run queue and wakes an idle worker.
        //
        // A share yields before writing and after every `WRITES_PER_TURN` sockets, so
        // the tasks the fan-out would otherwise hold up for milliseconds run in between:
        // the publisher's reply (woken by this same release), the next publish's request
        // and the channel that handles it. An acknowledgement that waits behind the
        // fan-out holds its publisher back; acknowledged sooner, the next messages are
        // queued while this pass is still writing, and the sockets it has not reached yet
        // take them in the same write, so under load each write carries more messages.
        let share = offers.len().div_ceil(parts);
        while !offers.is_empty() {
            let rest = offers.split_off(share.min(offers.len()));
            let part = std::mem::replace(&mut offers, rest);
            tokio::spawn(async move {
                for chunk in part.chunks(WRITES_PER_TURN) {
                    tokio::task::yield_now().await;
                    offer_all(chunk);
                }
            });
        }
    }
}

/// Fewest direct writes worth handing to another worker.
const OFFERS_PER_PART: usize = 64;

/// Direct writes a share makes before it lets other ready tasks run.
const WRITES_PER_TURN: usize = 64;

/// Offers each socket's queue to its [`WriteOnRelease`]; wakes the receiver of each that
/// declines.
fn offer_all(offers: &[Arc<Inner>]) {
    for inner in offers {
        let written = inner
            .on_release
            .get()
            .is_some_and(|writer| writer.write_released(Queued { inner }));
        if !written {
            inner.waker.wake();
        }
    }
}

impl fmt::Debug for WakeBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WakeBatch")
            .field("outermost", &self.outermost)
            .finish()
    }
}

impl fmt::Debug for SocketReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketReceiver")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Socket {
    /// Creates a socket whose queue holds at most `max_queued_bytes` of payload, with an
    /// initial attachment.
    pub fn new(
        transport: Transport,
        max_queued_bytes: usize,
        attachment: Bytes,
    ) -> (Socket, SocketReceiver) {
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            senders: AtomicUsize::new(1),
            receiver_alive: AtomicBool::new(true),
            id: NEXT_SOCKET_ID.fetch_add(1, Ordering::Relaxed),
            transport,
            queued: AtomicUsize::new(0),
            max_queued: max_queued_bytes,
            overflowed: AtomicBool::new(false),
            kept: Mutex::new(Kept {
                attachment,
                on_close: None,
            }),
            on_release: OnceLock::new(),
        });
        (
            Socket {
                inner: inner.clone(),
                close_reported: false,
            },
            SocketReceiver { inner },
        )
    }

    /// Process-unique id, to find a socket in a list.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// How the client is connected.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// The attachment.
    pub fn attachment(&self) -> Bytes {
        self.inner.lock_kept().attachment.clone()
    }

    /// Replaces the attachment.
    pub fn set_attachment(&self, attachment: Bytes) {
        self.inner.lock_kept().attachment = attachment;
    }

    /// Declares that whoever owns the connection will deliver its close to the object this
    /// handle goes to, as an event; until then the handle stays in the object's list even
    /// once it reads as closed, so the object's `socket_close` (or whatever request reports
    /// it) sees it. (Channels' subscribers do not report closes, except on a channel with
    /// presence, which tells the others who left: leaving must not wake a hibernated
    /// channel, so they are pruned silently.) Clones of this handle report too; other
    /// handles on the same connection do not.
    pub fn set_close_reported(&mut self) {
        self.close_reported = true;
    }

    fn close_reported(&self) -> bool {
        self.close_reported
    }

    /// Runs `watcher` once the client is gone (its connection dropped the receiver: it
    /// left, or was cut off), or now if it already is: how whoever reports a close learns
    /// of it without holding the connection. A watcher registered under a `key` that has
    /// one already replaces it, so a connection that subscribes to the same channel again
    /// and again keeps one watcher for it. Watchers run on the thread that ends the
    /// connection, so they must be quick (spawn a task for anything more).
    pub fn when_closed(&self, key: &str, watcher: impl FnOnce() + Send + 'static) {
        {
            let mut kept = self.inner.lock_kept();
            if self.inner.receiver_alive.load(Ordering::Acquire) {
                let watchers = kept.on_close.get_or_insert_default();
                watchers.retain(|(k, _)| **k != *key);
                watchers.push((Box::from(key), Box::new(watcher)));
                return;
            }
        }
        watcher();
    }

    /// Drops the watcher registered under `key`, if any: its reason to run is gone (the
    /// connection stopped following the channel it would report to).
    pub fn forget_when_closed(&self, key: &str) {
        if let Some(watchers) = self.inner.lock_kept().on_close.as_mut() {
            watchers.retain(|(k, _)| **k != *key);
        }
    }

    /// True once the client went away or was cut off; such a socket can be dropped.
    pub fn is_closed(&self) -> bool {
        !self.inner.receiver_alive.load(Ordering::Acquire)
            || self.inner.overflowed.load(Ordering::Acquire)
    }

    /// Bytes waiting for the connection to write them.
    pub fn queued_bytes(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Queues `message` unless the client is gone or too far behind.
    pub fn send(&self, message: Outbound) -> SendOutcome {
        self.send_inner(message, None)
    }

    /// Like [`Socket::send`], with the instant the message's cause was accepted (a publish,
    /// say). The connection gets it back with the message ([`SocketReceiver::recv_stamped`]),
    /// so it can measure end-to-end latency at the moment it writes, without the payload
    /// carrying a timestamp.
    pub fn send_stamped(&self, message: Outbound, accepted: Instant) -> SendOutcome {
        self.send_inner(message, Some(accepted))
    }

    fn send_inner(&self, message: Outbound, stamp: Option<Instant>) -> SendOutcome {
        self.inner.send(message, stamp)
    }
}

impl Inner {
    fn send(self: &Arc<Self>, message: Outbound, stamp: Option<Instant>) -> SendOutcome {
        if self.overflowed.load(Ordering::Acquire) {
            return SendOutcome::Overflowed;
        }
        let cost = message.cost();
        let queued = self.queued.fetch_add(cost, Ordering::AcqRel) + cost;
        // One message larger than the whole bound is still let through when the queue is
        // empty, so a big event reaches a client that keeps up.
        if queued > self.max_queued && queued != cost {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            self.overflowed.store(true, Ordering::Release);
            let close = Outbound::Close {
                code: Outbound::SLOW_CONSUMER,
                reason: SLOW_CONSUMER_REASON.to_string(),
            };
            let cost = close.cost();
            // Accounted like any message, so taking it off the queue balances.
            self.queued.fetch_add(cost, Ordering::AcqRel);
            if !self.push(close, None) {
                self.queued.fetch_sub(cost, Ordering::AcqRel);
            }
            return SendOutcome::Overflowed;
        }
        if self.push(message, stamp) {
            SendOutcome::Queued
        } else {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            SendOutcome::Closed
        }
    }
}

impl SocketReceiver {
    /// The next message, or `None` when every [`Socket`] clone is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.recv_stamped().await.map(|(message, _)| message)
    }

    /// The next message with the instant its sender stamped it with
    /// ([`Socket::send_stamped`]), or `None` when every [`Socket`] clone is gone.
    pub async fn recv_stamped(&mut self) -> Option<(Outbound, Option<Instant>)> {
        let inner = &self.inner;
        std::future::poll_fn(|cx| {
            inner.poll_until(cx, || {
                if let Some(message) = inner.pop() {
                    return Some(Some(message));
                }
                // No sender left: a push may have raced the last drop, so drain it before
                // ending.
                (inner.senders.load(Ordering::Acquire) == 0).then(|| inner.pop())
            })
        })
        .await
    }

    /// A message if one is ready now; lets a connection batch writes before one flush.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.inner.pop().map(|(message, _)| message)
    }

    /// [`SocketReceiver::try_recv`] with the message's stamp, as in
    /// [`SocketReceiver::recv_stamped`].
    pub fn try_recv_stamped(&mut self) -> Option<(Outbound, Option<Instant>)> {
        self.inner.pop()
    }

    /// Moves queued messages, with their stamps, into `into` under one lock, until `into`
    /// holds `max_messages` or the moved payloads reach `max_bytes`; returns how many moved.
    /// A connection woken for a group of messages takes them in one step rather than one
    /// lock per message.
    pub fn try_recv_many(
        &mut self,
        into: &mut Vec<(Outbound, Option<Instant>)>,
        max_messages: usize,
        max_bytes: usize,
    ) -> usize {
        self.inner.take(into, max_messages, max_bytes, true)
    }

    /// Lets `writer` write this socket's released messages itself (see [`WriteOnRelease`]);
    /// a socket takes one, for its life.
    pub fn write_on_release(&self, writer: Arc<dyn WriteOnRelease>) {
        let _ = self.inner.on_release.set(writer);
    }

    /// Waits until a message is queued, without taking it; false once every [`Socket`]
    /// clone is gone and nothing is left. For a connection that takes its messages
    /// together with a lock of its own ([`SocketReceiver::try_recv_many`]).
    pub async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// [`SocketReceiver::ready`] as a poll. When pending, `cx` is registered: it is woken
    /// by the next message, by the last sender leaving, and by a [`WriteOnRelease`] that
    /// declines an offer (which lets a connection notice work of its own, such as bytes a
    /// socket did not take, by checking after this returns pending).
    pub fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        let inner = &self.inner;
        inner.poll_until(cx, || {
            if !inner.lock_queue().is_empty() {
                return Some(true);
            }
            // No sender left: a push may have raced the last drop, so look again.
            (inner.senders.load(Ordering::Acquire) == 0).then(|| !inner.lock_queue().is_empty())
        })
    }

    /// True if the object cut this connection off as a slow consumer.
    pub fn overflowed(&self) -> bool {
        self.inner.overflowed.load(Ordering::Acquire)
    }

    /// The socket's id, the same as [`Socket::id`].
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Another handle on this connection, to be accepted by another object (one client
    /// following several channels on one connection): same id, same queue, and it keeps
    /// the connection open like the first. `None` once every handle is gone (the stream is
    /// ending).
    pub fn socket(&self) -> Option<Socket> {
        self.inner
            .senders
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n + 1)
            })
            .ok()
            .map(|_| Socket {
                inner: self.inner.clone(),
                close_reported: false,
            })
    }

    /// A way in for the server itself, beside the object's: the gateway's connection table
    /// keeps one per connection so a backend can send to, or close, that one client.
    pub fn outlet(&self) -> Outlet {
        Outlet {
            inner: self.inner.clone(),
        }
    }
}

/// Queues messages on a connection without being one of its object's [`Socket`]s: it does
/// not keep the connection open (the object letting go still ends it), and it shares the
/// queue's byte bound, so a backend's sends and the object's events cut off a slow client
/// alike. Messages join the queue behind whatever is already there.
#[derive(Clone)]
pub struct Outlet {
    inner: Arc<Inner>,
}

impl Outlet {
    /// Queues `message` unless the client is gone or too far behind.
    pub fn send(&self, message: Outbound) -> SendOutcome {
        self.inner.send(message, None)
    }

    /// True once the client went away or was cut off.
    pub fn is_closed(&self) -> bool {
        !self.inner.receiver_alive.load(Ordering::Acquire)
            || self.inner.overflowed.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Outlet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outlet")
            .field("id", &self.inner.id)
            .finish()
    }
}

/// An object's sockets: copy-on-write, so a fan-out effect can hold a snapshot while the
/// object accepts or drops sockets for the next request.
#[derive(Debug, Clone, Default)]
pub struct Sockets {
    list: Arc<Vec<Socket>>,
}

impl Sockets {
    /// The sockets, as a cheap snapshot.
    pub fn snapshot(&self) -> Arc<Vec<Socket>> {
        self.list.clone()
    }

    /// Number of sockets, including any whose client left since the last prune.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Sockets whose client is still there.
    pub fn live(&self) -> usize {
        self.list.iter().filter(|s| !s.is_closed()).count()
    }

    pub(crate) fn add(&mut self, socket: Socket) {
        Arc::make_mut(&mut self.list).push(socket);
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<Socket> {
        let index = self.list.iter().position(|s| s.id() == id)?;
        Some(Arc::make_mut(&mut self.list).remove(index))
    }

    /// Drops closed sockets whose close is not reported as an event; returns how many went.
    pub(crate) fn prune(&mut self) -> usize {
        let prunable = |s: &Socket| s.is_closed() && !s.close_reported();
        if !self.list.iter().any(prunable) {
            return 0;
        }
        let list = Arc::make_mut(&mut self.list);
        let before = list.len();
        list.retain(|s| !prunable(s));
        before - list.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Outbound {
        Outbound::Text(Bytes::from(vec![b'x'; n]))
    }

    #[tokio::test]
    async fn a_slow_reader_is_cut_off_at_the_bound_not_buffered() {
        let (socket, mut rx) = Socket::new(Transport::Sse, 100, Bytes::new());
        assert_eq!(socket.send(text(60)), SendOutcome::Queued);
        assert_eq!(socket.send(text(30)), SendOutcome::Queued);
        assert_eq!(socket.queued_bytes(), 90);
        assert_eq!(socket.send(text(20)), SendOutcome::Overflowed);
        assert_eq!(socket.send(text(1)), SendOutcome::Overflowed);
        assert!(socket.is_closed());
        assert_eq!(rx.recv().await, Some(text(60)));
        assert_eq!(rx.recv().await, Some(text(30)));
        assert!(matches!(
            rx.recv().await,
            Some(Outbound::Close { code: 1008, .. })
        ));
        assert!(rx.overflowed());
        assert_eq!(socket.queued_bytes(), 0, "the accounting balances");
    }

    #[tokio::test]
    async fn one_message_larger_than_the_bound_passes_an_empty_queue() {
        let (socket, mut rx) = Socket::new(Transport::WebSocket, 10, Bytes::new());
        assert_eq!(socket.send(text(50)), SendOutcome::Queued);
        assert_eq!(rx.recv().await, Some(text(50)));
        assert_eq!(socket.queued_bytes(), 0);
    }

    #[test]
    fn a_dropped_receiver_closes_the_socket() {
        let (socket, rx) = Socket::new(Transport::Sse, 10, Bytes::from_static(b"a"));
        drop(rx);
        assert!(socket.is_closed());
        assert_eq!(socket.send(text(1)), SendOutcome::Closed);
        assert_eq!(socket.attachment(), Bytes::from_static(b"a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_receiver_ends_when_every_socket_is_dropped() {
        let (socket, mut rx) = Socket::new(Transport::Sse, 10, Bytes::new());
        let clone = socket.clone();
        assert_eq!(socket.send(text(1)), SendOutcome::Queued);
        drop(socket);
        drop(clone);
        assert_eq!(rx.recv().await, Some(text(1)));
        let end = tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await;
        assert_eq!(end, Ok(None), "the stream must end, not hang");
    }

    #[tokio::test]
    async fn a_stamp_travels_with_its_message() {
        let (socket, mut rx) = Socket::new(Transport::Sse, 100, Bytes::new());
        let accepted = Instant::now();
        assert_eq!(socket.send_stamped(text(1), accepted), SendOutcome::Queued);
        assert_eq!(socket.send(text(2)), SendOutcome::Queued);
        assert_eq!(rx.recv_stamped().await, Some((text(1), Some(accepted))));
        assert_eq!(rx.try_recv_stamped(), Some((text(2), None)));
        assert_eq!(socket.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn ready_waits_without_taking_and_ends_with_the_senders() {
        let (socket, mut rx) = Socket::new(Transport::WebSocket, 1000, Bytes::new());
        assert_eq!(socket.send(text(3)), SendOutcome::Queued);
        assert!(rx.ready().await);
        assert_eq!(socket.queued_bytes(), 3, "nothing taken");
        let mut taken = Vec::new();
        assert_eq!(rx.try_recv_many(&mut taken, 10, usize::MAX), 1);
        drop(socket);
        let end = tokio::time::timeout(std::time::Duration::from_secs(1), rx.ready()).await;
        assert_eq!(end, Ok(false), "no sender and nothing queued: the end");
    }

    #[test]
    fn many_are_taken_at_once_up_to_either_bound() {
        let (socket, mut rx) = Socket::new(Transport::WebSocket, 1000, Bytes::new());
        for n in 1..=6 {
            assert_eq!(socket.send(text(n)), SendOutcome::Queued);
        }
        let mut batch = Vec::new();
        assert_eq!(
            rx.try_recv_many(&mut batch, 2, usize::MAX),
            2,
            "count bound"
        );
        assert_eq!(rx.try_recv_many(&mut batch, 10, 3), 1, "byte bound: 3 >= 3");
        assert_eq!(socket.queued_bytes(), 4 + 5 + 6);
        assert_eq!(rx.try_recv_many(&mut batch, 10, usize::MAX), 3);
        let sizes: Vec<usize> = batch.iter().map(|(m, _)| m.cost()).collect();
        assert_eq!(sizes, [1, 2, 3, 4, 5, 6], "in order");
        assert_eq!(socket.queued_bytes(), 0, "the accounting balances");
        assert_eq!(rx.try_recv_many(&mut batch, 10, usize::MAX), 0);
    }

    /// Counts how often a task would have been woken.
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_batch_wakes_each_receiver_once_when_it_ends() {
        use std::future::Future;
        use std::task::{Context, Poll};

        let (socket, mut rx) = Socket::new(Transport::WebSocket, 1000, Bytes::new());
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        {
            let mut recv = Box::pin(rx.recv());
            assert!(recv.as_mut().poll(&mut cx).is_pending());
            let batch = WakeBatch::begin();
            let nested = WakeBatch::begin();
            for n in 1..=3 {
                assert_eq!(socket.send(text(n)), SendOutcome::Queued);
            }
            drop(nested);
            assert_eq!(
                counter.0.load(Ordering::SeqCst),
                0,
                "held while the batch is open"
            );
            drop(batch);
            assert_eq!(
                counter.0.load(Ordering::SeqCst),
                1,
                "one wake for three messages"
            );
            assert_eq!(recv.as_mut().poll(&mut cx), Poll::Ready(Some(text(1))));
        }
        assert_eq!(rx.try_recv(), Some(text(2)));
        assert_eq!(rx.try_recv(), Some(text(3)));
        assert_eq!(rx.try_recv(), None);
        // Outside a batch a push into the empty queue wakes at once.
        let mut recv = Box::pin(rx.recv());
        assert!(recv.as_mut().poll(&mut cx).is_pending());
        assert_eq!(socket.send(text(4)), SendOutcome::Queued);
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert_eq!(recv.as_mut().poll(&mut cx), Poll::Ready(Some(text(4))));
    }

    /// A `WriteOnRelease` that takes what it may (or declines) and counts its offers.
    struct Recorder {
        accept: bool,
        offers: AtomicUsize,
        taken: Mutex<Vec<usize>>,
    }

    impl WriteOnRelease for Recorder {
        fn write_released(&self, queued: Queued<'_>) -> bool {
            self.offers.fetch_add(1, Ordering::SeqCst);
            if self.accept {
                let mut taken = Vec::new();
                queued.take(&mut taken, 100, usize::MAX);
                let mut sizes = self.taken.lock().unwrap();
                sizes.extend(taken.iter().map(|(m, _)| m.cost()));
                // Done only if nothing is left (a close is never taken).
                return queued.is_empty();
            }
            false
        }
    }

    #[test]
    fn a_direct_writer_is_offered_the_batch_and_the_receiver_woken_only_if_it_declines() {
        use std::future::Future;

        for (accept, with_close) in [(true, false), (true, true), (false, true)] {
            let (socket, mut rx) = Socket::new(Transport::WebSocket, 1000, Bytes::new());
            let recorder = Arc::new(Recorder {
                accept,
                offers: AtomicUsize::new(0),
                taken: Mutex::new(Vec::new()),
            });
            rx.write_on_release(recorder.clone());
            let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
            let waker = std::task::Waker::from(counter.clone());
            let mut cx = std::task::Context::from_waker(&waker);
            let mut ready = Box::pin(rx.ready());
            assert!(ready.as_mut().poll(&mut cx).is_pending());
            {
                let _batch = WakeBatch::begin();
                assert_eq!(socket.send(text(1)), SendOutcome::Queued);
                assert_eq!(socket.send(text(2)), SendOutcome::Queued);
                if with_close {
                    // A close is left for the connection's task.
                    let close = Outbound::Close {
                        code: 1000,
                        reason: String::new(),
                    };
                    assert_eq!(socket.send(close), SendOutcome::Queued);
                }
            }
            assert_eq!(
                recorder.offers.load(Ordering::SeqCst),
                1,
                "one offer per batch"
            );
            if accept {
                assert_eq!(*recorder.taken.lock().unwrap(), [1, 2]);
                // Woken only for what the writer left: the close.
                let wakes = usize::from(with_close);
                assert_eq!(counter.0.load(Ordering::SeqCst), wakes);
            } else {
                assert!(recorder.taken.lock().unwrap().is_empty());
                assert_eq!(
                    counter.0.load(Ordering::SeqCst),
                    1,
                    "declined: the task is woken"
                );
            }
            drop(ready);
            let mut rest = Vec::new();
            rx.try_recv_many(&mut rest, 10, usize::MAX);
            let left = if accept { 0 } else { 2 } + usize::from(with_close);
            assert_eq!(rest.len(), left);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_split_between_workers_offers_every_socket_once() {
        // Enough sockets for the batch to be split into a share per worker, all spawned.
        let n = 4 * OFFERS_PER_PART + 7;
        let recorders: Vec<_> = (0..n)
            .map(|_| {
                Arc::new(Recorder {
                    accept: true,
                    offers: AtomicUsize::new(0),
                    taken: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let mut sockets = Vec::new();
        let mut receivers = Vec::new();
        for recorder in &recorders {
            let (socket, rx) = Socket::new(Transport::WebSocket, 1000, Bytes::new());
            rx.write_on_release(recorder.clone());
            sockets.push(socket);
            receivers.push(rx);
        }
        {
            let _batch = WakeBatch::begin();
            for (i, socket) in sockets.iter().enumerate() {
                assert_eq!(socket.send(text(i + 1)), SendOutcome::Queued);
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while recorders
            .iter()
            .any(|r| r.offers.load(Ordering::SeqCst) == 0)
        {
            assert!(std::time::Instant::now() < deadline, "offers never made");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        for (i, recorder) in recorders.iter().enumerate() {
            assert_eq!(recorder.offers.load(Ordering::SeqCst), 1, "socket {i}");
            assert_eq!(*recorder.taken.lock().unwrap(), [i + 1], "socket {i}");
        }
        let mut rest = Vec::new();
        for rx in &mut receivers {
            rx.try_recv_many(&mut rest, 10, usize::MAX);
        }
        assert!(rest.is_empty(), "every message was written directly");
    }

    #[test]
    fn snapshots_are_unaffected_by_later_changes() {
        let mut sockets = Sockets::default();
        let (a, _ra) = Socket::new(Transport::Sse, 10, Bytes::new());
        let (b, rb) = Socket::new(Transport::Sse, 10, Bytes::new());
        sockets.add(a.clone());
        sockets.add(b.clone());
        let snapshot = sockets.snapshot();
        drop(rb);
        assert_eq!(sockets.prune(), 1);
        assert_eq!(snapshot.len(), 2);
        assert_eq!(sockets.len(), 1);
        assert!(sockets.remove(a.id()).is_some());
        assert!(sockets.is_empty());
    }
}
