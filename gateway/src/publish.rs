//! `POST /v1/publish`: many messages, to one or many channels, in one request.
//!
//! The body is a JSON array, or NDJSON (one JSON object per line) when the content type is
//! `application/x-ndjson` or `application/ndjson`. Each item is
//! `{"channel": NAME | "channels": [NAME...], "event"?, "data" | "data_base64",
//! "idempotency_key"?}`. Items for one channel are published in order, as one batch (one
//! commit); channels are published concurrently. The answer has one result per (item,
//! channel), in request order: an id, or an error saying what was wrong with that item.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use dormouse_actors::channel::NewMessage;
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::channels::{check_channel, read_body};
use crate::error::ApiError;
use crate::limits::ClientIp;
use crate::publisher::{Client, check_message};
use crate::state::AppState;

/// One (item, channel) pair ready to publish, or why it cannot be.
pub type Planned = Result<(String, NewMessage), ApiError>;

/// Parses a batch body (a JSON array, or NDJSON) into one entry per (item, channel), each
/// validated on its own; the whole body fails only when it is not JSON of the right shape
/// or has more than `max_messages` items. Public so the fuzz target can drive it; it never
/// panics, whatever the input.
pub fn parse_batch(
    body: &[u8],
    ndjson: bool,
    max_messages: usize,
    max_message_size: usize,
) -> Result<Vec<Planned>, ApiError> {
    let items: Vec<Result<Value, ApiError>> = if ndjson {
        body.split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
            .map(|(n, line)| {
                serde_json::from_slice(line)
                    .map_err(|e| ApiError::bad_request("bad_json", format!("line {}: {e}", n + 1)))
            })
            .collect()
    } else {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(
                "bad_json",
                format!("the body must be a JSON array of messages (or NDJSON with an ndjson content type): {e}"),
            )
        })?;
        let Value::Array(items) = value else {
            return Err(ApiError::bad_request(
                "bad_json",
                "the body must be a JSON array of messages",
            ));
        };
        items.into_iter().map(Ok).collect()
    };
    if items.len() > max_messages {
        return Err(ApiError::too_large(format!(
            "{} messages in one batch; the limit is {max_messages}",
            items.len(),
        )));
    }
    Ok(items
        .into_iter()
        .flat_map(|item| match item.and_then(|v| plan(v, max_message_size)) {
            Ok(pairs) => pairs.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        })
        .collect())
}

pub(crate) async fn batch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let limits = &state.settings.limits;
    let body = read_body(&headers, body, limits.max_batch_size.0, "the batch").await?;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("ndjson"));
    let planned = parse_batch(
        &body,
        ndjson,
        limits.max_batch_messages,
        limits.max_message_size.0 as usize,
    )?;
    let publisher = &state.publisher;
    let client = Client {
        principal: &principal,
        ip,
    };
    // Each pair needs its own grant; a refused one fails alone, like any bad item.
    let planned: Vec<Planned> = planned
        .into_iter()
        .map(|pair| {
            pair.and_then(|(channel, message)| {
                publisher.authorize(client, &channel)?;
                Ok((channel, message))
            })
        })
        .collect();

    // Every message counts against the publish rate; over it, nothing is published.
    let messages = planned.iter().filter(|p| p.is_ok()).count();
    publisher.charge(client, messages)?;

    // Items for channels whose hook screens publishes go through it, all at once; the
    // order they are published in is still the batch's (groups are made after).
    let max = publisher.max_message_size();
    let planned: Vec<Planned> = futures::future::join_all(planned.into_iter().map(|pair| {
        let (hooks, subject) = (&state.hooks, &principal.subject);
        async move {
            let (channel, message) = pair?;
            let message = hooks.screen(&channel, subject, None, message, max).await?;
            Ok((channel, message))
        }
    }))
    .await;

    // Group by channel, remembering each pair's position in the answer.
    let mut groups: HashMap<String, (Vec<usize>, Vec<NewMessage>)> = HashMap::new();
    let mut results: Vec<Option<Value>> = vec![None; planned.len()];
    for (position, pair) in planned.into_iter().enumerate() {
        match pair {
            Ok((channel, message)) => {
                let group = groups.entry(channel).or_default();
                group.0.push(position);
                group.1.push(message);
            }
            Err(e) => results[position] = Some(error_result(None, &e)),
        }
    }
    let calls = groups.into_iter().map(|(channel, (positions, messages))| {
        let reply = publisher.publish(&channel, messages);
        async move { (channel, positions, reply.await) }
    });
    for (channel, positions, reply) in futures::future::join_all(calls).await {
        match reply {
            Ok(published) => {
                for (position, p) in positions.into_iter().zip(published) {
                    results[position] =
                        Some(json!({"channel": channel, "id": p.id, "duplicate": p.duplicate}));
                }
            }
            Err(e) => {
                let e = ApiError::from(e);
                for position in positions {
                    results[position] = Some(error_result(Some(&channel), &e));
                }
            }
        }
    }
    let results: Vec<Value> = results.into_iter().map(Option::unwrap_or_default).collect();
    let failed = results.iter().filter(|r| r.get("error").is_some()).count();
    Ok(Json(json!({
        "published": results.len() - failed,
        "failed": failed,
        "results": results,
    })))
}

fn error_result(channel: Option<&str>, e: &ApiError) -> Value {
    json!({"channel": channel, "error": {"code": e.code, "message": e.message}})
}

/// Validates one item and expands it to one message per channel.
fn plan(item: Value, max_message: usize) -> Result<Vec<(String, NewMessage)>, ApiError> {
    let bad = |m: &str| ApiError::bad_request("bad_message", m.to_string());
    let Value::Object(mut fields) = item else {
        return Err(bad("each message must be a JSON object"));
    };
    let text = |v: Value, what: &str| match v {
        Value::String(s) => Ok(s),
        _ => Err(bad(&format!("{what} must be a string"))),
    };
    let mut channels = Vec::new();
    if let Some(v) = fields.remove("channel") {
        channels.push(text(v, "channel")?);
    }
    if let Some(v) = fields.remove("channels") {
        let Value::Array(list) = v else {
            return Err(bad("channels must be an array of strings"));
        };
        for v in list {
            channels.push(text(v, "each of channels")?);
        }
    }
    if channels.is_empty() {
        return Err(bad("each message needs a channel (or channels)"));
    }
    for channel in &channels {
        check_channel(channel)?;
    }
    let event = fields
        .remove("event")
        .map(|v| text(v, "event"))
        .transpose()?;
    let key = fields
        .remove("idempotency_key")
        .map(|v| text(v, "idempotency_key"))
        .transpose()?;
    let data = match (fields.remove("data"), fields.remove("data_base64")) {
        (Some(Value::String(s)), None) => Bytes::from(s),
        // Non-string JSON data is published as its JSON text.
        (Some(other), None) => Bytes::from(other.to_string()),
        (None, Some(Value::String(b64))) => Bytes::from(
            BASE64
                .decode(b64.as_bytes())
                .map_err(|e| bad(&format!("data_base64 is not base64: {e}")))?,
        ),
        (None, Some(_)) => return Err(bad("data_base64 must be a string")),
        _ => return Err(bad("give exactly one of data and data_base64")),
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(bad(&format!(
            "unknown field {unknown:?}; allowed: channel, channels, event, data, data_base64, idempotency_key"
        )));
    }
    let message = NewMessage {
        event,
        data,
        idempotency_key: key,
    };
    check_message(&message, max_message)?;
    Ok(channels
        .into_iter()
        .map(|channel| (channel, message.clone()))
        .collect())
}
