//! The I/O of the webhook: an HTTPS server (rustls with ring, hyper 1) with `POST /inject` and
//! `GET /healthz`; and `outrider await`, a readiness poll for the pre-1.29 postStart hook.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Settings, review};

/// The API server sends at most 3 MiB per request; a Pod is far smaller.
const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{path}: {reason}")]
    Tls { path: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls { .. } => 1,
            StartError::Bind { .. } | StartError::Runtime(_) => 2,
        }
    }
}

pub(super) fn run(listen: SocketAddr, cert: &Path, key: &Path, settings: Settings) -> ExitCode {
    match start(listen, cert, key, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider: injector: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn start(
    listen: SocketAddr,
    cert: &Path,
    key: &Path,
    settings: Settings,
) -> Result<(), StartError> {
    let tls = tls_config(cert, key)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    runtime.block_on(serve(listen, tls, Arc::new(settings)))
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let tls_error = |path: &Path, reason: String| StartError::Tls {
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(tls_error(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| tls_error(key, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn serve(
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    settings: Arc<Settings>,
) -> Result<(), StartError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(%local, "injector listening");
    let acceptor = TlsAcceptor::from(tls);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => {
                tracing::info!("injector stopping");
                return Ok(());
            }
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |request| handle(request, settings.clone()));
            let result = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn handle(
    request: Request<Incoming>,
    settings: Arc<Settings>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/inject") => {
            match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(body) => match review::review(&body.to_bytes(), &settings) {
                    Ok(answer) => {
                        tracing::info!("review {}", answer.summary);
                        Response::builder()
                            .status(StatusCode::OK)
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(answer.body)))
                            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bad review");
                        text(StatusCode::BAD_REQUEST, &format!("{e}\n"))
                    }
                },
                Err(e) => text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("cannot read the body: {e}\n"),
                ),
            }
        }
        (_, "/inject" | "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Polls `GET /ready` on the admin listener, blocking; a tiny HTTP/1.0 client keeps this free of
/// a runtime, since it runs once per pod start.
pub(super) fn await_ready(admin: SocketAddr, timeout: Duration) -> ExitCode {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match ready_status(admin) {
            Ok(200) => return ExitCode::SUCCESS,
            Ok(status) => format!("GET /ready answered {status}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            eprintln!(
                "outrider: sidecar at {admin} not ready after {}s: {last}",
                timeout.as_secs()
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn ready_status(admin: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("GET /ready HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())?;
    let mut head = [0u8; 32];
    let mut filled = 0;
    while filled < 12 {
        let n = stream.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    std::str::from_utf8(&head[..filled])
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}
