//! DNS sources (`dns: host:port` and `srv: _name._proto.domain`) and the refresh loop they share:
//! resolve, publish the sorted endpoint set, sleep for the clamped TTL, resolve again; on errors
//! keep the last set for `stale_for` (stale-while-error), retry with jittered backoff, and only
//! then publish `Unavailable`. The loop runs in its own task for as long as the source lives.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until};

use super::resolver::{Answer, DnsResolver, LookupError};
use super::{Resolution, Source, SourceStatus};

/// First retry delay after a failed lookup; doubled per failure up to [`Timing::max_backoff`].
const BASE_BACKOFF: Duration = Duration::from_millis(250);
/// Retries never wait longer than this, however long `max_ttl` is.
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Something the refresh loop can ask for the current endpoints. One per source kind; tests use
/// fakes.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self) -> impl Future<Output = Result<Answer, LookupError>> + Send;
}

/// The clock rules of the refresh loop, from `discovery.resolver`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub stale_for: Duration,
}

impl Timing {
    /// How long to trust an answer: its TTL clamped into `[min_ttl, max_ttl]`, so a TTL of 0
    /// does not turn into a query storm and a TTL of a day does not hide changes.
    pub fn refresh_after(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }

    /// Retries never wait longer than a healthy answer would be trusted (`max_ttl`), nor 10 s.
    fn max_backoff(&self) -> Duration {
        self.max_ttl.min(BACKOFF_CAP).max(BASE_BACKOFF)
    }

    /// Exponential backoff with equal jitter: half fixed, half random, so many sidecars that
    /// lost the same resolver do not retry in lockstep.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = BASE_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let full = exp.min(self.max_backoff());
        let half = full / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

/// A `dns:` (A/AAAA) lookup.
pub struct HostLookup {
    pub resolver: Arc<DnsResolver>,
    pub host: String,
    pub port: u16,
}

impl Lookup for HostLookup {
    fn lookup(&self) -> impl Future<Output = Result<Answer, LookupError>> + Send {
        self.resolver.lookup_host(&self.host, self.port)
    }
}

/// An `srv:` lookup.
pub struct SrvLookup {
    pub resolver: Arc<DnsResolver>,
    pub name: String,
}

impl Lookup for SrvLookup {
    fn lookup(&self) -> impl Future<Output = Result<Answer, LookupError>> + Send {
        self.resolver.lookup_srv(&self.name)
    }
}

/// A source kept current by a refresh loop. The loop starts when the source is created and
/// stops when it is dropped (the `stop` sender is the drop guard).
pub struct RefreshingSource {
    rx: watch::Receiver<Resolution>,
    status: Arc<Mutex<SourceStatus>>,
    description: String,
    _stop: oneshot::Sender<()>,
}

impl RefreshingSource {
    /// Spawns the refresh loop on the current tokio runtime. Without one (never the case inside
    /// the sidecar), the source is `Unavailable` and says why.
    pub fn spawn<L: Lookup>(
        lookup: L,
        timing: Timing,
        service: String,
        description: String,
        errors: IntCounter,
    ) -> Self {
        let (tx, rx) = watch::channel(Resolution::Pending);
        let (stop_tx, stop_rx) = oneshot::channel();
        let status = Arc::new(Mutex::new(SourceStatus::default()));
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let refresh = Refresh {
                    lookup,
                    timing,
                    service,
                    description: description.clone(),
                    tx,
                    status: status.clone(),
                    errors,
                };
                handle.spawn(refresh.run(stop_rx));
            }
            Err(_) => {
                let reason = "discovery needs a tokio runtime".to_string();
                tx.send_replace(Resolution::Unavailable(reason.clone()));
                lock(&status).last_error = Some(reason);
            }
        }
        Self {
            rx,
            status,
            description,
            _stop: stop_tx,
        }
    }
}

impl Source for RefreshingSource {
    fn watch(&self) -> watch::Receiver<Resolution> {
        self.rx.clone()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn status(&self) -> SourceStatus {
        lock(&self.status).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Refresh<L> {
    lookup: L,
    timing: Timing,
    service: String,
    description: String,
    tx: watch::Sender<Resolution>,
    status: Arc<Mutex<SourceStatus>>,
    errors: IntCounter,
}

impl<L: Lookup> Refresh<L> {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut failures: u32 = 0;
        // While the last good set is served after errors: when that began (monotonic, for the
        // deadline).
        let mut stale_since: Option<Instant> = None;
        loop {
            let query = self.lookup.lookup();
            tokio::pin!(query);
            let result = loop {
                // Flip to Unavailable at the stale deadline even while a query hangs.
                let deadline = self.stale_deadline(stale_since);
                tokio::select! {
                    _ = &mut stop => return,
                    result = &mut query => break result,
                    _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                        self.expire();
                    }
                }
            };
            let result = match result {
                Ok(answer) => self.accept_partial(answer),
                Err(e) => Err(e),
            };
            let wait = match result {
                Ok(answer) => {
                    failures = 0;
                    stale_since = None;
                    self.publish(answer)
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    self.failed(&err, &mut stale_since, failures);
                    let backoff = self.timing.backoff(failures);
                    match self.stale_deadline(stale_since) {
                        Some(deadline) => {
                            backoff.min(deadline.saturating_duration_since(Instant::now()))
                        }
                        None => backoff,
                    }
                }
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = sleep(wait) => {}
            }
            // A sleep cut short by the stale deadline: publish the expiry before asking again.
            if self
                .stale_deadline(stale_since)
                .is_some_and(|d| d <= Instant::now())
            {
                self.expire();
            }
        }
    }

    /// When the stale set must be dropped: only while a stale set is being served.
    fn stale_deadline(&self, stale_since: Option<Instant>) -> Option<Instant> {
        let since = stale_since?;
        matches!(*self.tx.borrow(), Resolution::Ready(_)).then(|| since + self.timing.stale_for)
    }

    /// A partial answer (one family failed) is taken only when the set in force has no address
    /// of that family, so a resolver that never answers AAAA still works, while a flaky one
    /// never drops half of a dual-stack set (that case is a failed lookup: stale-while-error).
    fn accept_partial(&self, answer: Answer) -> Result<Answer, LookupError> {
        let Some(partial) = &answer.partial else {
            return Ok(answer);
        };
        let serving_family = self
            .tx
            .borrow()
            .endpoints()
            .iter()
            .any(|e| e.is_ipv6() == partial.ipv6);
        if serving_family {
            return Err(partial.error.clone());
        }
        tracing::debug!(service = %self.service, error = %partial.error, "one address family failed; using the other");
        Ok(answer)
    }

    /// Publishes a good answer (sorted, deduplicated, so watchers can diff sets) and returns how
    /// long to trust it.
    fn publish(&self, answer: Answer) -> Duration {
        let mut endpoints = answer.endpoints;
        endpoints.sort();
        endpoints.dedup();
        let was_broken = {
            let mut status = lock(&self.status);
            let was = status.last_error.take().is_some();
            status.stale_since = None;
            status.resolved_at = Some(SystemTime::now());
            was
        };
        if was_broken {
            tracing::info!(service = %self.service, source = %self.description, endpoints = endpoints.len(), "discovery recovered");
        }
        let new: Arc<[SocketAddr]> = endpoints.into();
        self.tx.send_if_modified(|current| match current {
            Resolution::Ready(old) if *old == new => false,
            _ => {
                tracing::debug!(service = %self.service, endpoints = ?new, "endpoints changed");
                *current = Resolution::Ready(new.clone());
                true
            }
        });
        self.timing.refresh_after(answer.ttl)
    }

    /// Records a failed lookup: counted every time, logged at warn for the first failure of a
    /// streak (retries log at debug, so an outage does not flood the log); the set in force is
    /// kept while it is within `stale_for`, otherwise the source is `Unavailable`.
    fn failed(&self, err: &LookupError, stale_since: &mut Option<Instant>, streak: u32) {
        self.errors.inc();
        let message = err.to_string();
        let serving = matches!(*self.tx.borrow(), Resolution::Ready(_));
        {
            let mut status = lock(&self.status);
            status.last_error = Some(message.clone());
            if serving && stale_since.is_none() {
                status.stale_since = Some(SystemTime::now());
            }
        }
        if serving {
            let since = *stale_since.get_or_insert_with(Instant::now);
            let left = self.timing.stale_for.saturating_sub(since.elapsed());
            if streak == 1 {
                tracing::warn!(service = %self.service, source = %self.description, error = %message,
                    stale_for_left = ?left, "discovery lookup failed; keeping the last known endpoints");
            } else {
                tracing::debug!(service = %self.service, error = %message, failures = streak,
                    stale_for_left = ?left, "discovery lookup failed again");
            }
            if left.is_zero() {
                self.expire();
            }
        } else {
            if streak == 1 {
                tracing::warn!(service = %self.service, source = %self.description, error = %message,
                    "discovery lookup failed; service unavailable");
            } else {
                tracing::debug!(service = %self.service, error = %message, failures = streak,
                    "discovery lookup failed again");
            }
            self.tx.send_if_modified(|current| {
                let new = Resolution::Unavailable(message.clone());
                let changed = *current != new;
                *current = new;
                changed
            });
        }
    }

    /// Drops a stale set: from now on the service is `Unavailable` until a lookup succeeds.
    fn expire(&self) {
        if !matches!(*self.tx.borrow(), Resolution::Ready(_)) {
            return;
        }
        let reason = {
            let mut status = lock(&self.status);
            status.stale_since = None;
            format!(
                "last known endpoints expired after {:?} of failed lookups: {}",
                self.timing.stale_for,
                status.last_error.as_deref().unwrap_or("lookup failed")
            )
        };
        tracing::warn!(service = %self.service, source = %self.description, reason = %reason, "discovery dropped stale endpoints");
        self.tx.send_replace(Resolution::Unavailable(reason));
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::super::resolver::Partial;
    use super::*;
    use std::collections::VecDeque;

    /// A lookup that plays back scripted answers; the last one repeats.
    struct Script(Mutex<VecDeque<Result<Answer, LookupError>>>);

    impl Script {
        fn new(steps: Vec<Result<Answer, LookupError>>) -> Self {
            Self(Mutex::new(steps.into()))
        }
    }

    impl Lookup for Script {
        fn lookup(&self) -> impl Future<Output = Result<Answer, LookupError>> + Send {
            let mut steps = lock(&self.0);
            let next = if steps.len() > 1 {
                steps.pop_front()
            } else {
                steps.front().cloned()
            };
            async move { next.unwrap_or(Err(LookupError::Config("script is empty".into()))) }
        }
    }

    fn ok(addrs: &[&str], ttl: u64) -> Result<Answer, LookupError> {
        Ok(Answer {
            endpoints: addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            ttl: Duration::from_secs(ttl),
            partial: None,
        })
    }

    /// An answer whose AAAA query failed.
    fn v4_only(addrs: &[&str], ttl: u64) -> Result<Answer, LookupError> {
        ok(addrs, ttl).map(|a| Answer {
            partial: Some(Partial {
                ipv6: true,
                error: LookupError::Resolver {
                    name: "svc.test".into(),
                    reason: "AAAA timed out".into(),
                },
            }),
            ..a
        })
    }

    fn nx() -> Result<Answer, LookupError> {
        Err(LookupError::NxDomain {
            name: "svc.test".into(),
        })
    }

    fn timing() -> Timing {
        Timing {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            stale_for: Duration::from_secs(30),
        }
    }

    fn source(steps: Vec<Result<Answer, LookupError>>) -> (RefreshingSource, IntCounter) {
        let errors = IntCounter::new("errors", "test").expect("valid counter");
        let s = RefreshingSource::spawn(
            Script::new(steps),
            timing(),
            "svc".into(),
            "dns:svc.test:80".into(),
            errors.clone(),
        );
        (s, errors)
    }

    async fn next(rx: &mut watch::Receiver<Resolution>) -> Resolution {
        rx.changed().await.expect("source alive");
        rx.borrow_and_update().clone()
    }

    fn addrs(list: &[&str]) -> Resolution {
        let v: Vec<SocketAddr> = list.iter().filter_map(|a| a.parse().ok()).collect();
        Resolution::Ready(v.into())
    }

    #[test]
    fn ttl_is_clamped() {
        let t = timing();
        assert_eq!(t.refresh_after(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            t.refresh_after(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(
            t.refresh_after(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let t = timing();
        for failures in 1..40 {
            let b = t.backoff(failures);
            assert!(b <= BACKOFF_CAP, "{failures}: {b:?}");
        }
        assert!(t.backoff(1) <= BASE_BACKOFF);
        assert!(t.backoff(30) >= BACKOFF_CAP / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn sorted_set_then_refresh_after_ttl() {
        let (s, _) = source(vec![
            ok(&["10.0.0.2:80", "10.0.0.1:80"], 5),
            ok(&["10.0.0.3:80"], 5),
        ]);
        let mut rx = s.watch();
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        let before = Instant::now();
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.3:80"]));
        assert!(before.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_while_error_then_unavailable() {
        let (s, errors) = source(vec![ok(&["10.0.0.1:80"], 1), nx()]);
        let mut rx = s.watch();
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.1:80"]));
        let start = Instant::now();
        sleep(Duration::from_secs(5)).await;
        assert_eq!(*rx.borrow(), addrs(&["10.0.0.1:80"]), "kept while stale");
        assert!(s.status().stale_since.is_some());
        assert!(errors.get() >= 1);
        match next(&mut rx).await {
            Resolution::Unavailable(reason) => assert!(reason.contains("NXDOMAIN"), "{reason}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        let took = start.elapsed();
        // The failure started about 1 s after `start` (the TTL), so the flip lands at ~31 s.
        assert!(
            took >= Duration::from_secs(29) && took <= Duration::from_secs(32),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_resolved_is_unavailable_then_recovers() {
        let down = Err(LookupError::Resolver {
            name: "svc.test".into(),
            reason: "timed out".into(),
        });
        let (s, _) = source(vec![down.clone(), down, ok(&["10.0.0.9:80"], 5)]);
        let mut rx = s.watch();
        assert!(matches!(next(&mut rx).await, Resolution::Unavailable(_)));
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.9:80"]));
        assert_eq!(s.status().last_error, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_family_is_tolerated_only_if_not_in_use() {
        // v4-only service behind a resolver that never answers AAAA: works.
        let (s, errors) = source(vec![v4_only(&["10.0.0.1:80"], 1)]);
        let mut rx = s.watch();
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.1:80"]));
        assert_eq!(errors.get(), 0);
        drop(s);

        // Dual-stack set, then AAAA fails: the whole set is kept (stale), not halved.
        let (s, errors) = source(vec![
            ok(&["10.0.0.1:80", "[fd00::1]:80"], 1),
            v4_only(&["10.0.0.1:80"], 1),
        ]);
        let mut rx = s.watch();
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.1:80", "[fd00::1]:80"]));
        sleep(Duration::from_secs(3)).await;
        assert_eq!(*rx.borrow(), addrs(&["10.0.0.1:80", "[fd00::1]:80"]));
        assert!(errors.get() >= 1);
        assert!(s.status().stale_since.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_source_stops_the_loop() {
        let (s, _) = source(vec![ok(&["10.0.0.1:80"], 1)]);
        let mut rx = s.watch();
        assert!(matches!(next(&mut rx).await, Resolution::Ready(_)));
        drop(s);
        // The loop owns the sender: when it stops, watchers see the channel close.
        tokio::time::timeout(Duration::from_secs(5), async {
            while rx.changed().await.is_ok() {}
        })
        .await
        .expect("loop stopped");
    }
}
