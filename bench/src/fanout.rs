//! Fan-out over the wire: N subscribers on one channel, M messages published over HTTP (or
//! RESP, for the Redis yardstick). Measures deliveries per second, publish-to-delivery
//! latency, and checks that every subscriber got every message exactly once, in one order.
//!
//! Each payload carries its send time and index (see `wire::payload`); publishers and
//! subscribers share one clock, so latency is receive time minus send time, from before the
//! publish request leaves to after the subscriber read the frame.
//!
//! The subscribers share a multi-thread runtime (`--client-threads` workers); the publishers
//! have a thread and runtime of their own, so their pace follows the server's
//! acknowledgements and not the subscribers' place in a run queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::wire::{
    self, Incoming, Kind, Percentiles, Publisher, Server, Subscriber, TargetArgs, Transport,
    micros, payload, round1, round3, secs,
};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Subscribers on the channel.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Bytes per message (at least 32: the send time and the index travel in the payload).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per second, spread over the publishers; 0 publishes as fast as
    /// acknowledgements come back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Concurrent publishers; each waits for its acknowledgement before its next publish.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// How dormouse subscribers connect (Redis subscribers speak RESP).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// The channel.
    #[arg(long, default_value = "bench-fanout")]
    channel: String,
    /// Channels each subscriber follows on its one connection: the published channel and
    /// this many minus one that stay quiet (`{channel}-quiet-{n}`), listed first, so that an
    /// event stream's cursor ends with the published channel's position.
    #[arg(long, default_value_t = 1)]
    channels_per_connection: usize,
    /// Connections opened at once while subscribing.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Spread subscribers over this many source addresses from 127.0.0.2 (0: let the kernel
    /// choose 127.0.0.1).
    #[arg(long, default_value_t = 0)]
    source_ips: usize,
    /// Read buffer per subscriber, bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    read_buffer: usize,
    /// How long deliveries may trail the last acknowledgement before missing ones count as
    /// lost.
    #[arg(long, default_value = "30s")]
    drain_timeout: humantime::Duration,
    /// Hard limit on the whole run, server start included.
    #[arg(long, default_value = "120s")]
    deadline: humantime::Duration,
    /// Worker threads of the load generator's subscribers (the publishers have one more
    /// thread of their own) [default: one per CPU].
    #[arg(long)]
    client_threads: Option<usize>,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    target: Kind,
    transport: &'static str,
    durability: String,
    server_env: Vec<String>,
    subscribers: usize,
    channels_per_connection: usize,
    messages: u64,
    size: usize,
    rate: f64,
    publishers: usize,
    client_threads: usize,
    /// Every subscriber got every acknowledged message exactly once, all in the same order
    /// (and, for dormouse, with consecutive sequence numbers); nothing failed.
    complete: bool,
    published: u64,
    publish_errors: u64,
    first_publish_error: Option<String>,
    publish_secs: f64,
    publishes_per_sec: f64,
    publish_ack: Percentiles,
    deliveries: u64,
    expected_deliveries: u64,
    missing_deliveries: u64,
    duplicate_deliveries: u64,
    bad_payloads: u64,
    subscribers_complete: usize,
    subscribers_closed_early: usize,
    subscriber_errors: Vec<String>,
    control_messages: u64,
    /// Deliveries whose dormouse sequence number did not follow the previous one.
    sequence_breaks: u64,
    /// With one publisher: deliveries whose index was lower than the previous one's.
    index_regressions: u64,
    /// Subscribers that got every message, but in another order than the first of them.
    order_disagreements: usize,
    /// From the first publish to the last delivery.
    window_secs: f64,
    deliveries_per_sec: f64,
    delivered_mib_per_sec: f64,
    latency: Percentiles,
    /// Per message, its first delivery to any subscriber: the time before the fan-out
    /// starts (publish, durable append). Only when `complete` (then every subscriber's n-th
    /// delivery is the same message); empty otherwise.
    message_first: Percentiles,
    /// Per message, its last delivery: how long the whole fan-out of one message takes, which
    /// is what sets the tail of `latency`. Only when `complete`.
    message_last: Percentiles,
    server_rss_before_bytes: Option<u64>,
    server_rss_connected_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    server_peak_rss_bytes: Option<u64>,
    /// CPU used from the first publish to the end of the deliveries, by the server and by this
    /// load generator: on a small machine they share the cores, so both matter.
    server_cpu_secs: Option<f64>,
    client_cpu_secs: f64,
    /// CPU the rest of the machine used meanwhile (other processes, the kernel's own work such
    /// as journaling after fsyncs), within about a second (per-process and machine-wide tick
    /// accounting differ): well above that means the figures were taken on a busy machine.
    other_cpu_secs: f64,
    connect_secs: f64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<Report> {
    wire::run(args.client_threads, args.deadline.into(), run_async(args))
}

/// What every subscriber task checks against.
#[derive(Debug)]
struct Shared {
    messages: u64,
    size: usize,
    /// Unique valid deliveries so far, over all subscribers.
    delivered: AtomicU64,
    /// Subscriber tasks that have ended.
    finished: AtomicUsize,
}

async fn run_async(args: Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.size >= payload::HEADER_LEN,
        "--size must be at least {} bytes",
        payload::HEADER_LEN
    );
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    wire::raise_nofile(args.subscribers as u64 + args.publishers as u64 + 1024)?;
    let mut server = Server::start(&args.target).await?;
    let client_threads = args
        .client_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let server_rss_before_bytes = server.rss_bytes()?;

    let connect_started = payload::now_ns();
    let follows: Vec<String> = (1..args.channels_per_connection)
        .map(|n| format!("{}-quiet-{n}", args.channel))
        .chain(std::iter::once(args.channel.clone()))
        .collect();
    let subscribers = wire::connect_all(args.subscribers, args.connect_concurrency, |i| {
        let source = wire::source_ip(i, args.source_ips);
        Subscriber::connect_many(&server, args.transport, &follows, source, args.read_buffer)
    })
    .await?;
    let connect_secs = secs(payload::now_ns() - connect_started);
    let server_rss_connected_bytes = server.rss_bytes()?;

    let shared = Arc::new(Shared {
        messages: args.messages,
        size: args.size,
        delivered: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
    });
    let (stop, stopped) = watch::channel(false);
    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|s| tokio::spawn(receive(s, shared.clone(), stopped.clone())))
        .collect();

    let cpu = server.cpu_meter()?;
    let plan = Arc::new(Plan {
        messages: args.messages,
        size: args.size,
        rate: args.rate,
        next: AtomicU64::new(0),
        start_ns: payload::now_ns(),
    });
    let sent = publish_apart(
        server.kind,
        server.addr,
        args.channel.clone(),
        args.publishers,
        plan.clone(),
    )
    .await?;
    let publish_secs = secs(payload::now_ns() - plan.start_ns);
    let published: u64 = sent.iter().map(|s| s.acks).sum();

    // Wait for the deliveries the acknowledged messages owe, or for every subscriber to end.
    let expected = published * args.subscribers as u64;
    let drain_until = tokio::time::Instant::now() + Duration::from(args.drain_timeout);
    while shared.delivered.load(Ordering::Acquire) < expected
        && shared.finished.load(Ordering::Acquire) < args.subscribers
        && tokio::time::Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let usage = cpu.stop(&server)?;
    let _ = stop.send(true);
    let mut received = Vec::with_capacity(receivers.len());
    for task in receivers {
        received.push(task.await?);
    }
    server.check_alive()?;
    let server_rss_after_bytes = server.rss_bytes()?;
    let server_peak_rss_bytes = server.peak_rss_bytes()?;

    let mut publish_ack = Histogram::<u64>::new(3)?;
    let mut first_publish_error = None;
    for s in &sent {
        for &us in &s.ack_us {
            publish_ack.record(u64::from(us))?;
        }
        if first_publish_error.is_none() {
            first_publish_error.clone_from(&s.first_error);
        }
    }
    let first_sent_ns = sent.iter().map(|s| s.first_sent_ns).min().unwrap_or(0);
    let publish_errors: u64 = sent.iter().map(|s| s.errors).sum();

    let mut latency = Histogram::<u64>::new(3)?;
    let reference = received
        .iter()
        .find(|r| r.unique == published)
        .map(|r| r.order_hash);
    let mut deliveries = 0;
    let mut duplicate_deliveries = 0;
    let mut bad_payloads = 0;
    let mut control_messages = 0;
    let mut sequence_breaks = 0;
    let mut index_regressions = 0;
    let mut subscribers_complete = 0;
    let mut subscribers_closed_early = 0;
    let mut order_disagreements = 0;
    let mut subscriber_errors = Vec::new();
    let mut last_delivery_ns = first_sent_ns;
    for r in &received {
        for &us in &r.latency_us {
            latency.record(u64::from(us))?;
        }
        deliveries += r.unique;
        duplicate_deliveries += r.duplicates;
        bad_payloads += r.bad;
        control_messages += r.controls;
        sequence_breaks += r.sequence_breaks;
        index_regressions += r.index_regressions;
        last_delivery_ns = last_delivery_ns.max(r.last_delivery_ns);
        subscribers_closed_early += usize::from(r.closed);
        if r.unique == published && Some(r.order_hash) != reference {
            order_disagreements += 1;
        }
        if r.unique == published && r.duplicates == 0 && r.bad == 0 && r.sequence_breaks == 0 {
            subscribers_complete += 1;
        }
        if let Some(e) = &r.error
            && subscriber_errors.len() < 5
        {
            subscriber_errors.push(e.clone());
        }
    }
    // Only one publisher fixes the order messages are sent in, so only then may the index
    // order be checked against it; with several, agreement between subscribers is the check.
    if args.publishers > 1 {
        index_regressions = 0;
    }
    let complete = published == args.messages
        && publish_errors == 0
        && subscribers_complete == args.subscribers
        && order_disagreements == 0
        && index_regressions == 0;
    let (message_first, message_last) = if complete {
        per_message_extremes(&received)?
    } else {
        (Histogram::new(3)?, Histogram::new(3)?)
    };
    let window_secs = secs(last_delivery_ns.saturating_sub(first_sent_ns));
    let per_sec = |n: f64| {
        if window_secs > 0.0 {
            n / window_secs
        } else {
            0.0
        }
    };
    Ok(Report {
        scenario: "fanout",
        target: server.kind,
        transport: wire::transport_name(server.kind, args.transport),
        durability: server.durability.clone(),
        server_env: server.env.clone(),
        subscribers: args.subscribers,
        channels_per_connection: args.channels_per_connection,
        messages: args.messages,
        size: args.size,
        rate: args.rate,
        publishers: args.publishers,
        client_threads,
        complete,
        published,
        publish_errors,
        first_publish_error,
        publish_secs: round3(publish_secs),
        publishes_per_sec: round1(published as f64 / publish_secs),
        publish_ack: Percentiles::of(&publish_ack),
        deliveries,
        expected_deliveries: expected,
        missing_deliveries: expected.saturating_sub(deliveries),
        duplicate_deliveries,
        bad_payloads,
        subscribers_complete,
        subscribers_closed_early,
        subscriber_errors,
        control_messages,
        sequence_breaks,
        index_regressions,
        order_disagreements,
        window_secs: round3(window_secs),
        deliveries_per_sec: round1(per_sec(deliveries as f64)),
        delivered_mib_per_sec: round1(per_sec((deliveries * args.size as u64) as f64) / 1048576.0),
        latency: Percentiles::of(&latency),
        message_first: Percentiles::of(&message_first),
        message_last: Percentiles::of(&message_last),
        server_rss_before_bytes,
        server_rss_connected_bytes,
        server_rss_after_bytes,
        server_peak_rss_bytes,
        server_cpu_secs: usage.server,
        client_cpu_secs: usage.client,
        other_cpu_secs: usage.other,
        connect_secs: round3(connect_secs),
    })
}

/// The earliest and the latest delivery of each message, over all subscribers. Call only
/// for a complete run: every subscriber then holds one sample per message, in one order.
fn per_message_extremes(received: &[Received]) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let messages = received.first().map_or(0, |r| r.latency_us.len());
    let mut first = vec![u32::MAX; messages];
    let mut last = vec![0; messages];
    for r in received {
        for ((&us, first), last) in r.latency_us.iter().zip(&mut first).zip(&mut last) {
            *first = (*first).min(us);
            *last = (*last).max(us);
        }
    }
    let mut first_histogram = Histogram::new(3)?;
    let mut last_histogram = Histogram::new(3)?;
    for (first, last) in first.into_iter().zip(last) {
        first_histogram.record(u64::from(first))?;
        last_histogram.record(u64::from(last))?;
    }
    Ok((first_histogram, last_histogram))
}

/// The publishing schedule, shared by the publishers: each takes the next index and, with a
/// rate, waits for its slot.
#[derive(Debug)]
struct Plan {
    messages: u64,
    size: usize,
    rate: f64,
    next: AtomicU64,
    start_ns: u64,
}

#[derive(Debug)]
struct Sent {
    acks: u64,
    errors: u64,
    first_error: Option<String>,
    ack_us: Vec<u32>,
    first_sent_ns: u64,
}

/// Runs the publishers on a thread and runtime of their own and returns what each sent.
///
/// Sharing the subscribers' runtime, a publisher whose acknowledgement had arrived waited in
/// the run queue behind up to a thousand subscriber tasks reading the last message, so the
/// publishing pace followed the load generator's scheduling rather than the server's
/// acknowledgements: against Redis and Dormouse alike, the acknowledgement p50 came out the
/// same 3.5 ms.
async fn publish_apart(
    kind: wire::Kind,
    addr: std::net::SocketAddr,
    channel: String,
    publishers: usize,
    plan: Arc<Plan>,
) -> anyhow::Result<Vec<Sent>> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("publishers".into())
        .spawn(move || {
            let run = || -> anyhow::Result<Vec<Sent>> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let client = wire::server::http_client()?;
                    let mut sending = Vec::with_capacity(publishers);
                    for _ in 0..publishers {
                        let publisher =
                            Publisher::connect_to(kind, addr, &client, &channel).await?;
                        sending.push(tokio::spawn(publish(publisher, plan.clone())));
                    }
                    let mut sent = Vec::with_capacity(sending.len());
                    for task in sending {
                        sent.push(task.await?);
                    }
                    Ok(sent)
                })
            };
            let _ = done.send(run());
        })?;
    outcome
        .await
        .map_err(|_| anyhow::anyhow!("the publishers' thread ended without an answer"))?
}

async fn publish(mut publisher: Publisher, plan: Arc<Plan>) -> Sent {
    let mut sent = Sent {
        acks: 0,
        errors: 0,
        first_error: None,
        ack_us: Vec::new(),
        first_sent_ns: u64::MAX,
    };
    loop {
        let index = plan.next.fetch_add(1, Ordering::Relaxed);
        if index >= plan.messages {
            return sent;
        }
        if plan.rate > 0.0 {
            let due = plan.start_ns + (index as f64 * 1e9 / plan.rate) as u64;
            let now = payload::now_ns();
            if due > now {
                tokio::time::sleep(Duration::from_nanos(due - now)).await;
            }
        }
        let sent_ns = payload::now_ns();
        sent.first_sent_ns = sent.first_sent_ns.min(sent_ns);
        match publisher
            .publish(payload::encode(plan.size, sent_ns, index))
            .await
        {
            Ok(()) => {
                sent.acks += 1;
                sent.ack_us.push(micros(payload::now_ns() - sent_ns));
            }
            Err(e) => {
                sent.errors += 1;
                sent.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

/// One subscriber's account of what it received.
#[derive(Debug)]
struct Received {
    /// Distinct valid messages.
    unique: u64,
    duplicates: u64,
    bad: u64,
    controls: u64,
    sequence_breaks: u64,
    index_regressions: u64,
    /// A hash of the indices in arrival order: equal across subscribers iff they saw the same
    /// order.
    order_hash: u64,
    latency_us: Vec<u32>,
    last_delivery_ns: u64,
    /// The server ended the subscription before every message arrived.
    closed: bool,
    error: Option<String>,
    /// Which indices arrived, one bit each.
    seen: Vec<u64>,
    last_seq: Option<u64>,
    last_index: Option<u64>,
}

impl Received {
    fn new(messages: u64) -> Self {
        Self {
            unique: 0,
            duplicates: 0,
            bad: 0,
            controls: 0,
            sequence_breaks: 0,
            index_regressions: 0,
            order_hash: 0xcbf2_9ce4_8422_2325,
            latency_us: Vec::with_capacity(messages as usize),
            last_delivery_ns: 0,
            closed: false,
            error: None,
            seen: vec![0; messages.div_ceil(64) as usize],
            last_seq: None,
            last_index: None,
        }
    }

    fn record(&mut self, shared: &Shared, seq: Option<u64>, data: &[u8]) {
        let now = payload::now_ns();
        let Some((sent_ns, index)) = payload::decode(data)
            .filter(|&(_, index)| data.len() == shared.size && index < shared.messages)
        else {
            self.bad += 1;
            return;
        };
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        self.latency_us.push(micros(now.saturating_sub(sent_ns)));
        self.last_delivery_ns = now;
        // FNV-1a over the index.
        self.order_hash = (self.order_hash ^ index).wrapping_mul(0x0100_0000_01b3);
        if let (Some(seq), Some(last)) = (seq, self.last_seq)
            && seq != last + 1
        {
            self.sequence_breaks += 1;
        }
        if self.last_index.is_some_and(|last| index < last) {
            self.index_regressions += 1;
        }
        self.last_seq = seq.or(self.last_seq);
        self.last_index = Some(index);
    }
}

async fn receive(
    mut subscriber: Subscriber,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut received = Received::new(shared.messages);
    // One wait for the whole loop: a fresh `changed()` per message registered on, and
    // unregistered from, the watch's shared waiter list every time, ~9% of the client's CPU.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    while received.unique < shared.messages {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            next = subscriber.next() => match next {
                Ok(Some(Incoming::Message { seq, data })) => received.record(&shared, seq, data),
                Ok(Some(Incoming::Other)) => received.controls += 1,
                Ok(Some(Incoming::Connected)) => {}
                Ok(None) => {
                    received.closed = true;
                    break;
                }
                Err(e) => {
                    received.error = Some(format!("{e:#}"));
                    break;
                }
            },
        }
    }
    shared.finished.fetch_add(1, Ordering::Release);
    received.seen = Vec::new();
    received
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_gets_its_earliest_and_latest_delivery() {
        let mut a = Received::new(3);
        a.latency_us = vec![100, 900, 50];
        let mut b = Received::new(3);
        b.latency_us = vec![300, 200, 70];
        let (first, last) = per_message_extremes(&[a, b]).unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!((first.min(), first.max()), (50, 200));
        assert_eq!((last.min(), last.max()), (70, 900));
        assert_eq!(last.value_at_quantile(0.5), 300);
    }
}
