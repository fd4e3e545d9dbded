//! A durable counter: the smallest useful Dormouse object, and the shape every user-defined
//! object takes. Each name is its own counter, activated on first use, hibernated when idle,
//! rebuilt from storage on the next call.

use dormouse_runtime::{Context, Object};

/// One named counter. The field is a cache of the stored value.
#[derive(Debug)]
pub struct Counter {
    value: i64,
}

/// What a counter can be asked.
#[derive(Debug, Clone, Copy)]
pub enum CounterRequest {
    /// Adds (or with a negative amount subtracts) and answers the new value.
    Add(i64),
    /// Answers the current value.
    Get,
}

const KEY: &[u8] = b"value";

impl Object for Counter {
    type Env = ();
    type Request = CounterRequest;
    type Response = i64;

    async fn activate(ctx: &mut Context<'_>, _env: &()) -> anyhow::Result<Self> {
        let value = match ctx.get(KEY)? {
            Some(bytes) => i64::from_be_bytes(bytes.as_ref().try_into()?),
            None => 0,
        };
        Ok(Self { value })
    }

    async fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        request: CounterRequest,
    ) -> anyhow::Result<i64> {
        if let CounterRequest::Add(amount) = request {
            self.value = self
                .value
                .checked_add(amount)
                .ok_or_else(|| anyhow::anyhow!("counter would overflow"))?;
            // The reply is released only after this write is durable (the output gate).
            ctx.put(KEY, self.value.to_be_bytes().to_vec());
        }
        Ok(self.value)
    }
}
