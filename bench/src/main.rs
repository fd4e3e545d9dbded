//! Dormouse benchmark commands. Run with: `cargo run --release -p dormouse-bench -- <scenario>`.
//!
//! Each scenario prints one JSON object: its figures and the parameters that produced them,
//! so a result can be pasted into docs/BENCHMARKS.md and re-run exactly.
//!
//! # Layout
//! - `activation`: activation, hibernation and wake cost of many objects, in process.
//! - `storage_churn`: the storage engine under the replay-buffer workload.
//! - `retained`: memory and start-up against what is kept (full replay buffers, all idle).
//! - `engine`: the `--engine` flag of the in-process scenarios.
//! - `fanout`, `idle`, `publish`: load over the wire against a `dormouse` server (or Redis,
//!   as a yardstick) that the bench starts, or one already running.
//! - `presence`: members joining and leaving a channel with presence, over the wire.
//! - `hooks`: what upstream hooks add to a handshake, and a message hook's round trip.
//! - `wire`: the server under test and minimal WebSocket, SSE and RESP clients.
//! - `crash` (in the library): the crash-safety harness.
//! - `cluster_fence`: a paused owner process is fenced by the log after a take-over.
//! - `nats_probe`: the NATS JetStream facts cluster mode rests on (fenced append cost, the
//!   pause when a stream's leader dies), on a three-server cluster it starts.

mod activation;
mod cluster_fence;
mod engine;
mod fanout;
mod hooks;
mod idle;
mod nats_probe;
mod presence;
mod publish;
mod retained;
mod storage_churn;
mod wire;

use clap::{Parser, Subcommand};

/// jemalloc, as in the `dormouse` binary: it hands freed memory back to the kernel (glibc's
/// malloc keeps most of it after a burst of activations), so RSS after hibernation
/// measures what Dormouse holds, not what the allocator hoards.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(about = "Dormouse benchmarks; each prints one JSON line")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Activate N objects (each writes one event), let them hibernate, then wake a sample.
    Activation(activation::Args),
    /// Append to 1,000 logs trimmed to their last 1,000 events; disk size and RSS over time.
    StorageChurn(storage_churn::Args),
    /// N logs each holding its full replay buffer, nothing active: memory per retained
    /// event, then the time and memory to open the data dir again in a fresh process.
    Retained(retained::Args),
    /// A server fills N channels' replay buffers, they hibernate, it restarts: its memory
    /// and start-up against what is kept, as a user sees them.
    RetainedServer(dormouse_bench::retained_server::Args),
    /// The second half of `retained`, run by it in a fresh process.
    #[command(hide = true)]
    RetainedOpen(retained::OpenArgs),
    /// N subscribers on one channel, M messages published over HTTP: deliveries/s,
    /// publish-to-delivery latency, and whether every subscriber got everything once, in order.
    Fanout(fanout::Args),
    /// N idle WebSocket or SSE connections: the server's memory per connection.
    Idle(idle::Args),
    /// Upstream hooks against a backend that answers at once: the latency a `connect` hook
    /// adds to a handshake, and a `message` hook's round trip.
    Hooks(hooks::Args),
    /// Acknowledged publishes per second over HTTP with C concurrent publishers.
    Publish(publish::Args),
    /// N members, each its own subject, join one channel with presence, then half leave:
    /// the join and leave frames, their time and server CPU, and the presence list's latency.
    Presence(presence::Args),
    /// Kill the server with SIGKILL at random moments under publish load, restart it, and
    /// check that resuming consumers got every acknowledged message exactly once, in order.
    Crash(dormouse_bench::crash::Args),
    /// Steady publishers and churning (drop and resume) subscribers for a long time:
    /// no gaps, no repeats, and the server's memory over time.
    Soak(dormouse_bench::soak::Args),
    /// Fill the data dir's file system (a tmpfs; needs root), then free it: clear refusals,
    /// no hang, nothing acknowledged lost, working again after a restart.
    DiskFull(dormouse_bench::disk_full::Args),
    /// Fenced, replicated appends on a three-server NATS cluster it starts: latency, NATS
    /// CPU per append, and the pause when the stream's leader is killed.
    NatsProbe(nats_probe::Args),
    /// An owner in a child process is paused (SIGSTOP) past its membership, its object
    /// taken over, and continued: its next append must be refused by the log.
    ClusterFence(cluster_fence::Args),
    /// Three NATS servers and three dormouse nodes: publish latency through the owner and
    /// through another node, the time until a killed owner's channel is served again, and
    /// memory per hibernated channel against one node.
    Cluster(dormouse_bench::cluster::Args),
    /// Cluster mode under faults (node kill, NATS leader kill, both, a paused node, all
    /// nodes restarted) with publishers and reconnecting subscribers: nothing acknowledged
    /// lost, duplicated or reordered, every subscriber exact or told of a gap.
    ClusterChaos(dormouse_bench::cluster_chaos::Args),
    /// The owner process of `cluster-fence`, run by it.
    #[command(hide = true)]
    ClusterFenceOwner(cluster_fence::OwnerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::Activation(args) => serde_json::to_string(&activation::run(args)?)?,
        Scenario::StorageChurn(args) => serde_json::to_string(&storage_churn::run(args)?)?,
        Scenario::Retained(args) => serde_json::to_string(&retained::run(args)?)?,
        Scenario::RetainedServer(args) => serde_json::to_string(
            &tokio::runtime::Runtime::new()?
                .block_on(dormouse_bench::retained_server::run(args))?,
        )?,
        Scenario::RetainedOpen(args) => serde_json::to_string(&retained::open(args)?)?,
        Scenario::Fanout(args) => serde_json::to_string(&fanout::run(args)?)?,
        Scenario::Idle(args) => serde_json::to_string(&idle::run(args)?)?,
        Scenario::Hooks(args) => serde_json::to_string(&hooks::run(args)?)?,
        Scenario::Publish(args) => serde_json::to_string(&publish::run(args)?)?,
        Scenario::Presence(args) => serde_json::to_string(&presence::run(args)?)?,
        Scenario::ClusterFenceOwner(args) => {
            return tokio::runtime::Runtime::new()?.block_on(cluster_fence::owner(args));
        }
        Scenario::ClusterFence(args) => {
            let report = tokio::runtime::Runtime::new()?.block_on(cluster_fence::run(args))?;
            let ok = report.ok;
            println!("{}", serde_json::to_string(&report)?);
            anyhow::ensure!(ok, "a paused owner was not fenced (see the report)");
            return Ok(());
        }
        Scenario::Cluster(args) => serde_json::to_string(
            &tokio::runtime::Runtime::new()?.block_on(dormouse_bench::cluster::run(args))?,
        )?,
        Scenario::ClusterChaos(args) => {
            let report = tokio::runtime::Runtime::new()?
                .block_on(dormouse_bench::cluster_chaos::run(args))?;
            let ok = report.ok;
            println!("{}", serde_json::to_string(&report)?);
            anyhow::ensure!(ok, "cluster chaos found violations (see the report)");
            return Ok(());
        }
        Scenario::NatsProbe(args) => serde_json::to_string(
            &tokio::runtime::Runtime::new()?.block_on(nats_probe::run(args))?,
        )?,
        Scenario::Crash(args) => {
            let report =
                tokio::runtime::Runtime::new()?.block_on(dormouse_bench::crash::run(args))?;
            let ok = report.ok;
            println!("{}", serde_json::to_string(&report)?);
            anyhow::ensure!(ok, "the crash harness found violations (see the report)");
            return Ok(());
        }
        Scenario::DiskFull(args) => {
            let report =
                tokio::runtime::Runtime::new()?.block_on(dormouse_bench::disk_full::run(args))?;
            let ok = report.ok;
            println!("{}", serde_json::to_string(&report)?);
            anyhow::ensure!(ok, "the disk-full check failed (see the report)");
            return Ok(());
        }
        Scenario::Soak(args) => {
            let report =
                tokio::runtime::Runtime::new()?.block_on(dormouse_bench::soak::run(args))?;
            let ok = report.ok;
            println!("{}", serde_json::to_string(&report)?);
            anyhow::ensure!(
                ok,
                "the soak found gaps, repeats or errors (see the report)"
            );
            return Ok(());
        }
    };
    println!("{report}");
    Ok(())
}
