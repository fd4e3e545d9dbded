//! The parts of the bench that tests elsewhere in the workspace run too: the crash-safety
//! harness (`crash`) and the soak (`soak`), which the `dormouse` crate's tests run in a
//! short form against its own freshly built binary; the scenarios that drive a server child
//! process through restarts (`disk_full`, `retained_server`, `cluster`, `cluster_chaos`); and `proc`, the kernel's and
//! allocator's figures every scenario reports. The other load scenarios live in the
//! `dormouse-bench` binary.

mod child;
pub mod cluster;
pub mod cluster_chaos;
pub mod crash;
pub mod disk_full;
pub mod proc;
pub mod retained_server;
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
         `cargo build --release -p dormouse` or pass --server-bin"
    );
    Ok(relative)
}

/// A loopback address whose port was free a moment ago (bound, read, released).
/// Up to `count` of `0..n`, spread evenly: the objects a scenario reads back to check.
pub fn spread(n: u64, count: u64) -> impl Iterator<Item = u64> {
    let step = (n / count.max(1)).max(1);
    (0..n).step_by(step as usize).take(count as usize)
}

/// Sends `request`, requires a 2xx answer and parses its JSON body.
pub(crate) async fn json_of(request: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
    Ok(request.send().await?.error_for_status()?.json().await?)
}

pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
