//! HTTP/2 on the `h2` crate directly: the client ([`client`]: connections to other sidecars and
//! to apps that speak h2c) and the server ([`server`]: other sidecars' connections, and apps'
//! h2c ones), and what both use: flow-control windows, keep-alive pings, a body streamed into
//! an HTTP/2 stream ([`Pipe`]) and one read out of it ([`RecvBody`]).
//!
//! Why not hyper's HTTP/2: on both sides it puts each request on a task of its own and passes
//! the request, the response or both through channels, moving large futures on the way
//! (DHAT's copy profile). Here the request's own future (client) or the stream's own task
//! (server) does the work. docs/performance.md has the measurements.

pub mod client;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body::{Body as _, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::http::{Body, BoxError};

/// A stream's receive window: how much of a body the peer may send before it is read. Fixed,
/// where hyper grew its windows from 64 KiB by measuring the bandwidth-delay product: 256 KiB
/// is more than loopback or a pod network needs for full speed, and bounds what a slow reader
/// can make the sidecar hold per stream.
const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's receive window, shared by its streams.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// How much body may wait in the connection's send buffer per stream (hyper's default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// A ping every so often, while the connection is open...
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is dropped when its pong takes longer than this.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams a body into its HTTP/2 stream, within the peer's flow-control window: a future that
/// ends when the body has been handed to h2 or the stream is gone. A body that fails (malformed
/// chunked encoding, a client or app gone) resets the stream; a stream the peer resets needs no
/// more of the body. A struct, not an `async fn`, so that a stream's task can hold it in place
/// after the response head ([`server`]).
struct Pipe {
    body: Body,
    stream: SendStream<Bytes>,
    /// A chunk (and whether it ends the body) waiting for window.
    waiting: Option<(Bytes, bool)>,
}

impl Pipe {
    fn new(body: Body, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            waiting: None,
        }
    }
}

impl Future for Pipe {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            if let Some((data, end_of_stream)) = this.waiting.take() {
                if this.stream.capacity() == 0 {
                    match this.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            this.waiting = Some((data, end_of_stream));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {
                            this.waiting = Some((data, end_of_stream));
                            continue;
                        }
                        Poll::Ready(_) => return Poll::Ready(()),
                    }
                }
                if this.stream.send_data(data, end_of_stream).is_err() || end_of_stream {
                    return Poll::Ready(());
                }
                continue;
            }
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => {
                    let _ = this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Err(_)) => {
                    this.stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                Some(Ok(frame)) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        this.stream.reserve_capacity(0);
                        let _ = this.stream.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                    // Neither data nor trailers: skipped, as hyper does.
                    Err(_) => continue,
                },
            };
            let end_of_stream = this.body.is_end_stream();
            if data.is_empty() {
                // An empty frame needs no window.
                if end_of_stream {
                    let _ = this.stream.send_data(data, true);
                    return Poll::Ready(());
                }
                continue;
            }
            // As hyper does: claim one byte of window, wait until some is assigned, then hand
            // h2 the whole chunk, which it sends as the peer's window allows. Claiming the
            // chunk's length up front would pin connection window that other streams need.
            this.stream.reserve_capacity(1);
            this.waiting = Some((data, end_of_stream));
        }
    }
}

/// A body read from its HTTP/2 stream, each chunk's window given back as it is read. Its size
/// is known when the head gave a `content-length` (h2 checks that the data matches it), so
/// that an HTTP/1.1 hop after this one can send a length instead of chunks.
struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    /// Body bytes still to come, when the length is known.
    remaining: Option<u64>,
}

impl RecvBody {
    fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        Self {
            recv,
            data_done: false,
            remaining,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(poll_data_released(&mut self.recv, cx)) {
                Some(Ok(data)) => {
                    if let Some(remaining) = self.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
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

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// The stream's next DATA, its window given back to the peer as it is taken: the bytes have left
/// h2's buffers, so the peer may send more (as hyper does).
fn poll_data_released(
    recv: &mut RecvStream,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, h2::Error>>> {
    let data = ready!(recv.poll_data(cx));
    if let Some(Ok(data)) = &data {
        let _ = recv.flow_control().release_capacity(data.len());
    }
    Poll::Ready(data)
}

/// Pings the peer every [`PING_INTERVAL`]; ready when a pong is [`PING_TIMEOUT`] late or the
/// ping cannot be sent (the connection is then dropped).
struct KeepAlive {
    ping_pong: PingPong,
    timer: Pin<Box<Sleep>>,
    /// The timer has been polled since it was last set, so it will wake the connection's task
    /// when it fires. Until then `Sleep::is_elapsed` (an atomic load) says whether to poll it:
    /// polling costs far more (tokio registers the waker again), and the connection's task
    /// polls this on every wake-up.
    timer_registered: bool,
    awaiting_pong: bool,
}

impl KeepAlive {
    fn new(ping_pong: PingPong) -> Self {
        Self {
            ping_pong,
            timer: Box::pin(tokio::time::sleep(PING_INTERVAL)),
            timer_registered: false,
            awaiting_pong: false,
        }
    }

    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.set_timer(PING_INTERVAL);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            if self.timer_registered && !self.timer.is_elapsed() {
                return Poll::Pending;
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                self.timer_registered = true;
                return Poll::Pending;
            }
            if self.awaiting_pong {
                return Poll::Ready(());
            }
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.awaiting_pong = true;
            self.set_timer(PING_TIMEOUT);
        }
    }

    fn set_timer(&mut self, after: std::time::Duration) {
        self.timer.as_mut().reset(Instant::now() + after);
        self.timer_registered = false;
    }
}
