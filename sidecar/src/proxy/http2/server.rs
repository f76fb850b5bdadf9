//! The HTTP/2 server: other sidecars' connections on the inbound listener, and apps' h2c ones
//! on the outbound listener.
//!
//! Why not hyper's HTTP/2 server: for every stream it boxes the handler's future, wraps that in
//! a task of its own, and pipes the response body through yet another future. Here each
//! stream's task is one [`Answer`]: the handler's future, then the response body's [`Pipe`],
//! held in place.
//!
//! What hyper did that is kept: the limits (concurrent streams, header list size, and the caps
//! on resets a client may cause, against rapid-reset floods), keep-alive pings, graceful
//! draining (GOAWAY, then in-flight streams finish), a handler whose client reset its stream is
//! dropped (which cancels the call it made), `content-length` for bodies of known size, a
//! `date` on responses that have none, and CONNECT tunnels ([`PendingTunnel`]).

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, DATE, HeaderValue};
use http::{Method, Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::{
    CONNECTION_WINDOW, KeepAlive, MAX_SEND_BUFFER, Pipe, RecvBody, STREAM_WINDOW,
    poll_data_released,
};
use crate::proxy::http::{Body, boxed, empty};

/// Requests one HTTP/2 connection may have in flight.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams a client may reset before the server has accepted them, and streams the server may
/// reset for a client's errors, before the connection is closed (rapid-reset floods).
const MAX_PENDING_ACCEPT_RESETS: usize = 64;
const MAX_LOCAL_ERROR_RESETS: usize = 256;

/// Serves HTTP/2 on `io` (the client preface not yet read) until the client closes it, it
/// fails, or it stops answering pings; each request goes to `handle`.
/// Once `stop` resolves, the client is told to go away (GOAWAY), the requests in flight finish
/// and the connection closes. `max_header_list` bounds a request head (larger ones get 431).
pub async fn serve<I, H, F>(io: I, max_header_list: u32, handle: H, stop: impl Future<Output = ()>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Body>) -> F,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(max_header_list)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let mut connection = match handshake.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "HTTP/2 handshake failed");
            return;
        }
    };
    let mut keep_alive = connection.ping_pong().map(KeepAlive::new);
    let mut stop = pin!(stop);
    let mut draining = false;
    loop {
        let accepted = poll_fn(|cx| {
            if !draining && stop.as_mut().poll(cx).is_ready() {
                draining = true;
                connection.graceful_shutdown();
            }
            if let Some(keep_alive) = keep_alive.as_mut()
                && keep_alive.poll_dead(cx).is_ready()
            {
                tracing::debug!("HTTP/2 client stopped answering pings");
                return Poll::Ready(None);
            }
            connection.poll_accept(cx)
        })
        .await;
        let (request, respond) = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::debug!(%error, "HTTP/2 connection failed");
                return;
            }
            None => return,
        };
        let (parts, recv) = request.into_parts();
        let (request, tunnel) = if parts.method == Method::CONNECT {
            // The stream is the tunnel: the handler gets it through `PendingTunnel`, not as a
            // body.
            let (established, pending) = oneshot::channel();
            let mut request = Request::from_parts(parts, empty());
            request
                .extensions_mut()
                .insert(PendingTunnel(Arc::new(Mutex::new(Some(pending)))));
            (request, Some((established, recv)))
        } else {
            let body = boxed(RecvBody::new(recv, &parts.headers));
            (Request::from_parts(parts, body), None)
        };
        let answer = Answer::new(handle(request), respond, tunnel);
        // Boxed: tokio moves a task's future into place when it spawns it and again when it
        // ends; for a 2 KB future that costs more than the allocation (bench/callgrind.sh).
        tokio::spawn(Box::pin(answer));
    }
}

/// A CONNECT request's stream and where to hand it once the handler has answered 2xx.
type TunnelParts = (oneshot::Sender<Tunnel>, RecvStream);

pin_project_lite::pin_project! {
    /// One stream's task: the handler's future until it has the response, then the response
    /// body's [`Pipe`].
    struct Answer<F> {
        #[pin]
        handling: Option<F>,
        respond: SendResponse<Bytes>,
        tunnel: Option<TunnelParts>,
        body: Option<Pipe>,
    }
}

impl<F> Answer<F> {
    fn new(response: F, respond: SendResponse<Bytes>, tunnel: Option<TunnelParts>) -> Self {
        Self {
            handling: Some(response),
            respond,
            tunnel,
            body: None,
        }
    }
}

impl<F: Future<Output = Response<Body>>> Future for Answer<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Some(handling) = this.handling.as_mut().as_pin_mut() {
            // A client that reset the stream wants no answer: dropping the handler's future
            // cancels the call it was making.
            if this.respond.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            let response = ready!(handling.poll(cx));
            this.handling.set(None);
            *this.body = send(this.respond, response, this.tunnel.take());
        }
        match this.body {
            Some(body) => Pin::new(body).poll(cx),
            None => Poll::Ready(()),
        }
    }
}

/// Sends the response head, with the body too when it is already complete; returns the
/// [`Pipe`] that sends the rest. A head h2 refuses (a connection-specific header) leaves the
/// stream unanswered: dropping `respond` resets it.
fn send(
    respond: &mut SendResponse<Bytes>,
    response: Response<Body>,
    tunnel: Option<TunnelParts>,
) -> Option<Pipe> {
    let (mut parts, body) = response.into_parts();
    if !parts.headers.contains_key(DATE) {
        parts.headers.insert(DATE, http_date());
    }
    if let Some((established, recv)) = tunnel
        && parts.status.is_success()
    {
        // A tunnel's bytes are the stream's DATA frames; it has no length.
        parts.headers.remove(CONTENT_LENGTH);
        let send = respond
            .send_response(Response::from_parts(parts, ()), false)
            .ok()?;
        let _ = established.send(Tunnel {
            recv,
            send,
            unread: Bytes::new(),
        });
        return None;
    }
    let end_of_stream = body.is_end_stream();
    if !end_of_stream
        && let Some(len) = body.size_hint().exact()
        && !parts.headers.contains_key(CONTENT_LENGTH)
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    let stream = respond
        .send_response(Response::from_parts(parts, ()), end_of_stream)
        .ok()?;
    (!end_of_stream).then(|| Pipe::new(body, stream))
}

/// Now as an HTTP date, formatted once a second per thread.
fn http_date() -> HeaderValue {
    thread_local! {
        static CACHED: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| {
        if *at != second
            && let Ok(formatted) = HeaderValue::try_from(httpdate::fmt_http_date(now))
        {
            *at = second;
            *value = formatted;
        }
        value.clone()
    })
}

/// Handed to the handler of a CONNECT request in its extensions, as hyper hands an HTTP/1.1
/// upgrade (`hyper::upgrade::on`): once the handler has answered 2xx, the stream is the tunnel.
/// (Shared and taken once: request extensions must be `Clone`.)
#[derive(Clone)]
pub struct PendingTunnel(Arc<Mutex<Option<oneshot::Receiver<Tunnel>>>>);

impl PendingTunnel {
    /// The tunnel, once the response has gone out; `None` if it did not (a non-2xx answer, a
    /// stream reset before it) or a clone of this handle took it.
    pub async fn established(self) -> Option<Tunnel> {
        let pending = self.0.lock().ok()?.take()?;
        pending.await.ok()
    }
}

/// A CONNECT stream as a byte stream: reads are the client's DATA frames, writes become ours.
pub struct Tunnel {
    recv: RecvStream,
    send: SendStream<Bytes>,
    /// What is left of the last frame read.
    unread: Bytes,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(poll_data_released(&mut self.recv, cx)) {
                Some(Ok(data)) => self.unread = data,
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let available = loop {
            match self.send.capacity() {
                0 => match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error))),
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                },
                available => break available,
            }
        };
        let n = available.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 flushes its queued frames as the connection is driven.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            self.send
                .send_data(Bytes::new(), true)
                .map_err(io::Error::other),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::super::{PING_INTERVAL, PING_TIMEOUT};
    use super::*;
    use crate::proxy::http::full;

    /// Sets its flag when dropped.
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// `serve` on one end of an in-memory pipe, `handle` answering; the other end.
    fn serving<H, F>(
        handle: H,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>)
    where
        H: Fn(Request<Body>) -> F + Send + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(server_io, 16 * 1024, handle, stop));
        (client_io, server)
    }

    fn get(path: &str) -> Request<()> {
        Request::get(format!("http://app{path}"))
            .body(())
            .expect("request")
    }

    #[tokio::test]
    async fn responses_get_a_date_and_their_length() {
        answers().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn responses_get_a_date_and_their_length_on_many_threads() {
        answers().await;
    }

    async fn answers() {
        let handle = |_| async { Response::new(full("hello")) };
        let (io, _server) = serving(handle, std::future::pending());
        let (mut sender, connection) = h2::client::handshake(io).await.expect("handshake");
        tokio::spawn(connection);
        let (response, _) = sender.send_request(get("/"), true).expect("send");
        let response = response.await.expect("response");
        assert_eq!(response.headers()[CONTENT_LENGTH], "5");
        assert!(response.headers().contains_key(DATE));
        let mut body = response.into_body();
        assert_eq!(body.data().await.expect("data").expect("chunk"), "hello");
    }

    // The sidecar runs on one thread or on several (`runtime`): the stream tests run on both.
    #[tokio::test]
    async fn a_client_that_resets_its_stream_cancels_the_handler() {
        resets_cancel_the_handler().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_resets_its_stream_cancels_the_handler_on_many_threads() {
        resets_cancel_the_handler().await;
    }

    async fn resets_cancel_the_handler() {
        let dropped = Arc::new(AtomicBool::new(false));
        let started = Arc::new(Notify::new());
        let (flag, notify) = (dropped.clone(), started.clone());
        let handle = move |_| {
            let guard = DropFlag(flag.clone());
            notify.notify_one();
            async move {
                std::future::pending::<()>().await;
                drop(guard);
                Response::new(empty())
            }
        };
        let (io, _server) = serving(handle, std::future::pending());
        let (mut sender, connection) = h2::client::handshake(io).await.expect("handshake");
        tokio::spawn(connection);
        let (_response, mut stream) = sender.send_request(get("/slow"), true).expect("send");
        started.notified().await;
        assert!(!dropped.load(Ordering::SeqCst));
        stream.send_reset(h2::Reason::CANCEL);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !dropped.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the handler's future is dropped");
    }

    #[tokio::test]
    async fn draining_finishes_what_is_in_flight_then_closes() {
        drains().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn draining_finishes_what_is_in_flight_then_closes_on_many_threads() {
        drains().await;
    }

    async fn drains() {
        let release = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let (gate, stop_signal) = (release.clone(), stop.clone());
        let handle = move |_| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Response::new(full("done"))
            }
        };
        let (io, server) = serving(handle, async move { stop_signal.notified().await });
        let (mut sender, connection) = h2::client::handshake(io).await.expect("handshake");
        tokio::spawn(connection);
        let (response, _) = sender.send_request(get("/"), true).expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!server.is_finished(), "a request is still in flight");
        release.notify_one();
        let response = response.await.expect("the request in flight is answered");
        assert_eq!(response.status(), 200);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection closes once drained")
            .expect("serve");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_answering_pings_is_dropped() {
        let handle = |_| async { Response::new(empty()) };
        let (io, server) = serving(handle, std::future::pending());
        // The client's side of the handshake, then silence: its connection is never polled.
        let (_sender, _connection) = h2::client::handshake(io).await.expect("handshake");
        tokio::time::sleep(PING_INTERVAL - Duration::from_secs(1)).await;
        assert!(!server.is_finished(), "open until the first ping");
        tokio::time::sleep(PING_TIMEOUT + Duration::from_secs(2)).await;
        assert!(server.is_finished(), "closed once the pong is late");
    }
}
