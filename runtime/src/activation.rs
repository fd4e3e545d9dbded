//! One live object, hosted by a ractor actor. Private to the crate: users see [`Object`].
//!
//! The actor processes its mailbox one message at a time, which is what makes requests to an
//! object never overlap. It builds the object lazily on the first request (so a failed
//! activation fails that request rather than the spawn), and rebuilds it after any failure.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dormouse_storage::{ObjectId, Storage, Write, WriteBatch};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::alarm::{MAX_ATTEMPTS, backoff, now_ms};
use crate::context::{Context, Effect, Lifecycle};
use crate::gate::Gate;
use crate::namespace::Shared;
use crate::socket::{Inbound, Socket, Sockets};
use crate::{Error, HttpRequest, HttpResponse, Object, Result};

/// Messages an activation understands.
pub(crate) enum ActivationMsg<O: Object> {
    /// Work from a caller (a typed request, an HTTP request, a socket event), counted in
    /// the slot's `inflight` before it was sent.
    Call { work: Box<Work<O>>, reply: Reply<O> },
    /// The object's alarm is due (from the scheduler, counted in `inflight` like a call).
    Alarm {
        attempt: u32,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The idle timer fired; hibernate if nothing happened since.
    IdleCheck,
    /// The namespace holds more activations than its `max_active`, and this is one of the
    /// least recently used: hibernate now unless working or asked to stay awake.
    Evict,
    /// Orderly shutdown: release everything gated, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// What a caller asks an object to do; each kind runs one of the `Object` hooks.
pub(crate) enum Work<O: Object> {
    Request(O::Request),
    Fetch(HttpRequest),
    Connect(Socket, http::request::Parts),
    SocketMessage(u64, Inbound),
    SocketClose(u64),
}

/// Where the outcome of a [`Work`] goes; the variant always matches the work's kind.
pub(crate) enum Reply<O: Object> {
    Response(oneshot::Sender<Result<O::Response>>),
    Http(oneshot::Sender<Result<HttpResponse>>),
    Done(oneshot::Sender<Result<()>>),
}

enum Output<O: Object> {
    Response(O::Response),
    Http(HttpResponse),
    Done,
}

impl<O: Object> Reply<O> {
    fn fail(self, e: Error) {
        match self {
            Self::Response(tx) => drop(tx.send(Err(e))),
            Self::Http(tx) => drop(tx.send(Err(e))),
            Self::Done(tx) => drop(tx.send(Err(e))),
        }
    }

    fn succeed(self, output: Output<O>) {
        match (self, output) {
            (Self::Response(tx), Output::Response(r)) => drop(tx.send(Ok(r))),
            (Self::Http(tx), Output::Http(r)) => drop(tx.send(Ok(r))),
            (Self::Done(tx), Output::Done) => drop(tx.send(Ok(()))),
            (reply, _) => reply.fail(Error::Unavailable(
                "mismatched reply (a runtime bug)".into(),
            )),
        }
    }
}

/// Runs one unit of work against the object.
async fn run_work<O: Object>(
    object: &mut O,
    ctx: &mut Context<'_>,
    work: Work<O>,
) -> anyhow::Result<Output<O>> {
    match work {
        Work::Request(request) => object.handle(ctx, request).await.map(Output::Response),
        Work::Fetch(request) => object.fetch(ctx, request).await.map(Output::Http),
        Work::Connect(socket, parts) => {
            let (id, offered) = (socket.id(), socket.clone());
            object.websocket(ctx, socket, parts).await?;
            if ctx.socket(id).is_none() {
                // Not accepted: the object's decision, so the client is told it is final
                // (1000) rather than left to reconnect, as a socket that is merely lost is.
                // After whatever the object itself sends once its work commits (and never
                // instead of a close of its own, which comes first).
                ctx.after_commit(move || {
                    offered.send(crate::Outbound::Close {
                        code: 1000,
                        reason: "the object did not accept the connection".to_string(),
                    });
                });
            }
            Ok(Output::Done)
        }
        Work::SocketMessage(id, message) => {
            // A socket dropped by the object (or gone) has nobody to hear it.
            if let Some(socket) = ctx.socket(id) {
                object.socket_message(ctx, &socket, message).await?;
            }
            Ok(Output::Done)
        }
        Work::SocketClose(id) => {
            if let Some(socket) = ctx.remove_socket(id) {
                object.socket_close(ctx, &socket).await?;
            }
            Ok(Output::Done)
        }
    }
}

/// The ractor actor type; a marker, all state lives in [`ActivationState`].
pub(crate) struct ObjectActor<O>(PhantomData<fn() -> O>);

impl<O> ObjectActor<O> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

/// What a new activation is told by the directory that spawned it.
pub(crate) struct ActivationArgs<O: Object> {
    pub(crate) shared: Arc<Shared<O>>,
    pub(crate) id: ObjectId,
    /// Distinguishes this activation's directory slot from a later one for the same name.
    pub(crate) generation: u64,
    /// Requests sent to this activation and not yet processed; shared with the slot.
    pub(crate) inflight: Arc<AtomicUsize>,
    /// Sockets parked by the previous activation's hibernation, handed back.
    pub(crate) sockets: Sockets,
}

pub(crate) struct ActivationState<O: Object> {
    args: ActivationArgs<O>,
    /// `None` before the first request and after a failure: rebuilt from storage on demand.
    object: Option<O>,
    gate: Gate,
    last_active: Instant,
    /// Set by [`Context::stay_awake_for`]: no hibernation before this.
    awake_until: Option<Instant>,
    /// The object's sockets; parked in the directory when this activation hibernates.
    sockets: Sockets,
    /// The gate's failure count when `object` was built; see [`crate::gate`].
    basis: u64,
}

impl<O: Object> Actor for ObjectActor<O> {
    type Msg = ActivationMsg<O>;
    type State = ActivationState<O>;
    type Arguments = ActivationArgs<O>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: Self::Arguments,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        schedule_idle_check(&myself, args.shared.config.idle_timeout);
        let sockets = std::mem::take(&mut args.sockets);
        Ok(ActivationState {
            args,
            sockets,
            object: None,
            gate: Gate::default(),
            basis: 0,
            last_active: Instant::now(),
            awake_until: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match message {
            ActivationMsg::Call { work, reply } => {
                state.last_active = Instant::now();
                let lifecycle = state.call(*work, reply).await;
                state.args.inflight.fetch_sub(1, Ordering::AcqRel);
                match lifecycle {
                    Lifecycle::Default => {}
                    Lifecycle::StayAwake(until) => {
                        state.awake_until = Some(state.awake_until.map_or(until, |u| u.max(until)));
                    }
                    Lifecycle::Hibernate => {
                        state.awake_until = None;
                        state.last_active = Instant::now() - state.args.shared.config.idle_timeout;
                        schedule_idle_check(&myself, Duration::ZERO);
                    }
                }
            }
            ActivationMsg::Alarm { attempt, reply } => {
                state.last_active = Instant::now();
                state.fire_alarm(attempt, reply).await;
                state.args.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            ActivationMsg::IdleCheck => {
                let idle_timeout = state.args.shared.config.idle_timeout;
                let idle_for = state.last_active.elapsed();
                if let Some(until) = state.awake_until.filter(|u| *u > Instant::now()) {
                    schedule_idle_check(&myself, until - Instant::now());
                } else if idle_for < idle_timeout {
                    schedule_idle_check(&myself, idle_timeout - idle_for);
                } else if state.gate.is_busy() {
                    // Writes still on their way to disk: retire only once they are durable.
                    schedule_idle_check(&myself, Duration::from_millis(1).max(idle_timeout / 4));
                } else if !state.retire(&myself, "hibernating") {
                    // A request is queued behind this check; it will refresh `last_active`.
                    schedule_idle_check(&myself, idle_timeout);
                }
            }
            ActivationMsg::Evict => {
                let awake = state.awake_until.is_some_and(|u| u > Instant::now());
                if awake
                    || state.gate.is_busy()
                    || !state.retire(&myself, "hibernating early: too many active")
                {
                    state.args.shared.eviction_declined(&state.args);
                }
            }
            ActivationMsg::Shutdown(done) => {
                state.gate.drain().await;
                let _ = done.send(());
                myself.stop(None);
            }
        }
        Ok(())
    }
}

fn schedule_idle_check<O: Object>(myself: &ActorRef<ActivationMsg<O>>, after: Duration) {
    // The timer task is detached; if the actor is gone when it fires, the send just fails.
    drop(myself.send_after(after, || ActivationMsg::IdleCheck));
}

impl<O: Object> ActivationState<O> {
    /// Leaves the directory and stops, parking the sockets, unless something was sent
    /// here that is not handled yet; true when it stopped.
    fn retire(&mut self, myself: &ActorRef<ActivationMsg<O>>, why: &str) -> bool {
        let retired = self.args.shared.try_retire(&self.args, &mut self.sockets);
        if retired {
            debug!(object = %self.args.id, "{why}");
            myself.stop(None);
        }
        retired
    }

    async fn call(&mut self, work: Work<O>, reply: Reply<O>) -> Lifecycle {
        let shared = self.args.shared.clone();
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        if self.gate.take_poisoned() {
            self.object = None;
        }
        self.sockets.prune();
        if self.object.is_none() {
            match self.activate().await {
                Ok(object) => self.object = Some(object),
                Err(e) => {
                    reply.fail(e);
                    return Lifecycle::Default;
                }
            }
        }
        let Some(object) = self.object.as_mut() else {
            return Lifecycle::Default;
        };
        let storage: &dyn Storage = &*shared.storage;
        let mut ctx = Context::new(&self.args.id, storage, &mut self.sockets);
        let outcome = AssertUnwindSafe(run_work(object, &mut ctx, work))
            .catch_unwind()
            .await;
        match settle(&self.args.id, &shared, outcome) {
            Ok(output) => {
                let lifecycle = ctx.lifecycle();
                let (batch, effects) = ctx.finish();
                match commit(&self.args.id, storage, &shared, batch) {
                    Ok(sync) => self.gate.submit(
                        self.basis,
                        sync,
                        Box::new(move |outcome| match outcome {
                            Ok(()) => {
                                run_effects(effects);
                                reply.succeed(output);
                            }
                            Err(e) => reply.fail(e),
                        }),
                    ),
                    Err(e) => {
                        self.object = None;
                        reply.fail(e);
                    }
                }
                lifecycle
            }
            Err(e) => {
                self.object = None;
                reply.fail(e);
                Lifecycle::Default
            }
        }
    }

    async fn fire_alarm(&mut self, attempt: u32, reply: oneshot::Sender<Result<()>>) {
        let shared = self.args.shared.clone();
        if self.gate.take_poisoned() {
            self.object = None;
        }
        self.sockets.prune();
        if self.object.is_none()
            && let Err(e) = shared.storage.acquire(&self.args.id).await
        {
            // Owned elsewhere (cluster mode): the owner's scheduler fires it.
            let _ = reply.send(Err(e.into()));
            return;
        }
        // A request may have moved or deleted the alarm since the scheduler read it.
        match shared.storage.alarm(&self.args.id) {
            Ok(Some(at)) if at <= now_ms() => {}
            Ok(_) => {
                let _ = reply.send(Ok(()));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        }
        if self.object.is_none() {
            match self.activate().await {
                Ok(object) => self.object = Some(object),
                Err(e) => {
                    self.retry_alarm(attempt);
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        let Some(object) = self.object.as_mut() else {
            return;
        };
        let storage: &dyn Storage = &*shared.storage;
        let mut ctx = Context::new(&self.args.id, storage, &mut self.sockets);
        let outcome = AssertUnwindSafe(object.alarm(&mut ctx))
            .catch_unwind()
            .await;
        match settle(&self.args.id, &shared, outcome) {
            Ok(()) => {
                let touched = ctx.touched_alarm();
                let (mut batch, effects) = ctx.finish();
                if !touched {
                    batch.push(Write::DeleteAlarm);
                }
                match commit(&self.args.id, storage, &shared, batch) {
                    Ok(sync) => self
                        .gate
                        .submit(self.basis, sync, release(effects, reply, ())),
                    Err(e) => {
                        self.object = None;
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Err(e) => {
                self.object = None;
                self.retry_alarm(attempt);
                let _ = reply.send(Err(e));
            }
        }
    }

    /// After a failed alarm handler: reschedule with backoff, or give up after the last
    /// attempt. The write goes through the gate like any other.
    fn retry_alarm(&mut self, attempt: u32) {
        let shared = self.args.shared.clone();
        let mut batch = WriteBatch::new();
        if attempt + 1 >= MAX_ATTEMPTS {
            warn!(object = %self.args.id, attempts = attempt + 1, "alarm failed every attempt; giving up");
            batch.push(Write::DeleteAlarm);
        } else {
            let retry_at = now_ms() + backoff(attempt).as_millis() as u64;
            batch.push(Write::SetAlarm { at_ms: retry_at });
        }
        match commit(&self.args.id, &*shared.storage, &shared, batch) {
            Ok(sync) => self.gate.submit(self.basis, sync, Box::new(|_| {})),
            Err(e) => warn!(object = %self.args.id, error = %e, "could not reschedule the alarm"),
        }
    }

    async fn activate(&mut self) -> Result<O> {
        let shared = self.args.shared.clone();
        // Cluster mode: take the object over here (or learn who owns it) before reading it.
        shared.storage.acquire(&self.args.id).await?;
        self.basis = self.gate.failures();
        let storage: &dyn Storage = &*shared.storage;
        let mut ctx = Context::new(&self.args.id, storage, &mut self.sockets);
        let outcome = AssertUnwindSafe(O::activate(&mut ctx, &shared.env))
            .catch_unwind()
            .await;
        let object = settle(&self.args.id, &shared, outcome)?;
        let (batch, effects) = ctx.finish();
        let sync = commit(&self.args.id, storage, &shared, batch)?;
        self.gate.submit(
            self.basis,
            sync,
            Box::new(move |outcome| {
                if outcome.is_ok() {
                    run_effects(effects);
                }
            }),
        );
        shared.counters.activations.fetch_add(1, Ordering::Relaxed);
        debug!(object = %self.args.id, "activated");
        Ok(object)
    }
}

/// Turns a handler's outcome (including a panic) into the runtime's error vocabulary.
fn settle<O: Object, T>(
    id: &ObjectId,
    shared: &Shared<O>,
    outcome: std::thread::Result<anyhow::Result<T>>,
) -> Result<T> {
    let error = match outcome {
        Ok(Ok(value)) => return Ok(value),
        // A storage failure that a handler passed on with `?` is still a storage failure
        // (a full disk is a 507, not a bug in the object).
        Ok(Err(e)) => match storage_cause(&e) {
            Some(cause) => Error::Storage(cause),
            None => Error::Handler {
                id: id.to_string(),
                message: format!("{e:#}"),
            },
        },
        Err(panic) => Error::Panicked {
            id: id.to_string(),
            message: panic_message(panic.as_ref()),
        },
    };
    shared.counters.failures.fetch_add(1, Ordering::Relaxed);
    warn!(object = %id, error = %error, "object failed; it will be rebuilt from storage");
    Err(error)
}

/// The storage error somewhere in a handler's error chain, if any.
fn storage_cause(e: &anyhow::Error) -> Option<Arc<dormouse_storage::Error>> {
    e.chain().find_map(|cause| {
        cause
            .downcast_ref::<dormouse_storage::Error>()
            .map(|inner| Arc::new(inner.clone()))
            .or_else(|| match cause.downcast_ref::<Error>() {
                Some(Error::Storage(inner)) => Some(Arc::clone(inner)),
                _ => None,
            })
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Applies a handler's writes; returns the commit to wait for, or `None` if it wrote nothing.
fn commit<O: Object>(
    id: &ObjectId,
    storage: &dyn Storage,
    shared: &Shared<O>,
    batch: WriteBatch,
) -> Result<Option<dormouse_storage::SyncFuture>> {
    if batch.is_empty() {
        return Ok(None);
    }
    let sets_alarm = batch
        .writes()
        .iter()
        .any(|w| matches!(w, Write::SetAlarm { .. }));
    storage.apply(id, batch)?;
    if sets_alarm {
        shared.alarms.changed();
    }
    Ok(Some(shared.commits.time(storage.sync_object(id))))
}

fn release<T: Send + 'static>(
    effects: Vec<Effect>,
    reply: oneshot::Sender<Result<T>>,
    response: T,
) -> crate::gate::Release {
    Box::new(move |outcome| match outcome {
        Ok(()) => {
            run_effects(effects);
            let _ = reply.send(Ok(response));
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    })
}

/// Runs released effects; a panicking effect is logged and skipped so it cannot stall the
/// gate for the requests behind it.
fn run_effects(effects: Vec<Effect>) {
    for effect in effects {
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(effect)) {
            warn!(panic = %panic_message(panic.as_ref()), "an after-commit effect panicked");
        }
    }
}
