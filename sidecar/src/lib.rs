//! Outrider: a sidecar proxy for service meshes.
//!
//! Data flows one way: listener → route → policy stack → endpoint → connection.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the config model, validation with line numbers, file watching for reload |
//! | [`discovery`] | endpoint sets per service: static, DNS A/AAAA, SRV |
//! | [`tls`] | identities, certificates, rustls configs, cert reload, `outrider certs` |
//! | [`proxy`] | the outbound and inbound listeners and the HTTP plumbing they share |
//! | [`policy`] | timeout, retry, budget, circuit breaker, rate limit: tower layers |
//! | [`balance`] | choosing an endpoint: P2C over peak-EWMA, outlier ejection |
//! | [`broker`] | the RabbitMQ bridge: publish API and subscription delivery |
//! | [`admin`] | `/live`, `/ready`, `/metrics`, `/config`, `/shutdown` |
//! | [`metrics`] | the Prometheus registry and every metric family (a leaf) |
//! | [`inject`] | Kubernetes pod injection: a pure transformation of manifests |
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod broker;
pub mod config;
pub mod discovery;
pub mod inject;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod runtime;
pub mod tls;

/// Generated gRPC code.
pub mod pb {
    /// `outrider.v1.Broker`: the broker API for gRPC-native apps.
    pub mod broker {
        tonic::include_proto!("outrider.v1");
    }
    /// `echo.v1.Echo`: used by tests and benchmarks.
    pub mod echo {
        tonic::include_proto!("echo.v1");
    }
}
