//! The `dormouse` server binary. Run with: `cargo run --release -- serve` (or just
//! `cargo run --release`, which serves with the defaults).

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dormouse_gateway::{AppState, Config, serve};
use dormouse_runtime::Runtime;
use dormouse_storage::{SledConfig, SledStorage};
use tokio::net::TcpListener;
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Dormouse: a self-hosted actor runtime for real-time channels.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Settings used when no subcommand is given (same as `serve`).
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(Config),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Serve(config)) => config,
        None => cli.config,
    };
    run(config).await
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut storage_config = SledConfig::new(&config.data_dir);
    storage_config.cache_capacity_bytes = config.cache_mib * 1024 * 1024;
    storage_config.durability = config.durability;
    let storage = Arc::new(
        SledStorage::open(storage_config)
            .with_context(|| format!("opening data dir {}", config.data_dir.display()))?,
    );
    let runtime = Runtime::new(storage.clone());
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    serve(listener, AppState { runtime }, shutdown_signal()).await?;
    // Every write acknowledged under "always" is already durable; this covers the weaker
    // policies before the process exits.
    let flushed = tokio::task::spawn_blocking(move || storage.flush()).await?;
    flushed.context("final storage flush")?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM, the signals an operator or a supervisor uses to stop us.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    info!("shutdown requested");
}
