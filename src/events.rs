//! The structured events every part of the system reports through
//! `tracing`, under the target [`TARGET`].
//!
//! One function per event kind, so a kind's name and fields are written in
//! one place. The harness's trace layer records these events; the oracle
//! judges a run from them alone.
//!
//! Architecture Invariant: the oracle never reads proxy internals except
//! through these events.

/// The `tracing` target of every event the trace layer records.
pub const TARGET: &str = "tavernsim::ev";

use crate::metrics::COUNTERS;

macro_rules! ev {
    ($kind:literal $(, $($field:tt)*)?) => {
        tracing::info!(target: "tavernsim::ev", kind = $kind $(, $($field)*)?)
    };
}

// ---- proxy: the request table -------------------------------------------

/// A request entered the table.
pub fn req_admit(key: u64, user: &str, session: u64, fp: &str, stream: bool) {
    COUNTERS.requests_admitted.inc();
    ev!("req.admit", key, user, session, fp, stream);
}

/// A phase transition of a request.
pub fn req_phase(key: u64, from: &str, to: &str) {
    if to == "gate-wait" {
        COUNTERS.gate_waits.inc();
    }
    ev!("req.phase", key, from, to);
}

/// A transition that found another phase than expected.
pub fn req_phase_conflict(key: u64, expected: &str, found: &str) {
    tracing::warn!(target: "tavernsim::ev", kind = "req.phase_conflict", key, expected, found);
}

/// A request's cancellation token was cancelled (and why).
pub fn req_cancel(key: u64, reason: &str) {
    COUNTERS.cancel(reason);
    ev!("req.cancel", key, reason);
}

/// A request left the table: its state is gone.
pub fn req_release(key: u64) {
    COUNTERS.requests_released.inc();
    ev!("req.release", key);
}

/// Something used a key whose slot was already released.
pub fn req_stale(key: u64, op: &str) {
    COUNTERS.stale_accesses.inc();
    tracing::warn!(target: "tavernsim::ev", kind = "req.stale", key, op);
}

// ---- proxy: work done for a request --------------------------------------

/// The proxy writes something to the client of request `key`
/// (`what`: head, end, error; abort: a stream cut off with an error, so
/// that it never looks complete).
pub fn client_write(key: u64, what: &str) {
    ev!("client.write", key, what);
}

/// The proxy starts an upstream attempt for request `key`.
pub fn attempt_start(key: u64, attempt: u32) {
    COUNTERS.attempts.inc();
    ev!("attempt.start", key, attempt);
}

/// An upstream attempt ended with `status` (0: no HTTP answer).
pub fn attempt_end(key: u64, attempt: u32, status: u16, decision: &str, wait_ms: u64) {
    COUNTERS.attempt_end(status, decision);
    ev!("attempt.end", key, attempt, status, decision, wait_ms);
}

/// A task that works for request `key` outside its handler was spawned.
pub fn task_spawn(key: u64, what: &str) {
    ev!("task.spawn", key, what);
}

/// That task ended.
pub fn task_end(key: u64, what: &str) {
    ev!("task.end", key, what);
}

/// The retry budget the proxy starts with (once, at start; the fixed
/// design and its mutants only). Its memory is `buckets` slices of
/// `bucket_ms`: a retry is forgotten after at least `buckets - 1` and at
/// most `buckets` of them.
pub fn budget_config(
    enabled: bool,
    retry_ratio: f64,
    retries_per_window_min: u32,
    bucket_ms: u64,
    buckets: u64,
) {
    ev!(
        "budget.config",
        enabled,
        retry_ratio,
        retries_per_window_min,
        bucket_ms,
        buckets
    );
}

/// A retry timer was armed.
pub fn retry_armed(key: u64, wait_ms: u64) {
    ev!("retry.armed", key, wait_ms);
}

/// An upstream connection opened or closed.
pub fn upstream_conn(open: bool) {
    ev!("upstream.conn", open);
}

/// The proxy process is about to exit because of an error nothing handled.
pub fn proxy_exit(key: u64, reason: &str) {
    tracing::error!(target: "tavernsim::ev", kind = "proxy.exit", key, reason);
}

// ---- the mock upstream ----------------------------------------------------

/// The mock upstream received an attempt for the generation `fp`.
pub fn upstream_attempt(fp: &str, attempt: u32, user: &str, answer: &str) {
    ev!("upstream.attempt", fp, attempt, user, answer);
}

/// The mock upstream sent its answer head for attempt `attempt` of `fp`
/// (`retry_after_ms`: the hint a 429 carried, 0 for none).
pub fn upstream_answer(fp: &str, attempt: u32, status: u16, retry_after_ms: u64) {
    ev!("upstream.answer", fp, attempt, status, retry_after_ms);
}

// ---- simulated browsers ---------------------------------------------------

/// A tab sent a generation request.
pub fn tab_send(user: &str, tab: u32, fp: &str, stream: bool) {
    ev!("tab.send", user, tab, fp, stream);
}

/// A tab dropped its connection with a request in flight (a refresh).
pub fn tab_abandon(user: &str, tab: u32, fp: &str) {
    ev!("tab.abandon", user, tab, fp);
}

/// A tab got a terminal answer: `got` is the fingerprint the answer carries
/// (empty for an error answer), `status` the HTTP status.
pub fn tab_recv(user: &str, tab: u32, fp: &str, got: &str, status: u16, error: bool) {
    ev!("tab.recv", user, tab, fp, got, status, error);
}

/// A tab gave up waiting for an answer (its request timeout passed).
pub fn tab_timeout(user: &str, tab: u32, fp: &str) {
    ev!("tab.timeout", user, tab, fp);
}

/// A tab's request failed at the transport (connection refused or reset).
pub fn tab_io_error(user: &str, tab: u32, fp: &str, error: &str) {
    ev!("tab.io_error", user, tab, fp, error);
}

/// A tab sends a logout while its generation `fp` is pending (the logout
/// may take effect even if the tab never reads its answer).
pub fn tab_logout_sent(user: &str, tab: u32, fp: &str) {
    ev!("tab.logout_sent", user, tab, fp);
}

/// An administrator sends `action` ("disable" or "delete") against the
/// tab's user while its generation `fp` is pending.
pub fn tab_admin_sent(user: &str, tab: u32, fp: &str, action: &str) {
    ev!("tab.admin_sent", user, tab, fp, action);
}

/// The administrator's action was answered (`status`: 0 for none).
pub fn tab_admin(user: &str, tab: u32, fp: &str, action: &str, status: u16) {
    ev!("tab.admin", user, tab, fp, action, status);
}

/// A tab logged out while its generation `fp` was pending (`status`: the
/// logout's answer, 0 for none).
pub fn tab_logout(user: &str, tab: u32, fp: &str, status: u16) {
    ev!("tab.logout", user, tab, fp, status);
}

/// A tab reloaded the page and re-read its session.
pub fn tab_reload(user: &str, tab: u32, status: u16) {
    ev!("tab.reload", user, tab, status);
}

// ---- the world ------------------------------------------------------------

/// The harness took the proxy host down (its process exited).
pub fn world_proxy_crash(reason: &str) {
    tracing::error!(target: "tavernsim::ev", kind = "world.proxy_crash", reason);
}

/// The link between the proxy and the upstream changed (a scheduled fault
/// began or ended).
pub fn world_link(partitioned: bool, held: bool) {
    tracing::warn!(target: "tavernsim::ev", kind = "world.link", partitioned, held);
}

/// The proxy process went down (`up` false) or started again (`up` true)
/// as the schedule planned.
pub fn world_restart(up: bool) {
    tracing::warn!(target: "tavernsim::ev", kind = "world.restart", up);
}
