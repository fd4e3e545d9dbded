//! Alarms: at most one per object, persisted, fired even when the object is hibernated (the
//! firing wakes it), surviving restarts (they live in storage's due-time index), retried with
//! exponential backoff when the handler fails.
//!
//! One scheduler task per [`crate::Runtime`] sleeps until the earliest alarm in storage (or
//! until a handler sets an earlier one), then sends each due alarm to its object's mailbox
//! like any request, so an alarm never runs concurrently with a request to the same object.
//! An alarm stays in storage until its handler succeeds, so a crash mid-handler means it
//! fires again after the restart (at least once, as in Durable Objects).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dormouse_storage::{ObjectId, Storage};
use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

use crate::Result;

/// Handler attempts before an alarm is given up (and deleted).
pub(crate) const MAX_ATTEMPTS: u32 = 6;

/// Delay before retry number `attempt + 1`: 2 s, 4 s, 8 s, ... capped at 5 minutes.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempt + 1).min(300))
}

/// Milliseconds since the Unix epoch, the unit alarms are stored in.
pub(crate) fn now_ms() -> u64 {
    to_ms(SystemTime::now())
}

pub(crate) fn to_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a namespace offers the scheduler: run the alarm of one of its objects.
pub(crate) trait AlarmTarget: Send + Sync {
    /// Delivers the alarm through the object's mailbox; resolves when the handler finished.
    fn fire(&self, name: &str, attempt: u32) -> BoxFuture<'static, Result<()>>;
}

/// The runtime's alarm scheduler.
pub(crate) struct Alarms {
    storage: Arc<dyn Storage>,
    targets: Mutex<HashMap<String, Arc<dyn AlarmTarget>>>,
    /// Shared with the scheduler task, which holds only a weak reference to the rest, so a
    /// dropped runtime stops its scheduler and releases storage.
    changed: Arc<Notify>,
    started: AtomicBool,
}

impl Drop for Alarms {
    fn drop(&mut self) {
        // Wake the scheduler so it sees it is orphaned and ends.
        self.changed.notify_one();
    }
}

impl fmt::Debug for Alarms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alarms")
            .field("started", &self.started.load(Ordering::Relaxed))
            .finish()
    }
}

impl Alarms {
    pub(crate) fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            targets: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
        }
    }

    /// Makes `namespace`'s alarms deliverable, and starts the scheduler on first use (inside
    /// a tokio runtime; outside one, alarms wait until a namespace is created inside one).
    pub(crate) fn register(self: &Arc<Self>, namespace: &str, target: Arc<dyn AlarmTarget>) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.to_string(), target);
        if tokio::runtime::Handle::try_current().is_ok()
            && !self.started.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(run(Arc::downgrade(self), self.changed.clone()));
        }
        self.changed.notify_one();
    }

    /// Tells the scheduler an alarm was set, so it can wake earlier than it planned.
    pub(crate) fn changed(&self) {
        self.changed.notify_one();
    }

    fn target(&self, namespace: &str) -> Option<Arc<dyn AlarmTarget>> {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .cloned()
    }

    /// Fires every due alarm not already running; returns how long to sleep.
    fn fire_due(
        &self,
        now: u64,
        in_flight: &mut HashSet<ObjectId>,
        attempts: &HashMap<ObjectId, u32>,
        done: &mpsc::UnboundedSender<(ObjectId, Result<()>)>,
    ) -> Result<Option<Duration>> {
        let mut waiting_on_something = false;
        for (id, _at) in self.storage.due_alarms(now, 1024)? {
            if in_flight.contains(&id) {
                waiting_on_something = true;
                continue;
            }
            let Some(target) = self.target(id.namespace()) else {
                // No such namespace in this process (yet): look again later.
                waiting_on_something = true;
                continue;
            };
            let attempt = attempts.get(&id).copied().unwrap_or(0);
            debug!(object = %id, attempt, "firing alarm");
            in_flight.insert(id.clone());
            let fired = target.fire(id.name(), attempt);
            let done = done.clone();
            tokio::spawn(async move {
                let _ = done.send((id, fired.await));
            });
        }
        let next = self.storage.next_alarm()?;
        let wait = match next {
            Some((_, at)) if at > now => Some(Duration::from_millis(at - now)),
            // Due but running or undeliverable: completions and changes wake us; poll anyway.
            Some(_) => Some(Duration::from_secs(1)),
            None if waiting_on_something => Some(Duration::from_secs(1)),
            None => None,
        };
        // Cluster mode: a dead node's alarms become ours with no write here to say so.
        Ok(match (wait, self.storage.alarm_poll()) {
            (Some(wait), Some(poll)) => Some(wait.min(poll)),
            (wait, poll) => wait.or(poll),
        })
    }
}

/// The scheduler loop. Holds the scheduler only while deciding what to fire, so it ends once
/// the runtime is dropped.
async fn run(alarms: Weak<Alarms>, changed: Arc<Notify>) {
    let mut in_flight: HashSet<ObjectId> = HashSet::new();
    let mut attempts: HashMap<ObjectId, u32> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(ObjectId, Result<()>)>();
    loop {
        let wait = {
            let Some(alarms) = alarms.upgrade() else {
                return;
            };
            match alarms.fire_due(now_ms(), &mut in_flight, &attempts, &done_tx) {
                Ok(wait) => wait,
                Err(e) => {
                    warn!(error = %e, "reading alarms failed; retrying in 1 s");
                    Some(Duration::from_secs(1))
                }
            }
        };
        let sleep = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = changed.notified() => {}
            Some((id, outcome)) = done_rx.recv() => {
                in_flight.remove(&id);
                match outcome {
                    Ok(()) => {
                        attempts.remove(&id);
                    }
                    Err(e) => {
                        let n = attempts.entry(id.clone()).or_insert(0);
                        *n += 1;
                        warn!(object = %id, attempt = *n, error = %e, "alarm handler failed");
                        if *n >= MAX_ATTEMPTS {
                            attempts.remove(&id);
                        }
                    }
                }
            }
        }
    }
}
