//! The retry budget: retries may add at most a fixed fraction to the
//! requests a service gets, plus a small floor, over a sliding window
//! (Finagle's and linkerd2-proxy's model). Without one, retries turn a slow
//! backend into an overloaded one. Pure: callers pass the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BudgetConfig {
    /// Retries allowed per original request over the window (0.2 = 20 %).
    pub ratio: f64,
    /// Retries always allowed per second, so a quiet service can retry at all.
    pub min_per_second: u32,
    /// How long requests and retries count.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Counts of requests and retries in one-second slots of the window.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    slots: VecDeque<Slot>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    start: Instant,
    requests: u64,
    retries: u64,
}

const SLOT: Duration = Duration::from_secs(1);

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> RetryBudget {
        RetryBudget {
            config,
            slots: VecDeque::new(),
        }
    }

    /// An original request (not a retry) started.
    pub fn deposit(&mut self, now: Instant) {
        self.slot(now).requests += 1;
    }

    /// Whether one more retry fits; if so it is counted.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.slot(now);
        let (requests, retries) = self
            .slots
            .iter()
            .fold((0u64, 0u64), |(q, r), s| (q + s.requests, r + s.retries));
        let floor = u64::from(self.config.min_per_second) * self.config.window.as_secs().max(1);
        let allowed = floor as f64 + self.config.ratio * requests as f64;
        if (retries as f64) < allowed {
            if let Some(last) = self.slots.back_mut() {
                last.retries += 1;
            }
            true
        } else {
            false
        }
    }

    /// The slot `now` falls in, after forgetting slots older than the window.
    fn slot(&mut self, now: Instant) -> &mut Slot {
        while self
            .slots
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.start) >= self.config.window)
        {
            self.slots.pop_front();
        }
        let fresh = match self.slots.back() {
            Some(s) => now.saturating_duration_since(s.start) >= SLOT,
            None => true,
        };
        if fresh {
            self.slots.push_back(Slot {
                start: now,
                requests: 0,
                retries: 0,
            });
        }
        // Just pushed or checked present.
        self.slots.back_mut().unwrap_or_else(|| unreachable!())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_ratio_plus_the_floor() {
        let t0 = Instant::now();
        let config = BudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        };
        let mut budget = RetryBudget::new(config);
        // A retry storm: 1000 requests, each failing and wanting a retry.
        let mut granted = 0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(i * 5);
            budget.deposit(now);
            if budget.try_withdraw(now) {
                granted += 1;
            }
        }
        // 10 (floor over 10 s) + 20 % of the requests in the window.
        assert!(granted <= 10 + 200, "{granted}");
        assert!(granted >= 200, "{granted}");
    }

    #[test]
    fn an_idle_service_still_gets_the_floor() {
        let t0 = Instant::now();
        let mut budget = RetryBudget::new(BudgetConfig::default());
        let granted = (0..200).filter(|_| budget.try_withdraw(t0)).count();
        assert_eq!(granted, 100);
        assert!(!budget.try_withdraw(t0 + Duration::from_secs(9)));
        // The window slides: old retries stop counting.
        assert!(budget.try_withdraw(t0 + Duration::from_secs(11)));
    }
}
