//! The retry budget of one service (Finagle's and Linkerd's design): every original request
//! deposits `ratio` of a token, every retry withdraws one, and `min_per_second` tokens per second
//! are always available on top, so a service with little traffic can still retry. Deposits and
//! withdrawals expire after [`WINDOW`], so the budget follows the recent request rate and retries
//! can never multiply the load in an outage: at most `1 + ratio` sends per request on average
//! (plus the small reserve).
//!
//! Lock-free: ten one-second slots of atomics, reused in turn. Concurrent callers may overshoot
//! by a retry or two at a slot boundary, which is harmless.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config;

/// How far back deposits and withdrawals count.
pub const WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;
/// Fixed-point scale: amounts are kept in thousandths of a token.
const MILLI: u64 = 1000;

struct Slot {
    /// The second (since the budget's start) this slot counts; `u64::MAX` for never.
    second: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

pub struct RetryBudget {
    params: config::RetryBudget,
    /// Milli-tokens one deposit earns.
    deposit: u64,
    /// Milli-tokens always available over the window.
    reserve: u64,
    start: Instant,
    slots: [Slot; SLOTS],
}

impl RetryBudget {
    pub fn new(params: config::RetryBudget) -> Self {
        let deposit = (params.ratio.max(0.0) * MILLI as f64).round() as u64;
        let reserve = u64::from(params.min_per_second) * WINDOW.as_secs() * MILLI;
        Self {
            params,
            deposit,
            reserve,
            start: Instant::now(),
            slots: std::array::from_fn(|_| Slot {
                second: AtomicU64::new(u64::MAX),
                deposits: AtomicU64::new(0),
                withdrawals: AtomicU64::new(0),
            }),
        }
    }

    pub fn params(&self) -> config::RetryBudget {
        self.params
    }

    fn now_second(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// The slot for `second`, cleared if it last counted an older second.
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.deposits.store(0, Ordering::Release);
            slot.withdrawals.store(0, Ordering::Release);
        }
        slot
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        self.slot(self.now_second())
            .deposits
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        let now = self.now_second();
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for slot in &self.slots {
            let second = slot.second.load(Ordering::Acquire);
            if second != u64::MAX && second <= now && now - second < SLOTS as u64 {
                deposits += slot.deposits.load(Ordering::Acquire);
                withdrawals += slot.withdrawals.load(Ordering::Acquire);
            }
        }
        let earned = deposits
            .saturating_mul(self.deposit)
            .saturating_add(self.reserve);
        if (withdrawals + 1).saturating_mul(MILLI) > earned {
            return false;
        }
        self.slot(now).withdrawals.fetch_add(1, Ordering::AcqRel);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(config::RetryBudget {
            ratio,
            min_per_second,
        })
    }

    #[test]
    fn ratio_limits_retries() {
        let b = budget(0.2, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn reserve_allows_retries_without_traffic() {
        let b = budget(0.0, 2);
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20, "2/s over a 10 s window");
    }

    #[test]
    fn interleaved_stream_of_failures_stays_near_ratio() {
        let b = budget(0.5, 0);
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit();
            // each request would like two retries
            granted += usize::from(b.withdraw());
            granted += usize::from(b.withdraw());
        }
        assert!((495..=500).contains(&granted), "{granted}");
    }
}
