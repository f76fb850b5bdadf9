//! Retries of one request, inside its deadline.
//!
//! - Up to `retry.attempts` tries in all; `attempts: 1` passes the request straight through
//!   (nothing is buffered or allocated).
//! - Retried on: the HTTP statuses in `retry.on`; `connect-error` (no connection could be made,
//!   or HTTP/2 `REFUSED_STREAM`: the request provably never reached the application); gRPC codes
//!   in `retry.on` read from a trailers-only response (`grpc-status` in the headers) or, when the
//!   first body frame is already the trailers, from those. An exchange that broke mid-way
//!   counts as a 503.
//! - POST, PATCH and other non-idempotent methods are retried only when the request never
//!   reached the upstream, unless the route names its method (`retry_non_idempotent`). A gRPC
//!   status listed in `retry.on` is the server's statement that the call may be retried (as in
//!   gRPC's own retry policy), so gRPC calls (always POST) are retried on those codes.
//! - Backoff: exponential with full jitter, `uniform(0, min(max, base·2^(n-1)))`. A
//!   `Retry-After` header (seconds or an HTTP date) on the response wins; when it does not fit in
//!   the time left before the deadline, the response is returned as is.
//! - Every retry must be paid for by the service's [`RetryBudget`](super::RetryBudget).
//! - Bodies: see [`Replay`]; a body known or found to be larger than `max_body` streams and is
//!   not retried. Upgrades (WebSocket) are never retried.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::future::Either;
use http::header::{HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::replay::Replay;
use super::{Failure, PolicyError, ServiceState, grpc_status};
use crate::config::{self, Policy};
use crate::proxy::http::{Body, is_upgrade_head};

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, PolicyError>> + Send>>;

/// Builds [`RetryService`]s for one request.
#[derive(Clone)]
pub struct RetryLayer {
    state: Arc<ServiceState>,
    policy: Arc<Policy>,
    /// The service's budget settings (per service, not per route: one budget per service).
    budget: config::RetryBudget,
    deadline: Instant,
    grpc: bool,
}

impl RetryLayer {
    pub fn new(
        state: Arc<ServiceState>,
        policy: Arc<Policy>,
        budget: config::RetryBudget,
        deadline: Instant,
        grpc: bool,
    ) -> Self {
        Self {
            state,
            policy,
            budget,
            deadline,
            grpc,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;
    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RetryService<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S, F> Service<Request<Body>> for RetryService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = PolicyError, Future = F>
        + Clone
        + Send
        + 'static,
    F: Future<Output = Result<Response<Body>, PolicyError>> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = PolicyError;
    type Future = Either<F, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PolicyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Every original request earns the service's budget, retried or not.
        self.layer.state.budget(self.layer.budget).deposit();
        let retry = &self.layer.policy.retry;
        if retry.attempts <= 1 || is_upgrade_head(req.version(), req.headers()) {
            return Either::Left(self.inner.call(req));
        }
        let (parts, body) = req.into_parts();
        let replay = match Replay::new(body, retry.max_body) {
            Ok(replay) => replay,
            Err(body) => return Either::Left(self.inner.call(Request::from_parts(parts, body))),
        };
        // The clone that was made ready is used for the first attempt.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Either::Right(Box::pin(retry_loop(
            inner,
            parts,
            replay,
            self.layer.clone(),
        )))
    }
}

/// What to do after an attempt.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done,
    /// Retry, after this long if the response said so.
    Retry(Option<Duration>),
}

async fn retry_loop<S, F>(
    mut inner: S,
    parts: http::request::Parts,
    replay: Replay,
    layer: RetryLayer,
) -> Result<Response<Body>, PolicyError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = PolicyError, Future = F> + Clone,
    F: Future<Output = Result<Response<Body>, PolicyError>> + Send,
{
    let policy = &layer.policy;
    let retry = &policy.retry;
    let idempotent = policy.retry_non_idempotent || is_idempotent(&parts.method);
    let mut attempt = 1u32;
    loop {
        let req = copy_request(&parts, replay.body());
        std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
        let result = inner.call(req).await;
        if attempt >= retry.attempts {
            return result;
        }
        let (result, verdict) = judge(result, idempotent, layer.grpc, policy, layer.deadline).await;
        let Verdict::Retry(retry_after) = verdict else {
            return result;
        };
        if !replay.can_replay() {
            return result;
        }
        let wait =
            retry_after.unwrap_or_else(|| backoff(retry.backoff.base, retry.backoff.max, attempt));
        if Instant::now() + wait >= layer.deadline {
            return result;
        }
        if !layer.state.budget(layer.budget).withdraw() {
            tracing::debug!(service = %layer.state.service, "retry budget spent: not retrying");
            return result;
        }
        drop(result);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        attempt += 1;
        layer.state.retries.inc();
        tracing::debug!(service = %layer.state.service, attempt, "retrying");
    }
}

/// Decides whether an attempt's outcome is worth a retry. A gRPC response with no status in
/// its headers has its first body frame read (within the deadline): if that frame is already
/// the trailers, their `grpc-status` counts; otherwise the frame is put back in front.
async fn judge(
    result: Result<Response<Body>, PolicyError>,
    idempotent: bool,
    grpc: bool,
    policy: &Policy,
    deadline: Instant,
) -> (Result<Response<Body>, PolicyError>, Verdict) {
    let on = &policy.retry.on;
    let response = match result {
        Ok(response) => response,
        Err(PolicyError::Upstream { failure, source }) => {
            let verdict = match failure {
                Failure::Connect | Failure::Refused if on.connect_error => Verdict::Retry(None),
                Failure::Exchange if idempotent && on.status(503) => Verdict::Retry(None),
                _ => Verdict::Done,
            };
            return (Err(PolicyError::Upstream { failure, source }), verdict);
        }
        Err(e) => return (Err(e), Verdict::Done),
    };
    let mut response = response;
    if grpc && !on.grpc_codes.is_empty() {
        let code = match grpc_status(response.headers()) {
            Some(code) => Some(code),
            None => {
                let (peeked, code) = peek_trailers(response, deadline).await;
                response = peeked;
                code
            }
        };
        if code.is_some_and(|c| on.grpc(c)) {
            return (Ok(response), Verdict::Retry(None));
        }
    }
    let verdict = status_verdict(&response, idempotent, policy);
    (Ok(response), verdict)
}

fn status_verdict(response: &Response<Body>, idempotent: bool, policy: &Policy) -> Verdict {
    if idempotent && policy.retry.on.status(response.status().as_u16()) {
        Verdict::Retry(
            response
                .headers()
                .get(RETRY_AFTER)
                .and_then(parse_retry_after),
        )
    } else {
        Verdict::Done
    }
}

/// Reads the first frame of a gRPC response body. Returns the response (with that frame put
/// back) and the `grpc-status` if the frame was the trailers.
async fn peek_trailers(
    response: Response<Body>,
    deadline: Instant,
) -> (Response<Body>, Option<i32>) {
    let (parts, mut body) = response.into_parts();
    if body.is_end_stream() {
        return (Response::from_parts(parts, body), None);
    }
    let first = match tokio::time::timeout_at(deadline, body.frame()).await {
        Ok(first) => first,
        // Out of time: the outer deadline answers; keep the body as it is.
        Err(_) => return (Response::from_parts(parts, body), None),
    };
    let Some(first) = first else {
        return (
            Response::from_parts(parts, crate::proxy::http::empty()),
            None,
        );
    };
    let code = first
        .as_ref()
        .ok()
        .and_then(|f| f.trailers_ref())
        .and_then(grpc_status);
    let front = futures_util::stream::once(std::future::ready(first));
    let rest = http_body_util::BodyStream::new(body);
    let body =
        http_body_util::StreamBody::new(futures_util::StreamExt::chain(front, rest)).boxed_unsync();
    (Response::from_parts(parts, body), code)
}

/// RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent; POST, PATCH and
/// extension methods are not.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Full jitter: uniform in `[0, min(max, base·2^(attempt-1))]`.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let cap = base.saturating_mul(factor).min(max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// A copy of the request head with a fresh body.
fn copy_request(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("1")),
            Some(Duration::from_secs(1))
        );
        let later = SystemTime::now() + Duration::from_secs(30);
        let date = HeaderValue::try_from(httpdate::fmt_http_date(later)).expect("date");
        let parsed = parse_retry_after(&date).expect("date parses");
        assert!(parsed > Duration::from_secs(27) && parsed <= Duration::from_secs(30));
        let past = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(100));
        for attempt in 1..10 {
            let cap = (base * 2u32.pow(attempt - 1)).min(max);
            for _ in 0..50 {
                assert!(backoff(base, max, attempt) <= cap);
            }
        }
        assert!(backoff(base, max, 40) <= max);
    }

    #[test]
    fn idempotency() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}

#[cfg(test)]
mod layer_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prometheus::{IntCounter, IntGauge};
    use tower::ServiceExt;

    use super::*;
    use crate::config::{Backoff, CircuitBreaker, Fallback, Outlier, RetryOn};
    use crate::proxy::http::empty;

    fn policy(attempts: u32, ratio: f64, min_per_second: u32) -> Arc<Policy> {
        Arc::new(Policy {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            retry: config::Retry {
                attempts,
                backoff: Backoff {
                    base: Duration::from_millis(1),
                    max: Duration::from_millis(2),
                },
                on: RetryOn {
                    statuses: vec![503],
                    connect_error: true,
                    grpc_codes: vec![14],
                },
                budget: config::RetryBudget {
                    ratio,
                    min_per_second,
                },
                max_body: 1024,
            },
            circuit_breaker: CircuitBreaker {
                consecutive_failures: 1_000_000,
                open_for: Duration::from_secs(1),
                max_open_for: Duration::from_secs(1),
                fallback: Fallback {
                    status: 503,
                    content_type: String::new(),
                    body: String::new(),
                },
            },
            outlier: Outlier {
                consecutive_failures: 3,
                eject_for: Duration::from_secs(1),
            },
            retry_non_idempotent: false,
        })
    }

    fn state(budget: config::RetryBudget) -> Arc<ServiceState> {
        Arc::new(ServiceState::new(
            "svc",
            budget,
            IntCounter::new("r", "r").expect("metric"),
            IntCounter::new("e", "e").expect("metric"),
            IntGauge::new("g", "g").expect("metric"),
        ))
    }

    /// Answers 503 always; counts calls.
    fn failing(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = PolicyError,
        Future = std::future::Ready<Result<Response<Body>, PolicyError>>,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(empty());
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            std::future::ready(Ok(r))
        })
    }

    #[tokio::test]
    async fn budget_bounds_retries_of_a_stream_of_failures() {
        let p = policy(3, 0.2, 0);
        let st = state(p.retry.budget);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let layer = RetryLayer::new(
                st.clone(),
                p.clone(),
                p.retry.budget,
                Instant::now() + Duration::from_secs(2),
                false,
            );
            let r = layer
                .layer(failing(calls.clone()))
                .oneshot(Request::new(empty()))
                .await
                .expect("response");
            assert_eq!(r.status(), 503);
        }
        let calls = calls.load(Ordering::SeqCst);
        assert!((118..=120).contains(&calls), "{calls}");
        assert_eq!(st.retries.get() as usize, calls - 100);
    }

    #[tokio::test]
    async fn one_attempt_passes_through() {
        let p = policy(1, 0.2, 10);
        let st = state(p.retry.budget);
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RetryLayer::new(
            st,
            p.clone(),
            p.retry.budget,
            Instant::now() + Duration::from_secs(2),
            false,
        );
        let mut svc = layer.layer(failing(calls.clone()));
        let fut = svc.call(Request::new(empty()));
        assert!(matches!(fut, Either::Left(_)), "no boxing, no buffering");
        assert_eq!(fut.await.expect("response").status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
