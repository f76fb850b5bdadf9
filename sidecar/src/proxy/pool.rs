//! Connections to one endpoint: dialing (TCP, then mTLS with the expected identity or plain),
//! a pool of HTTP/1.1 connections reused with keep-alive, one multiplexed HTTP/2 connection,
//! and dedicated connections for upgrades (WebSocket).
//!
//! HTTP/1.1 is written on hyper's `client::conn` rather than hyper-util's legacy `Client`: the
//! legacy client keys its pool and HTTP/2 `:authority` on the request URI, while the mesh must
//! dial an endpoint address and still send the service's authority, and must choose the TLS
//! identity per service. HTTP/2 is on the `h2` crate directly ([`http2::client`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::http::{Body, boxed, h1_to_h2, origin_form};
use super::{http1, http2};
use crate::tls::{Alpn, MeshTls};

/// How to reach a service's endpoints.
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP (the local app, or upstreams with `mtls: false`).
    Plain,
    /// mTLS; the upstream must present `identity`.
    Mesh { tls: Arc<MeshTls>, identity: String },
}

/// Why a connection could not be made. Every variant means the request never reached the
/// upstream, so any request may be retried after it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Tcp(SocketAddr, io::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Http(SocketAddr, hyper::Error),
    /// A new HTTP/1.1 connection that ended before its first request could be written.
    #[error("connection to {0} closed before the request was sent")]
    Closed(SocketAddr),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    H2(SocketAddr, h2::Error),
}

/// Why a request failed on its way to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request was (or may have been) sent and the exchange failed.
    #[error("upstream {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    /// The same, on an HTTP/2 connection ([`http2::client`]).
    #[error("upstream {0}: {1}")]
    H2(SocketAddr, #[source] h2::Error),
}

impl SendError {
    /// True when the request provably never reached the upstream.
    pub fn never_sent(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }

    /// True when the exchange failed because the client's own request body failed (malformed
    /// chunked encoding, a client that went away): the client's fault, not the upstream's.
    pub fn client_body_failed(&self) -> bool {
        let e = match self {
            SendError::Connect(_) => return false,
            // A body that fails resets the stream from our side ([`http2::client`]).
            SendError::H2(_, h2) => return is_own_reset(h2),
            SendError::Http(_, e) => e,
        };
        if e.is_user() || e.is_body_write_aborted() {
            return true;
        }
        // Over HTTP/2 hyper resets the stream itself (a "user" reset, neither the peer's nor
        // h2's own) when the request body it was streaming failed.
        let mut source = std::error::Error::source(e);
        while let Some(err) = source {
            if let Some(h2) = err.downcast_ref::<h2::Error>() {
                return is_own_reset(h2);
            }
            source = err.source();
        }
        false
    }
}

/// A stream reset by this side itself (neither the peer nor h2's protocol checks).
fn is_own_reset(h2: &h2::Error) -> bool {
    h2.is_reset() && !h2.is_remote() && !h2.is_library()
}

/// A TCP or TLS stream to an upstream.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Dials `addr` within `timeout`, with mTLS when the transport says so.
pub async fn dial(
    transport: &Transport,
    addr: SocketAddr,
    alpn: Alpn,
    timeout: Duration,
) -> Result<Io, ConnectError> {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Tcp(addr, e))?;
        let _ = tcp.set_nodelay(true);
        match transport {
            Transport::Plain => Ok(Io::Plain(tcp)),
            Transport::Mesh { tls, identity } => {
                let connector = tls
                    .connector(identity, alpn)
                    .map_err(|e| ConnectError::Tls(addr, io::Error::other(e.to_string())))?;
                // The server name is not checked (the verifier checks the SPIFFE ID), but
                // rustls needs one: the IP keeps SNI out of the handshake.
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let stream = connector.connect(name, tcp).await.map_err(|e| {
                    tls.outbound_handshake_failed();
                    ConnectError::Tls(addr, e)
                })?;
                Ok(Io::Tls(Box::new(stream)))
            }
        }
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout(addr)),
    }
}

/// The read buffer of an HTTP/1.1 connection to the app or an upstream, at most: the largest
/// response head accepted from it, and the most body read in one go. hyper's default (~400 KiB)
/// lets each pooled connection's buffer grow to 32–64 KiB when bodies are 16 KiB, which made
/// the callee's memory under load 13.4 MiB; 20 KiB holds a full 16 KiB HTTP/2 frame or TLS
/// record plus a 4 KiB head, and took it to 11.4 MiB at the same throughput
/// (`AB_PATH=/16k.bin bench/ab.sh`, docs/performance.md). A response head above it is refused
/// like any response hyper cannot parse (503 `unavailable`); it could not have crossed the mesh
/// anyway, since the HTTP/2 leg between sidecars takes 16 KiB of response headers (hyper's
/// default, like HAProxy's ~15 KiB; nginx takes 4–8 KiB).
pub(super) const UPSTREAM_READ_BUFFER: usize = 20 * 1024;

/// Most HTTP/1.1 connections kept per endpoint: as many as the requests one inbound HTTP/2
/// connection may have in flight ([`super::http2::server::MAX_CONCURRENT_STREAMS`]), so that every
/// request of a full burst can hand its app connection back. With 512, a caller holding 1,024
/// requests open made the callee dial and close the app connection of every request past the
/// 512th: 10,500 connections in 5 s under `wrk -c1024`; with 1,024, none (docs/performance.md).
const MAX_H1_CONNECTIONS: usize = super::http2::server::MAX_CONCURRENT_STREAMS as usize;

/// HTTP/1.1 connections to another sidecar, at most, per endpoint; HTTP/1.x requests beyond
/// them ride the one multiplexed HTTP/2 connection (marked with their version). The default,
/// 0, sends every request over HTTP/2. Measured both ways (docs/performance.md): HTTP/1.1
/// between sidecars takes about a third fewer user-space instructions per request on both
/// sidecars (no HPACK, no stream state, no task per stream: `bench/callgrind.sh`), but each
/// request then costs its own read and write system calls on that leg, where HTTP/2 batches
/// many streams per call; on the VMs measured, system calls cost more than the instructions
/// saved: HTTP/2 moved 10–15 % more requests per CPU second on one VM and 39 % more on another
/// (there HTTP/1.1 gave 0.76× the requests/s at 1.39× the CPU per request). The cap also bounds
/// the mTLS handshakes a burst of concurrent requests can cause.
const MESH_H1_CONNECTIONS: usize = 0;

/// `MESH_H1_CONNECTIONS`, or `OUTRIDER_MESH_H1_CONNECTIONS` when set, read once: a tuning
/// knob for machines where system calls are cheap (bare metal); compare both settings with
/// `ENV_B=OUTRIDER_MESH_H1_CONNECTIONS=64 bench/ab.sh BIN BIN`.
fn mesh_h1_connections() -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("OUTRIDER_MESH_H1_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MESH_H1_CONNECTIONS)
    })
}

/// The connections to one endpoint.
pub struct EndpointPool {
    pub addr: SocketAddr,
    transport: Transport,
    /// Idle HTTP/1.1 connections; one in use is carried by its request ([`http1`]).
    h1: http1::Idle,
    /// HTTP/1.1 connections open or being dialed, wherever they are (they count against
    /// `MESH_H1_CONNECTIONS`).
    h1_open: Arc<AtomicUsize>,
    /// Starts the sweep of closed idle connections with the first HTTP/1.1 connection
    /// ([`http1::spawn_sweeper`]): pools that only ever use HTTP/2 need none.
    h1_sweeper: std::sync::Once,
    /// The multiplexed connection, when one is open (a plain mutex: held only to clone).
    h2: Mutex<Option<http2::client::Connection>>,
    /// Serializes dialing the HTTP/2 connection, so concurrent first requests share one.
    h2_dialing: tokio::sync::Mutex<()>,
}

impl EndpointPool {
    pub fn new(addr: SocketAddr, transport: Transport) -> Self {
        Self {
            addr,
            transport,
            h1: http1::Idle::default(),
            h1_open: Arc::default(),
            h1_sweeper: std::sync::Once::new(),
            h2: Mutex::new(None),
            h2_dialing: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends a request over HTTP/1.1 (pooled) or HTTP/2 (multiplexed), as `req.version()` says.
    /// To another sidecar, an HTTP/1.x request that finds no idle pooled connection once
    /// [`mesh_h1_connections`] are open rides HTTP/2 instead (marked with its version, see
    /// [`h1_to_h2`]); with the default cap of 0, every one does.
    ///
    /// A plain fn choosing between two futures rather than an `async fn` awaiting one of them:
    /// the request's future is then the larger of the two, not one nested in the other plus a
    /// copy of the request (`-Zprint-type-sizes`, docs/performance.md).
    pub fn send(
        &self,
        req: Request<Body>,
        connect_timeout: Duration,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + '_ {
        let all_h2 = matches!(self.transport, Transport::Mesh { .. }) && mesh_h1_connections() == 0;
        if req.version() == http::Version::HTTP_2 {
            Either::Left(self.send_h2(req, connect_timeout))
        } else if all_h2 {
            Either::Left(self.send_h2(h1_to_h2(req), connect_timeout))
        } else {
            Either::Right(self.send_h1(req, connect_timeout))
        }
    }

    #[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
    fn send_h1(
        &self,
        mut req: Request<Body>,
        connect_timeout: Duration,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + '_ {
        async move {
            origin_form(&mut req);
            // An idle connection may have been closed by the peer: then hyper hands the request
            // back unsent and it goes out on another one, or a fresh one.
            for _ in 0..2 {
                let taken = self.h1.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some(connection) = taken else {
                    break;
                };
                match connection.exchange(req, &self.h1, MAX_H1_CONNECTIONS).await {
                    Ok(response) => return Ok(response),
                    Err(http1::Failed::Unsent(unsent)) => req = *unsent,
                    Err(http1::Failed::Exchange(e)) => return Err(SendError::Http(self.addr, e)),
                }
            }
            let cap = match self.transport {
                Transport::Mesh { .. } => mesh_h1_connections(),
                Transport::Plain => usize::MAX,
            };
            if self.h1_open.load(Ordering::Relaxed) >= cap {
                // Boxed: rare, and nesting the HTTP/2 future would enlarge every request's.
                return Box::pin(self.send_h2(h1_to_h2(req), connect_timeout)).await;
            }
            // Boxed: dialing is rare, and its large future would otherwise be part of every
            // request's future.
            Box::pin(self.send_h1_new(req, connect_timeout)).await
        }
    }

    async fn send_h1_new(
        &self,
        req: Request<Body>,
        connect_timeout: Duration,
    ) -> Result<Response<Body>, SendError> {
        self.h1_sweeper.call_once(|| http1::spawn_sweeper(&self.h1));
        let open = http1::Counted::start(&self.h1_open);
        let io = dial(&self.transport, self.addr, Alpn::Http1, connect_timeout).await?;
        let connection = http1::Connection::handshake(io, open)
            .await
            .map_err(|e| ConnectError::Http(self.addr, e))?;
        match connection.exchange(req, &self.h1, MAX_H1_CONNECTIONS).await {
            Ok(response) => Ok(response),
            Err(http1::Failed::Exchange(e)) => Err(SendError::Http(self.addr, e)),
            // A fresh connection takes its first request unless it has already failed.
            Err(http1::Failed::Unsent(_)) => Err(ConnectError::Closed(self.addr).into()),
        }
    }

    /// A new HTTP/1.1 connection for an upgrade, its driver on a task of its own (it outlives
    /// the request, as the upgraded stream).
    async fn connect_upgradable(
        &self,
        connect_timeout: Duration,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, ConnectError> {
        let io = dial(&self.transport, self.addr, Alpn::Http1, connect_timeout).await?;
        http1::upgradable(io)
            .await
            .map_err(|e| ConnectError::Http(self.addr, e))
    }

    /// An upgrade request (WebSocket) gets a connection of its own, never returned to the pool.
    pub async fn send_upgrade(
        &self,
        mut req: Request<Body>,
        connect_timeout: Duration,
    ) -> Result<Response<Body>, SendError> {
        origin_form(&mut req);
        Box::pin(self.connect_upgradable(connect_timeout))
            .await?
            .send_request(req)
            .await
            .map(|resp| resp.map(boxed))
            .map_err(|e| SendError::Http(self.addr, e))
    }

    /// The open HTTP/2 connection, if any.
    fn h2_open(&self) -> Option<http2::client::Connection> {
        let slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    /// The open HTTP/2 connection, or a new one.
    async fn h2_connection(
        &self,
        connect_timeout: Duration,
    ) -> Result<http2::client::Connection, ConnectError> {
        if let Some(connection) = self.h2_open() {
            return Ok(connection);
        }
        Box::pin(self.h2_connect(connect_timeout)).await
    }

    /// Dials the HTTP/2 connection, unless a concurrent request just did.
    async fn h2_connect(
        &self,
        connect_timeout: Duration,
    ) -> Result<http2::client::Connection, ConnectError> {
        let _dialing = self.h2_dialing.lock().await;
        if let Some(connection) = self.h2_open() {
            return Ok(connection);
        }
        let io = dial(&self.transport, self.addr, Alpn::Http2, connect_timeout).await?;
        let connection = http2::client::Connection::handshake(io)
            .await
            .map_err(|e| ConnectError::H2(self.addr, e))?;
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
        Ok(connection)
    }

    #[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
    fn send_h2(
        &self,
        req: Request<Body>,
        connect_timeout: Duration,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + '_ {
        async move {
            let ready = match self.h2_connection(connect_timeout).await?.ready().await {
                Ok(ready) => ready,
                // The connection went away before the request was sent: once more, fresh.
                Err(_) => self
                    .h2_connection(connect_timeout)
                    .await?
                    .ready()
                    .await
                    .map_err(|e| SendError::H2(self.addr, e))?,
            };
            ready
                .send(req)
                .await
                .map_err(|e| SendError::H2(self.addr, e))
        }
    }
}
