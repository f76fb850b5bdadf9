//! HTTP/1.1 connections to the app or an upstream, driven by the request that uses them.
//!
//! hyper's `client::conn::http1` splits a connection into a `SendRequest` handle and a
//! `Connection` future that does the I/O, usually spawned on a task of its own. A request then
//! crosses two tasks: it goes through a channel into the connection's task, which wakes to write
//! it, wakes again when the response arrives and sends the head back through a oneshot, waking
//! the request's task. Here nothing is spawned: a [`Connection`] is taken out of the pool by one
//! request, whose task polls hyper's `Connection` future itself until the response body has
//! been read to its end ([`ResponseBody`]), and then puts it back. The socket wakes the
//! request's task directly, and the channel and oneshot are only touched within it, so they
//! never wake anything (`bench/callgrind.sh`, docs/performance.md).
//!
//! What this costs:
//! - An idle connection in the pool is polled by no one, so a peer that closes it is noticed
//!   when the connection is next taken, or by the pool's sweep every [`SWEEP_INTERVAL`]
//!   ([`spawn_sweeper`]), not at once. hyper hands the request back unsent when it notices at
//!   take-up, and it goes out on another connection, as it did when a closed connection's task
//!   had not yet noticed either ([`super::pool::EndpointPool`]).
//! - Once the response head is in, the connection's I/O (the rest of a request body too)
//!   advances only as the response body is read, that is, as fast as the client takes the
//!   response: the backpressure HTTP/2's flow control already puts on the stream.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::http::{Body, BoxError, boxed};
use super::pool::{Io, UPSTREAM_READ_BUFFER};

/// One endpoint's HTTP/1.1 connections that no request carries: the idle ones, how many are
/// open in all, and the requests waiting for one because the endpoint's limit is reached.
///
/// The limit is the answer to a burst: a callee holding 1,024 requests open would otherwise
/// dial 1,024 connections to its app, each with its own buffers in both processes, and the
/// app serves them all. Requests past the limit queue, first come first served, and each
/// connection that comes back (or closes) goes to the longest waiter; a queued request still
/// ends at its deadline, like Envoy's `max_connections` with `max_pending_requests` (which
/// answers 503 when its queue is full instead).
pub(super) struct Pool {
    state: Mutex<State>,
    /// Open connections past which a request queues, or (when it may not) is told `Full`.
    /// Connections dialed past it by requests that waited too long ([`Pool::place_past_limit`])
    /// are pooled like the others, and closed by the sweep once idle.
    limit: usize,
    /// Connections open or being dialed, wherever they are: idle here, carried by a request, or
    /// dropped half-way by a deadline ([`Counted`]).
    open: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Most recently used last.
    idle: Vec<Connection>,
    /// Requests waiting for a connection, oldest first.
    waiting: VecDeque<oneshot::Sender<Handoff>>,
    /// Exchanges ended so far (wrapping): a waiting request tells by it whether connections are
    /// coming back at all.
    released: usize,
}

/// What a waiting request is handed.
pub(super) enum Handoff {
    /// A connection that finished an exchange.
    Idle(Connection),
    /// The place of one that closed: dial a new one.
    Dial(Counted),
}

/// What [`Pool::take`] finds.
pub(super) enum Taken {
    Idle(Connection),
    /// Fewer than the limit are open: dial one, counted from now on.
    Dial(Counted),
    /// The limit is reached and the caller did not want to queue.
    Full,
    /// The limit is reached: the request is queued, when [`Pool::released`] was at this count.
    Queued(oneshot::Receiver<Handoff>, usize),
}

/// Idle connections kept per endpoint, at most, whatever the limit: the most a burst that
/// dialed past the limit leaves open until the next sweep.
const MAX_IDLE: usize = 1024;

impl Pool {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            limit,
            open: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection; else, below the limit, a place to dial one; else
    /// a place in the queue when `queue`, or `Full`.
    pub(super) fn take(self: &Arc<Self>, queue: bool) -> Taken {
        let mut state = self.lock();
        if let Some(connection) = state.idle.pop() {
            return Taken::Idle(connection);
        }
        if self.open.load(Ordering::Relaxed) < self.limit {
            return Taken::Dial(Counted::start(self));
        }
        if !queue {
            return Taken::Full;
        }
        let (handoff, receive) = oneshot::channel();
        state.waiting.push_back(handoff);
        Taken::Queued(receive, state.released)
    }

    /// How many exchanges have ended so far (wrapping).
    pub(super) fn released(&self) -> usize {
        self.lock().released
    }

    /// A place to dial a connection past the limit, for a request that waited too long
    /// ([`super::pool`]).
    pub(super) fn place_past_limit(self: &Arc<Self>) -> Counted {
        Counted::start(self)
    }

    /// A connection whose exchange ended: to the longest waiting request, else back into the
    /// idle ones unless [`MAX_IDLE`] already are.
    fn release(&self, connection: Connection) {
        let mut state = self.lock();
        state.released = state.released.wrapping_add(1);
        let mut connection = connection;
        let unclaimed = loop {
            let Some(waiter) = state.waiting.pop_front() else {
                break Some(connection);
            };
            match waiter.send(Handoff::Idle(connection)) {
                Ok(()) => break None,
                // That request is gone (its deadline passed): the next one.
                Err(back) => match back.disarm() {
                    Some(back) => connection = back,
                    None => break None,
                },
            }
        };
        let extra = match unclaimed {
            Some(connection) if state.idle.len() < MAX_IDLE => {
                state.idle.push(connection);
                None
            }
            other => other,
        };
        // A connection is dropped only after the lock is released: its `Counted` takes it.
        drop(state);
        drop(extra);
    }

    /// One place of `open` is free: to the longest waiting request, to dial, else uncounted.
    /// Under the lock, as `take` counts, so that no request queues just as the place frees
    /// (connections close rarely: this is not on the path of every request).
    fn free(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some(waiter) = state.waiting.pop_front() {
            let place = Counted {
                pool: Some(Arc::downgrade(self)),
            };
            match waiter.send(Handoff::Dial(place)) {
                Ok(()) => return,
                // A `Dial` comes back: disarmed, its drop frees nothing (under the lock).
                Err(back) => drop(back.disarm()),
            }
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Handoff {
    /// What a request that is gone did not take: its connection, or nothing (the place to dial
    /// is disarmed, so dropping it frees nothing, since the sender still holds it).
    fn disarm(self) -> Option<Connection> {
        match self {
            Handoff::Idle(connection) => Some(connection),
            Handoff::Dial(mut place) => {
                place.pool = None;
                None
            }
        }
    }
}

/// Idle connections to one endpoint, and its queue ([`Pool`]).
pub(super) type Idle = Arc<Pool>;

/// How often a pool's idle connections are checked for a close by their peer.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the task that runs [`sweep`] on `idle` every [`SWEEP_INTERVAL`]; it ends with the
/// pool.
pub(super) fn spawn_sweeper(idle: &Idle) {
    let idle = Arc::downgrade(idle);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(idle) = idle.upgrade() else {
                return;
            };
            sweep(&idle);
        }
    });
}

/// Closes the idle connections whose peer has closed them (an app's keep-alive timeout, a
/// restart), then the least recently used idle ones while more than the limit are open (those a
/// burst dialed past it). No request polls an idle connection, so without this one that is not
/// taken again would keep its socket (in `CLOSE_WAIT`) and its buffers for good. Each is polled
/// once with a no-op waker: a peer's close makes the socket readable, hyper reads the end of the
/// stream and its driver ends. Under the lock, so that a request arriving meanwhile waits for
/// the sweep instead of finding the pool empty and dialing; the closed ones are dropped after
/// it, since dropping one may hand its place to a waiting request ([`Pool::free`]).
pub(super) fn sweep(idle: &Idle) {
    let mut quiet = Context::from_waker(Waker::noop());
    let closed: Vec<Connection> = {
        let mut state = idle.lock();
        let (mut kept, mut closed) = (Vec::with_capacity(state.idle.len()), Vec::new());
        for mut connection in state.idle.drain(..) {
            if connection.poll_open(&mut quiet) {
                kept.push(connection);
            } else {
                closed.push(connection);
            }
        }
        let open = idle
            .open
            .load(Ordering::Relaxed)
            .saturating_sub(closed.len());
        let past_limit = open.saturating_sub(idle.limit).min(kept.len());
        closed.extend(kept.drain(..past_limit));
        state.idle = kept;
        closed
    };
    drop(closed);
}

/// One HTTP/1.1 connection: hyper's handle to send on, and the future that does its I/O.
/// The driver is boxed once per connection: it is 680 bytes, moved out of the pool and back on
/// every request, and held in each request's future.
pub(super) struct Connection {
    sender: http1::SendRequest<Body>,
    driver: Box<Driver>,
    _open: Counted,
}

/// hyper's future that does a connection's I/O.
type Driver = http1::Connection<TokioIo<Io>, Body>;

/// Counts a connection (or its dial) in an endpoint's open connections for as long as it lives,
/// wherever it is: in the pool, carried by a request, or dropped half-way by a deadline. Its
/// drop frees the place ([`Pool::free`]).
pub(super) struct Counted {
    /// `None` once disarmed; weak, since the pool holds connections, which hold this.
    pool: Option<std::sync::Weak<Pool>>,
}

impl Counted {
    fn start(pool: &Arc<Pool>) -> Self {
        pool.open.fetch_add(1, Ordering::Relaxed);
        Self {
            pool: Some(Arc::downgrade(pool)),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take().and_then(|pool| pool.upgrade()) {
            pool.free();
        }
    }
}

/// hyper's handshake on `io` (it only sets the connection up; nothing is sent), with the read
/// buffer capped at [`UPSTREAM_READ_BUFFER`]: the one set-up of pooled and upgrade connections.
async fn handshake(io: Io) -> hyper::Result<(http1::SendRequest<Body>, Driver)> {
    http1::Builder::new()
        .max_buf_size(UPSTREAM_READ_BUFFER)
        .handshake(TokioIo::new(io))
        .await
}

/// A connection for an upgrade (WebSocket), never pooled: its driver runs on a task of its own,
/// since the upgraded stream outlives the request.
pub(super) async fn upgradable(io: Io) -> hyper::Result<http1::SendRequest<Body>> {
    let (sender, driver) = handshake(io).await?;
    tokio::spawn(async move {
        let _ = driver.with_upgrades().await;
    });
    Ok(sender)
}

/// Why an exchange did not produce a response.
pub(super) enum Failed {
    /// The request was never written (the connection was closed or not ready): it may go out on
    /// another connection. Boxed: rare, and the request would otherwise enlarge every result.
    Unsent(Box<Request<Body>>),
    /// The request was (or may have been) written and the exchange failed.
    Exchange(hyper::Error),
}

impl Connection {
    /// A pooled connection on `io`, counted by `open` from its dial on.
    pub(super) async fn handshake(io: Io, open: Counted) -> hyper::Result<Self> {
        let (sender, driver) = handshake(io).await?;
        Ok(Self {
            sender,
            driver: Box::new(driver),
            _open: open,
        })
    }

    /// Sends `req` and waits for the response head. The response's body carries the connection
    /// on, and gives it back to `idle` once read to its end.
    #[allow(clippy::manual_async_fn)] // Not `async fn`: see "Futures" in `proxy`.
    pub(super) fn exchange(
        self,
        req: Request<Body>,
        idle: &Idle,
    ) -> impl Future<Output = Result<Response<Body>, Failed>> + Send + '_ {
        async move {
            let ready = self.sender.is_ready();
            // `None` once the connection has ended (closed by either side, or failed): dropping
            // hyper's driver then hands back a request it had not written.
            let mut connection = Some(self);
            if !ready {
                // Not polled since its last exchange ended (or never): one poll lets hyper see
                // the exchange through, or the peer's close, and ask for the next request.
                poll_fn(|cx| {
                    drive(&mut connection, cx);
                    Poll::Ready(())
                })
                .await;
            }
            let Some(open) = connection.as_mut() else {
                return Err(Failed::Unsent(Box::new(req)));
            };
            let response = {
                let mut sent = pin!(open.sender.try_send_request(req));
                poll_fn(|cx| {
                    drive(&mut connection, cx);
                    // Only a poll of the driver, by this task, fulfils `sent`, and the driver
                    // has just registered this task's waker for what it waits on: `sent` needs
                    // none. (Once the driver is dropped, `sent` is already fulfilled.)
                    let waker = if connection.is_some() {
                        Waker::noop()
                    } else {
                        cx.waker()
                    };
                    sent.as_mut().poll(&mut Context::from_waker(waker))
                })
                .await
            };
            match response {
                Ok(response) => {
                    Ok(response.map(|body| ResponseBody::carry(body, connection, idle)))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => Err(Failed::Unsent(Box::new(unsent))),
                    None => Err(Failed::Exchange(e.into_error())),
                },
            }
        }
    }

    /// Polls the I/O once; false once the connection has ended (closed by either side, or
    /// failed), after which it must not be polled again.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(self.driver.as_mut()).poll(cx).is_pending()
    }

    /// Back to `idle`: to a waiting request, or idle.
    fn release(self, idle: &Idle) {
        idle.release(self);
    }
}

/// A response body read from a [`Connection`] this body drives, which it gives back to the
/// pool at the body's end. Dropped before its end, it closes the connection (the rest of the
/// body would have to be read first, as with hyper's own pool).
struct ResponseBody {
    body: Incoming,
    /// Until the end of the body is read: the connection, and the pool it goes back to.
    connection: Option<(Connection, Idle)>,
}

impl ResponseBody {
    /// The response's body, boxed: as it is when it is already complete (no body, or the
    /// connection ended with it), else wrapped to drive `connection` until it is.
    fn carry(body: Incoming, connection: Option<Connection>, idle: &Idle) -> Body {
        match connection {
            None => boxed(body),
            Some(connection) if body.is_end_stream() => {
                connection.release(idle);
                boxed(body)
            }
            Some(connection) => boxed(ResponseBody {
                body,
                connection: Some((connection, idle.clone())),
            }),
        }
    }
}

/// Polls a connection's I/O once, and drops it once it has ended.
fn drive(connection: &mut Option<Connection>, cx: &mut Context<'_>) {
    if connection.as_mut().is_some_and(|open| !open.poll_open(cx)) {
        *connection = None;
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some((connection, ..)) = this.connection.as_mut() else {
            return Pin::new(&mut this.body).poll_frame(cx).map_err(Into::into);
        };
        // The body is fed by the driver alone, which this task polls, registering its waker
        // for the socket: the body needs no waker of its own (see `exchange`). What an earlier
        // poll of the driver already read comes first.
        let mut quiet = Context::from_waker(Waker::noop());
        let mut frame = Pin::new(&mut this.body).poll_frame(&mut quiet);
        if frame.is_pending() {
            if !connection.poll_open(cx) {
                // Ended: what it read is in the body's channel, which ends when it is drained.
                this.connection = None;
                return Pin::new(&mut this.body).poll_frame(cx).map_err(Into::into);
            }
            frame = Pin::new(&mut this.body).poll_frame(&mut quiet);
        }
        match &frame {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.connection = None,
            _ => {}
        }
        frame.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl ResponseBody {
    fn finish(&mut self) {
        if let Some((connection, idle)) = self.connection.take() {
            connection.release(&idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A hyper HTTP/1.1 app on loopback answering `/{n}` with n bytes; counts its connections,
    /// and closes each after one response unless `keep_alive`.
    async fn app(keep_alive: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let n: usize = req.uri().path()[1..].parse().unwrap_or(0);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; n]))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (addr, accepted)
    }

    async fn connect(addr: std::net::SocketAddr, idle: &Idle) -> Connection {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Connection::handshake(Io::Plain(tcp), Counted::start(idle))
            .await
            .expect("handshake")
    }

    fn get(n: usize) -> Request<Body> {
        Request::get(format!("/{n}"))
            .header("host", "app")
            .body(boxed(http_body_util::Empty::<Bytes>::new()))
            .expect("request")
    }

    async fn exchange(connection: Connection, idle: &Idle, n: usize) {
        let response = match connection.exchange(get(n), idle).await {
            Ok(response) => response,
            Err(Failed::Unsent(_)) => panic!("unsent"),
            Err(Failed::Exchange(e)) => panic!("exchange: {e}"),
        };
        // As the HTTP/2 server's `Pipe` reads it: frames until the body says it has ended,
        // then the body is dropped.
        let mut body = response.into_body();
        let mut len = 0;
        while !body.is_end_stream() {
            match body.frame().await {
                Some(frame) => len += frame.expect("frame").into_data().map_or(0, |d| d.len()),
                None => break,
            }
        }
        drop(body);
        assert_eq!(len, n);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_connection_serves_requests_in_turn_and_goes_back_to_the_pool() {
        let (addr, accepted) = app(true).await;
        let idle = Pool::new(4);
        exchange(connect(addr, &idle).await, &idle, 2).await;
        for n in [0, 2, 100_000, 5] {
            let connection = idle.lock().idle.pop().expect("pooled");
            exchange(connection, &idle, n).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle.open.load(Ordering::SeqCst), 1);
        let pooled = std::mem::take(&mut idle.lock().idle);
        drop(pooled);
        assert_eq!(idle.open.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_connection_the_app_closes_is_not_pooled() {
        let (addr, accepted) = app(false).await;
        let idle = Pool::new(4);
        for n in [2, 100_000] {
            exchange(connect(addr, &idle).await, &idle, n).await;
            assert!(idle.lock().idle.is_empty());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(idle.open.load(Ordering::SeqCst), 0);
    }

    /// An app that answers one request, then closes the idle connection a little later (as a
    /// keep-alive timeout does): the sweep finds it closed and drops it from the pool.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_sweep_drops_an_idle_connection_its_peer_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut head = [0u8; 1024];
            let _ = tcp.read(&mut head).await;
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .expect("answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let idle = Pool::new(4);
        exchange(connect(addr, &idle).await, &idle, 2).await;
        sweep(&idle);
        assert_eq!(idle.lock().idle.len(), 1, "still open: kept");
        tokio::time::sleep(Duration::from_millis(300)).await;
        sweep(&idle);
        assert!(idle.lock().idle.is_empty(), "closed by the app: dropped");
        assert_eq!(idle.open.load(Ordering::SeqCst), 0);
    }
}
