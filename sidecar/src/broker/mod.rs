//! The RabbitMQ bridge (CONTRACT §5, issue 6). It owns, for one sidecar:
//!
//! - the one AMQP connection to the broker, with heartbeats, reconnection with backoff and
//!   re-declaration of the topology ([`link`]);
//! - the topology: the durable topic exchange, the work queues this service sends to, and for
//!   each subscription its queue, `<queue>.dlq` and retry holding queues ([`topology`]);
//! - the publish API, `POST /v1/events/{event}`, `POST /v1/queues/{queue}` and the gRPC service
//!   `outrider.v1.Broker`, answering only after the publisher confirm ([`publish`], [`grpc`]);
//! - delivery of each subscription to the app, with retries through holding queues,
//!   dead-lettering ([`deliver`]), acks coalesced per channel ([`settle`]) and deduplication by
//!   `correlation_id` ([`dedup`]);
//! - the `outrider_broker_*` metrics and the broker part of `/ready`.
//!
//! The outbound listener hands it the requests whose authority is local; see [`Bridge`].
//! Operator documentation: `docs/broker.md`.

mod dedup;
mod deliver;
mod grpc;
mod link;
mod publish;
mod schema;
mod settle;
mod topology;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::config::{Config, QueueType};
use crate::metrics::Metrics;

pub use publish::{PublishError, Published, Target};

/// The response body type the bridge answers with (the proxy's body type).
pub type BoxBody = crate::proxy::http::Body;

/// Header carrying the sidecar error kind (CONTRACT §4).
pub const ERROR_HEADER: &str = "x-outrider-error";

/// The broker bridge of one sidecar. Cheap to share (`Arc`); every method takes `&self`.
pub struct Bridge {
    shared: Option<Arc<link::Shared>>,
}

impl Bridge {
    /// Declares topology, starts the connection manager and the subscription consumers, in the
    /// background. Never fails because the broker is down: it keeps reconnecting with backoff.
    /// Without a `broker:` section the bridge answers every request with 404 and is always ready.
    /// Must be called inside a tokio runtime.
    pub fn start(config: &Config, metrics: Arc<Metrics>) -> Arc<Bridge> {
        let Some(settings) = Settings::from_config(config) else {
            return Arc::new(Bridge { shared: None });
        };
        let shared = link::Shared::start(settings, metrics, config);
        Arc::new(Bridge {
            shared: Some(shared),
        })
    }

    /// Handles `POST /v1/events/{event}`, `POST /v1/queues/{queue}` and the gRPC service
    /// `outrider.v1.Broker` (`/outrider.v1.Broker/Publish|Enqueue`). Any other path: 404 with
    /// the sidecar error JSON.
    pub async fn handle(
        &self,
        req: http::Request<crate::proxy::http::Body>,
    ) -> http::Response<BoxBody> {
        match &self.shared {
            Some(shared) => publish::handle(shared, req).await,
            None => error_response(
                http::StatusCode::NOT_FOUND,
                "not-found",
                "no broker is configured for this sidecar",
            ),
        }
    }

    /// Publishes one message as the HTTP and gRPC APIs do (for in-process callers and tests).
    pub async fn publish(
        &self,
        target: Target,
        payload: Bytes,
        content_type: Option<String>,
        correlation_id: Option<String>,
    ) -> Result<Published, PublishError> {
        match &self.shared {
            Some(shared) => {
                publish::publish(shared, target, payload, content_type, correlation_id, None).await
            }
            None => Err(PublishError::Unavailable(
                "no broker is configured for this sidecar".into(),
            )),
        }
    }

    /// Ok when connected (or when no broker is configured); `Err(reason)` otherwise.
    pub fn ready(&self) -> Result<(), String> {
        match &self.shared {
            Some(shared) => shared.ready(),
            None => Ok(()),
        }
    }

    /// Stops consuming, lets in-flight deliveries finish (bounded by `shutdown_grace`), and
    /// closes the connection. Publishes after this answer 503.
    pub async fn shutdown(&self) {
        if let Some(shared) = &self.shared {
            shared.shutdown().await;
        }
    }
}

/// The outbound listener hands requests for the sidecar itself (authority `localhost`,
/// `127.0.0.1` or its own address) to the bridge.
impl crate::proxy::LocalApi for Bridge {
    fn handle(
        &self,
        req: http::Request<crate::proxy::http::Body>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<BoxBody>> + Send + '_>>
    {
        Box::pin(Bridge::handle(self, req))
    }
}

/// The config the bridge runs with, derived once from [`Config`].
pub(crate) struct Settings {
    /// Contains the password: never log it, use `redacted_url`.
    url: String,
    redacted_url: String,
    connection_name: String,
    service: String,
    exchange: String,
    publishes: HashSet<String>,
    enqueues: HashSet<String>,
    schemas: schema::Schemas,
    queue_type: QueueType,
    max_api_body: u64,
    shutdown_grace: Duration,
    subscriptions: Vec<deliver::SubSettings>,
}

impl Settings {
    fn from_config(config: &Config) -> Option<Settings> {
        let broker = config.broker.as_ref()?;
        let names = broker.publishes.iter().chain(broker.enqueues.iter());
        let schemas = schema::Schemas::load(broker.schemas.as_deref(), names);
        let subscriptions = broker
            .subscriptions
            .iter()
            .map(|s| deliver::SubSettings::new(config, broker, s))
            .collect();
        Some(Settings {
            url: broker.url.clone(),
            redacted_url: broker.redacted_url(),
            connection_name: format!(
                "outrider {}/{} pid {}",
                config.namespace,
                config.service,
                std::process::id()
            ),
            service: config.service.clone(),
            exchange: broker.exchange.clone(),
            publishes: broker.publishes.iter().cloned().collect(),
            enqueues: broker.enqueues.iter().cloned().collect(),
            schemas,
            queue_type: broker.queue_type,
            max_api_body: config.limits.max_api_body,
            shutdown_grace: config.shutdown_grace,
            subscriptions,
        })
    }
}

/// A sidecar-made error: `x-outrider-error: <kind>` and `{"error": "...", "kind": "..."}`.
pub(crate) fn error_response(
    status: http::StatusCode,
    kind: &str,
    message: &str,
) -> http::Response<BoxBody> {
    let body = serde_json::json!({ "error": message, "kind": kind }).to_string();
    let mut resp = http::Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = http::HeaderValue::from_str(kind) {
        headers.insert(ERROR_HEADER, v);
    }
    resp
}

pub(crate) fn full(bytes: Bytes) -> BoxBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `schemas/<name>.avsc` under the configured directory.
fn schema_path(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(format!("{name}.avsc"))
}
