//! `outrider.v1.Broker` over gRPC: the same two calls as the HTTP API, served by tonic's
//! generated `BrokerServer` called as a tower service from [`super::Bridge::handle`].
//!
//! Errors: 403 → PERMISSION_DENIED, 400/413/422 → INVALID_ARGUMENT, 503 → UNAVAILABLE,
//! 500 → INTERNAL; the sidecar error kind is also sent as `x-outrider-error` metadata.

use std::sync::Arc;

use http_body_util::BodyExt;
use tonic::{Request, Response, Status};
use tower::ServiceExt;

use super::link::Shared;
use super::publish::{self, PublishError, Published, Target};
use super::{BoxBody, ERROR_HEADER};
use crate::pb::broker::broker_server::{Broker, BrokerServer};
use crate::pb::broker::{EnqueueRequest, PublishReply, PublishRequest};

struct GrpcApi {
    shared: Arc<Shared>,
}

pub(crate) async fn serve(
    shared: &Arc<Shared>,
    req: http::Request<crate::proxy::http::Body>,
) -> http::Response<BoxBody> {
    // Room for the other fields: the payload itself is checked against max_api_body.
    let limit = usize::try_from(shared.settings.max_api_body)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .saturating_add(64 * 1024);
    let server = BrokerServer::new(GrpcApi {
        shared: shared.clone(),
    })
    .max_decoding_message_size(limit);
    // Boxed, and built outside this `async fn`: inline, rustc cannot prove tonic's future `Send`
    // for a boxed request body (a higher-ranked `From` bound on its error type).
    let call: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(server.oneshot(req));
    match call.await {
        Ok(resp) => resp.map(|body| {
            body.map_err(|status| Box::new(status) as Box<dyn std::error::Error + Send + Sync>)
                .boxed_unsync()
        }),
        Err(never) => match never {},
    }
}

fn correlation_id<T>(req: &Request<T>, field: String) -> Option<String> {
    if !field.is_empty() {
        return Some(field);
    }
    metadata(req, "x-correlation-id")
}

fn metadata<T>(req: &Request<T>, key: &str) -> Option<String> {
    req.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn reply(result: Result<Published, PublishError>) -> Result<Response<PublishReply>, Status> {
    match result {
        Ok(published) => {
            let mut resp = Response::new(PublishReply {
                correlation_id: published.correlation_id.clone(),
                message_id: published.message_id,
            });
            if let Ok(v) = published.correlation_id.parse() {
                resp.metadata_mut().insert("x-correlation-id", v);
            }
            Ok(resp)
        }
        Err(e) => {
            let (mut status, kind) = match &e {
                PublishError::Forbidden(m) => (Status::permission_denied(m), "forbidden"),
                PublishError::TooLarge(m)
                | PublishError::BadRequest(m)
                | PublishError::SchemaMismatch(m) => (Status::invalid_argument(m), "bad-request"),
                PublishError::Unavailable(m) => (Status::unavailable(m), "unavailable"),
                PublishError::Internal(m) => (Status::internal(m), "internal"),
            };
            if let Ok(v) = kind.parse() {
                status.metadata_mut().insert(ERROR_HEADER, v);
            }
            Err(status)
        }
    }
}

fn content_type(ct: String) -> Option<String> {
    Some(ct).filter(|c| !c.is_empty())
}

impl GrpcApi {
    /// Publish and Enqueue differ only in their target: the same confirmed publish serves both.
    async fn send<T>(
        &self,
        request: Request<T>,
        correlation_field: String,
        into_parts: impl FnOnce(T) -> (Target, Vec<u8>, String),
    ) -> Result<Response<PublishReply>, Status> {
        let correlation = correlation_id(&request, correlation_field);
        let traceparent = metadata(&request, "traceparent");
        let (target, payload, content) = into_parts(request.into_inner());
        reply(
            publish::publish(
                &self.shared,
                target,
                payload.into(),
                content_type(content),
                correlation,
                traceparent,
            )
            .await,
        )
    }
}

#[tonic::async_trait]
impl Broker for GrpcApi {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishReply>, Status> {
        let correlation = request.get_ref().correlation_id.clone();
        self.send(request, correlation, |m| {
            (Target::Event(m.event), m.payload, m.content_type)
        })
        .await
    }

    async fn enqueue(
        &self,
        request: Request<EnqueueRequest>,
    ) -> Result<Response<PublishReply>, Status> {
        let correlation = request.get_ref().correlation_id.clone();
        self.send(request, correlation, |m| {
            (Target::Queue(m.queue), m.payload, m.content_type)
        })
        .await
    }
}
