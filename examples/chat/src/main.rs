//! Run with: cargo run -p example-chat
//!
//! Then open http://127.0.0.1:8080/v1/objects/rooms/lobby in two browser windows, pick a
//! name in each and chat. Rooms hibernate after 30 s without messages; the people in them
//! stay connected and listed. Data (the last messages of each room) is in ./chat-data.

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
    server.mount::<Room>(NAMESPACE, NamespaceConfig::default(), ())?;
    server.serve_until_signal().await
}
