//! The learning platform's services as plain apps. They know nothing of TLS, retries or AMQP:
//! each listens on a local address for requests its sidecar hands it, and calls other services,
//! publishes events and enqueues tasks through its sidecar's outbound listener.
//!
//! - [`common`]: what every service shares: the sidecar client ([`common::Mesh`]), correlation ids,
//!   the per-service delivery counters served at `GET /v1/_stats`, errors.
//! - [`events`]: the payloads of the event catalog and the work queues (see `schemas/*.avsc`).
//! - [`services`]: one module per service, each a function that builds its axum router.
//! - [`demo`]: `mesh-demo`'s machinery: certificates, processes, the scenario and the summary.

pub mod common;
pub mod demo;
pub mod events;
pub mod services;

/// The runner <-> tester gRPC API (`protos/learning/v1/testing.proto`).
pub mod pb {
    tonic::include_proto!("learning.v1");
}
