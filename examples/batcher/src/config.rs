//! What every stream's buffer shares: where batches go and when they leave.

use std::time::Duration;

use anyhow::Context as _;

/// Batching rules, the same for every stream. `BATCHER_*` variables set them for the binary
/// (see [`BatcherConfig::from_vars`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatcherConfig {
    /// The sink's URL; each batch is one `POST` of NDJSON to it.
    pub upstream: String,
    /// A batch leaves as soon as this many rows are buffered (and is never larger).
    pub max_rows: usize,
    /// A batch leaves at the latest this long after its oldest row was accepted, however
    /// few rows it holds. Also the first retry delay after a failed delivery.
    pub max_delay: Duration,
    /// Rows a stream may hold; beyond it ingest answers 429 until the sink catches up, so a
    /// dead sink fills a bounded disk budget instead of the disk.
    pub max_buffered: usize,
    /// Longest a delivery may take before it counts as failed; it runs inside the stream's
    /// handler, so this also bounds how long an ingest can wait behind a slow sink.
    pub request_timeout: Duration,
    /// Ceiling of the retry delay, which doubles from `max_delay` after each failure.
    pub max_backoff: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            upstream: "http://127.0.0.1:9000/batches".to_string(),
            max_rows: 500,
            max_delay: Duration::from_secs(5),
            max_buffered: 100_000,
            request_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl BatcherConfig {
    /// The defaults overridden by `BATCHER_UPSTREAM`, `BATCHER_MAX_ROWS`, `BATCHER_MAX_DELAY`,
    /// `BATCHER_MAX_BUFFERED`, `BATCHER_REQUEST_TIMEOUT` and `BATCHER_MAX_BACKOFF` from `vars`
    /// (pass `std::env::vars()`); durations are humantime (`200ms`, `5s`). A bad value fails
    /// with the variable named.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let mut config = Self::default();
        for (key, value) in vars {
            let duration = |v: &str| {
                humantime::parse_duration(v).with_context(|| format!("{key}={v:?}: not a duration"))
            };
            let count = |v: &str| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("{key}={v:?}: not a positive whole number"))
            };
            match key.as_str() {
                "BATCHER_UPSTREAM" => config.upstream = value,
                "BATCHER_MAX_ROWS" => config.max_rows = count(&value)?,
                "BATCHER_MAX_DELAY" => config.max_delay = duration(&value)?,
                "BATCHER_MAX_BUFFERED" => config.max_buffered = count(&value)?,
                "BATCHER_REQUEST_TIMEOUT" => config.request_timeout = duration(&value)?,
                "BATCHER_MAX_BACKOFF" => config.max_backoff = duration(&value)?,
                _ => {}
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules make sense together.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.upstream.starts_with("http://"),
            "the upstream must be an http:// URL (this example is built without TLS); got {:?}",
            self.upstream
        );
        anyhow::ensure!(
            self.max_rows >= 1 && self.max_buffered >= self.max_rows,
            "need 1 <= max_rows <= max_buffered; got max_rows {} and max_buffered {}",
            self.max_rows,
            self.max_buffered
        );
        anyhow::ensure!(
            !self.max_delay.is_zero() && self.max_backoff >= self.max_delay,
            "need 0 < max_delay <= max_backoff"
        );
        Ok(())
    }

    /// Delay before the next attempt after `failures` consecutive failed deliveries.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.max_delay.saturating_mul(factor).min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn variables_override_defaults() {
        let config = BatcherConfig::from_vars(vars(&[
            ("BATCHER_UPSTREAM", "http://sink:1/in"),
            ("BATCHER_MAX_ROWS", "20"),
            ("BATCHER_MAX_DELAY", "200ms"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(config.upstream, "http://sink:1/in");
        assert_eq!(config.max_rows, 20);
        assert_eq!(config.max_delay, Duration::from_millis(200));
        assert_eq!(config.max_buffered, BatcherConfig::default().max_buffered);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = BatcherConfig::from_vars(vars(&[("BATCHER_MAX_ROWS", "0")])).unwrap_err();
        assert!(err.to_string().contains("BATCHER_MAX_ROWS"), "{err}");
        let err = BatcherConfig::from_vars(vars(&[("BATCHER_MAX_DELAY", "soon")])).unwrap_err();
        assert!(err.to_string().contains("BATCHER_MAX_DELAY"), "{err}");
        assert!(BatcherConfig::from_vars(vars(&[("BATCHER_MAX_BUFFERED", "10")])).is_err());
    }

    #[test]
    fn backoff_doubles_from_max_delay_up_to_the_ceiling() {
        let config = BatcherConfig {
            max_delay: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..BatcherConfig::default()
        };
        let delays: Vec<u128> = (1..=4).map(|n| config.backoff(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
    }
}
