//! Discovery: for each upstream service, a live set of endpoints. Sources (static lists, DNS
//! A/AAAA, SRV; later Kubernetes EndpointSlices or files) sit behind one trait, [`Source`], that
//! hands out a watch of endpoint sets, so the proxy never knows where endpoints come from.
//!
//! The proxy asks [`Discovery::lookup`] for a service by name (and the namespace the authority
//! named, if any) and gets a [`ServiceTarget`]: the endpoint watch plus how to talk to it (mTLS
//! or not, which identity the upstream must present).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::config::{self, EndpointSource};
use crate::metrics::Metrics;

/// The state of a service's endpoint set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not resolved yet (the first lookup is under way).
    Pending,
    /// The endpoints in force. May be empty (then requests get 503 `unavailable`).
    Ready(Arc<[SocketAddr]>),
    /// Never resolved, or the last known set went stale: requests get 503 `unavailable`.
    Unavailable(String),
}

/// A discovery source: anything that can keep a watch of one service's endpoints up to date.
pub trait Source: Send + Sync + 'static {
    /// The watch of this source's endpoint sets. The source keeps it current for as long as the
    /// source lives.
    fn watch(&self) -> watch::Receiver<Resolution>;
    /// Where the endpoints come from, for `/endpoints` and logs (e.g. `static`, `dns:host:port`).
    fn describe(&self) -> String;
}

/// A fixed list of endpoints from the config.
pub struct StaticSource {
    tx: watch::Sender<Resolution>,
}

impl StaticSource {
    pub fn new(endpoints: &[SocketAddr]) -> Self {
        let (tx, _) = watch::channel(Resolution::Ready(endpoints.into()));
        Self { tx }
    }
}

impl Source for StaticSource {
    fn watch(&self) -> watch::Receiver<Resolution> {
        self.tx.subscribe()
    }

    fn describe(&self) -> String {
        "static".into()
    }
}

/// An upstream service as the proxy sees it.
pub struct ServiceTarget {
    /// The service name (the metric label).
    pub service: String,
    pub namespace: String,
    /// False for upstreams outside the mesh (`mtls: false`): plain HTTP, no identity check.
    pub mtls: bool,
    /// The SPIFFE ID the upstream must present.
    pub identity: String,
    source: Arc<dyn Source>,
}

impl ServiceTarget {
    pub fn endpoints(&self) -> watch::Receiver<Resolution> {
        self.source.watch()
    }

    pub fn describe(&self) -> String {
        self.source.describe()
    }
}

impl std::fmt::Debug for ServiceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTarget")
            .field("service", &self.service)
            .field("namespace", &self.namespace)
            .field("source", &self.source.describe())
            .finish()
    }
}

/// All known services, created lazily on first use and kept while the config names them.
pub struct Discovery {
    config: Mutex<DiscoveryConfig>,
    targets: Mutex<HashMap<(String, String), Arc<ServiceTarget>>>,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
struct DiscoveryConfig {
    discovery: config::Discovery,
    namespace: String,
    trust_domain: String,
}

impl Discovery {
    pub fn new(config: &config::Config, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            config: Mutex::new(DiscoveryConfig {
                discovery: config.discovery.clone(),
                namespace: config.namespace.clone(),
                trust_domain: config.tls.trust_domain().to_string(),
            }),
            targets: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Swaps in a reloaded config. Services whose source is unchanged keep their state.
    pub fn reconfigure(&self, config: &config::Config) {
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(
            &mut *current,
            DiscoveryConfig {
                discovery: config.discovery.clone(),
                namespace: config.namespace.clone(),
                trust_domain: config.tls.trust_domain().to_string(),
            },
        );
        drop(current);
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.retain(|(service, _), _| {
            old.discovery
                .services
                .get(service)
                .map(|s| (&s.source, s.mtls, &s.identity))
                == config
                    .discovery
                    .services
                    .get(service)
                    .map(|s| (&s.source, s.mtls, &s.identity))
                && old.discovery.default_dns == config.discovery.default_dns
        });
    }

    /// The target for `service` in `namespace` (None: this sidecar's namespace). `None` when the
    /// service is unknown: not listed and no `default_dns`.
    pub fn lookup(&self, service: &str, namespace: Option<&str>) -> Option<Arc<ServiceTarget>> {
        let cfg = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let namespace = namespace.unwrap_or(&cfg.namespace).to_string();
        let key = (service.to_string(), namespace.clone());
        if let Some(target) = self
            .targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(target.clone());
        }
        let listed = cfg.discovery.services.get(service);
        let (source, mtls, identity): (Arc<dyn Source>, bool, Option<String>) = match listed {
            Some(s) => (
                self.source_for(&s.source, service),
                s.mtls,
                s.identity.clone(),
            ),
            None => {
                let _template = cfg.discovery.default_dns.as_ref()?;
                // DNS sources are issue 5: until then an unlisted service is unavailable.
                let (tx, _) = watch::channel(Resolution::Unavailable(
                    "DNS discovery is not implemented yet".into(),
                ));
                (Arc::new(Unresolvable(tx)), true, None)
            }
        };
        let target = Arc::new(ServiceTarget {
            service: service.to_string(),
            identity: identity
                .unwrap_or_else(|| config::spiffe_id(&cfg.trust_domain, &namespace, service)),
            namespace,
            mtls,
            source,
        });
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, target.clone());
        Some(target)
    }

    fn source_for(&self, source: &EndpointSource, service: &str) -> Arc<dyn Source> {
        match source {
            EndpointSource::Static(endpoints) => {
                self.metrics
                    .endpoints
                    .with_label_values(&[service])
                    .set(endpoints.len() as i64);
                Arc::new(StaticSource::new(endpoints))
            }
            EndpointSource::Dns { .. } | EndpointSource::Srv(_) => {
                let (tx, _) = watch::channel(Resolution::Unavailable(
                    "DNS discovery is not implemented yet".into(),
                ));
                Arc::new(Unresolvable(tx))
            }
        }
    }

    /// Every service resolved so far, for `/endpoints`.
    pub fn snapshot(&self) -> Vec<(String, String, String, Resolution)> {
        let targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = targets
            .values()
            .map(|t| {
                (
                    t.service.clone(),
                    t.namespace.clone(),
                    t.describe(),
                    t.endpoints().borrow().clone(),
                )
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

struct Unresolvable(watch::Sender<Resolution>);

impl Source for Unresolvable {
    fn watch(&self) -> watch::Receiver<Resolution> {
        self.0.subscribe()
    }

    fn describe(&self) -> String {
        "unresolvable".into()
    }
}
