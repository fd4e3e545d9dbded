//! Cluster mode in the gateway: any node serves any client.
//!
//! - Objects' (and channels') records live in [`ClusterStorage`], a fenced journal per
//!   object in NATS JetStream; a node holds an object only while its activation runs here.
//! - A call to a channel or an object goes where the object is owned: here when its
//!   activation is here or when this node claims it, else to the owner over NATS
//!   request/reply ([`ClusterNode::channel_call`], [`ClusterNode::fetch`]). The client is
//!   answered once the owner's journal append is acknowledged by the JetStream quorum.
//! - A subscriber stays on the node it connected to and is served by a copy of its channel
//!   kept current from the journal (`copies`), whichever node owns the channel.
//! - A WebSocket to a user object stays on the node it connected to too; the object, on its
//!   owner, holds a socket whose frames are relayed there (`sockets`).
//!
//! docs/CLUSTER.md describes the design, the guarantees and the limits.

mod copies;
mod sockets;
pub(crate) mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use dormouse_actors::Channel;
use dormouse_actors::channel::{ChannelEnv, ChannelRequest, ChannelResponse, NAMESPACE, Start};
use dormouse_cluster::{
    ClusterStorage, Directory, DirectorySpec, JournalSpec, Membership, Nats, NatsSettings, NodeId,
    RpcError, RpcServer, connect, place, rpc,
};
use dormouse_runtime::{
    DynNamespace, Error, HttpRequest, HttpResponse, Inbound, Namespace, NamespaceConfig,
    ObjectState, Result, Socket, Transport,
};
use dormouse_storage::ObjectId;
use tracing::{debug, info, warn};

use crate::config::ClusterSettings;
use crate::connections::{self, Op, Outcome, ParsedId};
use crate::state::AppState;
use copies::Copies;
pub(crate) use wire::ChannelCall;
use wire::{Answer, Forwarded};

/// How many times a call follows an owner that moved before it gives up.
const MAX_HOPS: usize = 4;
/// How long a forwarded call waits for the owner's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connections call may take on the node that serves them: queueing a message
/// on each of a node's connections takes milliseconds, even for a hundred thousand.
const CONNECTIONS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a forwarded call in flight checks that its owner still counts as alive.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);
/// The request kind that only asks whether a node is there.
const PING: &str = "ping";
/// How long a ping waits: a node that is gone is known at once (no responders).
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a starting node waits for JetStream to answer.
const JETSTREAM_PATIENCE: Duration = Duration::from_secs(30);
/// Room a forwarded message keeps for its headers and encoding.
const ENVELOPE: usize = 4 * 1024;
/// How often the NATS round trip is measured.
const RTT_EVERY: Duration = Duration::from_secs(5);

impl ClusterSettings {
    /// The NATS connection these settings describe.
    pub fn nats(&self) -> NatsSettings {
        let given = |path: &PathBuf| (!path.as_os_str().is_empty()).then(|| path.clone());
        let mut nats = NatsSettings::new(self.nats_urls.clone(), self.node());
        nats.credentials = given(&self.nats_credentials);
        nats.tls_ca = given(&self.nats_tls_ca);
        nats.tls_client = given(&self.nats_tls_cert).zip(given(&self.nats_tls_key));
        nats
    }
}

/// This node's part in a cluster; see the module doc.
pub struct ClusterNode {
    nats: Nats,
    storage: ClusterStorage,
    membership: Arc<Membership>,
    directory: Directory,
    copies: Copies,
    rpc: Mutex<Option<RpcServer>>,
    /// Sockets of objects owned here whose connections are on other nodes.
    relays: sockets::Relays,
    /// This node's own tasks (reporting lost relayed sockets, timing NATS), stopped when it
    /// leaves.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Connections here to objects owned by another node.
    pub(crate) relayed_here: AtomicU64,
    /// The last round trip to the NATS server (a PING answered), in microseconds; 0 before
    /// the first, or while none is answered.
    nats_rtt_micros: AtomicU64,
    /// The largest message the NATS servers take.
    max_payload: usize,
    /// Calls sent to another node, served for another node, and redirected because the
    /// owner had moved.
    pub(crate) forwarded: AtomicU64,
    pub(crate) served: AtomicU64,
    pub(crate) moved: AtomicU64,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node", self.membership.me())
            .finish_non_exhaustive()
    }
}

/// Where a WebSocket to a user object was connected.
pub(crate) enum SocketLink {
    /// To the object here: messages and the close go to the local namespace.
    Here,
    /// To a socket on the owner, relayed.
    Remote(RemoteLink),
}

/// A connection here relayed to its object's socket on another node. Dropped without
/// [`ClusterNode::remote_closed`] (the upgrade never happened, the handler was cancelled),
/// it still tells the owner, so the object does not keep a socket nobody reads.
pub(crate) struct RemoteLink {
    owner: NodeId,
    namespace: String,
    name: String,
    /// The owner's id for its socket.
    socket: u64,
    /// Feeds the owner's frames into the connection.
    feeding: tokio::task::JoinHandle<()>,
    node: std::sync::Weak<ClusterNode>,
    /// The owner was told of the close.
    closed: bool,
}

impl RemoteLink {
    fn close_call(&self) -> Forwarded {
        Forwarded::SocketClosed {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            socket: self.socket,
        }
    }
}

impl Drop for RemoteLink {
    fn drop(&mut self) {
        self.feeding.abort();
        let Some(node) = self.node.upgrade() else {
            return;
        };
        node.relayed_here.fetch_sub(1, Ordering::Relaxed);
        // Outside a runtime (the process is going away) the owner's probe finds it instead.
        if !self.closed
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (owner, call) = (self.owner.clone(), self.close_call());
            runtime.spawn(async move {
                let _ = remote_call(&node, &owner, &call).await;
            });
        }
    }
}

/// Why a call about a relayed socket failed, and whether the owner lost the socket.
#[derive(Debug)]
pub(crate) struct RemoteFailure {
    pub(crate) error: Error,
    /// The owner no longer has the socket: the connection should be closed.
    pub(crate) lost: bool,
}

/// A call about a relayed socket, to its owner.
async fn remote_call(
    node: &ClusterNode,
    owner: &NodeId,
    call: &Forwarded,
) -> std::result::Result<(), RemoteFailure> {
    match node.send_watching(owner, call).await {
        Ok(Answer::Done) => Ok(()),
        Ok(Answer::Failed(error)) => Err(RemoteFailure {
            lost: node.owner_named(&error).is_some(),
            error,
        }),
        Ok(_) => Err(RemoteFailure {
            error: Error::Unavailable("an answer of another kind".into()),
            lost: false,
        }),
        // Nobody answers for it, it restarted, or it stopped counting as alive.
        Err(e) => Err(RemoteFailure {
            error: Error::Unavailable(format!("the owner, node {owner}: {e}")),
            lost: true,
        }),
    }
}

/// Where a call goes.
enum Target {
    Here,
    Node(NodeId),
}

/// The bytes a history page takes in a forwarded answer, about.
fn history_bytes(page: &dormouse_actors::channel::HistoryPage) -> usize {
    page.events
        .iter()
        .map(|e| 64 + e.name.len() + e.data.len())
        .sum()
}

/// This node's membership, the owner directory and the journal.
async fn open_parts(
    nats: &Nats,
    spec: &DirectorySpec,
    me: &NodeId,
    replicas: usize,
) -> anyhow::Result<(Arc<Membership>, Directory, ClusterStorage)> {
    let membership = Arc::new(Membership::join(nats, spec, me.clone()).await?);
    let directory = Directory::open(nats, spec).await?;
    let storage = ClusterStorage::open(
        nats,
        membership.clone(),
        directory.clone(),
        JournalSpec::new("dm", replicas),
    )
    .await?;
    Ok((membership, directory, storage))
}

impl ClusterNode {
    /// Connects to NATS (refusing servers that cannot fence), announces this node, and opens
    /// the journal. `max_message_size` must fit in one NATS message once forwarded.
    pub async fn start(
        settings: &ClusterSettings,
        channel_env: ChannelEnv,
        copies_config: NamespaceConfig,
        max_message_size: usize,
    ) -> anyhow::Result<Arc<Self>> {
        settings.check()?;
        let nats = connect(&settings.nats()).await?;
        let max_payload = nats.client.server_info().max_payload;
        anyhow::ensure!(
            max_message_size + ENVELOPE <= max_payload,
            "limits.max_message_size is {max_message_size} bytes, but the NATS servers take \
             messages of at most {max_payload} bytes (their max_payload), and a publish through \
             another node travels in one: raise max_payload in the NATS servers' config (up to \
             64MB) to at least {}, or lower limits.max_message_size",
            max_message_size + ENVELOPE
        );
        let me = NodeId::start(settings.node());
        let spec = DirectorySpec {
            prefix: "dm".into(),
            replicas: settings.replicas,
            node_ttl: settings.node_ttl,
        };
        // A cluster started all at once (a compose file) may answer before JetStream has
        // elected its leaders: its first requests fail for a few seconds.
        let started = tokio::time::Instant::now();
        let (membership, directory, storage) = loop {
            match open_parts(&nats, &spec, &me, settings.replicas).await {
                Ok(parts) => break parts,
                Err(e) if started.elapsed() < JETSTREAM_PATIENCE => {
                    warn!(error = %format!("{e:#}"), "JetStream is not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "JetStream did not become ready in {JETSTREAM_PATIENCE:?}"
                    )));
                }
            }
        };
        let copies = Copies::new(storage.clone(), channel_env, copies_config);
        info!(node = %me, server = %nats.server, version = %nats.version, "joined the cluster");
        Ok(Arc::new(Self {
            nats,
            storage,
            membership,
            directory,
            copies,
            rpc: Mutex::new(None),
            relays: sockets::Relays::default(),
            background: Mutex::new(Vec::new()),
            relayed_here: AtomicU64::new(0),
            nats_rtt_micros: AtomicU64::new(0),
            max_payload,
            forwarded: AtomicU64::new(0),
            served: AtomicU64::new(0),
            moved: AtomicU64::new(0),
        }))
    }

    /// The storage every namespace of this node runs on.
    pub fn storage(&self) -> &ClusterStorage {
        &self.storage
    }

    /// This node.
    pub fn me(&self) -> &NodeId {
        self.membership.me()
    }

    /// The nodes this one believes alive, by name.
    pub fn alive_nodes(&self) -> Vec<String> {
        self.membership.alive_nodes().into_keys().collect()
    }

    /// This node's cluster figures as Prometheus text, appended to `/metrics`.
    pub(crate) fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let journal = self.storage.stats();
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        let rows: [(&str, &str, &str, u64); 18] = [
            (
                "dormouse_cluster_nats_connected",
                "gauge",
                "1 while the NATS connection is up",
                u64::from(connected),
            ),
            (
                "dormouse_cluster_nodes_alive",
                "gauge",
                "Nodes this one believes alive, itself included",
                self.membership.alive_nodes().len() as u64,
            ),
            (
                "dormouse_cluster_objects_held",
                "gauge",
                "Objects (channels included) whose activation this node holds",
                self.storage.held() as u64,
            ),
            (
                "dormouse_cluster_alarms_indexed",
                "gauge",
                "Objects with an alarm, cluster-wide, in this node's view of the alarm index",
                self.storage.alarms_indexed() as u64,
            ),
            (
                "dormouse_cluster_channel_copies",
                "gauge",
                "Channels this node keeps a copy of for its subscribers",
                self.followed() as u64,
            ),
            (
                "dormouse_cluster_relayed_sockets",
                "gauge",
                "Sockets of objects owned here whose clients are connected to other nodes",
                self.relays.len() as u64,
            ),
            (
                "dormouse_cluster_relayed_connections",
                "gauge",
                "WebSockets connected here to objects owned by other nodes",
                load(&self.relayed_here),
            ),
            (
                "dormouse_cluster_forwarded_total",
                "counter",
                "Calls sent to the node that owns their channel or object",
                load(&self.forwarded),
            ),
            (
                "dormouse_cluster_served_total",
                "counter",
                "Calls served here for another node",
                load(&self.served),
            ),
            (
                "dormouse_cluster_moved_total",
                "counter",
                "Calls that found their owner elsewhere and followed it",
                load(&self.moved),
            ),
            (
                "dormouse_cluster_journal_appends_total",
                "counter",
                "Journal messages appended (commits and images, parts counted)",
                load(&journal.appends),
            ),
            (
                "dormouse_cluster_journal_appended_bytes_total",
                "counter",
                "Bytes of those messages",
                load(&journal.appended_bytes),
            ),
            (
                "dormouse_cluster_journal_batches_total",
                "counter",
                "Write batches acknowledged by the JetStream quorum",
                load(&journal.batches),
            ),
            (
                "dormouse_cluster_journal_images_total",
                "counter",
                "Images written in place of commits",
                load(&journal.images),
            ),
            (
                "dormouse_cluster_journal_loads_total",
                "counter",
                "Objects taken over and loaded from their journal",
                load(&journal.loads),
            ),
            (
                "dormouse_cluster_journal_loaded_messages_total",
                "counter",
                "Journal messages read while loading",
                load(&journal.loaded_messages),
            ),
            (
                "dormouse_cluster_fenced_total",
                "counter",
                "Appends refused because another node took the object over",
                load(&journal.fenced),
            ),
            (
                "dormouse_cluster_unreplicated_total",
                "counter",
                "Objects given up because an append was not acknowledged in time",
                load(&journal.unreplicated),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
        let seconds: [(&str, &str, &str, f64); 2] = [
            (
                "dormouse_cluster_nats_rtt_seconds",
                "gauge",
                "The last round trip to the NATS server (0 while none is answered)",
                load(&self.nats_rtt_micros) as f64 / 1e6,
            ),
            (
                "dormouse_cluster_journal_append_seconds_total",
                "counter",
                "Time journal appends took until the quorum acknowledged them; divide by \
                 dormouse_cluster_journal_appends_total for the mean",
                load(&journal.append_micros) as f64 / 1e6,
            ),
        ];
        for (name, kind, help, value) in seconds {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
        out
    }

    /// Starts answering other nodes' calls with `state`'s namespaces.
    pub(crate) async fn serve(self: &Arc<Self>, state: AppState) -> anyhow::Result<()> {
        let hooks = state.hooks.clone();
        let node = self.clone();
        let server = rpc::serve(&self.nats, self.me(), move |kind, body| {
            let (node, state) = (node.clone(), state.clone());
            async move {
                match kind.as_str() {
                    PING => Ok(Bytes::new()),
                    connections::CALL_KIND => {
                        let op: Op = serde_json::from_slice(&body)
                            .map_err(|e| format!("a connections call: {e}"))?;
                        let mut outcome = state.connections.apply(&op);
                        // A listing fits one NATS message: fewer connections then (the total
                        // still counts them all, so the answer says it was cut).
                        loop {
                            let bytes = serde_json::to_vec(&outcome).map_err(|e| e.to_string())?;
                            if bytes.len() + ENVELOPE <= node.max_payload
                                || outcome.connections.is_empty()
                            {
                                break Ok(Bytes::from(bytes));
                            }
                            let keep = outcome.connections.len() / 2;
                            outcome.connections.truncate(keep);
                        }
                    }
                    _ => Ok(node.serve_call(&state, body).await),
                }
            }
        })
        .await?;
        *self.rpc.lock().unwrap_or_else(PoisonError::into_inner) = Some(server);
        // The relayed sockets of a node that died, or whose connection is gone, are
        // reported closed to their objects; a dead node's hook records are taken over by
        // the node they are placed on, which sends their disconnects.
        let node = Arc::downgrade(self);
        let watch = tokio::spawn(async move {
            let mut tick = tokio::time::interval(sockets::LIVENESS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut probed = tokio::time::Instant::now();
            let mut alive_before: Vec<String> = Vec::new();
            loop {
                tick.tick().await;
                let Some(node) = node.upgrade() else { return };
                let alive = node.membership.alive_nodes();
                if hooks.any() {
                    for gone in alive_before.iter().filter(|n| !alive.contains_key(*n)) {
                        let object = crate::hooks::outbox::object_of(gone).to_string();
                        if place(&object, alive.keys().map(String::as_str))
                            == Some(node.me().name.as_str())
                        {
                            hooks.take_over_dead(gone.clone());
                        }
                    }
                }
                alive_before = alive.into_keys().collect();
                let mut gone = node.relays.orphans(|n| node.membership.alive(n));
                if probed.elapsed() >= sockets::PROBE_EVERY {
                    probed = tokio::time::Instant::now();
                    gone.extend(node.relays.unheard(&node.nats).await);
                }
                for socket in gone {
                    if let Err(e) = node.relays.closed(&node.nats, socket).await {
                        warn!(socket, error = %e, "a lost socket was not reported closed yet; retrying");
                    }
                }
            }
        });
        // The NATS round trip, for /metrics and /admin.
        let node = Arc::downgrade(self);
        let measure = tokio::spawn(async move {
            let mut tick = tokio::time::interval(RTT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = node.upgrade() else { return };
                let started = tokio::time::Instant::now();
                let answered = tokio::time::timeout(PING_TIMEOUT, node.nats.client.flush()).await;
                let micros = match answered {
                    Ok(Ok(())) => u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    _ => 0,
                };
                node.nats_rtt_micros.store(micros, Ordering::Relaxed);
            }
        });
        self.background
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([watch, measure]);
        Ok(())
    }

    /// The figures `/admin` shows of this node's part in the cluster.
    pub(crate) fn admin_stats(&self) -> serde_json::Value {
        let journal = self.storage.stats();
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        serde_json::json!({
            "node": self.me().name,
            "nats_connected": connected,
            "nats_server": self.nats.server,
            "nats_rtt_ms": load(&self.nats_rtt_micros) as f64 / 1000.0,
            "nodes_alive": self.alive_nodes(),
            "objects_held": self.storage.held(),
            "channel_copies": self.followed(),
            "alarms_indexed": self.storage.alarms_indexed(),
            "relayed_sockets": self.relays.len(),
            "relayed_connections": load(&self.relayed_here),
            "forwarded_total": load(&self.forwarded),
            "served_total": load(&self.served),
            "moved_total": load(&self.moved),
            "appends_total": load(&journal.appends),
            "append_seconds_total": load(&journal.append_micros) as f64 / 1e6,
            "fenced_total": load(&journal.fenced),
            "unreplicated_total": load(&journal.unreplicated),
        })
    }

    /// An orderly stop: other nodes take this one's objects over at once.
    pub(crate) async fn leave(&self) {
        self.rpc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for task in self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
        self.membership.leave().await;
    }

    /// The live node that handed out connection id `id` (the same incarnation): `None`
    /// when it restarted or left, which took the connection with it.
    pub(crate) fn connection_node(&self, id: &ParsedId) -> Option<NodeId> {
        self.membership
            .alive_nodes()
            .into_values()
            .find(|node| id.is_of(node))
    }

    /// Every live node but this one.
    pub(crate) fn other_nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self
            .membership
            .alive_nodes()
            .into_values()
            .filter(|node| node != self.me())
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// Whether `op` fits in one NATS message to another node: a 413 that says so, before
    /// anything is sent anywhere, when it does not (a send to a subject must not reach one
    /// node's connections and not another's).
    pub(crate) fn fits(&self, op: &Op) -> std::result::Result<Bytes, crate::error::ApiError> {
        let body = Bytes::from(serde_json::to_vec(op).unwrap_or_default());
        if body.len() + ENVELOPE > self.max_payload {
            return Err(crate::error::ApiError::too_large(format!(
                "the message takes {} bytes between nodes (base64 in JSON), more than the NATS \
                 servers' max_payload of {} bytes: send it to this connection through the node \
                 that serves it, or raise max_payload",
                body.len(),
                self.max_payload
            )));
        }
        Ok(body)
    }

    /// Runs a connections operation on `node`'s connections; the error says, for the
    /// caller's answer, why it could not.
    pub(crate) async fn connections_call(
        &self,
        node: &NodeId,
        op: &Op,
    ) -> std::result::Result<Outcome, String> {
        let body = self.fits(op).map_err(|e| e.message)?;
        match rpc::call(
            &self.nats,
            node,
            connections::CALL_KIND,
            body,
            CONNECTIONS_TIMEOUT,
        )
        .await
        {
            Ok(reply) => serde_json::from_slice(&reply)
                .map_err(|e| format!("node {}'s answer could not be read: {e}", node.name)),
            // Gone or restarted: so are the connections it served.
            Err(RpcError::NodeGone(_) | RpcError::Stale(_)) => Ok(Outcome::default()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Serves one call of another node, here: never forwarded again (an owner that moved
    /// meanwhile is reported, and the caller follows it). A caller sends a call here when it
    /// found the owner dead; if this node still believes the owner alive, it asks the owner
    /// once, and takes the object over when nobody answers for it.
    async fn serve_call(&self, state: &AppState, body: Bytes) -> Bytes {
        self.served.fetch_add(1, Ordering::Relaxed);
        let first = self.serve_once(state, &body).await;
        if let Answer::Failed(e) = &first
            && let Some(Some(owner)) = self.owner_named(e)
            && self.is_gone(&owner).await
        {
            self.membership.suspect(&owner);
            return self.encode_fitting(self.serve_once(state, &body).await);
        }
        self.encode_fitting(first)
    }

    /// Whether nobody answers for `node` (it died, or restarted under another incarnation).
    async fn is_gone(&self, node: &NodeId) -> bool {
        matches!(
            rpc::call(&self.nats, node, PING, Bytes::new(), PING_TIMEOUT).await,
            Err(RpcError::NodeGone(_) | RpcError::Stale(_))
        )
    }

    /// An answer as bytes, replaced by an error when it cannot travel in one NATS message.
    fn encode_fitting(&self, answer: Answer) -> Bytes {
        let bytes = wire::encode_answer(&answer);
        if bytes.len() + ENVELOPE > self.max_payload {
            return wire::encode_answer(&Answer::Failed(Error::Unavailable(format!(
                "the answer ({} bytes) is larger than the NATS servers' max_payload ({} bytes) \
                 and cannot travel between nodes",
                bytes.len(),
                self.max_payload
            ))));
        }
        bytes
    }

    async fn serve_once(&self, state: &AppState, body: &Bytes) -> Answer {
        match wire::decode_forwarded(body) {
            Err(e) => Answer::Failed(Error::Unavailable(format!("a forwarded call: {e}"))),
            Ok(Forwarded::Channel { name, call }) => {
                let history_limit = match &call {
                    ChannelCall::History { limit, .. } => Some(*limit),
                    _ => None,
                };
                match state.channels.call(&name, call.into_request()).await {
                    Ok(ChannelResponse::History(mut page)) if history_limit.is_some() => {
                        // A page fits one NATS message: fewer events, and the client
                        // pages on from the last one.
                        while page.events.len() > 1
                            && history_bytes(&page) + ENVELOPE > self.max_payload
                        {
                            let keep = page.events.len() / 2;
                            page.events.truncate(keep);
                        }
                        Answer::Channel(ChannelResponse::History(page))
                    }
                    Ok(response) => Answer::Channel(response),
                    Err(e) => Answer::Failed(e),
                }
            }
            Ok(Forwarded::Fetch {
                namespace,
                name,
                request,
            }) => match state.object_namespace(&namespace) {
                None => Answer::Failed(Error::Unavailable(format!(
                    "namespace {namespace:?} is not mounted on node {}",
                    self.me()
                ))),
                Some(target) => match target.fetch(&name, *request).await {
                    Ok(response) => Answer::Http(response),
                    Err(e) => Answer::Failed(e),
                },
            },
            Ok(Forwarded::Connect {
                namespace,
                name,
                node,
                conn,
                request,
            }) => match state.object_namespace(&namespace) {
                None => self.not_mounted(&namespace),
                Some(target) => {
                    let (mut proxy, receiver) = state.client_socket(Transport::WebSocket);
                    // Its node reports the client's close, as a local connection does.
                    proxy.set_close_reported();
                    let socket = proxy.id();
                    let (parts, _) = request.into_parts();
                    match target.connect(&name, proxy, parts).await {
                        Ok(()) => {
                            let client = sockets::Connection { node, conn };
                            self.relays
                                .start(&self.nats, socket, receiver, client, target, name);
                            Answer::Socket {
                                owner: self.me().clone(),
                                socket,
                            }
                        }
                        Err(e) => Answer::Failed(e),
                    }
                }
            },
            Ok(Forwarded::SocketMessage {
                namespace,
                name,
                socket,
                message,
            }) => match state.object_namespace(&namespace) {
                None => self.not_mounted(&namespace),
                Some(_) if !self.relays.holds(socket) => {
                    // As for an object that moved: the client reconnects to find it.
                    Answer::Failed(Error::from(dormouse_storage::Error::NotOwner {
                        id: ObjectId::new(namespace.as_str(), name.as_str()),
                        owner: None,
                        reason: format!(
                            "its socket {socket} is no longer connected on node {}",
                            self.me()
                        ),
                    }))
                }
                Some(target) => match target.socket_message(&name, socket, message).await {
                    Ok(()) => Answer::Done,
                    Err(e) => Answer::Failed(e),
                },
            },
            Ok(Forwarded::SocketClosed { socket, .. }) => {
                match self.relays.closed(&self.nats, socket).await {
                    Ok(()) => Answer::Done,
                    Err(e) => Answer::Failed(e),
                }
            }
        }
    }

    fn not_mounted(&self, namespace: &str) -> Answer {
        Answer::Failed(Error::Unavailable(format!(
            "namespace {namespace:?} is not mounted on node {}",
            self.me()
        )))
    }

    /// Where a call to `id` goes now. `here` says its activation runs on this node.
    async fn target(&self, id: &ObjectId, here: bool) -> Target {
        if here {
            return Target::Here;
        }
        let key = ClusterStorage::object_key(id);
        match self.directory.owner(&key).await {
            Ok(Some((owner, _))) if &owner == self.me() => Target::Here,
            Ok(Some((owner, _))) if self.membership.alive(&owner) => Target::Node(owner),
            Ok(_) => {
                // Nobody owns it (or its owner is dead): the node placement picks claims it.
                let live = self.membership.alive_nodes();
                match place(&key, live.keys().map(String::as_str)) {
                    Some(name) if name != self.me().name => match live.get(name) {
                        Some(node) => Target::Node(node.clone()),
                        None => Target::Here,
                    },
                    _ => Target::Here,
                }
            }
            Err(e) => {
                // Acquiring here will find out who owns it, or take it.
                debug!(object = %id, error = %e, "owner lookup failed");
                Target::Here
            }
        }
    }

    /// The node named `name`, if it is alive.
    fn node_named(&self, name: &str) -> Option<NodeId> {
        self.membership.alive_nodes().remove(name)
    }

    /// For a refusal because another node owns the object: that node, if it is named and
    /// alive (`Some(None)` when it is not). `None` for any other error.
    fn owner_named(&self, error: &Error) -> Option<Option<NodeId>> {
        let Error::Storage(inner) = error else {
            return None;
        };
        let dormouse_storage::Error::NotOwner { owner, .. } = &**inner else {
            return None;
        };
        Some(owner.as_deref().and_then(|name| self.node_named(name)))
    }

    /// The owner to follow after a refusal to serve here, counted as a move.
    fn moved_to(&self, error: &Error) -> Option<Option<NodeId>> {
        let owner = self.owner_named(error)?;
        self.moved.fetch_add(1, Ordering::Relaxed);
        Some(owner)
    }

    /// Sends `call` to `node` and reads its answer.
    async fn send(&self, node: &NodeId, call: &Forwarded) -> std::result::Result<Answer, RpcError> {
        let body = wire::encode_forwarded(call);
        if body.len() + ENVELOPE > self.max_payload {
            return Ok(Answer::Failed(Error::Unavailable(format!(
                "the request ({} bytes) is larger than the NATS servers' max_payload ({} bytes) \
                 and cannot reach the owner, node {}",
                body.len(),
                self.max_payload,
                node.name
            ))));
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let reply = rpc::call(&self.nats, node, "call", body, CALL_TIMEOUT).await?;
        wire::decode_answer(&reply)
            .map_err(|e| RpcError::Failed(format!("the owner's answer: {e}").into()))
    }

    /// [`ClusterNode::send`], given up (as timed out) once `node` stops counting as alive:
    /// an owner that is paused or cut off answers nothing, and its calls must not wait out
    /// the whole call timeout while another node could take its objects over. Whatever it
    /// does when it comes back is fenced by the journal.
    async fn send_watching(
        &self,
        node: &NodeId,
        call: &Forwarded,
    ) -> std::result::Result<Answer, RpcError> {
        let lost = async {
            loop {
                tokio::time::sleep(LIVENESS_CHECK).await;
                if !self.membership.alive(node) {
                    return;
                }
            }
        };
        tokio::select! {
            answer = self.send(node, call) => answer,
            () = lost => Err(RpcError::TimedOut(node.to_string())),
        }
    }

    /// Runs `here` or forwards `call`, following the owner as it moves; see the module doc.
    async fn route<T, H, F>(
        &self,
        id: &ObjectId,
        active: bool,
        call: Forwarded,
        here: H,
        answer: impl Fn(Answer) -> Result<T>,
    ) -> Result<T>
    where
        H: Fn() -> F,
        F: Future<Output = Result<T>>,
    {
        let mut hint = None;
        for hop in 0..MAX_HOPS {
            let target = match hint.take() {
                Some(node) => Target::Node(node),
                None => self.target(id, active && hop == 0).await,
            };
            match target {
                Target::Here => match here().await {
                    Err(e) => match self.moved_to(&e) {
                        Some(owner) => hint = owner,
                        None => return Err(e),
                    },
                    done => return done,
                },
                Target::Node(node) => match self.send_watching(&node, &call).await {
                    Ok(Answer::Failed(e)) => match self.moved_to(&e) {
                        Some(owner) => hint = owner.filter(|o| o != &node),
                        None => return Err(e),
                    },
                    Ok(reply) => return answer(reply),
                    // Nobody answers for it: it died (or restarted). Its objects may be
                    // taken over now; a live node would only be fenced out.
                    Err(RpcError::NodeGone(_) | RpcError::Stale(_)) => {
                        self.membership.suspect(&node);
                    }
                    Err(RpcError::TimedOut(who)) if self.membership.alive(&node) => {
                        return Err(Error::Unavailable(format!(
                            "{id}: the owner, node {who}, did not answer in time; the call may \
                             or may not have taken effect (retry a publish with its idempotency \
                             key)"
                        )));
                    }
                    Err(RpcError::TimedOut(who)) => {
                        return Err(Error::Unavailable(format!(
                            "{id}: the owner, node {who}, stopped answering and its membership \
                             expired; the call may or may not have taken effect (retry a publish \
                             with its idempotency key: the next try goes to the new owner)"
                        )));
                    }
                    Err(e) => {
                        warn!(object = %id, error = %e, "a forwarded call failed");
                        return Err(Error::Unavailable(format!("{id}: {e}")));
                    }
                },
            }
        }
        Err(Error::Unavailable(format!(
            "{id}: its owner kept moving; retry"
        )))
    }

    /// A channel call, served here or by the channel's owner.
    pub(crate) async fn channel_call(
        &self,
        channels: &Namespace<Channel>,
        name: &str,
        call: ChannelCall,
    ) -> Result<ChannelResponse> {
        let id = ObjectId::new(NAMESPACE, name);
        let active = channels.state(name) == ObjectState::Active;
        let forwarded = Forwarded::Channel {
            name: name.to_string(),
            call: call.clone(),
        };
        self.route(
            &id,
            active,
            forwarded,
            || channels.call(name, call.clone().into_request()),
            |answer| match answer {
                Answer::Channel(response) => Ok(response),
                _ => Err(Error::Unavailable(format!(
                    "{id}: an answer of another kind"
                ))),
            },
        )
        .await
    }

    /// An HTTP request to a user object, served here or by its owner.
    pub(crate) async fn fetch(
        &self,
        target: &Arc<dyn DynNamespace>,
        name: &str,
        request: HttpRequest,
    ) -> Result<HttpResponse> {
        let id = ObjectId::new(target.name(), name);
        let active = target.state(name) == ObjectState::Active;
        let forwarded = Forwarded::Fetch {
            namespace: target.name().to_string(),
            name: name.to_string(),
            request: Box::new(request.clone()),
        };
        self.route(
            &id,
            active,
            forwarded,
            || target.fetch(name, request.clone()),
            |answer| match answer {
                Answer::Http(response) => Ok(response),
                _ => Err(Error::Unavailable(format!(
                    "{id}: an answer of another kind"
                ))),
            },
        )
        .await
    }

    /// Connects a client's WebSocket (`socket`, drained by its connection here) to the user
    /// object `name`: handed to the object here when it runs here (or this node claims it),
    /// else to its owner, which gives the object a socket relayed to this one. Frames are
    /// subscribed to before the owner is asked, so none it sends at once are missed.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        target: &Arc<dyn DynNamespace>,
        name: &str,
        socket: Socket,
        parts: http::request::Parts,
    ) -> Result<SocketLink> {
        let id = ObjectId::new(target.name(), name);
        let active = target.state(name) == ObjectState::Active;
        let conn = socket.id();
        let relay_failed = |e: async_nats::Error| {
            Error::Unavailable(format!("{id}: relaying a socket over NATS: {e}"))
        };
        let frames = self
            .nats
            .client
            .subscribe(sockets::frames_subject(self.me(), conn))
            .await
            .map_err(|e| relay_failed(e.into()))?;
        self.nats
            .client
            .flush()
            .await
            .map_err(|e| relay_failed(e.into()))?;
        let forwarded = Forwarded::Connect {
            namespace: target.name().to_string(),
            name: name.to_string(),
            node: self.me().clone(),
            conn,
            request: Box::new(http::Request::from_parts(parts.clone(), Bytes::new())),
        };
        let remote = self
            .route(
                &id,
                active,
                forwarded,
                || {
                    let connected = target.connect(name, socket.clone(), parts.clone());
                    async move { connected.await.map(|()| None) }
                },
                |answer| match answer {
                    Answer::Socket { owner, socket } => Ok(Some((owner, socket))),
                    _ => Err(Error::Unavailable(format!(
                        "{id}: an answer of another kind"
                    ))),
                },
            )
            .await?;
        let Some((owner, proxy)) = remote else {
            return Ok(SocketLink::Here);
        };
        self.relayed_here.fetch_add(1, Ordering::Relaxed);
        let node = Arc::downgrade(self);
        let watched = owner.clone();
        let feeding = tokio::spawn(sockets::feed(
            self.nats.client.clone(),
            frames,
            socket,
            move || node.upgrade().is_some_and(|n| n.membership.alive(&watched)),
        ));
        Ok(SocketLink::Remote(RemoteLink {
            owner,
            namespace: target.name().to_string(),
            name: name.to_string(),
            socket: proxy,
            feeding,
            node: Arc::downgrade(self),
            closed: false,
        }))
    }

    /// A client's message on a relayed socket, to its object on the owner. A failure that
    /// means the owner no longer has the socket (it died, restarted, or lost it) says so,
    /// so the connection can be closed for the client to reconnect; the object's own
    /// errors leave the connection as a local one would.
    pub(crate) async fn remote_message(
        &self,
        link: &RemoteLink,
        message: Inbound,
    ) -> std::result::Result<(), RemoteFailure> {
        let call = Forwarded::SocketMessage {
            namespace: link.namespace.clone(),
            name: link.name.clone(),
            socket: link.socket,
            message,
        };
        remote_call(self, &link.owner, &call).await
    }

    /// The client of a relayed socket went away: the owner tells the object.
    pub(crate) async fn remote_closed(&self, mut link: RemoteLink) {
        link.closed = true;
        link.feeding.abort();
        let call = link.close_call();
        if let Err(e) = remote_call(self, &link.owner, &call).await {
            // The owner died (its sockets died with it) or will find the connection gone
            // when it next probes it.
            debug!(object = %link.name, error = %e.error, "a relayed socket's close not delivered");
        }
    }

    /// Subscribes `socket` to `channel` on this node, from a copy of the channel kept
    /// current from its journal.
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
        socket: Socket,
        start: Start,
    ) -> Result<ChannelResponse> {
        self.copies.subscribe(channel, socket, start).await
    }

    /// Another request for a channel that is not forwarded (refresh): to the copy.
    pub(crate) async fn copy_call(
        &self,
        channel: &str,
        request: ChannelRequest,
    ) -> Result<ChannelResponse> {
        self.copies.call(channel, request).await
    }

    /// Whether some node holds channel `name`'s activation now (the directory names an
    /// owner that counts as alive).
    pub(crate) async fn held_anywhere(&self, name: &str) -> bool {
        let key = ClusterStorage::object_key(&ObjectId::new(NAMESPACE, name));
        matches!(self.directory.owner(&key).await, Ok(Some((owner, _))) if self.membership.alive(&owner))
    }

    /// Channels this node keeps copies of (for their subscribers here).
    pub(crate) fn followed(&self) -> usize {
        self.copies.followed()
    }

    /// Subscribers of `channel` connected to this node.
    pub(crate) async fn subscribers_here(&self, channel: &str) -> usize {
        self.copies.subscribers(channel).await
    }
}
