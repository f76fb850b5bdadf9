//! The circuit breaker of one upstream service.
//!
//! - **Closed** (0): requests pass; `consecutive_failures` failures in a row (5xx, a gRPC
//!   server-side status in the headers, connect or exchange errors, timeouts; never 4xx) open it.
//! - **Open** (1): requests fail at once with [`PolicyError::CircuitOpen`] (the caller renders
//!   the configured fallback) for `open_for`.
//! - **Half-open** (2): after `open_for`, exactly one request goes through as a probe while the
//!   others keep failing fast. The probe's success closes the circuit; its failure reopens it with
//!   `open_for` doubled, up to `max_open_for`. A probe abandoned by its caller (before the
//!   deadline) frees the slot for the next request.
//!
//! The closed state is checked with one atomic load; the mutex is taken only when the circuit is
//! not closed or a failure crosses the threshold. Thresholds come from the request's policy at
//! each call, so a reload applies to the existing state.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use prometheus::IntGauge;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Failure, PolicyError, ServiceState, is_failure};
use crate::config::{CircuitBreaker, Policy};

pub const CLOSED: u8 = 0;
pub const OPEN: u8 = 1;
pub const HALF_OPEN: u8 = 2;

struct Transitions {
    /// When an open circuit lets its probe through.
    open_until: Instant,
    /// How long the circuit stays open next time it opens from half-open (doubles per failed
    /// probe); `None` until it first opens.
    open_for: Option<Duration>,
    probe_in_flight: bool,
}

pub struct Breaker {
    service: Arc<str>,
    state: AtomicU8,
    failures: AtomicU32,
    transitions: Mutex<Transitions>,
    gauge: IntGauge,
}

/// Leave to send one request; report the outcome through [`Permit::record`].
pub struct Permit {
    probe: bool,
}

impl Breaker {
    pub fn new(service: Arc<str>, gauge: IntGauge) -> Self {
        gauge.set(i64::from(CLOSED));
        Self {
            service,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            transitions: Mutex::new(Transitions {
                open_until: Instant::now(),
                open_for: None,
                probe_in_flight: false,
            }),
            gauge,
        }
    }

    /// 0 closed, 1 open, 2 half-open.
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    fn set_state(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.gauge.set(i64::from(state));
    }

    /// May a request go through now?
    pub fn admit(&self) -> Result<Permit, PolicyError> {
        if self.state() == CLOSED {
            return Ok(Permit { probe: false });
        }
        let mut t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        match self.state() {
            CLOSED => Ok(Permit { probe: false }),
            OPEN if Instant::now() >= t.open_until => {
                t.probe_in_flight = true;
                self.set_state(HALF_OPEN);
                tracing::info!(service = %self.service, "circuit half-open: sending a probe");
                Ok(Permit { probe: true })
            }
            HALF_OPEN if !t.probe_in_flight => {
                t.probe_in_flight = true;
                Ok(Permit { probe: true })
            }
            _ => Err(PolicyError::CircuitOpen),
        }
    }

    /// Reports the outcome of a permitted request.
    pub fn record(&self, permit: Permit, success: bool, config: &CircuitBreaker) {
        if !permit.probe {
            if success {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                return;
            }
            let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if failures >= config.consecutive_failures && self.state() == CLOSED {
                let mut t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
                if self.state() == CLOSED {
                    let open_for = config.open_for;
                    t.open_for = Some(open_for);
                    t.open_until = Instant::now() + open_for;
                    self.set_state(OPEN);
                    tracing::warn!(
                        service = %self.service,
                        consecutive_failures = failures,
                        open_for_ms = open_for.as_millis() as u64,
                        "circuit opened"
                    );
                }
            }
            return;
        }
        let mut t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        t.probe_in_flight = false;
        if success {
            t.open_for = None;
            self.failures.store(0, Ordering::Release);
            self.set_state(CLOSED);
            tracing::info!(service = %self.service, "circuit closed: the probe succeeded");
        } else {
            let open_for = t
                .open_for
                .map_or(config.open_for, |d| d.saturating_mul(2))
                .clamp(config.open_for, config.max_open_for.max(config.open_for));
            t.open_for = Some(open_for);
            t.open_until = Instant::now() + open_for;
            self.set_state(OPEN);
            tracing::warn!(
                service = %self.service,
                open_for_ms = open_for.as_millis() as u64,
                "circuit reopened: the probe failed"
            );
        }
    }

    /// Gives a permit back without an outcome (the caller went away before the deadline).
    pub fn release(&self, permit: Permit) {
        if permit.probe {
            let mut t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
            t.probe_in_flight = false;
        }
    }
}

/// Builds [`BreakerService`]s for one request.
#[derive(Clone)]
pub struct BreakerLayer {
    state: Arc<ServiceState>,
    policy: Arc<Policy>,
    deadline: Instant,
    /// A gRPC request: its response's `grpc-status` counts too (see [`is_failure`]).
    grpc: bool,
}

impl BreakerLayer {
    pub fn new(
        state: Arc<ServiceState>,
        policy: Arc<Policy>,
        deadline: Instant,
        grpc: bool,
    ) -> Self {
        Self {
            state,
            policy,
            deadline,
            grpc,
        }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    layer: BreakerLayer,
}

impl<S, R, B> Service<R> for BreakerService<S>
where
    S: Service<R, Response = Response<B>, Error = PolicyError>,
{
    type Response = Response<B>;
    type Error = PolicyError;
    type Future = BreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PolicyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        match self.layer.state.breaker.admit() {
            Ok(permit) => BreakerFuture::Admitted {
                inner: self.inner.call(req),
                guard: Guard {
                    permit: Some(permit),
                    layer: self.layer.clone(),
                },
            },
            Err(e) => BreakerFuture::Refused { error: Some(e) },
        }
    }
}

/// Records the outcome once; on drop without one, counts a failure if the deadline passed
/// (the request timed out) and otherwise gives the permit back.
struct Guard {
    permit: Option<Permit>,
    layer: BreakerLayer,
}

impl Guard {
    fn record(&mut self, success: Option<bool>) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let breaker = &self.layer.state.breaker;
        match success {
            Some(ok) => breaker.record(permit, ok, &self.layer.policy.circuit_breaker),
            None => breaker.release(permit),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.permit.is_some() {
            let timed_out = Instant::now() >= self.layer.deadline;
            self.record(timed_out.then_some(false));
        }
    }
}

pin_project_lite::pin_project! {
    #[project = BreakerProj]
    pub enum BreakerFuture<F> {
        Admitted { #[pin] inner: F, guard: Guard },
        Refused { error: Option<PolicyError> },
    }
}

impl<F, B> Future for BreakerFuture<F>
where
    F: Future<Output = Result<Response<B>, PolicyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BreakerProj::Admitted { inner, guard } => {
                let result = ready!(inner.poll(cx));
                let outcome = match &result {
                    Ok(response) => Some(!is_failure(response, guard.layer.grpc)),
                    Err(PolicyError::Upstream {
                        failure: Failure::NoEndpoint,
                        ..
                    }) => None,
                    Err(
                        PolicyError::CircuitOpen
                        | PolicyError::RateLimited { .. }
                        | PolicyError::BadRequest(_),
                    ) => None,
                    Err(PolicyError::Upstream { .. } | PolicyError::Timeout(_)) => Some(false),
                };
                guard.record(outcome);
                Poll::Ready(result)
            }
            BreakerProj::Refused { error } => {
                Poll::Ready(Err(error.take().unwrap_or(PolicyError::CircuitOpen)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Fallback;

    fn config() -> CircuitBreaker {
        CircuitBreaker {
            consecutive_failures: 3,
            open_for: Duration::from_millis(100),
            max_open_for: Duration::from_millis(300),
            fallback: Fallback {
                status: 503,
                content_type: "text/plain".into(),
                body: "down".into(),
            },
        }
    }

    fn breaker() -> Breaker {
        Breaker::new(Arc::from("svc"), IntGauge::new("g", "g").expect("gauge"))
    }

    fn fail(b: &Breaker, c: &CircuitBreaker) {
        let p = b.admit().expect("admitted");
        b.record(p, false, c);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_half_opens_doubles_and_closes() {
        let (b, c) = (breaker(), config());
        fail(&b, &c);
        fail(&b, &c);
        // a success in between resets the count
        let p = b.admit().expect("admitted");
        b.record(p, true, &c);
        for _ in 0..3 {
            fail(&b, &c);
        }
        assert_eq!(b.state(), OPEN);
        assert!(matches!(b.admit(), Err(PolicyError::CircuitOpen)));

        tokio::time::advance(Duration::from_millis(101)).await;
        let probe = b.admit().expect("probe");
        assert_eq!(b.state(), HALF_OPEN);
        assert!(b.admit().is_err(), "one probe at a time");
        b.record(probe, false, &c);
        assert_eq!(b.state(), OPEN);

        // doubled: still open after the first open_for
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_millis(60)).await;
        let probe = b.admit().expect("probe after 200ms");
        b.record(probe, false, &c);
        // capped at max_open_for (300ms)
        tokio::time::advance(Duration::from_millis(301)).await;
        let probe = b.admit().expect("probe after 300ms");
        b.record(probe, true, &c);
        assert_eq!(b.state(), CLOSED);
        assert!(b.admit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_frees_the_slot() {
        let (b, c) = (breaker(), config());
        for _ in 0..3 {
            fail(&b, &c);
        }
        tokio::time::advance(Duration::from_millis(101)).await;
        let probe = b.admit().expect("probe");
        b.release(probe);
        assert!(b.admit().is_ok(), "the next request probes");
    }
}
