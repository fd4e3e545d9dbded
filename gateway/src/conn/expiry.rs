//! A connection's credential expiry: the connection ends (SSE with a `reconnect` event,
//! WebSocket with close 4001) when the credential it was opened with runs out.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// The expiry as a timer made once: `None` when the credential does not expire. Boxed, so a
/// connection without one pays nothing for it.
pub(crate) fn deadline(at: Option<Instant>) -> Option<Pin<Box<Sleep>>> {
    at.map(|at| Box::pin(tokio::time::sleep_until(at)))
}

/// Resolves when `deadline` passes; never if there is none.
pub(crate) async fn expired(deadline: &mut Option<Pin<Box<Sleep>>>) {
    match deadline.as_mut() {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}
