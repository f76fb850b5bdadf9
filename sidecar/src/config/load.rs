//! The schema walk: spanned YAML (plus environment overrides) → validated [`Config`].
//! Every key of CONTRACT §3 is read here; unknown keys are errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::decode::{self as d, Fields, Problem, Problems};
use super::model::*;
use super::yaml::{self, Node, Pos, Value};

/// A config that passed validation, with the warnings it raised.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Problem>,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: cannot read: {reason}")]
    Unreadable { file: String, reason: String },
    #[error("{} problem(s) in {file}", problems.len())]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl LoadError {
    /// One line per problem, `FILE:LINE:COL: field.path: message`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Unreadable { .. } => vec![self.to_string()],
            LoadError::Invalid { file, problems } => {
                problems.iter().map(|p| p.render(file)).collect()
            }
        }
    }
}

/// Keys that can be set from the environment: `OUTRIDER_` + the path, upper-cased, `.` → `_`
/// (e.g. `OUTRIDER_LISTEN_INBOUND`). Values are read as YAML, so lists and mappings work too.
pub const ENV_KEYS: &[&str] = &[
    "service",
    "namespace",
    "app",
    "listen.outbound",
    "listen.inbound",
    "listen.admin",
    "tls.mode",
    "tls.trust_domain",
    "tls.ca",
    "tls.cert",
    "tls.key",
    "tls.handshake_timeout",
    "discovery.default_dns",
    "discovery.resolver.nameservers",
    "discovery.services",
    "policies.default.timeout",
    "policies.default.connect_timeout",
    "policies.default.retry",
    "policies.default.circuit_breaker",
    "policies.default.outlier",
    "policies.services",
    "policies.routes",
    "limits.max_header_bytes",
    "limits.header_read_timeout",
    "limits.max_api_body",
    "inbound.authorize",
    "inbound.rate_limit",
    "inbound.max_concurrent",
    "broker.url",
    "broker.exchange",
    "broker.publishes",
    "broker.enqueues",
    "broker.schemas",
    "broker.subscriptions",
    "broker.dedup_window",
    "broker.queue_type",
    "shutdown_grace",
    "access_log",
];

/// The environment variable that overrides a key path.
pub fn env_name(path: &str) -> String {
    format!("OUTRIDER_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// Reads and validates a config file, with overrides from `env`.
pub fn load_file(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, LoadError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Unreadable {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    load_str(&text, &file, base_dir, env)
}

/// Validates config text. Relative file paths are resolved against `base_dir`.
pub fn load_str(
    text: &str,
    file: &str,
    base_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, LoadError> {
    let invalid = |problems| LoadError::Invalid {
        file: file.to_string(),
        problems,
    };
    let mut root = yaml::parse(text).map_err(|e| {
        invalid(vec![Problem {
            pos: e.pos,
            path: "(yaml)".into(),
            message: e.message,
            env: None,
        }])
    })?;
    let p = Problems::default();
    apply_env(&p, &mut root, env);
    let config = decode_config(&p, &root, base_dir);
    let (errors, warnings) = p.into_parts();
    match config {
        Some(config) if errors.is_empty() => Ok(Loaded { config, warnings }),
        _ => Err(invalid(errors)),
    }
}

fn apply_env(p: &Problems, root: &mut Node, env: impl IntoIterator<Item = (String, String)>) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("OUTRIDER_"))
        .collect();
    vars.sort();
    for (name, value) in vars {
        let Some(path) = ENV_KEYS.iter().find(|key| env_name(key) == name) else {
            continue;
        };
        let mut node = match yaml::parse(&value) {
            Ok(node) if !matches!(node.value, Value::Map(ref m) if m.is_empty()) => node,
            Ok(_) => Node::new(Pos::default(), Value::Str(value.clone())),
            Err(e) => {
                let mut at = Node::new(Pos::default(), Value::Null);
                at.from_env = Some(name.clone());
                p.error(&at, path, format!("not valid YAML: {}", e.message));
                continue;
            }
        };
        mark_env(&mut node, &name);
        let parts: Vec<&str> = path.split('.').collect();
        root.set_path(&parts, node);
    }
}

fn mark_env(node: &mut Node, var: &str) {
    node.pos = Pos::default();
    node.from_env = Some(var.to_string());
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| mark_env(n, var)),
        Value::Map(entries) => entries.iter_mut().for_each(|(_, pos, n)| {
            *pos = Pos::default();
            mark_env(n, var)
        }),
        _ => {}
    }
}

const ROOT_KEYS: &[&str] = &[
    "service",
    "namespace",
    "app",
    "listen",
    "tls",
    "discovery",
    "policies",
    "limits",
    "inbound",
    "broker",
    "shutdown_grace",
    "access_log",
];

fn decode_config(p: &Problems, root: &Node, base_dir: &Path) -> Option<Config> {
    let f = Fields::new(p, root, "", ROOT_KEYS)?;
    let service = f.require(p, "service").and_then(|(n, path)| {
        let name = d::string(p, n, &path)?;
        if !d::is_dns_label(&name) {
            p.error(
                n,
                &path,
                "must be a DNS label: lowercase letters, digits and `-`, at most 63 characters",
            );
            return None;
        }
        Some(name)
    });
    let namespace = match f.get("namespace") {
        Some((n, path)) => d::string(p, n, &path).filter(|ns| {
            let ok = d::is_dns_label(ns);
            if !ok {
                p.error(n, &path, "must be a DNS label");
            }
            ok
        }),
        None => Some("default".to_string()),
    };
    let app = f
        .require(p, "app")
        .and_then(|(n, path)| d::socket_addr(p, n, &path));
    let listen = decode_listen(p, &f);
    let tls = decode_tls(p, &f, base_dir);
    let trust_domain = tls
        .as_ref()
        .map(|t| t.trust_domain().to_string())
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
    let namespace_for_rules = namespace.clone().unwrap_or_else(|| "default".into());
    let discovery = decode_discovery(p, &f);
    let policies = decode_policies(p, &f, discovery.as_ref());
    let limits = decode_limits(p, &f);
    let inbound = decode_inbound(p, &f, &trust_domain, &namespace_for_rules);
    let broker = match f.get("broker") {
        Some((n, path)) => decode_broker(p, n, &path, base_dir).map(Some),
        None => Some(None),
    };
    let shutdown_grace = opt(
        p,
        &f,
        "shutdown_grace",
        Duration::from_secs(10),
        d::duration,
    );
    let access_log = opt(p, &f, "access_log", false, d::boolean);
    Some(Config {
        service: service?,
        namespace: namespace?,
        app: app?,
        listen: listen?,
        tls: tls?,
        discovery: discovery?,
        policies: policies?,
        limits: limits?,
        inbound: inbound?,
        broker: broker?,
        shutdown_grace: shutdown_grace?,
        access_log: access_log?,
    })
}

/// An optional key with a default.
fn opt<T>(
    p: &Problems,
    f: &Fields,
    key: &str,
    default: T,
    read: impl Fn(&Problems, &Node, &str) -> Option<T>,
) -> Option<T> {
    match f.get(key) {
        Some((n, path)) => read(p, n, &path),
        None => Some(default),
    }
}

fn section<'a>(p: &Problems, f: &Fields<'a>, key: &str, allowed: &[&str]) -> Option<Fields<'a>> {
    static EMPTY: Node = Node {
        pos: Pos { line: 0, col: 0 },
        value: Value::Null,
        from_env: None,
    };
    match f.get(key) {
        Some((n, path)) => Fields::new(p, n, &path, allowed),
        None => Fields::new(p, &EMPTY, &d::join(&f.path, key), allowed),
    }
}

fn decode_listen(p: &Problems, root: &Fields) -> Option<Listen> {
    let f = section(p, root, "listen", &["outbound", "inbound", "admin"])?;
    let addr = |key: &str, default: &str| {
        let fallback: SocketAddr = default.parse().ok()?;
        opt(p, &f, key, fallback, d::socket_addr)
    };
    let outbound = addr("outbound", "127.0.0.1:7140");
    let inbound = addr("inbound", "0.0.0.0:7143");
    let admin = addr("admin", "127.0.0.1:7191");
    let listen = Listen {
        outbound: outbound?,
        inbound: inbound?,
        admin: admin?,
    };
    let ports = [
        ("outbound", listen.outbound),
        ("inbound", listen.inbound),
        ("admin", listen.admin),
    ];
    for (i, (a, addr_a)) in ports.iter().enumerate() {
        for (b, addr_b) in &ports[i + 1..] {
            let clash = addr_a.port() == addr_b.port()
                && addr_a.port() != 0
                && (addr_a.ip() == addr_b.ip()
                    || addr_a.ip().is_unspecified()
                    || addr_b.ip().is_unspecified());
            if clash {
                p.error(
                    f.node,
                    &format!("listen.{b}"),
                    format!("{addr_b} clashes with listen.{a} ({addr_a})"),
                );
            }
        }
    }
    Some(listen)
}

fn decode_tls(p: &Problems, root: &Fields, base_dir: &Path) -> Option<Tls> {
    let Some((node, path)) = root.get("tls") else {
        p.warn(
            root.node,
            "tls",
            "no `tls` section: sidecar-to-sidecar traffic is plaintext (local experiments only)",
        );
        return Some(Tls::Disabled);
    };
    let f = Fields::new(
        p,
        node,
        &path,
        &[
            "mode",
            "trust_domain",
            "ca",
            "cert",
            "key",
            "handshake_timeout",
        ],
    )?;
    let mode = opt(p, &f, "mode", "mtls".to_string(), d::string)?;
    match mode.as_str() {
        "disabled" => {
            p.warn(
                node,
                "tls.mode",
                "mTLS is disabled: sidecar-to-sidecar traffic is plaintext and callers are not authenticated (local experiments only)",
            );
            Some(Tls::Disabled)
        }
        "mtls" => {
            let trust_domain = opt(
                p,
                &f,
                "trust_domain",
                DEFAULT_TRUST_DOMAIN.to_string(),
                |p, n, path| {
                    let td = d::string(p, n, path)?;
                    let valid = td.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'-' | b'_')
                    });
                    if !valid {
                        p.error(
                            n,
                            path,
                            "a trust domain holds lowercase letters, digits, `.`, `-` and `_`",
                        );
                        return None;
                    }
                    Some(td)
                },
            );
            let file = |key: &str| {
                f.require(p, key)
                    .and_then(|(n, path)| d::string(p, n, &path))
                    .map(|s| resolve_path(base_dir, &s))
            };
            let ca = file("ca");
            let cert = file("cert");
            let key = file("key");
            let handshake_timeout = opt(
                p,
                &f,
                "handshake_timeout",
                Duration::from_secs(10),
                d::duration,
            );
            Some(Tls::Mtls(MtlsFiles {
                trust_domain: trust_domain?,
                ca: ca?,
                cert: cert?,
                key: key?,
                handshake_timeout: handshake_timeout?,
            }))
        }
        other => {
            let (n, path) = f.get("mode")?;
            p.error(
                n,
                &path,
                format!("unknown mode `{other}`: expected `mtls` or `disabled`"),
            );
            None
        }
    }
}

fn resolve_path(base_dir: &Path, text: &str) -> PathBuf {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        path
    } else {
        base_dir.join(path)
    }
}

fn decode_discovery(p: &Problems, root: &Fields) -> Option<Discovery> {
    let f = section(
        p,
        root,
        "discovery",
        &["resolver", "default_dns", "services"],
    )?;
    let resolver = {
        let r = section(
            p,
            &f,
            "resolver",
            &["nameservers", "min_ttl", "max_ttl", "stale_for", "timeout"],
        )?;
        let nameservers = opt(p, &r, "nameservers", Vec::new(), |p, n, path| {
            d::list(p, n, path, |n, path| {
                d::string(p, n, path).and_then(|s| {
                    // A bare IP means port 53.
                    let parsed = d::parse_socket_addr(&s)
                        .or_else(|| s.parse().ok().map(|ip| SocketAddr::new(ip, 53)));
                    if parsed.is_none() {
                        p.error(
                            n,
                            path,
                            format!("invalid nameserver `{s}`: expected IP or IP:PORT"),
                        );
                    }
                    parsed
                })
            })
        });
        let min_ttl = opt(p, &r, "min_ttl", Duration::from_secs(1), d::duration);
        let max_ttl = opt(p, &r, "max_ttl", Duration::from_secs(300), d::duration);
        let stale_for = opt(p, &r, "stale_for", Duration::from_secs(300), d::duration);
        let timeout = opt(p, &r, "timeout", Duration::from_secs(2), d::duration);
        if let (Some(min), Some(max)) = (min_ttl, max_ttl)
            && min > max
        {
            p.error(
                r.node,
                &d::join(&r.path, "min_ttl"),
                "must not exceed max_ttl",
            );
        }
        Resolver {
            nameservers: nameservers?,
            min_ttl: min_ttl?,
            max_ttl: max_ttl?,
            stale_for: stale_for?,
            timeout: timeout?,
        }
    };
    let default_dns = match f.get("default_dns") {
        Some((n, path)) => {
            let template = d::string(p, n, &path)?;
            if !template.contains("{service}") {
                p.error(n, &path, "the template must contain `{service}`");
            }
            if split_host_port(&template).is_none() {
                p.error(n, &path, "the template must end in `:PORT`, e.g. `{service}.{namespace}.svc.cluster.local:7143`");
            }
            Some(template)
        }
        None => None,
    };
    let mut services = BTreeMap::new();
    let mut ok = true;
    if let Some((n, path)) = f.get("services") {
        match &n.value {
            Value::Map(entries) => {
                for (name, key_pos, node) in entries {
                    let path = d::join(&path, name);
                    if !d::is_dns_label(name) {
                        p.error_at(
                            *key_pos,
                            &path,
                            "a service name must be a DNS label: lowercase letters, digits and `-`",
                        );
                        ok = false;
                    }
                    match decode_service(p, node, &path) {
                        Some(s) => {
                            services.insert(name.clone(), s);
                        }
                        None => ok = false,
                    }
                }
            }
            Value::Null => {}
            _ => {
                p.error(
                    n,
                    &path,
                    format!(
                        "expected a mapping of service names, found {}",
                        n.type_name()
                    ),
                );
                ok = false;
            }
        }
    }
    Some(Discovery {
        resolver,
        default_dns,
        services: ok.then_some(services)?,
    })
}

fn decode_service(p: &Problems, node: &Node, path: &str) -> Option<ServiceDiscovery> {
    let f = Fields::new(
        p,
        node,
        path,
        &["endpoints", "dns", "srv", "mtls", "identity"],
    )?;
    let given: Vec<&str> = ["endpoints", "dns", "srv"]
        .into_iter()
        .filter(|k| f.get(k).is_some())
        .collect();
    if given.len() != 1 {
        p.error(
            node,
            path,
            format!(
                "give exactly one of `endpoints`, `dns` or `srv` (found {})",
                if given.is_empty() {
                    "none".to_string()
                } else {
                    given.join(", ")
                }
            ),
        );
    }
    let source = if let Some((n, path)) = f.get("endpoints") {
        d::list(p, n, &path, |n, path| d::socket_addr(p, n, path)).map(EndpointSource::Static)
    } else if let Some((n, path)) = f.get("dns") {
        d::string(p, n, &path).and_then(|s| match split_host_port(&s) {
            Some((host, port)) => Some(EndpointSource::Dns { host, port }),
            None => {
                p.error(n, &path, format!("invalid `{s}`: expected HOST:PORT"));
                None
            }
        })
    } else if let Some((n, path)) = f.get("srv") {
        d::string(p, n, &path).and_then(|s| {
            if s.starts_with('_') && s.contains("._") {
                Some(EndpointSource::Srv(s))
            } else {
                p.error(
                    n,
                    &path,
                    format!("invalid SRV name `{s}`: expected `_name._proto.domain`"),
                );
                None
            }
        })
    } else {
        None
    };
    let mtls = opt(p, &f, "mtls", true, d::boolean);
    let identity = match f.get("identity") {
        Some((n, path)) => d::string(p, n, &path).and_then(|id| {
            if id.starts_with("spiffe://") {
                Some(Some(id))
            } else {
                p.error(n, &path, "expected a full SPIFFE ID (`spiffe://...`)");
                None
            }
        }),
        None => Some(None),
    };
    Some(ServiceDiscovery {
        source: source?,
        mtls: mtls?,
        identity: identity?,
    })
}

/// `host:port` → (host, port); brackets around IPv6 hosts are removed.
pub fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

const POLICY_KEYS: &[&str] = &[
    "timeout",
    "connect_timeout",
    "retry",
    "circuit_breaker",
    "outlier",
];

fn decode_policies(p: &Problems, root: &Fields, discovery: Option<&Discovery>) -> Option<Policies> {
    let f = section(p, root, "policies", &["default", "services", "routes"])?;
    let empty = Node::empty_map();
    let default_node = f.get("default").map(|(n, _)| n).unwrap_or(&empty);
    let default = Arc::new(decode_policy(
        p,
        default_node,
        "policies.default",
        POLICY_KEYS,
        false,
    )?);

    let mut services = BTreeMap::new();
    let mut service_nodes: BTreeMap<String, Node> = BTreeMap::new();
    if let Some((n, path)) = f.get("services") {
        match &n.value {
            Value::Map(entries) => {
                for (name, key_pos, node) in entries {
                    let path = d::join(&path, name);
                    if let Some(discovery) = discovery
                        && !discovery.services.contains_key(name)
                        && discovery.default_dns.is_none()
                    {
                        p.error_at(*key_pos, &path, format!("no service `{name}` in discovery.services (and no discovery.default_dns)"));
                    }
                    let merged = default_node.merged_with(node);
                    // Validate the override alone first, so its errors carry its own path.
                    Fields::new(p, node, &path, POLICY_KEYS)?;
                    if let Some(policy) = decode_policy(p, &merged, &path, POLICY_KEYS, false) {
                        services.insert(name.clone(), Arc::new(policy));
                    }
                    service_nodes.insert(name.clone(), merged);
                }
            }
            Value::Null => {}
            _ => p.error(
                n,
                &path,
                format!(
                    "expected a mapping of service names, found {}",
                    n.type_name()
                ),
            ),
        }
    }

    let mut routes = Vec::new();
    if let Some((n, path)) = f.get("routes") {
        let route_keys: Vec<&str> = ["service", "method", "path_prefix"]
            .iter()
            .chain(POLICY_KEYS)
            .copied()
            .collect();
        d::list(p, n, &path, |node, path| {
            let rf = Fields::new(p, node, path, &route_keys)?;
            let service = rf
                .require(p, "service")
                .and_then(|(n, path)| d::string(p, n, &path));
            let method = match rf.get("method") {
                Some((n, path)) => d::string(p, n, &path).and_then(|m| {
                    match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(method) => Some(Some(method)),
                        Err(_) => {
                            p.error(n, &path, format!("invalid HTTP method `{m}`"));
                            None
                        }
                    }
                }),
                None => Some(None),
            };
            let path_prefix = match rf.get("path_prefix") {
                Some((n, ppath)) => d::string(p, n, &ppath).and_then(|s| {
                    if s.starts_with('/') {
                        Some(Some(s))
                    } else {
                        p.error(n, &ppath, "must start with `/`");
                        None
                    }
                }),
                None => Some(None),
            };
            let service = service?;
            let base = service_nodes.get(&service).unwrap_or(default_node);
            // Strip route-only keys before merging the policy keys over the service's policy.
            let mut policy_part = node.clone();
            if let Value::Map(entries) = &mut policy_part.value {
                entries.retain(|(k, _, _)| POLICY_KEYS.contains(&k.as_str()));
            }
            let merged = base.merged_with(&policy_part);
            let method = method?;
            let policy = decode_policy(p, &merged, path, POLICY_KEYS, method.is_some())?;
            routes.push(RoutePolicy {
                service,
                method,
                path_prefix: path_prefix?,
                policy: Arc::new(policy),
            });
            Some(())
        });
    }
    Some(Policies {
        default,
        services,
        routes,
    })
}

fn decode_policy(
    p: &Problems,
    node: &Node,
    path: &str,
    keys: &[&str],
    retry_non_idempotent: bool,
) -> Option<Policy> {
    let f = Fields::new(p, node, path, keys)?;
    let timeout = opt(p, &f, "timeout", Duration::from_secs(2), positive_duration);
    let connect_timeout = opt(
        p,
        &f,
        "connect_timeout",
        Duration::from_secs(1),
        positive_duration,
    );
    let retry = decode_retry(p, &f);
    let circuit_breaker = decode_breaker(p, &f);
    let outlier = {
        let o = section(p, &f, "outlier", &["consecutive_failures", "eject_for"])?;
        let consecutive_failures = opt(p, &o, "consecutive_failures", 3, |p, n, path| {
            d::integer(p, n, path, 1, 1_000_000).map(|v| v as u32)
        });
        let eject_for = opt(p, &o, "eject_for", Duration::from_secs(30), d::duration);
        Outlier {
            consecutive_failures: consecutive_failures?,
            eject_for: eject_for?,
        }
    };
    Some(Policy {
        timeout: timeout?,
        connect_timeout: connect_timeout?,
        retry: retry?,
        circuit_breaker: circuit_breaker?,
        outlier,
        retry_non_idempotent,
    })
}

fn positive_duration(p: &Problems, node: &Node, path: &str) -> Option<Duration> {
    let value = d::duration(p, node, path)?;
    if value.is_zero() {
        p.error(node, path, "must be greater than zero");
        return None;
    }
    Some(value)
}

fn decode_backoff(
    p: &Problems,
    f: &Fields,
    key: &str,
    base: Duration,
    max: Duration,
) -> Option<Backoff> {
    let b = section(p, f, key, &["base", "max"])?;
    let base = opt(p, &b, "base", base, positive_duration);
    let max = opt(p, &b, "max", max, positive_duration);
    if let (Some(base), Some(max)) = (base, max)
        && base > max
    {
        p.error(b.node, &d::join(&b.path, "base"), "must not exceed max");
        return None;
    }
    Some(Backoff {
        base: base?,
        max: max?,
    })
}

/// gRPC status codes by their `grpc-` names in `retry.on`.
pub const GRPC_CODES: &[(&str, i32)] = &[
    ("cancelled", 1),
    ("unknown", 2),
    ("invalid-argument", 3),
    ("deadline-exceeded", 4),
    ("not-found", 5),
    ("already-exists", 6),
    ("permission-denied", 7),
    ("resource-exhausted", 8),
    ("failed-precondition", 9),
    ("aborted", 10),
    ("out-of-range", 11),
    ("unimplemented", 12),
    ("internal", 13),
    ("unavailable", 14),
    ("data-loss", 15),
    ("unauthenticated", 16),
];

fn decode_retry(p: &Problems, f: &Fields) -> Option<Retry> {
    let r = section(
        p,
        f,
        "retry",
        &["attempts", "backoff", "on", "budget", "max_body"],
    )?;
    let attempts = opt(p, &r, "attempts", 3, |p, n, path| {
        d::integer(p, n, path, 1, 10).map(|v| v as u32)
    });
    let backoff = decode_backoff(
        p,
        &r,
        "backoff",
        Duration::from_millis(25),
        Duration::from_secs(1),
    );
    let on = match r.get("on") {
        Some((n, path)) => d::list(p, n, &path, |n, path| {
            Some(match &n.value {
                Value::Int(code) if (100..=599).contains(code) => vec![RetryCondition::Status(*code as u16)],
                Value::Str(s) => match s.as_str() {
                    "connect-error" => vec![RetryCondition::ConnectError],
                    "5xx" => (500..=599).map(RetryCondition::Status).collect(),
                    "gateway-error" => vec![
                        RetryCondition::Status(502),
                        RetryCondition::Status(503),
                        RetryCondition::Status(504),
                    ],
                    other => {
                        if let Ok(code) = other.parse::<u16>()
                            && (100..=599).contains(&code)
                        {
                            vec![RetryCondition::Status(code)]
                        } else if let Some(code) = other
                            .strip_prefix("grpc-")
                            .and_then(|name| GRPC_CODES.iter().find(|(n, _)| *n == name))
                        {
                            vec![RetryCondition::Grpc(code.1)]
                        } else {
                            p.error(n, path, format!("unknown retry condition `{other}`: use an HTTP status (e.g. 503), `5xx`, `connect-error`, or `grpc-<code>` (e.g. `grpc-unavailable`)"));
                            return None;
                        }
                    }
                },
                _ => {
                    p.error(n, path, "expected an HTTP status code or a condition name");
                    return None;
                }
            })
        })
        .map(|lists| {
            let mut on = RetryOn::default();
            for condition in lists.into_iter().flatten() {
                match condition {
                    RetryCondition::Status(s) => on.statuses.push(s),
                    RetryCondition::ConnectError => on.connect_error = true,
                    RetryCondition::Grpc(c) => on.grpc_codes.push(c),
                }
            }
            on.statuses.sort_unstable();
            on.statuses.dedup();
            on
        }),
        None => Some(RetryOn {
            statuses: vec![429, 502, 503, 504],
            connect_error: true,
            grpc_codes: vec![14],
        }),
    };
    let budget = {
        let b = section(p, &r, "budget", &["ratio", "min_per_second"])?;
        let ratio = opt(p, &b, "ratio", 0.2, |p, n, path| {
            d::number(p, n, path, 0.0, 10.0)
        });
        let min_per_second = opt(p, &b, "min_per_second", 10, |p, n, path| {
            d::integer(p, n, path, 0, 1_000_000).map(|v| v as u32)
        });
        RetryBudget {
            ratio: ratio?,
            min_per_second: min_per_second?,
        }
    };
    let max_body = opt(p, &r, "max_body", 64 * 1024, d::size);
    Some(Retry {
        attempts: attempts?,
        backoff: backoff?,
        on: on?,
        budget,
        max_body: max_body?,
    })
}

enum RetryCondition {
    Status(u16),
    ConnectError,
    Grpc(i32),
}

fn decode_breaker(p: &Problems, f: &Fields) -> Option<CircuitBreaker> {
    let c = section(
        p,
        f,
        "circuit_breaker",
        &[
            "consecutive_failures",
            "open_for",
            "max_open_for",
            "fallback",
        ],
    )?;
    let consecutive_failures = opt(p, &c, "consecutive_failures", 5, |p, n, path| {
        d::integer(p, n, path, 1, 1_000_000).map(|v| v as u32)
    });
    let open_for = opt(
        p,
        &c,
        "open_for",
        Duration::from_secs(10),
        positive_duration,
    );
    let max_open_for = opt(
        p,
        &c,
        "max_open_for",
        Duration::from_secs(120),
        positive_duration,
    );
    if let (Some(a), Some(b)) = (open_for, max_open_for)
        && a > b
    {
        p.error(
            c.node,
            &d::join(&c.path, "open_for"),
            "must not exceed max_open_for",
        );
    }
    let fallback = {
        let fb = section(p, &c, "fallback", &["status", "content_type", "body"])?;
        let status = opt(p, &fb, "status", 503, |p, n, path| {
            d::integer(p, n, path, 200, 599).map(|v| v as u16)
        });
        let content_type = opt(
            p,
            &fb,
            "content_type",
            "application/json".to_string(),
            d::string,
        );
        let body = opt(
            p,
            &fb,
            "body",
            r#"{"error":"upstream unavailable","kind":"circuit-open"}"#.to_string(),
            |p, n, path| match &n.value {
                Value::Str(s) => Some(s.clone()),
                _ => d::string(p, n, path),
            },
        );
        Fallback {
            status: status?,
            content_type: content_type?,
            body: body?,
        }
    };
    Some(CircuitBreaker {
        consecutive_failures: consecutive_failures?,
        open_for: open_for?,
        max_open_for: max_open_for?,
        fallback,
    })
}

fn decode_limits(p: &Problems, root: &Fields) -> Option<Limits> {
    let f = section(
        p,
        root,
        "limits",
        &["max_header_bytes", "header_read_timeout", "max_api_body"],
    )?;
    let max_header_bytes = opt(p, &f, "max_header_bytes", 64 * 1024, |p, n, path| {
        let v = d::size(p, n, path)?;
        if !(1024..=16 << 20).contains(&v) {
            p.error(n, path, "must be between 1KiB and 16MiB");
            return None;
        }
        Some(v)
    });
    let header_read_timeout = opt(
        p,
        &f,
        "header_read_timeout",
        Duration::from_secs(10),
        positive_duration,
    );
    let max_api_body = opt(p, &f, "max_api_body", 1 << 20, d::size);
    Some(Limits {
        max_header_bytes: max_header_bytes?,
        header_read_timeout: header_read_timeout?,
        max_api_body: max_api_body?,
    })
}

fn decode_inbound(
    p: &Problems,
    root: &Fields,
    trust_domain: &str,
    namespace: &str,
) -> Option<Inbound> {
    let f = section(
        p,
        root,
        "inbound",
        &["authorize", "rate_limit", "max_concurrent"],
    )?;
    let authorize = opt(p, &f, "authorize", Vec::new(), |p, n, path| {
        d::list(p, n, path, |n, path| {
            let rf = Fields::new(p, n, path, &["from", "path_prefix", "methods"])?;
            let from = rf.require(p, "from").and_then(|(n, path)| {
                let list = match &n.value {
                    Value::Str(_) => d::string(p, n, &path).map(|s| vec![s]),
                    _ => d::list(p, n, &path, |n, path| d::string(p, n, path)),
                }?;
                let mut ids = Vec::with_capacity(list.len());
                for name in list {
                    if name == "*" || name.starts_with("spiffe://") {
                        ids.push(name);
                    } else if d::is_dns_label(&name) {
                        ids.push(spiffe_id(trust_domain, namespace, &name));
                    } else {
                        p.error(n, &path, format!("`{name}` is neither a service name, a SPIFFE ID (`spiffe://...`) nor `*`"));
                        return None;
                    }
                }
                Some(ids)
            });
            let path_prefix = match rf.get("path_prefix") {
                Some((n, ppath)) => d::string(p, n, &ppath).and_then(|s| {
                    if s.starts_with('/') {
                        Some(Some(s))
                    } else {
                        p.error(n, &ppath, "must start with `/`");
                        None
                    }
                }),
                None => Some(None),
            };
            let methods = opt(p, &rf, "methods", Vec::new(), |p, n, path| {
                d::list(p, n, path, |n, path| {
                    let m = d::string(p, n, path)?.to_ascii_uppercase();
                    if http::Method::from_bytes(m.as_bytes()).is_err() {
                        p.error(n, path, format!("invalid HTTP method `{m}`"));
                        return None;
                    }
                    Some(m)
                })
            });
            Some(AuthzRule {
                from: from?,
                path_prefix: path_prefix?,
                methods: methods?,
            })
        })
    });
    let rate_limit = match f.get("rate_limit") {
        Some((n, path)) => {
            let rf = Fields::new(p, n, &path, &["per_second", "burst"])?;
            let per_second = rf
                .require(p, "per_second")
                .and_then(|(n, path)| d::integer(p, n, &path, 1, 10_000_000).map(|v| v as u32));
            let burst = match rf.get("burst") {
                Some((n, path)) => d::integer(p, n, &path, 1, 10_000_000).map(|v| v as u32),
                None => per_second,
            };
            Some(Some(RateLimit {
                per_second: per_second?,
                burst: burst?,
            }))
        }
        None => Some(None),
    };
    let max_concurrent = match f.get("max_concurrent") {
        Some((n, path)) => d::integer(p, n, &path, 1, 10_000_000).map(|v| Some(v as u32)),
        None => Some(None),
    };
    Some(Inbound {
        authorize: authorize?,
        rate_limit: rate_limit?,
        max_concurrent: max_concurrent?,
    })
}

fn decode_broker(p: &Problems, node: &Node, path: &str, base_dir: &Path) -> Option<Broker> {
    let f = Fields::new(
        p,
        node,
        path,
        &[
            "url",
            "exchange",
            "publishes",
            "enqueues",
            "schemas",
            "subscriptions",
            "dedup_window",
            "dedup_capacity",
            "queue_type",
            "delivery_timeout",
        ],
    )?;
    let url = f.require(p, "url").and_then(|(n, path)| {
        let url = d::string(p, n, &path)?;
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            p.error(
                n,
                &path,
                format!(
                    "expected an `amqp://` or `amqps://` URL, found `{}`",
                    redact_url(&url)
                ),
            );
            return None;
        }
        Some(url)
    });
    let exchange = opt(p, &f, "exchange", "events".to_string(), amqp_name);
    let names = |key: &str| {
        opt(p, &f, key, Vec::new(), |p, n, path| {
            d::list(p, n, path, |n, path| amqp_name(p, n, path))
        })
    };
    let publishes = names("publishes");
    let enqueues = names("enqueues");
    let schemas = match f.get("schemas") {
        Some((n, path)) => d::string(p, n, &path).map(|s| Some(resolve_path(base_dir, &s))),
        None => Some(None),
    };
    let subscriptions = opt(p, &f, "subscriptions", Vec::new(), |p, n, path| {
        d::list(p, n, path, |n, path| decode_subscription(p, n, path))
    });
    if let Some(subs) = &subscriptions {
        let mut seen = std::collections::BTreeSet::new();
        for s in subs {
            if !seen.insert(s.source.clone()) {
                p.error(
                    node,
                    &d::join(path, "subscriptions"),
                    format!("`{}` is subscribed twice", s.target()),
                );
            }
        }
    }
    let dedup_window = opt(p, &f, "dedup_window", Duration::from_secs(600), d::duration);
    let dedup_capacity = opt(p, &f, "dedup_capacity", 100_000, |p, n, path| {
        d::integer(p, n, path, 0, 100_000_000).map(|v| v as usize)
    });
    let queue_type = opt(
        p,
        &f,
        "queue_type",
        QueueType::Classic,
        |p, n, path| match d::string(p, n, path)?.as_str() {
            "classic" => Some(QueueType::Classic),
            "quorum" => Some(QueueType::Quorum),
            other => {
                p.error(
                    n,
                    path,
                    format!("unknown queue type `{other}`: expected `classic` or `quorum`"),
                );
                None
            }
        },
    );
    let delivery_timeout = opt(
        p,
        &f,
        "delivery_timeout",
        Duration::from_secs(30),
        positive_duration,
    );
    Some(Broker {
        url: url?,
        exchange: exchange?,
        publishes: publishes?,
        enqueues: enqueues?,
        schemas: schemas?,
        subscriptions: subscriptions?,
        dedup_window: dedup_window?,
        dedup_capacity: dedup_capacity?,
        queue_type: queue_type?,
        delivery_timeout: delivery_timeout?,
    })
}

fn amqp_name(p: &Problems, node: &Node, path: &str) -> Option<String> {
    let name = d::string(p, node, path)?;
    if !d::is_amqp_name(&name) {
        p.error(
            node,
            path,
            format!("invalid name `{name}`: use letters, digits, `.`, `_` and `-`"),
        );
        return None;
    }
    Some(name)
}

fn decode_subscription(p: &Problems, node: &Node, path: &str) -> Option<Subscription> {
    let f = Fields::new(
        p,
        node,
        path,
        &[
            "event",
            "queue",
            "deliver",
            "prefetch",
            "max_attempts",
            "retry_backoff",
        ],
    )?;
    let source = match (f.get("event"), f.get("queue")) {
        (Some((n, path)), None) => amqp_name(p, n, &path).map(SubscriptionSource::Event),
        (None, Some((n, path))) => amqp_name(p, n, &path).map(SubscriptionSource::Queue),
        _ => {
            p.error(node, path, "give exactly one of `event` or `queue`");
            None
        }
    };
    let deliver = f.require(p, "deliver").and_then(|(n, path)| {
        let target = d::string(p, n, &path)?;
        if !target.starts_with('/') {
            p.error(n, &path, "must be a path on the app starting with `/`");
            return None;
        }
        Some(target)
    });
    let prefetch = opt(p, &f, "prefetch", 32, |p, n, path| {
        d::integer(p, n, path, 1, 65_535).map(|v| v as u16)
    });
    let max_attempts = opt(p, &f, "max_attempts", 5, |p, n, path| {
        d::integer(p, n, path, 1, 1000).map(|v| v as u32)
    });
    let retry_backoff = decode_backoff(
        p,
        &f,
        "retry_backoff",
        Duration::from_secs(1),
        Duration::from_secs(60),
    );
    Some(Subscription {
        source: source?,
        deliver: deliver?,
        prefetch: prefetch?,
        max_attempts: max_attempts?,
        retry_backoff: retry_backoff?,
    })
}
