//! The crash-safety harness in its short form: the real binary is killed with SIGKILL at
//! random moments under publish load and restarted on the same data dir; resuming SSE
//! consumers and the stored history must hold every acknowledged message exactly once, in
//! order. The long form: `cargo run --release -p dormouse-bench -- crash --cycles 50`.

use std::path::PathBuf;
use std::time::Duration;

use dormouse_bench::crash::{Args, run};

#[tokio::test]
async fn sigkill_under_publish_load_loses_no_acknowledged_message() {
    let args = Args {
        cycles: 4,
        channels: 2,
        publishers: 2,
        min_life: Duration::from_millis(150),
        max_life: Duration::from_millis(700),
        seed: None,
        durability: "always".to_string(),
        server_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_dormouse"))),
    };
    let report = run(args).await.expect("the harness ran");
    let text = serde_json::to_string_pretty(&report).unwrap();
    eprintln!("{text}");
    assert_eq!(report.kills, 4, "{text}");
    assert!(report.acknowledged > 0, "publishing happened: {text}");
    assert!(report.ok, "violations (rerun with this seed): {text}");
}
