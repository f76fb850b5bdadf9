//! The config model: plain data, validated, with every default filled in. Runtime modules read
//! it; nothing here knows about sockets or tasks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// The whole sidecar config (CONTRACT §3).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub service: String,
    pub namespace: String,
    pub app: SocketAddr,
    pub listen: Listen,
    pub tls: Tls,
    pub discovery: Discovery,
    pub policies: Policies,
    pub limits: Limits,
    pub inbound: Inbound,
    pub broker: Option<Broker>,
    #[serde(serialize_with = "serialize_duration")]
    pub shutdown_grace: Duration,
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listen {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Tls {
    /// mTLS on every sidecar-to-sidecar hop.
    Mtls(MtlsFiles),
    /// Plaintext between sidecars: for local experiments only.
    Disabled,
}

#[derive(Debug, Clone, Serialize)]
pub struct MtlsFiles {
    pub trust_domain: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A peer that has not finished its handshake by then is dropped.
    #[serde(serialize_with = "serialize_duration")]
    pub handshake_timeout: Duration,
}

impl Tls {
    pub fn trust_domain(&self) -> &str {
        match self {
            Tls::Mtls(files) => &files.trust_domain,
            Tls::Disabled => DEFAULT_TRUST_DOMAIN,
        }
    }
}

pub const DEFAULT_TRUST_DOMAIN: &str = "mesh.local";

#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    pub resolver: Resolver,
    /// Template such as `{service}.{namespace}.svc.cluster.local:7143`.
    pub default_dns: Option<String>,
    pub services: BTreeMap<String, ServiceDiscovery>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Resolver {
    /// Empty: the system resolver (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// TTLs are clamped into this range before re-resolving.
    #[serde(serialize_with = "serialize_duration")]
    pub min_ttl: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_ttl: Duration,
    /// After a failed lookup the last endpoints are kept this long, then dropped.
    #[serde(serialize_with = "serialize_duration")]
    pub stale_for: Duration,
    /// Per-query timeout.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceDiscovery {
    pub source: EndpointSource,
    /// False for upstreams outside the mesh: plain HTTP, no identity check.
    pub mtls: bool,
    /// The SPIFFE identity the upstream must present; default: this service's name in our
    /// trust domain and its namespace.
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointSource {
    Static(Vec<SocketAddr>),
    /// `host:port` resolved through A/AAAA.
    Dns {
        host: String,
        port: u16,
    },
    /// `_name._proto.domain`.
    Srv(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Policies {
    pub default: Arc<Policy>,
    /// `policies.services.<name>` merged over `default`, key by key.
    pub services: BTreeMap<String, Arc<Policy>>,
    /// Routes, in file order; the first match wins. Each is merged over its service's policy.
    pub routes: Vec<RoutePolicy>,
}

impl Policies {
    /// The policy for a request: the first matching route, else the service's, else the default.
    pub fn for_request(&self, service: &str, method: &http::Method, path: &str) -> &Arc<Policy> {
        for route in &self.routes {
            if route.service == service
                && route.method.as_ref().is_none_or(|m| m == method)
                && route
                    .path_prefix
                    .as_deref()
                    .is_none_or(|prefix| path.starts_with(prefix))
            {
                return &route.policy;
            }
        }
        self.for_service(service)
    }

    pub fn for_service(&self, service: &str) -> &Arc<Policy> {
        self.services.get(service).unwrap_or(&self.default)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutePolicy {
    pub service: String,
    #[serde(serialize_with = "serialize_method")]
    pub method: Option<http::Method>,
    pub path_prefix: Option<String>,
    pub policy: Arc<Policy>,
}

fn serialize_method<S: serde::Serializer>(
    method: &Option<http::Method>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match method {
        Some(m) => s.serialize_some(m.as_str()),
        None => s.serialize_none(),
    }
}

/// Outbound policy for one service or route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// The whole request, all attempts included.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    pub retry: Retry,
    pub circuit_breaker: CircuitBreaker,
    pub outlier: Outlier,
    /// True when this policy came from a route that names its method: such routes may retry
    /// non-idempotent methods (POST, PATCH) after the request reached the upstream.
    pub retry_non_idempotent: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    /// Tries in all, the first included (1 = no retries).
    pub attempts: u32,
    pub backoff: Backoff,
    pub on: RetryOn,
    pub budget: RetryBudget,
    /// Request bodies up to this size are buffered for replay; larger ones stream, unretried.
    pub max_body: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Backoff {
    #[serde(serialize_with = "serialize_duration")]
    pub base: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RetryOn {
    pub statuses: Vec<u16>,
    pub connect_error: bool,
    /// gRPC status codes (e.g. 14 for `grpc-unavailable`).
    pub grpc_codes: Vec<i32>,
}

impl RetryOn {
    pub fn status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }

    pub fn grpc(&self, code: i32) -> bool {
        self.grpc_codes.contains(&code)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetryBudget {
    /// Retries may add at most this fraction of the original request rate.
    pub ratio: f64,
    /// ...but at least this many retries per second are always allowed.
    pub min_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitBreaker {
    pub consecutive_failures: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub open_for: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_open_for: Duration,
    pub fallback: Fallback,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fallback {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Outlier {
    pub consecutive_failures: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub eject_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_header_bytes: u64,
    #[serde(serialize_with = "serialize_duration")]
    pub header_read_timeout: Duration,
    pub max_api_body: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inbound {
    /// Empty: every authenticated mesh peer may call.
    pub authorize: Vec<AuthzRule>,
    pub rate_limit: Option<RateLimit>,
    /// None: unlimited.
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthzRule {
    /// Full SPIFFE IDs (bare names are expanded at load time), or `*` for any mesh peer.
    pub from: Vec<String>,
    pub path_prefix: Option<String>,
    /// Upper-case method names; empty means any.
    pub methods: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Clone, Serialize)]
pub struct Broker {
    /// Never logged or shown as is: see [`Broker::redacted_url`].
    #[serde(rename = "url", serialize_with = "serialize_redacted_url")]
    pub url: String,
    pub exchange: String,
    pub publishes: Vec<String>,
    pub enqueues: Vec<String>,
    pub schemas: Option<PathBuf>,
    pub subscriptions: Vec<Subscription>,
    #[serde(serialize_with = "serialize_duration")]
    pub dedup_window: Duration,
    /// How many correlation ids each subscription remembers; the oldest are forgotten first.
    pub dedup_capacity: usize,
    pub queue_type: QueueType,
    /// Timeout of one delivery POST to the app.
    #[serde(serialize_with = "serialize_duration")]
    pub delivery_timeout: Duration,
}

/// Like the derived `Debug`, with the URL's password redacted: a `{:?}` of the config in a log
/// line or a panic message must not print it.
impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.redacted_url())
            .field("exchange", &self.exchange)
            .field("publishes", &self.publishes)
            .field("enqueues", &self.enqueues)
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

fn serialize_redacted_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    pub source: SubscriptionSource,
    /// Path on the app that receives each message as a POST.
    pub deliver: String,
    pub prefetch: u16,
    pub max_attempts: u32,
    pub retry_backoff: Backoff,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionSource {
    /// An event of the catalog: queue `<namespace>.<service>.<event>` bound to the exchange.
    Event(String),
    /// A work queue consumed under its own name.
    Queue(String),
}

impl Subscription {
    /// The AMQP queue this subscription consumes.
    pub fn queue_name(&self, namespace: &str, service: &str) -> String {
        match &self.source {
            SubscriptionSource::Event(event) => format!("{namespace}.{service}.{event}"),
            SubscriptionSource::Queue(queue) => queue.clone(),
        }
    }

    /// The metrics/log label: the event or queue name.
    pub fn target(&self) -> &str {
        match &self.source {
            SubscriptionSource::Event(name) | SubscriptionSource::Queue(name) => name,
        }
    }
}

impl Config {
    /// The SPIFFE ID of a workload in this mesh.
    pub fn spiffe_id(&self, namespace: &str, service: &str) -> String {
        spiffe_id(self.tls.trust_domain(), namespace, service)
    }

    /// This sidecar's own SPIFFE ID.
    pub fn own_identity(&self) -> String {
        self.spiffe_id(&self.namespace, &self.service)
    }

    /// The parts of a config that cannot change without a restart.
    pub fn restart_keys_differ(&self, other: &Config) -> Option<&'static str> {
        if self.listen != other.listen {
            return Some("listen");
        }
        if self.service != other.service {
            return Some("service");
        }
        if self.namespace != other.namespace {
            return Some("namespace");
        }
        // The bridge's connection, topology and consumers are built at start.
        if serde_json::to_value(&self.broker).ok() != serde_json::to_value(&other.broker).ok() {
            return Some("broker");
        }
        None
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service}")
}

/// Durations in `/config` read as they are written in YAML: `2s`, `250ms`, `1m30s`.
fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}
