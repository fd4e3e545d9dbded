//! Who may do what. A request carries a credential (a JWT, or a server-side API key); the
//! credential carries [`Grants`]: channel-name patterns per capability, and object patterns.
//! One middleware ([`require`](crate::middleware::require)) turns the route into the
//! [`Need`] it has, checks it, and leaves the caller's [`Principal`] in the request for
//! handlers that check more (a batch publish names its channels in the body; a WebSocket
//! client publishes later) and for long-lived connections, which end when the credential
//! expires.
//!
//! With no credential configured everyone gets everything: the server then refuses to listen
//! beyond loopback unless told to (see `Dormouse::serve`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use dormouse_actors::channel::MAX_INFO;

use crate::config::AuthSettings;
use crate::error::ApiError;

/// What a credential allows. The same shape is the `dormouse` claim of a JWT and the
/// capabilities of an API key in the config file, so one model covers both.
///
/// Patterns match whole names; `*` matches any run of characters (`chat:*`, `*`,
/// `user-*-inbox`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grants {
    /// Channels the holder may publish to (HTTP, batch, or over its WebSocket).
    pub publish: Vec<String>,
    /// Channels the holder may subscribe to (SSE, WebSocket) and describe.
    pub subscribe: Vec<String>,
    /// Channels whose stored history the holder may read (and describe).
    pub history: Vec<String>,
    /// Objects, as `namespace/name` patterns (`counter/*`, `*`), the holder may call.
    pub objects: Vec<String>,
    /// Whole-server operations: listing and deleting channels, the admin page's figures,
    /// and `/metrics`.
    pub admin: bool,
    /// Scraping `/metrics` only: what a monitoring system's credential needs, without the
    /// power to delete channels that `admin` carries.
    pub metrics: bool,
    /// The server-side connection API: listing connections, sending to them and closing
    /// them, one by id or all of a subject's. A backend's power over every client, so its
    /// own capability: `admin` does not imply it.
    pub connections: bool,
}

/// An API key's capabilities, as its `[[auth.api_keys]]` entry lists them.
impl From<&crate::config::ApiKeySettings> for Grants {
    fn from(key: &crate::config::ApiKeySettings) -> Self {
        Self {
            publish: key.publish.clone(),
            subscribe: key.subscribe.clone(),
            history: key.history.clone(),
            objects: key.objects.clone(),
            admin: key.admin,
            metrics: key.metrics,
            connections: key.connections,
        }
    }
}

impl Grants {
    /// Everything: what every request gets when no authentication is configured.
    fn all() -> Self {
        let any = vec!["*".to_string()];
        Self {
            publish: any.clone(),
            subscribe: any.clone(),
            history: any.clone(),
            objects: any,
            admin: true,
            metrics: true,
            connections: true,
        }
    }
}

/// What one request needs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Need<'a> {
    /// A valid credential; the handler checks the rest (batch publish).
    Credential,
    Publish(&'a str),
    Subscribe(&'a str),
    History(&'a str),
    /// Describe a channel: subscribe or history suffices.
    Describe(&'a str),
    Admin,
    /// `/metrics`: the metrics or the admin capability.
    Metrics,
    /// The server-side connection API.
    Connections,
    Object {
        namespace: &'a str,
        name: &'a str,
    },
}

/// The authenticated caller, left in the request's extensions by the auth middleware, so handlers
/// and long-lived connections check the same identity the request was admitted with.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `sub` of the token, the API key's name, or `anonymous` when auth is off.
    pub subject: Arc<str>,
    /// What the credential grants and says: shared, so a connection's copy stays small.
    held: Arc<Held>,
    /// When the credential stops being valid; live connections end then.
    pub expires: Option<SystemTime>,
    /// False for the anonymous caller of a server without auth.
    authenticated: bool,
}

/// The part of a [`Principal`] every copy of it shares.
#[derive(Debug, Default)]
struct Held {
    grants: Grants,
    /// The token's `info` claim as compact JSON: what presence shows of this client
    /// besides its subject (a display name, an avatar).
    info: Option<bytes::Bytes>,
}

impl Held {
    fn granting(grants: Grants) -> Arc<Self> {
        Arc::new(Self { grants, info: None })
    }
}

impl Principal {
    fn anonymous() -> Self {
        Self {
            subject: Arc::from("anonymous"),
            held: Held::granting(Grants::all()),
            expires: None,
            authenticated: false,
        }
    }

    /// A caller without a credential where a hook decides who comes in: it may do nothing
    /// a credential would grant.
    pub(crate) fn nobody() -> Self {
        Self {
            subject: Arc::from("anonymous"),
            held: Held::granting(Grants::default()),
            expires: None,
            authenticated: false,
        }
    }

    /// What presence shows of this caller besides its subject: its token's `info` claim,
    /// as compact JSON.
    pub fn info(&self) -> Option<&bytes::Bytes> {
        self.held.info.as_ref()
    }

    /// Whether a credential identified this caller (per-credential limits apply then).
    pub(crate) fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Whether this caller has `need`.
    pub(crate) fn allows(&self, need: Need<'_>) -> bool {
        let g = &self.held.grants;
        match need {
            Need::Credential => true,
            Need::Publish(channel) => any_match(&g.publish, channel),
            Need::Subscribe(channel) => any_match(&g.subscribe, channel),
            Need::History(channel) => any_match(&g.history, channel),
            Need::Describe(channel) => {
                any_match(&g.subscribe, channel) || any_match(&g.history, channel)
            }
            Need::Admin => g.admin,
            Need::Metrics => g.metrics || g.admin,
            Need::Connections => g.connections,
            Need::Object { namespace, name } => g
                .objects
                .iter()
                .any(|p| glob(p, &format!("{namespace}/{name}"))),
        }
    }

    /// `Ok` if allowed, else the 403 that says what is missing.
    pub(crate) fn require(&self, need: Need<'_>) -> Result<(), ApiError> {
        if self.allows(need) {
            return Ok(());
        }
        let what = match need {
            Need::Credential => "a valid credential".to_string(),
            Need::Publish(c) => format!("the publish capability for channel {c:?}"),
            Need::Subscribe(c) => format!("the subscribe capability for channel {c:?}"),
            Need::History(c) => format!("the history capability for channel {c:?}"),
            Need::Describe(c) => {
                format!("the subscribe or history capability for channel {c:?}")
            }
            Need::Admin => "the admin capability".to_string(),
            Need::Metrics => "the metrics (or admin) capability".to_string(),
            Need::Connections => "the connections capability".to_string(),
            Need::Object { namespace, name } => format!("access to object {namespace}/{name}"),
        };
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} lacks {what}", self.subject),
        ))
    }

    /// Time left before the credential expires, from now; `None` if it never does.
    pub(crate) fn time_left(&self) -> Option<Duration> {
        self.expires.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

fn any_match(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob(p, name))
}

/// Whole-string match where `*` stands for any run of characters (none included).
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it is currently assumed to cover to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last `*` swallow one more character and retry.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The verifier built from `[auth]` at start.
#[derive(Clone)]
pub struct Auth {
    inner: Option<Arc<Verifier>>,
}

struct Verifier {
    hs256: Option<DecodingKey>,
    /// A public key and the one algorithm it is used with.
    public: Option<(DecodingKey, Algorithm)>,
    api_keys: Vec<(String, Arc<str>, Arc<Held>)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    query_token: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("Auth")
            .field("enabled", &self.enabled())
            .finish()
    }
}

/// The claims Dormouse reads from a token; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    dormouse: Grants,
    /// What presence shows of the client (any JSON, at most [`MAX_INFO`] bytes).
    #[serde(default)]
    info: Option<serde_json::Value>,
}

/// Shortest HS256 secret accepted: a guessable secret lets anyone mint tokens.
const MIN_SECRET_BYTES: usize = 32;

impl Auth {
    /// Builds the verifier; fails (naming the setting) on a short secret, an unreadable or
    /// unusable key file, or a malformed API key entry.
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        let hs256 = if settings.jwt_secret.is_empty() {
            None
        } else {
            anyhow::ensure!(
                settings.jwt_secret.len() >= MIN_SECRET_BYTES,
                "setting `auth.jwt_secret`: at least {MIN_SECRET_BYTES} bytes are required \
                 (e.g. `openssl rand -base64 48`)"
            );
            Some(DecodingKey::from_secret(settings.jwt_secret.as_bytes()))
        };
        let public = if settings.jwt_public_key_file.as_os_str().is_empty() {
            None
        } else {
            Some(
                load_public_key(&settings.jwt_public_key_file).with_context(|| {
                    format!(
                        "setting `auth.jwt_public_key_file` ({})",
                        settings.jwt_public_key_file.display()
                    )
                })?,
            )
        };
        let mut api_keys = Vec::new();
        for (i, key) in settings.api_keys.iter().enumerate() {
            anyhow::ensure!(
                key.key.len() >= 16,
                "setting `auth.api_keys[{i}].key`: at least 16 characters are required"
            );
            anyhow::ensure!(
                !key.key.contains('.'),
                "setting `auth.api_keys[{i}].key`: must not contain '.', which marks a JWT"
            );
            let name = if key.name.is_empty() {
                format!("api-key-{i}")
            } else {
                key.name.clone()
            };
            api_keys.push((
                key.key.clone(),
                Arc::from(name),
                Held::granting(Grants::from(key)),
            ));
        }
        if hs256.is_none() && public.is_none() && api_keys.is_empty() {
            return Ok(Self { inner: None });
        }
        Ok(Self {
            inner: Some(Arc::new(Verifier {
                hs256,
                public,
                api_keys,
                issuer: Some(settings.issuer.clone()).filter(|s| !s.is_empty()),
                audience: Some(settings.audience.clone()).filter(|s| !s.is_empty()),
                leeway: settings.leeway.as_secs(),
                query_token: settings.query_token,
            })),
        })
    }

    /// Whether any credential is configured (otherwise every request is allowed).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The caller of a request with these headers and query, or 401.
    pub(crate) fn authenticate(
        &self,
        method: &Method,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let Some(verifier) = &self.inner else {
            return Ok(Principal::anonymous());
        };
        let credential = credential(
            headers,
            query,
            verifier.query_token && method == Method::GET,
        )?;
        let credential = credential.ok_or_else(|| {
            unauthorized(
                "missing_credential",
                "authentication is required: send `Authorization: Bearer <token or API key>`, \
                 or `?access_token=` on GET requests such as SSE and WebSocket",
            )
        })?;
        verifier.verify(&credential)
    }

    /// Verifies a token given later on a live connection (a WebSocket `auth` message).
    pub(crate) fn verify(&self, credential: &str) -> Result<Principal, ApiError> {
        match &self.inner {
            Some(verifier) => verifier.verify(credential),
            None => Ok(Principal::anonymous()),
        }
    }
}

impl Verifier {
    fn verify(&self, credential: &str) -> Result<Principal, ApiError> {
        if !credential.contains('.') {
            return self
                .api_keys
                .iter()
                .find(|(key, _, _)| constant_time_eq(key.as_bytes(), credential.as_bytes()))
                .map(|(_, name, held)| Principal {
                    subject: name.clone(),
                    held: held.clone(),
                    expires: None,
                    authenticated: true,
                })
                .ok_or_else(|| unauthorized("bad_credential", "unknown API key"));
        }
        let header = jsonwebtoken::decode_header(credential)
            .map_err(|e| unauthorized("bad_token", format!("malformed token: {e}")))?;
        // The key is chosen by the algorithm the server configured, never by the token alone:
        // an HS256 token signed with the public key as secret is refused.
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            alg => self
                .public
                .as_ref()
                .filter(|(_, expected)| *expected == alg)
                .map(|(key, _)| key),
        }
        .ok_or_else(|| {
            unauthorized(
                "bad_token",
                format!("tokens signed with {:?} are not accepted here", header.alg),
            )
        })?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        // jsonwebtoken only compares `iss` and `aud` when the token has them: a configured
        // issuer or audience must also make the claim required, or a token without it passes.
        let mut required = vec!["exp"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(credential, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => {
                    unauthorized("token_expired", "the token has expired")
                }
                ErrorKind::ImmatureSignature => {
                    unauthorized("token_not_yet_valid", "the token is not valid yet (nbf)")
                }
                ErrorKind::InvalidSignature => {
                    unauthorized("bad_token", "the token's signature does not verify")
                }
                _ => unauthorized("bad_token", format!("the token is not acceptable: {e}")),
            }
        })?;
        let claims = data.claims;
        let info = match claims.info {
            None | Some(serde_json::Value::Null) => None,
            Some(info) => {
                let json = serde_json::to_vec(&info).unwrap_or_default();
                if json.len() > MAX_INFO {
                    return Err(unauthorized(
                        "bad_token",
                        format!(
                            "the token's info claim is {} bytes as JSON; at most {MAX_INFO} \
                             are accepted (it travels with every presence event)",
                            json.len()
                        ),
                    ));
                }
                Some(bytes::Bytes::from(json))
            }
        };
        Ok(Principal {
            subject: Arc::from(claims.sub.unwrap_or_else(|| "token".to_string())),
            held: Arc::new(Held {
                grants: claims.dormouse,
                info,
            }),
            expires: Some(UNIX_EPOCH + Duration::from_secs(claims.exp)),
            authenticated: true,
        })
    }
}

fn load_public_key(path: &Path) -> anyhow::Result<(DecodingKey, Algorithm)> {
    let pem = std::fs::read(path).context("reading the key file")?;
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    anyhow::bail!("not a PEM public key for EdDSA (Ed25519) or RS256 (RSA)")
}

/// The credential of a request: `Authorization: Bearer`, `X-API-Key`, or (when allowed)
/// the `access_token` query parameter.
fn credential(
    headers: &HeaderMap,
    query: Option<&str>,
    query_allowed: bool,
) -> Result<Option<String>, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| unauthorized("bad_credential", "the Authorization header is not text"))?;
        let Some((scheme, token)) = value.split_once(' ') else {
            return Err(unauthorized(
                "bad_credential",
                "the Authorization header must be `Bearer <token or API key>`",
            ));
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(unauthorized(
                "bad_credential",
                format!("unsupported Authorization scheme {scheme:?}; use Bearer"),
            ));
        }
        return Ok(Some(token.trim().to_string()));
    }
    if let Some(value) = headers.get("x-api-key") {
        let value = value
            .to_str()
            .map_err(|_| unauthorized("bad_credential", "the X-API-Key header is not text"))?;
        return Ok(Some(value.trim().to_string()));
    }
    if query_allowed && let Some(query) = query {
        for (key, value) in form_pairs(query) {
            if key == "access_token" {
                return Ok(Some(value));
            }
        }
    }
    Ok(None)
}

pub(crate) fn form_pairs(query: &str) -> Vec<(String, String)> {
    let uri: axum::http::Uri = match format!("/?{query}").parse() {
        Ok(uri) => uri,
        Err(_) => return Vec::new(),
    };
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// A 401 tells the client how to authenticate (RFC 6750).
pub(crate) fn with_challenge(e: ApiError) -> Response {
    let status = e.status;
    let mut response = e.into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"dormouse\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_whole_names_with_stars() {
        assert!(glob("*", ""));
        assert!(glob("*", "anything"));
        assert!(glob("chat:*", "chat:"));
        assert!(glob("chat:*", "chat:room-1"));
        assert!(!glob("chat:*", "chatroom"));
        assert!(!glob("chat", "chat:1"));
        assert!(glob("user-*-inbox", "user-42-inbox"));
        assert!(!glob("user-*-inbox", "user-42-inbox2"));
        assert!(glob("a*b*c", "aXbYbZc"));
        assert!(!glob("a*b*c", "aXbYbZ"));
        assert!(glob("**", "x"));
    }
}
