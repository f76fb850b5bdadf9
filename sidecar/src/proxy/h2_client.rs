//! A multiplexed HTTP/2 connection to an endpoint (another sidecar, or an app or upstream that
//! speaks h2c), on the `h2` crate directly.
//!
//! Why not hyper's HTTP/2 client: it spawns a task for every request, which awaits the response
//! and hands it back through two channels, and it moves that task's 1.5 KB future six times on
//! the way (DHAT's copy profile). Here the request's own future sends the head and awaits the
//! response: no task, no channel, no copy (about 6,500 fewer instructions per request in the
//! caller, `bench/callgrind.sh`; docs/performance.md). A request body that is not complete when
//! the head goes out is still streamed by a task of its own, as hyper does, so the response can
//! arrive while the body is still being sent.
//!
//! What hyper did that is kept: keep-alive pings (a silent peer is dropped after
//! [`PING_INTERVAL`] + [`PING_TIMEOUT`]), `content-length` for bodies of known size, flow
//! control on both directions, and a reset stream when the client's request body fails.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, HeaderValue};
use http::{Request, Response};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::http::{Body, BoxError, boxed};

/// A stream's receive window: how much of a response body the peer may send before the app
/// reads it. Fixed, where hyper grew its windows from 64 KiB by measuring the bandwidth-delay
/// product: 256 KiB is more than loopback or a pod network needs for full speed, and bounds
/// what a slow app can make the sidecar hold per stream.
const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's receive window, shared by its streams.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The largest response head accepted (hyper's default, kept).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How much request body may wait in the connection's send buffer per stream (hyper's default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// A ping every so often, while the connection is open...
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is dropped when its pong takes longer than this.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/2 connection to an endpoint; cheap to clone.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    /// Set when the connection's task ends (the peer closed it, an I/O error, a missed pong).
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// HTTP/2 handshake on `io`; the connection runs on a task of its own.
    pub async fn handshake<I>(io: I) -> Result<Self, h2::Error>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let mut keep_alive = connection.ping_pong().map(KeepAlive::new);
        let done = closed.clone();
        tokio::spawn(async move {
            let _ = poll_fn(|cx| {
                if let Some(keep_alive) = keep_alive.as_mut()
                    && keep_alive.poll_dead(cx).is_ready()
                {
                    return Poll::Ready(Ok(()));
                }
                Pin::new(&mut connection).poll(cx)
            })
            .await;
            done.store(true, Ordering::Release);
        });
        Ok(Self { sender, closed })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Waits until the connection can open one more stream. An error means it is closing or
    /// closed (the connection is then marked so): a request not yet sent may go elsewhere.
    pub async fn ready(&self) -> Result<Ready, h2::Error> {
        let mut sender = self.sender.clone();
        match poll_fn(|cx| sender.poll_ready(cx)).await {
            Ok(()) => Ok(Ready(sender)),
            Err(e) => {
                self.closed.store(true, Ordering::Release);
                Err(e)
            }
        }
    }
}

/// A connection ready to open a stream.
pub struct Ready(SendRequest<Bytes>);

impl Ready {
    /// Sends `req` (its URI absolute: `:scheme`, `:authority`) and waits for the response head.
    /// The head goes out before the returned future is first polled, so that future holds only
    /// h2's response future, not the request.
    pub fn send(
        self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, h2::Error>> + Send + 'static {
        let Ready(mut sender) = self;
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        let end_of_stream = body.is_end_stream();
        if let Some(len) = body.size_hint().exact()
            && len != 0
            && !head.headers().contains_key(CONTENT_LENGTH)
        {
            head.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        let response = sender
            .send_request(head, end_of_stream)
            .map(|(response, send_stream)| {
                if !end_of_stream {
                    tokio::spawn(pipe(body, send_stream));
                }
                response
            });
        async move {
            let response = response?.await?;
            Ok(response.map(|recv| {
                boxed(ResponseBody {
                    recv,
                    data_done: false,
                })
            }))
        }
    }
}

/// Streams a request body to its HTTP/2 stream, within the peer's flow-control window. A body
/// that fails (malformed chunked encoding, a client gone) resets the stream, which the request's
/// response future then reports as a reset of ours.
async fn pipe(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        let frame = poll_fn(|cx| {
            // A stream the peer has reset needs no more of the body.
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match frame {
            None => return,
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(_))) => {
                stream.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    stream.reserve_capacity(0);
                    let _ = stream.send_trailers(trailers);
                    return;
                }
                // Neither data nor trailers: skipped, as hyper does.
                Err(_) => continue,
            },
        };
        let end_of_stream = body.is_end_stream();
        if data.is_empty() {
            // An empty frame needs no window.
            if end_of_stream {
                let _ = stream.send_data(data, true);
                return;
            }
            continue;
        }
        // As hyper does: claim one byte of window, wait until some is assigned, then hand h2
        // the whole chunk, which it sends as the peer's window allows. Claiming the chunk's
        // length up front would pin connection window that other streams need.
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                _ => return,
            }
        }
        if stream.send_data(data, end_of_stream).is_err() || end_of_stream {
            return;
        }
    }
}

/// A response body read from its HTTP/2 stream, each chunk's window given back as it is read.
struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Pings the peer every [`PING_INTERVAL`]; ready when a pong is [`PING_TIMEOUT`] late or the
/// ping cannot be sent (the connection is then dropped).
struct KeepAlive {
    ping_pong: PingPong,
    timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

impl KeepAlive {
    fn new(ping_pong: PingPong) -> Self {
        Self {
            ping_pong,
            timer: Box::pin(tokio::time::sleep(PING_INTERVAL)),
            awaiting_pong: false,
        }
    }

    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.timer.as_mut().reset(Instant::now() + PING_INTERVAL);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.awaiting_pong {
                return Poll::Ready(());
            }
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.awaiting_pong = true;
            self.timer.as_mut().reset(Instant::now() + PING_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An h2 server on the other end of an in-memory pipe, answering pings (it is polled) or
    /// not (only its handshake is).
    async fn connected(answering: bool) -> Connection {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server_io)
                .await
                .expect("server handshake");
            if answering {
                while server.accept().await.is_some() {}
            } else {
                std::future::pending::<()>().await;
            }
            drop(server);
        });
        Connection::handshake(client_io)
            .await
            .expect("client handshake")
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_dropped() {
        let connection = connected(false).await;
        tokio::time::sleep(PING_INTERVAL - Duration::from_secs(1)).await;
        assert!(!connection.is_closed(), "open until the first ping");
        tokio::time::sleep(PING_TIMEOUT + Duration::from_secs(2)).await;
        assert!(connection.is_closed(), "closed once the pong is late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_is_kept() {
        let connection = connected(true).await;
        tokio::time::sleep((PING_INTERVAL + PING_TIMEOUT) * 4).await;
        assert!(!connection.is_closed());
    }
}
