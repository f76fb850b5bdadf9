//! Choosing an endpoint of a service: power of two choices over a peak-EWMA latency estimate
//! weighted by pending requests (as linkerd2-proxy does), and outlier ejection of endpoints that
//! keep failing — never the last one left.
//!
//! [`Balancer`] follows the service's endpoint watch: endpoints that stay keep their connection
//! pools and statistics; new ones start with a neutral estimate; removed ones are dropped once
//! their in-flight requests end (their pools are `Arc`s held by those requests).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::discovery::Resolution;
use crate::proxy::pool::{EndpointPool, Transport};

/// Decay time of the latency estimate: recent latency dominates within about this long.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint with no measurement yet (a hopeful 1 ms).
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;
/// A failed request counts as at least this slow, so an endpoint that fails fast (connection
/// refused, instant 5xx) does not look attractive to the latency-based choice.
const FAILURE_PENALTY: Duration = Duration::from_millis(500);

/// One endpoint with its pool and load statistics. Lock-free: the estimate and its timestamp
/// are atomics (a racing update may lose one sample, which does not matter for an EWMA).
pub struct Endpoint {
    pub addr: SocketAddr,
    pub pool: EndpointPool,
    pending: AtomicUsize,
    /// Peak-EWMA of response latency: nanoseconds as f64 bits.
    rtt: AtomicU64,
    /// When `rtt` was last updated, nanoseconds since `epoch`.
    rtt_at: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejected until this many nanoseconds after `epoch` (0: not ejected).
    ejected_until: AtomicU64,
    epoch: Instant,
}

impl Endpoint {
    fn new(addr: SocketAddr, transport: Transport) -> Self {
        Self {
            addr,
            pool: EndpointPool::new(addr, transport),
            pending: AtomicUsize::new(0),
            rtt: AtomicU64::new(DEFAULT_RTT_NANOS.to_bits()),
            rtt_at: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The latency estimate decayed to `now`: with no new samples it falls towards zero with
    /// time constant [`EWMA_DECAY`], so an idle endpoint that was once slow gets tried again.
    fn rtt_at(&self, now: Instant) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let at = self.rtt_at.load(Ordering::Relaxed);
        let elapsed = self.since_epoch(now).saturating_sub(at) as f64;
        rtt * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    /// Load score: decayed latency estimate times (pending + 1). Lower is better.
    fn cost(&self, now: Instant) -> f64 {
        self.rtt_at(now) * (self.pending.load(Ordering::Relaxed) as f64 + 1.0)
    }

    fn observe(&self, latency: Duration) {
        let now = Instant::now();
        let sample = latency.as_nanos() as f64;
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let at = self.rtt_at.load(Ordering::Relaxed);
        let now_nanos = self.since_epoch(now);
        // Peak: a slower sample is taken at once; faster ones pull the estimate down slowly.
        let next = if sample > rtt {
            sample
        } else {
            let elapsed = now_nanos.saturating_sub(at) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            rtt * w + sample * (1.0 - w)
        };
        self.rtt.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_at.store(now_nanos, Ordering::Relaxed);
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.since_epoch(now) < until
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The current latency estimate (for tests and diagnostics).
    pub fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(self.rtt_at(Instant::now()) as u64)
    }
}

/// Marks a request in flight on an endpoint; report its outcome with [`InFlight::finish`].
pub struct InFlight {
    pub endpoint: Arc<Endpoint>,
    /// The endpoint set the choice was made from (to never eject the last live endpoint).
    set: Arc<Vec<Arc<Endpoint>>>,
    started: Instant,
    done: bool,
}

impl InFlight {
    /// Records the outcome: latency feeds the estimate (a failure counts as at least
    /// [`FAILURE_PENALTY`]); `outlier.consecutive_failures` failures in a row eject the endpoint
    /// for `outlier.eject_for`, unless no other endpoint of the set is live. Returns true if
    /// this failure ejected the endpoint.
    pub fn finish(mut self, success: bool, outlier: &crate::config::Outlier) -> bool {
        self.done = true;
        let ep = &self.endpoint;
        ep.pending.fetch_sub(1, Ordering::Relaxed);
        let latency = self.started.elapsed();
        if success {
            ep.observe(latency);
            if ep.consecutive_failures.load(Ordering::Relaxed) != 0 {
                ep.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return false;
        }
        ep.observe(latency.max(FAILURE_PENALTY));
        let failures = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures {
            return false;
        }
        ep.consecutive_failures.store(0, Ordering::Relaxed);
        let now = Instant::now();
        let others_live = self
            .set
            .iter()
            .any(|e| !Arc::ptr_eq(e, ep) && !e.is_ejected(now));
        if !others_live {
            return false;
        }
        let until = ep.since_epoch(now + outlier.eject_for).max(1);
        ep.ejected_until.store(until, Ordering::Relaxed);
        tracing::info!(
            endpoint = %ep.addr,
            eject_for_ms = outlier.eject_for.as_millis() as u64,
            "endpoint ejected after consecutive failures"
        );
        true
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoEndpoint {
    #[error("no endpoints: {0}")]
    Unavailable(String),
    #[error("endpoints are still being resolved")]
    Pending,
}

/// The endpoints of one service and the choice among them.
pub struct Balancer {
    transport: Transport,
    resolution: Mutex<watch::Receiver<Resolution>>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    state: ArcSwap<Resolution>,
}

impl Balancer {
    pub fn new(transport: Transport, resolution: watch::Receiver<Resolution>) -> Arc<Self> {
        let balancer = Arc::new(Self {
            transport,
            resolution: Mutex::new(resolution),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            state: ArcSwap::from_pointee(Resolution::Pending),
        });
        balancer.refresh();
        balancer
    }

    /// Applies the latest endpoint set if it changed (cheap when it did not).
    /// Called on every pick: `try_lock` keeps it non-blocking (a request that finds another
    /// one applying an update uses the set in force).
    fn refresh(&self) {
        self.refresh_with(false);
    }

    fn refresh_with(&self, block: bool) {
        let mut rx = match self.resolution.try_lock() {
            Ok(rx) => rx,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if block => {
                self.resolution.lock().unwrap_or_else(|p| p.into_inner())
            }
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if !rx.has_changed().unwrap_or(false) && !matches!(**self.state.load(), Resolution::Pending)
        {
            return;
        }
        let resolution = rx.borrow_and_update().clone();
        drop(rx);
        if let Resolution::Ready(addrs) = &resolution {
            let current = self.endpoints.load();
            let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
                current.iter().map(|e| (e.addr, e)).collect();
            let next: Vec<Arc<Endpoint>> = addrs
                .iter()
                .map(|addr| match by_addr.get(addr) {
                    Some(existing) => Arc::clone(existing),
                    None => Arc::new(Endpoint::new(*addr, self.transport.clone())),
                })
                .collect();
            self.endpoints.store(Arc::new(next));
        } else if matches!(resolution, Resolution::Unavailable(_)) {
            self.endpoints.store(Arc::new(Vec::new()));
        }
        self.state.store(Arc::new(resolution));
    }

    /// Waits (bounded) for the first resolution of a new service.
    pub async fn ready(&self, wait: Duration) {
        if !matches!(**self.state.load(), Resolution::Pending) {
            return;
        }
        let mut rx = self
            .resolution
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let _ =
            tokio::time::timeout(wait, rx.wait_for(|r| !matches!(r, Resolution::Pending))).await;
        self.refresh_with(true);
    }

    /// Picks an endpoint: two distinct live endpoints at random, the cheaper wins. Ejected
    /// endpoints are skipped unless every endpoint is ejected. No allocation.
    pub fn pick(&self) -> Result<InFlight, NoEndpoint> {
        self.refresh();
        let endpoints = self.endpoints.load_full();
        if endpoints.is_empty() {
            return Err(match &**self.state.load() {
                Resolution::Pending => NoEndpoint::Pending,
                Resolution::Unavailable(reason) => NoEndpoint::Unavailable(reason.clone()),
                Resolution::Ready(_) => NoEndpoint::Unavailable("the endpoint set is empty".into()),
            });
        }
        let now = Instant::now();
        let chosen = if endpoints.len() == 1 {
            Arc::clone(&endpoints[0])
        } else {
            let live = endpoints.iter().filter(|e| !e.is_ejected(now)).count();
            // Every endpoint ejected: use them all rather than none.
            let all = live == 0;
            let m = if all { endpoints.len() } else { live };
            let nth = |n: usize| -> &Arc<Endpoint> {
                endpoints
                    .iter()
                    .filter(|e| all || !e.is_ejected(now))
                    .nth(n)
                    .unwrap_or(&endpoints[0])
            };
            if m == 1 {
                Arc::clone(nth(0))
            } else {
                let a = rand::random_range(0..m);
                let mut b = rand::random_range(0..m - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a), nth(b));
                Arc::clone(if a.cost(now) <= b.cost(now) { a } else { b })
            }
        };
        chosen.pending.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            endpoint: chosen,
            set: endpoints,
            started: Instant::now(),
            done: false,
        })
    }

    /// The endpoints in force now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.refresh();
        self.endpoints.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Outlier;

    fn balancer(n: u16) -> (Arc<Balancer>, watch::Sender<Resolution>) {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 10_000 + i)))
            .collect();
        let (tx, rx) = watch::channel(Resolution::Ready(addrs.into()));
        (Balancer::new(Transport::Plain, rx), tx)
    }

    const OUTLIER: Outlier = Outlier {
        consecutive_failures: 2,
        eject_for: Duration::from_secs(60),
    };

    /// A request on a given endpoint (bypassing the choice).
    fn on(b: &Balancer, addr: SocketAddr) -> InFlight {
        let set = b.endpoints();
        let endpoint = set
            .iter()
            .find(|e| e.addr == addr)
            .expect("endpoint")
            .clone();
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint,
            set,
            started: Instant::now(),
            done: false,
        }
    }

    fn fail_on(b: &Balancer, addr: SocketAddr) -> bool {
        on(b, addr).finish(false, &OUTLIER)
    }

    #[test]
    fn ejects_a_failing_endpoint_but_never_the_last() {
        let (b, _tx) = balancer(2);
        let eps = b.endpoints();
        let (a, c) = (eps[0].addr, eps[1].addr);
        assert!(!fail_on(&b, a));
        assert!(fail_on(&b, a), "second consecutive failure ejects");
        for _ in 0..50 {
            assert_eq!(b.pick().expect("pick").endpoint.addr, c, "ejected: skipped");
        }
        // The other endpoint fails too: it is the last live one, so it stays.
        assert!(!fail_on(&b, c));
        assert!(!fail_on(&b, c), "never eject the last live endpoint");
        assert_eq!(b.pick().expect("pick").endpoint.addr, c);
    }

    #[test]
    fn a_failed_endpoint_looks_slow_and_pending_counts() {
        let (b, _tx) = balancer(2);
        let eps = b.endpoints();
        // A fast failure is penalised: the other endpoint wins every P2C comparison.
        let first = b.pick().expect("pick");
        let bad = first.endpoint.addr;
        first.finish(false, &OUTLIER);
        assert!(
            eps.iter()
                .any(|e| e.addr == bad && e.latency_estimate() >= FAILURE_PENALTY / 2)
        );
        for _ in 0..20 {
            let f = b.pick().expect("pick");
            assert_ne!(f.endpoint.addr, bad);
            f.finish(true, &OUTLIER);
        }
        // Requests in flight raise an endpoint's cost.
        let (b, _tx) = balancer(2);
        let held: Vec<InFlight> = (0..2).map(|_| b.pick().expect("pick")).collect();
        let busy = held[0].endpoint.addr;
        let _more: Vec<InFlight> = (0..3)
            .filter_map(|_| {
                let f = b.pick().expect("pick");
                (f.endpoint.addr == busy).then_some(f)
            })
            .collect();
        let pending: Vec<usize> = b.endpoints().iter().map(|e| e.pending()).collect();
        assert!(pending.iter().all(|&p| p >= 1), "{pending:?}: load spreads");
    }

    #[test]
    fn all_ejected_means_all_used() {
        let (b, _tx) = balancer(1);
        for _ in 0..10 {
            let f = b.pick().expect("a single endpoint is always used");
            f.finish(false, &OUTLIER);
        }
        assert!(b.pick().is_ok());
    }
}
