//! Run with: cargo run -p example-chat
//!
//! Then open http://127.0.0.1:8080/v1/objects/rooms/lobby in two browser windows, pick a
//! name in each and chat. Rooms hibernate after 30 s without messages (CHAT_IDLE_TIMEOUT,
//! say `5s`); the people in them stay connected and listed. Data (the last messages of each
//! room) is in ./chat-data.

use anyhow::Context as _;
use dormouse_gateway::{Dormouse, Settings};
use dormouse_runtime::NamespaceConfig;
use example_chat::{NAMESPACE, Room};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let mut settings = Settings::load(None, std::env::vars())?;
    if std::env::var_os("DORMOUSE_DATA_DIR").is_none() {
        settings.data_dir = "chat-data".into();
    }
    let server = Dormouse::start(settings).await?;
    let mut rooms = NamespaceConfig::default();
    if let Some(idle) = std::env::var_os("CHAT_IDLE_TIMEOUT") {
        let idle = idle.to_string_lossy();
        rooms.idle_timeout = humantime::parse_duration(&idle)
            .with_context(|| format!("CHAT_IDLE_TIMEOUT={idle:?}: expected a duration like 5s"))?;
    }
    server.mount::<Room>(NAMESPACE, rooms, ())?;
    server.serve_until_signal().await
}
