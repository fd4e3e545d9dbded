//! Run with: cargo run -p example-counter -- NAME [AMOUNT]
//!
//! Adds AMOUNT (default 1) to the counter called NAME and prints the new value. The state
//! lives in `./counter-data`, so running it again continues where it left off: Dormouse
//! embedded as a library, with typed calls and no HTTP.

use std::sync::Arc;

use anyhow::Context as _;
use dormouse_runtime::{Namespace, NamespaceConfig, Runtime};
use dormouse_storage::{SledConfig, SledStorage};
use example_counter::{Counter, CounterRequest};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args
        .next()
        .context("usage: example-counter NAME [AMOUNT]")?;
    let amount: i64 = match args.next() {
        Some(a) => a.parse().context("AMOUNT must be an integer")?,
        None => 1,
    };
    let storage = Arc::new(SledStorage::open(SledConfig::new("counter-data"))?);
    let runtime = Runtime::new(storage);
    let counters: Namespace<Counter> = runtime.namespace("counter", NamespaceConfig::default(), ());
    let value = counters
        .get(&name)
        .call(CounterRequest::Add(amount))
        .await?;
    println!("{name} = {value}");
    counters.shutdown().await;
    Ok(())
}
