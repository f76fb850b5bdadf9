//! A multiplexed HTTP/2 connection to an endpoint (another sidecar, or an app or upstream that
//! speaks h2c).
//!
//! Why not hyper's HTTP/2 client: it spawns a task for every request, which awaits the response
//! and hands it back through two channels, and it moves that task's 1.5 KB future six times on
//! the way (DHAT's copy profile). Here the request's own future sends the head and awaits the
//! response: no task, no channel, no copy (about 6,500 fewer instructions per request in the
//! caller, `bench/callgrind.sh`; docs/performance.md). A request body that is not complete when
//! the head goes out is still streamed by a task of its own ([`Pipe`]), as hyper does, so the
//! response can arrive while the body is still being sent.
//!
//! What hyper did that is kept: keep-alive pings (a silent peer is dropped after
//! [`super::PING_INTERVAL`] + [`super::PING_TIMEOUT`]), `content-length` for bodies of known size, flow
//! control on both directions, and a reset stream when the client's request body fails.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{CONTENT_LENGTH, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, KeepAlive, MAX_SEND_BUFFER, Pipe, RecvBody, STREAM_WINDOW};
use crate::proxy::http::{Body, boxed};

/// The largest response head accepted (hyper's default, kept).
const MAX_HEADER_LIST: u32 = 16 * 1024;

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
                    tokio::spawn(Pipe::new(body, send_stream));
                }
                response
            });
        async move {
            let response = response?.await?;
            let (parts, recv) = response.into_parts();
            let body = boxed(RecvBody::new(recv, &parts.headers));
            Ok(Response::from_parts(parts, body))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{PING_INTERVAL, PING_TIMEOUT};
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
