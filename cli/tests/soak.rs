//! The soak in its short form: steady publishers and subscribers that keep dropping and
//! resuming (over SSE and WebSocket alternately) must never miss or repeat a message. The
//! long form, with memory over time: `cargo run --release -p dormouse-bench -- soak
//! --duration 2h`.

use std::path::PathBuf;
use std::time::Duration;

use dormouse_bench::soak::{Args, run};

#[tokio::test]
async fn churning_subscribers_miss_nothing_and_repeat_nothing() {
    let args = Args {
        duration: Duration::from_secs(8),
        channels: 2,
        rate: 40,
        subscribers: 4,
        size: 256,
        max_session: Duration::from_millis(1500),
        sample_every: Duration::from_secs(1),
        server_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_dormouse"))),
    };
    let report = run(args).await.expect("the soak ran");
    let text = serde_json::to_string_pretty(&report).unwrap();
    eprintln!("{text}");
    assert!(report.published > 300, "{text}");
    assert!(
        report.sessions > 2 * 4 * 2,
        "subscribers reconnected: {text}"
    );
    assert!(report.delivered > report.published, "{text}");
    assert!(report.ok, "{text}");
}
