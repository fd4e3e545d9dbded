//! The wiring: [`Dormouse`] opens storage and the runtime, mounts object namespaces, builds
//! the router from `routes.rs`, and [`Dormouse::serve`] hands it to the connection layer
//! (`conn/`), then shuts the namespaces down and closes storage.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{any, get, post};
use dormouse_actors::Channel;
use dormouse_actors::channel::NAMESPACE;
use dormouse_runtime::{DynNamespace, Namespace, NamespaceConfig, Object, Runtime};
use dormouse_storage::{SegmentConfig, SegmentStorage, Storage};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::info;

use crate::auth::Auth;
use crate::cluster::ClusterNode;
use crate::config::CorsSettings;
use crate::config::Settings;
use crate::conn::{
    self, ConnContext, ConnLimits, ConnListener, KillSwitch, Stopping, shutdown_signal,
};
use crate::connections::ConnectionTable;
use crate::error::ApiError;
use crate::hooks::Hooks;
use crate::limits::Limits;
use crate::publisher::Publisher;
use crate::state::AppState;
use crate::telemetry::{self, Telemetry};
use crate::{
    admin, channels, connections, health, middleware, objects, publish, routes, scrape, sse, ws,
};

/// A configured server: storage open, runtime up, not yet listening.
#[derive(Debug)]
pub struct Dormouse {
    state: AppState,
    storage: Arc<dyn Storage>,
    connections: Arc<ConnLimits>,
}

/// Opens the data dir on the segment engine. A data dir written by the sled engine (it has
/// a `sled/` directory) is migrated in place first, so upgrading does not strand data.
fn open_storage(settings: &Settings) -> anyhow::Result<Arc<dyn Storage>> {
    let storage = &settings.storage;
    let segment_bytes = storage.segment_size.0;
    anyhow::ensure!(
        (4096..=SegmentConfig::MAX_SEGMENT_BYTES).contains(&segment_bytes),
        "storage.segment_size is {segment_bytes} bytes; it must be between 4KiB and 1GiB"
    );
    let mut config = SegmentConfig::new(&settings.data_dir);
    config.durability = storage.durability;
    config.segment_bytes = segment_bytes;
    config.clean_above_bytes = 2 * config.segment_bytes;
    config.cache_bytes = storage.cache.0;
    config.dirty_bytes = storage.checkpoint_memory.0;
    config.checkpoint_bytes = storage.checkpoint_log.0;
    Ok(Arc::new(SegmentStorage::open(config)?))
}

impl Dormouse {
    /// Opens the server as its configuration says: on its embedded store, or, with
    /// `cluster.nats_urls` set, as a node of a cluster on NATS JetStream (connecting,
    /// joining and answering other nodes before it returns). What a `main` calls.
    pub async fn start(settings: Settings) -> anyhow::Result<Self> {
        if !settings.cluster.enabled() {
            return Self::open(settings);
        }
        let mut channel_env = settings.channels.env(&settings.limits);
        let telemetry = Arc::new(Telemetry::new(settings.admin.enabled));
        channel_env.observer = Some(telemetry.clone());
        let cluster = ClusterNode::start(
            &settings.cluster,
            channel_env,
            NamespaceConfig::with_idle_timeout(settings.channels.idle_timeout),
            settings.limits.max_message_size.0 as usize,
        )
        .await
        .context("joining the cluster")?;
        let storage: Arc<dyn Storage> = Arc::new(cluster.storage().clone());
        let server = Self::build(settings, storage, telemetry, Some(cluster.clone()))?;
        cluster.serve(server.state.clone()).await?;
        Ok(server)
    }

    /// Opens the data dir and creates the runtime, single-node. Fails with a clear message
    /// when the data dir is in use by another process or was written by an incompatible
    /// version, and when `cluster.nats_urls` is set (that takes [`Dormouse::start`]).
    pub fn open(settings: Settings) -> anyhow::Result<Self> {
        // Not silently single-node: an operator who configured a cluster must not find out
        // from a lost failover that there was none.
        anyhow::ensure!(
            !settings.cluster.enabled(),
            "cluster.nats_urls is set: a cluster node is started with Dormouse::start \
             (the dormouse binary does), not Dormouse::open"
        );
        let telemetry = Arc::new(Telemetry::new(settings.admin.enabled));
        // Checked before the data dir is touched.
        Self::check_front(&settings)?;
        let storage = open_storage(&settings)
            .with_context(|| format!("opening data dir {}", settings.data_dir.display()))?;
        Self::build(settings, storage, telemetry, None)
    }

    /// What both ways of opening check first: credentials, CORS, the listen address against
    /// the authentication configured (`serve` checks the bound address again).
    fn check_front(settings: &Settings) -> anyhow::Result<Auth> {
        let auth = Auth::from_settings(&settings.auth)?;
        cors_layer(&settings.cors)?;
        check_exposure(
            settings.listen,
            auth.enabled(),
            settings.auth.allow_anonymous,
        )?;
        Ok(auth)
    }

    fn build(
        settings: Settings,
        storage: Arc<dyn Storage>,
        telemetry: Arc<Telemetry>,
        cluster: Option<Arc<ClusterNode>>,
    ) -> anyhow::Result<Self> {
        let auth = Self::check_front(&settings)?;
        let runtime = Runtime::new(storage.clone());
        let observer = telemetry.clone();
        runtime.observe_commits(move |took| observer.commit(took));
        let mut channel_env = settings.channels.env(&settings.limits);
        channel_env.observer = Some(telemetry.clone());
        let channels = runtime.namespace::<Channel>(
            NAMESPACE,
            NamespaceConfig::with_idle_timeout(settings.channels.idle_timeout)
                .with_max_active(settings.channels.max_active),
            channel_env,
        );
        let connections = Arc::new(ConnLimits::new(
            settings.limits.max_connections,
            settings.limits.max_connections_per_ip,
        ));
        let limits = Arc::new(Limits::new(&settings.limits));
        let publisher = Publisher::new(
            channels.clone(),
            cluster.clone(),
            limits.clone(),
            settings.limits.max_message_size.0 as usize,
        );
        // The cluster's name for this node, or a fresh one: either way each start hands out
        // connection ids no earlier start did.
        let me = match &cluster {
            Some(cluster) => cluster.me().clone(),
            None => dormouse_cluster::NodeId::start(settings.cluster.node()),
        };
        let server = Self {
            connections,
            state: AppState {
                // A single node's records keep one name, whatever the host is called now (a
                // container recreated on the same volume gets another host name).
                hooks: Arc::new(Hooks::new(
                    &settings.hooks,
                    storage.clone(),
                    if cluster.is_some() {
                        &me.name
                    } else {
                        "single"
                    },
                    settings.limits.hook_disconnects_in_memory,
                )?),
                connections: ConnectionTable::new(me),
                runtime,
                publisher,
                channels,
                settings: Arc::new(settings),
                auth,
                limits,
                objects: Arc::default(),
                tasks: TaskTracker::new(),
                stopping: Stopping::default(),
                telemetry,
                cluster,
            },
            storage,
        };
        server.start_occupancy();
        Ok(server)
    }

    /// Runs the channels' occupancy objects when a hook takes `occupied` or `vacated`
    /// (docs/HOOKS.md). They are a namespace of the runtime like a mounted one, so cluster
    /// mode routes calls to them (and fires their alarms) as it does any object's.
    fn start_occupancy(&self) {
        let state = &self.state;
        if !state.hooks.takes_occupancy() {
            return;
        }
        let namespace: Arc<dyn DynNamespace> = Arc::new(crate::hooks::occupancy::namespace(
            &state.runtime,
            &state.hooks,
        ));
        state
            .objects
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.name().to_string(), namespace.clone());
        state.hooks.link_occupancy(namespace, state.cluster.clone());
    }

    /// The runtime, to create namespaces of user-defined objects.
    pub fn runtime(&self) -> &Runtime {
        &self.state.runtime
    }

    /// Creates a namespace of object type `O` and mounts it under
    /// `/v1/objects/{namespace}/{name}/...` (HTTP to [`Object::fetch`], WebSocket upgrades to
    /// [`Object::websocket`]). Returns the namespace for typed calls from Rust.
    pub fn mount<O: Object>(
        &self,
        namespace: &str,
        config: NamespaceConfig,
        env: O::Env,
    ) -> anyhow::Result<Namespace<O>> {
        crate::objects::check_namespace_name(namespace).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            namespace != NAMESPACE,
            "the namespace name {NAMESPACE:?} is reserved for channels"
        );
        let mut objects = self
            .state
            .objects
            .write()
            .unwrap_or_else(|p| p.into_inner());
        anyhow::ensure!(
            !objects.contains_key(namespace),
            "namespace {namespace:?} is already mounted"
        );
        let ns = self.state.runtime.namespace::<O>(namespace, config, env);
        objects.insert(namespace.to_string(), Arc::new(ns.clone()));
        Ok(ns)
    }

    /// The state handlers see; for tests and embedders.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The full router. Tests build exactly this, so what they exercise is what ships.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves on an already-bound listener until `shutdown` resolves; then tells every
    /// connection to go (SSE clients to retry, WebSockets closed with 1012), waits for them,
    /// lets every channel release what it holds, and flushes storage. Taking a bound listener
    /// lets tests bind port 0 and read the address.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.check_bound(listener.local_addr()?).await?;
        // Before the first connection: the disconnects an earlier run owed go out, and a
        // hooked connection can be promised its own.
        self.state.hooks.start_outbox().await;
        let kill = KillSwitch::default();
        let listener = ConnListener::new(
            listener,
            kill.clone(),
            self.state.settings.limits.write_timeout,
            self.connections.clone(),
            self.state.telemetry.clone(),
        );
        let sampler = tokio::spawn(sample(self.state.clone()));
        let ctx = ConnContext {
            router: self.router(),
            head_timeout: self.state.settings.limits.header_read_timeout,
            tasks: self.state.tasks.clone(),
            stopping: self.state.stopping.clone(),
            telemetry: self.state.telemetry.clone(),
        };
        let grace = self.state.settings.shutdown_grace;
        conn::accept::serve(listener, shutdown, ctx, kill, grace).await;
        // The connections just closed owe their hooks a disconnect: a moment to send them.
        self.state
            .hooks
            .stop(grace.min(Duration::from_secs(2)))
            .await;
        self.shutdown_namespaces().await;
        if let Some(cluster) = &self.state.cluster {
            cluster.leave().await;
        }
        sampler.abort();
        self.close_storage().await?;
        info!("stopped");
        Ok(())
    }

    /// Refuses to serve on an address the configuration does not allow (see
    /// `check_exposure`); warns when every client may do everything.
    async fn check_bound(&self, addr: SocketAddr) -> anyhow::Result<()> {
        if let Err(e) = check_exposure(
            addr,
            self.state.auth.enabled(),
            self.state.settings.auth.allow_anonymous,
        ) {
            // Nothing was served; leave the data dir marked as cleanly closed.
            let storage = self.storage.clone();
            let _ = tokio::task::spawn_blocking(move || storage.close()).await;
            return Err(e);
        }
        if !self.state.auth.enabled() {
            tracing::warn!(%addr, "no authentication configured: every client may do everything");
        }
        info!(%addr, "listening");
        Ok(())
    }

    /// Lets every object and channel release what it holds. Objects may publish to
    /// channels while they drain, never the reverse: objects first.
    async fn shutdown_namespaces(&self) {
        let mounted: Vec<Arc<dyn DynNamespace>> = self
            .state
            .objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for ns in mounted {
            ns.shutdown().await;
        }
        self.state.channels.shutdown().await;
    }

    /// The final flush. A stuck engine would hang it too: exit at once, with an error, so a
    /// supervisor restarts us (everything acknowledged is already durable).
    async fn close_storage(&self) -> anyhow::Result<()> {
        dormouse_storage::Storage::check(&*self.storage)
            .context("not flushing storage on the way out")?;
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.close())
            .await?
            .context("final storage flush")
    }
}

impl Dormouse {
    /// Binds the configured address and serves until SIGINT or SIGTERM: what a `main` does.
    pub async fn serve_until_signal(self) -> anyhow::Result<()> {
        let listen = self.state.settings.listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        self.serve(listener, shutdown_signal()).await
    }
}

fn router(state: AppState) -> Router {
    let limits = &state.settings.limits;
    // Bodies are read with explicit limits in each handler (413 with a JSON body);
    // axum's own limit is lifted above the largest so it never answers first.
    let body_limit = limits.max_message_size.0.max(limits.max_batch_size.0) as usize + 1024;
    let api = Router::new()
        .route(routes::CHANNELS, get(channels::list))
        .route(
            routes::CHANNEL,
            get(channels::info).delete(channels::delete),
        )
        .route(
            routes::CHANNEL_MESSAGES,
            post(channels::publish).get(channels::history),
        )
        .route(routes::CHANNEL_EVENTS, get(sse::subscribe))
        .route(routes::CHANNEL_WS, get(ws::subscribe))
        .route(routes::CHANNEL_PRESENCE, get(channels::presence))
        .route(routes::PUBLISH, post(publish::batch))
        .route(
            routes::CHANNEL_CONNECTIONS,
            get(connections::channel_connections),
        )
        .route(routes::CONNECTION, get(connections::connection_info))
        .route(
            routes::CONNECTION_MESSAGES,
            post(connections::connection_send),
        )
        .route(
            routes::CONNECTION_CLOSE,
            post(connections::connection_close),
        )
        .route(routes::SUBJECT_CONNECTIONS, get(connections::subject_list))
        .route(routes::SUBJECT_MESSAGES, post(connections::subject_send))
        .route(routes::SUBJECT_CLOSE, post(connections::subject_close))
        .route(routes::HOOK_WS, get(ws::hooked))
        .route(routes::METRICS, get(scrape::metrics))
        .route(routes::OBJECT, any(objects::route))
        .route(routes::OBJECT_REST, any(objects::route))
        // Compatibility with Redis-backed SSE proxies.
        .route(routes::COMPAT_PUBLISH, post(channels::publish))
        .route(routes::COMPAT_SUBSCRIBE, get(sse::subscribe_compat))
        .route(routes::EVENTS, get(sse::subscribe_many));
    let api = if state.settings.admin.enabled {
        api.route(routes::ADMIN_STATS, get(admin::stats))
    } else {
        api
    };
    let api = api
        // After routing, so the check knows the route and its parameters; routes added
        // above are covered by default (unknown ones need at least a credential).
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require,
        ));
    let router = Router::new()
        // Probes stay open: orchestrators call them without credentials.
        .route(routes::HEALTHZ, get(health::healthz))
        .route(routes::READYZ, get(health::readyz));
    // The page itself is static and holds no data (the same bytes ship in every binary);
    // what it shows comes from `/admin/api/stats`, which needs the admin capability. A
    // browser cannot attach a bearer token to a page load, so gating the page would push
    // tokens into URLs.
    let router = if state.settings.admin.enabled {
        router.route(routes::ADMIN_PAGE, get(admin::page))
    } else {
        router
    };
    let router = router
        .merge(api)
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        // Oversized and excess requests are refused before any other work.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::guard,
        ))
        // Outside everything that may refuse a request, so every refusal is counted.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::count_rejections,
        ));
    let router = match cors_layer(&state.settings.cors) {
        Ok(Some(cors)) => router.layer(cors),
        // Validated by `Dormouse::open`.
        Ok(None) | Err(_) => router,
    };
    router.with_state(state)
}

/// Refuses an open server (no credential configured) on an address others can reach,
/// unless the operator said so: the mistake it prevents is silent and costly.
fn check_exposure(addr: SocketAddr, auth: bool, allow_anonymous: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        auth || addr.ip().is_loopback() || allow_anonymous,
        "refusing to listen on {addr} without authentication: anyone who can reach it could \
         publish, read and delete. Configure [auth] (jwt_secret, jwt_public_key_file or \
         api_keys), listen on a loopback address, or pass --allow-anonymous \
         (auth.allow_anonymous = true, DORMOUSE_AUTH_ALLOW_ANONYMOUS=true) if something in \
         front of Dormouse already authenticates"
    );
    Ok(())
}

/// The CORS layer for `[cors]`, or `None` when no origin is allowed (no CORS headers at all).
fn cors_layer(settings: &CorsSettings) -> anyhow::Result<Option<CorsLayer>> {
    use axum::http::{HeaderName, HeaderValue, header};
    if settings.allowed_origins.is_empty() {
        return Ok(None);
    }
    let origins = if settings.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = settings
            .allowed_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o)
                    .with_context(|| format!("setting `cors.allowed_origins`: bad origin {o:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("x-dormouse-event"),
            ])
            .expose_headers([header::RETRY_AFTER])
            .max_age(settings.max_age),
    ))
}

async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Until the server stops: once a second, closes the admin page's sample and lets the
/// metrics recorder fold its histograms; every [`telemetry::STORAGE_SAMPLE_EVERY`], measures
/// the data dir (a directory walk: never per request).
async fn sample(state: AppState) {
    let mut second = tokio::time::interval(std::time::Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_size: Option<tokio::time::Instant> = None;
    let mut stopping = state.stopping.waiter();
    loop {
        tokio::select! {
            _ = second.tick() => {}
            // Storage is about to close: stop measuring it.
            () = stopping.stopped() => return,
        }
        state.telemetry.tick();
        state.limits.forget_idle();
        if last_size.is_none_or(|at| at.elapsed() >= telemetry::STORAGE_SAMPLE_EVERY) {
            last_size = Some(tokio::time::Instant::now());
            let storage = state.runtime.storage().clone();
            match tokio::task::spawn_blocking(move || storage.size_on_disk()).await {
                Ok(Ok(bytes)) => state.telemetry.set_storage_bytes(bytes),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::logging::error_chain(&e), "measuring storage failed")
                }
                Err(e) => tracing::warn!(error = %e, "measuring storage did not finish"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_exposure;

    #[test]
    fn an_open_server_listens_on_loopback_only_unless_told_otherwise() {
        let public = "0.0.0.0:8080".parse().unwrap();
        let err = check_exposure(public, false, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to listen on 0.0.0.0:8080"), "{err}");
        assert!(err.contains("--allow-anonymous"), "{err}");
        assert!(check_exposure("203.0.113.7:80".parse().unwrap(), false, false).is_err());
        assert!(check_exposure(public, true, false).is_ok());
        assert!(check_exposure(public, false, true).is_ok());
        assert!(check_exposure("127.0.0.1:8080".parse().unwrap(), false, false).is_ok());
        assert!(check_exposure("[::1]:8080".parse().unwrap(), false, false).is_ok());
    }
}
