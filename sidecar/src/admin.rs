//! The admin listener (CONTRACT §6): `/live`, `/ready`, `/metrics`, `/config`, `/endpoints`,
//! `POST /shutdown`. Binds to loopback by default; `/shutdown` answers loopback callers only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::Shared;
use crate::proxy::http::{Body, full};

/// What `/ready` needs to know besides the shared state.
pub struct Readiness {
    /// Set once every listener is bound.
    pub listeners_bound: AtomicBool,
    /// The broker's state, if a broker is configured.
    pub broker: Option<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
}

pub struct Admin {
    pub shared: Arc<Shared>,
    pub readiness: Arc<Readiness>,
    pub shutdown: watch::Sender<bool>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::proxy::server::signalled(shutdown.clone()) => return,
        };
        let Ok((tcp, remote)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        let limits = admin.shared.config.load().limits;
        tokio::spawn(async move {
            let handle = move |req| std::future::ready(route(&admin, remote, req));
            crate::proxy::server::serve_http(tcp, &limits, handle, std::future::pending()).await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn route(admin: &Admin, remote: SocketAddr, req: Request<Body>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET | &Method::HEAD, "/ready") => match not_ready(admin) {
            None => text(StatusCode::OK, "ready\n"),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, admin.shared.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/config") => {
            let config = admin.shared.config.load();
            match serde_json::to_value(&**config) {
                Ok(value) => json(StatusCode::OK, &value),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::GET, "/endpoints") => {
            // One entry per known service: source, state (pending/ready/stale/unavailable),
            // endpoints, last error; see docs/discovery.md.
            let services = admin.shared.discovery.snapshot();
            json(StatusCode::OK, &serde_json::json!({ "services": services }))
        }
        (&Method::POST, "/shutdown") => {
            if let Err(reason) = shutdown_allowed(remote.ip(), req.headers()) {
                tracing::warn!(%remote, reason, "shutdown request refused");
                return text(StatusCode::FORBIDDEN, format!("{reason}\n"));
            }
            tracing::info!("shutdown requested through the admin API");
            let _ = admin.shutdown.send(true);
            text(StatusCode::ACCEPTED, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/endpoints" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /shutdown` answers loopback callers only (an IPv4-mapped `::ffff:127.0.0.1` counts as
/// loopback when the admin listener is bound to `[::]`), and never a browser: a web page can
/// send a cross-origin POST to `127.0.0.1`, and browsers always mark those with `Origin`.
fn shutdown_allowed(remote: IpAddr, headers: &http::HeaderMap) -> Result<(), &'static str> {
    if !remote.to_canonical().is_loopback() {
        return Err("shutdown is allowed from loopback only");
    }
    if headers.contains_key(header::ORIGIN) {
        return Err("shutdown is not allowed from a browser (the request has an Origin header)");
    }
    Ok(())
}

fn not_ready(admin: &Admin) -> Option<String> {
    if *admin.shutdown.borrow() {
        return Some("shutting down".into());
    }
    if !admin.readiness.listeners_bound.load(Ordering::Acquire) {
        return Some("listeners are not bound yet".into());
    }
    if let Some(broker) = &admin.readiness.broker
        && let Err(reason) = broker()
    {
        return Some(format!("broker: {reason}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_is_for_loopback_callers_without_origin() {
        let none = http::HeaderMap::new();
        for ok in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ok.parse().expect("ip");
            assert!(shutdown_allowed(ip, &none).is_ok(), "{ok}");
        }
        for refused in [
            "192.0.2.2",
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            let ip: IpAddr = refused.parse().expect("ip");
            assert!(shutdown_allowed(ip, &none).is_err(), "{refused}");
        }
        let mut browser = http::HeaderMap::new();
        browser.insert(
            header::ORIGIN,
            header::HeaderValue::from_static("https://evil.example"),
        );
        assert!(shutdown_allowed(IpAddr::from([127, 0, 0, 1]), &browser).is_err());
    }
}
