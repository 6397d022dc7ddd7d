//! Per-IP login throttling, as SillyTavern does it: every login attempt
//! from an address counts, a successful login clears the address's record,
//! and past `attempts_max` attempts in `window_ms` the address gets 429 with
//! `Retry-After` until its oldest attempt leaves the window.
//!
//! Memory is bounded: at most `ips_max` addresses are tracked; when the
//! table is full, addresses with no attempt left in the window go first,
//! then the one whose last attempt is oldest. IPv6 addresses are grouped by
//! their /64 (one subscriber's allocation), IPv4-mapped IPv6 counts as IPv4.
//!
//! Time is tokio's, so the throttle runs on simulated time in a world.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Bounds of the login throttle (`[proxy.login]` in a serve config).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoginLimits {
    /// Login attempts one address may make per window (0 turns the throttle off).
    pub attempts_max: u32,
    /// The sliding window the attempts are counted over.
    pub window_ms: u64,
    /// Addresses tracked at once; the least recently active is evicted past it.
    pub ips_max: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            attempts_max: 5,
            window_ms: 60_000,
            ips_max: 10_000,
        }
    }
}

impl LoginLimits {
    /// Checks the values; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.attempts_max > 1_000 {
            return Err("login.attempts_max must be at most 1000".into());
        }
        if !(1..=86_400_000).contains(&self.window_ms) {
            return Err("login.window_ms must be within 1..=86400000 (one day)".into());
        }
        if !(1..=1_000_000).contains(&self.ips_max) {
            return Err("login.ips_max must be within 1..=1000000".into());
        }
        Ok(())
    }
}

/// The throttle: attempt times per address, oldest first.
pub struct LoginThrottle {
    limits: LoginLimits,
    ips: Mutex<BTreeMap<IpAddr, VecDeque<Instant>>>,
}

impl LoginThrottle {
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            ips: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one attempt from `ip` at `now`; `Err(wait)` when the address
    /// is over its limit (the refused attempt is not counted).
    pub fn try_acquire(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let l = &self.limits;
        if l.attempts_max == 0 {
            return Ok(());
        }
        let window = Duration::from_millis(l.window_ms);
        let key = group(ip);
        let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        if !ips.contains_key(&key) && ips.len() >= l.ips_max {
            evict(&mut ips, now, window);
        }
        let times = ips.entry(key).or_default();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            times.pop_front();
        }
        if times.len() >= l.attempts_max as usize {
            let oldest = times.front().copied().unwrap_or(now);
            return Err((oldest + window).saturating_duration_since(now));
        }
        times.push_back(now);
        debug_assert!(ips.len() <= l.ips_max);
        Ok(())
    }

    /// A successful login: the address starts afresh.
    pub fn forget(&self, ip: IpAddr) {
        self.ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group(ip));
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.ips.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Makes room for one address: drops every address with no attempt left in
/// the window, and if none had expired, the least recently active one.
fn evict(ips: &mut BTreeMap<IpAddr, VecDeque<Instant>>, now: Instant, window: Duration) {
    let before = ips.len();
    ips.retain(|_, times| {
        times
            .back()
            .is_some_and(|t| now.saturating_duration_since(*t) < window)
    });
    if ips.len() < before {
        return;
    }
    let oldest = ips
        .iter()
        .min_by_key(|(_, times)| times.back().copied())
        .map(|(ip, _)| *ip);
    if let Some(ip) = oldest {
        ips.remove(&ip);
    }
}

/// The key an address is counted under.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn throttle(attempts_max: u32, ips_max: usize) -> LoginThrottle {
        LoginThrottle::new(LoginLimits {
            attempts_max,
            window_ms: 60_000,
            ips_max,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn five_a_minute_then_retry_after_until_the_oldest_leaves() {
        let t = throttle(5, 100);
        let a = ip("10.0.0.1");
        for _ in 0..5 {
            assert!(t.try_acquire(a, Instant::now()).is_ok());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 5 s after the first attempt: 55 s to wait.
        let wait = t.try_acquire(a, Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_secs(55));
        // Another address is not affected.
        assert!(t.try_acquire(ip("10.0.0.2"), Instant::now()).is_ok());
        tokio::time::advance(wait).await;
        assert!(t.try_acquire(a, Instant::now()).is_ok(), "the oldest left");
        assert!(t.try_acquire(a, Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn success_clears_the_address() {
        let t = throttle(2, 100);
        let a = ip("10.0.0.1");
        t.try_acquire(a, Instant::now()).unwrap();
        t.try_acquire(a, Instant::now()).unwrap();
        assert!(t.try_acquire(a, Instant::now()).is_err());
        t.forget(a);
        assert!(t.try_acquire(a, Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn table_is_bounded_and_evicts_the_least_recently_active() {
        let t = throttle(1, 3);
        for i in 1..=3 {
            t.try_acquire(ip(&format!("10.0.0.{i}")), Instant::now())
                .unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Full of active addresses: 10.0.0.1 (oldest) makes room.
        t.try_acquire(ip("10.0.0.4"), Instant::now()).unwrap();
        assert_eq!(t.len(), 3);
        assert!(
            t.try_acquire(ip("10.0.0.1"), Instant::now()).is_ok(),
            "evicted, so counted afresh"
        );
        assert!(t.try_acquire(ip("10.0.0.4"), Instant::now()).is_err());
        // After the window every entry is stale and goes at once.
        tokio::time::advance(Duration::from_secs(61)).await;
        t.try_acquire(ip("10.0.0.9"), Instant::now()).unwrap();
        assert_eq!(t.len(), 1);
        for i in 0..1000 {
            let _ = t.try_acquire(ip(&format!("10.1.{}.{}", i / 256, i % 256)), Instant::now());
            assert!(t.len() <= 3);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let t = throttle(1, 100);
        t.try_acquire(ip("2001:db8:1:2::1"), Instant::now())
            .unwrap();
        assert!(
            t.try_acquire(ip("2001:db8:1:2:ffff::9"), Instant::now())
                .is_err()
        );
        assert!(t.try_acquire(ip("2001:db8:1:3::1"), Instant::now()).is_ok());
        t.try_acquire(ip("192.0.2.7"), Instant::now()).unwrap();
        assert!(
            t.try_acquire(ip("::ffff:192.0.2.7"), Instant::now())
                .is_err()
        );
    }

    #[test]
    fn zero_attempts_turns_it_off_and_validation_names_fields() {
        let t = throttle(0, 1);
        for _ in 0..100 {
            assert!(t.try_acquire(ip("10.0.0.1"), Instant::now()).is_ok());
        }
        assert!(t.is_empty());
        let bad = LoginLimits {
            window_ms: 0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("window_ms"));
        assert!(LoginLimits::default().validate().is_ok());
    }
}
