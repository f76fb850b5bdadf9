//! Per-subscription deduplication by `correlation_id`.
//!
//! A key is remembered once its message was delivered successfully (the app answered 2xx), for
//! `dedup_window`, and at most `dedup_capacity` keys are kept: when full, the oldest key is
//! forgotten first (so under a flood of distinct ids the effective window shrinks; a forgotten
//! key can be delivered again, which is at-least-once, never lost). Capacity 0 turns dedup off.
//!
//! Messages with the same key that arrive while one of them is being delivered wait for that
//! delivery to finish, so that concurrent duplicates (prefetch > 1) reach the app once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub(crate) struct Dedup {
    window: Duration,
    capacity: usize,
    state: Mutex<State>,
    /// Woken whenever an in-flight key is released.
    released: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// key → (delivered at, sequence number of its entry in `order`).
    seen: HashMap<Arc<str>, (Instant, u64)>,
    /// Insertion order, oldest first; entries whose sequence no longer matches are stale.
    order: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
    in_flight: HashSet<Arc<str>>,
}

/// What to do with a message.
pub(crate) enum Admission<'a> {
    /// Already delivered successfully within the window: ack it without delivering.
    Duplicate,
    /// Deliver it; call [`Claim::delivered`] on success. Dropping the claim releases the key.
    Deliver(Claim<'a>),
}

pub(crate) struct Claim<'a> {
    dedup: &'a Dedup,
    key: Option<Arc<str>>,
}

impl Dedup {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            state: Mutex::new(State::default()),
            released: Arc::new(Notify::new()),
        }
    }

    fn enabled(&self) -> bool {
        self.capacity > 0 && !self.window.is_zero()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks `key` and claims it for delivery, waiting while another delivery of the same key
    /// is in flight.
    pub(crate) async fn admit(&self, key: Option<&str>) -> Admission<'_> {
        let Some(key) = key.filter(|k| !k.is_empty() && self.enabled()) else {
            return Admission::Deliver(Claim {
                dedup: self,
                key: None,
            });
        };
        let released = self.released.clone();
        loop {
            let notified = released.notified();
            tokio::pin!(notified);
            {
                let mut state = self.lock();
                let now = Instant::now();
                state.expire(now, self.window);
                if state.seen.contains_key(key) {
                    return Admission::Duplicate;
                }
                if !state.in_flight.contains(key) {
                    let key: Arc<str> = Arc::from(key);
                    state.in_flight.insert(key.clone());
                    return Admission::Deliver(Claim {
                        dedup: self,
                        key: Some(key),
                    });
                }
                // Register before unlocking so a release in between is not missed.
                notified.as_mut().enable();
            }
            notified.await;
        }
    }

    /// Keys remembered now (for tests and debugging).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().seen.len()
    }
}

impl State {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((key, seq)) = self.order.front() {
            match self.seen.get(key) {
                Some(&(at, s)) if s == *seq => {
                    if now.duration_since(at) < window {
                        break;
                    }
                    self.seen.remove(key);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }

    fn remember(&mut self, key: Arc<str>, now: Instant, capacity: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.seen.insert(key.clone(), (now, seq));
        self.order.push_back((key, seq));
        while self.seen.len() > capacity {
            let Some((old, s)) = self.order.pop_front() else {
                break;
            };
            if self.seen.get(&old).is_some_and(|&(_, cur)| cur == s) {
                self.seen.remove(&old);
            }
        }
        // Stale entries (keys re-remembered later) can pile up only up to the live count.
        if self.order.len() > 2 * capacity.max(16) {
            let seen = &self.seen;
            self.order
                .retain(|(k, s)| seen.get(k).is_some_and(|&(_, cur)| cur == *s));
        }
    }
}

impl Claim<'_> {
    /// The app accepted the message: remember its key for the window.
    pub(crate) fn delivered(mut self) {
        if let Some(key) = self.key.take() {
            let mut state = self.dedup.lock();
            state.in_flight.remove(&key);
            state.remember(key, Instant::now(), self.dedup.capacity);
            drop(state);
            self.dedup.released.notify_waiters();
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.dedup.lock().in_flight.remove(&key);
            self.dedup.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn deliver(d: &Dedup, key: &str) -> bool {
        match d.admit(Some(key)).await {
            Admission::Duplicate => false,
            Admission::Deliver(c) => {
                c.delivered();
                true
            }
        }
    }

    #[tokio::test]
    async fn second_delivery_is_duplicate() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        assert!(deliver(&d, "a").await);
        assert!(!deliver(&d, "a").await);
        assert!(deliver(&d, "b").await);
    }

    #[tokio::test]
    async fn failed_delivery_is_not_remembered() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        match d.admit(Some("a")).await {
            Admission::Deliver(c) => drop(c),
            Admission::Duplicate => panic!("fresh key"),
        }
        assert!(deliver(&d, "a").await);
    }

    #[tokio::test]
    async fn oldest_forgotten_at_capacity() {
        let d = Dedup::new(Duration::from_secs(60), 2);
        assert!(deliver(&d, "a").await);
        assert!(deliver(&d, "b").await);
        assert!(deliver(&d, "c").await);
        assert_eq!(d.len(), 2);
        assert!(deliver(&d, "a").await, "a was evicted");
        assert!(!deliver(&d, "c").await);
    }

    #[tokio::test]
    async fn window_expires() {
        let d = Dedup::new(Duration::from_millis(30), 10);
        assert!(deliver(&d, "a").await);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(deliver(&d, "a").await);
    }

    #[tokio::test]
    async fn disabled_without_capacity_or_key() {
        let d = Dedup::new(Duration::from_secs(60), 0);
        assert!(deliver(&d, "a").await);
        assert!(deliver(&d, "a").await);
        let d = Dedup::new(Duration::from_secs(60), 10);
        for _ in 0..2 {
            match d.admit(None).await {
                Admission::Deliver(c) => c.delivered(),
                Admission::Duplicate => panic!("no key, no dedup"),
            }
        }
    }

    #[tokio::test]
    async fn concurrent_same_key_waits_for_first() {
        let d = Arc::new(Dedup::new(Duration::from_secs(60), 10));
        let first = match d.admit(Some("k")).await {
            Admission::Deliver(c) => c,
            Admission::Duplicate => panic!("fresh key"),
        };
        let d2 = d.clone();
        let second =
            tokio::spawn(async move { matches!(d2.admit(Some("k")).await, Admission::Duplicate) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished());
        first.delivered();
        assert!(second.await.unwrap_or(false), "second is a duplicate");
    }
}
