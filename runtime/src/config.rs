//! [`NamespaceConfig`]: the tunables of one object type (idle timeout, how many may stay
//! active), as the gateway reads them from its configuration.

use std::time::Duration;

use serde::Deserialize;

/// Tunables of one object type. Deserialisable so the gateway can read it from its TOML file,
/// with durations in humantime form (`idle_timeout = "30s"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// How long an activation may sit without work before it hibernates and leaves memory.
    /// Short saves memory; long saves reloads from storage.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most activations in memory at once (0: no limit). Beyond it the least recently used
    /// idle ones hibernate early, so a burst that touches more objects than the idle timeout
    /// lets go of costs the memory set here, not memory per object touched. An object that
    /// is working, or asked to stay awake, is never cut short.
    pub max_active: usize,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            max_active: 0,
        }
    }
}

impl NamespaceConfig {
    /// A config with the given idle timeout, the common override in tests and benchmarks.
    pub fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            ..Self::default()
        }
    }

    /// The same config with a bound on activations in memory; see [`Self::max_active`].
    pub fn with_max_active(self, max_active: usize) -> Self {
        Self { max_active, ..self }
    }
}
