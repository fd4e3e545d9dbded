//! Abuse limits that are not about one connection's IO (those live in `listener`): request
//! size before routing, shedding under overload, and publish rates per client address and
//! per credential.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::auth::Principal;
use crate::{ApiError, LimitsSettings};

/// `Retry-After` of a request shed under overload: soon, spread by the clients' own jitter.
const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;

/// The shared limit state of one server.
#[derive(Debug)]
pub struct Limits {
    inflight: AtomicUsize,
    max_inflight: usize,
    max_url: usize,
    max_headers: usize,
    per_ip: Option<RateLimiter<IpAddr>>,
    per_credential: Option<RateLimiter<Arc<str>>>,
}

impl Limits {
    /// Limits from `[limits]`.
    pub fn new(settings: &LimitsSettings) -> Self {
        fn limiter<K: std::hash::Hash + Eq + Clone>(
            rate: u32,
            burst: u32,
        ) -> Option<RateLimiter<K>> {
            let burst = if burst > 0 { burst } else { rate };
            (rate > 0).then(|| RateLimiter::new(f64::from(rate), f64::from(burst)))
        }
        let burst = settings.publish_burst;
        Self {
            inflight: AtomicUsize::new(0),
            max_inflight: settings.max_inflight_requests,
            max_url: settings.max_url_size.0 as usize,
            max_headers: settings.max_header_size.0 as usize,
            per_ip: limiter(settings.publish_rate_per_ip, burst),
            per_credential: limiter(settings.publish_rate_per_credential, burst),
        }
    }

    /// Takes `messages` publishes from the budgets of `ip` and of `principal`, or says when
    /// to retry (429). Anonymous callers (auth off) are limited by address only.
    pub(crate) fn publish(
        &self,
        ip: Option<IpAddr>,
        principal: &Principal,
        messages: usize,
    ) -> Result<(), ApiError> {
        let cost = messages.max(1) as f64;
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip)
            && let Err(wait) = limiter.take(ip, cost)
        {
            return Err(rate_limited("your address", wait));
        }
        if let Some(limiter) = &self.per_credential
            && principal.is_authenticated()
            && let Err(wait) = limiter.take(principal.subject.clone(), cost)
        {
            return Err(rate_limited(&format!("{:?}", principal.subject), wait));
        }
        Ok(())
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

/// Token buckets per key: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before idle (full) ones are swept, so the map cannot grow without bound.
const SWEEP_ABOVE: usize = 10_000;

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::default(),
        }
    }

    /// Takes `cost` tokens, or returns how long until they would be there. A cost above the
    /// burst is allowed from a full bucket (a large batch is not refused forever) and leaves
    /// it in debt.
    fn take(&self, key: K, cost: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > SWEEP_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= cost.min(self.burst) {
            bucket.tokens -= cost;
            Ok(())
        } else {
            let missing = cost.min(self.burst) - bucket.tokens;
            Err(Duration::from_secs_f64(missing / self.rate))
        }
    }
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

/// The address a connection came from, put in every request by the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// The client's address, left in the request by [`guard`] for the rate limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub(crate) Option<IpAddr>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_allow_the_burst_then_the_rate() {
        let limiter = RateLimiter::new(10.0, 5.0);
        for _ in 0..5 {
            assert!(limiter.take("a", 1.0).is_ok());
        }
        let wait = limiter.take("a", 1.0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another key has its own bucket.
        assert!(limiter.take("b", 1.0).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take("a", 1.0).is_ok(), "refilled at the rate");
        // A batch larger than the burst passes from a full bucket and leaves it in debt.
        assert!(limiter.take("c", 50.0).is_ok());
        let wait = limiter.take("c", 1.0).unwrap_err();
        assert!(wait >= Duration::from_secs(4), "{wait:?}");
    }
}
