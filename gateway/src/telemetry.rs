//! What the server counts about itself, kept once and shown two ways: Prometheus text at
//! `GET /metrics` (through a `metrics-exporter-prometheus` recorder owned by this server,
//! not a process-global one, so two servers in one process never mix their figures) and a
//! per-second series for the admin page.
//!
//! Hot-path figures are plain atomics here (the admin page reads them back, which the
//! `metrics` handles cannot do), kept per thread where every delivery writes them
//! (`sharded`); a scrape copies them into the recorder and renders. The runtime's namespace
//! counters are read at scrape time, never kept twice. Latencies go to fixed-bucket
//! histograms rendered next to the recorder's text and to a one-second window the sampler
//! turns into the admin page's chart. Channel names never become labels: they are
//! unbounded.

mod render;
mod sharded;
mod window;

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dormouse_actors::channel::ChannelObserver;
use dormouse_runtime::{Outlet, Transport};
use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::Serialize;
use tracing::debug;

use crate::busiest::Busiest;
use crate::connections::{ConnectionTable, Registration, Target};
use crate::hooks::Hooks;
use crate::hooks::occupancy::Occupant;
use crate::hooks::outbox::Record;

use render::{describe, register_counter, register_gauge};
use sharded::{Histogram, Sharded};
use window::LatencyWindow;
pub(crate) use window::Percentiles;

/// Upper bounds of the latency histograms' buckets, in seconds: from a group commit on a
/// fast disk (well under a millisecond) to a stalled one.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Seconds of per-second samples the admin page can chart.
const SERIES_SECONDS: usize = 300;

/// How often storage size is measured: it walks the data dir, so never per request.
pub(crate) const STORAGE_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The kinds of client connection, the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnKind {
    /// A TCP connection carrying HTTP/1.1 or h2c; every SSE stream and WebSocket rides on
    /// one, so they are counted here as well.
    Http = 0,
    /// A Server-Sent Events response.
    Sse = 1,
    /// A WebSocket (channel subscriber or object socket).
    Ws = 2,
}

impl ConnKind {
    const ALL: [ConnKind; 3] = [ConnKind::Http, ConnKind::Sse, ConnKind::Ws];

    fn label(self) -> &'static str {
        match self {
            ConnKind::Http => "http",
            ConnKind::Sse => "sse",
            ConnKind::Ws => "ws",
        }
    }
}

/// Gap reasons the channel sends; pre-registered so counting one is a lookup-free add.
const GAP_REASONS: [&str; 4] = ["trimmed", "epoch_changed", "unknown_id", "deleted"];

/// The server's own figures. One per server, shared by every connection and handler.
pub struct Telemetry {
    /// When the server started, for the admin page's uptime.
    started: Instant,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Identifies a connection across its "opened" and "closed" log lines.
    next_connection: AtomicU64,
    open: [AtomicU64; 3],
    opened: [AtomicU64; 3],
    /// Channel subscribers connected now (SSE and WebSocket).
    subscribers: AtomicU64,
    published: AtomicU64,
    published_bytes: AtomicU64,
    /// Messages written to subscriber connections, SSE then WebSocket.
    delivered: Sharded<[AtomicU64; 2]>,
    received_bytes: Sharded<AtomicU64>,
    sent_bytes: Sharded<AtomicU64>,
    slow_disconnects: [AtomicU64; 2],
    write_timeouts: AtomicU64,
    /// Last sampled size of the data dir; `u64::MAX` until the first sample.
    storage_bytes: AtomicU64,
    gaps: [Counter; 4],
    /// Rendered by hand rather than through the recorder, whose histograms take a
    /// shared, allocating append per observation: this one is observed on every delivery.
    delivery_latency: Histogram,
    delivery_window: Sharded<LatencyWindow>,
    commit_latency: Histogram,
    commit_window: Sharded<LatencyWindow>,
    /// The busiest channels by recent publishes; only kept when the admin page is on.
    busiest: Option<Busiest>,
    series: Mutex<Series>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("published", &self.published.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Per-second samples, newest last, and the totals the next one is a difference from.
#[derive(Debug, Default)]
struct Series {
    samples: VecDeque<Sample>,
    last_published: u64,
    last_delivered: u64,
    last_at: Option<Instant>,
}

/// One second of activity, as the admin page charts it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// When the second ended, in milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
    /// Messages stored per second.
    pub(crate) published_per_second: f64,
    /// Messages written to subscribers per second.
    pub(crate) delivered_per_second: f64,
    /// Publish-to-delivery latency of the messages delivered in that second.
    pub(crate) delivery: Percentiles,
    /// Storage commit latency of the commits that finished in that second.
    pub(crate) commit: Percentiles,
}

/// The live figures the admin page shows.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figures {
    pub(crate) connections: ConnectionFigures,
    pub(crate) subscribers: u64,
    pub(crate) published_total: u64,
    pub(crate) delivered_total: u64,
    pub(crate) received_bytes_total: u64,
    pub(crate) sent_bytes_total: u64,
    pub(crate) storage_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnectionFigures {
    pub(crate) http: u64,
    pub(crate) sse: u64,
    pub(crate) ws: u64,
}

impl Telemetry {
    /// A fresh set of figures; `busiest` keeps the top-N of busy channels (for the admin
    /// page, which is the only reader).
    pub(crate) fn new(busiest: bool) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        let gaps = GAP_REASONS.map(|reason| {
            register_counter(
                &recorder,
                "dormouse_gap_events_total",
                &[("reason", reason)],
            )
        });
        register_gauge(
            &recorder,
            "dormouse_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        Self {
            started: Instant::now(),
            recorder,
            handle,
            next_connection: AtomicU64::new(1),
            open: Default::default(),
            opened: Default::default(),
            subscribers: AtomicU64::new(0),
            published: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            delivered: Default::default(),
            received_bytes: Sharded::default(),
            sent_bytes: Sharded::default(),
            slow_disconnects: Default::default(),
            write_timeouts: AtomicU64::new(0),
            storage_bytes: AtomicU64::new(u64::MAX),
            gaps,
            delivery_latency: Histogram::new(LATENCY_BUCKETS),
            delivery_window: Sharded::default(),
            commit_latency: Histogram::new(LATENCY_BUCKETS),
            commit_window: Sharded::default(),
            busiest: busiest.then(Busiest::default),
            series: Mutex::default(),
        }
    }

    /// Counts a new connection and logs it; the returned guard counts and logs its end.
    /// `what` says what it is for (a peer address, a channel, an object) in the log only.
    pub(crate) fn connection_opened(
        self: &Arc<Self>,
        wire: ConnKind,
        subscriber: bool,
        what: &dyn fmt::Display,
    ) -> Connection {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.open[wire as usize].fetch_add(1, Ordering::Relaxed);
        self.opened[wire as usize].fetch_add(1, Ordering::Relaxed);
        if subscriber {
            self.subscribers.fetch_add(1, Ordering::Relaxed);
        }
        debug!(conn = id, transport = wire.label(), %what, "connection opened");
        Connection {
            telemetry: self.clone(),
            id,
            wire,
            subscriber,
            opened: Instant::now(),
            reason: "client_left",
            registration: None,
            hooked: None,
            occupants: Box::default(),
        }
    }

    /// `n` messages were written to a subscriber connection; `stamps` are the instants
    /// the live ones among them were accepted.
    pub(crate) fn delivered(
        &self,
        wire: ConnKind,
        n: u64,
        stamps: impl IntoIterator<Item = Instant>,
    ) {
        let index = usize::from(wire == ConnKind::Ws);
        self.delivered.local()[index].fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        let window = self.delivery_window.local();
        for accepted in stamps {
            let latency = now.saturating_duration_since(accepted);
            self.delivery_latency.record(latency);
            window.record(latency);
        }
    }

    /// A subscriber was cut off because its queue overflowed.
    pub(crate) fn slow_disconnect(&self, wire: ConnKind) {
        self.slow_disconnects[usize::from(wire == ConnKind::Ws)].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed because the client stopped reading.
    pub(crate) fn write_timeout(&self) {
        self.write_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes read from clients.
    pub(crate) fn received(&self, bytes: usize) {
        self.received_bytes.add(bytes as u64);
    }

    /// Bytes written to clients.
    pub(crate) fn sent(&self, bytes: usize) {
        self.sent_bytes.add(bytes as u64);
    }

    /// A request (or a WebSocket client's message) was refused with the JSON error `code`.
    pub(crate) fn rejected(&self, code: &'static str) {
        register_counter(
            &self.recorder,
            "dormouse_rejected_requests_total",
            &[("code", code)],
        )
        .increment(1);
    }

    /// One durability wait finished after `took`.
    pub(crate) fn commit(&self, took: Duration) {
        self.commit_latency.record(took);
        self.commit_window.local().record(took);
    }

    /// The data dir's latest measured size.
    pub(crate) fn set_storage_bytes(&self, bytes: u64) {
        self.storage_bytes.store(bytes, Ordering::Relaxed);
    }

    /// How long this server has been up.
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The busiest channels by publishes over the last few seconds, if tracked.
    pub(crate) fn busiest(&self) -> Option<&Busiest> {
        self.busiest.as_ref()
    }

    /// The figures the admin page shows now.
    pub(crate) fn figures(&self) -> Figures {
        let open = |w: ConnKind| self.open[w as usize].load(Ordering::Relaxed);
        let storage = self.storage_bytes.load(Ordering::Relaxed);
        Figures {
            connections: ConnectionFigures {
                http: open(ConnKind::Http),
                sse: open(ConnKind::Sse),
                ws: open(ConnKind::Ws),
            },
            subscribers: self.subscribers.load(Ordering::Relaxed),
            published_total: self.published.load(Ordering::Relaxed),
            delivered_total: self.delivered_total(),
            received_bytes_total: self.received_bytes.sum(),
            sent_bytes_total: self.sent_bytes.sum(),
            storage_bytes: (storage != u64::MAX).then_some(storage),
        }
    }

    fn delivered_total(&self) -> u64 {
        self.delivered
            .all()
            .flatten()
            .map(|d| d.load(Ordering::Relaxed))
            .sum()
    }

    /// The per-second samples, oldest first.
    pub(crate) fn series(&self) -> Vec<Sample> {
        self.lock_series().samples.iter().cloned().collect()
    }

    fn lock_series(&self) -> std::sync::MutexGuard<'_, Series> {
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called about once a second by the sampler: closes the current second's sample,
    /// advances the busiest-channel window, and lets the recorder do its upkeep.
    pub(crate) fn tick(&self) {
        let now = Instant::now();
        let published = self.published.load(Ordering::Relaxed);
        let delivered = self.delivered_total();
        let delivery = LatencyWindow::take_all(self.delivery_window.all());
        let commit = LatencyWindow::take_all(self.commit_window.all());
        {
            let mut series = self.lock_series();
            let seconds = series
                .last_at
                .map_or(1.0, |at| now.duration_since(at).as_secs_f64().max(0.001));
            let sample = Sample {
                at_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                published_per_second: (published - series.last_published) as f64 / seconds,
                delivered_per_second: (delivered - series.last_delivered) as f64 / seconds,
                delivery,
                commit,
            };
            series.last_published = published;
            series.last_delivered = delivered;
            series.last_at = Some(now);
            if series.samples.len() == SERIES_SECONDS {
                series.samples.pop_front();
            }
            series.samples.push_back(sample);
        }
        if let Some(busiest) = &self.busiest {
            busiest.tick();
        }
        self.handle.run_upkeep();
    }
}

impl ChannelObserver for Telemetry {
    fn published(&self, channel: &str, events: u64, bytes: u64) {
        self.published.fetch_add(events, Ordering::Relaxed);
        self.published_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(busiest) = &self.busiest {
            busiest.record(channel, events);
        }
    }

    fn gap_sent(&self, reason: &'static str) {
        match GAP_REASONS.iter().position(|r| *r == reason) {
            Some(index) => self.gaps[index].increment(1),
            None => register_counter(
                &self.recorder,
                "dormouse_gap_events_total",
                &[("reason", reason)],
            )
            .increment(1),
        }
    }
}

/// One open connection, counted while it lives. Dropping it counts and logs the close with
/// the last reason set (by default, the client left).
pub(crate) struct Connection {
    telemetry: Arc<Telemetry>,
    id: u64,
    wire: ConnKind,
    subscriber: bool,
    opened: Instant,
    reason: &'static str,
    /// Its entry in the connection table, for a client connection (SSE or WebSocket).
    registration: Option<Registration>,
    /// The hook owed this connection's disconnect, and what it is told.
    hooked: Option<Box<(Arc<Hooks>, Record)>>,
    /// Its places in its channels' occupancy counts, given up when it closes.
    occupants: Box<[Occupant]>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("wire", &self.wire)
            .finish()
    }
}

impl Connection {
    /// Why the connection ends, for the close log line (`slow_consumer`, `shutdown`, ...).
    pub(crate) fn ending(&mut self, reason: &'static str) {
        self.reason = reason;
    }

    /// Enters the connection in `table`, so backends can reach it (docs/API.md,
    /// "Connections"); it leaves the table when this guard drops. Returns its id, which the
    /// close log line carries too.
    pub(crate) fn register(
        &mut self,
        table: &Arc<ConnectionTable>,
        subject: Arc<str>,
        target: Target,
        transport: Transport,
        outlet: Outlet,
    ) -> String {
        let registration = table.register(subject, target, transport, outlet);
        let id = registration.id();
        self.registration = Some(registration);
        id
    }

    /// Owes `hooks` this connection's disconnect, sent (with the reason it ends for) when
    /// this guard drops.
    pub(crate) fn on_close(&mut self, hooks: Arc<Hooks>, record: Record) {
        self.hooked = Some(Box::new((hooks, record)));
    }

    /// Counts the connection in these channels' occupancy until it closes.
    pub(crate) fn occupying(&mut self, occupants: impl IntoIterator<Item = Occupant>) {
        let mut all = std::mem::take(&mut self.occupants).into_vec();
        all.extend(occupants);
        self.occupants = all.into_boxed_slice();
    }

    /// The connection's entry in the connection table, if it has one.
    pub(crate) fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    /// The server's figures, for what the connection counts as it goes.
    pub(crate) fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(hooked) = self.hooked.take() {
            let (hooks, record) = *hooked;
            hooks.send_disconnect(record, self.reason.to_string());
        }
        let t = &self.telemetry;
        t.open[self.wire as usize].fetch_sub(1, Ordering::Relaxed);
        if self.subscriber {
            t.subscribers.fetch_sub(1, Ordering::Relaxed);
        }
        debug!(
            conn = self.id,
            connection_id = self.registration.as_ref().map(Registration::id),
            transport = self.wire.label(),
            reason = self.reason,
            duration_ms = self.opened.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}
