//! Where a subscriber's stream starts: after the `Last-Event-ID` header (what EventSource
//! sends when it reconnects) or the `last_event_id` query parameter (for clients that cannot
//! set headers, such as a browser's first EventSource connection or WebSocket). The header
//! wins, because a reconnecting EventSource keeps its original URL. Without either, `rewind=N`
//! starts with the channel's newest N events, then live ("the last N, then everything
//! new"); a cursor wins over it, so a client that reconnects resumes exactly.

use axum::http::{HeaderMap, Uri};
use dormouse_actors::channel::Start;
use serde::Deserialize;

use crate::channels::{parse_id, query};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeQuery {
    last_event_id: Option<String>,
    rewind: Option<String>,
    format: Option<String>,
    /// The credential, read by the auth middleware; allowed here so it is not refused.
    #[serde(rename = "access_token")]
    _access_token: Option<serde::de::IgnoredAny>,
}

/// A hooked channel's subscribe query: its hook reads the query too (`connect` gets it
/// whole), so parameters other than ours are the hook's, not a mistake.
#[derive(Debug, Deserialize)]
struct HookedQuery {
    last_event_id: Option<String>,
    rewind: Option<String>,
    format: Option<String>,
}

/// The start of a subscribe request, and the `format` it asked for (WebSocket only). Its
/// only query parameters are `last_event_id`, `rewind` (at most `max_rewind`) and
/// `format`, unless the channel is `hooked`.
pub(crate) fn from_request(
    uri: &Uri,
    headers: &HeaderMap,
    hooked: bool,
    max_rewind: usize,
) -> Result<(Start, Option<String>), ApiError> {
    let (last_event_id, rewind, format) = if hooked {
        let q = query::<HookedQuery>(uri)?;
        (q.last_event_id, q.rewind, q.format)
    } else {
        let q = query::<SubscribeQuery>(uri)?;
        (q.last_event_id, q.rewind, q.format)
    };
    let start = start(
        headers,
        last_event_id.as_deref(),
        rewind.as_deref(),
        max_rewind,
    )?;
    Ok((start, format))
}

pub(crate) fn start(
    headers: &HeaderMap,
    query: Option<&str>,
    rewind: Option<&str>,
    max_rewind: usize,
) -> Result<Start, ApiError> {
    // Checked even when a cursor wins: a bad parameter is an error whenever it is sent.
    let rewind = rewind
        .map(|raw| match raw.parse::<usize>() {
            Ok(n) if (1..=max_rewind).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "bad_rewind",
                format!("rewind must be a number of events from 1 to {max_rewind}; got {raw:?}"),
            )),
        })
        .transpose()?;
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
        _ => Ok(rewind.map_or(Start::Live, Start::Latest)),
    }
}
