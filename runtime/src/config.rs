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
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl NamespaceConfig {
    /// A config with the given idle timeout, the common override in tests and benchmarks.
    pub fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Self { idle_timeout }
    }
}
