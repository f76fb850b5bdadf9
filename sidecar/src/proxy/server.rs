//! Listeners: accept loops, the HTTP server settings both listeners share (head limits, slow
//! clients, HTTP/2 stream limits), the inbound TLS handshake, and graceful draining.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::inbound::{self, Peer};
use super::{Shared, outbound};
use crate::config::Limits;

/// The HTTP/1.1 + h2c server settings for a listener.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers 431 itself past its buffer; heads between `max_header_bytes` and that get
    // the sidecar's JSON 431 from the request path.
    let buffer = (limits.max_header_bytes as usize)
        .saturating_add(16 * 1024)
        .max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(buffer)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024)
        // Rapid-reset floods: cap resets a client may cause before the connection is closed.
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .adaptive_window(true);
    builder
}

/// Resolves when the shutdown signal is raised.
pub async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
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
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = signalled(shutdown.clone()) => break,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared_conn = shared.clone();
        let builder = http_builder(&shared.config.load().limits);
        let service = service_fn(move |req| {
            let shared = shared_conn.clone();
            // Boxed: the request's whole stack is one large future, which hyper would otherwise
            // move by value (memcpy) into and out of its connection state on every request.
            Box::pin(async move {
                Ok::<_, Infallible>(outbound::handle(shared, local, None, req).await)
            })
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drain(graceful, grace).await;
}

/// Serves HTTP inside an outbound `CONNECT` tunnel.
pub async fn serve_tunnel<I>(shared: Arc<Shared>, listener: SocketAddr, target: Arc<str>, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let builder = http_builder(&shared.config.load().limits);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let target = target.clone();
        async move { Ok::<_, Infallible>(outbound::handle(shared, listener, Some(target), req).await) }
    });
    let _ = builder.serve_connection_with_upgrades(io, service).await;
}

/// Serves the inbound listener: TLS handshake (when mTLS is on), then HTTP to the app.
pub async fn serve_inbound(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = Arc::new(GracefulShutdown::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = signalled(shutdown.clone()) => break,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let graceful = graceful.clone();
        tokio::spawn(async move {
            match shared.tls.clone() {
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(tls.handshake_timeout(), tls.acceptor().accept(tcp))
                            .await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            handshake_failed(&shared, remote, &error.to_string());
                            return;
                        }
                        Err(_) => {
                            handshake_failed(&shared, remote, "handshake timed out");
                            return;
                        }
                    };
                    let peer =
                        Peer::new(crate::tls::peer_id(stream.get_ref().1.peer_certificates()));
                    serve_peer(shared, Arc::new(peer), stream, graceful).await;
                }
                None => serve_peer(shared, Arc::new(Peer::new(None)), tcp, graceful).await,
            }
        });
    }
    // Handshakes in progress hold a clone for at most the handshake timeout.
    drain_shared(graceful, grace).await;
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
    graceful: Arc<GracefulShutdown>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = http_builder(&shared.config.load().limits);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let peer = peer.clone();
        // Boxed: over HTTP/2 hyper spawns a task per stream holding this future; a large
        // future is copied several times on the way (measured with bench/callgrind.sh).
        Box::pin(async move { Ok::<_, Infallible>(inbound::handle(shared, peer, req).await) })
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    let conn = graceful.watch(conn);
    // Only the accept loop keeps the drain handle; see `drain_shared`.
    drop(graceful);
    let _ = conn.await;
}

async fn drain(graceful: GracefulShutdown, grace: Duration) {
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the shutdown grace period"
        );
    }
}

async fn drain_shared(graceful: Arc<GracefulShutdown>, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    let mut graceful = graceful;
    loop {
        match Arc::try_unwrap(graceful) {
            Ok(owned) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                drain(owned, left).await;
                return;
            }
            Err(shared) => {
                // A handshake is still under way; its connection will register in a moment.
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
                graceful = shared;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
