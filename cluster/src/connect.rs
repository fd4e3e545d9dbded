//! Connecting a node to the NATS cluster: every server's URL, credentials and TLS, and a
//! refusal at start, naming the server, when it cannot be reached, runs a release that does
//! not fence appends correctly ([`crate::version`]), or has JetStream off. Every listed
//! server that answers is checked, and the client fails over only between listed servers;
//! [`check`](crate::check()) also reports the ones that are down.

use std::path::PathBuf;
use std::time::Duration;

use crate::version::{MIN_SERVER_VERSION, ServerVersion};

/// How a node reaches the NATS cluster.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// Every server of the NATS cluster: the client fails over between them, so a node keeps
    /// working while one is down.
    pub urls: Vec<String>,
    /// The connection's name in the servers' monitoring (the node's name).
    pub name: String,
    /// A NATS `.creds` file (user JWT and NKey seed), when the servers require one.
    pub credentials: Option<PathBuf>,
    /// CA certificate(s) to verify the servers with, for `tls://` servers signed by a
    /// private CA.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key, for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// How long the first connection may take before the node refuses to start.
    pub connect_timeout: Duration,
}

impl NatsSettings {
    /// Settings for `urls` with no credentials or TLS, as a test or a development cluster
    /// on loopback uses.
    pub fn new(urls: Vec<String>, name: impl Into<String>) -> Self {
        Self {
            urls,
            name: name.into(),
            credentials: None,
            tls_ca: None,
            tls_client: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a node could not use the NATS cluster at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cluster.nats_urls is empty: list every server of the NATS cluster")]
    NoUrls,
    #[error("a NATS URL is not valid ({url}): {source}")]
    BadUrl {
        url: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("reading the NATS credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no NATS server answered at {urls}: {source}")]
    Unreachable {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(
        "NATS server {server} runs {version}; cluster mode needs {MIN_SERVER_VERSION} or later, \
         whose replicated streams refuse a second append with the same expected sequence \
         (older releases may accept both, so two owners could write one log)"
    )]
    TooOld {
        server: String,
        version: ServerVersion,
    },
    #[error("NATS server {server} reports a version cluster mode cannot read: {version:?}")]
    UnknownVersion { server: String, version: String },
    #[error("NATS server {server} has JetStream off: enable it (`jetstream {{ }}` in its config)")]
    NoJetStream { server: String },
}

/// A connection to a NATS cluster that qualifies, and what the server it reached said.
#[derive(Debug, Clone)]
pub struct Nats {
    /// The connection; it fails over between [`NatsSettings::urls`] by itself.
    pub client: async_nats::Client,
    /// The release of the server the connection reached first.
    pub version: ServerVersion,
    /// That server's name.
    pub server: String,
}

/// Connects and checks the servers: see [`ConnectError`] for what is refused. The server
/// the connection reaches must qualify; so must every other listed server that answers (one
/// that is down is passed over, with a warning, and the connection never fails over to a
/// server it was not given: servers the cluster advertises are ignored).
pub async fn connect(settings: &NatsSettings) -> Result<Nats, ConnectError> {
    let nats = connect_checked(settings, &settings.urls).await?;
    // The connection reached one of them (in random order): check each on its own.
    let others = if settings.urls.len() > 1 {
        settings.urls.as_slice()
    } else {
        &[]
    };
    for url in others {
        match connect_checked(settings, std::slice::from_ref(url)).await {
            Ok(_) => {}
            Err(ConnectError::Unreachable { .. }) => {
                tracing::warn!(url, "a listed NATS server is down; it was not checked");
            }
            Err(refused) => return Err(refused),
        }
    }
    Ok(nats)
}

/// Connects to `urls` with `settings`' credentials and TLS, and checks the server reached.
async fn connect_checked(settings: &NatsSettings, urls: &[String]) -> Result<Nats, ConnectError> {
    if urls.is_empty() {
        return Err(ConnectError::NoUrls);
    }
    let mut addrs = Vec::with_capacity(urls.len());
    for url in urls {
        let addr = url
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| ConnectError::BadUrl {
                url: url.clone(),
                source: Box::new(e),
            })?;
        addrs.push(addr);
    }
    let mut options = async_nats::ConnectOptions::new()
        .name(&settings.name)
        .connection_timeout(settings.connect_timeout)
        // Only servers that were listed, and so checked.
        .ignore_discovered_servers()
        // The default (a minute) leaves a dead server unnoticed for that long.
        .ping_interval(Duration::from_secs(10));
    if let Some(path) = &settings.credentials {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    if let Some(ca) = &settings.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &settings.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options
        .connect(addrs)
        .await
        .map_err(|source| ConnectError::Unreachable {
            urls: urls.join(", "),
            source,
        })?;
    let info = client.server_info();
    let server = if info.server_name.is_empty() {
        info.server_id.clone()
    } else {
        info.server_name.clone()
    };
    let version =
        ServerVersion::parse(&info.version).ok_or_else(|| ConnectError::UnknownVersion {
            server: server.clone(),
            version: info.version.clone(),
        })?;
    if !version.qualifies() {
        return Err(ConnectError::TooOld { server, version });
    }
    if !info.jetstream {
        return Err(ConnectError::NoJetStream { server });
    }
    Ok(Nats {
        client,
        version,
        server,
    })
}
