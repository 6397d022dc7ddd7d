//! Process-wide counters for `GET /metrics`, in Prometheus' text format.
//!
//! # Brief overview
//! - [`COUNTERS`]: relaxed atomics, bumped by the event functions in
//!   [`crate::events`] (so every place that reports an event is counted
//!   without a second call) and by the proxy's login and route handlers.
//! - [`render`] writes them, plus the in-flight gauge the caller reads from
//!   the request table (`RequestTable::phase_counts`).
//!
//! The counters are per process: a `tavernsim serve` process runs one
//! proxy, so they are that proxy's. Tests and simulated worlds running in
//! one process share them; nothing but `/metrics` reads them, never the
//! oracle.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// One monotonically increasing counter.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Label values of `tavernsim_upstream_attempt_results_total{decision}`.
pub const DECISIONS: [&str; 6] = ["success", "retry", "backoff", "give-up", "pipe", "other"];
/// Label values of `tavernsim_retries_total{reason}`: the upstream gave a
/// wait hint (`hint`), or none and the proxy backed off (`backoff`).
pub const RETRY_REASONS: [&str; 2] = ["hint", "backoff"];
/// Label values of `{status}` on retries: what the failed attempt got.
pub const STATUS_CLASSES: [&str; 4] = ["429", "5xx", "other", "no-answer"];
/// Label values of `tavernsim_cancellations_total{reason}`.
pub const CANCEL_REASONS: [&str; 4] = ["logout", "user-disabled", "user-deleted", "other"];
/// Label values of `tavernsim_logins_total{outcome}`.
pub const LOGIN_OUTCOMES: [&str; 3] = ["ok", "failed", "throttled"];
/// Label values of `tavernsim_requests_total{route}`.
pub const ROUTES: [&str; 2] = ["openai", "sillytavern"];

/// Every counter the proxy keeps.
pub struct Counters {
    pub requests: [Counter; 2],
    pub requests_rejected_busy: Counter,
    pub requests_admitted: Counter,
    pub requests_released: Counter,
    pub attempts: Counter,
    pub attempt_results: [Counter; 6],
    pub retries: [[Counter; 4]; 2],
    pub cancellations: [Counter; 4],
    pub stale_accesses: Counter,
    pub gate_waits: Counter,
    pub logins: [Counter; 3],
}

/// The process's counters.
pub static COUNTERS: Counters = Counters {
    requests: [const { Counter::new() }; 2],
    requests_rejected_busy: Counter::new(),
    requests_admitted: Counter::new(),
    requests_released: Counter::new(),
    attempts: Counter::new(),
    attempt_results: [const { Counter::new() }; 6],
    retries: [const { [const { Counter::new() }; 4] }; 2],
    cancellations: [const { Counter::new() }; 4],
    stale_accesses: Counter::new(),
    gate_waits: Counter::new(),
    logins: [const { Counter::new() }; 3],
};

fn index_of(names: &[&str], name: &str) -> usize {
    names
        .iter()
        .position(|n| *n == name)
        .unwrap_or(names.len() - 1)
}

impl Counters {
    /// An attempt ended with `status` (0: no HTTP answer) and `decision`.
    pub fn attempt_end(&self, status: u16, decision: &str) {
        self.attempt_results[index_of(&DECISIONS, decision)].inc();
        let reason = match decision {
            "retry" => 0,
            "backoff" => 1,
            _ => return,
        };
        let class = match status {
            0 => 3,
            429 => 0,
            500..=599 => 1,
            _ => 2,
        };
        self.retries[reason][class].inc();
    }

    pub fn cancel(&self, reason: &str) {
        self.cancellations[index_of(&CANCEL_REASONS, reason)].inc();
    }

    pub fn login(&self, outcome: &str) {
        self.logins[index_of(&LOGIN_OUTCOMES, outcome)].inc();
    }

    pub fn request(&self, route: &str) {
        self.requests[index_of(&ROUTES, route)].inc();
    }
}

/// The Prometheus content type `render`'s output is served with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The whole exposition: every counter, then `in_flight` (requests per
/// phase, from the request table) as a gauge.
pub fn render(in_flight: &[(&'static str, usize)]) -> String {
    let c = &COUNTERS;
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "tavernsim_requests_total",
        "counter",
        "Generation requests received (authenticated or not), by route.",
    );
    for (i, route) in ROUTES.iter().enumerate() {
        sample(
            &mut out,
            "tavernsim_requests_total",
            &[("route", route)],
            c.requests[i].get(),
        );
    }
    single(
        &mut out,
        "tavernsim_requests_rejected_busy_total",
        "Generation requests refused because requests_max were in flight.",
        c.requests_rejected_busy.get(),
    );
    single(
        &mut out,
        "tavernsim_requests_admitted_total",
        "Requests admitted into the request table.",
        c.requests_admitted.get(),
    );
    single(
        &mut out,
        "tavernsim_requests_released_total",
        "Requests whose state left the request table (finished, failed or abandoned).",
        c.requests_released.get(),
    );
    single(
        &mut out,
        "tavernsim_upstream_attempts_total",
        "Upstream attempts started.",
        c.attempts.get(),
    );
    family(
        &mut out,
        "tavernsim_upstream_attempt_results_total",
        "counter",
        "Upstream attempts ended, by what the proxy decided next.",
    );
    for (i, d) in DECISIONS.iter().enumerate() {
        sample(
            &mut out,
            "tavernsim_upstream_attempt_results_total",
            &[("decision", d)],
            c.attempt_results[i].get(),
        );
    }
    family(
        &mut out,
        "tavernsim_retries_total",
        "counter",
        "Retries scheduled: reason hint (the upstream said when) or backoff (it did not), by what the failed attempt got.",
    );
    for (r, reason) in RETRY_REASONS.iter().enumerate() {
        for (s, status) in STATUS_CLASSES.iter().enumerate() {
            sample(
                &mut out,
                "tavernsim_retries_total",
                &[("reason", reason), ("status", status)],
                c.retries[r][s].get(),
            );
        }
    }
    family(
        &mut out,
        "tavernsim_cancellations_total",
        "counter",
        "Requests cancelled by logout or an admin disabling or deleting their user.",
    );
    for (i, reason) in CANCEL_REASONS.iter().enumerate() {
        sample(
            &mut out,
            "tavernsim_cancellations_total",
            &[("reason", reason)],
            c.cancellations[i].get(),
        );
    }
    single(
        &mut out,
        "tavernsim_gate_waits_total",
        "Requests held back because their upstream key's shared rate-limit gate was closed.",
        c.gate_waits.get(),
    );
    single(
        &mut out,
        "tavernsim_stale_accesses_total",
        "Uses of request state after its release (always 0 in the fixed proxy).",
        c.stale_accesses.get(),
    );
    family(
        &mut out,
        "tavernsim_logins_total",
        "counter",
        "Password logins, by outcome.",
    );
    for (i, o) in LOGIN_OUTCOMES.iter().enumerate() {
        sample(
            &mut out,
            "tavernsim_logins_total",
            &[("outcome", o)],
            c.logins[i].get(),
        );
    }
    family(
        &mut out,
        "tavernsim_requests_in_flight",
        "gauge",
        "Requests in the request table now, by phase.",
    );
    for (phase, n) in in_flight {
        sample(
            &mut out,
            "tavernsim_requests_in_flight",
            &[("phase", phase)],
            *n as u64,
        );
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    sample(out, name, &[], value);
}

/// Label values here are compile-time constants without quotes or
/// backslashes, so they need no escaping.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_well_formed() {
        COUNTERS.attempt_end(429, "retry");
        COUNTERS.attempt_end(0, "backoff");
        COUNTERS.cancel("no-such-reason");
        let text = render(&[("sending", 2), ("backoff", 1)]);
        assert!(text.contains("tavernsim_requests_in_flight{phase=\"sending\"} 2\n"));
        assert!(text.contains("# TYPE tavernsim_retries_total counter\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(name.starts_with("tavernsim_"), "{line}");
        }
        let hinted_429 = text
            .lines()
            .find(|l| l.starts_with("tavernsim_retries_total{reason=\"hint\",status=\"429\"}"))
            .unwrap();
        assert!(!hinted_429.ends_with(" 0"), "{hinted_429}");
    }
}
