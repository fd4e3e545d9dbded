//! What every client command shares: where the server is and the credential, made into
//! the Rust client of `dormouse-client` (which turns a refusal into an error that shows the
//! server's own `code` and `message`).

pub(crate) use dormouse_client::http::{Client, Error};
use reqwest::Url;

/// `--url` and `--token`, flattened into each client command.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConnArgs {
    /// Base URL of the server (a path prefix is kept, for servers behind a proxy).
    #[arg(
        long,
        env = "DORMOUSE_URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = parse_base_url
    )]
    pub(crate) url: Url,
    /// Credential, a JWT or an API key, sent as `Authorization: Bearer`.
    #[arg(long, env = "DORMOUSE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

/// The HTTP client every command uses, bound to `conn`'s server and credential.
pub(crate) fn client(conn: &ConnArgs) -> anyhow::Result<Client> {
    Ok(Client::new(
        conn.url.clone(),
        conn.token.clone(),
        concat!("dormouse-cli/", env!("CARGO_PKG_VERSION")),
    )?)
}

/// Accepts an `http` or `https` URL without query or fragment.
fn parse_base_url(raw: &str) -> Result<Url, String> {
    dormouse_client::http::parse_base_url(raw)
}
