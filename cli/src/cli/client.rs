//! What every client command shares: where the server is, the credential, and turning a
//! refusal into an error that shows the server's own `code` and `message` (they say what was
//! wrong and how to fix it better than anything the client could guess).

use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

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

/// The server answered with an error; shown with its status, `code` and `message`.
#[derive(Debug, thiserror::Error)]
#[error("{method} {url}: the server answered {status} ({code}): {message}")]
pub(crate) struct ServerError {
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) status: StatusCode,
    /// The `error.code` of the JSON body (or the status text when a proxy answered without
    /// one), for deciding whether to retry.
    pub(crate) code: String,
    pub(crate) message: String,
    /// `Retry-After`, when the server said how long to wait.
    pub(crate) retry_after: Option<Duration>,
}

impl ServerError {
    /// Whether the same request may succeed later without any change: the server was
    /// overloaded, restarting, or rate-limiting, not refusing the request itself.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS
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

/// An HTTP client bound to one server and credential.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    pub(crate) fn new(conn: &ConnArgs) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("dormouse-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: conn.url.clone(),
            token: conn.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// The URL of `segments` under the base URL, each segment percent-encoded as needed, so
    /// a channel name is never read as a path or a query.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A request with the credential; `timeout` is off for streams.
    pub(crate) fn request(&self, method: Method, url: Url, timeout: bool) -> RequestBuilder {
        let mut request = self.http.request(method, url);
        if timeout {
            request = request.timeout(REQUEST_TIMEOUT);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// Sends `request`: a success as is; an error answer as [`ServerError`]; no answer as an
    /// error that names the server, since the usual cause is a wrong `--url`.
    pub(crate) async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let (client, request) = request.build_split();
        let request = request.context("building the request")?;
        let (method, url) = (request.method().clone(), request.url().clone());
        let response = client
            .execute(request)
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_of(method, url, response).await.into())
    }

    /// `GET` of a JSON document.
    pub(crate) async fn get_json(&self, url: Url) -> anyhow::Result<Value> {
        let response = self
            .send(self.request(Method::GET, url.clone(), true))
            .await?;
        response
            .json()
            .await
            .with_context(|| format!("reading the answer to GET {url}"))
    }
}

/// Reads an error answer: the documented `{"error": {"code", "message"}}`, or whatever a
/// proxy in between sent instead (the start of its body stands in for the message).
pub(crate) async fn error_of(method: Method, url: Url, response: Response) -> ServerError {
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
    }
}

/// Accepts an `http` or `https` URL without query or fragment (they would be lost or
/// misread when paths are appended).
fn parse_base_url(raw: &str) -> Result<Url, String> {
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
        Client::new(&ConnArgs {
            url: parse_base_url(base).unwrap(),
            token: None,
        })
        .unwrap()
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
