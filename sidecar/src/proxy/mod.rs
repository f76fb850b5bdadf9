//! The two listeners and what they share. Outbound: the local app's calls to other services
//! (and the sidecar's local API). Inbound: other sidecars' calls, over mTLS, handed to the app.
//!
//! Flow: listener ([`server`]) → route ([`outbound`]/[`inbound`]) → policy → endpoint
//! ([`crate::balance`]) → connection ([`pool`]).
//!
//! # Futures
//! A request's future is allocated (boxed) and moved on every request, so its size is a cost.
//! An `async fn` keeps each argument twice in its future (the argument, and the local it is
//! moved into), and a request is 240 bytes. The functions a request passes through are
//! therefore written as `fn … -> impl Future` returning an `async move` block that uses its
//! arguments in place (clippy's `manual_async_fn` is allowed on each, pointing here).

pub mod http;
mod http1;
mod http2;
pub mod inbound;
pub mod outbound;
mod park;
pub mod pool;
pub mod route;
pub mod server;

use foldhash::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;

use self::pool::{EndpointPool, Transport};
use crate::balance::Balancer;
use crate::config::Config;
use crate::discovery::{Discovery, ServiceTarget};
use crate::metrics::{Metrics, RequestMetrics};
use crate::policy::{InboundLimits, ServiceState};
use crate::tls::MeshTls;

/// A handler for requests addressed to the sidecar itself on the outbound listener (the broker
/// API). Implemented by the broker; the proxy only routes to it.
pub trait LocalApi: Send + Sync + 'static {
    fn handle(
        &self,
        req: ::http::Request<http::Body>,
    ) -> Pin<Box<dyn Future<Output = ::http::Response<http::Body>> + Send + '_>>;
}

/// An upstream service: its discovery target, its balancer and its resilience state (circuit
/// breaker, retry budget), all kept across reloads that leave the target unchanged.
pub struct Upstream {
    pub target: Arc<ServiceTarget>,
    pub balancer: Arc<Balancer>,
    pub state: Arc<ServiceState>,
    /// `requests_total` and `request_duration_seconds` of outbound requests to the service.
    pub requests: RequestMetrics,
}

/// Upstreams by service name, then by the namespace the authority named (None: our own).
/// Looked up on every outbound request: foldhash (seeded per process) costs a fraction of std's
/// SipHash on short service names, and only services discovery knows are ever inserted.
type UpstreamMap = HashMap<String, Vec<(Option<String>, Arc<Upstream>)>>;

/// State shared by every listener of one sidecar.
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub metrics: Arc<Metrics>,
    pub discovery: Arc<Discovery>,
    pub tls: Option<Arc<MeshTls>>,
    pub local_api: Option<Arc<dyn LocalApi>>,
    /// The connections to the local app (inbound side).
    pub app: EndpointPool,
    /// `inbound.rate_limit` and `inbound.max_concurrent` state.
    pub inbound_limits: ArcSwap<InboundLimits>,
    upstreams: RwLock<UpstreamMap>,
}

impl Shared {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        tls: Option<Arc<MeshTls>>,
        local_api: Option<Arc<dyn LocalApi>>,
    ) -> Arc<Self> {
        let discovery = Discovery::new(&config, metrics.clone());
        Arc::new(Self {
            app: EndpointPool::new(config.app, Transport::Plain),
            inbound_limits: ArcSwap::from_pointee(InboundLimits::new(&config.inbound)),
            config: ArcSwap::from_pointee(config),
            metrics,
            discovery,
            tls,
            local_api,
            upstreams: RwLock::new(HashMap::default()),
        })
    }

    /// The upstream for a service (`None`: unknown service). An authority naming this sidecar's
    /// own namespace shares the upstream of the bare name. Lookups allocate nothing.
    pub fn upstream(&self, service: &str, namespace: Option<&str>) -> Option<Arc<Upstream>> {
        let namespace = {
            let config = self.config.load();
            namespace.filter(|ns| *ns != config.namespace.as_str())
        };
        if let Some(up) = self
            .upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .and_then(|by_ns| by_ns.iter().find(|(ns, _)| ns.as_deref() == namespace))
        {
            return Some(up.1.clone());
        }
        let target = self.discovery.lookup(service, namespace)?;
        let transport = match (&self.tls, target.mtls) {
            (Some(tls), true) => Transport::Mesh {
                tls: tls.clone(),
                identity: target.identity.clone(),
            },
            _ => Transport::Plain,
        };
        let mtls = matches!(transport, Transport::Mesh { .. });
        self.metrics
            .upstream_mtls
            .with_label_values(&[service])
            .set(i64::from(mtls));
        if !mtls {
            tracing::info!(
                service,
                mtls = false,
                reason = if target.mtls {
                    "tls disabled"
                } else {
                    "mtls: false"
                },
                "plain HTTP upstream: no encryption, no identity check"
            );
        }
        let config = self.config.load();
        let m = &self.metrics;
        let state = Arc::new(ServiceState::new(
            &target.service,
            config.policies.for_service(&target.service).retry.budget,
            m.retries_total
                .with_label_values(&[target.service.as_str()]),
            m.outlier_ejections_total
                .with_label_values(&[target.service.as_str()]),
            m.circuit_state
                .with_label_values(&[target.service.as_str()]),
        ));
        let upstream = Arc::new(Upstream {
            requests: RequestMetrics::new(m, "outbound", &target.service),
            balancer: Balancer::new(transport, target.endpoints()),
            target,
            state,
        });
        let mut upstreams = self.upstreams.write().unwrap_or_else(|p| p.into_inner());
        let by_ns = upstreams.entry(service.to_string()).or_default();
        match by_ns.iter().find(|(ns, _)| ns.as_deref() == namespace) {
            // Two first requests may race here: the first upstream stored wins, so one breaker
            // and one budget exist per service.
            Some((_, existing)) => Some(existing.clone()),
            None => {
                by_ns.push((namespace.map(str::to_string), upstream.clone()));
                Some(upstream)
            }
        }
    }

    /// Swaps in a reloaded config. Upstreams whose discovery target is unchanged keep their
    /// balancer (connections, latency estimates, ejections).
    pub fn reconfigure(&self, config: Config) {
        self.discovery.reconfigure(&config);
        let mut upstreams = self.upstreams.write().unwrap_or_else(|p| p.into_inner());
        for (service, by_ns) in upstreams.iter_mut() {
            by_ns.retain(|(namespace, up)| {
                self.discovery
                    .lookup(service, namespace.as_deref())
                    .is_some_and(|t| Arc::ptr_eq(&t, &up.target))
            });
        }
        upstreams.retain(|_, by_ns| !by_ns.is_empty());
        drop(upstreams);
        if !self.inbound_limits.load().same_settings(&config.inbound) {
            self.inbound_limits
                .store(Arc::new(InboundLimits::new(&config.inbound)));
        }
        self.config.store(Arc::new(config));
    }
}
