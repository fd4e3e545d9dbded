use std::future::Future;

use axum::Router;
use axum::http::{Method, Uri};
use axum::routing::get;
use dormouse_runtime::Runtime;
use tokio::net::TcpListener;
use tracing::info;

use crate::{ApiError, health};

/// Everything a request handler may need, cloned per request (all fields are handles).
#[derive(Debug, Clone)]
pub struct AppState {
    /// The object host; namespaces are created from it.
    pub runtime: Runtime,
}

/// The full router. Tests build exactly this, so what they exercise is what ships.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Serves `app(state)` on an already-bound listener until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish. Taking a bound listener lets tests bind
/// port 0 and read the address.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
