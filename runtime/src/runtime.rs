//! [`Runtime`]: owns the storage engine and the alarm scheduler every namespace of a process
//! shares, and creates the namespaces.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dormouse_storage::Storage;

use crate::alarm::Alarms;
use crate::counters::CommitTimer;
use crate::{Namespace, NamespaceConfig, Object};

/// The host of every namespace in a process: owns the storage engine they share and the
/// scheduler that fires their alarms.
#[derive(Clone)]
pub struct Runtime {
    storage: Arc<dyn Storage>,
    alarms: Arc<Alarms>,
    /// Shared with every namespace, so an observer installed later still sees their commits.
    commits: Arc<CommitTimer>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("storage", &self.storage)
            .finish()
    }
}

impl Runtime {
    /// A runtime over `storage`; every object's state lives there under its namespace.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            alarms: Arc::new(Alarms::new(storage.clone())),
            storage,
            commits: Arc::default(),
        }
    }

    /// The storage engine, for components (like the gateway's readiness check) that need it.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Creates the namespace `name` for object type `O`. Two namespaces must not share a name:
    /// their objects would share storage.
    pub fn namespace<O: Object>(
        &self,
        name: &str,
        config: NamespaceConfig,
        env: O::Env,
    ) -> Namespace<O> {
        Namespace::new(
            name,
            self.storage.clone(),
            self.alarms.clone(),
            self.commits.clone(),
            config,
            env,
        )
    }

    /// Calls `observer` with the duration of every durability wait (the commit future a
    /// handler's writes wait on before its outputs are released), in every namespace, so
    /// an embedder can measure storage latency as clients feel it without wrapping the
    /// storage engine. One observer per runtime: returns false, and changes nothing, if
    /// one is already installed.
    pub fn observe_commits(&self, observer: impl Fn(Duration) + Send + Sync + 'static) -> bool {
        self.commits.set(Arc::new(observer))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use dormouse_storage::MemoryStorage;

    use super::*;
    use crate::Context;

    struct Writer;

    impl Object for Writer {
        type Env = ();
        type Request = bool;
        type Response = ();

        async fn activate(_ctx: &mut Context<'_>, _env: &()) -> anyhow::Result<Self> {
            Ok(Writer)
        }

        async fn handle(&mut self, ctx: &mut Context<'_>, write: bool) -> anyhow::Result<()> {
            if write {
                ctx.put(b"k".to_vec(), b"v".to_vec());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_commit_observer_sees_each_write_and_only_writes() {
        let runtime = Runtime::new(Arc::new(MemoryStorage::new()));
        // Created before the observer: namespaces share the runtime's timer.
        let ns = runtime.namespace::<Writer>("w", NamespaceConfig::default(), ());
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        assert!(runtime.observe_commits(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        assert!(!runtime.observe_commits(|_| {}), "one observer per runtime");
        ns.call("a", true).await.unwrap();
        ns.call("a", false).await.unwrap();
        ns.call("b", true).await.unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 2);
    }
}
