//! Where a subscriber's stream starts: after the `Last-Event-ID` header (what EventSource
//! sends when it reconnects) or the `last_event_id` query parameter (for clients that cannot
//! set headers, such as a browser's first EventSource connection or WebSocket). The header
//! wins, because a reconnecting EventSource keeps its original URL.

use axum::http::{HeaderMap, Uri};
use dormouse_actors::channel::Start;
use serde::Deserialize;

use crate::channels::{parse_id, query};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeQuery {
    last_event_id: Option<String>,
    /// The credential, read by the auth middleware; allowed here so it is not refused.
    #[serde(rename = "access_token")]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// A hooked channel's subscribe query: its hook reads the query too (`connect` gets it
/// whole), so parameters other than ours are the hook's, not a mistake.
#[derive(Debug, Deserialize)]
struct HookedQuery {
    last_event_id: Option<String>,
}

/// The start of a subscribe request, whose only query parameter is `last_event_id` unless
/// the channel is `hooked`.
pub(crate) fn from_request(
    uri: &Uri,
    headers: &HeaderMap,
    hooked: bool,
) -> Result<Start, ApiError> {
    let last_event_id = if hooked {
        query::<HookedQuery>(uri)?.last_event_id
    } else {
        query::<SubscribeQuery>(uri)?.last_event_id
    };
    start(headers, last_event_id.as_deref())
}

pub(crate) fn start(headers: &HeaderMap, query: Option<&str>) -> Result<Start, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::bad_request("bad_event_id", "Last-Event-ID must be ASCII text")
            })
        })
        .transpose()?;
    match (header, query) {
        (Some(raw), _) if !raw.trim().is_empty() => {
            Ok(Start::After(parse_id(raw.trim(), "Last-Event-ID")?))
        }
        (_, Some(raw)) if !raw.is_empty() => Ok(Start::After(parse_id(raw, "last_event_id")?)),
        _ => Ok(Start::Live),
    }
}
