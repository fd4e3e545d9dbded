//! Node to node requests: how a node that does not own an object reaches the one that does
//! (a publish, an object request, a socket message), over NATS request/reply.
//!
//! Each node answers on `dm.rpc.<node>`; a request names the incarnation it is for, so a
//! node that restarted under the same name refuses requests meant for its former self
//! ([`RpcError::Stale`]), and the caller looks the owner up again. A node that is gone has no
//! subscriber: the request fails at once with [`RpcError::NodeGone`] instead of waiting for
//! a timeout (after a few tries within 200 ms, as a new subscription takes a moment to reach
//! every server), which is how a caller learns an owner may have died before its membership
//! expires. It is a hint, not proof: an owner whose client is reconnecting to another server
//! is briefly unanswerable too; acting on it is safe because a take-over is fenced by the log.
//! Two live processes must not share a node name: both would answer its requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures::StreamExt as _;

use crate::connect::Nats;
use crate::ownership::{NodeId, token};

/// Header: the incarnation a request is for.
const TO: &str = "Dm-To";
/// Header: what a request asks (the handler's own vocabulary: `publish`, `fetch`, ...).
const KIND: &str = "Dm-Kind";
/// Header on a reply: `ok`, `error` (the body says why) or `stale`.
const STATUS: &str = "Dm-Status";

/// Tries, and the pause between them, before "no responders" counts as the node being gone.
const GONE_TRIES: u32 = 4;
const GONE_PAUSE: Duration = Duration::from_millis(50);

/// The subject `node` answers on.
fn subject(node: &str) -> String {
    format!("dm.rpc.{}", token(node))
}

/// What a handler answers.
pub type Reply = Result<Bytes, String>;

/// A node's request server; dropping it stops answering.
#[derive(Debug)]
pub struct RpcServer {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers requests for `me` with `handler(kind, body)`, each in a task of its own so a slow
/// one does not hold up the rest.
pub async fn serve<H, F>(nats: &Nats, me: &NodeId, handler: H) -> Result<RpcServer, RpcError>
where
    H: Fn(String, Bytes) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let mut requests = nats
        .client
        .subscribe(subject(&me.name))
        .await
        .map_err(|e| RpcError::Failed(e.into()))?;
    // The server has the subscription once this returns (its routes learn of it a moment
    // later, which `call` allows for).
    nats.client
        .flush()
        .await
        .map_err(|e| RpcError::Failed(e.into()))?;
    let (client, incarnation) = (nats.client.clone(), me.incarnation.to_string());
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let Some(reply_to) = request.reply.clone() else {
                continue;
            };
            let (client, handler) = (client.clone(), Arc::clone(&handler));
            let mut headers = HeaderMap::new();
            if crate::header(&request, TO) != Some(incarnation.as_str()) {
                headers.insert(STATUS, "stale");
                let _ = client
                    .publish_with_headers(reply_to, headers, Bytes::new())
                    .await;
                continue;
            }
            let kind = crate::header(&request, KIND)
                .unwrap_or_default()
                .to_string();
            tokio::spawn(async move {
                let body = match handler(kind, request.payload).await {
                    Ok(body) => {
                        headers.insert(STATUS, "ok");
                        body
                    }
                    Err(why) => {
                        headers.insert(STATUS, "error");
                        Bytes::from(why)
                    }
                };
                if let Err(e) = client.publish_with_headers(reply_to, headers, body).await {
                    tracing::debug!(error = %e, "a reply could not be sent");
                }
            });
        }
    });
    Ok(RpcServer { task })
}

/// Why a request got no answer from its handler.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No node answers on that name: it is gone (look the owner up again, or take over).
    #[error("node {0} is gone (no one answers for it)")]
    NodeGone(String),
    /// The node restarted since it was looked up: look it up again.
    #[error("node {0} restarted; the request was for its former run")]
    Stale(String),
    /// The node took it but did not answer in time; it may or may not have acted.
    #[error("node {0} did not answer in time")]
    TimedOut(String),
    /// The handler refused it, saying why.
    #[error("node {node} refused the request: {why}")]
    Refused { node: String, why: String },
    #[error("sending a request: {0}")]
    Failed(#[source] async_nats::Error),
}

/// Sends `body` to `node` as a request of `kind`; waits up to `timeout` for the answer.
pub async fn call(
    nats: &Nats,
    node: &NodeId,
    kind: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, RpcError> {
    let mut headers = HeaderMap::new();
    headers.insert(TO, node.incarnation.to_string().as_str());
    headers.insert(KIND, kind);
    // A subscription reaches the other servers of the cluster a moment after its own: a
    // node that just started may not be answerable everywhere yet. "No responders" is
    // believed only when it lasts.
    let mut tries = 0;
    let reply = loop {
        let request = async_nats::Request::new()
            .headers(headers.clone())
            .payload(body.clone())
            .timeout(Some(timeout));
        match nats.client.send_request(subject(&node.name), request).await {
            Ok(reply) => break reply,
            Err(e) if e.kind() == RequestErrorKind::NoResponders && tries < GONE_TRIES => {
                tries += 1;
                tokio::time::sleep(GONE_PAUSE).await;
            }
            Err(e) => {
                return Err(match e.kind() {
                    RequestErrorKind::NoResponders => RpcError::NodeGone(node.to_string()),
                    RequestErrorKind::TimedOut => RpcError::TimedOut(node.to_string()),
                    _ => RpcError::Failed(e.into()),
                });
            }
        }
    };
    match crate::header(&reply, STATUS) {
        Some("ok") => Ok(reply.payload),
        Some("stale") => Err(RpcError::Stale(node.to_string())),
        Some("error") => Err(RpcError::Refused {
            node: node.to_string(),
            why: String::from_utf8_lossy(&reply.payload).into_owned(),
        }),
        other => Err(RpcError::Failed(
            format!("a reply without a status ({other:?})").into(),
        )),
    }
}
