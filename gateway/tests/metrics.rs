//! `GET /metrics` end to end: a real server, real SSE and WebSocket clients, and a scrape
//! parsed by a small Prometheus text parser, asserting that the specific figures moved by
//! exactly what the test did.

use dormouse_testkit as support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use dormouse_gateway::{ApiKeySettings, ByteSize};
use futures::StreamExt as _;
use serde_json::json;
use support::{PATIENCE, SseClient, TestServer, WsClient, error_of};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
struct Scrape {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parses Prometheus text format 0.0.4, failing on anything malformed: a sample whose
    /// family has no `# TYPE`, a bad name, bad quoting, a value that is not a number, or a
    /// histogram whose buckets are not cumulative.
    fn parse(text: &str) -> Self {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = || format!("line {}: {line:?}", n + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let keyword = parts.next().unwrap();
                let name = parts.next().unwrap_or_else(|| panic!("{}", at()));
                assert!(valid_name(name), "bad metric name at {}", at());
                if keyword == "TYPE" {
                    let kind = parts.next().unwrap_or_else(|| panic!("{}", at()));
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "unknown type at {}",
                        at()
                    );
                    assert!(
                        types.insert(name.to_string(), kind.to_string()).is_none(),
                        "TYPE twice at {}",
                        at()
                    );
                } else {
                    assert_eq!(keyword, "HELP", "unknown comment at {}", at());
                }
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|e| panic!("{e} at {}", at())));
        }
        let scrape = Self { types, samples };
        for sample in &scrape.samples {
            let family = scrape.family(&sample.name);
            let kind = scrape
                .types
                .get(family)
                .unwrap_or_else(|| panic!("{} has no TYPE", sample.name));
            if sample.name.ends_with("_total") {
                assert_eq!(kind, "counter", "{}", sample.name);
            }
            assert!(
                sample.value.is_finite() || sample.name.ends_with("_bucket"),
                "{sample:?}"
            );
        }
        for (name, kind) in &scrape.types {
            if kind == "histogram" {
                scrape.check_histogram(name);
            }
        }
        scrape
    }

    /// The family a sample belongs to (histograms add `_bucket`, `_sum`, `_count`).
    fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && self.types.get(base).is_some_and(|t| t == "histogram")
            {
                return base;
            }
        }
        name
    }

    fn check_histogram(&self, name: &str) {
        let bucket = format!("{name}_bucket");
        let mut bounds: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.name == bucket)
            .map(|s| {
                let le = &s.labels["le"];
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (bound, s.value)
            })
            .collect();
        if bounds.is_empty() {
            return;
        }
        bounds.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(
            bounds.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets are not cumulative: {bounds:?}"
        );
        assert_eq!(
            bounds.last().unwrap().0,
            f64::INFINITY,
            "{name} has no +Inf"
        );
        assert_eq!(
            bounds.last().unwrap().1,
            self.value(&format!("{name}_count"), &[]),
            "{name}: +Inf bucket != count"
        );
    }

    /// The value of the sample with exactly these labels; 0 when absent (a counter that
    /// never moved is not rendered).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map_or(0.0, |s| s.value)
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().ok_or("unterminated labels")?;
            match c {
                '}' if key.is_empty() => {
                    rest = &after[i + 1..];
                    break;
                }
                ',' if key.is_empty() => continue,
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err("label value must be quoted".into());
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().ok_or("unterminated label value")?.1 {
                            '"' => break,
                            '\\' => match chars.next().ok_or("dangling escape")?.1 {
                                'n' => value.push('\n'),
                                c @ ('\\' | '"') => value.push(c),
                                c => return Err(format!("bad escape \\{c}")),
                            },
                            c => value.push(c),
                        }
                    }
                    if !valid_name(&key) {
                        return Err(format!("bad label name {key:?}"));
                    }
                    if labels.insert(std::mem::take(&mut key), value).is_some() {
                        return Err("repeated label".into());
                    }
                }
                c => key.push(c),
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let raw = fields.next().ok_or("no value")?;
    let value = match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        raw => raw.parse().map_err(|e| format!("bad value {raw:?}: {e}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|e| format!("bad timestamp: {e}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

async fn scrape(server: &TestServer) -> Scrape {
    let res = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(&res.text().await.unwrap())
}

/// Scrapes until `ready` holds: figures recorded just after the bytes left (a WebSocket
/// delivery is counted once its flush returned) may trail what the client already read.
async fn scrape_until(server: &TestServer, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = scrape(server).await;
        if ready(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the figures never got there: {:#?}",
            s.samples
                .iter()
                .filter(|s| s.name.starts_with("dormouse_"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SSE: &[(&str, &str)] = &[("transport", "sse")];
const WS: &[(&str, &str)] = &[("transport", "ws")];
const HTTP: &[(&str, &str)] = &[("transport", "http")];

#[tokio::test]
async fn publishing_and_subscribing_over_sse_and_websocket_move_the_exact_figures() {
    let server = TestServer::start().await;
    let before = scrape_until(&server, |s| {
        s.value("dormouse_storage_size_bytes", &[]) > 0.0
    })
    .await;
    assert_eq!(before.value("dormouse_connections", SSE), 0.0);
    assert_eq!(before.value("dormouse_subscribers", &[]), 0.0);
    assert_eq!(
        before.types["dormouse_delivery_latency_seconds"],
        "histogram"
    );
    assert_eq!(before.types["dormouse_storage_commit_seconds"], "histogram");
    assert_eq!(
        before.value(
            "dormouse_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    let mut sse = SseClient::connect(&server, "/v1/channels/metered/events", None).await;
    let mut ws = WsClient::connect(&server, "/v1/channels/metered/ws").await;
    let open = scrape_until(&server, |s| s.value("dormouse_subscribers", &[]) == 2.0).await;
    assert_eq!(open.value("dormouse_connections", SSE), 1.0);
    assert_eq!(open.value("dormouse_connections", WS), 1.0);
    assert!(
        open.value("dormouse_connections", HTTP) >= 2.0,
        "SSE and WS ride on TCP"
    );
    for t in [SSE, WS] {
        assert_eq!(
            open.value("dormouse_connections_opened_total", t)
                - before.value("dormouse_connections_opened_total", t),
            1.0
        );
    }

    // Three over HTTP (11 payload bytes), one from the WebSocket client (4 bytes).
    let mut ids = Vec::new();
    for data in ["one", "two", "three"] {
        ids.push(server.publish("metered", data).await);
    }
    ws.send_json(json!({"type": "publish", "data": "four", "ref": 1}))
        .await;
    let mut ws_events = 0;
    while ws_events < 4 || ids.len() < 4 {
        let message = ws.next().await.expect("a websocket message");
        match message["type"].as_str() {
            Some("message") => ws_events += 1,
            Some("ack") => ids.push(message["id"].as_str().unwrap().to_string()),
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
    for id in &ids {
        assert_eq!(sse.next().await.unwrap().id.as_deref(), Some(id.as_str()));
    }

    let delta = |after: &Scrape, name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let after = scrape_until(&server, |s| {
        s.value("dormouse_deliveries_total", WS) - before.value("dormouse_deliveries_total", WS)
            >= 4.0
    })
    .await;
    assert_eq!(delta(&after, "dormouse_publishes_total", &[]), 4.0);
    assert_eq!(delta(&after, "dormouse_published_bytes_total", &[]), 15.0);
    assert_eq!(delta(&after, "dormouse_deliveries_total", SSE), 4.0);
    assert_eq!(delta(&after, "dormouse_deliveries_total", WS), 4.0);
    assert_eq!(
        delta(&after, "dormouse_delivery_latency_seconds_count", &[]),
        8.0,
        "one latency per live event per subscriber"
    );
    let latency_sum = delta(&after, "dormouse_delivery_latency_seconds_sum", &[]);
    assert!(
        latency_sum > 0.0 && latency_sum < 8.0 * PATIENCE.as_secs_f64(),
        "{latency_sum}"
    );
    assert!(
        delta(&after, "dormouse_storage_commit_seconds_count", &[]) >= 4.0,
        "every publish waited for a commit"
    );
    assert!(delta(&after, "dormouse_received_bytes_total", &[]) > 0.0);
    assert!(
        delta(&after, "dormouse_sent_bytes_total", &[]) > 0.0,
        "the events went out"
    );
    let channel = [("namespace", "channel")];
    assert_eq!(
        after.value(
            "dormouse_objects",
            &[("namespace", "channel"), ("state", "active")]
        ),
        1.0
    );
    assert!(after.value("dormouse_object_activations_total", &channel) >= 1.0);
    assert!(delta(&after, "dormouse_object_requests_total", &channel) >= 6.0);
    assert!(
        !after
            .samples
            .iter()
            .any(|s| s.labels.values().any(|v| v == "metered")),
        "channel names are never labels"
    );

    // Refusals are counted by their JSON code, whichever layer refused.
    let bad_name = server
        .client
        .post(server.url("/v1/channels/bad%20name/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad_name).await.1, "bad_channel_name");
    let unknown = server.client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(error_of(unknown).await.1, "not_found");
    ws.send_json(json!({"type": "nonsense", "ref": 2})).await;
    assert_eq!(ws.next().await.unwrap()["code"], "bad_message");

    // A cursor from the future gets a gap.
    let epoch = ids[0].split('-').next().unwrap();
    let mut resumed = SseClient::connect(
        &server,
        "/v1/channels/metered/events",
        Some(&format!("{epoch}-999")),
    )
    .await;
    assert_eq!(resumed.next().await.unwrap().event, "dormouse.gap");

    let rejected = |code| [("code", code)];
    let after = scrape_until(&server, |s| {
        s.value("dormouse_rejected_requests_total", &rejected("bad_message")) > 0.0
    })
    .await;
    for code in ["bad_channel_name", "not_found", "bad_message"] {
        assert_eq!(
            delta(&after, "dormouse_rejected_requests_total", &rejected(code)),
            1.0,
            "{code}"
        );
    }
    assert_eq!(
        delta(
            &after,
            "dormouse_gap_events_total",
            &[("reason", "unknown_id")]
        ),
        1.0
    );
    assert_eq!(after.value("dormouse_subscribers", &[]), 3.0);

    drop((sse, ws, resumed));
    let closed = scrape_until(&server, |s| s.value("dormouse_subscribers", &[]) == 0.0).await;
    assert_eq!(closed.value("dormouse_connections", SSE), 0.0);
    assert_eq!(closed.value("dormouse_connections", WS), 0.0);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_subscriber_cut_off_is_counted() {
    let server = TestServer::start_with(|s| {
        s.limits.subscriber_queue = ByteSize::kib(64);
    })
    .await;
    let res = server
        .client
        .get(server.url("/v1/channels/slow/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Not read until the socket buffers and the queue are full.
    let chunk = "x".repeat(512 * 1024);
    for _ in 0..24 {
        server.publish("slow", chunk.clone()).await;
    }
    let mut stream = res.bytes_stream();
    let mut tail = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(bytes)) = stream.next().await {
            tail.extend_from_slice(&bytes);
            let keep = tail.len().saturating_sub(4096);
            tail.drain(..keep);
        }
    })
    .await
    .expect("the slow subscriber is cut off");
    let tail = String::from_utf8_lossy(&tail);
    assert!(tail.contains("slow_consumer"), "{tail}");
    let after = scrape_until(&server, |s| s.value("dormouse_subscribers", &[]) == 0.0).await;
    assert_eq!(
        after.value("dormouse_slow_subscriber_disconnects_total", SSE),
        1.0
    );
    assert_eq!(after.value("dormouse_publishes_total", &[]), 24.0);
    server.stop().await;
}

#[tokio::test]
async fn with_auth_on_metrics_need_the_metrics_or_admin_capability() {
    let key = |name: &str, key: &str, metrics: bool, admin: bool| ApiKeySettings {
        publish: vec!["*".to_string()],
        admin,
        metrics,
        ..ApiKeySettings::new(name, key)
    };
    let server = TestServer::start_with(|s| {
        s.auth.api_keys = vec![
            key("prometheus", "prometheus-key-0123456789", true, false),
            key("publisher", "publisher-key-0123456789", false, false),
            key("operator", "operator-key-01234567890", false, true),
        ];
    })
    .await;
    let get = |key: Option<&'static str>| {
        let mut req = server.client.get(server.url("/metrics"));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let (status, code, _) = error_of(get(None).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "missing_credential"));
    let (status, code, message) =
        error_of(get(Some("publisher-key-0123456789")).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"), "{message}");
    assert!(message.contains("metrics"), "{message}");
    for key in ["prometheus-key-0123456789", "operator-key-01234567890"] {
        let res = get(Some(key)).await.unwrap();
        assert_eq!(res.status(), 200, "{key}");
        let scrape = Scrape::parse(&res.text().await.unwrap());
        assert_eq!(
            scrape.value(
                "dormouse_rejected_requests_total",
                &[("code", "missing_credential")]
            ),
            1.0
        );
        assert_eq!(
            scrape.value("dormouse_rejected_requests_total", &[("code", "forbidden")]),
            1.0
        );
    }
    server.stop().await;
}

#[test]
fn the_parser_refuses_malformed_text() {
    for bad in [
        "# TYPE x counter\nx{a=\"1\"} one\n",
        "# TYPE x counter\nx{a=1} 1\n",
        "# TYPE x counter\nx{a=\"1\" 1\n",
        "y 1\n",
        "# TYPE 9x gauge\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| Scrape::parse(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
    let ok = Scrape::parse("# TYPE x_total counter\nx_total{a=\"q\\\"\\n\",b=\"\"} 3 1700000000\n");
    assert_eq!(ok.value("x_total", &[("a", "q\"\n"), ("b", "")]), 3.0);
}
