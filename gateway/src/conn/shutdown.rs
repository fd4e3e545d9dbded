//! Stopping the server's connections: the stop signal every connection's loop polls
//! ([`Stopping`]), the [`KillSwitch`] that fails the IO of those that outlive the grace
//! period, the OS signals ([`shutdown_signal`]) and the drain ([`drain_connections`]).
//!
//! A connection's loop asks "is the server stopping?" on every turn. Asked through a
//! `watch` channel, each turn registered a waiter on a list every connection shares and
//! removed it again (about 4 % of the server's CPU under WebSocket fan-out, most of it the
//! two cores fighting over that list); keeping one registration for the connection's life
//! cost each idle connection a boxed future of ~200 bytes. Here a turn costs an atomic
//! load and a waker comparison: a waiter registers its task's waker once, in one of a few
//! sharded lists, and again only if the task's waker changes; stopping sets the flag and
//! wakes every registered waker.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use slab::Slab;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Lists of wakers; a waiter picks one by a counter, so registrations rarely contend.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    wakers: [Mutex<Slab<Waker>>; SHARDS],
    next_shard: std::sync::atomic::AtomicUsize,
}

/// The server's stop signal: cheap to clone, one per server.
#[derive(Debug, Clone, Default)]
pub struct Stopping {
    shared: Arc<Shared>,
}

impl Stopping {
    /// Tells every waiter, now and later, that the server is stopping.
    pub(crate) fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for shard in &self.shared.wakers {
            let wakers = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (_, waker) in wakers.iter() {
                waker.wake_by_ref();
            }
        }
    }

    /// True once the server began to stop.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// A waiter for a connection's loop, polled on every turn.
    pub(crate) fn waiter(&self) -> StopWaiter {
        let shard = self.shared.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        StopWaiter {
            shared: self.shared.clone(),
            shard: shard as u8,
            registered: None,
        }
    }

    /// Resolves once the server is stopping; for code that waits once, not in a loop.
    pub async fn stopped(&self) {
        let mut waiter = self.waiter();
        std::future::poll_fn(|cx| waiter.poll_stopping(cx)).await;
    }
}

/// One connection's registration: its waker's slot and a copy to compare against.
#[derive(Debug)]
pub(crate) struct StopWaiter {
    shared: Arc<Shared>,
    shard: u8,
    registered: Option<(usize, Waker)>,
}

impl StopWaiter {
    /// Ready once the server is stopping; otherwise arranges for `cx` to be woken then.
    pub(crate) fn poll_stopping(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Some((_, waker)) = &self.registered
            && waker.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        {
            let mut wakers = self.shared.wakers[usize::from(self.shard)]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match &mut self.registered {
                Some((key, waker)) => {
                    *waker = cx.waker().clone();
                    wakers[*key] = cx.waker().clone();
                }
                None => {
                    let key = wakers.insert(cx.waker().clone());
                    self.registered = Some((key, cx.waker().clone()));
                }
            }
        }
        // `stop` sets the flag before it takes any list's lock, so a stop that began before
        // the registration above is seen here, and one that begins after it wakes us.
        if self.shared.stopping.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Resolves once the server is stopping; keeps the registration for the next call.
    pub(crate) fn stopped(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_stopping(cx))
    }
}

impl Drop for StopWaiter {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            self.shared.wakers[usize::from(self.shard)]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_registered_waiter_is_woken_once_and_then_ready() {
        let stopping = Stopping::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut waiter = stopping.waiter();
        assert!(waiter.poll_stopping(&mut cx).is_pending());
        // Polling again with the same waker does not register twice.
        assert!(waiter.poll_stopping(&mut cx).is_pending());
        let shard = usize::from(waiter.shard);
        assert_eq!(stopping.shared.wakers[shard].lock().unwrap().len(), 1);
        stopping.stop();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(waiter.poll_stopping(&mut cx).is_ready());
        assert!(stopping.is_stopping());
        drop(waiter);
        assert_eq!(stopping.shared.wakers[shard].lock().unwrap().len(), 0);
    }

    #[test]
    fn a_changed_waker_replaces_the_old_one() {
        let stopping = Stopping::default();
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let second = Arc::new(Count(AtomicUsize::new(0)));
        let mut waiter = stopping.waiter();
        let waker = Waker::from(first.clone());
        assert!(
            waiter
                .poll_stopping(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let waker = Waker::from(second.clone());
        assert!(
            waiter
                .poll_stopping(&mut Context::from_waker(&waker))
                .is_pending()
        );
        stopping.stop();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_waiter_made_after_the_stop_is_ready_at_once() {
        let stopping = Stopping::default();
        stopping.stop();
        stopping.stopped().await;
        let mut waiter = stopping.waiter();
        waiter.stopped().await;
    }
}

/// The switch that ends every connection's IO at the end of a shutdown's grace period.
#[derive(Debug, Clone, Default)]
pub(crate) struct KillSwitch {
    /// What every read and write checks first: a plain atomic load, where the token's own
    /// `is_cancelled` takes a mutex that all connections share (measured at 2.4 % of the
    /// server's CPU under fan-out).
    flipped: Arc<AtomicBool>,
    /// Wakes IO that is blocked when the switch flips.
    token: CancellationToken,
}

impl KillSwitch {
    /// Fails every connection's pending and future IO.
    pub(crate) fn flip(&self) {
        self.flipped.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// The plain load every read and write makes first.
    pub(super) fn is_flipped(&self) -> bool {
        self.flipped.load(Ordering::Acquire)
    }

    /// Resolves when the switch flips: polled by IO only once it would block.
    pub(super) fn flipped(&self) -> WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }
}

/// Ends every connection, within bounds: tells them to go ([`Stopping::stop`]: SSE clients
/// get a `reconnect` event, WebSockets close 1012), waits for hyper's connections and the
/// tracked tasks (WebSockets, raw SSE), and flips `kill` after `grace` so those that cannot
/// say goodbye (a client that stopped reading) are cut. Returns once the cut connections'
/// tasks ran too, or after another `grace`: each holds the server's state (and so the data
/// dir's lock), so a server opened on the same data dir right after finds it free.
pub(crate) async fn drain_connections(
    stopping: &Stopping,
    kill: &KillSwitch,
    graceful: GracefulShutdown,
    tasks: &TaskTracker,
    grace: Duration,
) {
    stopping.stop();
    let cut_off = kill.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        cut_off.flip();
    });
    graceful.shutdown().await;
    tasks.close();
    if tokio::time::timeout(grace * 2, tasks.wait()).await.is_err() {
        tracing::warn!("some WebSocket connections did not end in time");
    }
    kill.flip();
    let _ = tokio::time::timeout(grace, tasks.wait()).await;
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
    tracing::info!("shutdown requested");
}
