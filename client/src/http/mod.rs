//! A client of a running server over HTTP (the `http` feature): where the server is, the
//! credential, and a refusal turned into an error that carries the server's own `code` and
//! `message` (they say what was wrong and how to fix it better than a client could guess).
//! [`Client::follow`] follows a channel with resume built in; [`Client::publish`] publishes
//! with an idempotency key, so a retried publish is stored once.

mod follow;
#[cfg(feature = "websocket")]
mod object;
#[cfg(feature = "websocket")]
mod socket;
#[cfg(feature = "websocket")]
mod websocket;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

pub use follow::{Follow, Item};
#[cfg(feature = "websocket")]
pub use object::{ObjectMessage, ObjectSocket};
#[cfg(feature = "websocket")]
pub use socket::{Message, Socket, SocketHandle};

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error (boxed: it is far larger than the others).
    #[error(transparent)]
    Server(Box<ServerError>),
    /// No answer: the server is down, or the URL is wrong.
    #[error("cannot reach the server at {base}: {source}")]
    Unreachable {
        /// The server's base URL.
        base: Url,
        /// What the HTTP client saw.
        source: reqwest::Error,
    },
    /// The token provider failed (its message).
    #[error("getting a token: {0}")]
    Token(String),
    /// A WebSocket message was refused: the server's `error` answer to it, by `code`
    /// (docs/API.md's table), with its `message`.
    #[error("the server refused it ({code}): {message}")]
    Refused {
        /// The error's `code`, for deciding what to do.
        code: String,
        /// What was wrong, for a person.
        message: String,
    },
    /// A backend (or the app, with `close`) ended the connection for good, with this
    /// WebSocket close code and reason: reconnecting would go against its decision.
    #[error("the connection was closed for good ({code}): {reason}")]
    Closed {
        /// The close code: 1000, 3000 to 3999, or 4100 to 4999.
        code: u16,
        /// The reason the backend gave.
        reason: String,
    },
    /// The answer could not be read, or the request could not be built.
    #[error("{what}: {source}")]
    Http {
        /// What was being done.
        what: String,
        /// What the HTTP client saw.
        source: reqwest::Error,
    },
}

impl From<ServerError> for Error {
    fn from(e: ServerError) -> Self {
        Self::Server(Box::new(e))
    }
}

impl Error {
    /// Whether the same request may succeed later without any change (the server was
    /// unreachable, overloaded, restarting or rate-limiting, not refusing the request).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Server(e) => e.is_transient(),
            Self::Refused { code, .. } => TRANSIENT_CODES.contains(&code.as_str()),
            Self::Closed { .. } => false,
            Self::Unreachable { .. } | Self::Http { .. } | Self::Token(_) => true,
        }
    }
}

/// Error codes that waiting can fix: the server was full, shedding load, rate-limiting,
/// restarting, or met a bug it recovers from (docs/API.md's error table).
const TRANSIENT_CODES: &[&str] = &[
    "channel_full",
    "overloaded",
    "rate_limited",
    "unavailable",
    "storage_unavailable",
    "internal",
];

/// The server answered with an error; shown with its status, `code` and `message`.
#[derive(Debug, thiserror::Error)]
#[error("{method} {url}: the server answered {status} ({code}): {message}")]
pub struct ServerError {
    /// The request's method.
    pub method: Method,
    /// The request's URL.
    pub url: Url,
    /// The answer's status.
    pub status: StatusCode,
    /// The `error.code` of the JSON body (or the status text when a proxy answered without
    /// one), for deciding what to do.
    pub code: String,
    /// The `error.message`: what was wrong, for a person.
    pub message: String,
    /// `Retry-After`, when the server said how long to wait.
    pub retry_after: Option<Duration>,
    /// `error.channel`: on a request naming several channels (`/v1/events`), the one
    /// refused, so a follower drops it and goes on with the others.
    pub channel: Option<String>,
}

impl ServerError {
    /// Whether the same request may succeed later without any change: the server was
    /// overloaded, restarting, or rate-limiting, not refusing the request itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS
                // A bug met on the way: the channel is rebuilt for the next request.
                | StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        )
    }
}

/// Requests may wait on a durable commit; this only bounds a server that never answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a token provider may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client bound to one server and credential. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Token,
}

/// What a token provider returns.
type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Where the credential comes from.
#[derive(Clone)]
enum Token {
    None,
    Fixed(String),
    /// Asked before every request and every (re)connection: a token about to expire is
    /// replaced by the next one it gives (an event stream cannot take a new one in place,
    /// so it gets it when it reconnects, which the server asks for at expiry).
    Provider(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Fixed(_) => "Fixed(..)",
            Self::Provider(_) => "Provider(..)",
        })
    }
}

/// The outcome of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message's id.
    pub id: String,
    /// True when the idempotency key matched an earlier publish: nothing new was stored.
    pub duplicate: bool,
}

impl Client {
    /// A client of the server at `base` (an `http` or `https` URL without query or
    /// fragment; a path prefix is kept, for servers behind a proxy), sending `token` (a JWT
    /// or an API key) as `Authorization: Bearer`. `agent` names the program in
    /// `User-Agent`.
    pub fn new(base: Url, token: Option<String>, agent: &str) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(agent)
            .build()
            .map_err(|source| Error::Http {
                what: "building the HTTP client".into(),
                source,
            })?;
        Ok(Self {
            http,
            base,
            token: token
                .filter(|t| !t.is_empty())
                .map_or(Token::None, Token::Fixed),
        })
    }

    /// Takes each request's credential from `provider` instead (your app's token endpoint,
    /// say): it is asked before every request and every reconnection, so a following that
    /// outlives a token goes on with the next one.
    pub fn with_token_provider<F, Fut>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = Token::Provider(Arc::new(move || Box::pin(provider())));
        self
    }

    /// The server's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The URL of `segments` under the base URL, each segment percent-encoded as needed, so
    /// a channel name is never read as a path or a query.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A request (the credential is added when it is sent); `timeout` is off for streams.
    pub fn request(&self, method: Method, url: Url, timeout: bool) -> RequestBuilder {
        let mut request = self.http.request(method, url);
        if timeout {
            request = request.timeout(REQUEST_TIMEOUT);
        }
        request
    }

    /// Sends `request`: a success as is; an error answer as [`Error::Server`]; no answer as
    /// [`Error::Unreachable`], since the usual cause is a wrong URL.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, Error> {
        let (method, url, response) = self.execute(request).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_of(method, url, response).await.into())
    }

    /// Sends `request` with the credential and returns whatever answer came (a WebSocket
    /// handshake's success is `101`, which [`Client::send`] would read as an error).
    async fn execute(&self, request: RequestBuilder) -> Result<(Method, Url, Response), Error> {
        let token = self.token().await?;
        self.execute_as(request, token).await
    }

    /// [`Client::execute`] with this credential (a socket keeps the one it connected with,
    /// to know when to replace it).
    async fn execute_as(
        &self,
        request: RequestBuilder,
        token: Option<String>,
    ) -> Result<(Method, Url, Response), Error> {
        let (client, request) = request.build_split();
        let mut request = request.map_err(|source| Error::Http {
            what: "building the request".into(),
            source,
        })?;
        if let Some(token) = token {
            let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::Token("the token is not a valid header value".into()))?;
            request
                .headers_mut()
                .insert(reqwest::header::AUTHORIZATION, value);
        }
        let (method, url) = (request.method().clone(), request.url().clone());
        let response = client
            .execute(request)
            .await
            .map_err(|source| Error::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        Ok((method, url, response))
    }

    /// The credential for the next request or connection: the fixed one, or the provider's
    /// current one.
    async fn token(&self) -> Result<Option<String>, Error> {
        Ok(match &self.token {
            Token::None => None,
            Token::Fixed(token) => Some(token.clone()),
            // Bounded: a provider that hangs must not hold a socket's loop (reads,
            // commands, close) with it.
            Token::Provider(provider) => Some(
                tokio::time::timeout(TOKEN_TIMEOUT, provider())
                    .await
                    .map_err(|_| Error::Token(format!("no token within {TOKEN_TIMEOUT:?}")))?
                    .map_err(Error::Token)?,
            ),
        })
    }

    /// Whether tokens come from a provider, which can replace one before it expires.
    #[cfg(feature = "websocket")]
    fn refreshes_tokens(&self) -> bool {
        matches!(self.token, Token::Provider(_))
    }

    /// `GET` of a JSON document.
    pub async fn get_json(&self, url: Url) -> Result<Value, Error> {
        let response = self
            .send(self.request(Method::GET, url.clone(), true))
            .await?;
        response.json().await.map_err(|source| Error::Http {
            what: format!("reading the answer to GET {url}"),
            source,
        })
    }

    /// Publishes `data` to `channel` (as event type `event`, `message` when `None`) and
    /// waits until the server stored it. With an `idempotency_key`, a publish retried after
    /// a failure that may or may not have reached the server is stored once: the server
    /// answers the first id, `duplicate`.
    pub async fn publish(
        &self,
        channel: &str,
        data: impl Into<Bytes>,
        event: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Published, Error> {
        let mut url = self.url(&["v1", "channels", channel, "messages"]);
        if let Some(event) = event {
            url.query_pairs_mut().append_pair("event", event);
        }
        let mut request = self.request(Method::POST, url.clone(), true);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = self.send(request.body(data.into())).await?;
        let body: Value = response.json().await.map_err(|source| Error::Http {
            what: format!("reading the answer to POST {url}"),
            source,
        })?;
        Ok(Published {
            id: body["id"].as_str().unwrap_or_default().to_string(),
            duplicate: body["duplicate"].as_bool().unwrap_or(false),
        })
    }

    /// Follows `channel` over Server-Sent Events from after `from` (or from now on),
    /// reconnecting by itself with the last id it saw; see [`Follow`].
    pub fn follow(&self, channel: &str, from: Option<String>) -> Follow {
        Follow::new(self.clone(), vec![(channel.to_string(), from)], false)
    }

    /// Follows several channels on one event stream (`/v1/events`), each from after its
    /// own cursor (or from now on); a message's data is its JSON, which names its channel
    /// and id. See [`Follow`].
    pub fn follow_many(&self, channels: &[(&str, Option<String>)]) -> Follow {
        let channels = channels
            .iter()
            .map(|(channel, from)| (channel.to_string(), from.clone()))
            .collect();
        Follow::new(self.clone(), channels, true)
    }

    /// Follows `channels` over one WebSocket, each from after its cursor (or from now on),
    /// with publishing acknowledged on the same connection; see [`Socket`]. Connects in
    /// the background (inside a tokio runtime): a refusal of the first connection is the
    /// first [`Socket::next`]'s error.
    #[cfg(feature = "websocket")]
    pub fn socket(&self, channels: &[(&str, Option<String>)]) -> Socket {
        let channels = channels
            .iter()
            .map(|(channel, from)| (channel.to_string(), from.clone()))
            .collect();
        Socket::new(self.clone(), channels)
    }

    /// A WebSocket to the user object `namespace`/`name`, at `path` under it (the route
    /// its type serves, `ws` for the examples) with `query`; see [`ObjectSocket`].
    #[cfg(feature = "websocket")]
    pub fn object(
        &self,
        namespace: &str,
        name: &str,
        path: &str,
        query: &[(&str, &str)],
    ) -> ObjectSocket {
        let mut segments = vec!["v1", "objects", namespace, name];
        segments.extend(path.split('/').filter(|s| !s.is_empty()));
        let mut url = self.url(&segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        ObjectSocket::new(self.clone(), url)
    }

    /// A page of `channel`'s stored messages, as the history route answers it; `query`
    /// holds its parameters (`after`, `before`, `direction`, `since`, `until`, `limit`).
    pub async fn history(&self, channel: &str, query: &[(&str, &str)]) -> Result<Value, Error> {
        let mut url = self.url(&["v1", "channels", channel, "messages"]);
        url.query_pairs_mut().extend_pairs(query);
        self.get_json(url).await
    }

    /// Who follows `channel` (one that keeps presence): a page of members by subject with
    /// their info and connections, and the totals; `query` may hold `after` and `limit`.
    pub async fn presence(&self, channel: &str, query: &[(&str, &str)]) -> Result<Value, Error> {
        let mut url = self.url(&["v1", "channels", channel, "presence"]);
        url.query_pairs_mut().extend_pairs(query);
        self.get_json(url).await
    }
}

/// Reads an error answer: the documented `{"error": {"code", "message"}}`, or whatever a
/// proxy in between sent instead (the start of its body stands in for the message).
pub async fn error_of(method: Method, url: Url, response: Response) -> ServerError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = response.text().await.unwrap_or_default();
    let parsed = serde_json::from_str::<Value>(&text).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v["error"][name].as_str())
            .map(str::to_string)
    };
    let (code, message) = match (field("code"), field("message")) {
        (Some(code), Some(message)) => (code, message),
        _ => {
            let mut body: String = text.trim().chars().take(300).collect();
            if body.is_empty() {
                body = "(no body)".to_string();
            }
            let code = status
                .canonical_reason()
                .unwrap_or("error")
                .to_lowercase()
                .replace(' ', "_");
            (code, body)
        }
    };
    ServerError {
        method,
        url,
        status,
        code,
        message,
        retry_after,
        channel: parsed
            .as_ref()
            .and_then(|v| v["error"]["channel"].as_str())
            .map(str::to_string),
    }
}

/// Checks a base URL: `http` or `https`, without query or fragment (they would be lost or
/// misread when paths are appended). The error says what is wrong, for a person.
pub fn parse_base_url(raw: &str) -> Result<Url, String> {
    let url =
        Url::parse(raw).map_err(|e| format!("not a URL ({e}); e.g. http://127.0.0.1:8080"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme must be http or https, not {:?}",
            url.scheme()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or a fragment".to_string());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(parse_base_url(base).unwrap(), None, "test").unwrap()
    }

    #[test]
    fn channel_names_become_one_encoded_path_segment_under_the_base() {
        let c = client("http://127.0.0.1:8080");
        assert_eq!(
            c.url(&["v1", "channels", "tenant:room@1=x", "events"])
                .as_str(),
            "http://127.0.0.1:8080/v1/channels/tenant:room@1=x/events"
        );
        // A bad name stays one segment, for the server to refuse by name.
        assert_eq!(
            c.url(&["v1", "channels", "a b/../c?d"]).as_str(),
            "http://127.0.0.1:8080/v1/channels/a%20b%2F..%2Fc%3Fd"
        );
        let prefixed = client("https://example.test/dormouse/");
        assert_eq!(
            prefixed.url(&["v1", "channels"]).as_str(),
            "https://example.test/dormouse/v1/channels"
        );
    }

    #[test]
    fn base_urls_must_be_plain_http() {
        assert!(parse_base_url("127.0.0.1:8080").is_err());
        assert!(parse_base_url("ftp://host/").is_err());
        assert!(parse_base_url("http://host/?q=1").is_err());
        assert!(parse_base_url("https://host:8443").is_ok());
    }
}
