//! [`ApiError`], the one shape every refusal takes on the wire: a status, a stable `code` and
//! a message saying what was wrong (`{"error": {"code", "message"}}`, docs/API.md).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A failure as the client sees it: an HTTP status, a stable machine-readable `code`, and a
/// message that says what was wrong and how to fix it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable identifier clients can match on, e.g. `not_found`.
    pub code: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// Seconds the client should wait before retrying (`Retry-After`), for 429 and 503.
    pub retry_after: Option<u64>,
    /// The channel the error is about, when a request names several (`GET /v1/events`):
    /// a client drops that one and follows the others, instead of failing them all.
    pub channel: Option<String>,
}

impl ApiError {
    /// Builds an error; prefer the named constructors for common cases.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            channel: None,
        }
    }

    /// Names the channel the error is about (in the body's `error.channel`).
    pub fn about(mut self, channel: &str) -> Self {
        self.channel = Some(channel.to_string());
        self
    }

    /// Adds a `Retry-After` of `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// No route matches the path.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The route exists but not for this method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// A dependency (storage) is not able to serve.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

/// The `code` of an error response, left in its extensions so the metrics middleware counts
/// refusals by code without reading bodies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorCode(pub(crate) &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(channel) = self.channel {
            body["error"]["channel"] = json!(channel);
        }
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code));
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

impl ApiError {
    /// The request is malformed; `message` says how.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The body exceeds a configured size.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
}

impl From<dormouse_runtime::Error> for ApiError {
    fn from(e: dormouse_runtime::Error) -> Self {
        use dormouse_runtime::Error;
        match &e {
            // Logged here, once per refused request, so an operator sees storage trouble
            // (a full disk, an unwritable data dir) without reading client answers.
            Error::Storage(inner) if inner.is_disk_full() => {
                tracing::warn!(error = %inner, "storage is full; refusing the request");
                Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "storage_full",
                    format!("the server's disk is full; nothing was stored: {inner}"),
                )
            }
            Error::Storage(inner)
                if matches!(**inner, dormouse_storage::Error::NotOwner { .. }) =>
            {
                // Cluster mode: another node took it over while this node was writing, or
                // kept refusing the calls this node forwarded.
                tracing::info!(error = %inner, "refused: owned by another node");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "owned_elsewhere",
                    format!("nothing was stored: {inner}"),
                )
            }
            Error::Storage(inner) => {
                tracing::warn!(error = %inner, "storage failed; refusing the request");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    format!("storage failed; nothing was acknowledged: {inner}"),
                )
            }
            Error::Unavailable(_) => Self::unavailable(e.to_string()),
            Error::Handler { .. } | Error::Panicked { .. } => {
                tracing::error!(error = %crate::logging::error_chain(&e), "object failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}
