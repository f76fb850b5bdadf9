//! Service names in request authorities, and the `default_dns` template. Pure functions: the
//! proxy parses the authority, discovery expands the template.

use super::resolver::LookupError;

/// Maps a request authority to (service, namespace named by the authority, if any).
///
/// Accepted forms, each with an optional `:port` (ignored: the service's endpoints carry their
/// own ports) and an optional trailing dot:
///
/// | authority | result |
/// |---|---|
/// | `user-service` | (`user-service`, None) |
/// | `user-service.demo` | (`user-service`, Some(`demo`)) |
/// | `user-service.demo.svc` | (`user-service`, Some(`demo`)) |
/// | `user-service.demo.svc.cluster.local` (any cluster domain after `svc`) | (`user-service`, Some(`demo`)) |
///
/// Anything else (IP literals, `api.example.com`, empty labels, a bad port) is `None`: not a
/// mesh service name. Names are case-insensitive and returned in lower case.
pub fn parse_authority(authority: &str) -> Option<(String, Option<String>)> {
    let host = strip_port(authority)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    if !labels.iter().all(|l| is_dns_label(l)) {
        return None;
    }
    match labels.as_slice() {
        [service] => Some((service.to_string(), None)),
        [service, namespace] => Some((service.to_string(), Some(namespace.to_string()))),
        [service, namespace, "svc", ..] => Some((service.to_string(), Some(namespace.to_string()))),
        _ => None,
    }
}

/// `host[:port]` → `host`; `None` for an empty host, a bad port, or a bracketed IPv6 literal.
fn strip_port(authority: &str) -> Option<&str> {
    if authority.starts_with('[') {
        return None;
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            port.parse::<u16>().ok()?;
            host
        }
        None => authority,
    };
    (!host.is_empty()).then_some(host)
}

/// Letters, digits and `-`, not at either end, at most 63 bytes (RFC 1123).
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Fills `{service}` and `{namespace}` into a `default_dns` template and splits off the port.
pub fn expand_template(
    template: &str,
    service: &str,
    namespace: &str,
) -> Result<(String, u16), LookupError> {
    let filled = template
        .replace("{service}", service)
        .replace("{namespace}", namespace);
    crate::config::split_host_port(&filled).ok_or_else(|| {
        LookupError::Config(format!(
            "default_dns `{template}` gives `{filled}`, not HOST:PORT"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &str) -> Option<(String, Option<String>)> {
        parse_authority(a)
    }

    fn some(service: &str, ns: Option<&str>) -> Option<(String, Option<String>)> {
        Some((service.to_string(), ns.map(str::to_string)))
    }

    #[test]
    fn service_forms() {
        assert_eq!(p("user-service"), some("user-service", None));
        assert_eq!(p("user-service:80"), some("user-service", None));
        assert_eq!(p("user-service.demo"), some("user-service", Some("demo")));
        assert_eq!(
            p("user-service.demo:7143"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            p("user-service.demo.svc"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            p("user-service.demo.svc.cluster.local"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            p("user-service.demo.svc.cluster.local:8080"),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            p("user-service.demo.svc.cluster.local."),
            some("user-service", Some("demo"))
        );
        assert_eq!(
            p("user-service.demo.svc.corp.example"),
            some("user-service", Some("demo"))
        );
        assert_eq!(p("User-Service.Demo"), some("user-service", Some("demo")));
    }

    #[test]
    fn not_service_names() {
        for a in [
            "",
            ":80",
            "user-service:",
            "user-service:http",
            "user-service:99999",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]:80",
            "::1",
            "api.example.com",
            "a..b",
            "-bad",
            "user_service",
            "user-service.demo.svc.cluster.local:80:80",
        ] {
            assert_eq!(p(a), None, "{a:?}");
        }
    }

    #[test]
    fn template() {
        assert_eq!(
            expand_template(
                "{service}.{namespace}.svc.cluster.local:7143",
                "user-service",
                "demo"
            ),
            Ok(("user-service.demo.svc.cluster.local".to_string(), 7143))
        );
        assert_eq!(
            expand_template("{service}.mesh:80", "a", "b"),
            Ok(("a.mesh".to_string(), 80))
        );
        assert!(expand_template("{service}", "a", "b").is_err());
    }
}
