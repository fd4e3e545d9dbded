//! Abuse limits that are not about one connection's IO (those live in `listener`): request
//! size before routing, shedding under overload, and publish rates per client address and
//! per credential.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::Principal;
use crate::config::LimitsSettings;
use crate::error::ApiError;

/// `Retry-After` of a request shed under overload: soon, spread by the clients' own jitter.
const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;

/// The shared limit state of one server.
#[derive(Debug)]
pub struct Limits {
    inflight: AtomicUsize,
    max_inflight: usize,
    max_url: usize,
    max_headers: usize,
    per_ip: Option<PublishRate<IpAddr>>,
    per_credential: Option<PublishRate<Arc<str>>>,
}

impl Limits {
    /// Limits from `[limits]`.
    pub fn new(settings: &LimitsSettings) -> Self {
        let burst = settings.publish_burst;
        Self {
            inflight: AtomicUsize::new(0),
            max_inflight: settings.max_inflight_requests,
            max_url: settings.max_url_size.0 as usize,
            max_headers: settings.max_header_size.0 as usize,
            per_ip: PublishRate::new(settings.publish_rate_per_ip, burst),
            per_credential: PublishRate::new(settings.publish_rate_per_credential, burst),
        }
    }

    /// Takes `messages` publishes from the budgets of `ip` and of `principal`, or says when
    /// to retry (429). Anonymous callers (auth off) are limited by address only. More
    /// messages at once than the burst could never pass: 413, saying so.
    pub(crate) fn publish(
        &self,
        ip: Option<IpAddr>,
        principal: &Principal,
        messages: usize,
    ) -> Result<(), ApiError> {
        let cost = u32::try_from(messages.max(1)).unwrap_or(u32::MAX);
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip) {
            limiter.take(&ip, cost, "your address")?;
        }
        if let Some(limiter) = &self.per_credential
            && principal.is_authenticated()
        {
            limiter.take(
                &principal.subject,
                cost,
                &format!("{:?}", principal.subject),
            )?;
        }
        Ok(())
    }

    /// Forgets the budgets that have refilled completely (a key not seen for a burst's
    /// worth of time is the same as a new one), so the tables hold only recent publishers.
    /// Called once a second by the server.
    pub(crate) fn forget_idle(&self) {
        if let Some(limiter) = &self.per_ip {
            limiter.forget_idle();
        }
        if let Some(limiter) = &self.per_credential {
            limiter.forget_idle();
        }
    }
}

/// A publish rate per key (an address, a credential's subject), with `governor`'s keyed
/// GCRA: a sharded map, so publishers do not meet on one lock, and idle keys are dropped
/// by [`Limits::forget_idle`] rather than swept on the hot path.
#[derive(Debug)]
struct PublishRate<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    burst: u32,
}

impl<K: Hash + Eq + Clone> PublishRate<K> {
    /// `rate` messages a second, `burst` saved up (0: one second's worth); none when the
    /// rate is 0 (unlimited).
    fn new(rate: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            burst: burst.get(),
        })
    }

    /// Takes `cost` messages from `key`'s budget, or the refusal to answer `who` with.
    fn take(&self, key: &K, cost: u32, who: &str) -> Result<(), ApiError> {
        let over_burst = || {
            ApiError::too_large(format!(
                "{cost} messages at once are more than the publish burst of {} \
                 (limits.publish_burst); send them in smaller batches",
                self.burst
            ))
        };
        let Some(n) = NonZeroU32::new(cost) else {
            return Ok(());
        };
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(rate_limited(
                who,
                not_until.wait_time_from(self.limiter.clock().now()),
            )),
            Err(_) => Err(over_burst()),
        }
    }

    fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

fn rate_limited(who: &str, wait: Duration) -> ApiError {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("{who} is publishing faster than allowed; retry in {secs} s"),
    )
    .retry_after(secs)
}

impl Limits {
    /// Refuses a request target over `limits.max_url_size` (414) and headers over
    /// `limits.max_header_size` (431), before any other work.
    pub(crate) fn check_request_size(&self, target: usize, headers: usize) -> Result<(), ApiError> {
        if target > self.max_url {
            return Err(ApiError::new(
                StatusCode::URI_TOO_LONG,
                "url_too_long",
                format!(
                    "the request target is {target} bytes; the limit is {} (limits.max_url_size)",
                    self.max_url
                ),
            ));
        }
        if headers > self.max_headers {
            return Err(ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request headers are {headers} bytes; the limit is {} (limits.max_header_size)",
                    self.max_headers
                ),
            ));
        }
        Ok(())
    }

    /// Counts a request in flight until the returned guard drops; beyond
    /// `limits.max_inflight_requests` it is shed with a retryable 503, so overload turns
    /// into fast answers instead of a growing queue.
    pub(crate) fn admit(&self) -> Result<InFlight<'_>, ApiError> {
        InFlight::enter(self).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is handling as many requests as it is allowed to; retry shortly",
            )
            .retry_after(OVERLOAD_RETRY_AFTER_SECS)
        })
    }
}

/// A request counted in flight, until it drops.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a Limits);

impl<'a> InFlight<'a> {
    fn enter(limits: &'a Limits) -> Option<Self> {
        let before = limits.inflight.fetch_add(1, Ordering::AcqRel);
        if limits.max_inflight > 0 && before >= limits.max_inflight {
            limits.inflight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(limits))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client's address, left in the request by [`guard`](crate::middleware::guard) for the rate limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub(crate) Option<IpAddr>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_allows_the_burst_then_the_rate_per_key() {
        let limiter = PublishRate::new(10, 5).expect("a rate");
        for _ in 0..5 {
            assert!(limiter.take(&"a", 1, "a").is_ok());
        }
        let refused = limiter.take(&"a", 1, "a").unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (429, "rate_limited")
        );
        // Another key has its own budget.
        assert!(limiter.take(&"b", 1, "b").is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take(&"a", 1, "a").is_ok(), "refilled at the rate");
        // A batch up to the burst passes from a full budget; one above it never could.
        assert!(limiter.take(&"c", 5, "c").is_ok());
        let refused = limiter.take(&"d", 6, "d").unwrap_err();
        assert_eq!(refused.status.as_u16(), 413);
        assert!(
            refused.message.contains("limits.publish_burst"),
            "{}",
            refused.message
        );
        // No rate configured: no limiter.
        assert!(PublishRate::<&str>::new(0, 5).is_none());
    }
}
