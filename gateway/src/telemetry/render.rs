//! Prometheus text: the recorder's metrics (described once, with `# HELP` lines), filled from
//! the figures `Telemetry` keeps at scrape time, and the hand-rendered latency histograms.

use std::sync::atomic::{AtomicU64, Ordering};

use dormouse_runtime::NamespaceStats;
use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::{ConnKind, Telemetry};

impl Telemetry {
    /// Prometheus text: copies the kept figures and the namespaces' counters into the
    /// recorder, then renders it.
    pub(crate) fn render(&self, namespaces: &[(String, NamespaceStats)]) -> String {
        let r = &self.recorder;
        for wire in ConnKind::ALL {
            let labels = [("transport", wire.label())];
            register_gauge(r, "dormouse_connections", &labels)
                .set(self.open[wire as usize].load(Ordering::Relaxed) as f64);
            register_counter(r, "dormouse_connections_opened_total", &labels)
                .absolute(self.opened[wire as usize].load(Ordering::Relaxed));
        }
        for (index, wire) in [ConnKind::Sse, ConnKind::Ws].into_iter().enumerate() {
            let labels = [("transport", wire.label())];
            register_counter(r, "dormouse_deliveries_total", &labels).absolute(
                self.delivered
                    .all()
                    .map(|d| d[index].load(Ordering::Relaxed))
                    .sum(),
            );
            register_counter(r, "dormouse_slow_subscriber_disconnects_total", &labels)
                .absolute(self.slow_disconnects[index].load(Ordering::Relaxed));
        }
        let plain = |name: &'static str, value: &AtomicU64| {
            register_counter(r, name, &[]).absolute(value.load(Ordering::Relaxed));
        };
        plain("dormouse_publishes_total", &self.published);
        plain("dormouse_published_bytes_total", &self.published_bytes);
        register_counter(r, "dormouse_received_bytes_total", &[])
            .absolute(self.received_bytes.sum());
        register_counter(r, "dormouse_sent_bytes_total", &[]).absolute(self.sent_bytes.sum());
        plain("dormouse_write_timeouts_total", &self.write_timeouts);
        register_gauge(r, "dormouse_subscribers", &[])
            .set(self.subscribers.load(Ordering::Relaxed) as f64);
        let storage = self.storage_bytes.load(Ordering::Relaxed);
        if storage != u64::MAX {
            register_gauge(r, "dormouse_storage_size_bytes", &[]).set(storage as f64);
        }
        for (namespace, stats) in namespaces {
            let ns = [("namespace", namespace.as_str())];
            for (state, value) in [("active", stats.active), ("hibernated", stats.hibernated)] {
                register_gauge(
                    r,
                    "dormouse_objects",
                    &[("namespace", namespace.as_str()), ("state", state)],
                )
                .set(value as f64);
            }
            for (name, value) in [
                ("dormouse_object_activations_total", stats.activations_total),
                ("dormouse_object_wakes_total", stats.wakes_total),
                (
                    "dormouse_object_hibernations_total",
                    stats.hibernations_total,
                ),
                ("dormouse_object_failures_total", stats.failures_total),
                ("dormouse_object_requests_total", stats.requests_total),
                (
                    "dormouse_object_evictions_declined_total",
                    stats.evictions_declined_total,
                ),
            ] {
                register_counter(r, name, &ns).absolute(value);
            }
        }
        let mut text = self.handle.render();
        self.delivery_latency.render(
            "dormouse_delivery_latency_seconds",
            "From a publish being accepted by its channel to the event being written to a subscriber connection (live events only).",
            &mut text,
        );
        self.commit_latency.render(
            "dormouse_storage_commit_seconds",
            "How long a handler's writes waited to become durable (the group commit) before its outputs were released.",
            &mut text,
        );
        text
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

fn labels(labels: &[(&'static str, &str)]) -> Vec<Label> {
    labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect()
}

pub(super) fn register_counter(
    recorder: &PrometheusRecorder,
    name: &'static str,
    pairs: &[(&'static str, &str)],
) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels(pairs)), &metadata())
}

pub(super) fn register_gauge(
    recorder: &PrometheusRecorder,
    name: &'static str,
    pairs: &[(&'static str, &str)],
) -> Gauge {
    recorder.register_gauge(&Key::from_parts(name, labels(pairs)), &metadata())
}

/// `# HELP` lines: every metric says what it counts (docs/OPERATIONS.md has the full list).
pub(super) fn describe(r: &PrometheusRecorder) {
    let gauges: &[(&'static str, Option<Unit>, &'static str)] = &[
        (
            "dormouse_connections",
            None,
            "Open client connections by transport (http: TCP connections, which also carry the sse and ws ones).",
        ),
        (
            "dormouse_subscribers",
            None,
            "Channel subscribers connected now (SSE and WebSocket).",
        ),
        (
            "dormouse_objects",
            None,
            "Objects per namespace that are active (in memory) or hibernated (in this process).",
        ),
        (
            "dormouse_storage_size_bytes",
            Some(Unit::Bytes),
            "Size of the data dir on disk, sampled every 10 s.",
        ),
        (
            "dormouse_build_info",
            None,
            "Always 1; the version label says which build is running.",
        ),
    ];
    for (name, unit, help) in gauges {
        r.describe_gauge((*name).into(), *unit, (*help).into());
    }
    let counters: &[(&'static str, Option<Unit>, &'static str)] = &[
        (
            "dormouse_connections_opened_total",
            None,
            "Client connections opened, by transport.",
        ),
        (
            "dormouse_publishes_total",
            None,
            "Messages stored in channels (idempotent duplicates excluded).",
        ),
        (
            "dormouse_published_bytes_total",
            Some(Unit::Bytes),
            "Payload bytes of the messages stored in channels.",
        ),
        (
            "dormouse_deliveries_total",
            None,
            "Messages (events and control messages) written to subscriber connections, by transport.",
        ),
        (
            "dormouse_received_bytes_total",
            Some(Unit::Bytes),
            "Bytes read from client connections.",
        ),
        (
            "dormouse_sent_bytes_total",
            Some(Unit::Bytes),
            "Bytes written to client connections.",
        ),
        (
            "dormouse_slow_subscriber_disconnects_total",
            None,
            "Subscribers cut off because their queue overflowed, by transport.",
        ),
        (
            "dormouse_write_timeouts_total",
            None,
            "Connections closed because the client stopped reading (limits.write_timeout).",
        ),
        (
            "dormouse_gap_events_total",
            None,
            "Gap notices sent to subscribers, by reason.",
        ),
        (
            "dormouse_rejected_requests_total",
            None,
            "Requests and WebSocket client messages refused, by JSON error code.",
        ),
        (
            "dormouse_object_activations_total",
            None,
            "Object activations (cold starts and wakes), by namespace.",
        ),
        (
            "dormouse_object_wakes_total",
            None,
            "Activations of objects that had hibernated in this process, by namespace.",
        ),
        (
            "dormouse_object_hibernations_total",
            None,
            "Activations that ended by idling out, by namespace.",
        ),
        (
            "dormouse_object_failures_total",
            None,
            "Handler or activation failures, by namespace.",
        ),
        (
            "dormouse_object_requests_total",
            None,
            "Requests delivered to objects, by namespace.",
        ),
        (
            "dormouse_object_evictions_declined_total",
            None,
            "Activations asked to hibernate early (past max_active) that declined (working or asked to stay awake), by namespace.",
        ),
    ];
    for (name, unit, help) in counters {
        r.describe_counter((*name).into(), *unit, (*help).into());
    }
}
