//! What every service shares: the client for its sidecar, correlation ids, delivery counters
//! (`GET /v1/_stats`), a health route and a JSON error type.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

pub const CORRELATION_ID: &str = "x-correlation-id";

/// The correlation id of a request: the caller's, or a new one.
pub fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get(CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Middleware: makes sure every request carries a correlation id (generated when the caller sent
/// none: only the gateway sees such requests, since sidecars always add one) and returns it.
pub async fn with_correlation_id(mut req: Request, next: Next) -> Response {
    let id = correlation_id(req.headers());
    let value = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid"));
    req.headers_mut().insert(CORRELATION_ID, value.clone());
    let mut res = next.run(req).await;
    res.headers_mut().insert(CORRELATION_ID, value);
    res
}

/// An error answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    /// A call through the sidecar failed: the service is unavailable to us for now.
    pub fn upstream(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, format!("upstream: {message}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<reqwest::Error> for ApiError {
    fn from(e: reqwest::Error) -> Self {
        Self::upstream(e)
    }
}

/// The service's view of its sidecar: every call to another service, every event and every
/// task goes to the sidecar's outbound listener, in plain HTTP (the `HTTP_PROXY` form).
#[derive(Clone)]
pub struct Mesh {
    http: reqwest::Client,
    outbound: SocketAddr,
}

impl Mesh {
    pub fn new(outbound: SocketAddr) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{outbound}"))?)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self { http, outbound })
    }

    /// A request to `service` (a mesh name such as `user-service`), carrying the correlation id.
    pub fn call(
        &self,
        method: reqwest::Method,
        service: &str,
        path: &str,
        correlation_id: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("http://{service}{path}"))
            .header(CORRELATION_ID, correlation_id)
    }

    /// Publishes an event (`POST /v1/events/{event}` on the sidecar); Ok once the broker confirmed.
    pub async fn publish(
        &self,
        event: &str,
        correlation_id: &str,
        payload: &impl Serialize,
    ) -> Result<(), ApiError> {
        self.broker("events", event, correlation_id, payload).await
    }

    /// Sends a task to a work queue (`POST /v1/queues/{queue}` on the sidecar).
    pub async fn enqueue(
        &self,
        queue: &str,
        correlation_id: &str,
        payload: &impl Serialize,
    ) -> Result<(), ApiError> {
        self.broker("queues", queue, correlation_id, payload).await
    }

    async fn broker(
        &self,
        kind: &str,
        name: &str,
        correlation_id: &str,
        payload: &impl Serialize,
    ) -> Result<(), ApiError> {
        let res = self
            .http
            .post(format!("http://localhost/v1/{kind}/{name}"))
            .header(CORRELATION_ID, correlation_id)
            .json(payload)
            .send()
            .await?;
        if res.status() == StatusCode::ACCEPTED {
            return Ok(());
        }
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        tracing::warn!(%status, %body, name, "the sidecar refused a message");
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not send {name}: {status} {body}"),
        ))
    }

    /// A gRPC channel to `service` through the sidecar (h2c, `:authority` naming the service).
    pub fn grpc(&self, service: &str) -> anyhow::Result<tonic::transport::Channel> {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.outbound))?
                .origin(format!("http://{service}").parse()?)
                .connect_timeout(Duration::from_secs(2));
        Ok(endpoint.connect_lazy())
    }
}

/// What arrived through the broker bridge, per event or queue and correlation id: the tests
/// check that each consumer received each event exactly once, with its correlation id intact.
#[derive(Default)]
pub struct Stats {
    deliveries: Mutex<BTreeMap<String, BTreeMap<String, Received>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// How many times the app handled a message with this correlation id.
    pub count: u32,
    /// What the message was about (e.g. `submission 3`).
    pub subject: String,
    /// `x-delivery-attempt` of the last delivery.
    pub attempt: u32,
}

impl Stats {
    pub fn record(&self, delivery: &Delivery, subject: impl Into<String>) {
        let mut all = self
            .deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = all
            .entry(delivery.target.clone())
            .or_default()
            .entry(delivery.correlation_id.clone())
            .or_insert(Received {
                count: 0,
                subject: String::new(),
                attempt: 0,
            });
        entry.count += 1;
        entry.subject = subject.into();
        entry.attempt = delivery.attempt;
    }

    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<String, Received>> {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The headers the sidecar sets on a message it delivers to the app.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event (`x-event`) or queue (`x-queue`) name.
    pub target: String,
    pub correlation_id: String,
    pub attempt: u32,
}

impl<S: Send + Sync> FromRequestParts<S> for Delivery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let target = header("x-event")
            .or_else(|| header("x-queue"))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not a delivery: no x-event/x-queue",
                )
            })?;
        Ok(Self {
            target,
            correlation_id: correlation_id(&parts.headers),
            attempt: header("x-delivery-attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
        })
    }
}

/// The routes every service has: `GET /v1/health` and `GET /v1/_stats`.
pub fn common_routes(service: &'static str, stats: Arc<Stats>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(move || async move { Json(json!({ "service": service, "status": "ok" })) }),
        )
        .route(
            "/v1/_stats",
            get(move |State(stats): State<Arc<Stats>>| async move {
                Json(json!({ "service": service, "deliveries": stats.snapshot() }))
            }),
        )
        .with_state(stats)
}

/// Everything a service needs at start.
#[derive(Clone)]
pub struct Context {
    pub service: &'static str,
    pub mesh: Mesh,
    pub stats: Arc<Stats>,
    /// user-service: which replica this is (shown in answers).
    pub replica: String,
    /// file-service: where solutions are stored.
    pub data_dir: std::path::PathBuf,
}

/// Serves `router` (plus the common routes and the correlation id middleware) on `listen`,
/// HTTP/1.1 and h2c, until Ctrl-C or SIGTERM.
pub async fn serve(listen: SocketAddr, ctx: &Context, router: Router) -> anyhow::Result<()> {
    let app = router
        .merge(common_routes(ctx.service, ctx.stats.clone()))
        .layer(axum::middleware::from_fn(with_correlation_id));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(service = ctx.service, %listen, "serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Locks a mutex, ignoring poisoning (a panicked handler must not take the service down).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
