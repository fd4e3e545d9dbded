//! Channel `occupied` and `vacated` (docs/HOOKS.md): a backend hears when a channel gets
//! its first subscriber anywhere and when its last one leaves, each at least once, in order.
//!
//! Two parts, so that a channel's occupancy has one home whatever the number of nodes:
//!
//! - **Per node, a count** of the channel's subscribers here ([`Tracker`]). When it leaves
//!   or reaches zero, the node tells the channel's occupancy object that it now occupies
//!   the channel or no longer does. One change per channel is in flight at a time, so a
//!   subscriber who leaves and comes back while one is sent costs nothing more. Before
//!   saying it occupies a channel, the node records that it does (key `o/{channel}` in its
//!   own hook records, synced), and forgets it once it has said it no longer does: a start
//!   after a crash, or the node that takes a dead node's records over, finds what it must
//!   still take back.
//! - **Per channel, an object** (`dormouse.occupancy/{channel}`, a runtime object like any
//!   other, so in cluster mode it lives on one node and calls reach it from every node)
//!   holds the set of nodes occupying the channel. When the set becomes non-empty or empty,
//!   the same commit numbers the event (`seq`, per channel, never reused), stores it and
//!   sets the object's alarm. The alarm delivers stored events in order and forgets each
//!   once its backend answered 2xx. A failure keeps it and the alarm comes back later
//!   (0.5 s, doubling to 60 s). Alarms survive a crash and, in cluster mode, fire on a
//!   live node, so an event is delivered at least once.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dormouse_runtime::{Context, DynNamespace, HttpRequest, HttpResponse, Object};
use dormouse_storage::{ObjectId, WriteBatch};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Hooks, Route, now_ms};
use crate::cluster::ClusterNode;

/// The namespace of the channels' occupancy objects. Its name has a dot, which a mounted
/// namespace may not have, so no client route reaches it.
pub(crate) const NAMESPACE: &str = "dormouse.occupancy";
/// A node occupying the channel: `n/{node}`.
const MEMBER: &[u8] = b"n/";
/// An event not yet acknowledged: `e/{seq, 16 hex digits}`, so keys list in order.
const EVENT: &[u8] = b"e/";
/// The last event's number.
const SEQ: &[u8] = b"seq";
/// The pause before the next try, after a failed one (milliseconds, big-endian).
const PAUSE: &[u8] = b"pause";
/// In a node's hook records: `o/{channel}` while the node may occupy the channel.
pub(crate) const OCCUPYING: &[u8] = b"o/";
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Events sent per alarm: more wait for the next, which follows at once.
const PER_ALARM: usize = 64;

/// A change a node asks of a channel's occupancy object.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    node: String,
    occupied: bool,
    /// The hook that hears of the channel (every node resolves the same one).
    hook: String,
}

/// An event as stored until its backend took it.
#[derive(Debug, Serialize, Deserialize)]
struct Event {
    event: String,
    hook: String,
    channel: String,
    seq: u64,
    time_ms: u64,
}

/// One channel's occupancy; see the module doc.
#[derive(Debug)]
pub(crate) struct Occupancy {
    hooks: Weak<Hooks>,
    members: BTreeSet<String>,
    seq: u64,
}

fn u64_of(bytes: Option<Bytes>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn answer(status: u16, body: serde_json::Value) -> anyhow::Result<HttpResponse> {
    Ok(http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Bytes::from(body.to_string()))?)
}

impl Object for Occupancy {
    type Env = Weak<Hooks>;
    type Request = ();
    type Response = ();

    async fn activate(ctx: &mut Context<'_>, env: &Self::Env) -> anyhow::Result<Self> {
        let mut members = BTreeSet::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = ctx.list(MEMBER, after.as_deref(), 1000)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, _) in &page {
                members.insert(String::from_utf8_lossy(&key[MEMBER.len()..]).into_owned());
            }
        }
        // Events left without an alarm (a handler that gave up) would never go: repair.
        if ctx.alarm()?.is_none() && !ctx.list(EVENT, None, 1)?.is_empty() {
            ctx.set_alarm(SystemTime::now());
        }
        Ok(Self {
            hooks: env.clone(),
            members,
            seq: u64_of(ctx.get(SEQ)?),
        })
    }

    async fn handle(&mut self, _ctx: &mut Context<'_>, (): ()) -> anyhow::Result<()> {
        Ok(())
    }

    /// `POST /change` with a [`Change`]: answers, after the commit, what the change did.
    async fn fetch(
        &mut self,
        ctx: &mut Context<'_>,
        request: HttpRequest,
    ) -> anyhow::Result<HttpResponse> {
        if request.method() != http::Method::POST || request.uri().path() != "/change" {
            return answer(
                404,
                json!({"error": {"code": "not_found", "message": "POST /change only"}}),
            );
        }
        let change: Change = match serde_json::from_slice(request.body()) {
            Ok(change) => change,
            Err(e) => {
                return answer(
                    400,
                    json!({"error": {"code": "bad_json", "message": e.to_string()}}),
                );
            }
        };
        let was = !self.members.is_empty();
        let key = [MEMBER, change.node.as_bytes()].concat();
        if change.occupied {
            if self.members.insert(change.node.clone()) {
                ctx.put(key, Bytes::new());
            }
        } else if self.members.remove(&change.node) {
            ctx.delete(key);
        }
        let now = !self.members.is_empty();
        if was == now {
            return answer(200, json!({"event": null}));
        }
        self.seq += 1;
        let event = Event {
            event: if now { "occupied" } else { "vacated" }.to_string(),
            hook: change.hook,
            channel: ctx.name().to_string(),
            seq: self.seq,
            time_ms: now_ms(),
        };
        ctx.put(SEQ, Bytes::copy_from_slice(&self.seq.to_be_bytes()));
        ctx.put(event_key(self.seq), serde_json::to_vec(&event)?);
        // An alarm already set is a retry after a failure, or a delivery about to run:
        // either sends this event after the ones before it.
        if ctx.alarm()?.is_none() {
            ctx.set_alarm(SystemTime::now());
        }
        answer(200, json!({"event": event.event, "seq": event.seq}))
    }

    /// Sends the stored events in order until one fails; that one and those after it wait
    /// for the alarm this sets again.
    async fn alarm(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        let Some(hooks) = self.hooks.upgrade() else {
            return Ok(());
        };
        let pending = ctx.list(EVENT, None, PER_ALARM)?;
        for (key, value) in &pending {
            let event: Event = match serde_json::from_slice(value) {
                Ok(event) => event,
                Err(e) => {
                    // Written by this code; unreadable means damaged. Said, and skipped, so
                    // the events after it still go.
                    tracing::error!(channel = ctx.name(), error = %e, "an unreadable occupancy event, dropped");
                    ctx.delete(key.clone());
                    continue;
                }
            };
            let delivered = tokio::select! {
                delivered = hooks.deliver_occupancy(&event) => delivered,
                () = hooks.stopped.cancelled() => {
                    // The server is stopping: its next start fires the alarm again.
                    ctx.set_alarm(SystemTime::now());
                    return Ok(());
                }
            };
            if !delivered {
                let pause = match u64_of(ctx.get(PAUSE)?) {
                    0 => FIRST_PAUSE,
                    ms => (Duration::from_millis(ms) * 2).min(MAX_PAUSE),
                };
                let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
                ctx.put(PAUSE, Bytes::copy_from_slice(&ms.to_be_bytes()));
                ctx.set_alarm(SystemTime::now() + pause);
                return Ok(());
            }
            ctx.delete(key.clone());
        }
        ctx.delete(PAUSE);
        if pending.len() == PER_ALARM {
            ctx.set_alarm(SystemTime::now());
        }
        Ok(())
    }
}

fn event_key(seq: u64) -> Vec<u8> {
    [EVENT, format!("{seq:016x}").as_bytes()].concat()
}

impl Hooks {
    /// Sends one occupancy event; whether its backend took it. An event its hook no longer
    /// takes (the configuration changed) counts as taken.
    async fn deliver_occupancy(&self, event: &Event) -> bool {
        let Some(route) = self.named(&event.hook).filter(|r| r.takes(&event.event)) else {
            return true;
        };
        let body = json!({
            "event": event.event,
            "hook": event.hook,
            "channel": event.channel,
            "seq": event.seq,
            "time_ms": event.time_ms,
        });
        let key = format!("{}/{}/{}", event.channel, event.event, event.seq);
        self.call(route, &event.event, &key, &body).await.is_ok()
    }
}

/// How a node reaches the occupancy objects: here, or (cluster mode) wherever each runs.
struct Link {
    namespace: Arc<dyn DynNamespace>,
    cluster: Option<Arc<ClusterNode>>,
}

/// A node's subscriber count of one channel, and what it last told the channel's object.
#[derive(Debug)]
struct Entry {
    hook: Arc<str>,
    count: usize,
    /// The object was told (or, after a restart, may have been) that this node occupies it.
    told: bool,
    /// A change is being sent.
    driving: bool,
}

/// This node's counts; see the module doc.
#[derive(Default)]
pub(crate) struct Tracker {
    entries: Mutex<HashMap<Arc<str>, Entry>>,
    link: OnceLock<Link>,
    /// Changes being sent: a stopping server gives them a moment.
    pub(crate) pending: AtomicU64,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

/// A subscriber counted in its channel's occupancy: leaves the count when dropped.
pub(crate) struct Occupant {
    hooks: Arc<Hooks>,
    channel: Arc<str>,
}

impl Drop for Occupant {
    fn drop(&mut self) {
        self.hooks.count(&self.channel, None, false);
    }
}

impl Hooks {
    /// Whether any hook takes `occupied` or `vacated`: then the server runs the occupancy
    /// objects.
    pub(crate) fn takes_occupancy(&self) -> bool {
        self.routes.iter().any(|r| takes_occupancy(r))
    }

    /// Connects the counts to the occupancy objects once the server built their namespace.
    pub(crate) fn link_occupancy(
        &self,
        namespace: Arc<dyn DynNamespace>,
        cluster: Option<Arc<ClusterNode>>,
    ) {
        let _ = self.occupancy.link.set(Link { namespace, cluster });
    }

    /// Counts a new subscriber of `channel` when its hook takes occupancy events; it is
    /// counted until the returned guard drops.
    pub(crate) fn occupy(self: &Arc<Self>, route: &Route, channel: &str) -> Option<Occupant> {
        if !takes_occupancy(route) || self.occupancy.link.get().is_none() {
            return None;
        }
        let channel: Arc<str> = Arc::from(channel);
        self.count(&channel, Some(route.name()), true);
        Some(Occupant {
            hooks: self.clone(),
            channel,
        })
    }

    /// One subscriber more or less (`hook` names the hook for a new entry); starts a
    /// change when what the object was told differs from what is.
    fn count(self: &Arc<Self>, channel: &Arc<str>, hook: Option<&str>, more: bool) {
        let mut entries = self.lock_entries();
        let entry = entries.entry(channel.clone()).or_insert_with(|| Entry {
            hook: Arc::from(hook.unwrap_or_default()),
            count: 0,
            told: false,
            driving: false,
        });
        if more {
            entry.count += 1;
        } else {
            entry.count = entry.count.saturating_sub(1);
        }
        self.kick(channel, entry);
        if entry.count == 0 && !entry.told && !entry.driving {
            entries.remove(channel);
        }
    }

    /// A start found that this node may occupy `channel` (its earlier run recorded so):
    /// unless a subscriber is here now, the object is told it does not.
    pub(crate) fn restore_occupancy(self: &Arc<Self>, channel: &str, hook: &str) {
        if self.occupancy.link.get().is_none() {
            // No hook takes occupancy events any more: nobody to tell, nothing to keep.
            let mut batch = WriteBatch::new();
            batch.delete([OCCUPYING, channel.as_bytes()].concat());
            let _ = self.outbox_write_unsynced(batch);
            return;
        }
        let channel: Arc<str> = Arc::from(channel);
        let mut entries = self.lock_entries();
        let entry = entries.entry(channel.clone()).or_insert_with(|| Entry {
            hook: Arc::from(hook),
            count: 0,
            told: true,
            driving: false,
        });
        entry.told = true;
        self.kick(&channel, entry);
    }

    fn kick(self: &Arc<Self>, channel: &Arc<str>, entry: &mut Entry) {
        if entry.driving || entry.told == (entry.count > 0) {
            return;
        }
        entry.driving = true;
        self.occupancy.pending.fetch_add(1, Ordering::AcqRel);
        let (hooks, channel) = (self.clone(), channel.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = hooks.drive(&channel) => {}
                () = hooks.stopped.cancelled() => {}
            }
            hooks.occupancy.pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.occupancy
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the channel's object what this node's count says, until the two agree.
    async fn drive(self: &Arc<Self>, channel: &Arc<str>) {
        loop {
            let (want, hook) = {
                let mut entries = self.lock_entries();
                let Some(entry) = entries.get_mut(channel) else {
                    return;
                };
                let want = entry.count > 0;
                if want == entry.told {
                    entry.driving = false;
                    if !want {
                        entries.remove(channel);
                    }
                    return;
                }
                (want, entry.hook.clone())
            };
            let mut pause = FIRST_PAUSE;
            loop {
                match self.tell(channel, &hook, want).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(%channel, occupied = want, error = %e, "a channel's occupancy not updated yet; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                    }
                }
            }
            if let Some(entry) = self.lock_entries().get_mut(channel) {
                entry.told = want;
            }
        }
    }

    /// One change: recorded in this node's records first when it occupies (so it is taken
    /// back after a crash), forgotten there after the object took a leave.
    async fn tell(&self, channel: &str, hook: &str, occupied: bool) -> anyhow::Result<()> {
        let record = [OCCUPYING, channel.as_bytes()].concat();
        if occupied {
            let mut batch = WriteBatch::new();
            batch.put(record.clone(), hook.as_bytes().to_vec());
            self.outbox_write(batch).await?;
        }
        self.change(channel, &self.node, hook, occupied).await?;
        if !occupied {
            let mut batch = WriteBatch::new();
            batch.delete(record);
            // Not waited for: a delete a crash loses makes the next start tell the object
            // again that this node left, which changes nothing.
            let _ = self.outbox_write_unsynced(batch);
        }
        Ok(())
    }

    /// Asks `channel`'s object to set whether `node` occupies it.
    pub(crate) async fn change(
        &self,
        channel: &str,
        node: &str,
        hook: &str,
        occupied: bool,
    ) -> anyhow::Result<()> {
        let link = self
            .occupancy
            .link
            .get()
            .ok_or_else(|| anyhow::anyhow!("no occupancy hook is configured"))?;
        let body = serde_json::to_vec(&Change {
            node: node.to_string(),
            occupied,
            hook: hook.to_string(),
        })?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri("/change")
            .header("content-type", "application/json")
            .body(Bytes::from(body))?;
        let response = match &link.cluster {
            Some(cluster) => cluster.fetch(&link.namespace, channel, request).await,
            None => link.namespace.fetch(channel, request).await,
        }
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "the occupancy object answered {}: {}",
            response.status(),
            String::from_utf8_lossy(response.body())
        );
        Ok(())
    }

    /// Node `node` died (cluster mode) and its records are held here: tells each channel
    /// it occupied that it no longer does, forgetting each record once told.
    pub(crate) async fn leave_for_dead(&self, from: &ObjectId, node: &str) -> anyhow::Result<()> {
        let storage = &self.outbox.storage;
        loop {
            let page = storage.list(from, OCCUPYING, None, 1000)?;
            if page.is_empty() {
                return Ok(());
            }
            let mut told = WriteBatch::new();
            for (key, hook) in &page {
                let channel = String::from_utf8_lossy(&key[OCCUPYING.len()..]);
                let hook = String::from_utf8_lossy(hook);
                self.change(&channel, node, &hook, false).await?;
                told.delete(key.clone());
            }
            storage.apply(from, told)?;
            storage.sync_object(from).await?;
        }
    }
}

/// Whether `route` takes either occupancy event (counting is needed for either).
fn takes_occupancy(route: &Route) -> bool {
    route.takes("occupied") || route.takes("vacated")
}

/// Builds the occupancy objects' runtime namespace.
pub(crate) fn namespace(
    runtime: &dormouse_runtime::Runtime,
    hooks: &Arc<Hooks>,
) -> dormouse_runtime::Namespace<Occupancy> {
    runtime.namespace::<Occupancy>(
        NAMESPACE,
        dormouse_runtime::NamespaceConfig::default(),
        Arc::downgrade(hooks),
    )
}
