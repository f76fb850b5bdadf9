//! Routing by authority: which service a request names (CONTRACT §4), or whether it is
//! addressed to the sidecar itself.

use std::borrow::Cow;
use std::net::SocketAddr;

/// A service named by an authority, and the namespace if the authority named one. Names are
/// lower case (authorities are case-insensitive); borrowed unless they had to be lowered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName<'a> {
    pub service: Cow<'a, str>,
    pub namespace: Option<Cow<'a, str>>,
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

/// Maps `svc`, `svc:80`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local[:port]` (any
/// cluster domain after `svc`, optional trailing dot) to a service and namespace. Anything else
/// (IPs, outside names, bad ports) is `None`. Allocation-free unless a name has upper case.
pub fn parse_authority(authority: &str) -> Option<ServiceName<'_>> {
    if let Some(service) = bare_service(authority) {
        return Some(ServiceName {
            service: Cow::Borrowed(service),
            namespace: None,
        });
    }
    parse_general(authority)
}

/// [`parse_authority`] for every form.
fn parse_general(authority: &str) -> Option<ServiceName<'_>> {
    if authority.starts_with('[') {
        return None;
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && port.parse::<u16>().is_err()
    {
        return None;
    }
    let host = host_of(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || (may_be_ip(host) && host.parse::<std::net::IpAddr>().is_ok()) {
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
    Some(ServiceName {
        service: lowered(service),
        namespace: namespace.map(lowered),
    })
}

/// The common authority, a lower-case service name alone with an optional port (`user-service`,
/// `user-service:80`), recognized in one pass over its bytes (the general parse costs about
/// three times as much: `bench/callgrind.sh`). `None` means "not this form", not "invalid".
fn bare_service(authority: &str) -> Option<&str> {
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let plain = host
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let port_ok =
        port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok());
    (plain && port_ok && is_label(host)).then_some(host)
}

fn lowered(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Letters, digits and `-`, not at either end, at most 63 bytes (RFC 1123).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A cheap pre-check before parsing an IP (a service name never passes it): IPv4 literals start
/// with a digit, IPv6 ones (brackets already removed) contain `:`.
fn may_be_ip(host: &str) -> bool {
    host.as_bytes().first().is_some_and(u8::is_ascii_digit) || host.contains(':')
}

/// True when the authority addresses the sidecar itself (its local API).
pub fn is_local(authority: &str, listener: SocketAddr) -> bool {
    let host = host_of(authority);
    if matches!(host, "localhost" | "127.0.0.1" | "::1") {
        return true;
    }
    // Only an IP literal can name the listener (no formatting of the listener's address: this
    // runs on every request). An unspecified listener IP must be named with its port.
    if !may_be_ip(host) {
        return false;
    }
    let Ok(ip) = host.parse::<std::net::IpAddr>() else {
        return false;
    };
    ip == listener.ip()
        && (!ip.is_unspecified()
            || authority
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                == Some(listener.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(a: &str) -> Option<(String, Option<String>)> {
        parse_authority(a).map(|n| (n.service.into_owned(), n.namespace.map(Cow::into_owned)))
    }

    fn some(service: &str, ns: Option<&str>) -> Option<(String, Option<String>)> {
        Some((service.to_string(), ns.map(str::to_string)))
    }

    #[test]
    fn authority_forms() {
        assert_eq!(parsed("user-service"), some("user-service", None));
        assert_eq!(parsed("user-service:80"), some("user-service", None));
        assert_eq!(
            parsed("user-service.demo"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            parsed("user-service.demo.svc"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            parsed("user-service.demo.svc.cluster.local:7143"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            parsed("user-service.demo.svc.cluster.local."),
            some("user-service", Some("demo"))
        );
        assert_eq!(parsed("api.example.com"), None);
        assert_eq!(parsed("10.0.0.1:80"), None);
        assert_eq!(parsed("[::1]:80"), None);
        assert_eq!(parsed("User_Service"), None);
        assert_eq!(parsed(""), None);
        assert_eq!(
            parsed("User-Service.Demo"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            parsed("user-service.demo.svc.corp.example"),
            some("user-service", Some("demo"))
        );
        for bad in [
            ":80",
            "user-service:",
            "user-service:http",
            "user-service:99999",
            "-svc",
            "svc-",
            "a..b",
        ] {
            assert_eq!(parsed(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_parse() {
        let longest = "a".repeat(63);
        let too_long = "a".repeat(64);
        let samples = [
            "user-service",
            "user-service:80",
            "user-service:+80",
            "user-service:",
            "user-service:99999",
            "user-service:80:80",
            "User-Service",
            "10",
            "10:80",
            "-svc",
            "svc-",
            "",
            ":80",
            &longest,
            &too_long,
            "svc.ns",
        ];
        for sample in samples {
            if let Some(fast) = bare_service(sample) {
                let general = parse_general(sample).map(|n| (n.service, n.namespace));
                assert_eq!(general, Some((Cow::Borrowed(fast), None)), "{sample:?}");
            }
        }
        assert_eq!(bare_service("user-service:80"), Some("user-service"));
        assert_eq!(bare_service("svc.ns"), None);
        assert_eq!(bare_service(&too_long), None);
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
        assert!(!is_local("127.0.0.6:7140", listener));
        let any: SocketAddr = "0.0.0.0:7140".parse().unwrap();
        assert!(is_local("0.0.0.0:7140", any));
        assert!(!is_local("0.0.0.0:80", any));
        assert!(!is_local("0.0.0.0", any));
    }
}
