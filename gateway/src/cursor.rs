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

/// A subscribe request's start: its cursor (the header, else `last_event_id`), else the
/// newest `rewind` events (at most `max_rewind`), else live.
pub(crate) fn start(
    headers: &HeaderMap,
    query: Option<&str>,
    rewind: Option<&str>,
    max_rewind: usize,
) -> Result<Start, ApiError> {
    // Checked even when a cursor wins: a bad parameter is an error whenever it is sent.
    let rewind = rewind_of(rewind, max_rewind)?;
    match given(headers, query)? {
        Some((raw, name)) => Ok(Start::After(parse_id(raw, name)?)),
        None => Ok(rewind.map_or(Start::Live, Start::Latest)),
    }
}

/// Each channel's start in a stream of several: from the composite cursor its id lines
/// carry (one position per channel, in the request's order; an empty one is a channel
/// that had no event yet), or, without one, live (or the newest `rewind` events) for all.
pub(crate) fn starts_of_many(
    headers: &HeaderMap,
    query: Option<&str>,
    rewind: Option<&str>,
    channels: usize,
    max_rewind: usize,
) -> Result<Vec<Start>, ApiError> {
    let rewind = rewind_of(rewind, max_rewind)?;
    let Some((raw, name)) = given(headers, query)? else {
        return Ok(vec![rewind.map_or(Start::Live, Start::Latest); channels]);
    };
    let parts: Vec<&str> = raw.split(',').collect();
    if parts.len() != channels {
        return Err(ApiError::bad_request(
            "bad_event_id",
            format!(
                "the cursor has {} positions for {channels} channels; a stream of several \
                 channels resumes with the id it sent, for the same channels in the same order",
                parts.len()
            ),
        ));
    }
    parts
        .into_iter()
        .map(|part| match part {
            "" => Ok(Start::Oldest),
            id => Ok(Start::After(parse_id(id, name)?)),
        })
        .collect()
}

/// The cursor a request gives, and where (for an error message): the `Last-Event-ID`
/// header, else the `last_event_id` query parameter; blank ones are none.
fn given<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<(&'a str, &'static str)>, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::bad_request("bad_event_id", "Last-Event-ID must be ASCII text")
            })
        })
        .transpose()?
        .map(str::trim)
        .filter(|v| !v.is_empty());
    Ok(match (header, query.filter(|q| !q.is_empty())) {
        (Some(raw), _) => Some((raw, "Last-Event-ID")),
        (None, Some(raw)) => Some((raw, "last_event_id")),
        (None, None) => None,
    })
}

/// `rewind`, checked: a number of events from 1 to `max_rewind`.
fn rewind_of(rewind: Option<&str>, max_rewind: usize) -> Result<Option<usize>, ApiError> {
    rewind
        .map(|raw| match raw.parse::<usize>() {
            Ok(n) if (1..=max_rewind).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "bad_rewind",
                format!("rewind must be a number of events from 1 to {max_rewind}; got {raw:?}"),
            )),
        })
        .transpose()
}
