//! Listeners: accept loops, the HTTP server settings both listeners share (head limits, slow
//! clients), HTTP/1.1 vs HTTP/2 detection, the inbound TLS handshake, and graceful draining.
//! HTTP/2 is served by [`super::http2::server`]; outbound HTTP/1.1 connections are parked
//! between requests ([`super::park`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::http::{Body, boxed};
use super::inbound::{self, Peer};
use super::{Shared, http2, outbound, park};
use crate::config::Limits;

/// The HTTP/1.1 and HTTP/2 server settings of a listener, from `limits`.
struct Settings {
    http1: http1::Builder,
    /// The largest HTTP/2 request head (`limits.max_header_bytes`).
    max_header_list: u32,
    /// How long a connection may sit without a request (`limits.header_read_timeout`).
    idle_timeout: Duration,
}

impl Settings {
    fn new(limits: &Limits) -> Self {
        let mut http1 = http1::Builder::new();
        // hyper answers 431 itself past its buffer; heads between `max_header_bytes` and that
        // get the sidecar's JSON 431 from the request path.
        let buffer = (limits.max_header_bytes as usize)
            .saturating_add(16 * 1024)
            .max(8192);
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(buffer)
            .keep_alive(true);
        Self {
            http1,
            max_header_list: u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
            idle_timeout: limits.header_read_timeout,
        }
    }
}

/// The HTTP/2 connection preface; a connection that starts with it speaks h2c.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes, as far as needed to tell HTTP/2 (prior knowledge) from
/// HTTP/1.1, waiting at most `within`. Returns whether it is HTTP/2, and the bytes read; `None`
/// if the client sent nothing in time or the read failed.
async fn sniff<S: AsyncRead + Unpin>(io: &mut S, within: Duration) -> Option<(bool, Bytes)> {
    tokio::time::timeout(within, read_preface(io))
        .await
        .ok()?
        .ok()
}

async fn read_preface<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    loop {
        let read = io.read(&mut buf[filled..]).await?;
        filled += read;
        let seen = &buf[..filled];
        if read == 0 || seen != &H2_PREFACE[..filled] {
            return Ok((false, Bytes::copy_from_slice(seen)));
        }
        if filled == H2_PREFACE.len() {
            return Ok((true, Bytes::copy_from_slice(seen)));
        }
    }
}

/// An IO whose first bytes were already read: they are read again before the rest.
pub(super) struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(prefix: Bytes, io: S) -> Self {
        Self { prefix, io }
    }

    /// The IO back, with `unread` (bytes taken from this IO but not consumed) put in front of
    /// what is left of the prefix.
    pub(super) fn into_parts(self, unread: Bytes) -> (S, Bytes) {
        let prefix = match (unread.is_empty(), self.prefix.is_empty()) {
            // An empty `unread` may still hold a whole read buffer: drop it.
            (true, _) => self.prefix,
            (false, true) => unread,
            (false, false) => {
                let mut both = BytesMut::with_capacity(unread.len() + self.prefix.len());
                both.extend_from_slice(&unread);
                both.extend_from_slice(&self.prefix);
                both.freeze()
            }
        };
        (self.io, prefix)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Release the buffer the prefix was cut from.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A hyper (HTTP/1.1) connection that can be asked to finish what it has in flight and close.
trait Drainable: Future<Output = hyper::Result<()>> {
    fn start_drain(self: Pin<&mut Self>);
}

impl<I, S, B> Drainable for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The hyper (HTTP/1.1) service for `handle`, the body boxed as the handlers take it. The future
/// is boxed too: the request's whole stack is one large future, which hyper would otherwise move
/// by value (memcpy) into and out of its connection state on every request (measured with
/// bench/callgrind.sh).
fn boxed_service<H, F>(
    handle: H,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
> + Send
+ Sync
+ 'static
where
    H: Fn(Request<Body>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    service_fn(move |req: Request<Incoming>| {
        let response = handle(req.map(boxed));
        Box::pin(async move { Ok::<_, Infallible>(response.await) })
    })
}

/// Serves HTTP/2 on `io` until it closes or `stop` drains it ([`http2::server`]).
async fn serve_h2<I, H, F>(
    io: Prefixed<I>,
    max_header_list: u32,
    handle: H,
    stop: impl Future<Output = ()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Body>) -> F + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // Boxed: a task serving HTTP/1.1 (parked most of the time, on the outbound listener) need
    // not keep room for h2's state.
    Box::pin(http2::server::serve(io, max_header_list, handle, stop)).await;
}

/// Runs a connection to its end; once `stop` resolves, it finishes what is in flight and closes.
async fn until_drained(conn: impl Drainable, stop: impl Future<Output = ()>) {
    let mut conn = pin!(conn);
    let mut stop = pin!(stop);
    let mut draining = false;
    std::future::poll_fn(|cx| {
        if !draining && stop.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.as_mut().start_drain();
        }
        conn.as_mut().poll(cx).map(|_| ())
    })
    .await;
}

/// Serves HTTP/1.1 (with upgrades) or h2c, whichever the client speaks, with `handle` answering
/// each request; once `stop` resolves, in-flight requests finish and the connection closes.
pub async fn serve_http<I, H, F>(
    mut io: I,
    limits: &Limits,
    handle: H,
    stop: impl Future<Output = ()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Body>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let settings = Settings::new(limits);
    let Some((is_h2, prefix)) = sniff(&mut io, settings.idle_timeout).await else {
        return;
    };
    let io = Prefixed::new(prefix, io);
    if is_h2 {
        serve_h2(io, settings.max_header_list, handle, stop).await;
    } else {
        let conn = settings
            .http1
            .serve_connection(TokioIo::new(io), boxed_service(handle))
            .with_upgrades();
        until_drained(conn, stop).await;
    }
}

/// Counts a listener's open connections, so that draining can wait for them: the channel
/// closes when the last clone is dropped.
#[derive(Clone)]
struct Open {
    _sender: mpsc::Sender<()>,
}

/// Waits until every [`Open`] handle is dropped, or `grace` passes.
async fn drain(open: Open, mut closed: mpsc::Receiver<()>, grace: Duration) {
    drop(open);
    if tokio::time::timeout(grace, closed.recv()).await.is_err() {
        tracing::warn!(
            ?grace,
            "connections still open after the shutdown grace period"
        );
    }
}

/// Resolves when the shutdown signal is raised.
pub async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A connection's [`signalled`]: its task polls it on every wake-up, and polling the watch
/// costs 500–900 instructions a request (bench/callgrind.sh). Once its wake-up is registered
/// (it holds until the signal, since the same task polls it every time), a look at the
/// signal's version, one atomic load, says whether to poll the watch again.
struct Stop {
    probe: watch::Receiver<bool>,
    raised: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl Stop {
    fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            probe: shutdown.clone(),
            raised: Box::pin(signalled(shutdown)),
            registered: false,
        }
    }
}

impl Future for Stop {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // A closed channel counts as a change: the watch then resolves.
        if self.registered && !self.probe.has_changed().unwrap_or(true) {
            return Poll::Pending;
        }
        self.registered = true;
        self.raised.as_mut().poll(cx)
    }
}

/// Accepts connections until shutdown, serving each on a task of its own, then drains within
/// `grace`. `side` names the listener in logs.
async fn accept_until_shutdown<F, Fut>(
    listener: TcpListener,
    side: &'static str,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Stop) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (sender, closed) = mpsc::channel(1);
    let open = Open { _sender: sender };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = signalled(shutdown.clone()) => break,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, side, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = serve(tcp, remote, Stop::new(shutdown.clone()));
        let open = open.clone();
        tokio::spawn(async move {
            connection.await;
            drop(open);
        });
    }
    drain(open, closed, grace).await;
}

/// Serves the outbound listener until shutdown, then drains within `grace`.
pub async fn serve_outbound(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    accept_until_shutdown(listener, "outbound", shutdown, grace, |tcp, _, stop| {
        serve_outbound_conn(tcp, shared.clone(), local, stop)
    })
    .await;
}

async fn serve_outbound_conn(
    mut tcp: TcpStream,
    shared: Arc<Shared>,
    local: SocketAddr,
    stop: impl Future<Output = ()>,
) {
    let settings = Settings::new(&shared.config.load().limits);
    let Some((is_h2, prefix)) = sniff(&mut tcp, settings.idle_timeout).await else {
        return;
    };
    let handle = move |req| outbound::handle(shared.clone(), local, None, req);
    if is_h2 {
        serve_h2(
            Prefixed::new(prefix, tcp),
            settings.max_header_list,
            handle,
            stop,
        )
        .await;
    } else {
        let Settings {
            http1,
            idle_timeout,
            ..
        } = settings;
        park::serve(tcp, prefix, http1, idle_timeout, handle, stop).await;
    }
}

/// Serves HTTP inside an outbound `CONNECT` tunnel.
pub async fn serve_tunnel<I>(shared: Arc<Shared>, listener: SocketAddr, target: Arc<str>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.config.load().limits;
    let handle = move |req| outbound::handle(shared.clone(), listener, Some(target.clone()), req);
    serve_http(io, &limits, handle, std::future::pending()).await;
}

/// Serves the inbound listener: TLS handshake (when mTLS is on), then HTTP to the app.
pub async fn serve_inbound(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    accept_until_shutdown(listener, "inbound", shutdown, grace, |tcp, remote, stop| {
        serve_inbound_conn(tcp, remote, shared.clone(), stop)
    })
    .await;
}

async fn serve_inbound_conn(
    tcp: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    stop: impl Future<Output = ()>,
) {
    let Some(tls) = shared.tls.clone() else {
        let peer = Arc::new(Peer::new(None, &shared.metrics));
        return serve_peer(shared, peer, tcp, stop).await;
    };
    let handshake = tokio::time::timeout(tls.handshake_timeout(), tls.acceptor().accept(tcp)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return handshake_failed(&shared, remote, &error.to_string()),
        Err(_) => return handshake_failed(&shared, remote, "handshake timed out"),
    };
    let peer = Peer::new(
        crate::tls::peer_id(stream.get_ref().1.peer_certificates()),
        &shared.metrics,
    );
    serve_peer(shared, Arc::new(peer), stream, stop).await;
}

fn handshake_failed(shared: &Shared, remote: SocketAddr, reason: &str) {
    shared
        .metrics
        .tls_handshake_errors_total
        .with_label_values(&["inbound"])
        .inc();
    tracing::debug!(%remote, reason, "inbound TLS handshake failed");
}

async fn serve_peer<S>(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    stream: S,
    stop: impl Future<Output = ()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.config.load().limits;
    let handle = move |req| inbound::handle(shared.clone(), peer.clone(), req);
    serve_http(stream, &limits, handle, stop).await;
}
