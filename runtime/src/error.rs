//! The runtime's [`Error`]: why a call to an object failed, cloneable so one storage failure
//! reaches every request that waited on the same commit.

use std::sync::Arc;

/// Why a call to an object failed. Cloneable because one storage failure may have to be
/// reported to every request waiting behind the same commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The object's handler (or its activation) returned an error; the object's in-memory
    /// state was dropped and will be rebuilt from storage on the next call.
    #[error("{id}: handler failed: {message}")]
    Handler {
        /// Which object.
        id: String,
        /// The error chain, rendered.
        message: String,
    },
    /// The object's handler panicked; treated like a handler error, and the process goes on.
    #[error("{id}: handler panicked: {message}")]
    Panicked {
        /// Which object.
        id: String,
        /// The panic payload, when it was a string.
        message: String,
    },
    /// Storage refused a write or could not make it durable; nothing the handler produced was
    /// released.
    #[error("storage: {0}")]
    Storage(Arc<dormouse_storage::Error>),
    /// The runtime is shutting down or the activation went away before answering.
    #[error("object {0} is unavailable (runtime shutting down)")]
    Unavailable(String),
}

impl From<dormouse_storage::Error> for Error {
    fn from(e: dormouse_storage::Error) -> Self {
        Self::Storage(Arc::new(e))
    }
}

/// The runtime's result type.
pub type Result<T> = std::result::Result<T, Error>;
