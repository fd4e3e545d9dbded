//! The `dormouse` binary: the server (`serve`, the default), and client commands for a
//! running server (`publish`, `tail`, `channels`, `token`). Run with: `cargo run --release`
//! (serves with the defaults: 127.0.0.1:8080, data in ./dormouse-data) or
//! `cargo run --release -- --help`.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dormouse_gateway::{Dormouse, LogFormat, Settings, error_chain, init_logging};
use tracing_subscriber::EnvFilter;

/// jemalloc with a 1 s decay (see .cargo/config.toml): memory freed when objects hibernate or
/// connections close goes back to the kernel instead of staying cached by glibc's malloc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Dormouse: a self-hosted actor runtime for real-time channels (pub/sub with replay over
/// SSE and WebSocket).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Options used when no subcommand is given (the same as `serve`).
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// Flags override `DORMOUSE_*` environment variables, which override the config file.
#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080; env: DORMOUSE_LISTEN].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of the embedded database [default: ./dormouse-data; env: DORMOUSE_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file; every key can also be set as `DORMOUSE_<SECTION>_<KEY>`
    /// (see docs/CONFIG.md).
    #[arg(long, env = "DORMOUSE_CONFIG")]
    config: Option<PathBuf>,
    /// Serve without authentication on a non-loopback address (only behind something that
    /// authenticates) [env: DORMOUSE_AUTH_ALLOW_ANONYMOUS].
    #[arg(long)]
    allow_anonymous: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log lines as `text` or `json` (one object per line), on stderr [default: text].
    /// `RUST_LOG` sets the verbosity. Read here, not only with the other settings, so that
    /// an error in the config file is logged in the format asked for.
    #[arg(long, value_name = "FORMAT", env = "DORMOUSE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
        Some(Command::Client(command)) => {
            // Warnings only, and on stderr: stdout carries the command's results.
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
                )
                .init();
            return cli::run(command);
        }
    };
    let settings = Settings::load(args.config.as_deref(), std::env::vars());
    // Logging first, in the format asked for, so even a configuration error is a log line
    // a collector can parse.
    let format = args
        .log_format
        .or_else(|| settings.as_ref().ok().map(|s| s.log.format))
        .unwrap_or_default();
    if let Err(e) = init_logging(format) {
        eprintln!("{e:#}");
        return ExitCode::FAILURE;
    }
    match serve(args, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line ("opening data dir X: ...: why").
            let error: &(dyn std::error::Error + 'static) = e.as_ref();
            tracing::error!(error = %error_chain(error), "dormouse stopped with an error");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(args: ServeArgs, settings: anyhow::Result<Settings>) -> anyhow::Result<()> {
    let mut settings = settings?;
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        settings.data_dir = data_dir;
    }
    if args.allow_anonymous {
        settings.auth.allow_anonymous = true;
    }
    if let Some(format) = args.log_format {
        settings.log.format = format;
    }
    if args.print_config {
        // Secrets are not printed: the output ends up in terminals, tickets and logs.
        let mut shown = settings.clone();
        if !shown.auth.jwt_secret.is_empty() {
            shown.auth.jwt_secret = "<redacted>".to_string();
        }
        for key in &mut shown.auth.api_keys {
            key.key = "<redacted>".to_string();
        }
        print!("{}", toml::to_string(&shown)?);
        return Ok(());
    }
    Dormouse::start(settings).await?.serve_until_signal().await
}
