//! Delivering one batch to the sink: a `POST` of NDJSON that names the batch, so a sink can
//! drop a batch it already has.

use anyhow::Context as _;
use dormouse_runtime::Bytes;

use crate::{BatcherConfig, NAMESPACE};

/// Consecutive rows of one stream, as stored.
#[derive(Debug)]
pub(crate) struct Batch<'a> {
    /// The stream (object) name.
    pub(crate) stream: &'a str,
    /// The stream log's epoch: sequence numbers are unique within it.
    pub(crate) epoch: u64,
    /// Sequence number of the first row; the others follow without holes.
    pub(crate) first_seq: u64,
    /// The rows, each one JSON object as the client sent it.
    pub(crate) rows: Vec<Bytes>,
}

impl Batch<'_> {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.rows.len() as u64 - 1
    }

    /// Names exactly these rows: a retry of the same rows carries the same key.
    pub(crate) fn idempotency_key(&self) -> String {
        format!(
            "{NAMESPACE}/{}/{:x}-{}-{}",
            self.stream,
            self.epoch,
            self.first_seq,
            self.last_seq()
        )
    }

    fn body(&self) -> Vec<u8> {
        let len = self.rows.iter().map(|r| r.len() + 1).sum();
        let mut body = Vec::with_capacity(len);
        for row in &self.rows {
            body.extend_from_slice(row);
            body.push(b'\n');
        }
        body
    }
}

/// Posts `batch`; `Ok` only when the sink answered 2xx.
pub(crate) async fn deliver(
    client: &reqwest::Client,
    config: &BatcherConfig,
    batch: &Batch<'_>,
) -> anyhow::Result<()> {
    let response = client
        .post(&config.upstream)
        .timeout(config.request_timeout)
        .header("content-type", "application/x-ndjson")
        .header("idempotency-key", batch.idempotency_key())
        .header("dormouse-stream", batch.stream)
        .header("dormouse-epoch", format!("{:x}", batch.epoch))
        .header("dormouse-first-seq", batch.first_seq.to_string())
        .body(batch.body())
        .send()
        .await
        .with_context(|| format!("posting to {}", config.upstream))?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "{} answered {status}", config.upstream);
    Ok(())
}
