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
}

impl Record {
    fn key(&self) -> Vec<u8> {
        [PREFIX, self.connection_id.as_bytes()].concat()
    }
}

/// The node's records; see the module doc.
#[derive(Debug)]
pub(crate) struct Outbox {
    storage: Arc<dyn Storage>,
    id: ObjectId,
    /// Set once the object is this node's (at once on a single node; in cluster mode once
    /// the node's former run is fenced) and what it left was queued.
    ready: AtomicBool,
}

impl Outbox {
    pub(crate) fn new(storage: Arc<dyn Storage>, node: &str) -> Self {
        Self {
            storage,
            id: object_of(node),
            ready: AtomicBool::new(false),
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
        if self.took_over().await {
            return;
        }
        let hooks = self.clone();
        tokio::spawn(async move {
            let mut pause = FIRST_PAUSE;
            while !hooks.took_over().await {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
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

    async fn take_over(self: &Arc<Self>) -> anyhow::Result<usize> {
        let own = self.outbox.id.clone();
        let sending = self.send_left(&own, "server_restart").await?;
        self.outbox.ready.store(true, Ordering::Release);
        Ok(sending.len())
    }

    /// Takes the object `from` over and sends the disconnect of every record in it, for
    /// `reason`; the deliveries, running.
    async fn send_left(
        self: &Arc<Self>,
        from: &ObjectId,
        reason: &str,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let storage = &self.outbox.storage;
        storage.acquire(from).await?;
        let mut sending = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = storage.list(from, PREFIX, after.as_deref(), PAGE)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in &page {
                match serde_json::from_slice::<Record>(value) {
                    Ok(record) => {
                        sending.push(self.send_disconnect_from(
                            from.clone(),
                            record,
                            reason.to_string(),
                        ));
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

    /// Node `node` died (cluster mode) and its records are placed on this node: sends the
    /// disconnect of each of its connections (reason `node_lost`), then gives its object
    /// up. Retried while the object cannot be taken over yet.
    pub(crate) fn take_over_dead(self: &Arc<Self>, node: String) {
        let hooks = self.clone();
        tokio::spawn(async move {
            let from = object_of(&node);
            let mut pause = FIRST_PAUSE;
            let sending = loop {
                match hooks.send_left(&from, "node_lost").await {
                    Ok(sending) => break sending,
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
            if !sending.is_empty() {
                tracing::info!(%node, disconnects = sending.len(), "sending a dead node's disconnects");
            }
            for delivery in sending {
                let _ = delivery.await;
            }
            hooks.outbox.storage.release(&from);
        });
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
            ApiError::unavailable(format!(
                "the connection's disconnect could not be promised (storage: {e}); retry"
            ))
        })
    }

    /// The connection of `record` ended for `reason`: its disconnect goes out, again and
    /// again until acknowledged, and then its record is forgotten.
    pub(crate) fn send_disconnect(self: &Arc<Self>, record: Record, reason: String) {
        let own = self.outbox.id.clone();
        self.send_disconnect_from(own, record, reason);
    }

    /// [`Hooks::send_disconnect`] for a record kept in the object `from`.
    fn send_disconnect_from(
        self: &Arc<Self>,
        from: ObjectId,
        record: Record,
        reason: String,
    ) -> tokio::task::JoinHandle<()> {
        let hooks = self.clone();
        hooks
            .counters
            .pending_disconnects
            .fetch_add(1, Ordering::Relaxed);
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
            hooks
                .counters
                .pending_disconnects
                .fetch_sub(1, Ordering::Relaxed);
        })
    }

    /// The server is stopping: disconnects still owed get up to `grace` to be delivered;
    /// what is left then is sent by the next start (the records stay).
    pub(crate) async fn stop(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.counters.pending_disconnects.load(Ordering::Acquire) > 0
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
