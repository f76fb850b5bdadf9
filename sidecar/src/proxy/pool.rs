//! Connections to one endpoint: dialing (TCP, then mTLS with the expected identity or plain),
//! a pool of HTTP/1.1 connections reused with keep-alive (to the app: at most [`AppLimit`], with
//! a queue for the requests past it), one multiplexed HTTP/2 connection, and dedicated
//! connections for upgrades (WebSocket).
//!
//! HTTP/1.1 is written on hyper's `client::conn` rather than hyper-util's legacy `Client`: the
//! legacy client keys its pool and HTTP/2 `:authority` on the request URI, while the mesh must
//! dial an endpoint address and still send the service's authority, and must choose the TLS
//! identity per service. HTTP/2 is on the `h2` crate directly ([`http2::client`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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

/// How many HTTP/1.1 connections a plain endpoint (the app, or an upstream outside the mesh)
/// gets, and how requests past them wait ([`http1::Pool`]).
#[derive(Clone, Copy)]
struct AppLimit {
    /// Connections past which a request first waits for one to come back. Without a limit, a
    /// callee holding 1,024 requests open dialed 1,024 connections to its app, each with
    /// buffers in both processes: with 64, `bench/ab.sh` at 1,024 client connections measured
    /// the callee's peak RSS at 11.9 MiB instead of 40.3 and the pair's CPU per request at
    /// 0.82–0.83× (docs/performance.md).
    connections: usize,
    /// How long a queued request waits while no connection comes back before it dials one of
    /// its own past the limit, which the pool keeps until its sweep finds it idle
    /// ([`http1::sweep`]).
    /// While connections come back, the app is keeping up and the queue is the sidecar's own
    /// backlog (a saturated core), which more connections would not shorten. When none comes
    /// back, all are held by slow exchanges (long polls, slow queries), and the app is not
    /// held to the limit. A plain 20 ms wait, not asking whether connections came back, let
    /// the callee grow to 21 MiB under the load above.
    stalled: Duration,
    /// How long a queued request waits at most, connections coming back or not: a bound for
    /// the case between the two, where a few connections cycle quickly and the rest are held
    /// by long polls.
    at_most: Duration,
}

impl AppLimit {
    const DEFAULT: Self = Self {
        connections: 64,
        stalled: Duration::from_millis(20),
        at_most: Duration::from_millis(200),
    };

    /// The default, or `OUTRIDER_APP_CONNECTIONS`, `OUTRIDER_APP_STALLED_MS` and
    /// `OUTRIDER_APP_QUEUE_MS` when set, read once: tuning knobs for measuring
    /// (`ENV_B=OUTRIDER_APP_CONNECTIONS=128 bench/ab.sh BIN BIN 4 4 1024`).
    fn get() -> Self {
        static LIMIT: std::sync::OnceLock<AppLimit> = std::sync::OnceLock::new();
        *LIMIT.get_or_init(|| {
            let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
            let ms =
                |name: &str, default: Duration| number(name).map_or(default, Duration::from_millis);
            Self {
                connections: number("OUTRIDER_APP_CONNECTIONS")
                    .filter(|&limit| limit > 0)
                    .map_or(Self::DEFAULT.connections, |limit| limit as usize),
                stalled: ms("OUTRIDER_APP_STALLED_MS", Self::DEFAULT.stalled),
                at_most: ms("OUTRIDER_APP_QUEUE_MS", Self::DEFAULT.at_most),
            }
        })
    }
}

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
    /// HTTP/1.1 connections: the idle ones, and the requests queued for one ([`http1::Pool`]);
    /// one in use is carried by its request.
    h1: http1::Idle,
    /// Starts the sweep of closed idle connections with the first HTTP/1.1 connection
    /// ([`http1::spawn_sweeper`]): pools that only ever use HTTP/2 need none.
    h1_sweeper: std::sync::Once,
    /// HTTP/1.1 connections to a plain endpoint (the app), and how requests past them wait.
    app_limit: AppLimit,
    /// The multiplexed connection, when one is open (a plain mutex: held only to clone).
    h2: Mutex<Option<http2::client::Connection>>,
    /// Serializes dialing the HTTP/2 connection, so concurrent first requests share one.
    h2_dialing: tokio::sync::Mutex<()>,
}

impl EndpointPool {
    pub fn new(addr: SocketAddr, transport: Transport) -> Self {
        let app_limit = AppLimit::get();
        let h1_limit = match transport {
            Transport::Mesh { .. } => mesh_h1_connections(),
            Transport::Plain => app_limit.connections,
        };
        Self {
            addr,
            transport,
            h1: http1::Pool::new(h1_limit),
            h1_sweeper: std::sync::Once::new(),
            app_limit,
            h2: Mutex::new(None),
            h2_dialing: tokio::sync::Mutex::new(()),
        }
    }

    /// The same pool with another limit of HTTP/1.1 connections to a plain endpoint, and
    /// other waits in its queue.
    #[cfg(test)]
    fn with_app_limit(mut self, connections: usize, stalled: Duration, at_most: Duration) -> Self {
        self.app_limit = AppLimit {
            connections,
            stalled,
            at_most,
        };
        self.h1 = http1::Pool::new(connections);
        self
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
            // To another sidecar, past `mesh_h1_connections` the request rides HTTP/2; to the
            // app, past `AppLimit::connections` it waits for a connection to come back.
            let queue = matches!(self.transport, Transport::Plain);
            // An idle connection may have been closed by the peer: then hyper hands the request
            // back unsent and it goes out on another one, or a fresh one. Each turn uses up an
            // idle connection or ends, so the loop ends.
            loop {
                let connection = match self.h1.take(queue) {
                    http1::Taken::Idle(connection) => connection,
                    // Boxed: dialing is rare, and its large future would otherwise be part of
                    // every request's future.
                    http1::Taken::Dial(place) => {
                        return Box::pin(self.send_h1_new(req, place, connect_timeout)).await;
                    }
                    // Boxed: rare, and nesting the HTTP/2 future would enlarge every request's.
                    http1::Taken::Full => {
                        return Box::pin(self.send_h2(h1_to_h2(req), connect_timeout)).await;
                    }
                    http1::Taken::Queued(handoff, released) => {
                        match Box::pin(self.queued(handoff, released)).await {
                            Some(http1::Handoff::Idle(connection)) => connection,
                            Some(http1::Handoff::Dial(place)) => {
                                return Box::pin(self.send_h1_new(req, place, connect_timeout))
                                    .await;
                            }
                            // The pool is gone (its endpoint left the service) with the request
                            // in its queue: it never reached the app.
                            None => return Err(ConnectError::Closed(self.addr).into()),
                        }
                    }
                };
                match connection.exchange(req, &self.h1).await {
                    Ok(response) => return Ok(response),
                    Err(http1::Failed::Unsent(unsent)) => req = *unsent,
                    Err(http1::Failed::Exchange(e)) => return Err(SendError::Http(self.addr, e)),
                }
            }
        }
    }

    /// Waits for a connection to come back (or for the place of one that closed), for as long
    /// as others come back at least once every `app_limit.stalled`, and `app_limit.at_most` in
    /// all; past that, a place to dial one past the limit ([`AppLimit`]). `None` if the pool went away.
    /// `released` is the pool's count of ended exchanges when the request was queued.
    async fn queued(
        &self,
        mut handoff: tokio::sync::oneshot::Receiver<http1::Handoff>,
        mut released: usize,
    ) -> Option<http1::Handoff> {
        let wait = self.app_limit;
        let give_up = tokio::time::Instant::now() + wait.at_most;
        loop {
            let until = give_up.min(tokio::time::Instant::now() + wait.stalled);
            if let Ok(handed) = tokio::time::timeout_at(until, &mut handoff).await {
                return handed.ok();
            }
            let now = self.h1.released();
            if now == released || until >= give_up {
                break;
            }
            released = now;
        }
        // Closed first, so that nothing is handed to it from now on; what already was is taken.
        handoff.close();
        Some(
            handoff
                .try_recv()
                .unwrap_or_else(|_| http1::Handoff::Dial(self.h1.place_past_limit())),
        )
    }

    async fn send_h1_new(
        &self,
        req: Request<Body>,
        open: http1::Counted,
        connect_timeout: Duration,
    ) -> Result<Response<Body>, SendError> {
        self.h1_sweeper.call_once(|| http1::spawn_sweeper(&self.h1));
        let io = dial(&self.transport, self.addr, Alpn::Http1, connect_timeout).await?;
        let connection = http1::Connection::handshake(io, open)
            .await
            .map_err(|e| ConnectError::Http(self.addr, e))?;
        match connection.exchange(req, &self.h1).await {
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    /// Connections an app has accepted, and how many are open now.
    #[derive(Default)]
    struct Accepted {
        total: AtomicUsize,
        open: AtomicUsize,
    }

    /// A hyper HTTP/1.1 app on loopback that answers every request after `delay`.
    async fn app(delay: Duration) -> (SocketAddr, Arc<Accepted>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(Accepted::default());
        let counts = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counts.total.fetch_add(1, Ordering::SeqCst);
                counts.open.fetch_add(1, Ordering::SeqCst);
                let counts = counts.clone();
                let service = hyper::service::service_fn(move |_: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, accepted)
    }

    /// A pool to the app at `addr` with the given limit and waits.
    fn limited(
        addr: SocketAddr,
        connections: usize,
        stalled: Duration,
        at_most: Duration,
    ) -> Arc<EndpointPool> {
        Arc::new(EndpointPool::new(addr, Transport::Plain).with_app_limit(
            connections,
            stalled,
            at_most,
        ))
    }

    /// Sends `n` GET requests at once through `pool`; each must be answered `ok` in full.
    async fn burst(pool: &Arc<EndpointPool>, n: usize) {
        let sends = (0..n).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let req = Request::get("http://app/")
                    .body(boxed(Empty::<Bytes>::new()))
                    .expect("request");
                let response = pool
                    .send(req, Duration::from_secs(1))
                    .await
                    .expect("answered");
                assert_eq!(response.status(), http::StatusCode::OK);
                let body = response.into_body().collect().await.expect("body");
                assert_eq!(body.to_bytes(), "ok");
            })
        });
        for send in sends.collect::<Vec<_>>() {
            send.await.expect("send task");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_past_the_limit_wait_for_a_connection_to_come_back() {
        let (addr, accepted) = app(Duration::from_millis(10)).await;
        let pool = limited(addr, 2, Duration::from_secs(1), Duration::from_secs(1));
        burst(&pool, 40).await;
        assert_eq!(
            accepted.total.load(Ordering::SeqCst),
            2,
            "two connections served all"
        );
        burst(&pool, 40).await;
        assert_eq!(accepted.total.load(Ordering::SeqCst), 2, "and were kept");
    }

    /// Six requests to an app that takes 400 ms over a limit of two connections, queued for
    /// `stalled` while none comes back and `at_most` in all.
    async fn slow_app_burst(stalled: Duration, at_most: Duration) {
        let (addr, accepted) = app(Duration::from_millis(400)).await;
        let pool = limited(addr, 2, stalled, at_most);
        let started = Instant::now();
        burst(&pool, 6).await;
        // Held to two at a time, six would take three turns (1.2 s); past the wait, each
        // queued request dials its own.
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(accepted.total.load(Ordering::SeqCst), 6);
        // The four past the limit stay pooled until the sweep finds them idle.
        assert_eq!(accepted.open.load(Ordering::SeqCst), 6);
        http1::sweep(&pool.h1);
        let closing = Instant::now();
        while accepted.open.load(Ordering::SeqCst) > 2 && closing.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            accepted.open.load(Ordering::SeqCst),
            2,
            "the sweep closed the four"
        );
        burst(&pool, 2).await;
        assert_eq!(accepted.total.load(Ordering::SeqCst), 6, "and kept two");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_app_gets_connections_past_the_limit_until_the_sweep() {
        slow_app_burst(Duration::from_millis(50), Duration::from_secs(10)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_request_waits_longer_than_the_queue_bound() {
        slow_app_burst(Duration::from_secs(10), Duration::from_millis(50)).await;
    }

    /// A request that waits in the queue past its deadline is dropped there; the connection
    /// that comes back afterwards goes to the next request instead of being lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_is_not_lost_to_a_request_that_gave_up_waiting() {
        let (addr, accepted) = app(Duration::from_millis(200)).await;
        let pool = limited(addr, 1, Duration::from_secs(10), Duration::from_secs(10));
        let first = {
            let pool = pool.clone();
            tokio::spawn(async move { burst(&pool, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let req = Request::get("http://app/")
            .body(boxed(Empty::<Bytes>::new()))
            .expect("request");
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            pool.send(req, Duration::from_secs(1)),
        )
        .await;
        assert!(gave_up.is_err(), "queued behind the first request");
        first.await.expect("first");
        burst(&pool, 3).await;
        assert_eq!(accepted.total.load(Ordering::SeqCst), 1);
    }
}
