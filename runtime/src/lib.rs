//! The Durable-Object-style host: user-defined [`Object`] types, each instance addressed by
//! name within a [`Namespace`], activated lazily, at most once at a time, hibernated when
//! idle, and gated so nothing it says leaves before what it wrote is durable.
//!
//! # Layout
//! - `object`: the [`Object`] trait a user implements.
//! - `context`: [`Context`], a handler's view of its own storage and its deferred outputs.
//! - `namespace`: [`Namespace`], name to activation, the directory that makes activation single
//!   and hibernation race-free, and [`ObjectHandle`] for typed calls.
//! - `activation`: the ractor actor that hosts one live object (private: ractor stays inside).
//! - `socket`: [`Socket`], a client connection's queue, which outlives hibernation.
//! - `alarm`: the scheduler that fires objects' alarms, waking them if they hibernate.
//! - `gate`: the output gate, which releases replies and effects in order after their writes
//!   are durable.
//! - `config`: [`NamespaceConfig`], per-type tunables such as `idle_timeout`.
//! - `counters`: [`NamespaceStats`], activation and hibernation figures.
//! - `runtime`: [`Runtime`], which owns the storage and creates namespaces.
//! - `error`: the crate's [`Error`].
//! - `respond`: JSON answers and errors for [`Object::fetch`], in the gateway's shapes.
//!
//! # A minimal object
//! ```
//! use dormouse_runtime::{Context, Namespace, NamespaceConfig, Object, Runtime};
//! use dormouse_storage::MemoryStorage;
//! use std::sync::Arc;
//!
//! /// A counter that survives hibernation and restarts because it lives in storage.
//! struct Counter {
//!     value: u64,
//! }
//!
//! impl Object for Counter {
//!     type Env = ();
//!     type Request = u64;
//!     type Response = u64;
//!
//!     async fn activate(ctx: &mut Context<'_>, _env: &()) -> anyhow::Result<Self> {
//!         let value = match ctx.get(b"value")? {
//!             Some(bytes) => u64::from_be_bytes(bytes.as_ref().try_into()?),
//!             None => 0,
//!         };
//!         Ok(Counter { value })
//!     }
//!
//!     async fn handle(&mut self, ctx: &mut Context<'_>, add: u64) -> anyhow::Result<u64> {
//!         self.value += add;
//!         ctx.put(b"value".to_vec(), self.value.to_be_bytes().to_vec());
//!         Ok(self.value)
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let runtime = Runtime::new(Arc::new(MemoryStorage::new()));
//! let counters: Namespace<Counter> = runtime.namespace("counter", NamespaceConfig::default(), ());
//! assert_eq!(counters.call("a", 2).await?, 2);
//! assert_eq!(counters.call("a", 3).await?, 5);
//! # Ok(()) }
//! ```

mod activation;
mod alarm;
mod config;
mod context;
mod counters;
mod error;
mod gate;
mod namespace;
mod object;
pub mod respond;
mod runtime;
mod socket;

pub use config::NamespaceConfig;
pub use context::Context;
pub use counters::NamespaceStats;
pub use error::{Error, Result};
pub use namespace::{DynNamespace, Namespace, ObjectHandle, ObjectState};
pub use object::Object;
pub use runtime::Runtime;
pub use socket::{
    Inbound, Outbound, Outlet, Queued, SendOutcome, Socket, SocketReceiver, Sockets, Transport,
    WriteOnRelease,
};

pub use bytes::Bytes;
pub use http;

/// An HTTP request as an object sees it: the path is relative to the object
/// (`/v1/objects/{namespace}/{name}/rest` arrives as `/rest`), the body is fully read.
pub type HttpRequest = http::Request<Bytes>;
/// An HTTP response from an object.
pub type HttpResponse = http::Response<Bytes>;

pub use dormouse_storage as storage;
