//! Inbound protection: a token-bucket rate limit (`per_second`, `burst`) and a concurrency limit
//! (`max_concurrent`). Over either, the request is refused with
//! [`PolicyError::RateLimited`] carrying how long to wait (the proxy answers 429 with
//! `Retry-After`, gRPC RESOURCE_EXHAUSTED). Both are lock-free: the bucket is GCRA (one atomic
//! "theoretical arrival time"), the concurrency limit one atomic counter whose permit is held
//! until the response body ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::Response;
use tower::{Layer, Service};

use super::PolicyError;
use crate::config::{Inbound, RateLimit};
use crate::proxy::http::{Body, Guarded};

/// What a refused request should wait when the concurrency limit, not the rate, refused it.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A token bucket as GCRA: one token every `1/per_second`, up to `burst` saved.
pub struct TokenBucket {
    limit: RateLimit,
    start: Instant,
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: `burst` tokens.
    tolerance: u64,
    /// Theoretical arrival time, nanoseconds since `start`.
    tat: AtomicU64,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        let interval = 1_000_000_000 / u64::from(limit.per_second.max(1));
        Self {
            limit,
            start: Instant::now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst.max(1))),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn try_take(&self) -> Result<(), Duration> {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now) + self.interval;
            if next - now > self.tolerance {
                return Err(Duration::from_nanos(next - now - self.tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// A count of requests in flight with a ceiling.
pub struct ConcurrencyLimit {
    max: usize,
    current: AtomicUsize,
}

impl ConcurrencyLimit {
    pub fn new(max: u32) -> Self {
        Self {
            max: max as usize,
            current: AtomicUsize::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }
}

/// Holds one concurrency slot until dropped.
pub struct Permit(Option<Arc<InboundLimits>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(limits) = &self.0
            && let Some(c) = &limits.concurrency
        {
            c.current.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The inbound limits in force (rebuilt when `inbound.rate_limit` or `max_concurrent` change).
pub struct InboundLimits {
    pub rate: Option<TokenBucket>,
    pub concurrency: Option<ConcurrencyLimit>,
}

impl InboundLimits {
    pub fn new(inbound: &Inbound) -> Self {
        Self {
            rate: inbound.rate_limit.map(TokenBucket::new),
            concurrency: inbound.max_concurrent.map(ConcurrencyLimit::new),
        }
    }

    /// True when these limits were built from the same settings.
    pub fn same_settings(&self, inbound: &Inbound) -> bool {
        self.rate.as_ref().map(|r| r.limit) == inbound.rate_limit
            && self.concurrency.as_ref().map(|c| c.max as u32) == inbound.max_concurrent
    }

    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none() && self.concurrency.is_none()
    }

    /// Admits one request or refuses it with how long to wait.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, PolicyError> {
        if let Some(c) = &self.concurrency {
            let before = c.current.fetch_add(1, Ordering::AcqRel);
            if before >= c.max {
                c.current.fetch_sub(1, Ordering::AcqRel);
                return Err(PolicyError::RateLimited {
                    retry_after: BUSY_RETRY_AFTER,
                });
            }
        }
        let permit = Permit(self.concurrency.as_ref().map(|_| self.clone()));
        if let Some(rate) = &self.rate
            && let Err(wait) = rate.try_take()
        {
            return Err(PolicyError::RateLimited { retry_after: wait });
        }
        Ok(permit)
    }
}

/// Applies [`InboundLimits`] in front of a service.
#[derive(Clone)]
pub struct LimitLayer {
    limits: Arc<InboundLimits>,
}

impl LimitLayer {
    pub fn new(limits: Arc<InboundLimits>) -> Self {
        Self { limits }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    limits: Arc<InboundLimits>,
}

impl<S, R> Service<R> for Limit<S>
where
    S: Service<R, Response = Response<Body>, Error = PolicyError>,
{
    type Response = Response<Body>;
    type Error = PolicyError;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PolicyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        match self.limits.admit() {
            Ok(permit) => LimitFuture::Admitted {
                inner: self.inner.call(req),
                permit: Some(permit),
            },
            Err(e) => LimitFuture::Refused { error: Some(e) },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = LimitProj]
    pub enum LimitFuture<F> {
        Admitted { #[pin] inner: F, permit: Option<Permit> },
        Refused { error: Option<PolicyError> },
    }
}

impl<F> Future for LimitFuture<F>
where
    F: Future<Output = Result<Response<Body>, PolicyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitProj::Admitted { inner, permit } => {
                let result = ready!(inner.poll(cx));
                Poll::Ready(result.map(|response| match permit.take() {
                    // Only a concurrency slot needs to outlive the response head.
                    Some(permit) if permit.0.is_some() => response.map(|body| {
                        http_body_util::BodyExt::boxed_unsync(Guarded::new(body, permit))
                    }),
                    _ => response,
                }))
            }
            LimitProj::Refused { error } => {
                Poll::Ready(Err(error.take().unwrap_or(PolicyError::RateLimited {
                    retry_after: BUSY_RETRY_AFTER,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let b = TokenBucket::new(RateLimit {
            per_second: 10,
            burst: 5,
        });
        let allowed = (0..20).filter(|_| b.try_take().is_ok()).count();
        assert_eq!(allowed, 5);
        let wait = b.try_take().expect_err("empty");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
    }

    #[test]
    fn concurrency_permits_are_returned() {
        let limits = Arc::new(InboundLimits {
            rate: None,
            concurrency: Some(ConcurrencyLimit::new(2)),
        });
        let a = limits.admit().expect("1");
        let _b = limits.admit().expect("2");
        assert!(limits.admit().is_err());
        drop(a);
        assert!(limits.admit().is_ok());
        assert_eq!(limits.concurrency.as_ref().map(|c| c.in_flight()), Some(1));
    }
}
