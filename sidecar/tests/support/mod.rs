//! Test harness: a mesh CA, real `outrider` processes, and small real apps (axum HTTP with
//! WebSocket, tonic gRPC) on loopback. Shared by every integration test binary.
#![allow(dead_code)]

pub mod apps;
mod ports;

// Not every test binary takes both.
#[allow(unused_imports)]
pub use ports::{free_addr, free_addrs};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_outrider");

/// The `outrider` binary the sidecars run: `OUTRIDER_BIN` when set (a private copy, for runs
/// that share a target directory with other checkouts), else the one cargo built.
pub fn bin() -> String {
    std::env::var("OUTRIDER_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// Installs the ring provider once; reqwest and rustls need a process default.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A mesh CA and workload certificates in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        Self::with_trust_domain("mesh.local")
    }

    pub fn with_trust_domain(td: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        outrider::tls::certs::mint_ca(&dir.path().join("ca"), td, 30).expect("mint ca");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca/ca.pem")
    }

    /// Issues `certs/<service>.pem` and `certs/<service>-key.pem` (namespace `default`).
    pub fn issue(&self, service: &str) -> (PathBuf, PathBuf) {
        self.issue_in(service, "default")
    }

    pub fn issue_in(&self, service: &str, namespace: &str) -> (PathBuf, PathBuf) {
        let out = self.dir.path().join("certs").join(namespace);
        outrider::tls::certs::issue(&self.dir.path().join("ca"), service, namespace, 30, &out)
            .expect("issue");
        (
            out.join(format!("{service}.pem")),
            out.join(format!("{service}-key.pem")),
        )
    }

    /// The `tls:` block of a sidecar config for `service`.
    pub fn tls_yaml(&self, service: &str) -> String {
        let (cert, key) = self.issue(service);
        format!(
            "tls: {{ trust_domain: mesh.local, ca: {}, cert: {}, key: {} }}\n",
            self.ca().display(),
            cert.display(),
            key.display()
        )
    }
}

/// Listen addresses for one sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Ports {
    pub fn new() -> Self {
        let [outbound, inbound, admin] = free_addrs();
        Self {
            outbound,
            inbound,
            admin,
        }
    }

    pub fn yaml(&self) -> String {
        format!(
            "listen: {{ outbound: {}, inbound: {}, admin: {} }}\n",
            self.outbound, self.inbound, self.admin
        )
    }
}

/// A running `outrider run` process, killed on drop.
pub struct Sidecar {
    pub child: Child,
    pub ports: Ports,
    pub config: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Writes `yaml` (which must not contain `listen:`; it is added) and starts the sidecar,
    /// waiting until `/ready` answers 200.
    pub fn start(yaml: &str) -> Self {
        Self::start_with(yaml, Ports::new(), &[])
    }

    pub fn start_with(yaml: &str, ports: Ports, env: &[(&str, &str)]) -> Self {
        let sidecar = Self::spawn(yaml, ports, env);
        sidecar.wait_ready(Duration::from_secs(15));
        sidecar
    }

    /// Like [`Sidecar::start`], logging at `--log-level debug`.
    /// Starts with debug logs and waits for `/live` only: such sidecars may never be ready
    /// (e.g. a broker that is unreachable on purpose).
    pub fn start_debug(yaml: &str) -> Self {
        let sidecar = Self::spawn_logging(yaml, Ports::new(), &[], "debug");
        sidecar.wait_status("/live", Duration::from_secs(15));
        sidecar
    }

    /// Starts without waiting for readiness, logging at `OUTRIDER_TEST_LOG_LEVEL` (default
    /// `info`; `debug` to see what a failing test's sidecar did).
    pub fn spawn(yaml: &str, ports: Ports, env: &[(&str, &str)]) -> Self {
        let level = std::env::var("OUTRIDER_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into());
        Self::spawn_logging(yaml, ports, env, &level)
    }

    fn spawn_logging(yaml: &str, ports: Ports, env: &[(&str, &str)], level: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("outrider.yaml");
        std::fs::write(&config, format!("{}{}", ports.yaml(), yaml)).expect("write config");
        let log = dir.path().join("outrider.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin());
        cmd.args(["run", "-c"])
            .arg(&config)
            .args(["--log-format", "json", "--log-level", level])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn outrider");
        Self {
            child,
            ports,
            config,
            log,
            _dir: dir,
        }
    }

    pub fn wait_ready(&self, within: Duration) {
        self.wait_status("/ready", within);
    }

    /// Waits until an admin path answers 200.
    pub fn wait_status(&self, path: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if http_get_status(self.ports.admin, path) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{path} not 200 within {within:?}; log:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://<outbound>`.
    pub fn outbound_url(&self) -> String {
        format!("http://{}", self.ports.outbound)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.ports.admin, path)
    }

    /// The admin `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get_body(self.ports.admin, "/metrics").unwrap_or_default()
    }

    /// The value of one sample line of `/metrics` (exact name with labels), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking HTTP/1.1 GET (no client library), for readiness polling.
pub fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let (status, _) = http_get(addr, path)?;
    Some(status)
}

pub fn http_get_body(addr: SocketAddr, path: &str) -> Option<String> {
    let (_, body) = http_get(addr, path)?;
    Some(body)
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A reqwest client (HTTP/1.1) with no proxy from the environment.
pub fn client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// A reqwest client speaking h2c (prior knowledge).
pub fn h2_client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// An h2c (prior knowledge) client that resolves `host` to `addr`, so that requests to
/// `http://{host}:{port}` carry the service's name as `:authority`.
pub fn h2_client_resolving(host: &str, addr: SocketAddr) -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve(host, addr)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// A raw HTTP/2 client (the `h2` crate) on a new connection to `addr`: the sender, and the task
/// that drives the connection (it ends when the server closes it).
pub async fn raw_h2(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    (sender, tokio::spawn(connection))
}

/// The config of a caller sidecar that knows `upstreams` by static endpoints (their inbound
/// addresses), plus the callee sidecars themselves: a two-sidecar mesh in one call.
pub struct Pair {
    pub caller: Sidecar,
    pub callee: Sidecar,
}

impl Pair {
    /// `caller` ("web") → `callee` (`service`) whose app is `app`. `caller_extra` and
    /// `callee_extra` are appended to the two configs.
    pub fn start(
        pki: &Pki,
        service: &str,
        app: SocketAddr,
        caller_extra: &str,
        callee_extra: &str,
    ) -> Self {
        let callee_ports = Ports::new();
        let callee = Sidecar::start_with(
            &format!(
                "service: {service}\napp: {app}\n{}{callee_extra}",
                pki.tls_yaml(service)
            ),
            callee_ports,
            &[],
        );
        let caller = Sidecar::start(&format!(
            "service: web\napp: 127.0.0.1:9\n{}discovery:\n  services:\n    {service}: {{ endpoints: [\"{}\"] }}\n{caller_extra}",
            pki.tls_yaml("web"),
            callee_ports.inbound
        ));
        Self { caller, callee }
    }
}

impl Pki {
    /// Issues a certificate signed by this CA with any validity and URI SAN (for tests of bad
    /// certificates). Returns (cert path, key path).
    pub fn issue_custom(
        &self,
        name: &str,
        uri_san: Option<&str>,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> (PathBuf, PathBuf) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
        let ca_dir = self.dir.path().join("ca");
        let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).expect("ca");
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).expect("key"))
                .expect("ca key");
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::DnsName(name.try_into().expect("dns"))];
        if let Some(uri) = uri_san {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().expect("uri")));
        }
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let out = self.dir.path().join("custom");
        std::fs::create_dir_all(&out).expect("dir");
        let cert_path = out.join(format!("{name}.pem"));
        let key_path = out.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca_pem)).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        (cert_path, key_path)
    }
}

/// Tries an mTLS handshake and one HTTP request against an inbound listener with the given
/// client certificate (any server certificate accepted). Returns the HTTP status line, or the
/// error that ended the exchange.
pub async fn raw_mtls_request(
    addr: SocketAddr,
    client_cert: Option<(&Path, &Path)>,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init();
    let connector = raw_tls_connector(client_cert, &[&rustls::version::TLS13])?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await {
        Ok(Ok(_)) if !buf.is_empty() => Ok(String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
        Ok(Ok(_)) => Err("connection closed without a response".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

use std::sync::Arc;

/// A server certificate verifier that accepts anything (the tests look at what was presented).
#[derive(Debug)]
pub struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the server of an mTLS handshake presented.
#[derive(Debug)]
pub struct Presented {
    /// DER of the leaf certificate.
    pub leaf: Vec<u8>,
    pub version: Option<rustls::ProtocolVersion>,
}

impl Presented {
    /// The serial number of the presented leaf (big-endian bytes).
    pub fn serial(&self) -> Vec<u8> {
        cert_serial(&self.leaf)
    }
}

/// Completes a TLS handshake with `addr` (any server certificate accepted) offering only
/// `versions`, with an optional client certificate, and returns what the server presented. The
/// server may still refuse the client certificate after its Finished: a read follows so such a
/// refusal is reported as an error too.
pub async fn tls_probe(
    addr: SocketAddr,
    client_cert: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Presented, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init();
    let connector = raw_tls_connector(client_cert, versions)?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no server certificate")?;
    let version = conn.protocol_version();
    // TLS 1.3: a refused client certificate shows up as an alert on the first read.
    tls.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(Presented { leaf, version }),
        Ok(Ok(_)) => Err("connection closed without a response".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The serial number (big-endian bytes) of a DER certificate.
pub fn cert_serial(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    cert.raw_serial().to_vec()
}

/// The leaf (first) certificate of a PEM file, as DER.
pub fn pem_leaf(path: &Path) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_file_iter(path)
        .expect("pem")
        .next()
        .expect("a certificate")
        .expect("valid pem")
        .to_vec()
}

/// notAfter of a DER certificate, Unix seconds.
pub fn cert_not_after(der: &[u8]) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    cert.validity().not_after.timestamp()
}

/// A directory laid out like a Kubernetes Secret volume: the files live in a timestamped
/// directory, `..data` points at it, and each visible file is a symlink through `..data`. An
/// update writes a new timestamped directory and renames a new `..data` symlink over the old one:
/// every file changes at once, atomically.
pub struct SecretDir {
    pub dir: PathBuf,
    version: u32,
}

impl SecretDir {
    /// Creates the volume at `dir` with `files` (name, contents).
    pub fn new(dir: &Path, files: &[(&str, Vec<u8>)]) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        let mut secret = Self {
            dir: dir.to_path_buf(),
            version: 0,
        };
        secret.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("link");
        }
        secret
    }

    /// The path of a visible file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Atomically replaces the contents of every file (the set of names must not change).
    pub fn update(&mut self, files: &[(&str, Vec<u8>)]) {
        self.version += 1;
        let version = format!(
            "..2026_11_27_00_00_{:02}.{}",
            self.version,
            std::process::id()
        );
        let vdir = self.dir.join(&version);
        std::fs::create_dir_all(&vdir).expect("version dir");
        for (name, contents) in files {
            std::fs::write(vdir.join(name), contents).expect("write");
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp).expect("link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw gRPC unary call over h2c with hyper (no gRPC library enforcing deadlines itself).
/// Returns the HTTP status, the grpc-status (from headers or trailers) and the response headers.
pub async fn raw_grpc_call(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    message: &[u8],
    extra_headers: &[(&str, &str)],
) -> (u16, Option<String>, http::HeaderMap) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra_headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    let grpc_status = headers
        .get("grpc-status")
        .or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")))
        .map(|v| v.to_str().unwrap_or("").to_string());
    (status, grpc_status, headers)
}

/// A TLS client for raw tests: accepts any server certificate, offers `http/1.1`, and presents
/// `client_cert` (cert and key PEM files) if given.
fn raw_tls_connector(
    client_cert: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut config = match client_cert {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| e.to_string())?
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
