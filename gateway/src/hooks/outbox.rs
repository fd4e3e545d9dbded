//! Disconnects that are delivered at least once, even across a crash.
//!
//! A connection on a hook that takes `disconnect` has a record in storage (object
//! `dormouse.hooks/{node}`, key `c/{connection id}`) from before its client is told it is
//! connected until its backend acknowledged its disconnect. When the connection ends, its
//! disconnect is sent, and sent again with backoff until a 2xx comes back; then the record
//! goes. A record that outlives its process (a stop before the backend answered, a crash, a
//! power cut after the record was synced) is found by the next start of the node, whose
//! connections from before are all gone, and sent with reason `server_restart`. Every try
//! of one disconnect carries the same idempotency key, `{connection id}/disconnect`.
//!
//! In cluster mode the object is the node's own: a node restarted under its name takes it
//! over (fencing its former run) and sends what that run left. A node that dies is found
//! by the others' membership: the live node its object's name is placed on takes the object
//! over, sends every disconnect it holds (reason `node_lost`), and gives the object up once
//! they are acknowledged, so the dead node, if it comes back, takes it over again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dormouse_storage::{ObjectId, Storage, WriteBatch};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Hooks, now_ms};
use crate::error::ApiError;

/// The namespace of the nodes' hook records.
const NAMESPACE: &str = "dormouse.hooks";
/// Key prefix of a connection's record.
const PREFIX: &[u8] = b"c/";
/// The first pause before a failed disconnect is sent again; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Records read per page when a start sends what an earlier run left.
const PAGE: usize = 1000;
/// How often the sweep looks for disconnects waiting in storage.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// What is kept of a connection until its disconnect is acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) hook: String,
    pub(crate) connection_id: String,
    pub(crate) subject: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) attachment: Option<Value>,
    pub(crate) connected_at_ms: u64,
    /// Why the connection ended, once it has and its disconnect waits in storage rather
    /// than in memory (more were owed than `limits.hook_disconnects_in_memory`); the sweep
    /// sends it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) closed: Option<String>,
}

impl Record {
    fn key(&self) -> Vec<u8> {
        [PREFIX, self.connection_id.as_bytes()].concat()
    }
}

/// The node's records; see the module doc.
#[derive(Debug)]
pub(crate) struct Outbox {
    pub(super) storage: Arc<dyn Storage>,
    id: ObjectId,
    /// Set once the object is this node's (at once on a single node; in cluster mode once
    /// the node's former run is fenced) and what it left was queued.
    ready: Arc<AtomicBool>,
    /// Most disconnects being sent (and retried) at once from memory
    /// (`limits.hook_disconnects_in_memory`). Past it, a disconnect waits in storage, its
    /// reason written into its record, for the sweep: a backend that is down while many
    /// clients come and go costs disk, not a task and a record in memory each.
    max_in_memory: u64,
    /// Set when a disconnect was left in storage for the sweep.
    backlog: AtomicBool,
    /// Connections whose disconnect is being sent from memory now (the sweep skips them).
    sending: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Outbox {
    pub(crate) fn new(storage: Arc<dyn Storage>, node: &str, max_in_memory: usize) -> Self {
        Self {
            storage,
            id: object_of(node),
            max_in_memory: max_in_memory.max(1) as u64,
            ready: Arc::new(AtomicBool::new(false)),
            backlog: AtomicBool::new(false),
            sending: std::sync::Mutex::default(),
        }
    }
}

/// The object holding node `node`'s records.
pub(crate) fn object_of(node: &str) -> ObjectId {
    ObjectId::new(NAMESPACE, node)
}

impl Hooks {
    /// Takes the node's records over and sends every disconnect an earlier run left. On a
    /// single node that is done before this returns; in cluster mode, while another run of
    /// this node still owns them (for up to a node TTL), it keeps trying in the background,
    /// and hooked connections are refused until it is done.
    pub(crate) async fn start_outbox(self: &Arc<Self>) {
        if !self.any() {
            return;
        }
        let hooks = self.clone();
        let taken = self.took_over().await;
        tokio::spawn(async move {
            let mut pause = FIRST_PAUSE;
            if !taken {
                while !hooks.took_over().await {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
            hooks.sweep_forever().await;
        });
    }

    /// Sends the disconnects left in storage for want of room in memory, as room frees up.
    async fn sweep_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stopped.cancelled() => return,
            }
            if !self.outbox.backlog.swap(false, Ordering::AcqRel) {
                continue;
            }
            if let Err(e) = self.sweep() {
                tracing::warn!(error = %e, "disconnects waiting in storage not read; retrying");
                self.outbox.backlog.store(true, Ordering::Release);
            }
        }
    }

    /// One pass over the records whose connection ended: each not being sent goes out,
    /// while there is room; what is left waits for the next pass.
    fn sweep(self: &Arc<Self>) -> anyhow::Result<()> {
        let outbox = &self.outbox;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = outbox
                .storage
                .list(&outbox.id, PREFIX, after.as_deref(), PAGE)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            for (_, value) in &page {
                let Ok(record) = serde_json::from_slice::<Record>(value) else {
                    continue;
                };
                let Some(reason) = record.closed.clone() else {
                    continue;
                };
                if self.lock_sending().contains(&record.connection_id) {
                    continue;
                }
                if self.counters.pending_disconnects.load(Ordering::Acquire) >= outbox.max_in_memory
                {
                    outbox.backlog.store(true, Ordering::Release);
                    return Ok(());
                }
                self.send_disconnect(record, reason);
            }
        }
    }

    fn lock_sending(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.outbox
            .sending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn took_over(self: &Arc<Self>) -> bool {
        match self.take_over().await {
            Ok(left) => {
                if left > 0 {
                    tracing::info!(left, "sending the disconnects an earlier run left");
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "hook records not available yet; retrying");
                false
            }
        }
    }

    fn outbox_ready(&self) -> Arc<AtomicBool> {
        self.outbox.ready.clone()
    }

    async fn take_over(self: &Arc<Self>) -> anyhow::Result<usize> {
        let own = self.outbox.id.clone();
        // Ready first: what does not fit in memory is written back as waiting, which
        // needs the object this node's.
        self.outbox.ready.store(true, Ordering::Release);
        let left = self.send_left(&own, "server_restart").await?;
        // The channels an earlier run occupied: told it no longer does, unless a
        // subscriber is here again.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.outbox.storage.list(
                &own,
                super::occupancy::OCCUPYING,
                after.as_deref(),
                PAGE,
            )?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, hook) in &page {
                let channel = String::from_utf8_lossy(&key[super::occupancy::OCCUPYING.len()..]);
                self.restore_occupancy(&channel, &String::from_utf8_lossy(hook));
            }
        }
        Ok(left)
    }

    /// Takes the object `from` over and sends the disconnect of every record in it, for
    /// `reason`; the deliveries, running.
    async fn send_left(self: &Arc<Self>, from: &ObjectId, reason: &str) -> anyhow::Result<usize> {
        let storage = &self.outbox.storage;
        storage.acquire(from).await?;
        let mut sending = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = storage.list(from, PREFIX, after.as_deref(), PAGE)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in &page {
                match serde_json::from_slice::<Record>(value) {
                    Ok(record) => {
                        let reason = record.closed.clone().unwrap_or_else(|| reason.to_string());
                        self.send_disconnect(record, reason);
                        sending += 1;
                    }
                    Err(e) => {
                        // Written by this code; unreadable means damaged: said, and kept.
                        tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "an unreadable hook record");
                    }
                }
            }
        }
        Ok(sending)
    }

    /// Node `node` died (cluster mode) and its records are placed on this node: moves them
    /// into this node's own object (synced there before they leave the dead node's), gives
    /// the dead node's object up at once (so the node, if it comes back, takes it back
    /// without waiting for a backend), and sends each disconnect (reason `node_lost`) from
    /// here. Retried while the object cannot be taken over yet.
    pub(crate) fn take_over_dead(self: &Arc<Self>, node: String) {
        let hooks = self.clone();
        tokio::spawn(async move {
            let from = object_of(&node);
            let mut pause = FIRST_PAUSE;
            let moved = loop {
                match hooks.move_records(&from).await {
                    Ok(moved) => break moved,
                    Err(e) if pause < MAX_PAUSE => {
                        tracing::debug!(%node, error = %e, "a dead node's hook records not taken over yet; retrying");
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "a dead node's hook records could not be taken over; its next start sends them");
                        return;
                    }
                }
            };
            // The channels it occupied: told it no longer does. A failure leaves the rest
            // for its next start (or the next node to take it over).
            let mut pause = FIRST_PAUSE;
            while let Err(e) = hooks.leave_for_dead(&from, &node).await {
                if pause >= MAX_PAUSE {
                    tracing::warn!(%node, error = %e, "a dead node's channels not all vacated; its next start does it");
                    break;
                }
                tracing::debug!(%node, error = %e, "a dead node's channels not vacated yet; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            hooks.outbox.storage.release(&from);
            if !moved.is_empty() {
                tracing::info!(%node, disconnects = moved.len(), "sending a dead node's disconnects");
            }
            for record in moved {
                hooks.send_disconnect(record, "node_lost".to_string());
            }
        });
    }

    /// Copies every record of the object `from` into this node's own, syncs them, then
    /// deletes them from `from` and syncs that: a crash in between leaves a record in both
    /// (sent twice, which at least once allows), never in neither.
    async fn move_records(&self, from: &ObjectId) -> anyhow::Result<Vec<Record>> {
        let storage = &self.outbox.storage;
        let own = &self.outbox.id;
        anyhow::ensure!(
            self.outbox.ready.load(Ordering::Acquire),
            "this node's own records are not ready"
        );
        storage.acquire(from).await?;
        let mut moved = Vec::new();
        loop {
            let page = storage.list(from, PREFIX, None, PAGE)?;
            if page.is_empty() {
                break;
            }
            let (mut copy, mut remove) = (WriteBatch::new(), WriteBatch::new());
            for (key, value) in &page {
                match serde_json::from_slice::<Record>(value) {
                    Ok(record) => {
                        copy.put(key.clone(), value.clone());
                        moved.push(record);
                    }
                    Err(e) => {
                        tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "an unreadable hook record of a dead node, dropped");
                    }
                }
                remove.delete(key.clone());
            }
            if !copy.is_empty() {
                storage.apply(own, copy)?;
                storage.sync_object(own).await?;
            }
            storage.apply(from, remove)?;
            storage.sync_object(from).await?;
        }
        Ok(moved)
    }

    /// Stores `record` durably: the connection it names may be told it is connected once
    /// this returns. Refused (503) until the node's records are ready, or when storage
    /// cannot take it.
    pub(crate) async fn opened(&self, record: &Record) -> Result<(), ApiError> {
        let outbox = &self.outbox;
        if !outbox.ready.load(Ordering::Acquire) {
            return Err(ApiError::unavailable(
                "this node's hook records are not ready yet (it is taking them over from \
                 its previous run); retry shortly",
            )
            .retry_after(1));
        }
        let mut batch = WriteBatch::new();
        batch.put(record.key(), serde_json::to_vec(record).unwrap_or_default());
        let stored = outbox.storage.apply(&outbox.id, batch);
        let synced = match stored {
            Ok(()) => outbox.storage.sync_object(&outbox.id).await,
            Err(e) => Err(e),
        };
        synced.map_err(|e| {
            tracing::warn!(error = %e, connection = %record.connection_id, "a hook record was not stored");
            // Cluster mode: another node took this node's records over while it seemed dead
            // (a pause, a cut-off), or the journal could not replicate: the object must be
            // acquired again before it takes writes. Until then, refuse. (On a single node
            // acquiring is immediate, and a full disk refuses by itself.)
            self.retake();
            ApiError::unavailable(format!(
                "the connection's disconnect could not be promised (storage: {e}); retry"
            ))
            .retry_after(1)
        })
    }

    /// Writes `batch` into this node's records and syncs it; refused until they are this
    /// node's.
    pub(crate) async fn outbox_write(&self, batch: WriteBatch) -> anyhow::Result<()> {
        let outbox = &self.outbox;
        self.outbox_write_unsynced(batch)?;
        outbox.storage.sync_object(&outbox.id).await?;
        Ok(())
    }

    /// [`Hooks::outbox_write`] without waiting for the sync.
    pub(crate) fn outbox_write_unsynced(&self, batch: WriteBatch) -> anyhow::Result<()> {
        let outbox = &self.outbox;
        anyhow::ensure!(
            outbox.ready.load(Ordering::Acquire),
            "this node's hook records are not ready yet"
        );
        outbox.storage.apply(&outbox.id, batch)?;
        Ok(())
    }

    /// Takes this node's records back after another node took them over, and serves again
    /// once it has. Sends nothing: what the other node took, it sends; a record it could
    /// not remove is sent once more at this node's next start.
    fn retake(&self) {
        if !self.outbox.ready.swap(false, Ordering::AcqRel) {
            return;
        }
        let (storage, id) = (self.outbox.storage.clone(), self.outbox.id.clone());
        let ready = self.outbox_ready();
        tokio::spawn(async move {
            let mut pause = FIRST_PAUSE;
            while let Err(e) = storage.acquire(&id).await {
                tracing::warn!(error = %e, "hook records not taken back yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            ready.store(true, Ordering::Release);
        });
    }

    /// The connection of `record` ended for `reason`: its disconnect goes out, again and
    /// again until acknowledged, and then its record (in this node's object) is forgotten.
    /// Past `limits.hook_disconnects_in_memory` in flight it waits in storage for the sweep.
    pub(crate) fn send_disconnect(self: &Arc<Self>, mut record: Record, reason: String) {
        let hooks = self.clone();
        let from = self.outbox.id.clone();
        let pending = hooks
            .counters
            .pending_disconnects
            .fetch_add(1, Ordering::AcqRel);
        if pending >= self.outbox.max_in_memory {
            hooks
                .counters
                .pending_disconnects
                .fetch_sub(1, Ordering::AcqRel);
            record.closed = Some(reason);
            let mut batch = WriteBatch::new();
            batch.put(
                record.key(),
                serde_json::to_vec(&record).unwrap_or_default(),
            );
            // Not synced: lost in a crash, the record is sent by the next start instead
            // (reason `server_restart`).
            if let Err(e) = self.outbox.storage.apply(&from, batch) {
                tracing::warn!(error = %e, connection = %record.connection_id, "a waiting disconnect was not written; the next start sends it");
            }
            self.outbox.backlog.store(true, Ordering::Release);
            return;
        }
        if !self.lock_sending().insert(record.connection_id.clone()) {
            // Already being sent (a sweep and a take-over met): once is enough here.
            hooks
                .counters
                .pending_disconnects
                .fetch_sub(1, Ordering::AcqRel);
            return;
        }
        tokio::spawn(async move {
            let delivered = tokio::select! {
                () = hooks.deliver(&record, &reason) => true,
                () = hooks.stopped.cancelled() => false,
            };
            if delivered {
                let mut batch = WriteBatch::new();
                batch.delete(record.key());
                // Not waited for: a delete that a crash loses sends the disconnect once
                // more, which at least once allows.
                if let Err(e) = hooks.outbox.storage.apply(&from, batch) {
                    tracing::warn!(error = %e, connection = %record.connection_id, "a delivered disconnect's record was not removed");
                }
            }
            // Otherwise the record stays for the next start.
            hooks.lock_sending().remove(&record.connection_id);
            hooks
                .counters
                .pending_disconnects
                .fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// The server is stopping: disconnects still owed get up to `grace` to be delivered;
    /// what is left then is sent by the next start (the records stay).
    pub(crate) async fn stop(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while (self.counters.pending_disconnects.load(Ordering::Acquire) > 0
            || self.occupancy.pending.load(Ordering::Acquire) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stopped.cancel();
        // Let the cancelled deliveries see it before storage closes under them.
        tokio::task::yield_now().await;
    }

    async fn deliver(&self, record: &Record, reason: &str) {
        let Some(route) = self.named(&record.hook).filter(|r| r.takes("disconnect")) else {
            tracing::warn!(hook = %record.hook, connection = %record.connection_id, "a disconnect for a hook no longer configured to take it is dropped");
            return;
        };
        let body = json!({
            "event": "disconnect",
            "hook": record.hook,
            "connection_id": record.connection_id,
            "subject": record.subject,
            "channel": record.channel,
            "attachment": record.attachment,
            "reason": reason,
            "connected_at_ms": record.connected_at_ms,
            "time_ms": now_ms(),
        });
        let key = format!("{}/disconnect", record.connection_id);
        let mut pause = FIRST_PAUSE;
        while self.call(route, "disconnect", &key, &body).await.is_err() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}
