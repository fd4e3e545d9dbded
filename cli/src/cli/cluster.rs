//! `dormouse cluster check`: tests the NATS cluster that `[cluster]` points at (the same
//! settings as the server reads: config file, `DORMOUSE_CLUSTER_*`, then flags): every
//! server's release and JetStream, then a fenced append to a stream of `cluster.replicas`
//! copies and a stale append that must be refused. Exits 1, saying why, when it cannot carry
//! cluster mode.

use std::path::PathBuf;

use dormouse_cluster::NatsSettings;
use dormouse_gateway::{ClusterSettings, Settings};

use super::output;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClusterCommand {
    /// Test a NATS cluster for cluster mode: releases, JetStream, replicated fenced appends.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    /// TOML configuration file, as for `serve` [env: DORMOUSE_CONFIG].
    #[arg(long, env = "DORMOUSE_CONFIG")]
    config: Option<PathBuf>,
    /// A NATS server's URL; repeat for each; replaces `cluster.nats_urls`.
    #[arg(long = "nats-url", value_name = "URL")]
    nats_urls: Vec<String>,
    /// Copies of the test stream; replaces `cluster.replicas`.
    #[arg(long)]
    replicas: Option<usize>,
    /// The report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Check(args) = command;
    let mut settings = Settings::load(args.config.as_deref(), std::env::vars())?;
    if !args.nats_urls.is_empty() {
        settings.cluster.nats_urls = args.nats_urls;
    }
    if let Some(replicas) = args.replicas {
        settings.cluster.replicas = replicas;
    }
    settings.cluster.check().map_err(|e| {
        anyhow::Error::new(super::UsageError(format!("{e:#} (or pass --nats-url)")))
    })?;
    let nats = nats_settings(&settings.cluster);
    let report = dormouse_cluster::check(&nats, settings.cluster.replicas).await;
    if args.json {
        output::line(&serde_json::to_string(&report)?)?;
    } else {
        for server in &report.servers {
            let line = match &server.problem {
                None => format!(
                    "ok       {}  {} (nats-server {})",
                    server.url,
                    server.server.as_deref().unwrap_or("?"),
                    server.version.as_deref().unwrap_or("?")
                ),
                Some(problem) => format!("refused  {}  {problem}", server.url),
            };
            output::line(&line)?;
        }
        let line = match (&report.stream_problem, report.append_ms) {
            (None, Some(ms)) => format!(
                "ok       a fenced append to {} replicas took {ms:.1} ms; a stale one was refused",
                report.replicas
            ),
            (problem, _) => format!(
                "refused  replicated stream: {}",
                problem.as_deref().unwrap_or("no answer")
            ),
        };
        output::line(&line)?;
    }
    anyhow::ensure!(
        report.ok,
        "this NATS cluster cannot carry cluster mode (see above; docs/CLUSTER.md)"
    );
    Ok(())
}

/// The NATS connection `[cluster]` describes (already checked).
fn nats_settings(cluster: &ClusterSettings) -> NatsSettings {
    let given = |path: &PathBuf| (!path.as_os_str().is_empty()).then(|| path.clone());
    let mut nats = NatsSettings::new(cluster.nats_urls.clone(), cluster.node());
    nats.credentials = given(&cluster.nats_credentials);
    nats.tls_ca = given(&cluster.nats_tls_ca);
    nats.tls_client = given(&cluster.nats_tls_cert).zip(given(&cluster.nats_tls_key));
    nats
}
