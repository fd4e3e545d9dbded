//! The probes an orchestrator polls: `/healthz` (the process serves HTTP) and `/readyz`
//! (storage answers too; in cluster mode, the NATS connection is up).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;

/// Liveness: the process is up and serving HTTP. Never touches storage, so a slow disk does
/// not get a healthy process restarted.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: storage answers, so requests routed here can succeed.
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    // A stuck engine (a flush that never completes) is not ready, so an orchestrator
    // restarts the server; the message says why.
    state
        .runtime
        .storage()
        .check()
        .map_err(|e| ApiError::unavailable(format!("storage is not ready: {e}")))?;
    let storage = state.runtime.storage().clone();
    let size = tokio::task::spawn_blocking(move || storage.size_on_disk())
        .await
        .map_err(|e| ApiError::unavailable(format!("storage check did not finish: {e}")))?
        .map_err(|e| ApiError::unavailable(format!("storage is not ready: {e}")))?;
    let mut ready = json!({
        "status": "ready",
        "durability": state.runtime.storage().durability().to_string(),
        "storage_bytes": size,
    });
    if let Some(cluster) = &state.cluster {
        ready["cluster"] = json!({
            "node": cluster.me().to_string(),
            "nodes_alive": cluster.alive_nodes(),
        });
    }
    Ok(Json(ready))
}
