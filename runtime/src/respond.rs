//! Answers for [`Object::fetch`](crate::Object::fetch) in the shapes the gateway itself
//! uses, so a user's object answers like the server around it: JSON with its content type,
//! and errors as `{"error": {"code", "message"}}` (docs/API.md), which clients already
//! parse for the server's own refusals.
//!
//! Both return a `Result` so that `fetch` can end with them (`return respond::error(..)`).

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::HttpResponse;

/// `body` as JSON with `status`; fails only when `body` cannot be written as JSON (a map
/// with keys that are not strings).
pub fn json(status: StatusCode, body: &impl Serialize) -> anyhow::Result<HttpResponse> {
    let bytes = serde_json::to_vec(body)?;
    let mut response = HttpResponse::new(Bytes::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// A refusal: `status` with `{"error": {"code", "message"}}`; `code` is the stable,
/// machine-readable part, `message` says what was wrong for a person.
pub fn error(
    status: StatusCode,
    code: &str,
    message: impl std::fmt::Display,
) -> anyhow::Result<HttpResponse> {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message.to_string()}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_has_the_servers_shape_and_content_type() {
        let response = error(StatusCode::NOT_FOUND, "not_found", "no such run").unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "not_found", "message": "no such run"}})
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_an_error_not_a_panic() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), "a tuple key has no JSON form");
        assert!(json(StatusCode::OK, &map).is_err());
    }
}
