//! `dormouse token`: mints a JWT for testing and for operators without an identity provider.
//! The grants go into the `dormouse` claim as [`Grants`], the very type the server
//! deserializes them into, so the two cannot drift apart.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use dormouse_gateway::Grants;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::{UsageError, output};

#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    /// HS256 shared secret, the server's auth.jwt_secret (at least 32 bytes)
    /// [env: DORMOUSE_AUTH_JWT_SECRET].
    #[arg(long, value_name = "SECRET")]
    secret: Option<String>,
    /// PEM private key, Ed25519 (EdDSA token) or RSA (RS256 token), whose public half is the
    /// server's auth.jwt_public_key_file.
    #[arg(long, value_name = "PEM_FILE")]
    key: Option<PathBuf>,
    /// Channel pattern the token may publish to (`*` matches any run of characters);
    /// repeat for more.
    #[arg(long, value_name = "GLOB")]
    publish: Vec<String>,
    /// Channel pattern the token may subscribe to.
    #[arg(long, value_name = "GLOB")]
    subscribe: Vec<String>,
    /// Channel pattern whose stored history the token may read.
    #[arg(long, value_name = "GLOB")]
    history: Vec<String>,
    /// Object pattern `NAMESPACE/NAME` the token may call (`counter/*`).
    #[arg(long, value_name = "NS/NAME")]
    objects: Vec<String>,
    /// Listing and deleting channels.
    #[arg(long)]
    admin: bool,
    /// Grant scraping `/metrics` (what a monitoring system needs, without `--admin`).
    #[arg(long)]
    metrics: bool,
    /// Grant the server-side connection API (send to, list and close connections): for a
    /// backend's token.
    #[arg(long)]
    connections: bool,
    /// Lifetime, e.g. `15m`, `1h`, `7days`.
    #[arg(long, value_name = "DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Subject (`sub`): who the token stands for; user objects see it.
    #[arg(long, value_name = "SUBJECT")]
    sub: Option<String>,
    /// Issuer (`iss`), for a server with auth.issuer set.
    #[arg(long, value_name = "ISSUER")]
    iss: Option<String>,
    /// Audience (`aud`), for a server with auth.audience set.
    #[arg(long, value_name = "AUDIENCE")]
    aud: Option<String>,
}

/// The claims of a minted token: the registered ones the server checks, and the grants.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    iat: u64,
    exp: u64,
    dormouse: &'a Grants,
}

/// The server refuses shorter HS256 secrets at start; a token signed with one would be
/// useless.
const MIN_SECRET_BYTES: usize = 32;

pub(crate) fn run(args: TokenArgs) -> anyhow::Result<()> {
    let (key, algorithm) = signing_key(&args)?;
    if args.ttl.is_zero() {
        return Err(UsageError("--ttl must be longer than zero".into()).into());
    }
    let grants = Grants {
        publish: args.publish.clone(),
        subscribe: args.subscribe.clone(),
        history: args.history.clone(),
        objects: args.objects.clone(),
        admin: args.admin,
        metrics: args.metrics,
        connections: args.connections,
    };
    if grants == Grants::default() {
        eprintln!(
            "warning: the token grants nothing; add --publish, --subscribe, --history, \
             --objects, --admin, --metrics or --connections"
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    let expires = now.saturating_add(args.ttl);
    let claims = Claims {
        sub: args.sub.as_deref(),
        iss: args.iss.as_deref(),
        aud: args.aud.as_deref(),
        iat: now.as_secs(),
        exp: expires.as_secs(),
        dormouse: &grants,
    };
    let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)
        .context("signing the token")?;
    if std::io::stderr().is_terminal() {
        eprintln!(
            "{algorithm:?} token, expires {}",
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(expires.as_secs()))
        );
    }
    output::line(&token)
}

/// The key and algorithm from `--key` or the secret (flag, else environment).
fn signing_key(args: &TokenArgs) -> anyhow::Result<(EncodingKey, Algorithm)> {
    if let Some(path) = &args.key {
        if args.secret.is_some() {
            return Err(UsageError("give either --secret or --key, not both".into()).into());
        }
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if let Ok(key) = EncodingKey::from_ed_pem(&pem) {
            return Ok((key, Algorithm::EdDSA));
        }
        if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
            return Ok((key, Algorithm::RS256));
        }
        anyhow::bail!(
            "{} is not a PEM private key for EdDSA (Ed25519) or RS256 (RSA); \
             e.g. `openssl genpkey -algorithm ed25519 -out issuer.key`",
            path.display()
        );
    }
    let secret = match &args.secret {
        Some(secret) => secret.clone(),
        None => std::env::var("DORMOUSE_AUTH_JWT_SECRET").unwrap_or_default(),
    };
    if secret.is_empty() {
        return Err(UsageError(
            "a signing key is needed: --secret (or DORMOUSE_AUTH_JWT_SECRET) for HS256, or \
             --key PEM_FILE for EdDSA or RS256"
                .into(),
        )
        .into());
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(UsageError(format!(
            "the HS256 secret has {} bytes; the server requires at least {MIN_SECRET_BYTES}",
            secret.len()
        ))
        .into());
    }
    Ok((
        EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    ))
}
