//! Routing by authority: which service a request names (CONTRACT §4), or whether it is
//! addressed to the sidecar itself.

use std::net::SocketAddr;

/// A service named by an authority, and the namespace if the authority named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName<'a> {
    pub service: &'a str,
    pub namespace: Option<&'a str>,
}

/// Strips the port from `host:port` and brackets from `[v6]:port`.
pub fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Maps `svc`, `svc:80`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local[:port]` to a
/// service (and namespace). Anything else (IPs, outside names) is `None`.
pub fn parse_authority(authority: &str) -> Option<ServiceName<'_>> {
    let host = host_of(authority).trim_end_matches('.');
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let mut labels = host.split('.');
    let service = labels.next()?;
    let namespace = labels.next();
    let rest: Vec<&str> = labels.collect();
    let suffix_ok = match rest.as_slice() {
        [] => true,
        ["svc"] => true,
        ["svc", cluster @ ..] => cluster.iter().all(|l| is_label(l)),
        _ => false,
    };
    if !suffix_ok || !is_label(service) || namespace.is_some_and(|ns| !is_label(ns)) {
        return None;
    }
    Some(ServiceName { service, namespace })
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// True when the authority addresses the sidecar itself (its local API).
pub fn is_local(authority: &str, listener: SocketAddr) -> bool {
    let host = host_of(authority);
    if matches!(host, "localhost" | "127.0.0.1" | "::1") {
        return true;
    }
    authority == listener.to_string()
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == listener.ip() && !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(a: &str) -> Option<(&str, Option<&str>)> {
        parse_authority(a).map(|n| (n.service, n.namespace))
    }

    #[test]
    fn authority_forms() {
        assert_eq!(parsed("user-service"), Some(("user-service", None)));
        assert_eq!(parsed("user-service:80"), Some(("user-service", None)));
        assert_eq!(
            parsed("user-service.demo"),
            Some(("user-service", Some("demo")))
        );
        assert_eq!(
            parsed("user-service.demo.svc"),
            Some(("user-service", Some("demo")))
        );
        assert_eq!(
            parsed("user-service.demo.svc.cluster.local:7143"),
            Some(("user-service", Some("demo")))
        );
        assert_eq!(
            parsed("user-service.demo.svc.cluster.local."),
            Some(("user-service", Some("demo")))
        );
        assert_eq!(parsed("api.example.com"), None);
        assert_eq!(parsed("10.0.0.1:80"), None);
        assert_eq!(parsed("[::1]:80"), None);
        assert_eq!(parsed("User_Service"), None);
        assert_eq!(parsed(""), None);
    }

    #[test]
    fn local_authorities() {
        let listener: SocketAddr = "127.0.0.5:7140".parse().unwrap();
        assert!(is_local("localhost", listener));
        assert!(is_local("localhost:7140", listener));
        assert!(is_local("127.0.0.1:7140", listener));
        assert!(is_local("127.0.0.5:7140", listener));
        assert!(is_local("[::1]:7140", listener));
        assert!(!is_local("user-service", listener));
    }
}
