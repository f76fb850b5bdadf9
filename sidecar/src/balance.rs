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

/// One endpoint with its pool and load statistics.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub pool: EndpointPool,
    pending: AtomicUsize,
    /// Peak-EWMA of response latency, nanoseconds (f64 bits), and when it was last updated.
    rtt: Mutex<(f64, Instant)>,
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
            rtt: Mutex::new((DEFAULT_RTT_NANOS, Instant::now())),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Load score: latency estimate times (pending + 1). Lower is better.
    fn cost(&self, now: Instant) -> f64 {
        let _ = now;
        let (rtt, _) = *self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        rtt * (self.pending.load(Ordering::Relaxed) as f64 + 1.0)
    }

    fn observe(&self, latency: Duration) {
        let now = Instant::now();
        let sample = latency.as_nanos() as f64;
        let mut guard = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let (rtt, at) = *guard;
        // Peak: a slower sample is taken at once; faster ones pull the estimate down slowly.
        let next = if sample > rtt {
            sample
        } else {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            let w = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
            rtt * w + sample * (1.0 - w)
        };
        *guard = (next, now);
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && (now.saturating_duration_since(self.epoch).as_nanos() as u64) < until
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// Marks a request in flight on an endpoint; report its outcome with [`InFlight::finish`].
pub struct InFlight {
    pub endpoint: Arc<Endpoint>,
    started: Instant,
    done: bool,
}

impl InFlight {
    /// Records the outcome: latency feeds the estimate; failures count towards ejection.
    /// Returns true if this failure ejected the endpoint.
    pub fn finish(mut self, success: bool, outlier: &crate::config::Outlier) -> bool {
        self.done = true;
        let ep = &self.endpoint;
        ep.pending.fetch_sub(1, Ordering::Relaxed);
        ep.observe(self.started.elapsed());
        if success {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        let failures = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= outlier.consecutive_failures {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
            let until = Instant::now() + outlier.eject_for;
            ep.ejected_until.store(
                until.saturating_duration_since(ep.epoch).as_nanos() as u64,
                Ordering::Relaxed,
            );
            return true;
        }
        false
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
    fn refresh(&self) {
        let mut rx = self.resolution.lock().unwrap_or_else(|p| p.into_inner());
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
        self.refresh();
    }

    /// Picks an endpoint: two at random, the cheaper wins; ejected endpoints are skipped unless
    /// every endpoint is ejected.
    pub fn pick(&self) -> Result<InFlight, NoEndpoint> {
        self.refresh();
        let endpoints = self.endpoints.load();
        if endpoints.is_empty() {
            return Err(match &**self.state.load() {
                Resolution::Pending => NoEndpoint::Pending,
                Resolution::Unavailable(reason) => NoEndpoint::Unavailable(reason.clone()),
                Resolution::Ready(_) => NoEndpoint::Unavailable("the endpoint set is empty".into()),
            });
        }
        let now = Instant::now();
        let chosen = match endpoints.len() {
            1 => &endpoints[0],
            _ => {
                let live: Vec<&Arc<Endpoint>> =
                    endpoints.iter().filter(|e| !e.is_ejected(now)).collect();
                let pool: Vec<&Arc<Endpoint>> = if live.is_empty() {
                    endpoints.iter().collect()
                } else {
                    live
                };
                let m = pool.len();
                if m == 1 {
                    pool[0]
                } else {
                    let a = rand::random_range(0..m);
                    let mut b = rand::random_range(0..m - 1);
                    if b >= a {
                        b += 1;
                    }
                    if pool[a].cost(now) <= pool[b].cost(now) {
                        pool[a]
                    } else {
                        pool[b]
                    }
                }
            }
        };
        chosen.pending.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            endpoint: Arc::clone(chosen),
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
