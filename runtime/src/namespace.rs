//! Name to activation: the directory that makes activation lazy and single, and hibernation
//! race-free.
//!
//! # The hand-off protocol
//! A sender locks the name's shard, finds or spawns the activation, increments the slot's
//! `inflight` count and enqueues its message, all before unlocking. An activation that has
//! idled out locks the same shard and removes its slot only if `inflight` is zero. So when a
//! slot is removed no message can be in its mailbox, and any later sender spawns a fresh
//! activation, which reads storage only after the old one applied all its writes. Every
//! message is therefore handled exactly once, by exactly one activation, in the order each
//! sender sent it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fmt;

use futures::future::BoxFuture;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use dormouse_storage::{ObjectId, Storage};
use ractor::{ActorRef, ActorRuntime, MessagingErr};
use tokio::sync::oneshot;

use crate::activation::{ActivationArgs, ActivationMsg, ObjectActor, Reply, Work};
use crate::alarm::{AlarmTarget, Alarms};
use crate::counters::{CommitTimer, Counters};
use crate::socket::{Inbound, Socket, Sockets};
use crate::{Error, HttpRequest, HttpResponse, NamespaceConfig, NamespaceStats, Object, Result};

const SHARDS: usize = 64;

/// All instances of one [`Object`] type, addressed by name: the equivalent of a Durable Object
/// namespace plus `idFromName`. Cheap to clone; clones share the same directory.
pub struct Namespace<O: Object> {
    shared: Arc<Shared<O>>,
}

impl<O: Object> Clone for Namespace<O> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<O: Object> fmt::Debug for Namespace<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Namespace")
            .field("name", &self.shared.name)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Where one object is right now, as far as this process knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectState {
    /// A live activation holds it in memory.
    Active,
    /// It hibernated in this process and has not woken since.
    Hibernated,
    /// Not seen by this process since it started: it may exist in storage, or not at all.
    Dormant,
}

/// A typed handle to one named object, for calling it from Rust code without HTTP. Holds only
/// the name, so it stays valid across hibernations.
pub struct ObjectHandle<O: Object> {
    namespace: Namespace<O>,
    name: Arc<str>,
}

impl<O: Object> Clone for ObjectHandle<O> {
    fn clone(&self) -> Self {
        Self {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl<O: Object> fmt::Debug for ObjectHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ObjectHandle({}/{})",
            self.namespace.shared.name, self.name
        )
    }
}

impl<O: Object> ObjectHandle<O> {
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one request; see [`Namespace::call`].
    pub fn call(
        &self,
        request: O::Request,
    ) -> impl Future<Output = Result<O::Response>> + Send + 'static + use<O> {
        self.namespace.call(&self.name, request)
    }
}

/// State shared by a namespace's handles and all of its activations.
pub(crate) struct Shared<O: Object> {
    pub(crate) name: Arc<str>,
    pub(crate) storage: Arc<dyn Storage>,
    /// The runtime's alarm scheduler, told when a handler sets an alarm.
    pub(crate) alarms: Arc<Alarms>,
    /// Times commits for the runtime's observer, if any.
    pub(crate) commits: Arc<CommitTimer>,
    pub(crate) env: O::Env,
    pub(crate) config: NamespaceConfig,
    pub(crate) counters: Counters,
    shards: Box<[Mutex<Shard<O>>]>,
    next_generation: AtomicU64,
    closed: AtomicBool,
    /// Messages dispatched so far; see `Slot::last_used`.
    dispatches: AtomicU64,
    /// Live slots with `evicting` set: activations about to go, which a sweep does not count
    /// against `max_active` again.
    evicting: AtomicUsize,
    /// Held by the one sweep that picks activations to evict.
    sweeping: Mutex<()>,
    /// When the last sweep found too few idle activations: no new sweep until this many
    /// are active.
    sweep_floor: AtomicUsize,
}

struct Shard<O: Object> {
    live: HashMap<Arc<str>, Slot<O>>,
    /// Name hashes of objects that hibernated here: 8 bytes each instead of the name, so a
    /// hibernated object costs (almost) nothing. A hash collision can only mislabel a dormant
    /// object as hibernated in [`Namespace::state`]; it never affects delivery.
    hibernated: HashSet<u64>,
    /// Sockets of hibernated objects, handed back on wake. Only objects that had clients
    /// connected when they hibernated appear here.
    parked: HashMap<Arc<str>, Sockets>,
}

impl<O: Object> Shard<O> {
    /// Removes a live entry, and gives back the map's spare room once it is mostly empty: a
    /// hash map keeps the capacity of its busiest moment, so after a burst of activations
    /// every shard would hold buckets for all of them long after they hibernated (measured:
    /// several MB per 100,000 objects that were active at once).
    fn remove_live(&mut self, name: &str) -> Option<(Arc<str>, Slot<O>)> {
        let removed = self.live.remove_entry(name);
        shrink_if_sparse(&mut self.live);
        removed
    }

    /// Takes the sockets parked for `name`, shrinking the map the same way.
    fn unpark(&mut self, name: &str) -> Sockets {
        let sockets = self.parked.remove(name).unwrap_or_default();
        shrink_if_sparse(&mut self.parked);
        sockets
    }
}

/// Halves a map's capacity when it is under a quarter full, so shrinking stays amortised
/// O(1) per removal.
fn shrink_if_sparse<V>(map: &mut HashMap<Arc<str>, V>) {
    const MIN_CAPACITY: usize = 64;
    if map.capacity() > MIN_CAPACITY && map.len() < map.capacity() / 4 {
        map.shrink_to((map.len() * 2).max(MIN_CAPACITY));
    }
}

struct Slot<O: Object> {
    actor: ActorRef<ActivationMsg<O>>,
    generation: u64,
    inflight: Arc<AtomicUsize>,
    /// The namespace's dispatch count when a message was last sent here: the order in which
    /// activations were last used, for choosing whom `max_active` sends to sleep.
    last_used: u64,
    /// Asked to hibernate early and not yet answered; counted in `Shared::evicting`.
    evicting: bool,
    /// `last_used` when the activation last declined to hibernate early (it was working or
    /// asked to stay awake); `NEVER_DECLINED` if it has not. Sweeps pass it over until it is
    /// used again, so they do not ask the same activations again and again.
    declined_at: u64,
}

/// `Slot::declined_at` of an activation that never declined.
const NEVER_DECLINED: u64 = u64::MAX;

impl<O: Object> Namespace<O> {
    pub(crate) fn new(
        name: &str,
        storage: Arc<dyn Storage>,
        alarms: Arc<Alarms>,
        commits: Arc<CommitTimer>,
        config: NamespaceConfig,
        env: O::Env,
    ) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    live: HashMap::new(),
                    hibernated: HashSet::new(),
                    parked: HashMap::new(),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            name: name.into(),
            storage,
            alarms: alarms.clone(),
            commits,
            env,
            config,
            counters: Counters::default(),
            shards,
            next_generation: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            dispatches: AtomicU64::new(0),
            evicting: AtomicUsize::new(0),
            sweeping: Mutex::new(()),
            sweep_floor: AtomicUsize::new(0),
        });
        alarms.register(name, Arc::new(AlarmHandle(Arc::downgrade(&shared))));
        Self { shared }
    }

    /// The namespace's name, the first path segment of its objects' storage keys.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &NamespaceConfig {
        &self.shared.config
    }

    /// The shared environment every instance receives on activation.
    pub fn env(&self) -> &O::Env {
        &self.shared.env
    }

    /// A handle to the object called `name`; creating it costs nothing and activates nothing.
    pub fn get(&self, name: &str) -> ObjectHandle<O> {
        ObjectHandle {
            namespace: self.clone(),
            name: name.into(),
        }
    }

    /// Sends `request` to the object called `name`, activating it if needed, and resolves
    /// with its response once the output gate releases it.
    ///
    /// The request is enqueued before this returns, not when the future is first polled, so
    /// requests issued one after another by the same task are handled in that order even if
    /// their futures are awaited later or together.
    pub fn call(
        &self,
        name: &str,
        request: O::Request,
    ) -> impl Future<Output = Result<O::Response>> + Send + 'static + use<O> {
        let (reply, response) = oneshot::channel();
        self.send(
            name,
            Work::Request(request),
            Reply::Response(reply),
            response,
        )
    }

    /// Routes an HTTP request to the object's [`Object::fetch`].
    pub fn fetch(
        &self,
        name: &str,
        request: HttpRequest,
    ) -> impl Future<Output = Result<HttpResponse>> + Send + 'static + use<O> {
        let (reply, response) = oneshot::channel();
        self.send(name, Work::Fetch(request), Reply::Http(reply), response)
    }

    /// Offers a new WebSocket client to the object's [`Object::websocket`].
    pub fn connect(
        &self,
        name: &str,
        socket: Socket,
        request: http::request::Parts,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<O> {
        let (reply, response) = oneshot::channel();
        self.send(
            name,
            Work::Connect(socket, request),
            Reply::Done(reply),
            response,
        )
    }

    /// Delivers a client's message to [`Object::socket_message`], waking the object if it
    /// hibernated (its sockets come back with their attachments).
    pub fn socket_message(
        &self,
        name: &str,
        socket: u64,
        message: Inbound,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<O> {
        let (reply, response) = oneshot::channel();
        let work = Work::SocketMessage(socket, message);
        self.send(name, work, Reply::Done(reply), response)
    }

    /// Tells the object a client's socket closed ([`Object::socket_close`]).
    pub fn socket_closed(
        &self,
        name: &str,
        socket: u64,
    ) -> impl Future<Output = Result<()>> + Send + 'static + use<O> {
        let (reply, response) = oneshot::channel();
        self.send(
            name,
            Work::SocketClose(socket),
            Reply::Done(reply),
            response,
        )
    }

    fn send<T>(
        &self,
        name: &str,
        work: Work<O>,
        reply: Reply<O>,
        response: oneshot::Receiver<Result<T>>,
    ) -> impl Future<Output = Result<T>> + Send + 'static + use<O, T>
    where
        T: Send + 'static,
    {
        let sent = self.shared.dispatch(
            name,
            ActivationMsg::Call {
                work: Box::new(work),
                reply,
            },
        );
        let what = format!("{}/{}", self.shared.name, name);
        async move {
            sent?;
            response.await.map_err(|_| Error::Unavailable(what))?
        }
    }

    /// Whether `name` is in memory, hibernated, or unknown to this process.
    pub fn state(&self, name: &str) -> ObjectState {
        let hash = name_hash(name);
        let shard = self.shared.shard(hash);
        if shard.live.contains_key(name) {
            ObjectState::Active
        } else if shard.hibernated.contains(&hash) {
            ObjectState::Hibernated
        } else {
            ObjectState::Dormant
        }
    }

    /// Connected clients of a hibernated object, counted without waking it; `None` when the
    /// object is active (ask it) or has no parked sockets.
    pub fn parked_sockets(&self, name: &str) -> Option<usize> {
        let shard = self.shared.shard(name_hash(name));
        shard.parked.get(name).map(Sockets::live)
    }

    /// The namespace's counters.
    pub fn stats(&self) -> NamespaceStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting requests, lets every activation finish what is queued and release its
    /// gated outputs, then stops them. Requests after this fail with [`Error::Unavailable`].
    pub async fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let mut waits = Vec::new();
        for shard in self.shared.shards.iter() {
            let mut shard = lock(shard);
            for (_, slot) in shard.live.drain() {
                self.shared.forget_eviction(&slot);
                let (done, wait) = oneshot::channel();
                if slot
                    .actor
                    .send_message(ActivationMsg::Shutdown(done))
                    .is_ok()
                {
                    waits.push((wait, slot.actor));
                }
                self.shared.counters.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
        for (released, actor) in waits {
            let _ = released.await;
            // Wait for the actor to be gone too, so its hold on storage is released.
            let _ = actor.get_cell().wait(None).await;
        }
    }
}

impl<O: Object> Shared<O> {
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard<O>> {
        lock(&self.shards[(hash % SHARDS as u64) as usize])
    }

    /// Enqueues `msg` on the live activation of `name`, spawning one if there is none.
    fn dispatch(self: &Arc<Self>, name: &str, mut msg: ActivationMsg<O>) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Unavailable(format!("{}/{}", self.name, name)));
        }
        let hash = name_hash(name);
        let mut shard = self.shard(hash);
        let mut spawned = false;
        loop {
            if let Some(slot) = shard.live.get_mut(name) {
                slot.inflight.fetch_add(1, Ordering::AcqRel);
                slot.last_used = self.dispatches.fetch_add(1, Ordering::Relaxed);
                match slot.actor.send_message(msg) {
                    Ok(()) => {
                        if spawned {
                            drop(shard);
                            self.keep_within_max_active();
                        }
                        return Ok(());
                    }
                    Err(MessagingErr::SendErr(back)) => {
                        // The activation died outside the protocol (it should not: handlers
                        // are isolated). Forget it and start a fresh one.
                        slot.inflight.fetch_sub(1, Ordering::AcqRel);
                        msg = back;
                        if let Some((_, slot)) = shard.remove_live(name) {
                            self.forget_eviction(&slot);
                        }
                        self.counters.active.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(_) => {
                        return Err(Error::Unavailable(format!("{}/{}", self.name, name)));
                    }
                }
            }
            let name: Arc<str> = name.into();
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            let inflight = Arc::new(AtomicUsize::new(0));
            let sockets = shard.unpark(&name);
            let args = ActivationArgs {
                shared: self.clone(),
                id: ObjectId::new(self.name.clone(), name.clone()),
                generation,
                inflight: inflight.clone(),
                sockets,
            };
            let (actor, _startup) = ActorRuntime::spawn_instant(None, ObjectActor::new(), args)
                .map_err(|e| Error::Unavailable(format!("{}/{}: {e}", self.name, name)))?;
            if shard.hibernated.remove(&hash) {
                self.counters.hibernated.fetch_sub(1, Ordering::Relaxed);
                self.counters.wakes.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.active.fetch_add(1, Ordering::Relaxed);
            shard.live.insert(
                name,
                Slot {
                    actor,
                    generation,
                    inflight,
                    last_used: 0,
                    evicting: false,
                    declined_at: NEVER_DECLINED,
                },
            );
            spawned = true;
        }
    }

    /// Past `max_active`, asks the least recently used idle activations to hibernate: the
    /// excess plus a tenth of the bound, so that under a burst of new objects a sweep (which
    /// looks at every activation) runs once per that many activations, not per activation.
    fn keep_within_max_active(&self) {
        let max = self.config.max_active;
        if max == 0 {
            return;
        }
        let over = |active: usize| active.saturating_sub(self.evicting.load(Ordering::Acquire));
        let active = self.counters.active.load(Ordering::Relaxed) as usize;
        let floor = self.sweep_floor.load(Ordering::Relaxed);
        if over(active) <= max {
            if floor != 0 {
                // Back within the bound: the next excess sweeps at once.
                self.sweep_floor.store(0, Ordering::Relaxed);
            }
            return;
        }
        if active < floor {
            return;
        }
        // One sweep at a time; activations spawned meanwhile are counted by the next.
        let Ok(_sweeping) = self.sweeping.try_lock() else {
            return;
        };
        let staying_total = self.counters.active.load(Ordering::Relaxed) as usize;
        let staying = over(staying_total);
        let Some(excess) = staying.checked_sub(max).filter(|e| *e > 0) else {
            return;
        };
        let want = excess + max.div_ceil(10);
        let mut idle: Vec<(u64, Arc<str>, u64)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            idle.extend(
                shard
                    .live
                    .iter()
                    .filter(|(_, slot)| {
                        !slot.evicting
                            && slot.declined_at != slot.last_used
                            && slot.inflight.load(Ordering::Acquire) == 0
                    })
                    .map(|(name, slot)| (slot.last_used, name.clone(), slot.generation)),
            );
        }
        if idle.len() > want {
            idle.select_nth_unstable_by_key(want, |(used, _, _)| *used);
            idle.truncate(want);
        }
        let mut asked = 0;
        for (used, name, generation) in idle {
            let mut shard = self.shard(name_hash(&name));
            let Some(slot) = shard.live.get_mut(&name) else {
                continue;
            };
            // Used since the scan: not idle any more.
            if slot.generation != generation
                || slot.last_used != used
                || slot.evicting
                || slot.inflight.load(Ordering::Acquire) != 0
            {
                continue;
            }
            if slot.actor.send_message(ActivationMsg::Evict).is_ok() {
                slot.evicting = true;
                self.evicting.fetch_add(1, Ordering::AcqRel);
                asked += 1;
            }
        }
        // Too few were idle (working, or asked to stay awake): scanning again for every
        // new activation would find the same, so wait for another tenth of the bound.
        let floor = if asked < want {
            staying_total + max.div_ceil(10)
        } else {
            0
        };
        self.sweep_floor.store(floor, Ordering::Relaxed);
    }

    /// The activation declined to hibernate early (it was working or asked to stay
    /// awake): it counts against `max_active` again, and a later sweep may ask again once
    /// it has been used since.
    pub(crate) fn eviction_declined(&self, args: &ActivationArgs<O>) {
        let name = args.id.name();
        let mut shard = self.shard(name_hash(name));
        if let Some(slot) = shard.live.get_mut(name)
            && slot.generation == args.generation
            && std::mem::take(&mut slot.evicting)
        {
            slot.declined_at = slot.last_used;
            self.evicting.fetch_sub(1, Ordering::AcqRel);
            self.counters
                .evictions_declined
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A slot leaves the directory: if it was asked to go early, that request is done.
    fn forget_eviction(&self, slot: &Slot<O>) {
        if slot.evicting {
            self.evicting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes the activation's slot if nothing is queued for it; true means the caller must
    /// stop, and that no message can reach it any more.
    pub(crate) fn try_retire(&self, args: &ActivationArgs<O>, sockets: &mut Sockets) -> bool {
        let name = args.id.name();
        let hash = name_hash(name);
        let mut shard = self.shard(hash);
        match shard.live.get(name) {
            Some(slot) if slot.generation == args.generation => {
                if slot.inflight.load(Ordering::Acquire) != 0 {
                    return false;
                }
            }
            // Already removed (shutdown) or replaced: no new message can reach this
            // activation, but one sent before may still wait in its mailbox (shutdown's
            // own message comes after it). Stop only once nothing is left unhandled.
            _ => return args.inflight.load(Ordering::Acquire) == 0,
        }
        let Some((name, slot)) = shard.remove_live(name) else {
            return true;
        };
        // Under the shard's lock: a successor activation of this name (created under it
        // too) finds the object released, never half-way. An object whose clients stay
        // connected here is parked instead, so it wakes where its sockets are. (A socket
        // whose close is still to be reported does not hold the object here: that report
        // wakes it, wherever it runs next.)
        self.forget_eviction(&slot);
        sockets.prune();
        if sockets.live() > 0 {
            self.storage.park(&args.id);
        } else {
            self.storage.release(&args.id);
        }
        if !sockets.is_empty() {
            shard.parked.insert(name, std::mem::take(sockets));
        }
        if shard.hibernated.insert(hash) {
            self.counters.hibernated.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        self.counters.hibernations.fetch_add(1, Ordering::Relaxed);
        true
    }
}

fn name_hash(name: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

/// Locks a shard, recovering from poisoning: shard state is a map updated by single
/// inserts/removes, which a panic cannot leave half-done.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The scheduler's handle on a namespace; weak, so a dropped namespace is not kept alive.
struct AlarmHandle<O: Object>(Weak<Shared<O>>);

impl<O: Object> AlarmTarget for AlarmHandle<O> {
    fn fire(&self, name: &str, attempt: u32) -> futures::future::BoxFuture<'static, Result<()>> {
        let what = name.to_string();
        let Some(shared) = self.0.upgrade() else {
            return Box::pin(async move { Err(Error::Unavailable(what)) });
        };
        let (reply, done) = oneshot::channel();
        let sent = shared.dispatch(name, ActivationMsg::Alarm { attempt, reply });
        Box::pin(async move {
            sent?;
            done.await.map_err(|_| Error::Unavailable(what))?
        })
    }
}

/// A namespace with its object type erased, so a gateway can route HTTP and WebSocket traffic
/// to namespaces of any type by name (`/v1/objects/{namespace}/{name}/...`).
pub trait DynNamespace: Send + Sync + fmt::Debug {
    /// The namespace's name.
    fn name(&self) -> &str;
    /// See [`Namespace::fetch`].
    fn fetch(&self, name: &str, request: HttpRequest) -> BoxFuture<'static, Result<HttpResponse>>;
    /// See [`Namespace::connect`].
    fn connect(
        &self,
        name: &str,
        socket: Socket,
        request: http::request::Parts,
    ) -> BoxFuture<'static, Result<()>>;
    /// See [`Namespace::socket_message`].
    fn socket_message(
        &self,
        name: &str,
        socket: u64,
        message: Inbound,
    ) -> BoxFuture<'static, Result<()>>;
    /// See [`Namespace::socket_closed`].
    fn socket_closed(&self, name: &str, socket: u64) -> BoxFuture<'static, Result<()>>;
    /// See [`Namespace::stats`].
    fn stats(&self) -> NamespaceStats;
    /// See [`Namespace::state`].
    fn state(&self, name: &str) -> ObjectState;
    /// See [`Namespace::shutdown`].
    fn shutdown(&self) -> BoxFuture<'static, ()>;
}

impl<O: Object> DynNamespace for Namespace<O> {
    fn name(&self) -> &str {
        Namespace::name(self)
    }
    fn fetch(&self, name: &str, request: HttpRequest) -> BoxFuture<'static, Result<HttpResponse>> {
        Box::pin(Namespace::fetch(self, name, request))
    }
    fn connect(
        &self,
        name: &str,
        socket: Socket,
        request: http::request::Parts,
    ) -> BoxFuture<'static, Result<()>> {
        Box::pin(Namespace::connect(self, name, socket, request))
    }
    fn socket_message(
        &self,
        name: &str,
        socket: u64,
        message: Inbound,
    ) -> BoxFuture<'static, Result<()>> {
        Box::pin(Namespace::socket_message(self, name, socket, message))
    }
    fn socket_closed(&self, name: &str, socket: u64) -> BoxFuture<'static, Result<()>> {
        Box::pin(Namespace::socket_closed(self, name, socket))
    }
    fn state(&self, name: &str) -> ObjectState {
        Namespace::state(self, name)
    }

    fn stats(&self) -> NamespaceStats {
        Namespace::stats(self)
    }
    fn shutdown(&self) -> BoxFuture<'static, ()> {
        let ns = self.clone();
        Box::pin(async move { ns.shutdown().await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_emptied_after_a_burst_gives_its_room_back() {
        let mut map: HashMap<Arc<str>, u64> = HashMap::new();
        for i in 0..100_000u64 {
            map.insert(i.to_string().into(), i);
        }
        let peak = map.capacity();
        for i in 0..99_990u64 {
            map.remove(i.to_string().as_str());
            shrink_if_sparse(&mut map);
        }
        assert_eq!(map.len(), 10);
        assert!(
            map.capacity() <= 128,
            "{} buckets kept of {peak}",
            map.capacity()
        );
        for i in 99_990..100_000u64 {
            assert_eq!(
                map.get(i.to_string().as_str()),
                Some(&i),
                "entries survive shrinking"
            );
        }
    }
}
