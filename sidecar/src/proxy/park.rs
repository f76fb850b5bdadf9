//! Outbound HTTP/1.1 keep-alive connections that hold no HTTP state while idle ("parking").
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer, plus its connection state, for as
//! long as a connection is open, so 1,000 idle keep-alive connections from the app cost about
//! 15 MiB. Like nginx, which frees a keep-alive connection's buffers between requests, this loop
//! serves each burst of requests with a fresh hyper connection and, once hyper is idle between
//! requests for a moment ([`PARK_AFTER`]; longer for a connection that keeps coming back soon
//! after it was parked, [`next_park_delay`]), takes the socket back
//! ([`hyper::server::conn::http1::Parts`]) and drops the rest.
//! A parked connection is a socket waiting to become readable. hyper has no setting for this,
//! hence the hand-written loop.
//!
//! "Idle" is decided from hyper's own state: the session has answered a request, no request is
//! in the service or streaming its response ([`Activity::in_flight`]), hyper's last read found
//! nothing to read and nothing waits to be written. Then
//! [`UpgradeableConnection::graceful_shutdown`] closes an idle hyper connection at once; [`SessionIo`] turns the shutdown it then asks for into a no-op, and the
//! bytes hyper had read but not parsed (a pipelined request's first part) go in front of the
//! socket for the next session. If hyper turns out not to be idle (a request body still
//! arriving), the connection ends after that exchange, as a keep-alive connection may.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1::{self, UpgradeableConnection};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::http::{Body, BoxError, Guarded, boxed};
use super::server::Prefixed;

/// What the session loop needs to know about the hyper connection it drives. One per client
/// connection; every field is touched only from that connection's task, so `Relaxed` is enough.
#[derive(Default)]
struct Activity {
    /// Requests in the service, or whose response body hyper still holds.
    in_flight: AtomicUsize,
    /// A response of the current session has been sent. hyper counts a connection as busy until
    /// its first exchange is over, so only then can it be idle.
    answered: AtomicBool,
    /// hyper's latest read attempt (in the current poll) found nothing to read.
    read_pending: AtomicBool,
    /// hyper's latest write or flush (in the current poll) could not finish.
    write_pending: AtomicBool,
    /// Parking: the shutdown hyper asks for must leave the socket open.
    parking: AtomicBool,
    /// Reads that returned bytes, to tell a connection idle since the park timer was armed
    /// from one that served requests meanwhile.
    reads: AtomicU64,
    /// Request heads hyper has handed to the service, to tell when a new head is awaited.
    heads: AtomicU64,
}

/// How long a new connection must stay idle between requests before it is parked: long enough
/// that a connection under load is not parked between its requests (each park and resume costs
/// hyper's two 8 KiB buffers, which glibc's allocator frees and allocates slowly), short enough
/// that idle connections opened one after another reuse the same freed buffers.
const PARK_AFTER: Duration = Duration::from_millis(10);
/// The longest wait between checks of a busy connection, and the longest park delay.
const PARK_AFTER_MAX: Duration = Duration::from_secs(1);

/// The park delay of a connection that was parked for `parked` and is resumed: one that comes
/// back within [`PARK_AFTER_MAX`] is in use, at a rate slower than its delay, so it waits twice
/// as long before the next park (a connection with a request every 40 ms stops parking after
/// three sessions instead of paying a park and a resume per request); one that stayed parked
/// longer starts again from [`PARK_AFTER`].
fn next_park_delay(delay: Duration, parked: Duration) -> Duration {
    if parked < PARK_AFTER_MAX {
        (delay * 2).min(PARK_AFTER_MAX)
    } else {
        PARK_AFTER
    }
}

/// Counts a request as in flight until its response body is dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Relaxed);
        activity.heads.fetch_add(1, Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        self.0.answered.store(true, Relaxed);
    }
}

/// The socket as one hyper session sees it: bytes read ahead first, and a record of whether
/// hyper is waiting on it.
struct SessionIo {
    io: Prefixed<TcpStream>,
    activity: Arc<Activity>,
}

impl AsyncRead for SessionIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        match polled {
            Poll::Pending => self.activity.read_pending.store(true, Relaxed),
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.activity.reads.fetch_add(1, Relaxed);
            }
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl SessionIo {
    fn note<T>(&self, polled: Poll<T>) -> Poll<T> {
        if polled.is_pending() {
            self.activity.write_pending.store(true, Relaxed);
        }
        polled
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.note(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.parking.load(Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How a hyper session ended.
enum Ended {
    /// Idle between requests: the socket is handed back.
    Parked,
    /// Closed, failed, drained or upgraded: nothing is left to serve.
    Done,
}

/// Serves one HTTP/1.1 client connection (its first bytes already read into `prefix`) until it
/// closes, parking it between requests. `handle` answers each request; `stop` resolves when the
/// sidecar drains, after which in-flight requests finish and the connection closes.
///
/// `head_timeout` (`limits.header_read_timeout`) bounds both how long a parked connection may
/// stay silent and how long a client may take to send a request head once it is awaited. The
/// latter is enforced here, not by hyper: hyper's own head timer costs a boxed sleep and a
/// timer-wheel insertion and removal per request (about 1,000 instructions, 2 % of a request in
/// bench/callgrind.sh), while [`Session::drive`] needs one clock reading per request and checks
/// the deadline with the park timer it already has.
pub(super) async fn serve<H, F>(
    tcp: TcpStream,
    prefix: Bytes,
    mut builder: http1::Builder,
    head_timeout: Duration,
    handle: H,
    stop: impl Future<Output = ()>,
) where
    H: Fn(Request<Body>) -> F + Send + Unpin + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    builder.header_read_timeout(None);
    let activity = Arc::new(Activity::default());
    let counter = activity.clone();
    let mut service = service_fn(move |req: Request<Incoming>| {
        let in_flight = InFlight::new(counter.clone());
        let response = handle(req.map(boxed));
        // Boxed: the request's whole stack is one large future, which hyper would otherwise move
        // by value (memcpy) into and out of its connection state on every request.
        Box::pin(async move {
            let response = response.await;
            Ok::<_, Infallible>(response.map(|body| Guarded::new(body, in_flight)))
        })
    });
    let mut stop = pin!(stop);
    // One timer per connection: the park delay or head deadline during a session, the idle
    // timeout while parked.
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut draining = false;
    let mut park_delay = PARK_AFTER;
    // When the connection was last parked; `None` during its first session.
    let mut parked_at: Option<Instant> = None;
    // When the wait for the request head not yet received began.
    let mut head_since = Instant::now();
    let (mut tcp, mut prefix) = (tcp, prefix);
    loop {
        // A parked connection that carried no bytes over starts a new head when it becomes
        // readable; one that carried part of a head keeps that head's deadline.
        if prefix.is_empty() {
            timer.as_mut().reset(Instant::now() + head_timeout);
            tokio::select! {
                biased;
                () = stop.as_mut() => return,
                readable = tcp.readable() => if readable.is_err() { return },
                () = timer.as_mut() => return,
            }
            head_since = Instant::now();
        }
        if let Some(at) = parked_at {
            park_delay = next_park_delay(park_delay, at.elapsed());
        }
        activity.parking.store(false, Relaxed);
        activity.answered.store(false, Relaxed);
        let io = SessionIo {
            io: Prefixed::new(prefix, tcp),
            activity: activity.clone(),
        };
        // Boxed, so that a parked connection's task does not keep room for hyper's state.
        let mut conn = Box::new(
            builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let session = Session {
            activity: &activity,
            park_delay,
            head_timeout,
            head_since: &mut head_since,
            stop: stop.as_mut(),
            timer: timer.as_mut(),
            draining: &mut draining,
        };
        if let Ended::Done = session.drive(&mut conn).await {
            return;
        }
        let Some(parts) = conn.into_parts() else {
            return;
        };
        parked_at = Some(Instant::now());
        (tcp, prefix) = parts.io.into_inner().io.into_parts(parts.read_buf);
        service = parts.service;
    }
}

/// What the session's timer is armed for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing yet.
    Unarmed,
    /// The head deadline only: before the session's first response hyper cannot be parked.
    Head,
    /// Whether hyper has stayed idle since `reads` bytes-returning reads, or the head deadline
    /// if that comes first.
    Park { reads: u64 },
}

/// A connection's state while hyper serves it.
struct Session<'a, Stop> {
    activity: &'a Activity,
    /// How long hyper must be idle before the connection parks.
    park_delay: Duration,
    /// How long a client may take to send a request head (`limits.header_read_timeout`).
    head_timeout: Duration,
    /// When the wait for the current request head began; carried over a park.
    head_since: &'a mut Instant,
    stop: Pin<&'a mut Stop>,
    timer: Pin<&'a mut Sleep>,
    draining: &'a mut bool,
}

impl<Stop: Future<Output = ()>> Session<'_, Stop> {
    /// Polls hyper until the connection ends, or parks it once it has been idle between
    /// requests for `park_delay`. A connection found busy each time the timer fires waits
    /// twice as long before the next check (up to [`PARK_AFTER_MAX`]), so busy connections cost
    /// about one timer a second, not one per request, and they never park mid-burst.
    ///
    /// Whenever hyper awaits a request head, the timer fires no later than the head's deadline;
    /// a client that has not sent the whole head by then is cut off, as hyper's own
    /// `header_read_timeout` would.
    async fn drive<S>(mut self, conn: &mut UpgradeableConnection<TokioIo<SessionIo>, S>) -> Ended
    where
        S: hyper::service::HttpService<Incoming, ResBody = Guarded<InFlight>> + Unpin,
        S::Error: Into<BoxError>,
    {
        let activity = self.activity;
        let mut closing = false;
        let mut check = Check::Unarmed;
        let mut wait = self.park_delay;
        let mut heads_seen = activity.heads.load(Relaxed);
        std::future::poll_fn(|cx| {
            if !*self.draining && self.stop.as_mut().poll(cx).is_ready() {
                *self.draining = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            activity.read_pending.store(false, Relaxed);
            activity.write_pending.store(false, Relaxed);
            if Pin::new(&mut *conn).poll(cx).is_ready() {
                return Poll::Ready(Ended::Done);
            }
            let awaiting_head = activity.in_flight.load(Relaxed) == 0
                && activity.read_pending.load(Relaxed)
                && !activity.write_pending.load(Relaxed);
            if *self.draining || closing || !awaiting_head {
                return Poll::Pending;
            }
            let answered = activity.answered.load(Relaxed);
            let heads = activity.heads.load(Relaxed);
            if heads != heads_seen {
                // An exchange is over: the next head is awaited from now.
                heads_seen = heads;
                *self.head_since = Instant::now();
                if answered && check == Check::Head {
                    // The first response is out: the park checks start.
                    check = Check::Unarmed;
                }
            }
            if check != Check::Unarmed && self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer has fired, or is to be armed for the first time.
            let now = Instant::now();
            let head_deadline = *self.head_since + self.head_timeout;
            if check != Check::Unarmed && now >= head_deadline {
                tracing::debug!("no whole request head within limits.header_read_timeout");
                return Poll::Ready(Ended::Done);
            }
            let reads = activity.reads.load(Relaxed);
            match check {
                Check::Park { reads: at } if at == reads => {
                    return park(conn, cx, activity, &mut closing);
                }
                Check::Park { .. } => wait = (wait * 2).min(PARK_AFTER_MAX),
                Check::Unarmed | Check::Head => {}
            }
            let next = if answered {
                check = Check::Park { reads };
                (now + wait).min(head_deadline)
            } else {
                check = Check::Head;
                head_deadline
            };
            self.timer.as_mut().reset(next);
            // Registers the timer's wake-up; it cannot have fired yet.
            let _ = self.timer.as_mut().poll(cx);
            Poll::Pending
        })
        .await
    }
}

/// Parks hyper, idle since the park timer was armed: hyper closes an idle connection at once;
/// otherwise it finishes the exchange first and the connection closes (`closing`).
fn park<S>(
    conn: &mut UpgradeableConnection<TokioIo<SessionIo>, S>,
    cx: &mut Context<'_>,
    activity: &Activity,
    closing: &mut bool,
) -> Poll<Ended>
where
    S: hyper::service::HttpService<Incoming, ResBody = Guarded<InFlight>> + Unpin,
    S::Error: Into<BoxError>,
{
    tracing::trace!("parking an idle connection");
    activity.parking.store(true, Relaxed);
    Pin::new(&mut *conn).graceful_shutdown();
    match Pin::new(&mut *conn).poll(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(Ended::Parked),
        Poll::Ready(Err(_)) => Poll::Ready(Ended::Done),
        Poll::Pending => {
            tracing::debug!("not idle after all: closing after this exchange");
            activity.parking.store(false, Relaxed);
            *closing = true;
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_that_comes_back_soon_parks_later() {
        let soon = Duration::from_millis(30);
        let delays: Vec<_> =
            std::iter::successors(Some(PARK_AFTER), |&d| Some(next_park_delay(d, soon)))
                .take(9)
                .collect();
        assert_eq!(delays[1], Duration::from_millis(20));
        assert_eq!(delays[2], Duration::from_millis(40));
        assert_eq!(delays[8], PARK_AFTER_MAX);
        assert_eq!(next_park_delay(PARK_AFTER_MAX, soon), PARK_AFTER_MAX);
    }

    #[test]
    fn a_connection_parked_long_starts_over() {
        assert_eq!(next_park_delay(PARK_AFTER_MAX, PARK_AFTER_MAX), PARK_AFTER);
        assert_eq!(
            next_park_delay(Duration::from_millis(80), Duration::from_secs(5)),
            PARK_AFTER
        );
    }
}
