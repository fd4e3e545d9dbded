use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{any, get, post};
use dormouse_actors::Channel;
use dormouse_actors::channel::NAMESPACE;
use dormouse_runtime::{DynNamespace, Namespace, NamespaceConfig, Object, Runtime};
use dormouse_storage::{SledConfig, SledStorage};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::listener::GuardedListener;
use crate::{ApiError, Settings, channels, health, objects, publish, sse, ws};

/// Everything a request handler may need; cloned per request (all fields are handles).
#[derive(Debug, Clone)]
pub struct AppState {
    /// The object host.
    pub runtime: Runtime,
    /// The channel objects.
    pub channels: Namespace<Channel>,
    /// The configuration in force.
    pub settings: Arc<Settings>,
    /// User-defined object namespaces mounted under `/v1/objects/{namespace}/...`.
    pub objects: Arc<RwLock<HashMap<String, Arc<dyn DynNamespace>>>>,
    /// Long-lived connection tasks (WebSockets), so a stop can wait for them to let go of
    /// storage.
    pub tasks: TaskTracker,
    /// Flips to `true` when the server is stopping, so long-lived connections can say
    /// goodbye (SSE: reconnect hint; WebSocket: close 1012 "service restart").
    pub shutdown: watch::Receiver<bool>,
}

/// A configured server: storage open, runtime up, not yet listening.
#[derive(Debug)]
pub struct Dormouse {
    state: AppState,
    storage: Arc<SledStorage>,
    stop: watch::Sender<bool>,
}

impl Dormouse {
    /// Opens the data dir and creates the runtime. Fails with a clear message when the data
    /// dir is in use by another process or was written by an incompatible version.
    pub fn open(settings: Settings) -> anyhow::Result<Self> {
        let mut storage_config = SledConfig::new(&settings.data_dir);
        storage_config.cache_capacity_bytes = settings.storage.cache.0;
        storage_config.durability = settings.storage.durability;
        let storage = Arc::new(
            SledStorage::open(storage_config)
                .with_context(|| format!("opening data dir {}", settings.data_dir.display()))?,
        );
        let runtime = Runtime::new(storage.clone());
        let channels = runtime.namespace::<Channel>(
            NAMESPACE,
            NamespaceConfig::with_idle_timeout(settings.channels.idle_timeout),
            settings.channels.env(),
        );
        let (stop, shutdown) = watch::channel(false);
        Ok(Self {
            state: AppState {
                runtime,
                channels,
                settings: Arc::new(settings),
                objects: Arc::default(),
                tasks: TaskTracker::new(),
                shutdown,
            },
            storage,
            stop,
        })
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
        info!(addr = %listener.local_addr()?, "listening");
        let stop = self.stop.clone();
        let kill = CancellationToken::new();
        let grace = self.state.settings.shutdown_grace;
        let write_timeout = self.state.settings.limits.write_timeout;
        let listener = GuardedListener::new(listener, kill.clone(), write_timeout);
        let app = self.router();
        let cut_off = kill.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                info!("shutting down: closing connections");
                let _ = stop.send(true);
                // Connections that cannot say goodbye in time (a client that stopped
                // reading) are cut.
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    cut_off.cancel();
                });
            })
            .await
            .context("serving HTTP")?;
        self.state.tasks.close();
        if tokio::time::timeout(grace * 2, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some WebSocket connections did not end in time");
        }
        kill.cancel();
        // Objects may publish to channels while they drain, never the reverse: objects first.
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
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.close())
            .await?
            .context("final storage flush")?;
        info!("stopped");
        Ok(())
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

/// Resolves on SIGINT or SIGTERM, the signals an operator or a supervisor uses to stop us.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    info!("shutdown requested");
}

fn router(state: AppState) -> Router {
    let limits = &state.settings.limits;
    // Bodies are read with explicit limits in each handler (413 with a JSON body);
    // axum's own limit is lifted above the largest so it never answers first.
    let body_limit = limits.max_message_size.0.max(limits.max_batch_size.0) as usize + 1024;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/channels", get(channels::list))
        .route(
            "/v1/channels/{channel}",
            get(channels::info).delete(channels::delete),
        )
        .route(
            "/v1/channels/{channel}/messages",
            post(channels::publish).get(channels::history),
        )
        .route("/v1/channels/{channel}/events", get(sse::subscribe))
        .route("/v1/channels/{channel}/ws", get(ws::subscribe))
        .route("/v1/publish", post(publish::batch))
        .route("/v1/objects/{namespace}/{name}", any(objects::route))
        .route(
            "/v1/objects/{namespace}/{name}/{*rest}",
            any(objects::route),
        )
        // Compatibility with Redis-backed SSE proxies.
        .route("/channel/{channel}/messages", post(channels::publish))
        .route("/sub", get(sse::subscribe_compat))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("{method} is not allowed on {}", uri.path()))
}

impl AppState {
    /// The mounted namespace called `name`.
    pub(crate) fn object_namespace(&self, name: &str) -> Option<Arc<dyn DynNamespace>> {
        self.objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}
