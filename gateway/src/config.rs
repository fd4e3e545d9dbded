use std::net::SocketAddr;
use std::path::PathBuf;

use dormouse_storage::Durability;

/// What an operator can set. Every field is a flag and a `DORMOUSE_*` environment variable,
/// so the same binary runs unchanged under systemd, Docker and a shell.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on. Loopback by default so a fresh install is not exposed.
    #[arg(long, env = "DORMOUSE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory holding the embedded database; one dormouse process per directory.
    #[arg(long, env = "DORMOUSE_DATA_DIR", default_value = "./dormouse-data")]
    pub data_dir: PathBuf,

    /// When a write counts as safe: "always" (fsync before acknowledging, group-committed),
    /// a period such as "100ms" (fsync on that period), or "never".
    #[arg(long, env = "DORMOUSE_DURABILITY", default_value = "always")]
    pub durability: Durability,

    /// Memory for the storage engine's page cache, in MiB; bounds storage memory use.
    #[arg(long, env = "DORMOUSE_CACHE_MIB", default_value_t = 64)]
    pub cache_mib: u64,
}
