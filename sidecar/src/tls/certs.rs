//! `outrider certs`: a development mesh CA and SPIFFE workload certificates, minted with rcgen.
//! The CA carries the URI SAN `spiffe://<trust_domain>` so `issue` can find the trust domain
//! without another flag.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use rustls_pki_types::pem::PemObject;

use super::spiffe;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

impl CertsError {
    /// 1 for bad input, 2 for failures of the machine (files not writable).
    pub fn exit_code(&self) -> u8 {
        match self {
            CertsError::Invalid(_) => 1,
            CertsError::Io { path, source } => {
                if source.kind() == std::io::ErrorKind::NotFound && path.extension().is_some() {
                    1
                } else {
                    2
                }
            }
            CertsError::Rcgen(_) => 1,
        }
    }
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // Backdated a little so peers with slightly slow clocks accept it.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days.max(1)));
}

/// Mints `DIR/ca.pem` and `DIR/ca-key.pem`.
pub fn mint_ca(out: &Path, trust_domain: &str, days: u32) -> Result<Vec<PathBuf>, CertsError> {
    if !spiffe::is_trust_domain(trust_domain) {
        return Err(CertsError::Invalid(format!(
            "invalid trust domain `{trust_domain}`: lowercase letters, digits, `.`, `-`, `_`"
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| CertsError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Outrider mesh");
    dn.push(
        DnType::CommonName,
        format!("Outrider mesh CA {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    let cert_path = out.join("ca.pem");
    let key_path = out.join("ca-key.pem");
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok(vec![cert_path, key_path])
}

/// Issues `OUT/NAME.pem` (leaf followed by the CA) and `OUT/NAME-key.pem` for
/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service>`.
pub fn issue(
    ca_dir: &Path,
    service: &str,
    namespace: &str,
    days: u32,
    out: &Path,
) -> Result<Vec<PathBuf>, CertsError> {
    for (what, name) in [("service", service), ("namespace", namespace)] {
        if !spiffe::is_name(name) {
            return Err(CertsError::Invalid(format!(
                "invalid {what} `{name}`: lowercase letters, digits and `-`"
            )));
        }
    }
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let ca_key_pem = read(&ca_dir.join("ca-key.pem"))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| {
        CertsError::Invalid(format!("{}: {e}", ca_dir.join("ca-key.pem").display()))
    })?;
    let ca_der = rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            CertsError::Invalid(format!(
                "{}: no certificate",
                ca_dir.join("ca.pem").display()
            ))
        })?;
    let trust_domain = spiffe::trust_domain_of_ca(&ca_der)
        .unwrap_or_else(|| crate::config::DEFAULT_TRUST_DOMAIN.to_string());
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Outrider mesh");
    dn.push(DnType::CommonName, format!("{service}.{namespace}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let id = crate::config::spiffe_id(&trust_domain, namespace, service);
    params.subject_alt_names = vec![
        SanType::URI(id.as_str().try_into()?),
        SanType::DnsName(service.try_into()?),
        SanType::DnsName(format!("{service}.{namespace}.svc").try_into()?),
        SanType::DnsName(format!("{service}.{namespace}.svc.cluster.local").try_into()?),
    ];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out).map_err(|source| CertsError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let cert_path = out.join(format!("{service}.pem"));
    let key_path = out.join(format!("{service}-key.pem"));
    write(
        &cert_path,
        &format!("{}{}", cert.pem(), ensure_newline(&ca_pem)),
        false,
    )?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok(vec![cert_path, key_path])
}

fn ensure_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_string()
    } else {
        format!("{pem}\n")
    }
}
