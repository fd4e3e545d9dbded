//! The JavaScript client (`clients/js`) against the real server: its own tests, in Node's
//! test runner, start this crate's `dormouse` binary (restarting it, cutting its network,
//! expiring tokens) and talk to it only through the library, as an app does.

use std::path::Path;
use std::process::Command;

/// `node` and the flags its WebSocket needs: Node 22 has one built in, Node 20 behind
/// `--experimental-websocket`.
fn node() -> (String, Vec<&'static str>) {
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".to_string());
    let probe = Command::new(&node)
        .args(["-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the JavaScript client's tests need Node.js 20 or later ({node}: {e}); install \
                 it (apt-get install -y nodejs) or name it with NODE=/path/to/node"
            )
        });
    let flags = if probe.status.success() {
        vec![]
    } else {
        vec!["--experimental-websocket"]
    };
    (node, flags)
}

#[test]
fn the_javascript_client_passes_its_tests_against_the_server() {
    let (node, mut args) = node();
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    args.extend(["--test", "--test-reporter=spec", "test/"]);
    let output = Command::new(&node)
        .args(&args)
        .current_dir(&clients)
        .env("DORMOUSE_BIN", env!("CARGO_BIN_EXE_dormouse"))
        .output()
        .expect("run node --test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "node --test failed:\n{text}");
    // Not vacuous: the runner found and ran the tests.
    assert!(text.contains("pass") && !text.contains("tests 0"), "{text}");
}
