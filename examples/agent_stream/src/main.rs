//! Run with: cargo run -p example-agent_stream
//!
//! Serves agent runs on 127.0.0.1:8080 (or DORMOUSE_LISTEN), with data in
//! ./agent-stream-data (or DORMOUSE_DATA_DIR). A producer and two viewers:
//!
//! ```sh
//! curl -N localhost:8080/v1/channels/run:r1/events            # SSE viewer
//! websocat ws://localhost:8080/v1/objects/runs/r1/ws          # WebSocket viewer
//! curl --data-binary 'Hello, ' localhost:8080/v1/objects/runs/r1/chunks
//! curl --data-binary @report.pdf 'localhost:8080/v1/objects/runs/r1/artifacts?name=report.pdf'
//! curl --data-binary '{"answer":"done"}' localhost:8080/v1/objects/runs/r1/finish
//! curl localhost:8080/v1/objects/runs/r1/state
//! ```

use dormouse_gateway::{Dormouse, Settings};
use dormouse_runtime::NamespaceConfig;
use example_agent_stream::{CHANNEL_PREFIX, NAMESPACE, Run, RunEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let mut settings = Settings::load(None, std::env::vars())?;
    if std::env::var_os("DORMOUSE_DATA_DIR").is_none() {
        settings.data_dir = "agent-stream-data".into();
    }
    // A run's channel should replay the whole run to a late SSE viewer: more events and
    // bytes than a chat channel keeps. (A config file's `[[channels.prefix]]` for "run:"
    // takes precedence.)
    if !settings
        .channels
        .prefix
        .iter()
        .any(|p| p.prefix == CHANNEL_PREFIX)
    {
        settings
            .channels
            .prefix
            .push(serde_json::from_value(serde_json::json!({
                "prefix": CHANNEL_PREFIX,
                "max_events": 100_000,
                "max_bytes": "1GiB",
                "max_age": "7days",
            }))?);
    }
    let server = Dormouse::start(settings).await?;
    let env = RunEnv::new(server.state().publisher.clone());
    server.mount::<Run>(NAMESPACE, NamespaceConfig::default(), env)?;
    server.serve_until_signal().await
}
