//! The DNS client side of discovery: builds the hickory resolver from `discovery.resolver`
//! and turns A/AAAA and SRV answers into endpoint sets with a TTL, with errors classified so the
//! refresh loop can tell "the name is gone" from "the resolver is down" (both keep the last set
//! for `stale_for`, but they are logged differently).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::config;

/// A successful lookup: the endpoints and how long the answer may be trusted (the smallest TTL
/// of the records it was built from, before clamping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub endpoints: Vec<SocketAddr>,
    pub ttl: Duration,
    /// Set when one address family's query failed (not "no records") while the other answered.
    /// The refresh loop accepts such an answer only if the set in force has no address of the
    /// failed family: resolvers that never answer AAAA still work, and a flaky one never drops
    /// half of a dual-stack set.
    pub partial: Option<Partial>,
}

/// The family whose query failed in a partial answer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub ipv6: bool,
    pub error: LookupError,
}

/// Why a lookup failed. Every kind keeps the last known endpoints for `stale_for`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name does not exist (NXDOMAIN).
    #[error("{name}: no such domain (NXDOMAIN)")]
    NxDomain { name: String },
    /// The name exists but has no records of the asked type (NODATA), or an SRV set none of
    /// whose targets resolved.
    #[error("{name}: no {kind} records")]
    NoRecords { name: String, kind: &'static str },
    /// The resolver did not answer usefully: timeout, refused, SERVFAIL, I/O.
    #[error("{name}: resolver failed: {reason}")]
    Resolver { name: String, reason: String },
    /// The resolver could not be set up (e.g. no usable `/etc/resolv.conf`).
    #[error("resolver configuration: {0}")]
    Config(String),
}

impl LookupError {
    /// True when the DNS data says the name has no addresses (as opposed to a failure to ask).
    pub fn is_negative(&self) -> bool {
        matches!(
            self,
            LookupError::NxDomain { .. } | LookupError::NoRecords { .. }
        )
    }

    fn from_net(name: &str, kind: &'static str, err: &NetError) -> Self {
        let name = name.to_string();
        match err {
            NetError::Dns(DnsError::NoRecordsFound(nr)) => match nr.response_code {
                ResponseCode::NXDomain => LookupError::NxDomain { name },
                ResponseCode::NoError => LookupError::NoRecords { name, kind },
                code => LookupError::Resolver {
                    name,
                    reason: format!("{kind} query answered {code}"),
                },
            },
            other => LookupError::Resolver {
                name,
                reason: other.to_string(),
            },
        }
    }
}

/// The shared resolver of one [`Discovery`](super::Discovery), built on first use so that a
/// sidecar with only static services never reads `/etc/resolv.conf`, and rebuilt on the next
/// lookup when building failed (the file may appear later).
pub struct DnsResolver {
    settings: config::Resolver,
    built: Mutex<Option<Arc<TokioResolver>>>,
}

impl DnsResolver {
    pub fn new(settings: config::Resolver) -> Self {
        Self {
            settings,
            built: Mutex::new(None),
        }
    }

    pub fn settings(&self) -> &config::Resolver {
        &self.settings
    }

    fn get(&self) -> Result<Arc<TokioResolver>, LookupError> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = built.as_ref() {
            return Ok(r.clone());
        }
        let resolver = Arc::new(build(&self.settings)?);
        *built = Some(resolver.clone());
        Ok(resolver)
    }

    /// A and AAAA for `host`, each address paired with `port`.
    pub async fn lookup_host(&self, host: &str, port: u16) -> Result<Answer, LookupError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            // A literal address never changes: trust it for as long as we are allowed to.
            return Ok(Answer {
                endpoints: vec![SocketAddr::new(ip, port)],
                ttl: self.settings.max_ttl,
                partial: None,
            });
        }
        let resolver = self.get()?;
        let name = parse_name(host)?;
        lookup_addrs(&resolver, &name, host, port).await
    }

    /// SRV for `name`, targets resolved to addresses. Rules (RFC 2782, as a mesh needs them):
    /// the lowest priority whose targets resolve wins; within it, targets of weight 0 are used
    /// only when no weighted target resolves; a lone target `.` means "no service here" (an
    /// empty set, not an error). Weights are not repeated into the set: the balancer is load-
    /// aware and spreads by observed latency.
    pub async fn lookup_srv(&self, srv: &str) -> Result<Answer, LookupError> {
        let resolver = self.get()?;
        let name = parse_name(srv)?;
        let lookup = resolver
            .lookup(name, RecordType::SRV)
            .await
            .map_err(|e| LookupError::from_net(srv, "SRV", &e))?;
        let mut ttl = u32::MAX;
        let mut records = Vec::new();
        for record in lookup.answers() {
            if let RData::SRV(s) = &record.data {
                ttl = ttl.min(record.ttl);
                records.push((s.priority, s.weight, s.port, s.target.clone()));
            }
        }
        if records.is_empty() {
            return Err(LookupError::NoRecords {
                name: srv.to_string(),
                kind: "SRV",
            });
        }
        if records.len() == 1 && records[0].3.is_root() {
            return Ok(Answer {
                endpoints: Vec::new(),
                ttl: Duration::from_secs(ttl.into()),
                partial: None,
            });
        }
        records.sort_by_key(|r| r.0);
        let mut priorities: Vec<u16> = records.iter().map(|r| r.0).collect();
        priorities.dedup();
        let mut last_negative = None;
        for priority in priorities {
            let group: Vec<_> = records
                .iter()
                .filter(|r| r.0 == priority && !r.3.is_root())
                .collect();
            let weighted: Vec<_> = group.iter().filter(|r| r.1 > 0).copied().collect();
            let zero: Vec<_> = group.iter().filter(|r| r.1 == 0).copied().collect();
            for tier in [weighted, zero] {
                if tier.is_empty() {
                    continue;
                }
                let answers = join_all(tier.iter().map(|(_, _, port, target)| {
                    let shown = target.to_string();
                    let resolver = resolver.clone();
                    async move { lookup_addrs(&resolver, target, &shown, *port).await }
                }))
                .await;
                let mut endpoints = Vec::new();
                let mut tier_ttl = Duration::from_secs(ttl.into());
                let mut partial = None;
                for answer in answers {
                    match answer {
                        Ok(a) => {
                            endpoints.extend(a.endpoints);
                            tier_ttl = tier_ttl.min(a.ttl);
                            partial = partial.or(a.partial);
                        }
                        // A target that is gone is skipped; a resolver failure fails the
                        // whole lookup, so a flaky resolver never shrinks the set.
                        Err(e) if e.is_negative() => last_negative = Some(e),
                        Err(e) => return Err(e),
                    }
                }
                if !endpoints.is_empty() {
                    return Ok(Answer {
                        endpoints,
                        ttl: tier_ttl,
                        partial,
                    });
                }
            }
        }
        Err(last_negative.unwrap_or(LookupError::NoRecords {
            name: srv.to_string(),
            kind: "SRV target",
        }))
    }
}

fn parse_name(text: &str) -> Result<Name, LookupError> {
    Name::from_utf8(text).map_err(|e| LookupError::Resolver {
        name: text.to_string(),
        reason: format!("invalid DNS name: {e}"),
    })
}

/// A and AAAA in parallel. A name with only one family is fine. When one query fails (not "no
/// records") and the other answers, the answer is marked [`Partial`] for the refresh loop.
async fn lookup_addrs(
    resolver: &TokioResolver,
    name: &Name,
    shown: &str,
    port: u16,
) -> Result<Answer, LookupError> {
    let (a, aaaa) = futures_util::future::join(
        resolver.lookup(name.clone(), RecordType::A),
        resolver.lookup(name.clone(), RecordType::AAAA),
    )
    .await;
    let mut endpoints = Vec::new();
    let mut ttl = u32::MAX;
    let mut negative = Vec::new();
    let mut failed: Option<Partial> = None;
    for (result, kind, ipv6) in [(a, "A", false), (aaaa, "AAAA", true)] {
        match result {
            Ok(lookup) => {
                for record in lookup.answers() {
                    let ip = match &record.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                        _ => continue,
                    };
                    ttl = ttl.min(record.ttl);
                    endpoints.push(SocketAddr::new(ip, port));
                }
            }
            Err(e) => {
                let error = LookupError::from_net(shown, kind, &e);
                if error.is_negative() {
                    negative.push(error);
                } else if failed.is_none() {
                    failed = Some(Partial { ipv6, error });
                }
            }
        }
    }
    if endpoints.is_empty() {
        if let Some(failure) = failed {
            return Err(failure.error);
        }
        // Both families negative: NXDOMAIN wins over NODATA as the clearer message.
        return Err(negative
            .iter()
            .find(|e| matches!(e, LookupError::NxDomain { .. }))
            .or(negative.first())
            .cloned()
            .unwrap_or(LookupError::NoRecords {
                name: shown.to_string(),
                kind: "A/AAAA",
            }));
    }
    Ok(Answer {
        endpoints,
        ttl: Duration::from_secs(ttl.into()),
        partial: failed,
    })
}

/// The hickory resolver for these settings: the configured nameservers (UDP with TCP fallback
/// for truncated answers, each on its own port), else the system's `/etc/resolv.conf`. Its cache
/// is off: the refresh loop decides when to ask again, and each refresh must see changes.
fn build(settings: &config::Resolver) -> Result<TokioResolver, LookupError> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| {
            LookupError::Config(format!("cannot read the system resolver config: {e}"))
        })?
    } else {
        let servers = settings
            .nameservers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut ns.connections {
                    connection.port = addr.port();
                }
                ns
            })
            .collect();
        Resolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.timeout = settings.timeout;
    // One try per refresh: the refresh loop retries with backoff and owns stale-while-error.
    opts.attempts = 1;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    if !settings.nameservers.is_empty() {
        // Explicit nameservers mean "ask these": /etc/hosts would shadow them.
        opts.use_hosts_file = ResolveHosts::Never;
    }
    builder
        .build()
        .map_err(|e| LookupError::Config(format!("cannot build the resolver: {e}")))
}
