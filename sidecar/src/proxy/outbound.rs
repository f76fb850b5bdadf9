//! The outbound listener's request path: the local app's calls to other services.
//! Route by authority (proxy-form URI, `Host`, h2 `:authority`, or the target of a `CONNECT`
//! tunnel) → the service's policy (timeout, gRPC deadline) → an endpoint → a pooled connection.
//! Requests addressed to the sidecar itself go to the local API (the broker bridge).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::http::{
    Body, CORRELATION_ID, ErrorKind, GRPC_TIMEOUT, OUTRIDER_PEER, ProxyError, boxed, empty,
    ensure_correlation_id, grpc_timeout_value, is_grpc, is_upgrade_head, parse_grpc_timeout,
    strip_hop_by_hop,
};
use super::route::{is_local, parse_authority};
use super::{Shared, Upstream, server};
use crate::balance::NoEndpoint;
use crate::config::Policy;

/// How long a request waits for a new service's first endpoint resolution.
const FIRST_RESOLUTION_WAIT: Duration = Duration::from_secs(2);

/// Handles one request from the local app. `tunnel` is the target of the `CONNECT` tunnel the
/// request arrived in, if any (it is the authority when the request names none).
pub async fn handle(
    shared: Arc<Shared>,
    listener: SocketAddr,
    tunnel: Option<Arc<str>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let grpc = is_grpc(&req);
    if req.method() == Method::CONNECT {
        return connect(shared, listener, req);
    }
    let config = shared.config.load_full();
    if let Some(too_big) = head_too_large(&req, config.limits.max_header_bytes) {
        return too_big.into_response(grpc);
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .or_else(|| tunnel.as_deref().map(str::to_owned));
    let Some(authority) = authority else {
        return ProxyError::new(
            ErrorKind::BadRequest,
            "the request names no service (no authority or Host)",
        )
        .into_response(grpc);
    };
    if is_local(&authority, listener) {
        return match &shared.local_api {
            Some(api) => api.handle(req).await,
            None => ProxyError::new(
                ErrorKind::NotFound,
                "no local API here: the broker is not configured",
            )
            .into_response(grpc),
        };
    }
    let Some(name) = parse_authority(&authority) else {
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
    let service = upstream.target.service.clone();
    let policy = config
        .policies
        .for_request(&service, req.method(), req.uri().path())
        .clone();

    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (mut parts, body) = req.into_parts();
    let correlation_id = ensure_correlation_id(&mut parts.headers);
    let mut timeout = policy.timeout;
    if grpc && let Some(deadline) = parts.headers.get(GRPC_TIMEOUT).and_then(parse_grpc_timeout) {
        timeout = timeout.min(deadline);
    }
    let upgrade = is_upgrade_head(parts.version, &parts.headers);
    let client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(OUTRIDER_PEER);
    if grpc {
        parts
            .headers
            .insert(GRPC_TIMEOUT, grpc_timeout_value(timeout));
    }
    set_upstream_uri(&mut parts, &authority);
    let upstream_req = Request::from_parts(parts, boxed(body));

    let outcome = tokio::time::timeout(
        timeout,
        forward(&upstream, &policy, upstream_req, client_upgrade),
    )
    .await;
    let (response, endpoint) = match outcome {
        Ok(Ok((response, endpoint))) => (response, Some(endpoint)),
        Ok(Err(error)) => (error.into_response(grpc), None),
        Err(_) => (
            ProxyError::new(
                ErrorKind::Timeout,
                format!("{service} did not answer within {}ms", timeout.as_millis()),
            )
            .into_response(grpc),
            None,
        ),
    };
    let mut response = response;
    response
        .headers_mut()
        .insert(CORRELATION_ID, correlation_id.clone());
    record(&shared, &service, response.status(), started);
    if config.access_log {
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

/// HTTP/2 keeps the service's authority in `:authority`; HTTP/1.1 sends origin form with `Host`.
fn set_upstream_uri(parts: &mut http::request::Parts, authority: &str) {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .to_owned();
    if parts.version == http::Version::HTTP_2 {
        if let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
        {
            parts.uri = uri;
        }
    } else {
        if let Ok(uri) = path_and_query.parse::<Uri>() {
            parts.uri = uri;
        }
        if !parts.headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority)
        {
            parts.headers.insert(header::HOST, host);
        }
    }
}

/// Sends the request to one endpoint of the upstream.
async fn forward(
    upstream: &Upstream,
    policy: &Policy,
    req: Request<Body>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<(Response<Body>, SocketAddr), ProxyError> {
    let balancer = &upstream.balancer;
    let in_flight = match balancer.pick() {
        Ok(p) => p,
        Err(NoEndpoint::Pending) => {
            balancer.ready(FIRST_RESOLUTION_WAIT).await;
            balancer.pick().map_err(no_endpoint)?
        }
        Err(e) => return Err(no_endpoint(e)),
    };
    let endpoint = in_flight.endpoint.clone();
    let result = if client_upgrade.is_some() {
        endpoint
            .pool
            .send_upgrade(req, policy.connect_timeout)
            .await
    } else {
        endpoint.pool.send(req, policy.connect_timeout).await
    };
    match result {
        Ok(mut response) => {
            in_flight.finish(response.status().as_u16() < 500, &policy.outlier);
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client) = client_upgrade
            {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(splice(client, upstream_upgrade));
                let (mut parts, _) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers, true);
                return Ok((Response::from_parts(parts, empty()), endpoint.addr));
            }
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            Ok((Response::from_parts(parts, boxed(body)), endpoint.addr))
        }
        Err(error) if error.client_body_failed() => {
            // Not the endpoint's fault: no outlier penalty.
            in_flight.finish(true, &policy.outlier);
            Err(ProxyError::new(
                ErrorKind::BadRequest,
                "the request body was malformed or cut short",
            ))
        }
        Err(error) => {
            in_flight.finish(false, &policy.outlier);
            tracing::debug!(%error, service = %upstream.target.service, "upstream request failed");
            Err(ProxyError::new(
                ErrorKind::Unavailable,
                format!("{} is unavailable: {error}", upstream.target.service),
            ))
        }
    }
}

fn no_endpoint(e: NoEndpoint) -> ProxyError {
    ProxyError::new(ErrorKind::Unavailable, e.to_string())
}

/// Copies bytes both ways between an upgraded client and upstream connection.
pub async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// `CONNECT service:port`: answer 200, then serve HTTP inside the tunnel as if it had arrived on
/// the listener, with the tunnel's target as the default authority.
fn connect(shared: Arc<Shared>, listener: SocketAddr, req: Request<Incoming>) -> Response<Body> {
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
    let on_upgrade = hyper::upgrade::on(req);
    let target: Arc<str> = Arc::from(target);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            server::serve_tunnel(shared, listener, target, upgraded).await;
        }
    });
    Response::new(empty())
}

/// The size of a request head as it would be on the wire (request line and headers).
fn head_size<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
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

fn record(shared: &Shared, service: &str, status: StatusCode, started: Instant) {
    let m = &shared.metrics;
    m.requests_total
        .with_label_values(&["outbound", service, status.as_str()])
        .inc();
    m.request_duration_seconds
        .with_label_values(&["outbound", service])
        .observe(started.elapsed().as_secs_f64());
}

fn finish_error(
    shared: &Shared,
    service: &str,
    started: Instant,
    grpc: bool,
    error: ProxyError,
) -> Response<Body> {
    let response = error.into_response(grpc);
    record(shared, service, response.status(), started);
    response
}
