//! The outbound listener's request path: the local app's calls to other services.
//! Route by authority (proxy-form URI, `Host`, h2 `:authority`, or the target of a `CONNECT`
//! tunnel) → the request's policy (route, service or default) → the policy stack
//! (`Retry → Breaker → Timeout`, see [`crate::policy`]) → [`Attempt`]: one endpoint chosen by the
//! balancer, one send on a pooled connection. Requests addressed to the sidecar itself go to the
//! local API (the broker bridge).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tower::{Service, ServiceBuilder, ServiceExt};

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri};

use super::http::{
    Body, CORRELATION_ID, ErrorKind, GRPC_TIMEOUT, ORIG_PROTO, OUTRIDER_PEER, ProxyError,
    authority_from_host, empty, ensure_correlation_id, grpc_timeout_value, is_grpc,
    is_upgrade_head, never_index_trace_context, parse_grpc_timeout, relay_response,
    set_absolute_uri, share_small, strip_hop_by_hop,
};
use super::http2::server::PendingTunnel;
use super::pool::SendError;
use super::route::{is_local, parse_authority};
use super::{Shared, Upstream, server};
use crate::balance::{InFlight, NoEndpoint};
use crate::config::{Policy, RetryBudget};
use crate::metrics::RequestMetrics;
use crate::policy::{BreakerLayer, Failure, PolicyError, RetryLayer, TimeoutLayer};

/// How long a request waits for a new service's first endpoint resolution.
const FIRST_RESOLUTION_WAIT: Duration = Duration::from_secs(2);

/// Handles one request from the local app. `tunnel` is the target of the `CONNECT` tunnel the
/// request arrived in, if any (it is the authority when the request names none).
#[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
pub fn handle(
    shared: Arc<Shared>,
    listener: SocketAddr,
    tunnel: Option<Arc<str>>,
    req: Request<Body>,
) -> impl Future<Output = Response<Body>> + Send + 'static {
    async move {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        if req.method() == Method::CONNECT {
            return connect(shared, listener, req);
        }
        let config = shared.config.load_full();
        if let Some(too_big) = head_too_large(&req, config.limits.max_header_bytes) {
            return too_big.into_response(grpc);
        }
        // An `Authority` is a shared byte string: taking the URI's is a reference-count increment,
        // and the upstream URI below reuses it.
        let authority = match req.uri().authority() {
            Some(a) => Some(a.clone()),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(authority_from_host)
                .or_else(|| tunnel.as_deref().and_then(|t| Authority::try_from(t).ok())),
        };
        let Some(authority) = authority else {
            return ProxyError::new(
                ErrorKind::BadRequest,
                "the request names no service (no authority or Host)",
            )
            .into_response(grpc);
        };
        if is_local(authority.as_str(), listener) {
            return match &shared.local_api {
                Some(api) => api.handle(req).await,
                None => ProxyError::new(
                    ErrorKind::NotFound,
                    "no local API here: the broker is not configured",
                )
                .into_response(grpc),
            };
        }
        let Some(name) = parse_authority(authority.as_str()) else {
            return finish_error(
                &shared,
                "unknown",
                started,
                grpc,
                ProxyError::new(
                    ErrorKind::UnknownService,
                    format!("`{authority}` does not name a mesh service"),
                ),
            );
        };
        let Some(upstream) = shared.upstream(&name.service, name.namespace.as_deref()) else {
            let service = name.service.into_owned();
            return finish_error(
                &shared,
                &service,
                started,
                grpc,
                ProxyError::new(
                    ErrorKind::UnknownService,
                    format!("unknown service `{service}`"),
                ),
            );
        };
        let service = upstream.target.service.as_str();
        let policy = config
            .policies
            .for_request(service, req.method(), req.uri().path())
            .clone();

        // Kept for the access log only (the path is a copy).
        let logged = config
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let (mut parts, body) = req.into_parts();
        let correlation_id = ensure_correlation_id(&mut parts.headers);
        never_index_trace_context(&mut parts.headers);
        let mut timeout = policy.timeout;
        if grpc && let Some(deadline) = parts.headers.get(GRPC_TIMEOUT).and_then(parse_grpc_timeout)
        {
            timeout = timeout.min(deadline);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let upgrade = is_upgrade_head(parts.version, &parts.headers);
        if upgrade && let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        {
            parts
                .extensions
                .insert(ClientUpgrade(Arc::new(std::sync::Mutex::new(Some(
                    on_upgrade,
                )))));
        }
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(OUTRIDER_PEER);
        parts.headers.remove(ORIG_PROTO);
        set_upstream_uri(&mut parts, &authority);
        let upstream_req = Request::from_parts(parts, body);

        let target = Target {
            upstream: upstream.clone(),
            policy: policy.clone(),
            budget: config.policies.for_service(service).retry.budget,
            access_log: config.access_log,
            deadline,
            timeout,
            grpc,
        };
        let mut response = match call_stack(target, upstream_req).await {
            Ok(response) => response,
            Err(error) => policy_error(service, &policy, error).into_response(grpc),
        };
        response
            .headers_mut()
            .insert(CORRELATION_ID, correlation_id.clone());
        upstream
            .requests
            .record(response.status(), started.elapsed());
        if let Some((method, path)) = logged {
            let endpoint = response.extensions().get::<UpstreamAddr>().map(|a| a.0);
            tracing::info!(
                target: "outrider::access",
                direction = "outbound",
                correlation_id = correlation_id.to_str().unwrap_or(""),
                method = %method,
                authority = %authority,
                path = %path,
                status = response.status().as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                upstream = %endpoint.map(|e| e.to_string()).unwrap_or_default(),
            );
        }
        response
    }
}

/// What the policy stack of one request is built for (a typed target, as in linkerd2-proxy).
struct Target {
    upstream: Arc<Upstream>,
    policy: Arc<Policy>,
    /// The service's retry budget settings (one budget per service).
    budget: RetryBudget,
    /// Note the answering endpoint in the response (an extension: an allocation, so only when
    /// the access log wants it).
    access_log: bool,
    deadline: tokio::time::Instant,
    timeout: Duration,
    grpc: bool,
}

/// Builds the outbound stack for one request and calls it: `Retry → Breaker → Timeout →
/// Attempt`. Building it allocates nothing (structs of `Arc`s). A plain fn returning an
/// `impl Future + Send` (rather than inline in the async handler) so the compiler proves `Send`
/// with concrete lifetimes.
fn call_stack(
    t: Target,
    req: Request<Body>,
) -> impl Future<Output = Result<Response<Body>, PolicyError>> + Send + 'static {
    let state = t.upstream.state.clone();
    ServiceBuilder::new()
        .layer(RetryLayer::new(
            state.clone(),
            t.policy.clone(),
            t.budget,
            t.deadline,
            t.grpc,
        ))
        .layer(BreakerLayer::new(
            state,
            t.policy.clone(),
            t.deadline,
            t.grpc,
        ))
        .layer(TimeoutLayer::new(t.deadline, t.timeout))
        .service(Attempt {
            upstream: t.upstream,
            policy: t.policy,
            deadline: t.deadline,
            grpc: t.grpc,
            access_log: t.access_log,
        })
        .oneshot(req)
}

/// The client side of an upgrade (WebSocket), carried to the attempt in the request's
/// extensions. Upgrades are never retried, so exactly one attempt takes it.
#[derive(Clone)]
struct ClientUpgrade(Arc<std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>>);

/// The endpoint that answered, in the response's extensions (for the access log).
#[derive(Clone, Copy)]
struct UpstreamAddr(SocketAddr);

/// Renders a policy-stack error as the sidecar's own response (CONTRACT §4 error table).
fn policy_error(service: &str, policy: &Policy, error: PolicyError) -> ProxyError {
    match error {
        PolicyError::Timeout(after) => ProxyError::new(
            ErrorKind::Timeout,
            format!("{service} did not answer within {}ms", after.as_millis()),
        ),
        PolicyError::CircuitOpen => {
            let fallback = &policy.circuit_breaker.fallback;
            let mut e = ProxyError::new(
                ErrorKind::CircuitOpen,
                format!("the circuit to {service} is open"),
            );
            e.fallback = Some((
                StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                fallback.content_type.clone(),
                Bytes::copy_from_slice(fallback.body.as_bytes()),
            ));
            e
        }
        PolicyError::Upstream { failure, source } => {
            tracing::debug!(error = %source, ?failure, service, "upstream request failed");
            ProxyError::new(
                ErrorKind::Unavailable,
                format!("{service} is unavailable: {source}"),
            )
        }
        PolicyError::RateLimited { retry_after } => {
            ProxyError::new(ErrorKind::RateLimited, "too many requests")
                .with_retry_after(retry_after)
        }
        PolicyError::BadRequest(message) => ProxyError::new(ErrorKind::BadRequest, message),
    }
}

/// The upstream URI is absolute (`http://authority/path`) whatever the version: HTTP/2 needs it
/// for `:authority`, and an HTTP/1.x request that rides HTTP/2 to the other sidecar (the
/// default) takes its authority from it without parsing `Host` again. HTTP/1.x also keeps
/// `Host`; the pool writes origin form on HTTP/1.1 connections ([`super::pool`]).
fn set_upstream_uri(parts: &mut http::request::Parts, authority: &Authority) {
    if parts.version != http::Version::HTTP_2
        && !parts.headers.contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_maybe_shared(share_small(authority.as_str().as_bytes()))
    {
        parts.headers.insert(header::HOST, host);
    }
    set_absolute_uri(parts, authority.clone());
}

/// One attempt: an endpoint chosen by the balancer, one send. Reports the outcome to the
/// endpoint's outlier detection and latency estimate. The innermost service of the outbound
/// stack; the [`TimeoutLayer`] around it bounds it by the request's deadline.
#[derive(Clone)]
pub struct Attempt {
    upstream: Arc<Upstream>,
    policy: Arc<Policy>,
    deadline: tokio::time::Instant,
    grpc: bool,
    access_log: bool,
}

impl Service<Request<Body>> for Attempt {
    type Response = Response<Body>;
    type Error = PolicyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, PolicyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), PolicyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

impl Attempt {
    #[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
    fn send(
        self,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, PolicyError>> + Send + 'static {
        async move {
            let balancer = &self.upstream.balancer;
            let in_flight = match balancer.pick() {
                Ok(p) => p,
                Err(NoEndpoint::Pending) => {
                    balancer.ready(FIRST_RESOLUTION_WAIT).await;
                    balancer.pick().map_err(no_endpoint)?
                }
                Err(e) => return Err(no_endpoint(e)),
            };
            let endpoint = in_flight.endpoint.clone();
            let outcome = Outcome {
                in_flight: Some(in_flight),
                attempt: &self,
            };
            if self.grpc {
                let left = self
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                req.headers_mut()
                    .insert(GRPC_TIMEOUT, grpc_timeout_value(left));
            }
            let client_upgrade = req
                .extensions_mut()
                .remove::<ClientUpgrade>()
                .and_then(|u| u.0.lock().unwrap_or_else(|p| p.into_inner()).take());
            let connect_timeout = self.policy.connect_timeout;
            let sent = if client_upgrade.is_some() {
                // Boxed: rare, and its future would otherwise size every attempt's.
                Box::pin(endpoint.pool.send_upgrade(req, connect_timeout)).await
            } else {
                endpoint.pool.send(req, connect_timeout).await
            };
            match sent {
                Ok(response) => {
                    outcome.finish(!crate::policy::is_failure(&response, self.grpc));
                    let mut response = relay_response(response, client_upgrade);
                    if self.access_log {
                        response
                            .extensions_mut()
                            .insert(UpstreamAddr(endpoint.addr));
                    }
                    Ok(response)
                }
                Err(error) if error.client_body_failed() => {
                    // Not the endpoint's fault: no outlier penalty.
                    outcome.finish(true);
                    Err(PolicyError::BadRequest(
                        "the request body was malformed or cut short".into(),
                    ))
                }
                Err(error) => {
                    outcome.finish(false);
                    Err(PolicyError::upstream(failure_of(&error), error))
                }
            }
        }
    }
}

/// An attempt's report to outlier detection. An attempt the [`TimeoutLayer`] drops at the
/// deadline counts as the endpoint's failure, like one that failed; one dropped earlier (the
/// client went away) counts as nothing.
struct Outcome<'a> {
    in_flight: Option<InFlight>,
    attempt: &'a Attempt,
}

impl Outcome<'_> {
    fn finish(mut self, success: bool) {
        if let Some(in_flight) = self.in_flight.take() {
            self.report(in_flight, success);
        }
    }

    fn report(&self, in_flight: InFlight, success: bool) {
        if in_flight.finish(success, &self.attempt.policy.outlier) {
            self.attempt.upstream.state.ejections.inc();
        }
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if let Some(in_flight) = self.in_flight.take()
            && tokio::time::Instant::now() >= self.attempt.deadline
        {
            self.report(in_flight, false);
        }
    }
}

/// Classifies a send error: connect errors and refused HTTP/2 streams never reached the app.
fn failure_of(error: &SendError) -> Failure {
    if error.never_sent() {
        return Failure::Connect;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return Failure::Refused;
        }
        source = e.source();
    }
    Failure::Exchange
}

fn no_endpoint(e: NoEndpoint) -> PolicyError {
    PolicyError::upstream(Failure::NoEndpoint, e.to_string())
}

/// `CONNECT service:port`: answer 200, then serve HTTP inside the tunnel as if it had arrived on
/// the listener, with the tunnel's target as the default authority.
fn connect(shared: Arc<Shared>, listener: SocketAddr, mut req: Request<Body>) -> Response<Body> {
    let Some(target) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        return ProxyError::new(
            ErrorKind::BadRequest,
            "CONNECT needs an authority (host:port)",
        )
        .into_response(false);
    };
    if !is_local(&target, listener) {
        let known = parse_authority(&target)
            .and_then(|n| shared.upstream(&n.service, n.namespace.as_deref()))
            .is_some();
        if !known {
            return ProxyError::new(
                ErrorKind::UnknownService,
                format!("`{target}` does not name a mesh service"),
            )
            .into_response(false);
        }
    }
    let target: Arc<str> = Arc::from(target);
    // Over HTTP/2 the tunnel is the request's stream; over HTTP/1.1, the upgraded connection.
    if let Some(pending) = req.extensions_mut().remove::<PendingTunnel>() {
        tokio::spawn(async move {
            if let Some(tunnel) = pending.established().await {
                server::serve_tunnel(shared, listener, target, tunnel).await;
            }
        });
        return Response::new(empty());
    }
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            server::serve_tunnel(
                shared,
                listener,
                target,
                hyper_util::rt::TokioIo::new(upgraded),
            )
            .await;
        }
    });
    Response::new(empty())
}

/// The length of a URI as written (without formatting it: this runs on every request).
fn uri_len(uri: &Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + 3);
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let path = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    scheme + authority + path
}

/// The size of a request head as it would be on the wire (request line and headers).
fn head_size<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len() + uri_len(req.uri()) + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (line + headers) as u64
}

/// 431 for heads over `limits.max_header_bytes`.
pub fn head_too_large<B>(req: &Request<B>, max: u64) -> Option<ProxyError> {
    (head_size(req) > max).then(|| {
        ProxyError::new(
            ErrorKind::BadRequest,
            format!("the request head is larger than {max} bytes"),
        )
        .with_status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    })
}

fn finish_error(
    shared: &Shared,
    service: &str,
    started: Instant,
    grpc: bool,
    error: ProxyError,
) -> Response<Body> {
    let response = error.into_response(grpc);
    // A request that names no known service has no upstream to hold its metric handles: they
    // are looked up for this one request.
    RequestMetrics::new(&shared.metrics, "outbound", service)
        .record(response.status(), started.elapsed());
    response
}
