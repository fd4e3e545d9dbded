//! What presence costs: N members (each its own subject, from its own token) join one
//! channel over WebSocket, then half of them leave, against the same connections to a channel
//! without presence.
//!
//! Every join goes to every member present when it happens, the new one included, so N
//! members joining deliver exactly N(N+1)/2 join frames whatever the order; when half leave,
//! each of the N/2 who stay hears N/2 leaves. The run waits for exactly those counts (and for
//! none without presence), so the times and the server CPU cover the whole work, and reads
//! the presence list in between.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wire::{self, Incoming, Server, TargetArgs};
use crate::wire::{payload, round1, round3, secs};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Members, each a WebSocket of its own subject.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Whether the channel keeps presence (off: the same connections, no members).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    presence: bool,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Presence pages read while everyone is in (`limit=1000`), for the query's latency.
    #[arg(long, default_value_t = 20)]
    queries: usize,
    /// Source addresses 127.0.0.2 and up to spread client sockets over.
    #[arg(long, default_value_t = 4)]
    source_ips: usize,
    /// How long each phase may take to deliver its frames.
    #[arg(long, default_value = "60s")]
    phase_timeout: humantime::Duration,
    /// Hard limit on the whole run, server start included.
    #[arg(long, default_value = "300s")]
    deadline: humantime::Duration,
    /// Worker threads of the load generator [default: one per CPU].
    #[arg(long)]
    client_threads: Option<usize>,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    presence: bool,
    members: usize,
    durability: String,
    server_env: Vec<String>,
    /// Every count below was exactly what the run waited for.
    complete: bool,
    /// From the first connect until every member had every join (without presence: until
    /// every connection was open).
    join_secs: f64,
    join_frames: u64,
    join_server_cpu_ms: Option<f64>,
    /// Server CPU per member that came in.
    join_server_cpu_us_per_member: Option<f64>,
    /// Server CPU per join frame delivered.
    join_server_cpu_us_per_frame: Option<f64>,
    /// The presence list (`GET .../presence?limit=1000`) while everyone is in.
    query_p50_ms: Option<f64>,
    query_max_ms: Option<f64>,
    query_subjects: Option<u64>,
    server_rss_bytes: u64,
    /// From the first close until every member who stayed had every leave.
    leave_secs: f64,
    leave_frames: u64,
    leave_server_cpu_ms: Option<f64>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    wire::run(args.client_threads, args.deadline.into(), run_async(args))
}

/// A secret for the tokens this run signs; the server it starts takes it.
const SECRET: &str = "presence-bench-secret-0123456789-abcdef";
const CHANNEL: &str = "bench-presence";

fn token(subject: &str, grants: serde_json::Value) -> anyhow::Result<String> {
    let claims = serde_json::json!({
        "sub": subject,
        "dormouse": grants,
        "info": {"name": format!("Member {subject}")},
    });
    Ok(dormouse_testkit::jwt(SECRET, 3600, claims))
}

/// Frames each member counted: presence events, and messages.
#[derive(Debug, Default)]
struct Counts {
    presence: AtomicU64,
    messages: AtomicU64,
    closed: AtomicU64,
}

async fn run_async(mut args: Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.members >= 2, "--members must be at least 2");
    let nofile_limit = wire::raise_nofile(args.members as u64 + 4096)?;
    anyhow::ensure!(
        nofile_limit >= args.members as u64 + 256,
        "the open-file limit is {nofile_limit}, too low for {} members",
        args.members
    );
    let env = &mut args.target.server.server_env;
    env.push(format!("DORMOUSE_AUTH_JWT_SECRET={SECRET}"));
    env.push(format!("DORMOUSE_CHANNELS_PRESENCE={}", args.presence));
    let mut server = Server::start(&args.target).await?;
    let client = wire::server::http_client()?;
    let everything = serde_json::json!({"subscribe": ["*"], "publish": ["*"]});
    let backend = token("backend", everything.clone())?;
    let publish_url = format!("{}/v1/channels/{CHANNEL}/messages", server.base_url());
    let publish = |text: &'static str| {
        let (client, url, backend) = (client.clone(), publish_url.clone(), backend.clone());
        async move {
            let res = client
                .post(url)
                .bearer_auth(backend)
                .body(text)
                .send()
                .await?;
            let status = res.status();
            anyhow::ensure!(
                status == 201,
                "publish answered {status}: {}",
                res.text().await?
            );
            anyhow::Ok(())
        }
    };
    publish("open").await?;
    let tokens: Vec<String> = (0..args.members)
        .map(|i| token(&format!("m{i:06}"), everything.clone()))
        .collect::<Result<_, _>>()?;
    let timeout = Duration::from(args.phase_timeout);
    let n = args.members as u64;

    // Join: every member connects and hears every join after (and with) its own.
    let counts: Vec<Arc<Counts>> = (0..args.members).map(|_| Arc::default()).collect();
    let (stop, stopped) = watch::channel(false);
    let cpu_before = server.cpu_secs()?;
    let started = payload::now_ns();
    let holders: Vec<(usize, JoinHandle<()>)> =
        wire::connect_all(args.members, args.connect_concurrency, |i| {
            let path = format!("/v1/channels/{CHANNEL}/ws?access_token={}", tokens[i]);
            let (addr, source, counts) = (
                server.addr,
                wire::source_ip(i, args.source_ips),
                counts[i].clone(),
            );
            let stopped = stopped.clone();
            async move {
                let client = wire::ws::WsClient::connect(addr, source, &path, 4096).await?;
                Ok((i, tokio::spawn(hold(client, counts, stopped))))
            }
        })
        .await?;
    let want_joins = if args.presence { n * (n + 1) / 2 } else { 0 };
    let total = |what: fn(&Counts) -> u64| -> u64 { counts.iter().map(|c| what(c)).sum() };
    let joined = wait_until(timeout, || {
        total(|c| c.presence.load(Ordering::Acquire)) >= want_joins
    })
    .await;
    let join_secs = secs(payload::now_ns() - started);
    let cpu_after_join = server.cpu_secs()?;
    let join_frames = total(|c| c.presence.load(Ordering::Acquire));
    let join_server_cpu_ms = cpu_ms(cpu_before, cpu_after_join);

    // The list while everyone is in.
    let (mut query_p50_ms, mut query_max_ms, mut query_subjects) = (None, None, None);
    if args.presence {
        let mut took = Vec::new();
        for _ in 0..args.queries {
            let at = payload::now_ns();
            let page: serde_json::Value = client
                .get(format!(
                    "{}/v1/channels/{CHANNEL}/presence?limit=1000",
                    server.base_url()
                ))
                .bearer_auth(&backend)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            took.push((payload::now_ns() - at) as f64 / 1e6);
            query_subjects = page["subjects"].as_u64();
        }
        took.sort_by(f64::total_cmp);
        query_p50_ms = took.get(took.len() / 2).map(|t| round3(*t));
        query_max_ms = took.last().map(|t| round3(*t));
    }
    server.check_alive()?;
    let server_rss_bytes = server.rss_bytes()?.unwrap_or(0);

    // Everyone is live: one message reaches all.
    publish("everyone").await?;
    let delivered = wait_until(timeout, || {
        total(|c| c.messages.load(Ordering::Acquire)) >= n
    })
    .await;

    // Leave: the first half closes; each of the others hears every one of them go.
    for c in &counts {
        c.presence.store(0, Ordering::Release);
    }
    let half = args.members / 2;
    let stayers = (args.members - half) as u64;
    let want_leaves = if args.presence {
        stayers * half as u64
    } else {
        0
    };
    let cpu_before_leave = server.cpu_secs()?;
    let leave_started = payload::now_ns();
    let mut staying = Vec::new();
    for (i, holder) in holders {
        if i < half {
            holder.abort();
        } else {
            staying.push((i, holder));
        }
    }
    let stayer_leaves = || -> u64 {
        counts[half..]
            .iter()
            .map(|c| c.presence.load(Ordering::Acquire))
            .sum()
    };
    let left = wait_until(timeout, || stayer_leaves() >= want_leaves).await;
    // Without presence there is nothing to wait for: give the closes a moment to land.
    if !args.presence {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let leave_secs = secs(payload::now_ns() - leave_started);
    let leave_server_cpu_ms = cpu_ms(cpu_before_leave, server.cpu_secs()?);
    let leave_frames = stayer_leaves();
    let _ = stop.send(true);
    for (_, holder) in staying {
        let _ = holder.await;
    }
    server.check_alive()?;
    let closed_early: u64 = counts[half..]
        .iter()
        .map(|c| c.closed.load(Ordering::Acquire))
        .sum();

    Ok(Report {
        scenario: "presence",
        presence: args.presence,
        members: args.members,
        durability: server.durability.clone(),
        server_env: server.env.clone(),
        complete: joined
            && delivered
            && left
            && closed_early == 0
            && join_frames == want_joins
            && leave_frames == want_leaves,
        join_secs: round3(join_secs),
        join_frames,
        join_server_cpu_ms,
        join_server_cpu_us_per_member: join_server_cpu_ms.map(|ms| round3(ms * 1000.0 / n as f64)),
        join_server_cpu_us_per_frame: join_server_cpu_ms
            .filter(|_| join_frames > 0)
            .map(|ms| round3(ms * 1000.0 / join_frames as f64)),
        query_p50_ms,
        query_max_ms,
        query_subjects,
        server_rss_bytes,
        leave_secs: round3(leave_secs),
        leave_frames,
        leave_server_cpu_ms,
    })
}

fn cpu_ms(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(round1((after? - before?) * 1000.0))
}

/// Polls `done` until it holds or `timeout` passes; whether it held.
async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    while !done() {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Keeps a member connected until told to stop, counting what it hears.
async fn hold(
    mut client: wire::ws::WsClient,
    counts: Arc<Counts>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            next = client.next() => match next {
                Ok(Some(Incoming::Message { .. })) => {
                    counts.messages.fetch_add(1, Ordering::Release);
                }
                Ok(Some(Incoming::Other)) => {
                    counts.presence.fetch_add(1, Ordering::Release);
                }
                Ok(Some(Incoming::Connected)) => {}
                Ok(None) | Err(_) => {
                    counts.closed.fetch_add(1, Ordering::Release);
                    return;
                }
            },
        }
    }
}
