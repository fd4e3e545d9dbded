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

use crate::alarm::{Alarms, MAX_ATTEMPTS, backoff, now_ms};
use crate::context::{Context, Effect};
use crate::gate::Gate;
use crate::namespace::Shared;
use crate::socket::Sockets;
use crate::{Error, Object, Result};

/// Messages an activation understands.
pub(crate) enum ActivationMsg<O: Object> {
    /// A request from a caller, counted in the slot's `inflight` before it was sent.
    Call {
        request: O::Request,
        reply: oneshot::Sender<Result<O::Response>>,
    },
    /// The object's alarm is due (from the scheduler, counted in `inflight` like a call).
    Alarm {
        attempt: u32,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The idle timer fired; hibernate if nothing happened since.
    IdleCheck,
    /// Orderly shutdown: release everything gated, then stop.
    Shutdown(oneshot::Sender<()>),
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
    /// The object's sockets; parked in the directory when this activation hibernates.
    sockets: Sockets,
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
            last_active: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match message {
            ActivationMsg::Call { request, reply } => {
                state.last_active = Instant::now();
                state.call(request, reply).await;
                state.args.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            ActivationMsg::Alarm { attempt, reply } => {
                state.last_active = Instant::now();
                state.fire_alarm(attempt, reply).await;
                state.args.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            ActivationMsg::IdleCheck => {
                let idle_timeout = state.args.shared.config.idle_timeout;
                let idle_for = state.last_active.elapsed();
                if idle_for < idle_timeout {
                    schedule_idle_check(&myself, idle_timeout - idle_for);
                } else if state
                    .args
                    .shared
                    .try_retire(&state.args, &mut state.sockets)
                {
                    debug!(object = %state.args.id, "hibernating");
                    myself.stop(None);
                } else {
                    // A request is queued behind this check; it will refresh `last_active`.
                    schedule_idle_check(&myself, idle_timeout);
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
    async fn call(&mut self, request: O::Request, reply: oneshot::Sender<Result<O::Response>>) {
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
        let outcome = AssertUnwindSafe(object.handle(&mut ctx, request))
            .catch_unwind()
            .await;
        match settle(&self.args.id, &shared, outcome) {
            Ok(response) => {
                let (batch, effects) = ctx.finish();
                match commit(&self.args.id, storage, &shared.alarms, batch) {
                    Ok(sync) => self.gate.submit(sync, release(effects, reply, response)),
                    Err(e) => {
                        self.object = None;
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Err(e) => {
                self.object = None;
                let _ = reply.send(Err(e));
            }
        }
    }

    async fn fire_alarm(&mut self, attempt: u32, reply: oneshot::Sender<Result<()>>) {
        let shared = self.args.shared.clone();
        if self.gate.take_poisoned() {
            self.object = None;
        }
        self.sockets.prune();
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
                match commit(&self.args.id, storage, &shared.alarms, batch) {
                    Ok(sync) => self.gate.submit(sync, release(effects, reply, ())),
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
        match commit(&self.args.id, &*shared.storage, &shared.alarms, batch) {
            Ok(sync) => self.gate.submit(sync, Box::new(|_| {})),
            Err(e) => warn!(object = %self.args.id, error = %e, "could not reschedule the alarm"),
        }
    }

    async fn activate(&mut self) -> Result<O> {
        let shared = self.args.shared.clone();
        let storage: &dyn Storage = &*shared.storage;
        let mut ctx = Context::new(&self.args.id, storage, &mut self.sockets);
        let outcome = AssertUnwindSafe(O::activate(&mut ctx, &shared.env))
            .catch_unwind()
            .await;
        let object = settle(&self.args.id, &shared, outcome)?;
        let (batch, effects) = ctx.finish();
        let sync = commit(&self.args.id, storage, &shared.alarms, batch)?;
        self.gate.submit(
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
        Ok(Err(e)) => Error::Handler {
            id: id.to_string(),
            message: format!("{e:#}"),
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
fn commit(
    id: &ObjectId,
    storage: &dyn Storage,
    alarms: &Alarms,
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
        alarms.changed();
    }
    Ok(Some(storage.sync()))
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
