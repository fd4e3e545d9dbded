//! Run with: cargo run -p example-batcher
//!
//! Buffers events per stream on 127.0.0.1:8080 (or DORMOUSE_LISTEN), with data in
//! ./batcher-data (or DORMOUSE_DATA_DIR), and ships them in NDJSON batches to
//! BATCHER_UPSTREAM (default http://127.0.0.1:9000/batches). BATCHER_MAX_ROWS,
//! BATCHER_MAX_DELAY, BATCHER_MAX_BUFFERED, BATCHER_REQUEST_TIMEOUT and BATCHER_MAX_BACKOFF
//! tune the batching:
//!
//! ```sh
//! BATCHER_UPSTREAM=http://127.0.0.1:9000/batches BATCHER_MAX_DELAY=2s cargo run -p example-batcher
//! printf '{"event":"click"}\n{"event":"view"}\n' |
//!   curl --data-binary @- localhost:8080/v1/objects/ingest/web/events
//! curl localhost:8080/v1/objects/ingest/web
//! ```

use dormouse_gateway::{Dormouse, Settings};
use dormouse_runtime::NamespaceConfig;
use example_batcher::{Batcher, BatcherConfig, BatcherEnv, NAMESPACE};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let mut settings = Settings::load(None, std::env::vars())?;
    if std::env::var_os("DORMOUSE_DATA_DIR").is_none() {
        settings.data_dir = "batcher-data".into();
    }
    let env = BatcherEnv::new(BatcherConfig::from_vars(std::env::vars())?)?;
    let server = Dormouse::start(settings).await?;
    server.mount::<Batcher>(NAMESPACE, NamespaceConfig::default(), env)?;
    server.serve_until_signal().await
}
