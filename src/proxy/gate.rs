//! The shared rate-limit gate: after a 429 with a wait hint for an upstream
//! key, no request of any user goes to that key before the hinted time.
//!
//! Waiters do not all rush in when the gate opens: each waits the opening
//! time plus its own jitter within `spread_ms`. A request whose deadline
//! ends before the gate opens is answered at once (the caller decides; see
//! [`Gates::check`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Upstream keys tracked at the most; the oldest closed gate is dropped past it.
pub const KEYS_MAX: usize = 16_384;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Turn the gate off (every request goes straight to the upstream).
    pub enabled: bool,
    /// Waiters are released spread uniformly over this window after the
    /// gate opens.
    pub spread_ms: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            spread_ms: 1_000,
        }
    }
}

/// What the gate says about a request that wants to go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateState {
    Open,
    /// Closed until this instant.
    ClosedUntil(Instant),
}

/// The gates of every upstream key of one proxy.
#[derive(Default)]
pub struct Gates {
    closed_until: Mutex<BTreeMap<String, Instant>>,
}

impl Gates {
    /// Keeps `key`'s gate closed until at least `until`.
    pub fn close_until(&self, key: &str, until: Instant) {
        let mut map = self.closed_until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= KEYS_MAX {
            map.retain(|_, at| *at > now);
        }
        if map.len() >= KEYS_MAX && !map.contains_key(key) {
            // Still full of live gates: drop the one that opens first.
            if let Some(first) = map
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&first);
            }
        }
        let at = map.entry(key.to_string()).or_insert(until);
        *at = (*at).max(until);
    }

    /// Whether `key` may be sent to now.
    pub fn check(&self, key: &str) -> GateState {
        let map = self.closed_until.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(at) if *at > Instant::now() => GateState::ClosedUntil(*at),
            _ => GateState::Open,
        }
    }
}

/// How long a waiter sleeps for a gate closed until `until`: the opening
/// plus its share of the spread window.
pub fn wake_at(until: Instant, spread_ms: u64, jitter_draw_ms: u64) -> Instant {
    until + Duration::from_millis(jitter_draw_ms.min(spread_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gate_closes_per_key_and_only_extends() {
        let gates = Gates::default();
        let now = Instant::now();
        assert_eq!(gates.check("k"), GateState::Open);
        gates.close_until("k", now + Duration::from_secs(5));
        gates.close_until("k", now + Duration::from_secs(2));
        assert_eq!(
            gates.check("k"),
            GateState::ClosedUntil(now + Duration::from_secs(5))
        );
        assert_eq!(
            gates.check("other"),
            GateState::Open,
            "gates are per upstream key"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(gates.check("k"), GateState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn gate_memory_is_bounded() {
        let gates = Gates::default();
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..KEYS_MAX + 10 {
            gates.close_until(&format!("k{i}"), later);
        }
        assert!(gates.closed_until.lock().unwrap().len() <= KEYS_MAX);
    }
}
