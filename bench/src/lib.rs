//! The parts of the bench that tests elsewhere in the workspace run too: the crash-safety
//! harness (`crash`) and the soak (`soak`), which the gateway's test suite runs in a short form against its own
//! freshly built binary. The load scenarios live in the `dormouse-bench` binary.

mod child;
pub mod crash;
pub mod disk_full;
pub mod soak;

use std::net::SocketAddr;
use std::path::PathBuf;

/// `dormouse` next to the running binary (both build into target/release), else the path
/// relative to the workspace root.
pub fn default_server_bin() -> anyhow::Result<PathBuf> {
    let sibling = std::env::current_exe()?.with_file_name("dormouse");
    if sibling.exists() {
        return Ok(sibling);
    }
    let relative = PathBuf::from("target/release/dormouse");
    anyhow::ensure!(
        relative.exists(),
        "no dormouse binary next to this one or at target/release/dormouse: build it with \
         `cargo build --release -p dormouse-gateway` or pass --server-bin"
    );
    Ok(relative)
}

/// A loopback address whose port was free a moment ago (bound, read, released).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
