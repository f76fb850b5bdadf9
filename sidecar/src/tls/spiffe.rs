//! SPIFFE IDs: `spiffe://<trust domain>/ns/<namespace>/sa/<service>`, parsed from certificates'
//! URI SANs with x509-parser.

use x509_parser::extensions::GeneralName;

/// A parsed workload identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service: String,
}

impl SpiffeId {
    /// Parses the mesh's SPIFFE ID form; anything else is `None`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        if !is_trust_domain(trust_domain) || !is_name(namespace) || !is_name(service) {
            return None;
        }
        Some(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service: service.to_string(),
        })
    }
}

pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// The `spiffe://` URI SANs of a DER certificate (usually one).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// The workload SPIFFE ID of a leaf certificate, if it has exactly one.
pub fn workload_id(der: &[u8]) -> Option<String> {
    let mut ids = uri_sans(der);
    if ids.len() == 1 { ids.pop() } else { None }
}

/// The trust domain a CA certificate names in its `spiffe://<td>` URI SAN.
pub fn trust_domain_of_ca(der: &[u8]) -> Option<String> {
    uri_sans(der).into_iter().find_map(|uri| {
        let td = uri.strip_prefix("spiffe://")?.trim_end_matches('/');
        (is_trust_domain(td) && !td.contains('/')).then(|| td.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mesh_ids() {
        let id = SpiffeId::parse("spiffe://mesh.local/ns/demo/sa/runner-service").expect("valid");
        assert_eq!(id.trust_domain, "mesh.local");
        assert_eq!(id.namespace, "demo");
        assert_eq!(id.service, "runner-service");
        for bad in [
            "spiffe://mesh.local/ns/demo/sa/",
            "spiffe://mesh.local/ns/demo/sa/x/y",
            "spiffe://Mesh/ns/a/sa/b",
            "https://mesh.local/ns/a/sa/b",
            "spiffe://",
            "",
        ] {
            assert!(SpiffeId::parse(bad).is_none(), "{bad}");
        }
    }
}
