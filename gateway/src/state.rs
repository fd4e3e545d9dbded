//! What every request handler shares: one [`AppState`], built by `server.rs` and handed to
//! the router. It holds only handles to lower layers (runtime, publisher, auth, limits,
//! telemetry, the stop signal), and nothing below the handlers imports it, so the layers
//! stay one-way: handlers and middleware above, the services they call below.

use crate::cluster::ClusterNode;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use dormouse_actors::Channel;
use dormouse_actors::channel::NAMESPACE;
use dormouse_runtime::{DynNamespace, Namespace, Runtime};
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Settings;
use crate::conn::Stopping;
use crate::connections::ConnectionTable;
use crate::hooks::Hooks;
use crate::limits::Limits;
use crate::publisher::Publisher;
use crate::telemetry::Telemetry;

/// Everything a request handler may need; cloned per request (all fields are handles).
#[derive(Debug, Clone)]
pub struct AppState {
    /// The object host.
    pub runtime: Runtime,
    /// The channel objects.
    pub channels: Namespace<Channel>,
    /// Every publish to a channel goes through it (merging concurrent ones).
    pub publisher: Publisher,
    /// The configuration in force.
    pub settings: Arc<Settings>,
    /// Verifies credentials; allows everything when none is configured.
    pub auth: Auth,
    /// Overload shedding and publish rate limits.
    pub limits: Arc<Limits>,
    /// User-defined object namespaces mounted under `/v1/objects/{namespace}/...`.
    pub objects: Arc<RwLock<HashMap<String, Arc<dyn DynNamespace>>>>,
    /// Long-lived connection tasks (WebSockets), so a stop can wait for them to let go of
    /// storage.
    pub tasks: TaskTracker,
    /// Set when the server is stopping, so long-lived connections can say goodbye (SSE:
    /// reconnect hint; WebSocket: close 1012 "service restart").
    pub stopping: Stopping,
    /// The server's own figures: `/metrics` and the admin page.
    pub telemetry: Arc<Telemetry>,
    /// Cluster mode's node; `None` on a single node.
    pub cluster: Option<Arc<ClusterNode>>,
    /// This node's SSE and WebSocket connections, for the server-side connection API.
    pub connections: Arc<ConnectionTable>,
    /// Upstream hooks (`[[hooks]]`).
    pub(crate) hooks: Arc<Hooks>,
}

impl AppState {
    /// A new client connection's socket, its queue bounded by `limits.subscriber_queue`:
    /// every kind of connection (channel, object, hook, a cluster proxy) is cut off as a
    /// slow consumer at the same size.
    pub(crate) fn client_socket(
        &self,
        transport: dormouse_runtime::Transport,
    ) -> (dormouse_runtime::Socket, dormouse_runtime::SocketReceiver) {
        let queue = self.settings.limits.subscriber_queue.0 as usize;
        dormouse_runtime::Socket::new(transport, queue, bytes::Bytes::new())
    }

    /// Tells the channels `socket` follows who it is, for presence: `subject` and its
    /// client `info`. Costs nothing where no channel keeps presence.
    pub(crate) fn identify(
        &self,
        socket: &dormouse_runtime::Socket,
        subject: &str,
        info: Option<bytes::Bytes>,
    ) {
        if self.publisher.any_presence() {
            let member = dormouse_actors::channel::Member {
                subject: std::sync::Arc::from(subject),
                info,
            };
            socket.set_attachment(member.attachment());
        }
    }

    /// Each namespace's counters (channels first), read from the runtime at call time.
    pub(crate) fn namespace_stats(&self) -> Vec<(String, dormouse_runtime::NamespaceStats)> {
        let mut all = vec![(NAMESPACE.to_string(), self.channels.stats())];
        let objects = self.objects.read().unwrap_or_else(|p| p.into_inner());
        let mut mounted: Vec<_> = objects
            .iter()
            .map(|(name, ns)| (name.clone(), ns.stats()))
            .collect();
        mounted.sort_by(|a, b| a.0.cmp(&b.0));
        all.extend(mounted);
        all
    }

    /// The mounted namespace called `name`.
    pub(crate) fn object_namespace(&self, name: &str) -> Option<Arc<dyn DynNamespace>> {
        self.objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}
