//! The oracle: invariants checked over one world's events.
//!
//! Architecture Invariant: the oracle reads only the trace
//! ([`super::trace::Event`]), never the proxy's memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use super::trace::{Event, Live};

/// Every invariant, by the name reports use.
pub const INVARIANTS: &[&str] = &[
    "stale-access",
    "write-after-release",
    "double-terminal",
    "attempt-after-cancel",
    "wrong-cancel",
    "retry-after-bytes",
    "cross-user-delivery",
    "proxy-crash",
    "leak",
    "retry-after-violated",
    "gate-violated",
    "budget-exceeded",
    "starvation",
    "liveness",
];

/// One broken invariant.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Violation {
    pub invariant: &'static str,
    pub message: String,
    /// Simulated time of the first event that broke it.
    pub t_us: u64,
    /// How many events broke it in this world.
    pub count: u64,
}

/// How a world ended, as the oracle needs to know it.
#[derive(Clone, Copy, Debug)]
pub struct Ending {
    /// The proxy host was taken down.
    pub crashed: bool,
    /// Live counts when the world stopped.
    pub live: Live,
    /// The world reached quiescence (or crashed) before its time bound.
    pub quiescent: bool,
    /// The harness stopped the world early (its own failure): the end
    /// state says nothing about the proxy.
    pub cut_short: bool,
    /// Judged from outside (the probe): no proxy events exist, so a hinted
    /// 429 binds from the moment the mock sent it.
    pub outside: bool,
}

/// How long after a cause an effect may still arrive, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Grace {
    /// One message across the simulated network, tick included: an attempt
    /// sent just before its request was released may arrive this much later.
    pub network_us: u64,
    /// From a client leaving to the proxy noticing and stopping everything
    /// for that request.
    pub client_gone_us: u64,
}

impl Grace {
    pub fn of(w: &super::scenario::WorldParams) -> Self {
        let network_ms = w.latency_ms_max.saturating_add(w.tick_ms.saturating_mul(2));
        Self {
            network_us: network_ms.saturating_mul(1000),
            // Never less than two round trips: the close must reach the
            // proxy, and an attempt in flight must reach the upstream.
            client_gone_us: w
                .cancel_grace_ms
                .max(network_ms.saturating_mul(4))
                .saturating_mul(1000),
        }
    }
}

#[derive(Default)]
struct Walk {
    /// key -> (user, fingerprint) for every admitted request.
    admitted: BTreeMap<u64, (String, String)>,
    released: BTreeSet<u64>,
    /// key -> (time, what) of the first terminal answer written to its client.
    answered: BTreeMap<u64, (u64, String)>,
    /// fingerprint -> time its client left (a tab refresh).
    abandoned_at: BTreeMap<String, u64>,
    /// fingerprint -> time the proxy released or cancelled its request.
    stopped_at: BTreeMap<String, u64>,
    /// keys released or cancelled (no attempt may start for them).
    stopped_keys: BTreeSet<u64>,
    /// fingerprint -> user who sent it.
    owner: BTreeMap<String, String>,
    /// fingerprints of requests whose tab logged out while waiting.
    logged_out: BTreeSet<String>,
    /// fingerprint -> (key, time, what) of the first write to its client.
    wrote: BTreeMap<String, (u64, u64, String)>,
    /// fingerprint -> user, for requests whose tab still waits for an end.
    waiting: BTreeMap<String, String>,
    /// fingerprint -> end of the wait its last 429 hinted (as the mock sent it).
    hint_sent: BTreeMap<String, u64>,
    /// fingerprint -> (when the proxy read its hinted 429, end of the wait).
    hinted: BTreeMap<String, (u64, u64)>,
    /// The latest hinted 429 for the (one) upstream key: (sent at, wait end).
    gate: Option<(u64, u64)>,
    /// The retry budget the proxy announced (`budget.config`); none or
    /// disabled: `budget-exceeded` is not judged.
    budget: Option<BudgetSpec>,
    /// When each request was admitted: the requests a budget's ratio counts.
    admitted_at: Vec<u64>,
    /// fingerprint -> key (one request per fingerprint: every send carries
    /// a fresh nonce).
    key_of: BTreeMap<String, u64>,
    /// key -> when the proxy decided each retry not yet seen at the upstream.
    retry_decided: BTreeMap<u64, VecDeque<u64>>,
    /// Retries that reached the upstream, dated when the proxy decided them.
    retries: Vec<Retry>,
    /// user -> (answers waited for to the end, completions among them).
    served: BTreeMap<String, (u64, u64)>,
    /// Cancellations the proxy made: (key, when, its reason).
    cancels: Vec<(u64, u64, String)>,
    /// (user, tab, when) of every logout a tab sent.
    logouts: Vec<(String, u64, u64)>,
    /// (user, when) of every administrator's disable or delete.
    admin_acts: Vec<(String, u64)>,
    /// fingerprint -> (user, tab) that sent it.
    tab_of_fp: BTreeMap<String, (String, u64)>,
    /// key -> the session its request came in.
    session_of_key: BTreeMap<u64, u64>,
    /// (user, tab) -> the sessions its requests came in.
    sessions_of_tab: BTreeMap<(String, u64), BTreeSet<u64>>,
    /// Holds on the proxy-upstream link: (start, end); and the one going on.
    holds: Vec<(u64, u64)>,
    hold_since: Option<u64>,
    /// Requests a restarted proxy never released.
    leaked_in_restart: Vec<u64>,
    /// Users an administrator disabled or deleted: no longer served.
    removed_users: BTreeSet<String>,
    /// fingerprint -> when its tab gave up waiting (its request timeout).
    gave_up: BTreeMap<String, u64>,
    found: BTreeMap<&'static str, Violation>,
}

/// A retry budget as `budget.config` states it, in microseconds.
#[derive(Clone, Copy, Debug)]
struct BudgetSpec {
    ratio: f64,
    floor: u64,
    /// The budget always remembers a retry for at least this long...
    remembers_us_min: u64,
    /// ...and never counts a request for longer than this.
    remembers_us_max: u64,
}

/// A retry seen at the upstream.
#[derive(Clone, Debug)]
struct Retry {
    /// When the proxy decided it (when the budget was asked), or when it
    /// reached the upstream if the proxy never said.
    decided: u64,
    arrived: u64,
    fp: String,
    attempt: u64,
}

impl Walk {
    /// The earliest moment a message that reached the upstream at `t` may
    /// have left: `t`, or the start of a hold on the link that was released
    /// just before (a held message arrives late, sent any time in the hold).
    fn sent_by(&self, t: u64, network_us: u64) -> u64 {
        self.holds
            .iter()
            .rev()
            .find(|(_, end)| *end <= t && t <= end.saturating_add(network_us))
            .map_or(t, |(start, _)| *start)
    }

    fn report(&mut self, invariant: &'static str, t_us: u64, message: impl FnOnce() -> String) {
        self.found
            .entry(invariant)
            .and_modify(|v| v.count += 1)
            .or_insert_with(|| Violation {
                invariant,
                message: message(),
                t_us,
                count: 1,
            });
    }

    fn user_of(&self, key: u64) -> &str {
        self.admitted
            .get(&key)
            .map(|(u, _)| u.as_str())
            .unwrap_or("?")
    }
}

/// Checks every invariant; returns the violations in [`INVARIANTS`] order.
///
/// `grace_us` is the simulated network's round trip: an upstream attempt
/// that arrives within it of a cause (a client leaving, a hinted 429) may
/// have been sent before the proxy could know.
pub fn check(events: &[Event], ending: &Ending, grace: &Grace) -> Vec<Violation> {
    let mut w = Walk::default();
    for e in events {
        step(&mut w, e, grace);
        step_cancels(&mut w, e);
        step_bytes(&mut w, e, grace);
        step_rates(&mut w, e, grace.client_gone_us, ending.outside);
        step_budget(&mut w, e);
    }
    // What reached the upstream before a crash or a cut still counts.
    check_budget(&mut w);
    check_cancels(&mut w);
    let t_end = events.last().map(|e| e.t_us).unwrap_or(0);
    if !ending.crashed && !ending.cut_short {
        check_leak(&mut w, ending, t_end);
        check_starvation(&mut w, t_end);
    }
    INVARIANTS
        .iter()
        .filter_map(|name| w.found.remove(name))
        .collect()
}

fn step(w: &mut Walk, e: &Event, grace: &Grace) {
    if e.kind == "world.link" {
        match (e.bool("held") && !e.bool("partitioned"), w.hold_since) {
            (true, None) => w.hold_since = Some(e.t_us),
            (false, Some(since)) => {
                w.holds.push((since, e.t_us));
                w.hold_since = None;
            }
            _ => {}
        }
        return;
    }
    if e.kind == "world.restart" && !e.bool("up") {
        restarted(w, e.t_us);
        return;
    }
    if matches!(
        e.kind.as_str(),
        "tab.recv" | "tab.abandon" | "tab.io_error" | "tab.timeout"
    ) {
        w.waiting.remove(e.str("fp"));
    }
    let t = e.t_us;
    match e.kind.as_str() {
        "req.admit" => {
            w.admitted.insert(
                e.u64("key"),
                (e.str("user").to_string(), e.str("fp").to_string()),
            );
        }
        "req.release" | "req.cancel" => {
            let key = e.u64("key");
            if e.kind == "req.release" {
                w.released.insert(key);
            }
            w.stopped_keys.insert(key);
            if let Some((_, fp)) = w.admitted.get(&key) {
                w.stopped_at.entry(fp.clone()).or_insert(t);
            }
        }
        "attempt.start" if w.stopped_keys.contains(&e.u64("key")) => {
            let (key, n) = (e.u64("key"), e.u64("attempt"));
            let user = w.user_of(key).to_string();
            w.report("attempt-after-cancel", t, || {
                format!("the proxy started attempt {n} of request {key:#x} (user {user}) at {}, after the request was cancelled or released", secs(t))
            });
        }
        "req.stale" => {
            let (key, op) = (e.u64("key"), e.str("op").to_string());
            let user = w.user_of(key).to_string();
            w.report("stale-access", t, || {
                format!(
                    "request {key:#x} of user {user} was used after its release ({op}) at {}",
                    secs(t)
                )
            });
        }
        "client.write" => {
            let key = e.u64("key");
            if w.released.contains(&key) {
                let (user, what) = (w.user_of(key).to_string(), e.str("what").to_string());
                w.report("write-after-release", t, || {
                    format!("the proxy wrote '{what}' to the client of request {key:#x} (user {user}) after the request was released, at {}", secs(t))
                });
            }
            step_terminal(w, e);
        }
        "tab.send" => {
            w.waiting
                .insert(e.str("fp").to_string(), e.str("user").to_string());
            w.owner
                .insert(e.str("fp").to_string(), e.str("user").to_string());
        }
        "tab.timeout" => {
            let (user, fp) = (e.str("user").to_string(), e.str("fp").to_string());
            w.report("liveness", t, || format!("tab {} of {user} got no answer to generation {fp} before its request timeout (at {})", e.u64("tab"), secs(t)));
        }
        // A logout ends that session's requests as surely as a refresh ends
        // the tab's: judged from the client's side, not from what the proxy
        // says it cancelled.
        "tab.logout" if e.u64("status") == 200 => {
            w.abandoned_at.entry(e.str("fp").to_string()).or_insert(t);
            w.logged_out.insert(e.str("fp").to_string());
        }
        "tab.abandon" => {
            w.abandoned_at.entry(e.str("fp").to_string()).or_insert(t);
        }
        "upstream.attempt" => {
            let fp = e.str("fp");
            let sent = w.sent_by(t, grace.network_us);
            let late = |at: Option<&u64>, grace_us: u64| {
                at.copied().filter(|&c| sent > c.saturating_add(grace_us))
            };
            let cause = late(w.stopped_at.get(fp), grace.network_us)
                .map(|c| (c, "the proxy released or cancelled its request"))
                .or_else(|| {
                    late(w.abandoned_at.get(fp), grace.client_gone_us)
                        .map(|c| (c, "its client left"))
                });
            if let Some((c, why)) = cause {
                let n = e.u64("attempt");
                w.report("attempt-after-cancel", t, || {
                    format!("the upstream received attempt {n} of generation {fp} at {}, {} after {why}", secs(t), secs(t - c))
                });
            }
        }
        "tab.recv" => {
            let (fp, got) = (e.str("fp"), e.str("got"));
            if !got.is_empty() && got != fp {
                let me = e.str("user").to_string();
                let whose = w.owner.get(got).cloned().unwrap_or_else(|| "nobody".into());
                w.report("cross-user-delivery", t, || {
                    format!("tab {} of {me} received the answer to generation {got} (sent by {whose}) instead of its own {fp}", e.u64("tab"))
                });
            }
        }
        "proxy.exit" => {
            let key = e.u64("key");
            let reason = e.str("reason").to_string();
            let culprit = w.user_of(key).to_string();
            let in_flight: Vec<&String> = w
                .admitted
                .iter()
                .filter(|(k, _)| !w.released.contains(k))
                .map(|(_, (u, _))| u)
                .collect();
            let others: Vec<&&String> = in_flight.iter().filter(|u| ***u != culprit).collect();
            let other_users: BTreeSet<&&&String> = others.iter().collect();
            let msg = format!(
                "the proxy process exited at {} ({reason}) while retrying request {key:#x} of {culprit}, whose client had left; {} requests in flight died with it, {} of them from {} other users",
                secs(t),
                in_flight.len(),
                others.len(),
                other_users.len()
            );
            w.report("proxy-crash", t, || msg);
        }
        "world.proxy_crash" if !w.found.contains_key("proxy-crash") => {
            let reason = e.str("reason").to_string();
            // Seen from inside: the table; from outside: tabs still waiting.
            let in_flight: Vec<String> = if w.admitted.is_empty() {
                w.waiting.values().cloned().collect()
            } else {
                w.admitted
                    .iter()
                    .filter(|(k, _)| !w.released.contains(k))
                    .map(|(_, (u, _))| u.clone())
                    .collect()
            };
            let users: BTreeSet<&String> = in_flight.iter().collect();
            let msg = format!(
                "the proxy went down at {} ({reason}); {} requests in flight of {} users died with it",
                secs(t),
                in_flight.len(),
                users.len()
            );
            w.report("proxy-crash", t, || msg);
        }
        _ => {}
    }
}

/// What the proxy writes that ends a client's answer: the end of the body
/// (a whole answer, or the last of a stream), an error answer, or a stream
/// cut off with an error (`abort`).
const TERMINAL_WRITES: &[&str] = &["end", "error", "abort"];

/// Once bytes of an answer reached its client (the proxy's first write for
/// the request: a stream's head, or a whole answer), nothing for that
/// request may be sent upstream again: the client already has a 200 and
/// part of one completion, and another would be spliced onto it. Judged at
/// the proxy (an attempt started after that write) and at the upstream (an
/// attempt arriving more than one network crossing after it: one already
/// on the wire may arrive within it).
fn step_bytes(w: &mut Walk, e: &Event, grace: &Grace) {
    let t = e.t_us;
    match e.kind.as_str() {
        "client.write" => {
            let key = e.u64("key");
            if let Some((_, fp)) = w.admitted.get(&key) {
                let what = e.str("what").to_string();
                w.wrote.entry(fp.clone()).or_insert((key, t, what));
            }
        }
        "attempt.start" => {
            let (key, n) = (e.u64("key"), e.u64("attempt"));
            let fp = w.admitted.get(&key).map(|(_, fp)| fp.as_str());
            if let Some((_, tw, what)) = fp.and_then(|fp| w.wrote.get(fp)).cloned() {
                let user = w.user_of(key).to_string();
                w.report("retry-after-bytes", t, || {
                    format!("the proxy started attempt {n} of request {key:#x} (user {user}) at {}, after it wrote '{what}' to that request's client at {}", secs(t), secs(tw))
                });
            }
        }
        "upstream.attempt" => {
            let (fp, n) = (e.str("fp"), e.u64("attempt"));
            if let Some((key, tw, what)) = w.wrote.get(fp).cloned()
                && w.sent_by(t, grace.network_us) > tw.saturating_add(grace.network_us)
            {
                let user = w.user_of(key).to_string();
                w.report("retry-after-bytes", t, || {
                    format!("the upstream received attempt {n} of generation {fp} at {}, {} after the proxy wrote '{what}' to its client (request {key:#x}, user {user})", secs(t), secs(t - tw))
                });
            }
        }
        _ => {}
    }
}

/// One answer per request: after its terminal write nothing more may reach
/// the client, neither a second terminal answer nor anything else.
fn step_terminal(w: &mut Walk, e: &Event) {
    let (t, key, what) = (e.t_us, e.u64("key"), e.str("what"));
    if let Some((first_t, first)) = w.answered.get(&key).cloned() {
        let user = w.user_of(key).to_string();
        let what = what.to_string();
        let kind = if TERMINAL_WRITES.contains(&what.as_str()) {
            "a second terminal answer"
        } else {
            "a write"
        };
        w.report("double-terminal", t, || {
            format!("the proxy wrote {kind} ('{what}') to the client of request {key:#x} (user {user}) at {}, after its terminal answer ('{first}') at {}", secs(t), secs(first_t))
        });
    } else if TERMINAL_WRITES.contains(&what) {
        w.answered.insert(key, (t, what.to_string()));
    }
}

/// Retry-After and the shared gate, judged at the upstream.
fn step_rates(w: &mut Walk, e: &Event, grace_us: u64, outside: bool) {
    let t = e.t_us;
    match e.kind.as_str() {
        "upstream.answer" if e.u64("status") == 429 && e.u64("retry_after_ms") > 0 => {
            let until = t + e.u64("retry_after_ms") * 1000;
            if outside {
                w.hinted.insert(e.str("fp").to_string(), (t, until));
            } else {
                w.hint_sent.insert(e.str("fp").to_string(), until);
            }
        }
        // The hint binds the proxy from the moment it read the 429: an
        // answer whose client had already left never reached it.
        "attempt.end" if e.u64("status") == 429 => {
            let fp = w
                .admitted
                .get(&e.u64("key"))
                .map(|(_, fp)| fp.clone())
                .unwrap_or_default();
            if let Some(until) = w.hint_sent.remove(&fp) {
                w.hinted.insert(fp, (t, until));
                if until > w.gate.map_or(0, |(_, u)| u) {
                    w.gate = Some((t, until));
                }
            }
        }
        "upstream.attempt" => {
            let fp = e.str("fp").to_string();
            if let Some((sent, until)) = w.hinted.remove(&fp)
                && t < until
            {
                let n = e.u64("attempt");
                w.report("retry-after-violated", t, || {
                        format!("attempt {n} of generation {fp} reached the upstream at {}, {} before the Retry-After the proxy read at {} ran out", secs(t), secs(until - t), secs(sent))
                    });
            }
            if let Some((sent, until)) = w.gate {
                // Anything arriving within a round trip of the proxy reading
                // the 429 (or released from a hold) may have been on its
                // way already.
                if w.sent_by(t, grace_us) > sent + grace_us && t < until {
                    w.report("gate-violated", t, || {
                        format!("an attempt for generation {fp} reached the upstream at {}, while the key was rate limited (the proxy read a 429 at {} that said wait until {})", secs(t), secs(sent), secs(until))
                    });
                }
            }
        }
        // An answer cut off by the user's own logout says nothing of fairness.
        "tab.recv" if !w.logged_out.contains(e.str("fp")) => {
            let entry = w.served.entry(e.str("user").to_string()).or_default();
            entry.0 += 1;
            entry.1 += u64::from(!e.bool("error"));
        }
        _ => {}
    }
}

/// The retry budget, judged from what reached the upstream: the retries
/// (the mock's second and later attempts of a generation), each dated when
/// the proxy decided it, against the requests the proxy admitted.
fn step_budget(w: &mut Walk, e: &Event) {
    let t = e.t_us;
    match e.kind.as_str() {
        "budget.config" => {
            // A proxy that starts again starts with an empty budget.
            check_budget(w);
            w.admitted_at.clear();
            w.retry_decided.clear();
            let bucket_us = e.u64("bucket_ms").saturating_mul(1000);
            let buckets = e.u64("buckets");
            w.budget = e.bool("enabled").then(|| BudgetSpec {
                ratio: e.f64("retry_ratio"),
                floor: e.u64("retries_per_window_min"),
                remembers_us_min: bucket_us.saturating_mul(buckets.saturating_sub(1)),
                remembers_us_max: bucket_us.saturating_mul(buckets),
            });
        }
        "req.admit" => {
            w.admitted_at.push(t);
            w.key_of.insert(e.str("fp").to_string(), e.u64("key"));
        }
        // The proxy asks the budget just before it reports a retry decision.
        "attempt.end" if matches!(e.str("decision"), "retry" | "backoff") => {
            w.retry_decided
                .entry(e.u64("key"))
                .or_default()
                .push_back(t);
        }
        "upstream.attempt" if e.u64("attempt") >= 2 => {
            let fp = e.str("fp").to_string();
            let decided = w
                .key_of
                .get(&fp)
                .and_then(|k| w.retry_decided.get_mut(k))
                .and_then(VecDeque::pop_front)
                .unwrap_or(t);
            w.retries.push(Retry {
                decided,
                arrived: t,
                fp,
                attempt: e.u64("attempt"),
            });
        }
        _ => {}
    }
}

/// Every retry that reached the upstream is judged at the moment the proxy
/// decided it: the retries decided within the span the budget always
/// remembers, up to and including it, may not outnumber what the budget
/// allowed then (its floor, or its ratio of the requests admitted within
/// the longest span it remembers). Both spans err towards the proxy.
///
/// The simulated world has one upstream key (as `gate-violated` also
/// assumes), so every retry counts against one budget.
fn check_budget(w: &mut Walk) {
    let mut retries = std::mem::take(&mut w.retries);
    let Some(b) = w.budget else {
        return;
    };
    retries.sort_by_key(|r| r.decided);
    let admitted = &w.admitted_at;
    let (mut lo, mut hi, mut q_lo, mut q_hi) = (0, 0, 0, 0);
    let mut broken = Vec::new();
    for r in &retries {
        let c = r.decided;
        // Every retry decided at the same moment counts: the last of them
        // was asked with all the others already taken.
        while hi < retries.len() && retries[hi].decided <= c {
            hi += 1;
        }
        while lo < hi && retries[lo].decided.saturating_add(b.remembers_us_min) <= c {
            lo += 1;
        }
        while q_hi < admitted.len() && admitted[q_hi] <= c {
            q_hi += 1;
        }
        while q_lo < q_hi && admitted[q_lo].saturating_add(b.remembers_us_max) <= c {
            q_lo += 1;
        }
        let (count, requests) = ((hi - lo) as u64, (q_hi - q_lo) as u64);
        let allowed = (b.floor as f64).max(b.ratio * requests as f64).ceil() as u64;
        if count > allowed {
            broken.push((r.clone(), count, requests, allowed));
        }
    }
    for (r, count, requests, allowed) in broken {
        let (min, max) = (secs(b.remembers_us_min), secs(b.remembers_us_max));
        w.report("budget-exceeded", r.decided, || {
            format!(
                "{count} retries the proxy decided within {min} up to {} reached the upstream (the last: attempt {} of generation {}, at the upstream at {}); the budget allows {allowed}: {} per window, or {} of the {requests} requests admitted within {max}",
                secs(r.decided),
                r.attempt,
                r.fp,
                secs(r.arrived),
                b.floor,
                b.ratio
            )
        });
    }
}

/// Completions a user must see others get before going without counts as
/// starvation...
const STARVATION_OTHERS_MIN: u64 = 5;
/// ...after waiting to the end for at least this many answers (each may
/// fail by bad luck against a flaky upstream; five in a row while another
/// user is served is not luck).
const STARVATION_WAITED_MIN: u64 = 5;

/// A user who asked and got nothing while another user got many.
/// The proxy process went down (a planned restart): every request it had is
/// gone with it, and its next life numbers requests afresh, so what the
/// walk knows by request key ends here. Requests its guards did not release
/// stay as leaks; the gate and hints it read are forgotten with it.
fn restarted(w: &mut Walk, t: u64) {
    check_cancels(w);
    let open: Vec<(u64, String)> = w
        .admitted
        .iter()
        .filter(|(k, _)| !w.released.contains(k))
        .map(|(k, (_, fp))| (*k, fp.clone()))
        .collect();
    for (key, fp) in open {
        w.stopped_at.entry(fp).or_insert(t);
        w.leaked_in_restart.push(key);
    }
    w.admitted.clear();
    w.session_of_key.clear();
    w.released.clear();
    w.answered.clear();
    w.stopped_keys.clear();
    w.key_of.clear();
    w.retry_decided.clear();
    w.gate = None;
    w.hinted.clear();
}

/// What `wrong-cancel` needs: who cancelled what, which tab sent what in
/// which session, and who asked for a stop (logouts, admins, timeouts).
fn step_cancels(w: &mut Walk, e: &Event) {
    match e.kind.as_str() {
        "req.cancel" => w
            .cancels
            .push((e.u64("key"), e.t_us, e.str("reason").to_string())),
        "tab.logout" | "tab.logout_sent" => {
            w.logouts
                .push((e.str("user").to_string(), e.u64("tab"), e.t_us));
        }
        "tab.send" => {
            w.tab_of_fp.insert(
                e.str("fp").to_string(),
                (e.str("user").to_string(), e.u64("tab")),
            );
        }
        "req.admit" => {
            let session = e.u64("session");
            w.session_of_key.insert(e.u64("key"), session);
            if let Some(tab) = w.tab_of_fp.get(e.str("fp")) {
                w.sessions_of_tab
                    .entry(tab.clone())
                    .or_default()
                    .insert(session);
            }
        }
        "tab.timeout" => {
            w.gave_up.entry(e.str("fp").to_string()).or_insert(e.t_us);
        }
        "tab.admin_sent" => {
            let user = e.str("user").to_string();
            w.admin_acts.push((user.clone(), e.t_us));
            w.removed_users.insert(user);
        }
        _ => {}
    }
}

/// `wrong-cancel`: the proxy cancelled a request that no one asked to stop.
/// A request may be cancelled when its own client left (its tab refreshed
/// or gave up before), when a tab of its user logged out (a session shared
/// by several tabs ends for all of them), or when an administrator disabled
/// or deleted its user; any other cancellation reached a request whose tab
/// is still waiting for it (race 8: cancellation keyed by user or session,
/// not by request).
fn check_cancels(w: &mut Walk) {
    let cancels = std::mem::take(&mut w.cancels);
    for (key, t, reason) in cancels {
        let Some((user, fp)) = w.admitted.get(&key).cloned() else {
            continue;
        };
        let left = [&w.abandoned_at, &w.gave_up]
            .iter()
            .any(|m| m.get(&fp).is_some_and(|at| *at <= t));
        // A logout sent before the cancel by a tab of the request's session
        // (a tab whose requests are unknown: any tab of the user).
        let session = w.session_of_key.get(&key).copied();
        let logged_out = w.logouts.iter().any(|(u, tab, at)| {
            *at <= t
                && *u == user
                && match w.sessions_of_tab.get(&(u.clone(), *tab)) {
                    Some(sessions) => session.is_none_or(|s| sessions.contains(&s)),
                    None => true,
                }
        });
        let by_admin = w.admin_acts.iter().any(|(u, at)| *u == user && *at <= t);
        if left || logged_out || by_admin {
            continue;
        }
        w.report("wrong-cancel", t, || {
            format!(
                "the proxy cancelled request {key:#x} (user {user}, generation {fp}) at {} ({reason}) while its tab still waited for it: no refresh of that tab, no logout of that user",
                secs(t)
            )
        });
    }
}

fn check_starvation(w: &mut Walk, t: u64) {
    let best = w
        .served
        .iter()
        .max_by_key(|(_, (_, got))| *got)
        .map(|(u, (_, got))| (u.clone(), *got));
    let Some((rich, most)) = best.filter(|(_, got)| *got >= STARVATION_OTHERS_MIN) else {
        return;
    };
    let starved = w.served.iter().find(|(u, (waited, got))| {
        *waited >= STARVATION_WAITED_MIN && *got == 0 && !w.removed_users.contains(*u)
    });
    if let Some((user, (waited, _))) = starved.map(|(u, x)| (u.clone(), *x)) {
        w.report("starvation", t, || {
            format!(
                "{user} waited for {waited} answers and got no completion while {rich} got {most}"
            )
        });
    }
}

fn check_leak(w: &mut Walk, ending: &Ending, t: u64) {
    let live = ending.live;
    let open: Vec<String> = w
        .leaked_in_restart
        .iter()
        .chain(w.admitted.keys().filter(|k| !w.released.contains(k)))
        .take(3)
        .map(|k| format!("{k:#x}"))
        .collect();
    if !open.is_empty() || live.tasks > 0 || live.upstream_conns > 0 || !ending.quiescent {
        let msg = format!(
            "at the end of the world: {} requests still in the table (first: {}), {} request tasks alive, {} upstream connections open{}",
            live.requests,
            if open.is_empty() {
                "none".into()
            } else {
                open.join(", ")
            },
            live.tasks,
            live.upstream_conns,
            if ending.quiescent {
                ""
            } else {
                "; the world did not become quiescent"
            }
        );
        w.report("leak", t, || msg);
    }
}

fn secs(t_us: u64) -> String {
    format!("{:.3}s", t_us as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(t_us: u64, kind: &str, fields: serde_json::Value) -> Event {
        Event::new(t_us, "proxy", kind, fields)
    }

    fn clean() -> Ending {
        Ending {
            crashed: false,
            live: Live::default(),
            quiescent: true,
            cut_short: false,
            outside: false,
        }
    }

    const GRACE: Grace = Grace {
        network_us: 50_000,
        client_gone_us: 200_000,
    };

    /// A request of alice's gets a 429 saying "wait 1 s" that the proxy
    /// reads at 10 ms; then `more`.
    fn hinted(more: Vec<Event>) -> Vec<Event> {
        let mut v = vec![
            ev(
                0,
                "req.admit",
                json!({"key": 1, "user": "alice", "fp": "aa"}),
            ),
            ev(
                0,
                "upstream.answer",
                json!({"fp": "aa", "attempt": 1, "status": 429, "retry_after_ms": 1000}),
            ),
            ev(
                10_000,
                "attempt.end",
                json!({"key": 1, "attempt": 1, "status": 429}),
            ),
        ];
        v.extend(more);
        v.push(ev(2_000_000, "req.release", json!({"key": 1})));
        v
    }

    /// alice gets 5 completions; `user` waits for `waited` answers and gets `got`.
    fn served(user: &str, waited: u64, got: u64) -> Vec<Event> {
        let mut v: Vec<Event> = (0..5)
            .map(|i| {
                ev(
                    i,
                    "tab.recv",
                    json!({"fp": "a", "got": "a", "user": "alice", "error": false}),
                )
            })
            .collect();
        for i in 0..waited {
            v.push(ev(10 + i, "tab.recv", json!({"fp": "b", "got": if i < got { "b" } else { "" }, "user": user, "error": i >= got})));
        }
        v
    }

    /// One line per case: the events, and the invariant they must break
    /// (or None).
    #[test]
    fn each_invariant_fires_on_its_pattern_and_only_then() {
        let admit = ev(
            0,
            "req.admit",
            json!({"key": 1, "user": "alice", "fp": "aa"}),
        );
        let release = ev(10, "req.release", json!({"key": 1}));
        let cases: Vec<(Vec<Event>, Option<&str>)> = vec![
            (
                vec![
                    admit.clone(),
                    ev(5, "client.write", json!({"key": 1, "what": "end"})),
                    release.clone(),
                ],
                None,
            ),
            (
                vec![
                    admit.clone(),
                    release.clone(),
                    ev(20, "client.write", json!({"key": 1, "what": "error"})),
                ],
                Some("write-after-release"),
            ),
            (
                vec![
                    admit.clone(),
                    release.clone(),
                    ev(20, "req.stale", json!({"key": 1, "op": "x"})),
                ],
                Some("stale-access"),
            ),
            // A stream: its head, then the end of its body.
            (
                vec![
                    admit.clone(),
                    ev(2, "client.write", json!({"key": 1, "what": "head"})),
                    ev(5, "client.write", json!({"key": 1, "what": "end"})),
                    release.clone(),
                ],
                None,
            ),
            // The end written twice before the release.
            (
                vec![
                    admit.clone(),
                    ev(5, "client.write", json!({"key": 1, "what": "end"})),
                    ev(6, "client.write", json!({"key": 1, "what": "end"})),
                    release.clone(),
                ],
                Some("double-terminal"),
            ),
            // An error answer after the end of the body.
            (
                vec![
                    admit.clone(),
                    ev(5, "client.write", json!({"key": 1, "what": "end"})),
                    ev(6, "client.write", json!({"key": 1, "what": "error"})),
                    release.clone(),
                ],
                Some("double-terminal"),
            ),
            // A head written after an error answer.
            (
                vec![
                    admit.clone(),
                    ev(5, "client.write", json!({"key": 1, "what": "error"})),
                    ev(6, "client.write", json!({"key": 1, "what": "head"})),
                    release.clone(),
                ],
                Some("double-terminal"),
            ),
            // One answer each for two requests.
            (
                vec![
                    admit.clone(),
                    ev(1, "req.admit", json!({"key": 2, "user": "bob", "fp": "bb"})),
                    ev(5, "client.write", json!({"key": 1, "what": "end"})),
                    ev(6, "client.write", json!({"key": 2, "what": "error"})),
                    release.clone(),
                    ev(11, "req.release", json!({"key": 2})),
                ],
                None,
            ),
            (
                vec![
                    ev(0, "tab.abandon", json!({"fp": "aa"})),
                    ev(100, "upstream.attempt", json!({"fp": "aa", "attempt": 2})),
                ],
                None,
            ),
            (
                vec![
                    ev(0, "tab.abandon", json!({"fp": "aa"})),
                    ev(
                        1_000_000,
                        "upstream.attempt",
                        json!({"fp": "aa", "attempt": 2}),
                    ),
                ],
                Some("attempt-after-cancel"),
            ),
            (
                vec![ev(
                    0,
                    "tab.recv",
                    json!({"fp": "aa", "got": "aa", "user": "alice"}),
                )],
                None,
            ),
            (
                vec![ev(
                    0,
                    "tab.recv",
                    json!({"fp": "aa", "got": "bb", "user": "alice"}),
                )],
                Some("cross-user-delivery"),
            ),
            (
                vec![
                    admit.clone(),
                    ev(20, "proxy.exit", json!({"key": 1, "reason": "boom"})),
                ],
                Some("proxy-crash"),
            ),
            // The proxy starts an attempt for a request it already released.
            (
                vec![
                    admit.clone(),
                    release.clone(),
                    ev(30, "attempt.start", json!({"key": 1, "attempt": 2})),
                ],
                Some("attempt-after-cancel"),
            ),
            // An attempt in flight when the request was released lands within the network grace.
            (
                vec![
                    admit.clone(),
                    release.clone(),
                    ev(
                        40_000,
                        "upstream.attempt",
                        json!({"fp": "aa", "attempt": 1}),
                    ),
                ],
                None,
            ),
            // A hinted 429 the proxy read; its next attempt comes after the hint: fine.
            (
                hinted(vec![ev(
                    1_100_000,
                    "upstream.attempt",
                    json!({"fp": "aa", "attempt": 2}),
                )]),
                None,
            ),
            // ...and before it (too soon after the 429 to count against the gate).
            (
                hinted(vec![ev(
                    150_000,
                    "upstream.attempt",
                    json!({"fp": "aa", "attempt": 2}),
                )]),
                Some("retry-after-violated"),
            ),
            // Another request arriving during the gated window.
            (
                hinted(vec![ev(
                    500_000,
                    "upstream.attempt",
                    json!({"fp": "bb", "attempt": 1}),
                )]),
                Some("gate-violated"),
            ),
            // A 429 whose client had left: the proxy never read it, nothing is gated.
            (
                vec![
                    ev(
                        0,
                        "upstream.answer",
                        json!({"fp": "aa", "attempt": 1, "status": 429, "retry_after_ms": 1000}),
                    ),
                    ev(
                        500_000,
                        "upstream.attempt",
                        json!({"fp": "bb", "attempt": 1}),
                    ),
                ],
                None,
            ),
            (served("bob", 5, 0), Some("starvation")),
            (served("bob", 4, 0), None),
            // A stream cut off (its upstream broke off), once.
            (
                vec![
                    admit.clone(),
                    ev(2, "client.write", json!({"key": 1, "what": "head"})),
                    ev(5, "client.write", json!({"key": 1, "what": "abort"})),
                    release.clone(),
                ],
                None,
            ),
            // The end of a stream written after it was cut off.
            (
                vec![
                    admit.clone(),
                    ev(5, "client.write", json!({"key": 1, "what": "abort"})),
                    ev(6, "client.write", json!({"key": 1, "what": "end"})),
                    release.clone(),
                ],
                Some("double-terminal"),
            ),
        ];
        for (i, (events, want)) in cases.into_iter().enumerate() {
            let crashed = want == Some("proxy-crash");
            let ending = Ending { crashed, ..clean() };
            let got: Vec<_> = check(&events, &ending, &GRACE)
                .into_iter()
                .map(|v| v.invariant)
                .collect();
            assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "case {i}");
        }
    }

    /// A budget of 2 retries per window or half the requests, remembering
    /// retries 9 s to 10 s; `requests` admitted at 0; each retry
    /// (decided at, reached the upstream at, in ms) is one request's.
    fn budgeted(enabled: bool, requests: u64, retries: &[(u64, u64)]) -> Vec<Event> {
        let mut v = vec![ev(
            0,
            "budget.config",
            json!({"enabled": enabled, "retry_ratio": 0.5, "retries_per_window_min": 2, "bucket_ms": 1000, "buckets": 10}),
        )];
        for k in 0..requests {
            v.push(ev(
                0,
                "req.admit",
                json!({"key": k, "user": "alice", "fp": format!("f{k}")}),
            ));
        }
        for (i, &(decided, arrived)) in retries.iter().enumerate() {
            let k = i as u64 % requests;
            let n = 2 + i as u64 / requests;
            v.push(ev(
                decided * 1000,
                "attempt.end",
                json!({"key": k, "attempt": n - 1, "status": 429, "decision": "backoff"}),
            ));
            v.push(ev(
                arrived * 1000,
                "upstream.attempt",
                json!({"fp": format!("f{k}"), "attempt": n}),
            ));
        }
        v.sort_by_key(|e| e.t_us);
        v
    }

    fn budget_verdict(events: &[Event]) -> Option<Violation> {
        check(events, &clean(), &GRACE)
            .into_iter()
            .find(|v| v.invariant == "budget-exceeded")
    }

    /// One line per case: the trace, and whether the budget was exceeded.
    #[test]
    fn budget_exceeded_judges_retries_at_the_upstream_by_when_they_were_decided() {
        let cases: Vec<(&str, Vec<Event>, bool)> = vec![
            (
                "the floor",
                budgeted(true, 1, &[(0, 100), (500, 600)]),
                false,
            ),
            (
                "over the floor",
                budgeted(true, 1, &[(0, 100), (500, 600), (900, 1000)]),
                true,
            ),
            (
                "the ratio of 6 requests allows 3",
                budgeted(true, 6, &[(0, 100), (500, 600), (900, 1000)]),
                false,
            ),
            (
                "...not 4",
                budgeted(true, 6, &[(0, 100), (500, 600), (900, 1000), (950, 990)]),
                true,
            ),
            (
                "spread over more than the window",
                budgeted(true, 1, &[(0, 100), (1000, 1100), (9500, 9600)]),
                false,
            ),
            // Decided 9.4 s apart, arriving together: dated by the decision.
            (
                "bunched at the upstream only",
                budgeted(true, 3, &[(0, 9500), (0, 9500), (9400, 9450)]),
                false,
            ),
            (
                "bunched when decided",
                budgeted(true, 3, &[(9000, 9100), (9000, 9200), (9400, 9450)]),
                true,
            ),
            (
                "a disabled budget",
                budgeted(false, 1, &[(0, 100), (500, 600), (900, 1000)]),
                false,
            ),
        ];
        for (name, events, want) in cases {
            assert_eq!(budget_verdict(&events).is_some(), want, "{name}");
        }
        // A decided retry that never reached the upstream spent nothing.
        let mut events = budgeted(true, 1, &[(0, 100), (500, 600)]);
        events.push(ev(
            900_000,
            "attempt.end",
            json!({"key": 0, "attempt": 3, "status": 429, "decision": "backoff"}),
        ));
        assert_eq!(budget_verdict(&events), None);
        // No budget announced (the SillyTavern variants, the probe): not judged.
        let unannounced = budgeted(true, 1, &[(0, 100), (500, 600), (900, 1000)]);
        assert_eq!(budget_verdict(&unannounced[1..]), None);
        let v = budget_verdict(&budgeted(true, 1, &[(0, 1), (1, 2), (2, 3), (3, 4)])).unwrap();
        assert_eq!((v.count, v.t_us), (2, 2000), "{}", v.message);
    }

    /// alice's streamed request `aa` (key 1): attempt 1 at the upstream at
    /// 10 ms, the head written at 100 ms, then `more`, the end at 2 s and
    /// the release.
    fn streamed(more: Vec<Event>) -> Vec<Event> {
        let mut v = vec![
            ev(
                0,
                "req.admit",
                json!({"key": 1, "user": "alice", "fp": "aa"}),
            ),
            ev(1, "attempt.start", json!({"key": 1, "attempt": 1})),
            ev(
                10_000,
                "upstream.attempt",
                json!({"fp": "aa", "attempt": 1}),
            ),
            ev(100_000, "client.write", json!({"key": 1, "what": "head"})),
        ];
        v.extend(more);
        v.push(ev(
            2_000_000,
            "client.write",
            json!({"key": 1, "what": "end"}),
        ));
        v.push(ev(2_000_001, "req.release", json!({"key": 1})));
        v
    }

    /// One line per case: the trace, and whether an attempt came after
    /// bytes reached the client.
    #[test]
    fn retry_after_bytes_fires_on_an_attempt_after_the_first_write_and_only_then() {
        let retried_before_bytes = vec![
            ev(
                0,
                "req.admit",
                json!({"key": 1, "user": "alice", "fp": "aa"}),
            ),
            ev(1, "attempt.start", json!({"key": 1, "attempt": 1})),
            ev(
                10_000,
                "upstream.attempt",
                json!({"fp": "aa", "attempt": 1}),
            ),
            ev(
                20_000,
                "attempt.end",
                json!({"key": 1, "attempt": 1, "status": 0, "decision": "backoff"}),
            ),
            ev(300_000, "attempt.start", json!({"key": 1, "attempt": 2})),
            ev(
                310_000,
                "upstream.attempt",
                json!({"fp": "aa", "attempt": 2}),
            ),
            ev(400_000, "client.write", json!({"key": 1, "what": "head"})),
            ev(900_000, "client.write", json!({"key": 1, "what": "abort"})),
            ev(900_001, "req.release", json!({"key": 1})),
        ];
        let cases: Vec<(&str, Vec<Event>, bool)> = vec![
            ("a stream, one attempt", streamed(vec![]), false),
            ("a retry before the first byte", retried_before_bytes, false),
            (
                "the proxy starts an attempt after the head",
                streamed(vec![ev(
                    700_000,
                    "attempt.start",
                    json!({"key": 1, "attempt": 2}),
                )]),
                true,
            ),
            (
                "the upstream gets an attempt long after the head",
                streamed(vec![ev(
                    700_000,
                    "upstream.attempt",
                    json!({"fp": "aa", "attempt": 2}),
                )]),
                true,
            ),
            // Within one network crossing it may have been on the wire already.
            (
                "the upstream gets an attempt just after the head",
                streamed(vec![ev(
                    140_000,
                    "upstream.attempt",
                    json!({"fp": "aa", "attempt": 2}),
                )]),
                false,
            ),
            (
                "another generation's attempt",
                streamed(vec![ev(
                    700_000,
                    "upstream.attempt",
                    json!({"fp": "bb", "attempt": 2}),
                )]),
                false,
            ),
        ];
        for (name, events, want) in cases {
            let got: Vec<_> = check(&events, &clean(), &GRACE)
                .into_iter()
                .map(|v| v.invariant)
                .collect();
            let want: Vec<&str> = if want {
                vec!["retry-after-bytes"]
            } else {
                vec![]
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn leak_fires_on_unreleased_request_or_live_counts() {
        let events = vec![ev(
            0,
            "req.admit",
            json!({"key": 7, "user": "bob", "fp": "cc"}),
        )];
        let v = check(&events, &clean(), &GRACE);
        assert_eq!(v[0].invariant, "leak");
        let live = Live {
            tasks: 1,
            ..Live::default()
        };
        let v = check(&[], &Ending { live, ..clean() }, &GRACE);
        assert_eq!(v[0].invariant, "leak");
        assert!(check(&[], &clean(), &GRACE).is_empty());
    }

    #[test]
    fn crash_report_counts_other_users() {
        let events = vec![
            ev(
                0,
                "req.admit",
                json!({"key": 1, "user": "alice", "fp": "a"}),
            ),
            ev(0, "req.admit", json!({"key": 2, "user": "bob", "fp": "b"})),
            ev(
                0,
                "req.admit",
                json!({"key": 3, "user": "carol", "fp": "c"}),
            ),
            ev(1, "req.release", json!({"key": 1})),
            ev(2, "proxy.exit", json!({"key": 1, "reason": "AbortError"})),
        ];
        let v = check(
            &events,
            &Ending {
                crashed: true,
                ..clean()
            },
            &GRACE,
        );
        assert!(
            v[0].message
                .contains("2 requests in flight died with it, 2 of them from 2 other users"),
            "{}",
            v[0].message
        );
    }

    #[test]
    fn a_cancel_no_one_asked_for_is_wrong() {
        // alice's two tabs share a session; tab 0 (fp a) refreshes, then
        // the proxy cancels both requests.
        let base = || {
            vec![
                ev(
                    0,
                    "req.admit",
                    json!({"key": 1, "user": "alice", "fp": "a"}),
                ),
                ev(
                    0,
                    "req.admit",
                    json!({"key": 2, "user": "alice", "fp": "b"}),
                ),
                ev(
                    100,
                    "tab.abandon",
                    json!({"user": "alice", "tab": 0, "fp": "a"}),
                ),
                ev(
                    200,
                    "req.cancel",
                    json!({"key": 1, "reason": "client-gone"}),
                ),
            ]
        };
        let kinds = |events: &[Event]| -> Vec<&str> {
            check(events, &clean(), &GRACE)
                .iter()
                .map(|v| v.invariant)
                .collect()
        };
        // Only the refreshed tab's request: right.
        assert!(!kinds(&base()).contains(&"wrong-cancel"));
        // The other tab's too: wrong, and the message names it.
        let mut both = base();
        both.push(ev(
            200,
            "req.cancel",
            json!({"key": 2, "reason": "client-gone"}),
        ));
        let found = check(&both, &clean(), &GRACE);
        let v = found
            .iter()
            .find(|v| v.invariant == "wrong-cancel")
            .unwrap();
        assert!(
            v.message.contains("0x2") && v.message.contains("alice"),
            "{}",
            v.message
        );
        // A logout of the user ends every tab's session: right.
        let mut logout = both.clone();
        logout.insert(
            3,
            ev(
                150,
                "tab.logout_sent",
                json!({"user": "alice", "tab": 0, "fp": "a"}),
            ),
        );
        assert!(!kinds(&logout).contains(&"wrong-cancel"));
        // So does an administrator's disable (the reason alone proves nothing).
        let mut admin = base();
        admin.push(ev(
            200,
            "req.cancel",
            json!({"key": 2, "reason": "user-disabled"}),
        ));
        assert!(kinds(&admin).contains(&"wrong-cancel"));
        admin.insert(
            3,
            ev(
                150,
                "tab.admin_sent",
                json!({"user": "alice", "tab": 1, "fp": "b", "action": "disable"}),
            ),
        );
        assert!(!kinds(&admin).contains(&"wrong-cancel"));
        // A logout of another session of the same user: wrong (a cancel
        // keyed by user).
        let sessions = vec![
            ev(0, "tab.send", json!({"user": "alice", "tab": 0, "fp": "a"})),
            ev(0, "tab.send", json!({"user": "alice", "tab": 1, "fp": "b"})),
            ev(
                0,
                "req.admit",
                json!({"key": 1, "user": "alice", "fp": "a", "session": 7}),
            ),
            ev(
                0,
                "req.admit",
                json!({"key": 2, "user": "alice", "fp": "b", "session": 8}),
            ),
            ev(
                100,
                "tab.logout_sent",
                json!({"user": "alice", "tab": 0, "fp": "a"}),
            ),
            ev(200, "req.cancel", json!({"key": 1, "reason": "logout"})),
            ev(200, "req.cancel", json!({"key": 2, "reason": "logout"})),
        ];
        let found = check(&sessions, &clean(), &GRACE);
        let v = found
            .iter()
            .find(|v| v.invariant == "wrong-cancel")
            .expect("a cancel keyed by user is caught");
        assert!(v.message.contains("0x2"), "{}", v.message);
        // A tab that gave up waiting left too.
        let mut gave_up = base();
        gave_up.push(ev(
            150,
            "tab.timeout",
            json!({"user": "alice", "tab": 1, "fp": "b"}),
        ));
        gave_up.push(ev(
            200,
            "req.cancel",
            json!({"key": 2, "reason": "client-gone"}),
        ));
        assert!(!kinds(&gave_up).contains(&"wrong-cancel"));
    }
}
