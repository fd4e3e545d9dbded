//! `dormouse cluster check`: whether a NATS cluster can carry cluster mode, tested the way
//! cluster mode will use it. Every server in the list is reached on its own (a server too
//! old to fence is refused even when another in the list would do), then a replicated stream
//! is created, a fenced append made, a stale one refused, and the stream deleted.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::connect::{NatsSettings, connect};
use crate::fenced::{AppendError, FencedLog, LogSpec};

/// One server, reached on its own.
#[derive(Debug, Clone, Serialize)]
pub struct ServerCheck {
    pub url: String,
    /// The server's name and release, when it answered.
    pub server: Option<String>,
    pub version: Option<String>,
    /// Why it cannot carry cluster mode; `None` when it can.
    pub problem: Option<String>,
}

/// The whole check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub servers: Vec<ServerCheck>,
    pub replicas: usize,
    /// Milliseconds a fenced append to a stream of `replicas` copies took, when it worked.
    pub append_ms: Option<f64>,
    /// Why the replicated stream or its fencing failed, if it did.
    pub stream_problem: Option<String>,
    pub ok: bool,
}

/// Runs the check; the report says what failed, so this returns no error of its own.
pub async fn check(settings: &NatsSettings, replicas: usize) -> CheckReport {
    let mut servers = Vec::with_capacity(settings.urls.len());
    for url in &settings.urls {
        let mut alone = settings.clone();
        alone.urls = vec![url.clone()];
        servers.push(match connect(&alone).await {
            Ok(nats) => ServerCheck {
                url: url.clone(),
                server: Some(nats.server),
                version: Some(nats.version.to_string()),
                problem: None,
            },
            Err(e) => ServerCheck {
                url: url.clone(),
                server: None,
                version: None,
                problem: Some(e.to_string()),
            },
        });
    }
    let (append_ms, stream_problem) = if servers.iter().any(|s| s.problem.is_none()) {
        match replicated_append(settings, replicas).await {
            Ok(took) => (Some(took.as_secs_f64() * 1000.0), None),
            Err(problem) => (None, Some(problem)),
        }
    } else {
        (None, Some("no server to create a stream on".to_string()))
    };
    let ok = stream_problem.is_none() && servers.iter().all(|s| s.problem.is_none());
    CheckReport {
        servers,
        replicas,
        append_ms,
        stream_problem,
        ok,
    }
}

/// Creates a stream of `replicas` copies, appends to it fenced, checks a stale append is
/// refused, and deletes it; returns how long the good append took.
async fn replicated_append(settings: &NatsSettings, replicas: usize) -> Result<Duration, String> {
    let nats = connect(settings).await.map_err(|e| e.to_string())?;
    let name = format!(
        "DM_CHECK_{:x}",
        crate::NodeId::start(&settings.name).incarnation
    );
    let log = FencedLog::open(
        &nats,
        &LogSpec {
            name: name.clone(),
            subjects: vec![format!("{}.>", name.to_ascii_lowercase())],
            replicas,
            duplicate_window: Duration::from_secs(30),
            republish: false,
        },
    )
    .await
    .map_err(|e| format!("creating a stream of {replicas} replicas: {e}"))?;
    let subject = format!("{}.check", name.to_ascii_lowercase());
    let result = async {
        let started = Instant::now();
        log.append(&subject, Bytes::from_static(b"check"), 0, "check-1")
            .await
            .map_err(|e| format!("a fenced append: {e}"))?;
        let took = started.elapsed();
        match log
            .append(&subject, Bytes::from_static(b"stale"), 0, "check-2")
            .await
        {
            Err(AppendError::Fenced { .. } | AppendError::Contended) => Ok(took),
            Ok(_) => Err("a stale append was stored: this server does not fence".to_string()),
            Err(e) => Err(format!("a stale append failed for another reason: {e}")),
        }
    }
    .await;
    let deleted = log.delete().await.map_err(|e| e.to_string());
    let took = result?;
    deleted.map_err(|e| format!("deleting the check's stream {name}: {e}"))?;
    Ok(took)
}
