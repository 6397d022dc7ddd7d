//! The retry budget: per upstream key, shared by all users, retries may be
//! at most `retry_ratio` of the requests seen in the last `window_ms`, plus
//! a small floor, so a struggling upstream is not buried under retries.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Buckets a window is cut into.
const BUCKETS: usize = 10;
/// Upstream keys tracked at the most.
pub const KEYS_MAX: usize = 16_384;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Turn the budget off (retries limited only by the policy).
    pub enabled: bool,
    /// Retries allowed per request in the window.
    pub retry_ratio: f64,
    /// Retries always allowed per window, however few the requests (the
    /// default, 100 per 10 s, lets a few users retry freely; a storm of
    /// failures across many requests is what the ratio stops).
    pub retries_per_window_min: u32,
    pub window_ms: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retry_ratio: 0.5,
            retries_per_window_min: 100,
            window_ms: 10_000,
        }
    }
}

impl BudgetConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.retry_ratio) {
            return Err(format!(
                "budget.retry_ratio = {}: must be within 0.0..=100.0",
                self.retry_ratio
            ));
        }
        if !(BUCKETS as u64..=3_600_000).contains(&self.window_ms) {
            return Err(format!(
                "budget.window_ms = {}: must be within {BUCKETS}..=3600000",
                self.window_ms
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-sized slice of time this counts (since `RetryBudget::base`).
    epoch: u64,
    requests: u32,
    retries: u32,
}

/// The budgets of every upstream key of one proxy.
pub struct RetryBudget {
    cfg: BudgetConfig,
    base: Instant,
    keys: Mutex<BTreeMap<String, [Bucket; BUCKETS]>>,
}

impl RetryBudget {
    pub fn new(cfg: BudgetConfig) -> Self {
        Self {
            cfg,
            base: Instant::now(),
            keys: Mutex::new(BTreeMap::new()),
        }
    }

    fn bucket_ms(&self) -> u64 {
        (self.cfg.window_ms / BUCKETS as u64).max(1)
    }

    fn epoch(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
            / self.bucket_ms()
    }

    /// Reports this budget's parameters (`budget.config`), so the oracle
    /// can judge the retries that reach the upstream against them.
    pub fn announce(&self) {
        crate::events::budget_config(
            self.cfg.enabled,
            self.cfg.retry_ratio,
            self.cfg.retries_per_window_min,
            self.bucket_ms(),
            BUCKETS as u64,
        );
    }

    fn with_buckets<R>(&self, key: &str, f: impl FnOnce(&mut [Bucket; BUCKETS], u64) -> R) -> R {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= KEYS_MAX && !keys.contains_key(key) {
            // Forget the key seen longest ago.
            let stalest = keys
                .iter()
                .min_by_key(|(_, b)| b.iter().map(|x| x.epoch).max().unwrap_or(0))
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                keys.remove(&k);
            }
        }
        let epoch = self.epoch();
        let buckets = keys.entry(key.to_string()).or_default();
        let slot = &mut buckets[(epoch % BUCKETS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        f(buckets, epoch)
    }

    /// Counts a first attempt.
    pub fn on_request(&self, key: &str) {
        self.with_buckets(key, |b, epoch| {
            b[(epoch % BUCKETS as u64) as usize].requests += 1
        });
    }

    /// Takes one retry from the budget; false when none is left.
    pub fn try_retry(&self, key: &str) -> bool {
        self.retry_left(key, true)
    }

    /// Whether a retry is left, without taking it: only
    /// [`Mutant::BudgetNeverCharged`](super::Mutant::BudgetNeverCharged)
    /// asks this instead of [`Self::try_retry`].
    pub fn peek_retry(&self, key: &str) -> bool {
        self.retry_left(key, false)
    }

    fn retry_left(&self, key: &str, charge: bool) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let (ratio, floor) = (self.cfg.retry_ratio, self.cfg.retries_per_window_min);
        self.with_buckets(key, |b, epoch| {
            let live = b
                .iter()
                .filter(|x| epoch.saturating_sub(x.epoch) < BUCKETS as u64);
            let (requests, retries) = live.fold((0u64, 0u64), |(q, r), x| {
                (q + x.requests as u64, r + x.retries as u64)
            });
            let allowed = (floor as f64).max(ratio * requests as f64);
            if (retries as f64) < allowed {
                if charge {
                    b[(epoch % BUCKETS as u64) as usize].retries += 1;
                }
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(ratio: f64, floor: u32) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            enabled: true,
            retry_ratio: ratio,
            retries_per_window_min: floor,
            window_ms: 10_000,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_by_ratio_and_floor() {
        let b = budget(0.2, 3);
        // The floor allows a few retries with no requests at all.
        assert_eq!((0..10).filter(|_| b.try_retry("k")).count(), 3);
        for _ in 0..50 {
            b.on_request("k");
        }
        // 20% of 50 requests = 10 retries in the window, 3 already spent.
        assert_eq!((0..20).filter(|_| b.try_retry("k")).count(), 7);
        assert!(b.try_retry("other-key"), "budgets are per upstream key");
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let b = budget(0.0, 2);
        assert!(b.try_retry("k") && b.try_retry("k"));
        assert!(!b.try_retry("k"));
        tokio::time::advance(Duration::from_millis(10_500)).await;
        assert!(b.try_retry("k"), "spent retries leave the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peek_takes_nothing() {
        let b = budget(0.0, 1);
        assert!((0..5).all(|_| b.peek_retry("k")));
        assert!(b.try_retry("k"));
        assert!(!b.peek_retry("k") && !b.try_retry("k"));
    }

    #[test]
    fn disabled_budget_always_allows() {
        let b = RetryBudget::new(BudgetConfig {
            enabled: false,
            ..BudgetConfig::default()
        });
        assert!((0..1000).all(|_| b.try_retry("k")));
    }
}
