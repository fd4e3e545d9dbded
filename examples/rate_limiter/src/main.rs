//! Run with: cargo run -p example-rate_limiter
//!
//! Serves token buckets of 10 requests of burst and 1 request per second sustained, on
//! 127.0.0.1:8080 (or DORMOUSE_LISTEN), with data in ./rate-limiter-data:
//!
//! ```sh
//! curl -X POST 'localhost:8080/v1/objects/limits/api-key-123/take?n=1'
//! curl localhost:8080/v1/objects/limits/api-key-123
//! ```

use dormouse_gateway::{Dormouse, Settings};
use dormouse_runtime::NamespaceConfig;
use example_rate_limiter::{Limits, NAMESPACE, TokenBucket};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let mut settings = Settings::load(None, std::env::vars())?;
    if std::env::var_os("DORMOUSE_DATA_DIR").is_none() {
        settings.data_dir = "rate-limiter-data".into();
    }
    let server = Dormouse::start(settings).await?;
    server.mount::<TokenBucket>(
        NAMESPACE,
        NamespaceConfig::default(),
        Limits {
            capacity: 10.0,
            refill_per_sec: 1.0,
        },
    )?;
    server.serve_until_signal().await
}
