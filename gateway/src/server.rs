use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use dormouse_actors::Channel;
use dormouse_actors::channel::NAMESPACE;
use dormouse_runtime::{Namespace, NamespaceConfig, Runtime};
use dormouse_storage::{SledConfig, SledStorage};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::{ApiError, Settings, channels, health, publish, sse, ws};

/// Everything a request handler may need; cloned per request (all fields are handles).
#[derive(Debug, Clone)]
pub struct AppState {
    /// The object host.
    pub runtime: Runtime,
    /// The channel objects.
    pub channels: Namespace<Channel>,
    /// The configuration in force.
    pub settings: Arc<Settings>,
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
                shutdown,
            },
            storage,
            stop,
        })
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
        let app = self.router();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                info!("shutting down: closing connections");
                let _ = stop.send(true);
            })
            .await
            .context("serving HTTP")?;
        self.state.channels.shutdown().await;
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.close())
            .await?
            .context("final storage flush")?;
        info!("stopped");
        Ok(())
    }
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
