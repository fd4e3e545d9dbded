//! Cluster mode's footing on NATS JetStream (issue 16): what every node needs before it can
//! own, forward or replicate anything.
//!
//! - [`connect`](mod@connect): reaching the NATS cluster, and refusing at start a server
//!   that cannot be trusted to fence (a release before [`MIN_SERVER_VERSION`]), is
//!   unreachable, or has JetStream off.
//! - [`fenced`]: appends that name the sequence they expect their subject to end at, so a
//!   former owner's late append is refused by the log itself, and retries are recognised.
//! - [`feed`]: following a subject's appends from any node, in order and each once,
//!   filling what a lost republish left out from the stream.
//! - [`journal`]: objects' storage in cluster mode, [`ClusterStorage`]: a replicated,
//!   fenced journal per object in JetStream, read into memory while this node owns it, and
//!   the cluster-wide index that fires alarms of objects no node holds.
//! - [`ownership`]: live nodes, placement, the owner directory, and the fence a new owner
//!   puts in an object's log.
//! - [`rpc`]: node to node requests, how a node reaches an object's owner.
//! - [`version`]: nats-server releases and which qualify.
//! - [`wire`]: the byte encoding of what nodes send each other.
//! - [`check`](mod@check): whether a NATS cluster can carry cluster mode
//!   (`dormouse cluster check`).
//!
//! The gateway's `cluster` module puts these under the server (`[cluster]` in the
//! configuration); `docs/CLUSTER.md` says what works, what it costs and what does not yet.

pub mod check;
pub mod connect;
pub mod feed;
pub mod fenced;
pub mod journal;
pub mod ownership;
pub mod rpc;
pub mod version;
pub mod wire;

pub use check::{CheckReport, ServerCheck, check};
pub use connect::{ConnectError, Nats, NatsSettings, connect};
pub use feed::{Entry, Feed};
pub use fenced::{AppendError, Appended, FencedLog, LogError, LogSpec};
pub use journal::{ClusterStorage, Follower, JournalSpec, JournalStats, Record};
pub use ownership::{
    Claim, Directory, DirectoryError, DirectorySpec, Membership, NodeId, TakeOverError, place,
    take_over, token,
};
pub use rpc::{Reply, RpcError, RpcServer};
pub use version::{MIN_SERVER_VERSION, ServerVersion};

/// A header of a NATS message, as text, if it has it.
fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str())
}
