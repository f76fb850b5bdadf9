//! The publish side: `POST /v1/events/{event}`, `POST /v1/queues/{queue}` (and gRPC, see
//! [`super::grpc`]).
//!
//! Every publish goes out on the one publisher channel of the live link, which is in confirm
//! mode; each request awaits its own confirm, so confirms of concurrent requests pipeline. The
//! answer is 202 only after the broker's ack; a nack, a returned (unroutable) work-queue message,
//! a lost connection or no confirm within [`CONFIRM_TIMEOUT`] is a 503.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use tracing::Instrument;

use super::link::{Link, Shared};
use super::schema::SchemaError;
use super::{BoxBody, error_response, full};

/// How long a publish waits for the broker's confirm before answering 503.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// `Retry-After` (seconds) on 503 while the broker is unreachable.
const RETRY_AFTER_SECS: &str = "1";

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An event of the catalog: the topic exchange, routing key = the name.
    Event(String),
    /// A durable work queue, through the default exchange.
    Queue(String),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Event(n) | Target::Queue(n) => n,
        }
    }
}

/// A confirmed publish.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub correlation_id: String,
    pub message_id: String,
}

/// Why a publish was refused. Callers map it to HTTP or gRPC.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not in `publishes` / `enqueues`: 403, PERMISSION_DENIED.
    #[error("{0}")]
    Forbidden(String),
    /// Over `limits.max_api_body`: 413, INVALID_ARGUMENT.
    #[error("{0}")]
    TooLarge(String),
    /// Malformed request (bad header, unreadable body): 400, INVALID_ARGUMENT.
    #[error("{0}")]
    BadRequest(String),
    /// The payload does not match the Avro schema: 422, INVALID_ARGUMENT.
    #[error("{0}")]
    SchemaMismatch(String),
    /// The broker is unreachable or did not confirm: 503 with Retry-After, UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// A sidecar problem (e.g. an unusable schema file): 500, INTERNAL.
    #[error("{0}")]
    Internal(String),
}

impl PublishError {
    fn status(&self) -> StatusCode {
        match self {
            PublishError::Forbidden(_) => StatusCode::FORBIDDEN,
            PublishError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            PublishError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PublishError::SchemaMismatch(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PublishError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            PublishError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            PublishError::Forbidden(_) => "forbidden",
            PublishError::TooLarge(_) | PublishError::BadRequest(_) => "bad-request",
            PublishError::SchemaMismatch(_) => "bad-request",
            PublishError::Unavailable(_) => "unavailable",
            PublishError::Internal(_) => "internal",
        }
    }

    pub(crate) fn to_response(&self) -> http::Response<BoxBody> {
        let mut resp = error_response(self.status(), self.kind(), &self.to_string());
        if matches!(self, PublishError::Unavailable(_)) {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

/// Routes one request of the local broker API.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    req: http::Request<crate::proxy::http::Body>,
) -> http::Response<BoxBody> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc && req.uri().path().starts_with("/outrider.v1.Broker/") {
        return super::grpc::serve(shared, req).await;
    }
    let path = req.uri().path().to_string();
    let target = if let Some(name) = path.strip_prefix("/v1/events/") {
        Target::Event(name.to_string())
    } else if let Some(name) = path.strip_prefix("/v1/queues/") {
        Target::Queue(name.to_string())
    } else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!(
                "no broker API at `{path}`: use POST /v1/events/{{event}} or POST /v1/queues/{{queue}}"
            ),
        );
    };
    if target.name().is_empty() || target.name().contains('/') {
        return error_response(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no broker API at `{path}`"),
        );
    }
    if req.method() != Method::POST {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad-request",
            "the broker API takes POST",
        );
        resp.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    match publish_http(shared, target, req).await {
        Ok(published) => accepted(&published),
        Err(e) => {
            tracing::debug!("publish refused: {e}");
            e.to_response()
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes. Boxed, and built outside any
/// `async fn`: inline, rustc cannot prove the `Limited` future `Send` for a boxed body (a
/// higher-ranked `From` bound on its error type).
fn read_limited(
    body: crate::proxy::http::Body,
    limit: usize,
) -> std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<bytes::Bytes, crate::proxy::http::BoxError>> + Send,
    >,
> {
    Box::pin(futures_util::TryFutureExt::map_ok(
        Limited::new(body, limit).collect(),
        |collected| collected.to_bytes(),
    ))
}

async fn publish_http(
    shared: &Arc<Shared>,
    target: Target,
    req: http::Request<crate::proxy::http::Body>,
) -> Result<Published, PublishError> {
    // Refuse early, before reading the body.
    authorize(shared, &target)?;
    let max = shared.settings.max_api_body;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large(max));
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let payload = match read_limited(body, limit).await {
        Ok(payload) => payload,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large(max)),
        Err(e) => {
            return Err(PublishError::BadRequest(format!(
                "cannot read the request body: {e}"
            )));
        }
    };
    let header = |name: &http::HeaderName| -> Result<Option<String>, PublishError> {
        parts
            .headers
            .get(name)
            .map(|v| {
                v.to_str().map(str::to_string).map_err(|_| {
                    PublishError::BadRequest(format!("header `{name}` is not valid text"))
                })
            })
            .transpose()
    };
    let content_type = header(&http::header::CONTENT_TYPE)?;
    let correlation_id = header(&http::HeaderName::from_static("x-correlation-id"))?;
    let traceparent = header(&http::HeaderName::from_static("traceparent"))?;
    publish(
        shared,
        target,
        payload,
        content_type,
        correlation_id,
        traceparent,
    )
    .await
}

fn too_large(max: u64) -> PublishError {
    PublishError::TooLarge(format!(
        "payload larger than limits.max_api_body ({max} bytes)"
    ))
}

fn accepted(published: &Published) -> http::Response<BoxBody> {
    let body = serde_json::to_vec(published).unwrap_or_default();
    let mut resp = http::Response::new(full(Bytes::from(body)));
    *resp.status_mut() = StatusCode::ACCEPTED;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&published.correlation_id) {
        headers.insert("x-correlation-id", v);
    }
    resp
}

fn authorize(shared: &Shared, target: &Target) -> Result<(), PublishError> {
    let s = &shared.settings;
    match target {
        Target::Event(name) if s.publishes.contains(name) => Ok(()),
        Target::Queue(name) if s.enqueues.contains(name) => Ok(()),
        Target::Event(name) => Err(PublishError::Forbidden(format!(
            "event `{name}` is not in broker.publishes of `{}`",
            s.service
        ))),
        Target::Queue(name) => Err(PublishError::Forbidden(format!(
            "queue `{name}` is not in broker.enqueues of `{}`",
            s.service
        ))),
    }
}

fn short(what: &str, value: String) -> Result<ShortString, PublishError> {
    ShortString::try_new(value)
        .map_err(|_| PublishError::BadRequest(format!("{what} is longer than 255 bytes")))
}

/// Checks and publishes one message, returning once the broker confirmed it.
pub(crate) async fn publish(
    shared: &Arc<Shared>,
    target: Target,
    payload: Bytes,
    content_type: Option<String>,
    correlation_id: Option<String>,
    traceparent: Option<String>,
) -> Result<Published, PublishError> {
    authorize(shared, &target)?;
    let s = &shared.settings;
    if payload.len() as u64 > s.max_api_body {
        return Err(too_large(s.max_api_body));
    }
    let name = target.name();
    s.schemas.check(name, &payload).map_err(|e| match e {
        SchemaError::Mismatch(m) => PublishError::SchemaMismatch(m),
        SchemaError::Broken(m) => PublishError::Internal(m),
    })?;

    let correlation_id = correlation_id
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let message_id = uuid::Uuid::new_v4().to_string();
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_correlation_id(short("x-correlation-id", correlation_id.clone())?)
        .with_message_id(ShortString::from(message_id.as_str()))
        .with_timestamp(super::deliver::unix_now())
        .with_app_id(short("service", s.service.clone())?)
        .with_type(short("target name", name.to_string())?);
    if let Some(tp) = traceparent.filter(|t| !t.is_empty()) {
        // Kept with the message so the delivery to the subscriber continues the trace.
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(tp.as_str().into()),
        );
        props = props.with_headers(headers);
    }
    if let Some(ct) = content_type.filter(|c| !c.is_empty()) {
        props = props.with_content_type(short("content-type", ct)?);
    }
    let (exchange, routing_key, mandatory) = match &target {
        Target::Event(event) => (s.exchange.as_str(), event.as_str(), false),
        // Mandatory: a work queue that vanished must not swallow the message.
        Target::Queue(queue) => ("", queue.as_str(), true),
    };

    if shared.is_shutting_down() {
        return Err(PublishError::Unavailable(
            "the sidecar is shutting down".into(),
        ));
    }
    let Some(link) = shared.link() else {
        return Err(PublishError::Unavailable(format!(
            "broker unreachable: {}",
            shared.down_reason()
        )));
    };
    let span = tracing::debug_span!("publish", correlation_id = %correlation_id, target = %name);
    let exchange = short("exchange", exchange.to_string())?;
    let routing_key = short("routing key", routing_key.to_string())?;
    send_confirmed(
        shared,
        &link,
        name,
        exchange,
        routing_key,
        mandatory,
        &payload,
        props,
    )
    .instrument(span)
    .await?;
    Ok(Published {
        correlation_id,
        message_id,
    })
}

/// Sends on the shared publisher channel and waits for this message's own confirm.
#[allow(clippy::too_many_arguments)]
async fn send_confirmed(
    shared: &Shared,
    link: &Link,
    name: &str,
    exchange: ShortString,
    routing_key: ShortString,
    mandatory: bool,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let sent = link
        .publisher
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            payload,
            props,
        )
        .await;
    let confirm = match sent {
        Ok(confirm) => confirm,
        Err(e) => {
            shared.report(link, &format!("publish failed: {e}"), false);
            return Err(PublishError::Unavailable(format!("publish failed: {e}")));
        }
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(c)) if c.is_ack() => {
            if c.take_message().is_some() {
                tracing::warn!("queue `{name}` does not exist: message returned by the broker");
                shared.report(link, "a work queue is missing", true);
                return Err(PublishError::Unavailable(format!(
                    "queue `{name}` does not exist on the broker; it is being re-declared"
                )));
            }
        }
        Ok(Ok(_)) => {
            tracing::warn!("broker nacked a publish");
            return Err(PublishError::Unavailable(
                "the broker refused the message (nack)".into(),
            ));
        }
        Ok(Err(e)) => {
            shared.report(link, &format!("confirm failed: {e}"), false);
            return Err(PublishError::Unavailable(format!(
                "the broker did not confirm the message: {e}"
            )));
        }
        Err(_) => {
            tracing::warn!("no publisher confirm within {CONFIRM_TIMEOUT:?}");
            shared.report(link, "confirm timed out", false);
            return Err(PublishError::Unavailable(format!(
                "no confirm from the broker within {CONFIRM_TIMEOUT:?}"
            )));
        }
    }
    shared.published(name);
    tracing::debug!("published");
    Ok(())
}
