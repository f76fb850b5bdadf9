//! Mesh identity and TLS: loading and validating the workload certificate, key and CA bundle;
//! the rustls configs for both hops (TLS 1.3 only, ring provider); SPIFFE checks on both sides;
//! swapping in rotated material without a restart; and `outrider certs`.
//!
//! The inbound side accepts only clients whose chain ends in the mesh CA and whose certificate
//! names a SPIFFE ID in our trust domain. The outbound side accepts only an upstream whose chain
//! ends in the mesh CA and whose SPIFFE ID is exactly the one it meant to reach: webpki checks
//! DNS names, not URI SANs, so the client verifier is ours (see [`verify`]).

pub mod certs;
pub mod spiffe;
mod verify;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::sign::CertifiedKey;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::MtlsFiles;

pub use spiffe::SpiffeId;

/// Why certificate material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn invalid(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A validated workload identity: certificate chain, matching key, and the CA bundle.
pub struct Identity {
    pub spiffe_id: String,
    pub certified_key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub serial: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads and checks the files: parsable, key matches cert, cert valid now, chained to a CA
    /// in the bundle, and naming one SPIFFE ID in the configured trust domain.
    pub fn load(files: &MtlsFiles) -> Result<Self, TlsError> {
        let provider = provider();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&files.cert)?)
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(&files.cert, format!("not a PEM certificate: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(&files.cert, "no certificate in the file"));
        };
        // The parse error is not shown: it may quote a line of the key file.
        let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
            .map_err(|_| invalid(&files.key, "not a PEM private key (PKCS#8, PKCS#1 or SEC1)"))?;
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| invalid(&files.key, format!("unusable private key: {e}")))?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        certified_key
            .keys_match()
            .map_err(|_| invalid(&files.key, "the key does not match the certificate"))?;

        let ca_certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&files.ca)?)
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(&files.ca, format!("not a PEM certificate bundle: {e}")))?;
        if ca_certs.is_empty() {
            return Err(invalid(&files.ca, "no certificate in the CA bundle"));
        }
        let mut roots = RootCertStore::empty();
        for ca in ca_certs {
            roots
                .add(ca)
                .map_err(|e| invalid(&files.ca, format!("unusable CA certificate: {e}")))?;
        }

        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| invalid(&files.cert, format!("unparsable certificate: {e}")))?;
        let not_before = parsed.validity().not_before.timestamp();
        let not_after = parsed.validity().not_after.timestamp();
        let serial = parsed.raw_serial_as_string();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now > not_after {
            return Err(invalid(&files.cert, "the certificate has expired"));
        }
        if now < not_before {
            return Err(invalid(&files.cert, "the certificate is not valid yet"));
        }
        let spiffe_id = spiffe::workload_id(leaf).ok_or_else(|| {
            invalid(
                &files.cert,
                "the certificate has no single spiffe:// URI SAN",
            )
        })?;
        let id = SpiffeId::parse(&spiffe_id).ok_or_else(|| {
            invalid(
                &files.cert,
                format!("`{spiffe_id}` is not a mesh SPIFFE ID"),
            )
        })?;
        if id.trust_domain != files.trust_domain {
            return Err(invalid(
                &files.cert,
                format!(
                    "`{spiffe_id}` is outside the trust domain `{}`",
                    files.trust_domain
                ),
            ));
        }
        let parsed_leaf = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| invalid(&files.cert, e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed_leaf,
            &roots,
            &chain[1..],
            rustls::pki_types::UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            invalid(
                &files.cert,
                format!("not issued by the mesh CA in {}: {e}", files.ca.display()),
            )
        })?;

        Ok(Self {
            spiffe_id,
            certified_key: Arc::new(certified_key),
            roots: Arc::new(roots),
            not_before,
            not_after,
            serial,
        })
    }
}

/// ALPN protocol for an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    Http1,
    Http2,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::Http2 => vec![b"h2".to_vec()],
        }
    }
}

struct State {
    identity: Identity,
    acceptor: TlsAcceptor,
    /// Client configs by (expected upstream identity, ALPN); rebuilt lazily after a rotation.
    connectors: Mutex<HashMap<(String, Alpn), TlsConnector>>,
}

/// The live TLS material of a sidecar, swapped atomically on rotation.
pub struct MeshTls {
    trust_domain: String,
    handshake_timeout: std::time::Duration,
    state: ArcSwap<State>,
    /// Counts failed handshakes with upstreams, when set.
    outbound_handshake_errors: Option<prometheus::IntCounter>,
}

impl MeshTls {
    pub fn new(files: &MtlsFiles) -> Result<Self, TlsError> {
        let identity = Identity::load(files)?;
        Ok(Self {
            trust_domain: files.trust_domain.clone(),
            handshake_timeout: files.handshake_timeout,
            state: ArcSwap::from_pointee(Self::build(identity, &files.trust_domain)?),
            outbound_handshake_errors: None,
        })
    }

    /// Counts failed outbound handshakes (wrong identity, unknown CA, TLS 1.2 only, ...) in
    /// `counter`.
    pub fn with_outbound_handshake_errors(mut self, counter: prometheus::IntCounter) -> Self {
        self.outbound_handshake_errors = Some(counter);
        self
    }

    /// Records one failed handshake with an upstream.
    pub fn outbound_handshake_failed(&self) {
        if let Some(counter) = &self.outbound_handshake_errors {
            counter.inc();
        }
    }

    fn build(identity: Identity, trust_domain: &str) -> Result<State, TlsError> {
        let verifier = Arc::new(verify::MeshClientVerifier::new(
            identity.roots.clone(),
            trust_domain.to_string(),
        )?);
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                identity.certified_key.clone(),
            )));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Session tickets let reconnecting sidecars skip the full handshake.
        server.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(State {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            identity,
            connectors: Mutex::new(HashMap::new()),
        })
    }

    /// Validates new material and swaps it in; on error the old material stays in force.
    pub fn reload(&self, files: &MtlsFiles) -> Result<bool, TlsError> {
        let identity = Identity::load(files)?;
        let current = self.state.load();
        if identity.serial == current.identity.serial
            && identity.roots.len() == current.identity.roots.len()
            && roots_equal(&identity.roots, &current.identity.roots)
        {
            return Ok(false);
        }
        self.state
            .store(Arc::new(Self::build(identity, &self.trust_domain)?));
        Ok(true)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn handshake_timeout(&self) -> std::time::Duration {
        self.handshake_timeout
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.state.load().acceptor.clone()
    }

    /// A connector that only accepts an upstream presenting `expected_id`.
    pub fn connector(&self, expected_id: &str, alpn: Alpn) -> Result<TlsConnector, TlsError> {
        let state = self.state.load();
        let mut cache = state
            .connectors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = cache.get(&(expected_id.to_string(), alpn)) {
            return Ok(c.clone());
        }
        let verifier = Arc::new(verify::MeshServerVerifier::new(
            state.identity.roots.clone(),
            expected_id.to_string(),
        ));
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                state.identity.certified_key.clone(),
            )));
        client.alpn_protocols = alpn.protocols();
        let connector = TlsConnector::from(Arc::new(client));
        cache.insert((expected_id.to_string(), alpn), connector.clone());
        Ok(connector)
    }

    pub fn identity_id(&self) -> String {
        self.state.load().identity.spiffe_id.clone()
    }

    pub fn serial(&self) -> String {
        self.state.load().identity.serial.clone()
    }

    /// (not_before, not_after) of the certificate in use, Unix seconds.
    pub fn validity(&self) -> (i64, i64) {
        let s = self.state.load();
        (s.identity.not_before, s.identity.not_after)
    }
}

fn roots_equal(a: &RootCertStore, b: &RootCertStore) -> bool {
    a.roots.iter().zip(b.roots.iter()).all(|(x, y)| {
        x.subject_public_key_info == y.subject_public_key_info && x.subject == y.subject
    })
}

/// The SPIFFE ID of the peer of an established TLS connection.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe::workload_id(leaf))
}
