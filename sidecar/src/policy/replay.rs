//! Request bodies kept for replay. The first attempt streams the body to the upstream as it
//! arrives (no added latency) while a copy of each chunk (a `Bytes` clone, no copy of the data)
//! is kept, up to `max_body`; past that the copy is dropped and the request is no longer
//! retryable. A retry replays the kept chunks, then continues with the rest of the original body
//! if the earlier attempt had not read it all (the original goes back to the shared state when
//! the attempt's body is dropped, e.g. after a connect error). While an earlier attempt's body
//! still holds the original (its connection has not let go of it yet), the retry's body waits
//! for it to be handed back.
//!
//! Empty bodies (most GETs) need none of this: [`Replay::Empty`] makes a fresh empty body per
//! attempt without allocating.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::proxy::http::{Body, BoxError, empty};

/// A request body that can be sent more than once.
pub enum Replay {
    Empty,
    Shared(Arc<Mutex<State>>, SizeHint),
}

pub struct State {
    /// The original body when no attempt holds it.
    rest: Option<Body>,
    chunks: Vec<Bytes>,
    len: u64,
    max: u64,
    overflow: bool,
    complete: bool,
    trailers: Option<HeaderMap>,
    /// Bodies waiting for an earlier attempt to hand back the original.
    waiting: Vec<Waker>,
}

impl State {
    fn wake_waiting(&mut self) {
        for waker in self.waiting.drain(..) {
            waker.wake();
        }
    }
}

impl Replay {
    /// Wraps `body` for replay, or gives it back when it is known to be larger than `max`.
    pub fn new(body: Body, max: u64) -> Result<Self, Body> {
        if body.is_end_stream() {
            return Ok(Replay::Empty);
        }
        let hint = body.size_hint();
        if hint.lower() > max {
            return Err(body);
        }
        Ok(Replay::Shared(
            Arc::new(Mutex::new(State {
                rest: Some(body),
                chunks: Vec::new(),
                len: 0,
                max,
                overflow: false,
                complete: false,
                trailers: None,
                waiting: Vec::new(),
            })),
            hint,
        ))
    }

    /// A body for the next attempt.
    pub fn body(&self) -> Body {
        match self {
            Replay::Empty => empty(),
            Replay::Shared(state, hint) => http_body_util::BodyExt::boxed_unsync(ReplayBody {
                state: state.clone(),
                pos: 0,
                rest: None,
                trailers_sent: false,
                hint: *hint,
            }),
        }
    }

    /// True when another attempt can send the whole body again: it did not outgrow `max_body`
    /// and did not fail.
    pub fn can_replay(&self) -> bool {
        match self {
            Replay::Empty => true,
            Replay::Shared(state, _) => {
                let s = state.lock().unwrap_or_else(|p| p.into_inner());
                !s.overflow
            }
        }
    }
}

struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// The next kept chunk this body replays.
    pos: usize,
    /// The original body while this attempt reads it.
    rest: Option<Body>,
    trailers_sent: bool,
    hint: SizeHint,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.rest.is_none() {
            let mut s = this.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(chunk) = s.chunks.get(this.pos) {
                this.pos += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
            }
            if s.complete {
                return Poll::Ready(match s.trailers.clone() {
                    Some(t) if !this.trailers_sent => {
                        this.trailers_sent = true;
                        Some(Ok(Frame::trailers(t)))
                    }
                    _ => None,
                });
            }
            if s.overflow {
                return Poll::Ready(Some(Err(
                    "the request body outgrew the replay buffer".into()
                )));
            }
            match s.rest.take() {
                Some(rest) => this.rest = Some(rest),
                None => {
                    // An earlier attempt still holds it: wait until it is handed back.
                    s.waiting.push(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *rest).poll_frame(cx);
        let ended = rest.is_end_stream();
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut s = this.state.lock().unwrap_or_else(|p| p.into_inner());
                if ended {
                    // The original is used up: later attempts replay without waiting for it.
                    s.complete = true;
                    this.rest = None;
                    s.wake_waiting();
                }
                if let Some(data) = frame.data_ref() {
                    s.len += data.len() as u64;
                    if s.overflow || s.len > s.max {
                        if !s.overflow {
                            s.overflow = true;
                            s.chunks = Vec::new();
                            s.wake_waiting();
                        }
                    } else {
                        s.chunks.push(data.clone());
                        this.pos = s.chunks.len();
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    s.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
            }
            Poll::Ready(None) => {
                this.rest = None;
                let mut s = this.state.lock().unwrap_or_else(|p| p.into_inner());
                s.complete = true;
                s.wake_waiting();
            }
            Poll::Ready(Some(Err(_))) => {
                // A broken client body cannot be replayed.
                this.rest = None;
                let mut s = this.state.lock().unwrap_or_else(|p| p.into_inner());
                s.overflow = true;
                s.wake_waiting();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.rest.is_some() {
            return false;
        }
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.complete && self.pos >= s.chunks.len() && (s.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take() {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            // Chunks this attempt read are kept; the next reader continues after them.
            s.rest = Some(rest);
            s.wake_waiting();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::full;
    use http_body_util::BodyExt;

    fn replayable(body: Body) -> Replay {
        match Replay::new(body, 64) {
            Ok(replay) => replay,
            Err(_) => panic!("expected a replayable body"),
        }
    }

    async fn read(body: Body) -> Result<Bytes, BoxError> {
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn replays_a_small_body() {
        let replay = replayable(full("hello"));
        assert_eq!(read(replay.body()).await.expect("first"), "hello");
        assert!(replay.can_replay());
        assert_eq!(read(replay.body()).await.expect("second"), "hello");
    }

    #[tokio::test]
    async fn an_unread_body_survives_a_failed_attempt() {
        let replay = replayable(full("hello"));
        drop(replay.body()); // e.g. a connect error: never polled
        assert!(replay.can_replay());
        assert_eq!(read(replay.body()).await.expect("retry"), "hello");
    }

    #[tokio::test]
    async fn a_retry_waits_for_the_earlier_attempt_to_hand_the_body_back() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let replay = replayable(http_body_util::StreamBody::new(stream).boxed_unsync());
        let mut first = replay.body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .expect("send");
        let frame = first.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"ab"[..]));
        // The first attempt still holds the rest; the retry replays "ab", then waits.
        assert!(replay.can_replay());
        let second = tokio::spawn(read(replay.body()));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!second.is_finished());
        drop(first);
        tx.send(Ok(Frame::data(Bytes::from_static(b"cd"))))
            .await
            .expect("send");
        drop(tx);
        let body = second.await.expect("join").expect("body");
        assert_eq!(body, "abcd");
    }

    #[tokio::test]
    async fn a_large_body_is_not_replayable() {
        assert!(Replay::new(full(vec![0u8; 100]), 64).is_err());
        let chunks = futures_util::stream::iter(
            (0..4).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![1u8; 30])))),
        );
        let streamed = http_body_util::StreamBody::new(chunks).boxed_unsync();
        let replay = replayable(streamed);
        assert_eq!(read(replay.body()).await.expect("first").len(), 120);
        assert!(!replay.can_replay());
    }
}
