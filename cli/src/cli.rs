//! The client commands of the `dormouse` binary: `publish`, `tail`, `channels`, `token` and
//! `cluster check`.
//! They talk to a running server over HTTP only, exactly as any other client would, so the
//! binary an operator already has doubles as the tool to poke at a deployment.
//!
//! # Layout
//! - `client`: base URL, credential, and errors that carry the server's own code and message.
//! - `publish`: one message, or each line of a file or stdin through the batch route.
//! - `tail`: an SSE subscriber that resumes with its last id after any interruption.
//! - `channels`: list channels, or describe one.
//! - `token`: mint a JWT in the layout the server's auth verifies.
//! - `cluster`: `cluster check`, whether a NATS cluster can carry cluster mode.
//! - `output`: results on stdout, one flushed write each, and a closed pipe as a normal end.

mod channels;
mod client;
mod cluster;
mod output;
mod publish;
mod tail;
mod token;

use std::process::ExitCode;

use clap::Subcommand;

/// The client subcommands, flattened into the binary's command list next to `serve`.
#[derive(Debug, Subcommand)]
pub(crate) enum ClientCommand {
    /// Publish one message (DATA, a file, or stdin), or each line of the input with --lines.
    Publish(publish::PublishArgs),
    /// Follow a channel over SSE, printing each event; resumes by itself after a drop.
    Tail(tail::TailArgs),
    /// List channels with their state, or describe one channel.
    Channels(channels::ChannelsArgs),
    /// Mint a JWT carrying Dormouse capabilities (HS256, EdDSA or RS256).
    Token(token::TokenArgs),
    /// Cluster mode's tools (cluster mode itself is not in this build yet).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

/// A mistake in how the command was called, found after clap parsed it (for example two
/// options that exclude each other through the environment). Exits 2 like clap's own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Runs a client command to completion: exit 0 on success, 2 on a usage error, 1 on any
/// other failure (the server refused, or could not be reached), with the reason on stderr.
pub(crate) fn run(command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            ClientCommand::Publish(args) => publish::run(args).await,
            ClientCommand::Tail(args) => tail::run(args).await,
            ClientCommand::Channels(args) => channels::run(args).await,
            ClientCommand::Token(args) => token::run(args),
            ClientCommand::Cluster(command) => cluster::run(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<output::Closed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
