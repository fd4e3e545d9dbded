//! The `Channel` object: pub/sub with a replay buffer persisted in the object's log.
//!
//! Publish assigns ids, appends to the log and trims it in one batch; the fan-out to
//! subscribers and the publisher's acknowledgement are effects released by the output gate,
//! so no subscriber ever sees an event a crash could take back. Subscribing sends the backlog
//! after the client's cursor and adds the socket in one handler, so there is neither a gap nor
//! a duplicate between backlog and live events.

mod config;
mod event;
mod id;
mod presence;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use dormouse_runtime::{Context, Object, Socket};
use serde::Serialize;

pub use config::{
    ChannelEnv, ChannelObserver, ChannelSettings, MAX_CHANNEL_NAME, MAX_EVENT_NAME,
    MAX_IDEMPOTENCY_KEY, RESERVED_EVENT_PREFIX, TailBudget, validate_channel_name,
    validate_event_name, validate_idempotency_key,
};
pub use event::{Control, DEFAULT_EVENT, Event, Frames, direct_frame};
pub use id::{BadEventId, EventId};
pub use presence::{MAX_INFO, Member, PresenceMember, PresencePage};

use presence::Presence;

/// The namespace channels live in (their storage key prefix).
pub const NAMESPACE: &str = "channel";

const IDEMPOTENCY_PREFIX: &[u8] = b"idem/";
/// More seqs than one run could hand out between two flushes, by far.
const SEQ_JUMP_AFTER_CRASH: u64 = 1 << 32;
/// Keyed publishes between sweeps of expired idempotency records.
const SWEEP_EVERY: u32 = 64;
/// Log entries read per page while an activation rebuilds its in-memory tail.
const TAIL_PAGE: usize = 64;

/// One message to publish. Names and keys are validated by the caller (the gateway answers
/// 400 for bad ones without waking the channel).
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Event type; [`DEFAULT_EVENT`] when `None`.
    pub event: Option<String>,
    /// Payload, any bytes.
    pub data: Bytes,
    /// A retry with the same key within the window returns the first id and stores nothing.
    pub idempotency_key: Option<String>,
}

/// The outcome of one published message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The event's id.
    pub id: String,
    /// True when the idempotency key matched an earlier publish: nothing new was stored.
    pub duplicate: bool,
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only events published from now on.
    Live,
    /// The oldest event still retained.
    Oldest,
    /// The event after this id (a `Last-Event-ID`).
    After(EventId),
    /// The newest this many events (a subscriber's `rewind`: "the last N, then live").
    Latest(usize),
}

/// Which stored events a history page holds, and in which order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Oldest first from a start, or newest first going back.
    pub direction: Direction,
    /// Only events stored at or after this time (milliseconds since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only events stored before this time.
    pub until_ms: Option<u64>,
}

/// The way a history page walks the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first, from `Start` (with a time range: from its beginning).
    Forward(Start),
    /// Newest first, from the event before this id, or from the newest (with a time range:
    /// from its end). "The last 50 messages" is one such page.
    Backward(Option<EventId>),
}

impl Range {
    /// Oldest first from `start`, at any time.
    pub fn forward(start: Start) -> Self {
        Self {
            direction: Direction::Forward(start),
            since_ms: None,
            until_ms: None,
        }
    }
}

/// What a channel can be asked.
#[derive(Debug)]
pub enum ChannelRequest {
    /// Publishes messages, in order.
    Publish(Vec<NewMessage>),
    /// Adds a subscriber, first sending it the backlog from `start`; a socket that already
    /// follows the channel starts again from `start` instead.
    Subscribe {
        /// The client's connection.
        socket: Socket,
        /// Where its stream starts.
        start: Start,
    },
    /// Removes a subscriber (by its socket's id): one client following several channels on
    /// one connection stops following this one.
    Unsubscribe {
        /// [`dormouse_runtime::Socket::id`] of the connection.
        socket: u64,
    },
    /// Reads a page of stored events.
    History {
        /// Which events, in which order.
        range: Range,
        /// Most events to return.
        limit: usize,
    },
    /// Describes the channel.
    Info,
    /// A page of the channel's members (presence), in subject order, with counts.
    Presence {
        /// Members after this subject.
        after: Option<String>,
        /// Most members to return.
        limit: usize,
    },
    /// Deletes the channel's events and state; the next publish starts a new epoch.
    Delete,
    /// The channel's log changed in storage underneath this activation: it is a copy kept
    /// current from another node's writes (cluster mode's subscribers on any node). Hands
    /// the events it does not have yet to its subscribers, and a gap event when the log was
    /// recreated, deleted or trimmed past what they saw.
    Refresh,
}

/// What a channel answers.
#[derive(Debug)]
pub enum ChannelResponse {
    /// One result per published message, in order.
    Published(Vec<Published>),
    /// The subscriber was added.
    Subscribed {
        /// Where the subscriber's stream starts: just before the first event of its backlog,
        /// or, with none, after the last event the channel had handed out. A client that
        /// saw no event yet resumes from here.
        starts_after: Option<EventId>,
    },
    /// The subscriber was removed, or was not there.
    Unsubscribed {
        /// Whether the socket was a subscriber.
        was_subscribed: bool,
    },
    /// The channel already holds `limit` subscribers; this one was not added.
    Full {
        /// The configured `max_subscribers`.
        limit: usize,
    },
    /// A page of history.
    History(HistoryPage),
    /// The channel's description.
    Info(ChannelInfo),
    /// Its members; `None` when the channel has no presence (its settings say so).
    Presence(Option<PresencePage>),
    /// The channel was deleted.
    Deleted,
    /// The activation caught up with its log; `events` new ones went to its subscribers.
    Refreshed {
        /// Events delivered.
        events: usize,
    },
}

/// A page of stored events.
#[derive(Debug)]
pub struct HistoryPage {
    /// Present when the requested start is no longer (or never was) available.
    pub gap: Option<Control>,
    /// The events, in the order the page's [`Direction`] walks (a backward page is newest
    /// first).
    pub events: Vec<Arc<Event>>,
}

/// A channel as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelInfo {
    /// Id of the newest event, if any.
    pub last_id: Option<String>,
    /// Id of the oldest event still available for replay.
    pub earliest_id: Option<String>,
    /// Events retained.
    pub events: u64,
    /// Bytes of the retained records: payloads plus, per event, its name and 3 bytes of
    /// header (what `max_bytes` bounds too).
    pub bytes: u64,
    /// Connected subscribers.
    pub subscribers: usize,
}

/// A live channel.
#[derive(Debug)]
pub struct Channel {
    /// The channel's name, which every frame it sends carries (a client may follow several
    /// channels on one connection).
    name: Arc<str>,
    settings: ChannelSettings,
    memory_tail_bytes: usize,
    /// See [`ChannelEnv::max_subscribers`].
    max_subscribers: usize,
    /// The log's epoch; 0 while the channel has no log.
    epoch: u64,
    next_seq: u64,
    /// The newest events, for cheap replay to reconnecting clients.
    tail: VecDeque<Arc<Event>>,
    tail_bytes: usize,
    keyed_publishes: u32,
    /// See [`ChannelEnv::observer`].
    observer: Option<Arc<dyn ChannelObserver>>,
    /// See [`ChannelEnv::tails`]; `tail_bytes` are counted in it.
    tails: Option<Arc<TailBudget>>,
    /// Members by subject, when the channel keeps presence.
    presence: Option<Presence>,
    /// Members rebuilt on wake may include connections that closed while the channel
    /// slept: the first request looks for them and says they left.
    sweep_due: bool,
}

impl Drop for Channel {
    /// A hibernating channel gives its tail's share of the budget back.
    fn drop(&mut self) {
        if let Some(tails) = &self.tails {
            tails.give_back(self.tail_bytes);
        }
    }
}

impl Object for Channel {
    type Env = ChannelEnv;
    type Request = ChannelRequest;
    type Response = ChannelResponse;

    async fn activate(ctx: &mut Context<'_>, env: &ChannelEnv) -> anyhow::Result<Self> {
        let settings = env.settings_for(ctx.name()).clone();
        let mut channel = Channel {
            name: Arc::from(ctx.name()),
            settings,
            memory_tail_bytes: env.memory_tail_bytes.max(1),
            max_subscribers: env.max_subscribers,
            epoch: 0,
            next_seq: 1,
            tail: VecDeque::new(),
            tail_bytes: 0,
            keyed_publishes: 0,
            observer: env.observer.clone(),
            tails: env.tails.clone(),
            presence: None,
            sweep_due: false,
        };
        if channel.settings.presence {
            // Who was here when the channel went to sleep: its parked sockets, closed ones
            // too (their close is reported, so they were kept to say they left).
            let mut presence = Presence::default();
            for socket in ctx.sockets().iter() {
                if let Some(member) = Member::from_attachment(&socket.attachment()) {
                    presence.add(socket.id(), &member);
                }
                channel.sweep_due |= socket.is_closed();
            }
            channel.presence = Some(presence);
        }
        if let Some(meta) = ctx.log_meta()? {
            channel.epoch = meta.epoch;
            channel.next_seq = meta.last_seq + 1;
            // Newest first until the memory bound, then back into order.
            let mut budget = match &channel.tails {
                Some(tails) => channel.memory_tail_bytes.min(tails.left()),
                None => channel.memory_tail_bytes,
            };
            let mut loaded = Vec::new();
            // Backwards a page at a time by key range, never by arithmetic on seqs: the log
            // has a hole after each crash (see below).
            let mut before = channel.next_seq;
            'outer: loop {
                let chunk = ctx.read_log_before(before, TAIL_PAGE)?;
                for entry in chunk.iter().rev() {
                    let event =
                        Event::from_record(meta.epoch, entry.seq, entry.timestamp_ms, &entry.data)?;
                    if !loaded.is_empty() && event.weight() > budget {
                        break 'outer;
                    }
                    budget = budget.saturating_sub(event.weight());
                    loaded.push(Arc::new(event));
                }
                match chunk.first() {
                    Some(oldest) if chunk.len() == TAIL_PAGE => before = oldest.seq,
                    _ => break,
                }
            }
            for event in loaded.into_iter().rev() {
                channel.push_tail(event);
            }
            // After a crash, events past the log's end may have been delivered (under a
            // weak durability, delivery precedes the fsync) and then lost: skip far past any
            // seq the lost run could have handed out, so no id ever names two events. The
            // unused range is a hole that readers step over.
            if ctx.first_activation_after_crash()? {
                channel.next_seq = meta.last_seq + 1 + SEQ_JUMP_AFTER_CRASH;
            }
        }
        Ok(channel)
    }

    async fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        request: ChannelRequest,
    ) -> anyhow::Result<ChannelResponse> {
        if std::mem::take(&mut self.sweep_due) {
            self.sweep_closed(ctx);
        }
        match request {
            ChannelRequest::Publish(messages) => self.publish(ctx, messages),
            ChannelRequest::Subscribe { mut socket, start } => {
                // A socket already here moves to the new start (a client resuming a
                // channel its connection follows): its old handle is replaced below, once
                // nothing can fail, and it stays the member it was, with no leave and join.
                let here = ctx.socket(socket.id()).is_some();
                let limit = self.max_subscribers;
                if !here && limit > 0 && ctx.socket_count() >= limit {
                    return Ok(ChannelResponse::Full { limit });
                }
                // Everything retained after the cursor: the log may hold more than
                // `max_events` until the next publish trims it (after a config change).
                let (gap, backlog) = self.read(ctx, start, usize::MAX)?;
                // Where this subscriber's stream starts: just before its first backlog
                // event, else after the last event handed out (it gets only new ones).
                let starts_after = match backlog.first() {
                    Some(first) => Some(EventId {
                        epoch: first.id.epoch,
                        seq: first.id.seq - 1,
                    }),
                    None => (self.epoch != 0 && self.next_seq > 1).then_some(EventId {
                        epoch: self.epoch,
                        seq: self.next_seq - 1,
                    }),
                };
                let transport = socket.transport();
                if here {
                    ctx.remove_socket(socket.id());
                }
                // A member's connection reports its close (the server unsubscribes it),
                // so it is not pruned silently: the others hear that it left. (One that
                // closed already is no member: it goes with the next prune.)
                let member =
                    Member::from_attachment(&socket.attachment()).filter(|_| !socket.is_closed());
                let joined = match (&mut self.presence, member) {
                    (Some(presence), Some(member)) => {
                        socket.set_close_reported();
                        presence.add(socket.id(), &member).then_some(member)
                    }
                    _ => None,
                };
                let (id, gone) = (socket.id(), socket.is_closed());
                let subscriber = socket.clone();
                ctx.accept_socket(socket);
                let observer = self.observer.clone();
                let name = self.name.clone();
                ctx.after_commit(move || {
                    if let Some(gap) = gap {
                        subscriber.send(gap.frame(transport));
                        if let Some(observer) = observer {
                            observer.gap_sent(gap.reason);
                        }
                    }
                    for event in backlog {
                        subscriber.send(event.replay_frame(transport, &name));
                    }
                });
                // After its backlog: the new member hears of its own join too, so every
                // member's view of the list is built from the same events.
                if let Some(member) = joined {
                    self.announce(ctx, "join", &member);
                } else if let Some(left) = self
                    .presence
                    .as_mut()
                    .filter(|_| here && gone)
                    .and_then(|p| p.remove(id))
                {
                    // A member moving to a new start whose client has gone meanwhile.
                    self.announce(ctx, "leave", &left);
                }
                Ok(ChannelResponse::Subscribed { starts_after })
            }
            ChannelRequest::Unsubscribe { socket } => {
                let was_subscribed = ctx.remove_socket(socket).is_some();
                if let Some(left) = self.presence.as_mut().and_then(|p| p.remove(socket)) {
                    self.announce(ctx, "leave", &left);
                }
                Ok(ChannelResponse::Unsubscribed { was_subscribed })
            }
            ChannelRequest::Presence { after, limit } => {
                // A close whose report was lost still shows as closed here.
                self.sweep_closed(ctx);
                Ok(ChannelResponse::Presence(
                    self.presence
                        .as_ref()
                        .map(|p| p.page(after.as_deref(), limit)),
                ))
            }
            ChannelRequest::History { range, limit } => {
                let (gap, events) = self.page(ctx, range, limit)?;
                Ok(ChannelResponse::History(HistoryPage { gap, events }))
            }
            ChannelRequest::Info => Ok(ChannelResponse::Info(self.info(ctx)?)),
            ChannelRequest::Refresh => self.refresh(ctx),
            ChannelRequest::Delete => {
                ctx.delete_log();
                ctx.delete_all();
                self.forget_events();
                let gap = Control {
                    r#type: "gap",
                    reason: "deleted",
                    message: "the channel was deleted; its history is gone".to_string(),
                    channel: Some(self.name.to_string()),
                    earliest_id: None,
                    requested_id: None,
                };
                let sockets = ctx.sockets();
                let observer = self.observer.clone();
                ctx.after_commit(move || {
                    for socket in sockets.iter() {
                        socket.send(gap.frame(socket.transport()));
                        if let Some(observer) = &observer {
                            observer.gap_sent(gap.reason);
                        }
                    }
                });
                Ok(ChannelResponse::Deleted)
            }
        }
    }
}

impl Channel {
    /// Tells every subscriber that `member` joined or left, after the commit.
    fn announce(&self, ctx: &mut Context<'_>, kind: &str, member: &Member) {
        let frames = presence::frame(kind, &self.name, member);
        let sockets = ctx.sockets();
        ctx.after_commit(move || {
            for socket in sockets.iter() {
                socket.send(frames.for_transport(socket.transport()));
            }
        });
    }

    /// Drops members' connections that closed without their unsubscribe reaching the
    /// channel (it slept meanwhile, or the report was lost), each a leave if it was its
    /// subject's last.
    fn sweep_closed(&mut self, ctx: &mut Context<'_>) {
        let Some(presence) = &mut self.presence else {
            return;
        };
        let closed: Vec<u64> = ctx
            .sockets()
            .iter()
            .filter(|s| s.is_closed())
            .map(|s| s.id())
            .collect();
        let mut left = Vec::new();
        for id in closed {
            ctx.remove_socket(id);
            left.extend(presence.remove(id));
        }
        for member in left {
            self.announce(ctx, "leave", &member);
        }
    }

    fn publish(
        &mut self,
        ctx: &mut Context<'_>,
        messages: Vec<NewMessage>,
    ) -> anyhow::Result<ChannelResponse> {
        // Where delivery latency is measured from: the channel has the message and is
        // about to give it an id.
        let accepted = Instant::now();
        let now = now_ms();
        if self.epoch == 0 {
            self.epoch = ctx.allocate_epoch()?;
            ctx.create_log(self.epoch);
            self.next_seq = 1;
        }
        let mut results = Vec::with_capacity(messages.len());
        let mut fresh = Vec::with_capacity(messages.len());
        for message in messages {
            let idem_key = message
                .idempotency_key
                .as_ref()
                .map(|key| [IDEMPOTENCY_PREFIX, key.as_bytes()].concat());
            if let Some(key) = &idem_key
                && let Some(seq) = self.remembered(ctx, key, now)?
            {
                results.push(Published {
                    id: EventId {
                        epoch: self.epoch,
                        seq,
                    }
                    .to_string(),
                    duplicate: true,
                });
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let event = Arc::new(Event::new(
                EventId {
                    epoch: self.epoch,
                    seq,
                },
                message.event.unwrap_or_else(|| DEFAULT_EVENT.to_string()),
                message.data,
                now,
            ));
            ctx.append_log(seq, now, event.record());
            if let Some(key) = idem_key {
                ctx.put(key, idempotency_record(self.epoch, seq, now));
                self.keyed_publishes += 1;
            }
            results.push(Published {
                id: event.id.to_string(),
                duplicate: false,
            });
            self.push_tail(event.clone());
            fresh.push(event);
        }
        if fresh.is_empty() {
            return Ok(ChannelResponse::Published(results));
        }
        ctx.trim_log(self.settings.retention(), now);
        if self.keyed_publishes >= SWEEP_EVERY {
            self.keyed_publishes = 0;
            self.sweep_idempotency(ctx, now)?;
        }
        if let Some(observer) = self.observer.clone() {
            let channel = ctx.name().to_string();
            let events = fresh.len() as u64;
            let bytes = fresh.iter().map(|e| e.data.len() as u64).sum();
            ctx.after_commit(move || observer.published(&channel, events, bytes));
        }
        let sockets = ctx.sockets();
        if !sockets.is_empty() {
            let name = self.name.clone();
            ctx.after_commit(move || {
                let mut frames = Frames::new(&fresh, &name);
                for socket in sockets.iter() {
                    let transport = socket.transport();
                    for at in 0..frames.len() {
                        socket.send_stamped(frames.get(at, transport), accepted);
                    }
                }
            });
        }
        Ok(ChannelResponse::Published(results))
    }

    /// See [`ChannelRequest::Refresh`].
    fn refresh(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<ChannelResponse> {
        let meta = ctx.log_meta()?;
        let mut gap = None;
        match meta {
            None if self.epoch != 0 => {
                self.forget_events();
                gap = Some(("deleted", "the channel was deleted; its history is gone"));
            }
            Some(m) if m.epoch != self.epoch => {
                if self.epoch != 0 {
                    gap = Some((
                        "epoch_changed",
                        "the channel was deleted and started again; continuing with its new events",
                    ));
                }
                self.forget_events();
                self.epoch = m.epoch;
            }
            Some(m) if m.count > 0 && m.first_seq > self.next_seq => {
                gap = Some((
                    "trimmed",
                    "events were dropped from the replay buffer before they reached this server; continuing with the oldest retained",
                ));
            }
            _ => {}
        }
        let fresh: Vec<Arc<Event>> = match meta {
            Some(m) if m.last_seq >= self.next_seq => ctx
                .read_log(self.next_seq, usize::MAX)?
                .iter()
                .map(|e| Event::from_record(m.epoch, e.seq, e.timestamp_ms, &e.data).map(Arc::new))
                .collect::<Result<_, _>>()
                .context("reading the channel log")?,
            _ => Vec::new(),
        };
        if let Some(m) = meta {
            self.next_seq = self.next_seq.max(m.last_seq + 1);
        }
        for event in &fresh {
            self.push_tail(event.clone());
        }
        let events = fresh.len();
        let sockets = ctx.sockets();
        if !sockets.is_empty() && (gap.is_some() || !fresh.is_empty()) {
            let gap = gap.map(|(reason, message)| Control {
                r#type: "gap",
                reason,
                message: message.to_string(),
                channel: Some(self.name.to_string()),
                earliest_id: fresh.first().map(|e| e.id.to_string()),
                requested_id: None,
            });
            let observer = self.observer.clone();
            let name = self.name.clone();
            ctx.after_commit(move || {
                let mut frames = Frames::new(&fresh, &name);
                for socket in sockets.iter() {
                    let transport = socket.transport();
                    if let Some(gap) = &gap {
                        socket.send(gap.frame(transport));
                        if let Some(observer) = &observer {
                            observer.gap_sent(gap.reason);
                        }
                    }
                    for at in 0..frames.len() {
                        socket.send(frames.get(at, transport));
                    }
                }
            });
        }
        Ok(ChannelResponse::Refreshed { events })
    }

    /// Drops what the activation holds of the log (not storage): the log is gone or new.
    fn forget_events(&mut self) {
        self.epoch = 0;
        self.next_seq = 1;
        self.tail.clear();
        if let Some(tails) = &self.tails {
            tails.give_back(self.tail_bytes);
        }
        self.tail_bytes = 0;
    }

    /// The seq a still-valid idempotency record points to.
    fn remembered(&self, ctx: &Context<'_>, key: &[u8], now: u64) -> anyhow::Result<Option<u64>> {
        let Some(record) = ctx.get(key)? else {
            return Ok(None);
        };
        let (epoch, seq, at) = parse_idempotency_record(&record)?;
        let window = self.settings.idempotency_window.as_millis() as u64;
        Ok((epoch == self.epoch && at.saturating_add(window) > now).then_some(seq))
    }

    /// Deletes a bounded number of expired idempotency records, so they cannot pile up.
    fn sweep_idempotency(&self, ctx: &mut Context<'_>, now: u64) -> anyhow::Result<()> {
        let window = self.settings.idempotency_window.as_millis() as u64;
        for (key, record) in ctx.list(IDEMPOTENCY_PREFIX, None, 256)? {
            let (epoch, _, at) = parse_idempotency_record(&record)?;
            if epoch != self.epoch || at.saturating_add(window) <= now {
                ctx.delete(key);
            }
        }
        Ok(())
    }

    fn push_tail(&mut self, event: Arc<Event>) {
        self.tail_bytes += event.weight();
        if let Some(tails) = &self.tails {
            tails.take(event.weight());
        }
        self.tail.push_back(event);
        while self.tail.len() > 1
            && (self.tail_bytes > self.memory_tail_bytes
                || self.tail.len() as u64 > self.settings.max_events
                || self.tails.as_ref().is_some_and(|tails| tails.over()))
        {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.weight();
                if let Some(tails) = &self.tails {
                    tails.give_back(old.weight());
                }
            }
        }
        // A tail cut down (the tails' budget is spent) gives back its slots too: thousands
        // of active channels each keeping room for a thousand pointers is memory the
        // budget does not see.
        if self.tail.capacity() > 64 && self.tail.len() * 4 < self.tail.capacity() {
            self.tail.shrink_to(self.tail.len() * 2);
        }
    }

    /// Events from `start`, at most `limit`, with a gap notice when `start` is not available.
    fn read(
        &self,
        ctx: &Context<'_>,
        start: Start,
        limit: usize,
    ) -> anyhow::Result<(Option<Control>, Vec<Arc<Event>>)> {
        let (mut gap, from, cursor) = match start {
            Start::Live => return Ok((None, Vec::new())),
            Start::Latest(n) => return Ok((None, self.newest_before(ctx, self.next_seq, n)?)),
            Start::Oldest => (None, 1, None),
            Start::After(cursor) if self.epoch == 0 || cursor.epoch != self.epoch => (
                Some((
                    "epoch_changed",
                    "the id is from an earlier incarnation of this channel; replaying everything retained",
                )),
                1,
                Some(cursor),
            ),
            Start::After(cursor) if cursor.seq >= self.next_seq => (
                Some((
                    "unknown_id",
                    "the id is newer than anything this channel holds (history was lost); continuing with new events",
                )),
                self.next_seq,
                Some(cursor),
            ),
            Start::After(cursor) => (None, cursor.seq + 1, Some(cursor)),
        };
        let events = if limit == 0 || from >= self.next_seq {
            Vec::new()
        } else if let Some(front) = self.tail.front()
            && from >= front.id.seq
        {
            self.tail
                .iter()
                .filter(|e| e.id.seq >= from)
                .take(limit)
                .cloned()
                .collect()
        } else {
            // Never past what this activation has handed out: a copy's storage may be
            // ahead of it until its next refresh, which delivers those to subscribers.
            ctx.read_log(from, limit)?
                .iter()
                .take_while(|entry| entry.seq < self.next_seq)
                .map(|entry| {
                    Event::from_record(self.epoch, entry.seq, entry.timestamp_ms, &entry.data)
                        .map(Arc::new)
                })
                .collect::<Result<Vec<_>, _>>()
                .context("reading the channel log")?
        };
        // Trimmed means: the log's oldest retained event is past the cursor. (A seq the log
        // never held, such as the hole after a crash, is not a gap.)
        if gap.is_none() && cursor.is_some() && limit > 0 && from < self.next_seq {
            let oldest = ctx.log_meta()?.filter(|m| m.count > 0).map(|m| m.first_seq);
            if oldest.is_none_or(|oldest| from < oldest) {
                gap = Some((
                    "trimmed",
                    "events after the id were dropped from the replay buffer; replaying from the oldest retained",
                ));
            }
        }
        let control = gap.map(|(reason, message)| Control {
            r#type: "gap",
            reason,
            message: message.to_string(),
            channel: Some(self.name.to_string()),
            earliest_id: events.first().map(|e| e.id.to_string()),
            requested_id: cursor.map(|c| c.to_string()),
        });
        Ok((control, events))
    }

    /// The newest `limit` events before `before_seq`, oldest first: from the memory tail
    /// (which holds what was handed out and may not be in the log yet), then the log.
    fn newest_before(
        &self,
        ctx: &Context<'_>,
        before_seq: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<Arc<Event>>> {
        let before_seq = before_seq.min(self.next_seq);
        let mut newest: Vec<Arc<Event>> = self
            .tail
            .iter()
            .rev()
            .filter(|e| e.id.seq < before_seq)
            .take(limit)
            .cloned()
            .collect();
        newest.reverse();
        if newest.len() < limit {
            let older_than = newest.first().map_or(before_seq, |e| e.id.seq);
            let mut events = ctx
                .read_log_before(older_than, limit - newest.len())?
                .iter()
                .map(|entry| {
                    Event::from_record(self.epoch, entry.seq, entry.timestamp_ms, &entry.data)
                        .map(Arc::new)
                })
                .collect::<Result<Vec<_>, _>>()
                .context("reading the channel log")?;
            events.append(&mut newest);
            newest = events;
        }
        Ok(newest)
    }

    /// The first seq whose event was stored at or after `ms`, or `next_seq` if none was:
    /// a binary search of the log, which assumes stored times do not go backwards (the
    /// page's events are filtered by time anyway, so a clock that stepped back can only
    /// leave some out, never put others in).
    fn first_at_or_after(&self, ctx: &Context<'_>, ms: u64) -> anyhow::Result<u64> {
        let Some(meta) = ctx.log_meta()?.filter(|m| m.count > 0) else {
            return Ok(self.next_seq);
        };
        let (mut low, mut high) = (meta.first_seq, self.next_seq);
        while low < high {
            let middle = low + (high - low) / 2;
            match ctx.read_log(middle, 1)?.first() {
                Some(entry) if entry.seq < high && entry.timestamp_ms < ms => low = entry.seq + 1,
                _ => high = middle,
            }
        }
        Ok(low)
    }

    /// A history page: [`Channel::read`] forward, [`Channel::newest_before`] backward, both
    /// kept within the range's times.
    fn page(
        &self,
        ctx: &Context<'_>,
        range: Range,
        limit: usize,
    ) -> anyhow::Result<(Option<Control>, Vec<Arc<Event>>)> {
        let in_time = |e: &Arc<Event>| {
            range.since_ms.is_none_or(|t| e.timestamp_ms >= t)
                && range.until_ms.is_none_or(|t| e.timestamp_ms < t)
        };
        match range.direction {
            Direction::Forward(start) => {
                let start = match (start, range.since_ms) {
                    // A time range without a cursor starts where the range does.
                    (Start::Oldest, Some(since)) => {
                        match self.first_at_or_after(ctx, since)?.checked_sub(1) {
                            Some(seq) if seq > 0 => Start::After(EventId {
                                epoch: self.epoch,
                                seq,
                            }),
                            _ => Start::Oldest,
                        }
                    }
                    // With a cursor too, the page starts at the later of the two.
                    (Start::After(cursor), Some(since)) if cursor.epoch == self.epoch => {
                        let from = self.first_at_or_after(ctx, since)?;
                        if from > cursor.seq + 1 {
                            Start::After(EventId {
                                epoch: self.epoch,
                                seq: from - 1,
                            })
                        } else {
                            start
                        }
                    }
                    (start, _) => start,
                };
                let (gap, mut events) = self.read(ctx, start, limit)?;
                // Oldest first: past the end of the range, nothing later is in it.
                if let Some(until) = range.until_ms {
                    events.truncate(
                        events
                            .iter()
                            .position(|e| e.timestamp_ms >= until)
                            .unwrap_or(events.len()),
                    );
                }
                events.retain(in_time);
                Ok((gap, events))
            }
            Direction::Backward(before) => {
                let (gap, mut before_seq) = match before {
                    None => (None, self.next_seq),
                    Some(cursor) if self.epoch == 0 || cursor.epoch != self.epoch => (
                        Some((
                            "epoch_changed",
                            "the id is from an earlier incarnation of this channel; paging back from its newest event",
                        )),
                        self.next_seq,
                    ),
                    Some(cursor) if cursor.seq > self.next_seq => (
                        Some((
                            "unknown_id",
                            "the id is newer than anything this channel holds (history was lost); paging back from its newest event",
                        )),
                        self.next_seq,
                    ),
                    Some(cursor) => (None, cursor.seq),
                };
                if let Some(until) = range.until_ms {
                    before_seq = before_seq.min(self.first_at_or_after(ctx, until)?);
                }
                let mut events = self.newest_before(ctx, before_seq, limit)?;
                events.reverse();
                // Newest first: past the start of the range, nothing earlier is in it.
                if let Some(since) = range.since_ms {
                    events.truncate(
                        events
                            .iter()
                            .position(|e| e.timestamp_ms < since)
                            .unwrap_or(events.len()),
                    );
                }
                events.retain(in_time);
                let gap = gap.map(|(reason, message)| Control {
                    r#type: "gap",
                    reason,
                    message: message.to_string(),
                    channel: Some(self.name.to_string()),
                    earliest_id: None,
                    requested_id: before.map(|c| c.to_string()),
                });
                Ok((gap, events))
            }
        }
    }

    fn info(&self, ctx: &Context<'_>) -> anyhow::Result<ChannelInfo> {
        let meta = ctx.log_meta()?;
        let id = |seq| {
            EventId {
                epoch: self.epoch,
                seq,
            }
            .to_string()
        };
        Ok(ChannelInfo {
            // The newest event actually appended: after an unclean restart `next_seq` has
            // jumped past ids that were never used, and a client must not be told of one.
            last_id: meta.filter(|m| m.last_seq > 0).map(|m| id(m.last_seq)),
            earliest_id: meta.filter(|m| m.count > 0).map(|m| id(m.first_seq)),
            events: meta.map_or(0, |m| m.count),
            bytes: meta.map_or(0, |m| m.bytes),
            subscribers: ctx.socket_count(),
        })
    }
}

fn idempotency_record(epoch: u64, seq: u64, at: u64) -> Vec<u8> {
    [epoch.to_be_bytes(), seq.to_be_bytes(), at.to_be_bytes()].concat()
}

fn parse_idempotency_record(record: &[u8]) -> anyhow::Result<(u64, u64, u64)> {
    anyhow::ensure!(record.len() == 24, "corrupt idempotency record");
    let field = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&record[i * 8..i * 8 + 8]);
        u64::from_be_bytes(bytes)
    };
    Ok((field(0), field(1), field(2)))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
