//! Measurements of the faithful SillyTavern variants, counted over every
//! event of many worlds (the oracle reports each invariant once per world;
//! these count every occurrence).
//!
//! # Brief overview
//! - [`touches`]: against `sillytavern-1.12.6`, per world: refreshes, how
//!   many of the refreshed requests had their released state touched
//!   (`req.stale` or `client.write` after `req.release`), and how long
//!   their detached retry timers (`task.spawn`/`task.end` of a
//!   `retry_timer`) outlived the client (`tab.abandon`), and how many timers
//!   were armed after it left (`retry.armed`).
//! - [`crash`]: against `sillytavern-1.12.7`, per world: whether the proxy
//!   died, and how many requests of other users were in flight then.
//! - [`measure_1126`], [`measure_1127`]: both over seeds of each scenario.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::campaign::{NamedScenario, map_worlds};
use super::trace::Event;
use crate::proxy::Variant;

/// What one 1.12.6 world shows about refreshes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Touches {
    /// `tab.abandon` events (a refresh with a request pending).
    pub refreshes: u64,
    /// Refreshed requests the proxy had admitted.
    pub admitted: u64,
    /// Refreshed requests whose released state was touched afterwards.
    pub touched: u64,
    /// Per refreshed request whose retry timer outlived its client: how
    /// long (ms), to the end of the last such timer (its retry included).
    pub outlived_ms: Vec<u64>,
    /// Retry timers armed after the client had left.
    pub armed_after_leave: u64,
}

/// Counts the refreshes of one world and what happened to their requests.
pub fn touches(events: &[Event]) -> Touches {
    let mut key_of: BTreeMap<&str, u64> = BTreeMap::new();
    let mut released_at: BTreeMap<u64, u64> = BTreeMap::new();
    let mut touched: BTreeSet<u64> = BTreeSet::new();
    let mut last_task_end: BTreeMap<u64, u64> = BTreeMap::new();
    let mut armed: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut left: Vec<(&str, u64)> = Vec::new();
    for e in events {
        let key = e.u64("key");
        match e.kind.as_str() {
            "req.admit" => {
                key_of.insert(e.str("fp"), key);
            }
            "req.release" => {
                released_at.insert(key, e.t_us);
            }
            "req.stale" | "client.write" if released_at.contains_key(&key) => {
                touched.insert(key);
            }
            "task.end" if e.str("what") == "retry_timer" => {
                last_task_end.insert(key, e.t_us);
            }
            "retry.armed" => armed.entry(key).or_default().push(e.t_us),
            "tab.abandon" => left.push((e.str("fp"), e.t_us)),
            _ => {}
        }
    }
    let mut out = Touches {
        refreshes: left.len() as u64,
        ..Touches::default()
    };
    for (fp, t_left) in left {
        let Some(&key) = key_of.get(fp) else {
            continue;
        };
        out.admitted += 1;
        out.touched += u64::from(touched.contains(&key));
        if let Some(&end) = last_task_end.get(&key)
            && end > t_left
        {
            out.outlived_ms.push((end - t_left) / 1000);
        }
        out.armed_after_leave += armed
            .get(&key)
            .map_or(0, |ts| ts.iter().filter(|&&t| t > t_left).count() as u64);
    }
    out
}

/// What one 1.12.7 world shows about a crash.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Crash {
    pub died: bool,
    /// Requests in flight when the proxy died, all users.
    pub in_flight: u64,
    /// ...of them, requests of users other than the one whose late timer
    /// killed the proxy.
    pub others: u64,
    /// How many other users those belonged to.
    pub other_users: u64,
}

/// Whether the proxy of one world died, and whom it took with it.
pub fn crash(events: &[Event]) -> Crash {
    let mut live: BTreeMap<u64, &str> = BTreeMap::new();
    for e in events {
        let key = e.u64("key");
        match e.kind.as_str() {
            "req.admit" => {
                live.insert(key, e.str("user"));
            }
            "req.release" => {
                live.remove(&key);
            }
            "proxy.exit" => {
                // The culprit's request was released when its client left.
                let culprit = owner_of(events, key);
                let others: Vec<&str> = live.values().copied().filter(|u| *u != culprit).collect();
                let users: BTreeSet<&str> = others.iter().copied().collect();
                return Crash {
                    died: true,
                    in_flight: live.len() as u64,
                    others: others.len() as u64,
                    other_users: users.len() as u64,
                };
            }
            "world.proxy_crash" => {
                return Crash {
                    died: true,
                    in_flight: live.len() as u64,
                    others: live.len() as u64,
                    other_users: live.values().collect::<BTreeSet<_>>().len() as u64,
                };
            }
            _ => {}
        }
    }
    Crash::default()
}

fn owner_of(events: &[Event], key: u64) -> &str {
    events
        .iter()
        .find(|e| e.kind == "req.admit" && e.u64("key") == key)
        .map_or("", |e| e.str("user"))
}

/// 1.12.6 over one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Touched {
    pub scenario: String,
    pub seeds: u64,
    pub refreshes: u64,
    pub admitted: u64,
    pub touched: u64,
    /// Refreshes whose released request state was touched, per thousand.
    pub touched_per_thousand_refreshes: f64,
    /// ...per thousand refreshes of requests the proxy had admitted.
    pub touched_per_thousand_admitted: f64,
    /// Refreshed requests whose retry timer outlived the client.
    pub outliving: u64,
    pub outlived_s_median: f64,
    pub outlived_s_p90: f64,
    pub outlived_s_max: f64,
    /// Retry timers armed after the client had left.
    pub timers_armed_after_leave: u64,
}

/// 1.12.7 over one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Died {
    pub scenario: String,
    pub seeds: u64,
    pub died: u64,
    pub died_share: f64,
    /// Other users' requests that died with the proxy, over all crashes.
    pub other_requests: u64,
    pub other_requests_mean: f64,
    pub other_requests_max: u64,
    pub other_users_mean: f64,
}

fn quantile_s(sorted_ms: &[u64], q: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ms.len() - 1) as f64 * q).round() as usize;
    sorted_ms[i] as f64 / 1000.0
}

/// `sillytavern-1.12.6` over `seeds` seeds of each scenario.
pub fn measure_1126(scenarios: &[NamedScenario], seeds: u64, jobs: usize) -> Vec<Touched> {
    let runs = map_worlds(
        scenarios,
        Variant::SillyTavern1126,
        seeds,
        jobs,
        &|_, _, r| touches(&r.events),
    );
    scenarios
        .iter()
        .zip(runs.chunks(seeds.max(1) as usize))
        .map(|(named, worlds)| {
            let mut outlived: Vec<u64> =
                worlds.iter().flat_map(|t| t.outlived_ms.clone()).collect();
            outlived.sort_unstable();
            let sum = |f: fn(&Touches) -> u64| worlds.iter().map(f).sum::<u64>();
            let (refreshes, touched) = (sum(|t| t.refreshes), sum(|t| t.touched));
            let admitted = sum(|t| t.admitted);
            let per_thousand = |n: u64| {
                if n == 0 {
                    0.0
                } else {
                    touched as f64 * 1000.0 / n as f64
                }
            };
            Touched {
                scenario: named.scenario.name.clone(),
                seeds: worlds.len() as u64,
                refreshes,
                admitted,
                touched,
                touched_per_thousand_refreshes: per_thousand(refreshes),
                touched_per_thousand_admitted: per_thousand(admitted),
                outliving: outlived.len() as u64,
                outlived_s_median: quantile_s(&outlived, 0.5),
                outlived_s_p90: quantile_s(&outlived, 0.9),
                outlived_s_max: quantile_s(&outlived, 1.0),
                timers_armed_after_leave: sum(|t| t.armed_after_leave),
            }
        })
        .collect()
}

/// `sillytavern-1.12.7` over `seeds` seeds of each scenario.
pub fn measure_1127(scenarios: &[NamedScenario], seeds: u64, jobs: usize) -> Vec<Died> {
    let runs = map_worlds(
        scenarios,
        Variant::SillyTavern1127,
        seeds,
        jobs,
        &|_, _, r| crash(&r.events),
    );
    scenarios
        .iter()
        .zip(runs.chunks(seeds.max(1) as usize))
        .map(|(named, worlds)| {
            let crashes: Vec<&Crash> = worlds.iter().filter(|c| c.died).collect();
            let n = crashes.len() as u64;
            let other_requests: u64 = crashes.iter().map(|c| c.others).sum();
            let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
            Died {
                scenario: named.scenario.name.clone(),
                seeds: worlds.len() as u64,
                died: n,
                died_share: n as f64 / worlds.len().max(1) as f64,
                other_requests,
                other_requests_mean: per(other_requests),
                other_requests_max: crashes.iter().map(|c| c.others).max().unwrap_or(0),
                other_users_mean: per(crashes.iter().map(|c| c.other_users).sum()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(t_ms: u64, kind: &str, fields: serde_json::Value) -> Event {
        Event {
            t_us: t_ms * 1000,
            host: String::new(),
            kind: kind.into(),
            fields: fields
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn a_refreshed_request_touched_after_release_and_its_timer_are_counted() {
        let events = vec![
            ev(0, "req.admit", json!({"key": 1, "user": "a", "fp": "f1"})),
            ev(0, "req.admit", json!({"key": 2, "user": "b", "fp": "f2"})),
            ev(5, "task.spawn", json!({"key": 1, "what": "retry_timer"})),
            ev(10, "tab.abandon", json!({"fp": "f1"})),
            ev(11, "req.release", json!({"key": 1})),
            ev(20, "tab.abandon", json!({"fp": "f3"})),
            ev(5_010, "retry.armed", json!({"key": 1, "wait_ms": 10_000})),
            ev(15_010, "req.stale", json!({"key": 1, "op": "x"})),
            ev(15_010, "task.end", json!({"key": 1, "what": "retry_timer"})),
            ev(15_020, "client.write", json!({"key": 2, "what": "end"})),
        ];
        let t = touches(&events);
        assert_eq!(
            t,
            Touches {
                refreshes: 2,
                admitted: 1,
                touched: 1,
                outlived_ms: vec![15_000],
                armed_after_leave: 1,
            }
        );
    }

    #[test]
    fn a_crash_counts_the_other_users_requests_in_flight() {
        let events = vec![
            ev(0, "req.admit", json!({"key": 1, "user": "a", "fp": "f1"})),
            ev(0, "req.admit", json!({"key": 2, "user": "b", "fp": "f2"})),
            ev(0, "req.admit", json!({"key": 3, "user": "c", "fp": "f3"})),
            ev(0, "req.admit", json!({"key": 4, "user": "a", "fp": "f4"})),
            ev(1, "req.release", json!({"key": 1})),
            ev(2, "proxy.exit", json!({"key": 1, "reason": "AbortError"})),
        ];
        assert_eq!(
            crash(&events),
            Crash {
                died: true,
                in_flight: 3,
                others: 2,
                other_users: 2
            }
        );
        assert!(!crash(&events[..5]).died);
    }
}
