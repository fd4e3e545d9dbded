//! Configuration: defaults, then a TOML file, then `DORMOUSE_*` environment variables, then
//! command-line flags, each overriding the one before. Every key of the file can be set from
//! the environment as `DORMOUSE_<SECTION>_<KEY>` (for example
//! `DORMOUSE_LIMITS_MAX_MESSAGE_SIZE=32MiB`), so the same binary runs unchanged under
//! systemd, Docker and a shell. A bad value fails at start with the key named.

mod size;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dormouse_actors::channel::{ChannelEnv, ChannelSettings, TailBudget};
use dormouse_storage::Durability;
use serde::{Deserialize, Serialize};

pub use size::ByteSize;

/// The whole configuration. Field docs are the reference; `docs/CONFIG.md` shows a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on. Loopback by default so a fresh install is not exposed.
    pub listen: SocketAddr,
    /// Directory holding the embedded database; one dormouse process per directory.
    pub data_dir: PathBuf,
    /// How long a graceful stop waits for connections to say goodbye before cutting the
    /// ones that do not (a client that stopped reading).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Storage engine settings.
    pub storage: StorageSettings,
    /// Channel retention and lifetime.
    pub channels: ChannelsSettings,
    /// Request and connection limits.
    pub limits: LimitsSettings,
    /// Server-Sent Events behaviour.
    pub sse: SseSettings,
    /// WebSocket behaviour.
    pub websocket: WebSocketSettings,
    /// Authentication: JWTs and API keys. Off unless a secret, key file or API key is set.
    pub auth: AuthSettings,
    /// Cross-origin requests from browsers.
    pub cors: CorsSettings,
    /// Log output.
    pub log: LogSettings,
    /// The admin page.
    pub admin: AdminSettings,
    /// Cluster mode on NATS JetStream; off while `nats_urls` is empty.
    pub cluster: ClusterSettings,
    /// Upstream hooks (`[[hooks]]`, docs/HOOKS.md): HTTP calls to a backend on a client's
    /// connect, message and disconnect.
    pub hooks: Vec<HookSettings>,
}

/// One `[[hooks]]` entry: a backend that decides who connects and hears of every message
/// and disconnect, over signed HTTP (docs/HOOKS.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSettings {
    /// Names the hook in logs and metrics, and its hooks-mode WebSocket,
    /// `GET /v1/hooks/{name}/ws`: 1 to 64 characters from A-Z a-z 0-9 _ -.
    pub name: String,
    /// Where the calls go: `http://` or `https://`.
    pub url: String,
    /// The HMAC-SHA256 key each call is signed with (32 bytes or more); the backend checks
    /// the `Dormouse-Signature` header with it.
    pub secret: String,
    /// Channel patterns whose SSE and WebSocket subscribers also go through this hook's
    /// `connect` and `disconnect` (the first hook whose pattern matches a channel is its).
    #[serde(default)]
    pub channels: Vec<String>,
    /// The events sent: `connect`, `message`, `disconnect` (the default), `subscribe` (each
    /// subscription to one of the hook's channels), `publish`, which puts every client
    /// publish to the hook's channels through the backend, and `occupied` and `vacated`
    /// (a channel's first subscriber came, its last one left, on any node).
    #[serde(default = "HookSettings::default_events")]
    pub events: Vec<String>,
    /// How long a call may take before it counts as failed.
    #[serde(default = "HookSettings::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl HookSettings {
    /// Every event a hook can be sent.
    pub const EVENTS: [&'static str; 7] = [
        "connect",
        "message",
        "disconnect",
        "subscribe",
        "publish",
        "occupied",
        "vacated",
    ];

    /// The events a hook gets when its entry names none: `publish` only when asked for, as
    /// it puts a backend call in front of every publish.
    pub fn default_events() -> Vec<String> {
        ["connect", "message", "disconnect"]
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    fn default_timeout() -> Duration {
        Duration::from_secs(5)
    }

    /// Refuses an entry the server could not use as written, naming the mistake.
    pub fn check(&self) -> anyhow::Result<()> {
        let name = &self.name;
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "hooks: name {name:?} must be 1 to 64 characters from A-Z a-z 0-9 _ -"
        );
        anyhow::ensure!(
            self.url.starts_with("http://") || self.url.starts_with("https://"),
            "hooks.{name}: url {:?} must start with http:// or https://",
            self.url
        );
        anyhow::ensure!(
            self.secret.len() >= 32,
            "hooks.{name}: the secret is {} bytes; it must be 32 or more",
            self.secret.len()
        );
        for event in &self.events {
            anyhow::ensure!(
                Self::EVENTS.contains(&event.as_str()),
                "hooks.{name}: unknown event {event:?}; events are {:?}",
                Self::EVENTS
            );
        }
        anyhow::ensure!(
            !self
                .events
                .iter()
                .any(|e| e == "occupied" || e == "vacated")
                || !self.channels.is_empty(),
            "hooks.{name}: occupied and vacated are about channels; give the hook channel patterns"
        );
        anyhow::ensure!(
            self.timeout >= Duration::from_millis(10) && self.timeout <= Duration::from_secs(60),
            "hooks.{name}: timeout {:?} must be between 10ms and 60s",
            self.timeout
        );
        Ok(())
    }
}

/// `[cluster]`: how this node reaches the NATS cluster that cluster mode runs on
/// (docs/CLUSTER.md). A server with `nats_urls` set runs in cluster mode, and
/// `dormouse cluster check` tests a NATS cluster against these settings first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// Every server of the NATS cluster (`nats://host:4222`, `tls://...`): a list in the
    /// file, comma-separated in `DORMOUSE_CLUSTER_NATS_URLS`.
    #[serde(deserialize_with = "url_list::deserialize")]
    pub nats_urls: Vec<String>,
    /// This node's name, unique in the cluster; empty: the host's name.
    pub node_name: String,
    /// Copies of every stream and bucket: 3 survives the loss of a NATS server; 1 is for
    /// development. 1, 3 or 5.
    pub replicas: usize,
    /// A NATS `.creds` file (user JWT and NKey seed); empty: none.
    pub nats_credentials: PathBuf,
    /// CA certificate to verify the NATS servers with; empty: the system's roots.
    pub nats_tls_ca: PathBuf,
    /// Client certificate for servers that verify clients; needs `nats_tls_key`.
    pub nats_tls_cert: PathBuf,
    /// The client certificate's key.
    pub nats_tls_key: PathBuf,
    /// How long a node that stopped announcing itself counts as alive; its objects move to
    /// other nodes after it (sooner when a call to it finds nobody answering). Short fails
    /// over faster; each node announces itself four times per period.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats_urls: Vec::new(),
            node_name: String::new(),
            replicas: 3,
            nats_credentials: PathBuf::new(),
            nats_tls_ca: PathBuf::new(),
            nats_tls_cert: PathBuf::new(),
            nats_tls_key: PathBuf::new(),
            node_ttl: Duration::from_secs(5),
        }
    }
}

impl ClusterSettings {
    /// Whether cluster mode is asked for.
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }

    /// Checks what can be named before connecting: a replica count NATS would refuse, a
    /// certificate without its key.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.enabled(),
            "cluster.nats_urls is empty: list every server of the NATS cluster"
        );
        anyhow::ensure!(
            matches!(self.replicas, 1 | 3 | 5),
            "cluster.replicas is {}; it must be 1 (development), 3 or 5",
            self.replicas
        );
        anyhow::ensure!(
            self.nats_tls_cert.as_os_str().is_empty() == self.nats_tls_key.as_os_str().is_empty(),
            "cluster.nats_tls_cert and cluster.nats_tls_key go together"
        );
        anyhow::ensure!(
            self.node_ttl >= Duration::from_millis(500),
            "cluster.node_ttl is {:?}; it must be at least 500ms",
            self.node_ttl
        );
        Ok(())
    }

    /// This node's name: `node_name`, else the host's name.
    pub fn node(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "dormouse".to_string())
    }
}

/// A list of URLs from a TOML array, or from one comma-separated string (as an environment
/// variable gives it).
mod url_list {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<String>),
        Joined(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let urls = match Given::deserialize(d)? {
            Given::List(urls) => urls,
            Given::Joined(text) => text.split(',').map(str::to_string).collect(),
        };
        Ok(urls
            .into_iter()
            .map(|url| url.trim().to_string())
            .filter(|url| !url.is_empty())
            .collect())
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// "text" (one readable line per event) or "json" (one JSON object per line, for log
    /// collectors). `--log-format` overrides it.
    pub format: crate::logging::LogFormat,
}

/// `[admin]`: the dashboard at `/admin`, off by default so a server shows nothing it was not
/// asked to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Serve `/admin` and `/admin/api/stats` (the figures need the admin capability when
    /// auth is on). Off: both are 404.
    pub enabled: bool,
}

/// `[auth]`: unset (empty) by default, which leaves the server open to anyone who can reach
/// it, so it then listens on loopback only unless `allow_anonymous` says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens (at least 32 bytes); empty: HS256 not accepted.
    pub jwt_secret: String,
    /// PEM public key (Ed25519 for EdDSA, or RSA for RS256) for tokens signed elsewhere;
    /// empty: none.
    pub jwt_public_key_file: PathBuf,
    /// Required `iss` claim; empty: not checked.
    pub issuer: String,
    /// Required `aud` claim; empty: not checked.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Accept `?access_token=` on GET requests, for browsers' EventSource and WebSocket,
    /// which cannot set headers. URLs end up in logs and histories: see docs/SECURITY.md.
    pub query_token: bool,
    /// Serve without any credential configured on a non-loopback address. Off: such a
    /// server refuses to start, so an open server is never exposed by accident.
    pub allow_anonymous: bool,
    /// Server-side keys for publishers and back ends: `[[auth.api_keys]]` entries.
    pub api_keys: Vec<ApiKeySettings>,
}

/// One `[[auth.api_keys]]` entry: a secret and what it may do (patterns as in tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// A label for logs; defaults to the entry's position.
    #[serde(default)]
    pub name: String,
    /// The key itself (16 characters or more, no '.'); sent as `Authorization: Bearer KEY`
    /// or `X-API-Key: KEY`.
    pub key: String,
    /// Channel patterns the key may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Channel patterns the key may subscribe to.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Channel patterns whose history the key may read.
    #[serde(default)]
    pub history: Vec<String>,
    /// `namespace/name` patterns of objects the key may call.
    #[serde(default)]
    pub objects: Vec<String>,
    /// Listing and deleting channels, and the admin page's figures.
    #[serde(default)]
    pub admin: bool,
    /// Scraping `/metrics` (admin implies it); for a Prometheus server's key, which should
    /// not be able to delete channels.
    #[serde(default)]
    pub metrics: bool,
    /// The server-side connection API (send to, list and close clients' connections); for
    /// a backend's key.
    #[serde(default)]
    pub connections: bool,
}

impl ApiKeySettings {
    /// A key named `name` that may do nothing yet: a program (or a test) that configures
    /// keys in code grants what it needs with struct update syntax, so a capability added
    /// later is off for it until it asks.
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
            publish: Vec::new(),
            subscribe: Vec::new(),
            history: Vec::new(),
            objects: Vec::new(),
            admin: false,
            metrics: false,
            connections: false,
        }
    }
}

/// `[cors]`: off (no CORS headers) unless origins are listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins allowed to call the API from a browser, e.g. `["https://app.example.com"]`;
    /// `["*"]` allows any origin (credentials then travel in headers, never cookies).
    pub allowed_origins: Vec<String>,
    /// How long browsers may cache a preflight answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// When a write counts as safe: "always" (fsync before acknowledging, group-committed),
    /// a period such as "100ms" (fsync on that period), or "never".
    #[serde(with = "durability_serde")]
    pub durability: Durability,
    /// Memory for index leaves being read (the active objects' reads); once writes stop,
    /// leaves not read for a second leave it, so hibernated objects hold none of it.
    pub cache: ByteSize,
    /// Size of one segment file (4 KiB to 1 GiB). The cleaner reclaims space a few whole
    /// segments at a time and never touches the newest one, so disk use stays under about
    /// twice the live data plus one segment.
    pub segment_size: ByteSize,
    /// Memory for changes to the index (about 80 bytes per changed key) before a
    /// checkpoint writes them: bounds the engine's memory while many objects are written.
    pub checkpoint_memory: ByteSize,
    /// Log written since the last checkpoint that starts the next: what a restart after a
    /// crash reads at most, so it bounds start-up time.
    pub checkpoint_log: ByteSize,
}

/// `[channels]`: defaults for every channel, plus `[[channels.prefix]]` overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsSettings {
    /// How long a channel with no traffic stays in memory before hibernating (its
    /// subscribers stay connected).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Events kept for replay per channel.
    pub max_events: u64,
    /// Payload bytes kept for replay per channel.
    pub max_bytes: ByteSize,
    /// Events older than this leave the replay buffer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Recent events an active channel keeps in memory for fast replay.
    pub memory_tail: ByteSize,
    /// The in-memory tails of all active channels together: when many channels are active
    /// at once, each keeps less (replay of the rest comes from storage), so memory is set
    /// here rather than by how many channels are touched.
    pub memory_tail_total: ByteSize,
    /// Most channels in memory at once (0: no limit). Beyond it the least recently used
    /// idle ones hibernate before their idle timeout (subscribers stay connected), so a
    /// burst across many channels costs the memory set here, not memory per channel
    /// touched.
    pub max_active: usize,
    /// Presence on every channel: subscribers listed by subject, with join and leave
    /// events (docs/API.md, "Presence"). Usually set per prefix instead.
    pub presence: bool,
    /// Per name-prefix overrides of these settings; the longest prefix wins.
    pub prefix: Vec<PrefixSettings>,
}

/// One `[[channels.prefix]]` entry: unset fields inherit from `[channels]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixSettings {
    /// Channel names starting with this.
    pub prefix: String,
    /// See `[channels] max_events`.
    pub max_events: Option<u64>,
    /// See `[channels] max_bytes`.
    pub max_bytes: Option<ByteSize>,
    /// See `[channels] max_age`.
    #[serde(default, with = "humantime_serde::option")]
    pub max_age: Option<Duration>,
    /// See `[channels] idempotency_window`.
    #[serde(default, with = "humantime_serde::option")]
    pub idempotency_window: Option<Duration>,
    /// See `[channels] presence`.
    pub presence: Option<bool>,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Largest message body; checked while the body streams in, so a larger one is refused
    /// (413) before it is buffered.
    pub max_message_size: ByteSize,
    /// Largest `POST /v1/publish` body.
    pub max_batch_size: ByteSize,
    /// Most messages in one batch publish.
    pub max_batch_messages: usize,
    /// Bytes queued for one subscriber before it is cut off as too slow (it reconnects and
    /// resumes from its last id).
    pub subscriber_queue: ByteSize,
    /// Most events one history request returns (and a subscriber's `rewind` asks for).
    pub max_history_page: usize,
    /// Most channels one connection follows (a WebSocket's own, those its hook picked and
    /// those its `subscribe` messages added; an event stream's); 0 counts as 1.
    pub max_channels_per_connection: usize,
    /// Most hook disconnects sent (and retried) from memory at once; past it they wait in
    /// storage and a sweep sends them as room frees up (docs/HOOKS.md).
    pub hook_disconnects_in_memory: usize,
    /// A connection whose writes make no progress for this long (a client that stopped
    /// reading) is closed; the client resumes with its last id when it comes back.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Open connections in total (SSE, WebSocket and plain HTTP alike); beyond it new ones
    /// get a 503 and are closed. 0: no limit.
    pub max_connections: usize,
    /// Open connections from one IP address. Behind a reverse proxy every client has the
    /// proxy's address: raise it or set 0 there. 0: no limit.
    pub max_connections_per_ip: usize,
    /// Longest request target (path and query): 414 beyond it.
    pub max_url_size: ByteSize,
    /// Most bytes of request headers: 431 beyond them.
    pub max_header_size: ByteSize,
    /// Requests being handled at once (a stream counts only until its response starts);
    /// beyond it new ones are shed with 503 and `Retry-After` instead of queueing.
    /// 0: no limit.
    pub max_inflight_requests: usize,
    /// Messages per second one client IP may publish (HTTP, batch items, WebSocket); 429
    /// with `Retry-After` beyond it. 0: no limit.
    pub publish_rate_per_ip: u32,
    /// Messages per second one credential (token subject or API key) may publish, across
    /// all its connections. 0: no limit.
    pub publish_rate_per_credential: u32,
    /// Messages a publisher may send in a burst above its rate; 0: one second's worth. With
    /// a rate set, a batch of more messages than this is refused (413): it could never pass.
    pub publish_burst: u32,
    /// Subscribers one channel holds; beyond it a new subscriber gets 503. 0: no limit.
    pub max_subscribers_per_channel: usize,
    /// A client must send a complete request head within this long, or its connection is
    /// closed: a client that trickles its headers (slow-loris) cannot hold connections.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

/// `[sse]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseSettings {
    /// Interval of keep-alive comments, so proxies do not time idle streams out.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// The `retry:` hint: how long EventSource waits before reconnecting.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
}

/// `[websocket]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Interval of server pings.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A client that sends nothing (not even a pong) for this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Whether clients may publish by sending messages on the socket.
    pub client_publish: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./dormouse-data"),
            shutdown_grace: Duration::from_secs(5),
            storage: StorageSettings::default(),
            channels: ChannelsSettings::default(),
            limits: LimitsSettings::default(),
            sse: SseSettings::default(),
            websocket: WebSocketSettings::default(),
            auth: AuthSettings::default(),
            cors: CorsSettings::default(),
            log: LogSettings::default(),
            admin: AdminSettings::default(),
            cluster: ClusterSettings::default(),
            hooks: Vec::new(),
        }
    }
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            jwt_public_key_file: PathBuf::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(5),
            query_token: true,
            allow_anonymous: false,
            api_keys: Vec::new(),
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            durability: Durability::Always,
            cache: ByteSize::mib(16),
            segment_size: ByteSize::mib(64),
            checkpoint_memory: ByteSize::mib(16),
            checkpoint_log: ByteSize::mib(64),
        }
    }
}

impl Default for ChannelsSettings {
    fn default() -> Self {
        let d = ChannelSettings::default();
        Self {
            idle_timeout: Duration::from_secs(30),
            max_events: d.max_events,
            max_bytes: ByteSize(d.max_bytes),
            max_age: d.max_age,
            idempotency_window: d.idempotency_window,
            memory_tail: ByteSize::mib(1),
            memory_tail_total: ByteSize::mib(64),
            max_active: 10_000,
            presence: d.presence,
            prefix: Vec::new(),
        }
    }
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            max_message_size: ByteSize::mib(16),
            max_batch_size: ByteSize::mib(32),
            max_batch_messages: 10_000,
            subscriber_queue: ByteSize::mib(8),
            max_history_page: 1000,
            max_channels_per_connection: 100,
            hook_disconnects_in_memory: 10_000,
            write_timeout: Duration::from_secs(30),
            max_connections: 50_000,
            max_connections_per_ip: 10_000,
            max_url_size: ByteSize::kib(8),
            max_header_size: ByteSize::kib(32),
            max_inflight_requests: 10_000,
            publish_rate_per_ip: 0,
            publish_rate_per_credential: 0,
            publish_burst: 0,
            max_subscribers_per_channel: 100_000,
            header_read_timeout: Duration::from_secs(15),
        }
    }
}

impl Default for SseSettings {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            client_publish: true,
        }
    }
}

impl ChannelsSettings {
    /// What the `Channel` objects share, built from these settings.
    pub fn env(&self, limits: &LimitsSettings) -> ChannelEnv {
        let default = ChannelSettings {
            max_events: self.max_events,
            max_bytes: self.max_bytes.0,
            max_age: self.max_age,
            idempotency_window: self.idempotency_window,
            presence: self.presence,
        };
        let prefixes = self
            .prefix
            .iter()
            .map(|p| {
                (
                    p.prefix.clone(),
                    ChannelSettings {
                        max_events: p.max_events.unwrap_or(default.max_events),
                        max_bytes: p.max_bytes.map_or(default.max_bytes, |b| b.0),
                        max_age: p.max_age.unwrap_or(default.max_age),
                        idempotency_window: p
                            .idempotency_window
                            .unwrap_or(default.idempotency_window),
                        presence: p.presence.unwrap_or(default.presence),
                    },
                )
            })
            .collect();
        ChannelEnv {
            default,
            prefixes,
            memory_tail_bytes: self.memory_tail.0 as usize,
            max_subscribers: limits.max_subscribers_per_channel,
            // Set by the server, which owns the metrics.
            observer: None,
            tails: Some(Arc::new(TailBudget::new(self.memory_tail_total.0 as usize))),
        }
    }
}

impl LimitsSettings {
    /// [`LimitsSettings::max_channels_per_connection`], at least 1.
    pub(crate) fn channels_per_connection(&self) -> usize {
        self.max_channels_per_connection.max(1)
    }
}

impl Settings {
    /// Loads settings: defaults, then `file` (if given), then the environment `env` (pass
    /// `std::env::vars()`). Errors name the offending key and its source.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let mut value = toml::Value::try_from(Settings::default())
            .context("serialising the default settings")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let from_file: toml::Table = toml::from_str(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?;
            merge(&mut value, toml::Value::Table(from_file));
            // Validate the file on its own first, so an error names the file.
            Self::from_value(value.clone())
                .with_context(|| format!("in config file {}", path.display()))?;
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("DORMOUSE_"))
            .collect();
        if let toml::Value::Table(root) = &mut value {
            apply_env(root, "DORMOUSE", &env);
        }
        Self::from_value(value).context("in DORMOUSE_* environment variables")
    }

    fn from_value(value: toml::Value) -> anyhow::Result<Self> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("setting `{path}`: {}", e.into_inner())
        })
    }
}

/// Overlays `overlay` onto `base`, table by table.
fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(base), toml::Value::Table(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) if existing.is_table() && value.is_table() => {
                        merge(existing, value)
                    }
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Sets every scalar key of `table` found in the environment as `PREFIX_KEY`, recursing
/// into sub-tables as `PREFIX_SECTION_KEY`. Values parse as TOML scalars when they can
/// (numbers, booleans) and are strings otherwise.
fn apply_env(table: &mut toml::Table, prefix: &str, env: &[(String, String)]) {
    for (key, value) in table.iter_mut() {
        let name = format!("{prefix}_{}", key.to_ascii_uppercase());
        if let toml::Value::Table(sub) = value {
            apply_env(sub, &name, env);
            continue;
        }
        if let Some((_, raw)) = env.iter().find(|(k, _)| *k == name) {
            *value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .filter(|v| !v.is_table() && !v.is_array())
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
        }
    }
}

mod durability_serde {
    use dormouse_storage::Durability;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Durability, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Durability, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_hook_entry_says_what_is_wrong_with_its_events() {
        let hook = |events: &[&str], channels: &[&str]| HookSettings {
            name: "app".into(),
            url: "http://127.0.0.1:9/hook".into(),
            secret: "0123456789abcdef0123456789abcdef".into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            events: events.iter().map(|e| e.to_string()).collect(),
            timeout: Duration::from_secs(1),
        };
        assert!(hook(&["occupied", "vacated"], &["room:*"]).check().is_ok());
        let e = hook(&["vacated"], &[]).check().unwrap_err().to_string();
        assert!(e.contains("occupied and vacated are about channels"), "{e}");
        let e = hook(&["joined"], &[]).check().unwrap_err().to_string();
        assert!(e.contains("unknown event \"joined\""), "{e}");
    }

    #[test]
    fn cluster_urls_come_from_a_list_or_a_comma_separated_variable_and_are_checked() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert!(!s.cluster.enabled(), "off by default");
        let s = Settings::load(
            None,
            env(&[
                (
                    "DORMOUSE_CLUSTER_NATS_URLS",
                    "nats://a:4222, nats://b:4222,nats://c:4222",
                ),
                ("DORMOUSE_CLUSTER_NODE_NAME", "node-1"),
                ("DORMOUSE_CLUSTER_REPLICAS", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.cluster.nats_urls,
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        s.cluster.check().unwrap();
        assert_eq!(s.cluster.node(), "node-1");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dormouse.toml");
        std::fs::write(
            &path,
            "[cluster]\nnats_urls = [\"nats://x:4222\"]\nreplicas = 2\nnats_tls_cert = \"c.pem\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), env(&[])).unwrap();
        let error = s.cluster.check().unwrap_err().to_string();
        assert!(error.contains("cluster.replicas is 2"), "{error}");
        let mut cluster = s.cluster.clone();
        cluster.replicas = 3;
        let error = cluster.check().unwrap_err().to_string();
        assert!(error.contains("nats_tls_key"), "{error}");
    }

    #[test]
    fn defaults_round_trip_and_work_out_of_the_box() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.limits.max_message_size, ByteSize::mib(16));
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dormouse.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:9000"
[channels]
idle_timeout = "5s"
max_bytes = "2MiB"
[[channels.prefix]]
prefix = "chat:"
max_events = 50
[limits]
max_message_size = "1MiB"
"#,
        )
        .unwrap();
        let s = Settings::load(
            Some(&path),
            env(&[
                ("DORMOUSE_LIMITS_MAX_MESSAGE_SIZE", "2MiB"),
                ("DORMOUSE_CHANNELS_MAX_EVENTS", "7"),
                ("DORMOUSE_STORAGE_DURABILITY", "never"),
                ("DORMOUSE_WEBSOCKET_CLIENT_PUBLISH", "false"),
                ("DORMOUSE_LOG_FORMAT", "json"),
                ("DORMOUSE_ADMIN_ENABLED", "true"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.channels.idle_timeout, Duration::from_secs(5));
        assert_eq!(s.channels.max_bytes, ByteSize::mib(2));
        assert_eq!(s.channels.max_events, 7);
        assert_eq!(s.limits.max_message_size, ByteSize::mib(2));
        assert_eq!(s.storage.durability, Durability::Never);
        assert!(!s.websocket.client_publish);
        assert_eq!(s.log.format, crate::logging::LogFormat::Json);
        assert!(s.admin.enabled);
        let env = s.channels.env(&s.limits);
        assert_eq!(env.settings_for("chat:1").max_events, 50);
        assert_eq!(env.settings_for("chat:1").max_bytes, 2 * 1024 * 1024);
        assert_eq!(env.settings_for("news").max_events, 7);
    }

    #[test]
    fn bad_values_name_their_key() {
        let err =
            Settings::load(None, env(&[("DORMOUSE_CHANNELS_IDLE_TIMEOUT", "soon")])).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("channels.idle_timeout"), "{text}");
        assert!(text.contains("DORMOUSE_"), "{text}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[limits]\nmax_message_size = \"lots\"\n").unwrap();
        let text = format!("{:#}", Settings::load(Some(&path), env(&[])).unwrap_err());
        assert!(text.contains("limits.max_message_size"), "{text}");
        assert!(text.contains("bad.toml"), "{text}");

        std::fs::write(&path, "[limits]\nmax_mesage_size = \"1MiB\"\n").unwrap();
        let text = format!("{:#}", Settings::load(Some(&path), env(&[])).unwrap_err());
        assert!(text.contains("max_mesage_size"), "{text}");
    }
}
