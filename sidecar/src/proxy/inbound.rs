//! The inbound listener's request path: calls from other sidecars, already authenticated by
//! the mTLS handshake, admitted by the inbound limits (`inbound.rate_limit`,
//! `inbound.max_concurrent`: a [`LimitLayer`] in front), authorized here, and handed to the local
//! app once (no retries: those are the caller's sidecar's work). The app gets `x-outrider-peer`
//! with the caller's SPIFFE ID.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::header::HeaderValue;
use http::uri::Authority;
use http::{Request, Response};

use tower::{Layer, ServiceExt, service_fn};

use super::Shared;
use super::http::{
    Body, CORRELATION_ID, ErrorKind, OUTRIDER_PEER, ProxyError, ensure_correlation_id, is_grpc,
    is_upgrade_head, relay_response, restore_orig_proto, set_absolute_uri, strip_hop_by_hop,
};
use super::outbound::head_too_large;
use crate::config::{AuthzRule, Config};
use crate::metrics::{Metrics, RequestMetrics};
use crate::policy::{LimitLayer, PolicyError};
use crate::tls::SpiffeId;

/// How long to wait for a connection to the local app.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The authenticated caller of an inbound connection.
pub struct Peer {
    /// The caller's SPIFFE ID (None when mTLS is disabled).
    pub id: Option<String>,
    header: Option<HeaderValue>,
    /// The request metrics of the caller's service (`unknown` without an identity), looked up
    /// once per connection.
    requests: RequestMetrics,
}

impl Peer {
    pub fn new(id: Option<String>, metrics: &Metrics) -> Self {
        let service = id
            .as_deref()
            .and_then(SpiffeId::parse)
            .map(|s| s.service)
            .unwrap_or_else(|| "unknown".to_string());
        let header = id.as_deref().and_then(|id| HeaderValue::from_str(id).ok());
        Self {
            id,
            header,
            requests: RequestMetrics::new(metrics, "inbound", &service),
        }
    }

    /// The caller's service name, for metrics.
    pub fn service(&self) -> &str {
        self.requests.service()
    }
}

/// Handles one request from another sidecar.
#[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
pub fn handle(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    req: Request<Body>,
) -> impl Future<Output = Response<Body>> + Send + 'static {
    async move {
        let started = Instant::now();
        let grpc = is_grpc(&req);
        let config = shared.config.load_full();
        if let Some(too_big) = head_too_large(&req, config.limits.max_header_bytes) {
            return finish(&peer, started, too_big.into_response(grpc));
        }
        if shared.inbound_limits.load().is_unlimited() {
            return serve(shared, peer, started, grpc, config, req).await;
        }
        let limits = shared.inbound_limits.load_full();
        let limited = limited(
            limits,
            shared.clone(),
            peer.clone(),
            started,
            grpc,
            config,
            req,
        );
        match limited.await {
            Ok(response) => response,
            Err(error) => {
                shared.metrics.rate_limited_total.inc();
                let retry_after = match error {
                    PolicyError::RateLimited { retry_after } => retry_after,
                    _ => Duration::from_secs(1),
                };
                let refused = ProxyError::new(ErrorKind::RateLimited, "too many requests")
                    .with_retry_after(retry_after);
                finish(&peer, started, refused.into_response(grpc))
            }
        }
    }
}

/// `serve` behind the [`LimitLayer`]. A plain fn returning `impl Future + Send` so the compiler
/// proves `Send` with concrete lifetimes.
fn limited(
    limits: Arc<crate::policy::InboundLimits>,
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    started: Instant,
    grpc: bool,
    config: Arc<Config>,
    req: Request<Body>,
) -> impl Future<Output = Result<Response<Body>, PolicyError>> + Send + 'static {
    let service = service_fn(move |req: Request<Body>| {
        serve(
            shared.clone(),
            peer.clone(),
            started,
            grpc,
            config.clone(),
            req,
        )
        .map(Ok::<Response<Body>, PolicyError>)
    });
    LimitLayer::new(limits).layer(service).oneshot(req)
}

/// Authorizes the request and hands it to the app.
#[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
fn serve(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    started: Instant,
    grpc: bool,
    config: Arc<Config>,
    req: Request<Body>,
) -> impl Future<Output = Response<Body>> + Send + 'static {
    async move {
        if !authorized(&config.inbound.authorize, &peer, &req) {
            shared
                .metrics
                .authz_denied_total
                .with_label_values(&[peer.service()])
                .inc();
            tracing::info!(
                caller = peer.id.as_deref().unwrap_or("-"),
                method = %req.method(),
                path = req.uri().path(),
                "request denied by inbound.authorize"
            );
            let denied = ProxyError::new(
                ErrorKind::Forbidden,
                format!(
                    "{} may not call {} {}",
                    peer.id.as_deref().unwrap_or("this caller"),
                    req.method(),
                    req.uri().path()
                ),
            );
            return finish(&peer, started, denied.into_response(grpc));
        }

        // Kept for the access log only (the path is a copy).
        let logged = config
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let (mut parts, body) = req.into_parts();
        let correlation_id = ensure_correlation_id(&mut parts.headers);
        let upgrade = is_upgrade_head(parts.version, &parts.headers);
        let client_upgrade = if upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        strip_hop_by_hop(&mut parts.headers, upgrade);
        restore_orig_proto(&mut parts);
        // Only this sidecar may say who the caller is (`insert` drops every value the caller sent).
        match &peer.header {
            Some(value) => {
                parts.headers.insert(OUTRIDER_PEER, value.clone());
            }
            None => {
                parts.headers.remove(OUTRIDER_PEER);
            }
        }
        set_app_uri(&mut parts, config.app);
        let app_req = Request::from_parts(parts, body);

        let result = if client_upgrade.is_some() {
            // Boxed: rare, and its future would otherwise size every request's.
            Box::pin(shared.app.send_upgrade(app_req, APP_CONNECT_TIMEOUT)).await
        } else {
            shared.app.send(app_req, APP_CONNECT_TIMEOUT).await
        };
        let mut response = match result {
            Ok(response) => relay_response(response, client_upgrade),
            Err(error) if error.client_body_failed() => ProxyError::new(
                ErrorKind::BadRequest,
                "the request body was malformed or cut short",
            )
            .into_response(grpc),
            Err(error) => {
                tracing::warn!(%error, "the local app is unreachable");
                ProxyError::new(ErrorKind::Unavailable, "the service's app is unreachable")
                    .into_response(grpc)
            }
        };
        if let Some((method, path)) = logged {
            tracing::info!(
                target: "outrider::access",
                direction = "inbound",
                correlation_id = correlation_id.to_str().unwrap_or(""),
                method = %method,
                path = %path,
                caller = peer.id.as_deref().unwrap_or("-"),
                status = response.status().as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                upstream = %config.app,
            );
        }
        response
            .headers_mut()
            .insert(CORRELATION_ID, correlation_id);
        finish(&peer, started, response)
    }
}

/// Over HTTP/2 the app gets `http://authority/path`, with the app's address when the request
/// named no authority, built from the parts already parsed (shared bytes: no copy, no parse).
/// HTTP/1.x URIs are left as they are: the pool writes origin form on every HTTP/1.1
/// connection ([`super::http::origin_form`]).
fn set_app_uri(parts: &mut http::request::Parts, app: std::net::SocketAddr) {
    if parts.version != http::Version::HTTP_2 {
        return;
    }
    let authority = match parts.uri.authority() {
        Some(authority) => authority.clone(),
        None => match Authority::try_from(app.to_string()) {
            Ok(authority) => authority,
            Err(_) => return,
        },
    };
    set_absolute_uri(parts, authority);
}

/// Without rules every authenticated peer may call; with rules, one must match.
fn authorized<B>(rules: &[AuthzRule], peer: &Peer, req: &Request<B>) -> bool {
    if rules.is_empty() {
        return true;
    }
    let Some(id) = peer.id.as_deref() else {
        return false;
    };
    let path = req.uri().path();
    rules.iter().any(|rule| {
        rule.from.iter().any(|f| f == "*" || f == id)
            && rule
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.starts_with(prefix) && is_plain_path(path))
            && (rule.methods.is_empty() || rule.methods.iter().any(|m| m == req.method().as_str()))
    })
}

/// True when `path` means what it says to any app: no `.` or `..` segment (also not
/// percent-encoded) and no encoded `/` or `\`, nor a raw `\`. A path that fails this never
/// matches a `path_prefix` rule, so `/v1/../admin` cannot pass a `/v1/` rule and reach an app
/// that normalizes it to `/admin`.
fn is_plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return false;
    }
    lower
        .split('/')
        .map(|segment| segment.replace("%2e", "."))
        .all(|segment| segment != "." && segment != "..")
}

fn finish(peer: &Peer, started: Instant, response: Response<Body>) -> Response<Body> {
    peer.requests.record(response.status(), started.elapsed());
    response
}

#[cfg(test)]
mod authz_tests {
    use super::*;

    fn rule(from: &[&str], path_prefix: Option<&str>, methods: &[&str]) -> AuthzRule {
        AuthzRule {
            from: from.iter().map(|s| s.to_string()).collect(),
            path_prefix: path_prefix.map(str::to_string),
            methods: methods.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn allows(rules: &[AuthzRule], caller: Option<&str>, method: &str, path: &str) -> bool {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        authorized(
            rules,
            &Peer::new(caller.map(str::to_string), &Metrics::new()),
            &req,
        )
    }

    const WEB: &str = "spiffe://mesh.local/ns/default/sa/web";

    #[test]
    fn rules_match_caller_path_and_method() {
        assert!(allows(&[], Some(WEB), "DELETE", "/anything"));
        let rules = [
            rule(&[WEB], Some("/v1/"), &[]),
            rule(&["*"], Some("/public"), &["GET"]),
        ];
        assert!(allows(&rules, Some(WEB), "POST", "/v1/users"));
        assert!(!allows(&rules, Some(WEB), "POST", "/v2/users"));
        assert!(allows(
            &rules,
            Some("spiffe://mesh.local/ns/x/sa/y"),
            "GET",
            "/public/a"
        ));
        assert!(!allows(
            &rules,
            Some("spiffe://mesh.local/ns/x/sa/y"),
            "POST",
            "/public/a"
        ));
        assert!(!allows(
            &rules,
            Some("spiffe://mesh.local/ns/x/sa/y"),
            "GET",
            "/v1/users"
        ));
        // Without an authenticated identity (tls disabled) rules never match, not even `*`.
        assert!(!allows(&rules, None, "GET", "/public/a"));
    }

    #[test]
    fn dot_segments_and_encoded_separators_never_match_a_prefix() {
        let rules = [rule(&[WEB], Some("/v1/"), &[])];
        for sneaky in [
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/.%2e/admin",
            "/v1/..%2fadmin",
            "/v1/..%5Cadmin",
            "/v1/..\\admin",
        ] {
            assert!(!allows(&rules, Some(WEB), "GET", sneaky), "{sneaky}");
        }
        assert!(allows(
            &rules,
            Some(WEB),
            "GET",
            "/v1/a.b/..c/x..y/report%2ejson"
        ));
        // A rule without path_prefix does not look at the path.
        assert!(allows(
            &[rule(&[WEB], None, &[])],
            Some(WEB),
            "GET",
            "/v1/../x"
        ));
    }
}
