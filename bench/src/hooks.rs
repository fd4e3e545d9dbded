//! What upstream hooks cost (docs/HOOKS.md): the latency a `connect` hook adds to a
//! WebSocket handshake, and a `message` hook's round trip, against a backend that answers
//! at once, on loopback.
//!
//! The backend runs in this process (an axum server answering `{}` to `connect` and
//! `disconnect`, and `{"reply": data}` to `message`), so its CPU counts as the client's; the
//! server's CPU is read from `/proc`. Handshakes are one at a time, in blocks alternating a
//! plain channel and a hooked one, so both see the same machine; a block ends only when
//! the hook has acknowledged its disconnects, so their cost is in its CPU. As a floor, the
//! same backend is called directly over HTTP from here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, Percentiles, Server, ServerArgs, TargetArgs, round3};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// WebSocket handshakes per kind (plain channel, hooked channel), in four blocks.
    #[arg(long, default_value_t = 2000)]
    connects: usize,
    /// Messages on one hook WebSocket, each waiting for its reply.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Messages kept waiting for their replies in the pipelined run.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Hard limit on the whole run, server start included.
    #[arg(long, default_value = "300s")]
    deadline: humantime::Duration,
    /// Worker threads of the load generator (and the backend) [default: one per CPU].
    #[arg(long)]
    client_threads: Option<usize>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    connects_per_kind: usize,
    /// Handshake (request to `101`) on a channel with no hook.
    connect_plain: Percentiles,
    /// Handshake on a channel whose hook takes `connect` and `disconnect`: the hook's call,
    /// and the disconnect record synced before the answer.
    connect_hooked: Percentiles,
    added_p50_us: i64,
    added_p99_us: i64,
    server_cpu_us_per_connect_plain: Option<f64>,
    server_cpu_us_per_connect_hooked: Option<f64>,
    /// One message at a time: send to reply.
    message_round_trip: Percentiles,
    server_cpu_us_per_message: Option<f64>,
    pipelined_window: usize,
    pipelined_messages_per_sec: f64,
    server_cpu_us_per_pipelined_message: Option<f64>,
    /// The same backend called directly from here: the HTTP floor under both.
    direct_http_call: Percentiles,
    hook_calls: u64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    wire::run(args.client_threads, args.deadline.into(), run_async(args))
}

const SECRET: &str = "bench-hook-secret-0123456789abcdefghij";

/// The backend: answers at once; counts what it received.
#[derive(Debug, Default)]
struct Backend {
    calls: AtomicU64,
    disconnects: AtomicU64,
}

async fn start_backend(backend: Arc<Backend>) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let backend = backend.clone();
            async move {
                backend.calls.fetch_add(1, Ordering::Relaxed);
                let event = headers
                    .get("dormouse-event")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                match event {
                    "message" => {
                        let call: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        serde_json::json!({"reply": call["data"]}).to_string()
                    }
                    "disconnect" => {
                        backend.disconnects.fetch_add(1, Ordering::Relaxed);
                        "{}".to_string()
                    }
                    _ => "{}".to_string(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new(3)?)
}

async fn run_async(args: Args) -> anyhow::Result<Report> {
    let backend = Arc::new(Backend::default());
    let url = start_backend(backend.clone()).await?;
    let config_dir = tempfile::tempdir()?;
    let config = config_dir.path().join("dormouse.toml");
    std::fs::write(
        &config,
        format!(
            "[[hooks]]\nname = \"bench\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n\
             channels = [\"hooked:*\"]\n"
        ),
    )?;
    let mut server_args = args.server.clone();
    server_args
        .server_env
        .push(format!("DORMOUSE_CONFIG={}", config.display()));
    let server = Server::start(&TargetArgs::from(server_args)).await?;
    let base = format!("ws://{}", server.addr);

    // Handshakes, in alternating blocks.
    let (mut plain, mut hooked) = (histogram()?, histogram()?);
    let (mut plain_cpu, mut hooked_cpu) = (Some(0.0), Some(0.0));
    let block = args.connects.div_ceil(2).max(1);
    for round in 0..4 {
        let is_hooked = round % 2 == 1;
        let (histogram, cpu) = if is_hooked {
            (&mut hooked, &mut hooked_cpu)
        } else {
            (&mut plain, &mut plain_cpu)
        };
        let path = if is_hooked {
            "/v1/channels/hooked:1/ws"
        } else {
            "/v1/channels/plain/ws"
        };
        let disconnects_before = backend.disconnects.load(Ordering::Relaxed);
        let before = server.cpu_secs()?;
        for _ in 0..block {
            let started = Instant::now();
            let (ws, _) = tokio_tungstenite::connect_async(format!("{base}{path}"))
                .await
                .with_context(|| format!("connecting to {path}"))?;
            histogram.record(started.elapsed().as_micros() as u64)?;
            drop(ws);
        }
        if is_hooked {
            // The block's disconnects are part of what a hooked connection costs.
            let until = Instant::now() + Duration::from_secs(30);
            while backend.disconnects.load(Ordering::Relaxed) < disconnects_before + block as u64
                && Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        *cpu = match (*cpu, before, server.cpu_secs()?) {
            (Some(total), Some(before), Some(after)) => Some(total + after - before),
            _ => None,
        };
    }
    let per_connect = |cpu: Option<f64>| cpu.map(|s| round3(s * 1e6 / (2 * block) as f64));

    // Messages: one at a time, then pipelined.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{base}/v1/hooks/bench/ws"))
        .await
        .context("connecting to the hook's WebSocket")?;
    let mut round_trip = histogram()?;
    let before = server.cpu_secs()?;
    for i in 0..args.messages {
        let started = Instant::now();
        ws.send(Message::text(format!("m{i}"))).await?;
        next_text(&mut ws).await?;
        round_trip.record(started.elapsed().as_micros() as u64)?;
    }
    let one_cpu = diff(before, server.cpu_secs()?);
    let before = server.cpu_secs()?;
    let started = Instant::now();
    let (mut sent, mut received) = (0, 0);
    while received < args.messages {
        while sent < args.messages && sent - received < args.window {
            ws.feed(Message::text(format!("p{sent}"))).await?;
            sent += 1;
        }
        ws.flush().await?;
        next_text(&mut ws).await?;
        received += 1;
    }
    let pipelined_secs = started.elapsed().as_secs_f64();
    let pipelined_cpu = diff(before, server.cpu_secs()?);
    drop(ws);

    // The floor: the backend over HTTP from here.
    let client = reqwest::Client::new();
    let mut direct = histogram()?;
    for i in 0..args.messages {
        let started = Instant::now();
        client
            .post(&url)
            .header("dormouse-event", "message")
            .body(serde_json::json!({"data": format!("d{i}")}).to_string())
            .send()
            .await?
            .bytes()
            .await?;
        direct.record(started.elapsed().as_micros() as u64)?;
    }

    let (plain_p, hooked_p) = (Percentiles::of(&plain), Percentiles::of(&hooked));
    Ok(Report {
        scenario: "hooks",
        connects_per_kind: 2 * block,
        added_p50_us: hooked_p.p50_us as i64 - plain_p.p50_us as i64,
        added_p99_us: hooked_p.p99_us as i64 - plain_p.p99_us as i64,
        connect_plain: plain_p,
        connect_hooked: hooked_p,
        server_cpu_us_per_connect_plain: per_connect(plain_cpu),
        server_cpu_us_per_connect_hooked: per_connect(hooked_cpu),
        message_round_trip: Percentiles::of(&round_trip),
        server_cpu_us_per_message: one_cpu.map(|s| round3(s * 1e6 / args.messages as f64)),
        pipelined_window: args.window,
        pipelined_messages_per_sec: round3(args.messages as f64 / pipelined_secs),
        server_cpu_us_per_pipelined_message: pipelined_cpu
            .map(|s| round3(s * 1e6 / args.messages as f64)),
        direct_http_call: Percentiles::of(&direct),
        hook_calls: backend.calls.load(Ordering::Relaxed),
    })
}

fn diff(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> anyhow::Result<String> {
    loop {
        match ws.next().await.context("the hook's WebSocket ended")?? {
            Message::Text(text) => {
                anyhow::ensure!(!text.contains("hook_failed"), "a hook call failed: {text}");
                return Ok(text.to_string());
            }
            Message::Close(frame) => anyhow::bail!("closed: {frame:?}"),
            _ => {}
        }
    }
}
