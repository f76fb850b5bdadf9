//! Discovery owns, for each upstream service, a live set of endpoints: where it comes from
//! (static lists, DNS A/AAAA, SRV, the `default_dns` template for unlisted services), how it is
//! kept fresh (TTL-driven refresh, stale-while-error), the `outrider_endpoints` gauge, and the
//! data behind the admin `/endpoints` view. Sources (later also Kubernetes EndpointSlices or
//! files) sit behind one trait, [`Source`], that hands out a watch of endpoint sets, so the
//! proxy never knows where endpoints come from.
//!
//! The proxy asks [`Discovery::lookup`] for a service by name (and the namespace the authority
//! named, see `proxy::route::parse_authority`) and gets a [`ServiceTarget`]: the endpoint watch plus how to
//! talk to it (mTLS or not, which identity the upstream must present). DNS resolution is lazy:
//! it starts on the first lookup of a service, and its task lives as long as the target.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`Source`] trait, targets, the registry, gauges, snapshots |
//! | `dns.rs` | the refresh loop shared by DNS sources: TTL clamping, backoff, staleness |
//! | `resolver.rs` | the hickory resolver: nameservers, A/AAAA and SRV lookups, error kinds |
//! | `authority.rs` | authority → (service, namespace); the `default_dns` template |

mod authority;
mod dns;
mod resolver;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::{self, EndpointSource};
use crate::metrics::Metrics;

pub use authority::expand_template;
pub use dns::{HostLookup, Lookup, RefreshingSource, SrvLookup, Timing};
pub use resolver::{Answer, DnsResolver, LookupError, Partial};

/// Dynamic (`default_dns`) targets nobody looked up for this long, and nobody holds, are
/// dropped, so an app that calls many one-off names does not keep a resolver task per name.
const IDLE_EVICT: Duration = Duration::from_secs(600);

/// The state of a service's endpoint set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not resolved yet (the first lookup is under way).
    Pending,
    /// The endpoints in force, sorted by address. May be empty (then requests get 503
    /// `unavailable`). After failed lookups this is the last known set, for up to `stale_for`.
    Ready(Arc<[SocketAddr]>),
    /// Never resolved, or the last known set went stale: requests get 503 `unavailable`.
    Unavailable(String),
}

impl Resolution {
    /// The endpoints in force: none unless `Ready`.
    pub fn endpoints(&self) -> &[SocketAddr] {
        match self {
            Resolution::Ready(endpoints) => endpoints,
            _ => &[],
        }
    }
}

/// What a source knows about its own health, for `/endpoints`. Sources that cannot fail
/// (static) keep the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// The last lookup error, cleared by the next success.
    pub last_error: Option<String>,
    /// Since when the set in force has been served past failed lookups (stale-while-error).
    pub stale_since: Option<SystemTime>,
    /// When a lookup last succeeded.
    pub resolved_at: Option<SystemTime>,
}

/// A discovery source: anything that can keep a watch of one service's endpoints up to date.
pub trait Source: Send + Sync + 'static {
    /// The watch of this source's endpoint sets. The source keeps it current for as long as the
    /// source lives; when the source is dropped, the watch closes.
    fn watch(&self) -> watch::Receiver<Resolution>;
    /// Where the endpoints come from, for `/endpoints` and logs (e.g. `static`, `dns:host:port`).
    fn describe(&self) -> String;
    /// Health details beyond the watch. Default: nothing to report.
    fn status(&self) -> SourceStatus {
        SourceStatus::default()
    }
}

/// A fixed list of endpoints from the config.
pub struct StaticSource {
    tx: watch::Sender<Resolution>,
}

impl StaticSource {
    pub fn new(endpoints: &[SocketAddr]) -> Self {
        let mut endpoints = endpoints.to_vec();
        endpoints.sort();
        endpoints.dedup();
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

/// A source that can never resolve, with the reason (e.g. a `default_dns` template that does not
/// expand to `HOST:PORT` for this name).
struct Unresolvable {
    tx: watch::Sender<Resolution>,
    description: String,
    reason: String,
}

impl Unresolvable {
    fn new(description: String, reason: String) -> Self {
        let (tx, _) = watch::channel(Resolution::Unavailable(reason.clone()));
        Self {
            tx,
            description,
            reason,
        }
    }
}

impl Source for Unresolvable {
    fn watch(&self) -> watch::Receiver<Resolution> {
        self.tx.subscribe()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn status(&self) -> SourceStatus {
        SourceStatus {
            last_error: Some(self.reason.clone()),
            ..SourceStatus::default()
        }
    }
}

/// An upstream service as the proxy sees it. Holding it keeps its source (and any resolver
/// task) alive.
pub struct ServiceTarget {
    /// The service name (the metric label).
    pub service: String,
    pub namespace: String,
    /// False for upstreams outside the mesh (`mtls: false`): plain HTTP, no identity check.
    pub mtls: bool,
    /// The SPIFFE ID the upstream must present.
    pub identity: String,
    source: Arc<dyn Source>,
    /// Identifies this target in the gauge book, so a replaced target stops counting.
    id: u64,
}

impl ServiceTarget {
    pub fn endpoints(&self) -> watch::Receiver<Resolution> {
        self.source.watch()
    }

    pub fn describe(&self) -> String {
        self.source.describe()
    }

    pub fn status(&self) -> SourceStatus {
        self.source.status()
    }

    /// The resolution once it is no longer `Pending`, waiting at most `wait` (then `Pending`).
    /// For the proxy's first request to a service whose lookup is still under way.
    pub async fn resolved(&self, wait: Duration) -> Resolution {
        let mut rx = self.endpoints();
        let settled =
            tokio::time::timeout(wait, rx.wait_for(|r| !matches!(r, Resolution::Pending))).await;
        match settled {
            Ok(Ok(r)) => r.clone(),
            Ok(Err(_)) => Resolution::Unavailable("discovery source stopped".into()),
            Err(_) => Resolution::Pending,
        }
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

/// The state of a service in `/endpoints`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// First lookup under way.
    Pending,
    /// Fresh endpoints.
    Ready,
    /// The last known endpoints, served while lookups fail (up to `stale_for`).
    Stale,
    /// No endpoints: requests get 503 `unavailable`.
    Unavailable,
}

/// One service in `/endpoints` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEndpoints {
    pub service: String,
    pub namespace: String,
    /// Where the endpoints come from: `static`, `dns:HOST:PORT`, `srv:NAME`,
    /// `default_dns:HOST:PORT`.
    pub source: String,
    pub mtls: bool,
    pub identity: String,
    pub state: EndpointState,
    pub endpoints: Vec<SocketAddr>,
    /// Why the last lookup failed, or why the service is unavailable.
    pub last_error: Option<String>,
    /// Unix seconds since which the endpoints have been stale.
    pub stale_since: Option<u64>,
    /// Unix seconds of the last successful lookup (DNS sources).
    pub resolved_at: Option<u64>,
}

/// All known services: static ones from the start, DNS ones from their first lookup, kept while
/// the config names them.
pub struct Discovery {
    config: Mutex<Arc<DiscoveryConfig>>,
    targets: Mutex<HashMap<(String, String), Entry>>,
    resolver: Mutex<Arc<DnsResolver>>,
    gauges: Arc<GaugeBook>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

struct DiscoveryConfig {
    discovery: config::Discovery,
    namespace: String,
    trust_domain: String,
}

struct Entry {
    target: Arc<ServiceTarget>,
    /// Created from `default_dns` (may be evicted when idle), not from a listed service.
    dynamic: bool,
    /// Resolved through DNS: rebuilt when the resolver settings change.
    uses_resolver: bool,
    last_used: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Discovery {
    pub fn new(config: &config::Config, metrics: Arc<Metrics>) -> Arc<Self> {
        let discovery = Arc::new(Self {
            config: Mutex::new(Arc::new(DiscoveryConfig::from(config))),
            targets: Mutex::new(HashMap::new()),
            resolver: Mutex::new(Arc::new(DnsResolver::new(
                config.discovery.resolver.clone(),
            ))),
            gauges: Arc::new(GaugeBook {
                metrics: metrics.clone(),
                counts: Mutex::new(HashMap::new()),
            }),
            metrics,
            next_id: AtomicU64::new(1),
        });
        discovery.create_static_targets();
        discovery
    }

    /// Swaps in a reloaded config. Services whose source, mTLS and identity are unchanged keep
    /// their state (and resolver task); the others are rebuilt on their next lookup. A change of
    /// the resolver settings rebuilds every DNS service.
    pub fn reconfigure(&self, config: &config::Config) {
        let new = Arc::new(DiscoveryConfig::from(config));
        let old = std::mem::replace(&mut *lock(&self.config), new.clone());
        let resolver_changed = !same_resolver(&old.discovery.resolver, &new.discovery.resolver);
        if resolver_changed {
            *lock(&self.resolver) = Arc::new(DnsResolver::new(new.discovery.resolver.clone()));
        }
        let removed: Vec<Entry> = {
            let mut targets = lock(&self.targets);
            let keys: Vec<_> = targets.keys().cloned().collect();
            let mut removed = Vec::new();
            for key in keys {
                let service = &key.0;
                let keep = old.trust_domain == new.trust_domain
                    && old
                        .discovery
                        .services
                        .get(service)
                        .map(|s| (&s.source, s.mtls, &s.identity))
                        == new
                            .discovery
                            .services
                            .get(service)
                            .map(|s| (&s.source, s.mtls, &s.identity))
                    && old.discovery.default_dns == new.discovery.default_dns
                    && !(resolver_changed && targets.get(&key).is_some_and(|e| e.uses_resolver));
                if !keep && let Some(entry) = targets.remove(&key) {
                    removed.push(entry);
                }
            }
            removed
        };
        for entry in &removed {
            self.gauges.forget(
                &entry.target.service,
                &entry.target.namespace,
                entry.target.id,
            );
        }
        // Dropped outside the lock: dropping a source stops its task.
        drop(removed);
        self.create_static_targets();
    }

    /// Static services need no lookup: they are known (and counted in the gauge) from the start.
    fn create_static_targets(&self) {
        let cfg = lock(&self.config).clone();
        for (service, s) in &cfg.discovery.services {
            if matches!(s.source, EndpointSource::Static(_)) {
                let _ = self.lookup(service, None);
            }
        }
    }

    /// The target for `service` in `namespace` (None: this sidecar's namespace). `None` when the
    /// service is unknown: not listed and no `default_dns`.
    ///
    /// A listed service is used for its name when the authority names no namespace or ours;
    /// when it names another namespace, `default_dns` (with that namespace) is used if set, else
    /// the listed entry.
    pub fn lookup(&self, service: &str, namespace: Option<&str>) -> Option<Arc<ServiceTarget>> {
        let cfg = lock(&self.config).clone();
        let namespace = namespace.unwrap_or(&cfg.namespace);
        let key = (service.to_string(), namespace.to_string());
        {
            let mut targets = lock(&self.targets);
            if let Some(entry) = targets.get_mut(&key) {
                entry.last_used = Instant::now();
                return Some(entry.target.clone());
            }
        }
        let listed = cfg
            .discovery
            .services
            .get(service)
            .filter(|_| namespace == cfg.namespace || cfg.discovery.default_dns.is_none());
        let uses_resolver = listed.is_none_or(|s| !matches!(s.source, EndpointSource::Static(_)));
        let (source, mtls, identity, dynamic): (Arc<dyn Source>, bool, Option<String>, bool) =
            match listed {
                Some(s) => (
                    self.source_for(&s.source, service),
                    s.mtls,
                    s.identity.clone(),
                    false,
                ),
                None => {
                    let template = cfg.discovery.default_dns.as_ref()?;
                    (
                        self.default_dns_source(template, service, namespace),
                        true,
                        None,
                        true,
                    )
                }
            };
        let target = Arc::new(ServiceTarget {
            service: service.to_string(),
            identity: identity
                .unwrap_or_else(|| config::spiffe_id(&cfg.trust_domain, namespace, service)),
            namespace: namespace.to_string(),
            mtls,
            source,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
        });
        let evicted = {
            let mut targets = lock(&self.targets);
            // Another caller may have created it meanwhile: theirs wins, ours is dropped.
            if let Some(entry) = targets.get(&key) {
                return Some(entry.target.clone());
            }
            let evicted = evict_idle(&mut targets);
            for entry in &evicted {
                self.gauges.forget(
                    &entry.target.service,
                    &entry.target.namespace,
                    entry.target.id,
                );
            }
            // Under the registry lock, so a concurrent reload cannot forget it first.
            self.gauges.follow(&target);
            targets.insert(
                key,
                Entry {
                    target: target.clone(),
                    dynamic,
                    uses_resolver,
                    last_used: Instant::now(),
                },
            );
            evicted
        };
        // Dropped outside the lock: dropping a source stops its task.
        drop(evicted);
        Some(target)
    }

    fn timing(&self, resolver: &DnsResolver) -> Timing {
        let r = resolver.settings();
        Timing {
            min_ttl: r.min_ttl,
            max_ttl: r.max_ttl,
            stale_for: r.stale_for,
        }
    }

    fn source_for(&self, source: &EndpointSource, service: &str) -> Arc<dyn Source> {
        let resolver = lock(&self.resolver).clone();
        let timing = self.timing(&resolver);
        let errors = self
            .metrics
            .discovery_errors_total
            .with_label_values(&[service]);
        match source {
            EndpointSource::Static(endpoints) => Arc::new(StaticSource::new(endpoints)),
            EndpointSource::Dns { host, port } => Arc::new(RefreshingSource::spawn(
                HostLookup {
                    resolver,
                    host: host.clone(),
                    port: *port,
                },
                timing,
                service.to_string(),
                format!("dns:{}", join_host_port(host, *port)),
                errors,
            )),
            EndpointSource::Srv(name) => Arc::new(RefreshingSource::spawn(
                SrvLookup {
                    resolver,
                    name: name.clone(),
                },
                timing,
                service.to_string(),
                format!("srv:{name}"),
                errors,
            )),
        }
    }

    fn default_dns_source(
        &self,
        template: &str,
        service: &str,
        namespace: &str,
    ) -> Arc<dyn Source> {
        match expand_template(template, service, namespace) {
            Ok((host, port)) => {
                let resolver = lock(&self.resolver).clone();
                let timing = self.timing(&resolver);
                let description = format!("default_dns:{}", join_host_port(&host, port));
                Arc::new(RefreshingSource::spawn(
                    HostLookup {
                        resolver,
                        host,
                        port,
                    },
                    timing,
                    service.to_string(),
                    description,
                    self.metrics
                        .discovery_errors_total
                        .with_label_values(&[service]),
                ))
            }
            Err(e) => Arc::new(Unresolvable::new(
                format!("default_dns:{template}"),
                e.to_string(),
            )),
        }
    }

    /// Every service known so far, sorted by service and namespace, for `/endpoints`.
    pub fn snapshot(&self) -> Vec<ServiceEndpoints> {
        let targets: Vec<Arc<ServiceTarget>> = lock(&self.targets)
            .values()
            .map(|e| e.target.clone())
            .collect();
        let mut out: Vec<ServiceEndpoints> = targets.iter().map(|t| view(t)).collect();
        out.sort_by(|a, b| (&a.service, &a.namespace).cmp(&(&b.service, &b.namespace)));
        out
    }
}

fn view(t: &ServiceTarget) -> ServiceEndpoints {
    let resolution = t.endpoints().borrow().clone();
    let status = t.status();
    let (state, last_error) = match &resolution {
        Resolution::Pending => (EndpointState::Pending, status.last_error),
        Resolution::Ready(_) if status.stale_since.is_some() => {
            (EndpointState::Stale, status.last_error)
        }
        Resolution::Ready(_) => (EndpointState::Ready, status.last_error),
        Resolution::Unavailable(reason) => (EndpointState::Unavailable, Some(reason.clone())),
    };
    ServiceEndpoints {
        service: t.service.clone(),
        namespace: t.namespace.clone(),
        source: t.describe(),
        mtls: t.mtls,
        identity: t.identity.clone(),
        state,
        endpoints: resolution.endpoints().to_vec(),
        last_error,
        stale_since: status.stale_since.map(unix_seconds),
        resolved_at: status.resolved_at.map(unix_seconds),
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl From<&config::Config> for DiscoveryConfig {
    fn from(config: &config::Config) -> Self {
        Self {
            discovery: config.discovery.clone(),
            namespace: config.namespace.clone(),
            trust_domain: config.tls.trust_domain().to_string(),
        }
    }
}

fn same_resolver(a: &config::Resolver, b: &config::Resolver) -> bool {
    a.nameservers == b.nameservers
        && a.min_ttl == b.min_ttl
        && a.max_ttl == b.max_ttl
        && a.stale_for == b.stale_for
        && a.timeout == b.timeout
}

/// Removes dynamic targets idle for [`IDLE_EVICT`] that nobody else holds.
fn evict_idle(targets: &mut HashMap<(String, String), Entry>) -> Vec<Entry> {
    let idle: Vec<_> = targets
        .iter()
        .filter(|(_, e)| {
            e.dynamic && e.last_used.elapsed() >= IDLE_EVICT && Arc::strong_count(&e.target) == 1
        })
        .map(|(k, _)| k.clone())
        .collect();
    idle.iter().filter_map(|k| targets.remove(k)).collect()
}

/// Keeps `outrider_endpoints{service}` equal to the endpoints in force: the sum over the
/// service's current targets (one per namespace it is called in). A target replaced by a
/// reload stops counting at once, even while in-flight requests still hold it.
struct GaugeBook {
    metrics: Arc<Metrics>,
    /// service → namespace → (target id, endpoints).
    counts: Mutex<HashMap<String, PerNamespace>>,
}

/// namespace → (id of the current target, its endpoint count).
type PerNamespace = HashMap<String, (u64, usize)>;

impl GaugeBook {
    /// Counts `target` from now on, following its watch until its source stops.
    fn follow(self: &Arc<Self>, target: &Arc<ServiceTarget>) {
        let mut rx = target.endpoints();
        let (service, namespace, id) =
            (target.service.clone(), target.namespace.clone(), target.id);
        let n = rx.borrow_and_update().endpoints().len();
        self.set(&service, &namespace, id, n, true);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // Without a runtime only static sources work, and they never change.
            return;
        };
        let book = self.clone();
        handle.spawn(async move {
            while rx.changed().await.is_ok() {
                let n = rx.borrow_and_update().endpoints().len();
                book.set(&service, &namespace, id, n, false);
            }
        });
    }

    /// Sets a target's count; `register` makes `id` the current target of its key.
    fn set(&self, service: &str, namespace: &str, id: u64, n: usize, register: bool) {
        let mut counts = lock(&self.counts);
        let per_ns = counts.entry(service.to_string()).or_default();
        match per_ns.get_mut(namespace) {
            Some(entry) if entry.0 == id => entry.1 = n,
            _ if register => {
                per_ns.insert(namespace.to_string(), (id, n));
            }
            // A replaced target's late update.
            _ => return,
        }
        let total: usize = per_ns.values().map(|(_, n)| n).sum();
        self.metrics
            .endpoints
            .with_label_values(&[service])
            .set(total as i64);
    }

    /// Stops counting a target that left the registry.
    fn forget(&self, service: &str, namespace: &str, id: u64) {
        let mut counts = lock(&self.counts);
        let Some(per_ns) = counts.get_mut(service) else {
            return;
        };
        if per_ns
            .get(namespace)
            .is_some_and(|(current, _)| *current == id)
        {
            per_ns.remove(namespace);
        }
        if per_ns.is_empty() {
            counts.remove(service);
            let _ = self.metrics.endpoints.remove_label_values(&[service]);
        } else {
            let total: usize = per_ns.values().map(|(_, n)| n).sum();
            self.metrics
                .endpoints
                .with_label_values(&[service])
                .set(total as i64);
        }
    }
}
