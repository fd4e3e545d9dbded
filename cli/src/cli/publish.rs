//! `dormouse publish`: one message through `POST /v1/channels/{c}/messages`, or, with
//! `--lines`, each line of the input as its own message through `POST /v1/publish` in
//! batches (one request per thousand lines instead of one per line).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

use super::client::{Client, ConnArgs, Error, client};
use super::output;

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Channel to publish to.
    channel: String,
    /// The message; `-` or nothing reads it from standard input.
    #[arg(conflicts_with = "file")]
    data: Option<String>,
    /// Publish the contents of this file (with --lines: each of its lines).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Event name, the SSE `event:` type (default on the server: `message`).
    #[arg(long, value_name = "NAME")]
    event: Option<String>,
    /// Publish each line of the input as its own message (empty lines are skipped), in
    /// batches; prints one id per line.
    #[arg(long)]
    lines: bool,
    /// Most lines per batch request with --lines (the server allows up to
    /// limits.max_batch_messages, 10,000 by default).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// A retry with the same key is answered with the first id and stores nothing. With
    /// --lines, line N gets the key `KEY:N`: running the same import again (after it was
    /// cut short, say) stores only the lines not stored yet.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

/// Where the message (or the lines) come from.
enum Input {
    Arg(String),
    Stdin,
    File(PathBuf),
}

pub(crate) async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let client = client(&args.conn)?;
    let input = match (&args.data, &args.file) {
        (Some(data), None) if data != "-" => Input::Arg(data.clone()),
        (_, Some(path)) => Input::File(path.clone()),
        _ => Input::Stdin,
    };
    if args.lines {
        return publish_lines(&client, &args, input).await;
    }
    let body = match input {
        Input::Arg(data) => data.into_bytes(),
        Input::File(path) => tokio::fs::read(&path)
            .await
            .with_context(|| format!("reading {}", path.display()))?,
        Input::Stdin => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading the message from standard input (end it with Ctrl-D)");
            }
            let mut body = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut body)
                .await
                .context("reading standard input")?;
            body
        }
    };
    let mut url = client.url(&["v1", "channels", &args.channel, "messages"]);
    if let Some(event) = &args.event {
        url.query_pairs_mut().append_pair("event", event);
    }
    let mut request = client.request(Method::POST, url, true).body(body);
    if let Some(key) = &args.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let answer: Value = client
        .send(request)
        .await?
        .json()
        .await
        .context("reading the publish answer")?;
    let id = answer["id"]
        .as_str()
        .with_context(|| format!("the publish answer has no id: {answer}"))?;
    if answer["duplicate"] == true {
        eprintln!("duplicate: a message with this idempotency key was already published");
    }
    output::line(id)
}

/// Raw bytes of message data per batch request. JSON escaping (or base64) makes the body
/// larger, and the server's default body limit is 32 MiB: 4 MiB keeps well under it.
const BATCH_DATA_BYTES: usize = 4 << 20;

/// How long the input may pause before the lines read so far are sent without waiting for
/// a full batch.
const LINGER: Duration = Duration::from_millis(200);

/// The longest `--idempotency-key` with `--lines`: room for `:` and a line number of 20
/// digits within the server's 200 characters.
const MAX_LINES_KEY: usize = 200 - 21;

/// How many times a batch refused as transient (rate limit, overload, a proxy's 502 or 504)
/// is sent again. Safe: a refused batch published nothing, and every line carries an
/// idempotency key for an answer lost after the server stored it.
const BATCH_RETRIES: u32 = 5;

/// One line waiting in the current batch.
struct Line {
    /// 1-based position in the input, for error messages.
    number: u64,
    data: Vec<u8>,
}

async fn publish_lines(client: &Client, args: &PublishArgs, input: Input) -> anyhow::Result<()> {
    let (reader, total): (Box<dyn AsyncBufRead + Unpin + Send>, Option<u64>) = match input {
        Input::Arg(data) => {
            let len = data.len() as u64;
            (Box::new(std::io::Cursor::new(data.into_bytes())), Some(len))
        }
        Input::File(path) => {
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let len = file.metadata().await.ok().map(|m| m.len());
            (Box::new(BufReader::with_capacity(256 << 10, file)), len)
        }
        Input::Stdin => (
            Box::new(BufReader::with_capacity(256 << 10, tokio::io::stdin())),
            None,
        ),
    };
    let progress = progress_bar(total);
    // Every line has a key, so a batch sent again after an answer that got lost (a proxy's
    // 502 or 504 after the server stored it) stores nothing twice. Without a key given,
    // one of this run's own: the time and the process id.
    if let Some(key) = &args.idempotency_key {
        // Line N's key is KEY:N: it must stay a valid key (printable ASCII, at most 200
        // characters) for every line, or the lines past some number would be refused.
        anyhow::ensure!(
            key.len() <= MAX_LINES_KEY && key.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "with --lines the idempotency key must be printable ASCII of at most \
             {MAX_LINES_KEY} characters (each line's key is KEY:N, at most 200); got {} characters",
            key.len()
        );
    }
    let keys = args.idempotency_key.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("lines-{:x}-{:x}", now.as_nanos(), std::process::id())
    });
    let result = Bulk {
        client,
        channel: &args.channel,
        event: args.event.as_deref(),
        keys: &keys,
        batch_size: args.batch_size as usize,
        progress: &progress,
        published: 0,
        failed: 0,
    }
    .run(reader)
    .await;
    progress.finish_and_clear();
    let summary = result?;
    if !progress.is_hidden() {
        eprintln!("published {} messages to {}", summary.0, args.channel);
    }
    if summary.1 > 0 {
        anyhow::bail!(
            "{} of {} lines were not published (reasons above)",
            summary.1,
            summary.0 + summary.1
        );
    }
    Ok(())
}

/// A progress bar on stderr, only when a person is watching it: in a pipeline or a log file
/// it would be noise (indicatif hides it too, but saying so here keeps the rule visible).
fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(bytes) => ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta} left)")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {bytes} read, {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

struct Bulk<'a> {
    client: &'a Client,
    channel: &'a str,
    event: Option<&'a str>,
    /// Line N's idempotency key is `{keys}:{N}`.
    keys: &'a str,
    batch_size: usize,
    progress: &'a ProgressBar,
    published: u64,
    failed: u64,
}

impl Bulk<'_> {
    /// Publishes every non-empty line of `reader`, a batch at a time, printing ids in input
    /// order. Returns (published, failed); a batch refused as a whole stops everything.
    async fn run(mut self, mut reader: impl AsyncBufRead + Unpin) -> anyhow::Result<(u64, u64)> {
        let mut batch: Vec<Line> = Vec::new();
        let mut batch_bytes = 0;
        let mut number = 0;
        let mut buf = Vec::new();
        loop {
            // A slow producer (`tail -f log | dormouse publish --lines`) must not wait for
            // a full batch: when the input pauses, what is pending goes out. `read_until`
            // keeps a partly read line in `buf` when the wait is cut short.
            let read = if batch.is_empty() {
                reader.read_until(b'\n', &mut buf).await
            } else {
                match tokio::time::timeout(LINGER, reader.read_until(b'\n', &mut buf)).await {
                    Ok(read) => read,
                    Err(_) => {
                        self.send(std::mem::take(&mut batch)).await?;
                        batch_bytes = 0;
                        continue;
                    }
                }
            }
            .context("reading the input")?;
            if read == 0 && buf.is_empty() {
                break;
            }
            number += 1;
            self.progress.inc(buf.len() as u64);
            if buf.last() == Some(&b'\n') {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
            }
            if buf.is_empty() {
                continue;
            }
            batch_bytes += buf.len();
            batch.push(Line {
                number,
                data: std::mem::take(&mut buf),
            });
            if batch.len() >= self.batch_size || batch_bytes >= BATCH_DATA_BYTES {
                self.send(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.send(batch).await?;
        }
        Ok((self.published, self.failed))
    }

    async fn send(&mut self, batch: Vec<Line>) -> anyhow::Result<()> {
        let items: Vec<Value> = batch
            .iter()
            .map(|line| {
                let mut item = json!({
                    "channel": self.channel,
                    "idempotency_key": format!("{}:{}", self.keys, line.number),
                });
                match std::str::from_utf8(&line.data) {
                    Ok(text) => item["data"] = json!(text),
                    Err(_) => item["data_base64"] = json!(BASE64.encode(&line.data)),
                }
                if let Some(event) = self.event {
                    item["event"] = json!(event);
                }
                item
            })
            .collect();
        let body = serde_json::to_vec(&items).context("encoding the batch")?;
        let url = self.client.url(&["v1", "publish"]);
        let mut attempt = 0;
        let answer: Value = loop {
            let request = self
                .client
                .request(Method::POST, url.clone(), true)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            match self.client.send(request).await {
                Ok(response) => {
                    break response.json().await.context("reading the batch answer")?;
                }
                Err(e) => {
                    let retry = match &e {
                        Error::Server(s) if s.is_transient() && attempt < BATCH_RETRIES => {
                            Some(s.retry_after.unwrap_or(Duration::from_secs(1)))
                        }
                        _ => None,
                    };
                    let Some(wait) = retry else {
                        let first = batch.first().map_or(0, |l| l.number);
                        return Err(anyhow::Error::from(e).context(format!(
                            "{} messages published; the batch starting at line {first} was \
                             refused",
                            self.published
                        )));
                    };
                    attempt += 1;
                    self.progress.suspend(|| {
                        eprintln!("{e:#}; retrying in {}", humantime::format_duration(wait));
                    });
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let results = answer["results"]
            .as_array()
            .with_context(|| format!("the batch answer has no results: {answer}"))?;
        anyhow::ensure!(
            results.len() == batch.len(),
            "the batch answer has {} results for {} messages",
            results.len(),
            batch.len()
        );
        let mut ids = String::new();
        for (line, result) in batch.iter().zip(results) {
            if let Some(id) = result["id"].as_str() {
                ids.push_str(id);
                ids.push('\n');
                self.published += 1;
            } else {
                self.failed += 1;
                let code = result["error"]["code"].as_str().unwrap_or("unknown");
                let message = result["error"]["message"].as_str().unwrap_or("");
                self.progress
                    .suspend(|| eprintln!("line {}: {code}: {message}", line.number));
            }
        }
        self.progress
            .set_message(format!("{} published", self.published));
        self.progress.suspend(|| output::write(ids.as_bytes()))
    }
}
