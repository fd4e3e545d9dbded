//! [`ObjectId`]: which object a write or read belongs to (namespace and name).

use std::fmt;
use std::sync::Arc;

/// The identity of an object: which namespace (object type) and which name within it.
///
/// Cheap to clone (two `Arc<str>`), because the runtime hands it to every handler and every
/// storage call of an object.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    namespace: Arc<str>,
    name: Arc<str>,
}

impl ObjectId {
    /// Builds an id; the caller is responsible for validating names against its own rules.
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The object type's namespace, e.g. `channel`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The object's name within its namespace, e.g. a channel name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
