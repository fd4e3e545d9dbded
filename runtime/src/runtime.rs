use std::fmt;
use std::sync::Arc;

use dormouse_storage::Storage;

use crate::alarm::Alarms;
use crate::{Namespace, NamespaceConfig, Object};

/// The host of every namespace in a process: owns the storage engine they share and the
/// scheduler that fires their alarms.
#[derive(Clone)]
pub struct Runtime {
    storage: Arc<dyn Storage>,
    alarms: Arc<Alarms>,
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
        Namespace::new(name, self.storage.clone(), self.alarms.clone(), config, env)
    }
}
