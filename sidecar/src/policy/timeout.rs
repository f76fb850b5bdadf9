//! The request's deadline, applied to each attempt. Every attempt of a request is bounded by
//! the same instant, the whole request's deadline (`timeout` after it arrived), and the retry
//! layer never starts a backoff or `Retry-After` wait that would end after it, so bounding the
//! attempts bounds the request: one timer per attempt, not one per attempt plus one for the
//! whole. It sits inside the breaker, which sees the timeout as a failure; the attempt reports
//! it to outlier detection when it is dropped at the deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service};

use super::PolicyError;

#[derive(Clone, Copy)]
pub struct TimeoutLayer {
    deadline: Instant,
    /// The configured budget, for the error message.
    timeout: Duration,
}

impl TimeoutLayer {
    pub fn new(deadline: Instant, timeout: Duration) -> Self {
        Self { deadline, timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            deadline: self.deadline,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    deadline: Instant,
    timeout: Duration,
}

impl<S, R> Service<R> for Timeout<S>
where
    S: Service<R, Error = PolicyError>,
{
    type Response = S::Response;
    type Error = PolicyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PolicyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        TimeoutFuture {
            inner: tokio::time::timeout_at(self.deadline, self.inner.call(req)),
            timeout: self.timeout,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        timeout: Duration,
    }
}

impl<F, T> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, PolicyError>>,
{
    type Output = Result<T, PolicyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll(cx)) {
            Ok(result) => result,
            Err(_) => Err(PolicyError::Timeout(*this.timeout)),
        })
    }
}
