//! The fixed design: the whole retry loop (attempt, classify, wait) runs
//! inside the handler future.
//!
//! Every wait is a biased `select!` against the request's cancellation
//! token; hyper drops the handler future when the client goes away, and
//! that drop releases the request (its guard) and cancels the upstream call
//! in flight. No task outlives its request.
//!
//! The mutants ([`Mutant`]) are this code with one defect each, marked
//! where they differ by `cx.mutant(Mutant::...)`.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::Either;
use serde_json::{Value, json};
use tokio::time::Instant;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::classify::{Classification, ClassifyLimits, Decision, classify};
use super::fair::Permit;
use super::forward;
use super::gate::{GateState, wake_at};
use super::mutants::{self, CatchOnAbort, Mutant};
use super::requests::{Phase, RequestGuard, RequestKey};
use super::retry::Next;
use super::{Dialect, Job, ProxyError, ProxyState};
use crate::events;

/// How a request ended without a completion.
struct GiveUp {
    status: u16,
    message: String,
    retry_after_ms: Option<u64>,
    quota: bool,
}

/// Per-request context of the retry loop.
struct Ctx<'a> {
    state: &'a ProxyState,
    key: RequestKey,
    cancel: &'a CancellationToken,
    deadline: Instant,
    /// Which upstream key the gate and budget count against.
    upstream_id: String,
    /// Which gate the request waits at (the upstream key's).
    gate_id: String,
}

/// The waits of the retry loop, each of which watches the request's
/// cancellation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Gate,
    Place,
    Attempt,
    Body,
    Backoff,
}

impl Ctx<'_> {
    fn remaining_ms(&self) -> u64 {
        self.deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64
    }

    fn mutant(&self, m: Mutant) -> bool {
        self.state.cfg.variant.mutant() == Some(m)
    }

    /// Whether `wait` listens for the request's cancellation (always, but
    /// for two mutants).
    fn watches(&self, wait: Wait) -> bool {
        match self.state.cfg.variant.mutant() {
            // Only a backoff already armed when the cancellation comes sees it.
            Some(Mutant::CancelMissedBeforeArm) => wait == Wait::Backoff,
            // The retry asks whether its user still resolves instead.
            Some(Mutant::RetryReresolvesUser) => false,
            _ => true,
        }
    }
}

pub async fn run(job: Job) -> Response {
    let hook = (job.state.cfg.variant.mutant() == Some(Mutant::CancelBySession))
        .then(|| {
            let table = job.guard.table().clone();
            let sid = table.read(job.guard.key(), "session", |e| e.meta.session_id);
            sid.ok()
                .map(|sid| mutants::SessionCancelOnDrop::arm(table, sid))
        })
        .flatten();
    let response = handle(job).await;
    if let Some(h) = hook {
        h.disarm();
    }
    response
}

async fn handle(job: Job) -> Response {
    let Job {
        state,
        guard,
        user,
        body,
        stream,
        dialect,
        user_key,
    } = job;
    let key = guard.key();
    let table = guard.table().clone();
    let Ok(cancel) = table.cancel_token(key) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let upstream_id = match user_key {
        Some(_) => format!("user:{user}"),
        None => "shared".to_string(),
    };
    let gate_id = match state.cfg.variant.mutant() {
        Some(Mutant::GatePerUser) => format!("user:{user}"),
        _ => upstream_id.clone(),
    };
    let policy = &state.cfg.retry;
    let cx = Ctx {
        state: &state,
        key,
        cancel: &cancel,
        deadline: Instant::now() + Duration::from_millis(policy.deadline_ms),
        upstream_id,
        gate_id,
    };
    if cx.mutant(Mutant::CapCountsAllUsers) && table.len() > state.cfg.fairness.user_requests_max {
        return ProxyError::TooManyAttempts {
            message: "too many requests in flight".into(),
            retry_after_s: 1,
        }
        .into_response();
    }
    let limits = ClassifyLimits {
        wait_ms_max: policy.wait_ms_max,
    };
    state.budget.on_request(&cx.upstream_id);
    let mut attempt = 0u32;
    let give_up = loop {
        attempt += 1;
        let permit = match gate_then_place(&cx, &user).await {
            Ok(p) => p,
            Err(g) => break g,
        };
        if table
            .transition(
                key,
                &["admitted", "backoff", "gate-wait"],
                Phase::Sending { attempt },
            )
            .is_err()
        {
            break cancelled_give_up();
        }
        if cx.mutant(Mutant::RetryReresolvesUser)
            && !state.users().get(&user).is_some_and(|u| u.enabled)
        {
            break cancelled_give_up();
        }
        events::attempt_start(key.id(), attempt);
        let attempt_deadline = cx
            .deadline
            .min(Instant::now() + Duration::from_millis(policy.attempt_timeout_ms));
        let catch = cx
            .mutant(Mutant::AbortWritesError)
            .then(|| CatchOnAbort::arm(key));
        let sent = tokio::select! {
            biased;
            _ = cancel.cancelled(), if cx.watches(Wait::Attempt) => break cancelled_give_up(),
            r = tokio::time::timeout_at(attempt_deadline, send(&cx, &body, stream, user_key.as_deref())) => r,
        };
        if let Some(c) = catch {
            c.disarm();
        }
        let answer = match sent {
            Err(_elapsed) => Answer::none(&format!(
                "no answer from the upstream within {} ms",
                policy.attempt_timeout_ms
            )),
            Ok(Err(e)) => Answer::none(&format!("no answer from the upstream: {e}")),
            Ok(Ok(resp)) if resp.status().is_success() && stream => {
                events::attempt_end(key.id(), attempt, resp.status().as_u16(), "success", 0);
                let again = cx
                    .mutant(Mutant::StreamRetriedAfterBytes)
                    .then(|| mutants::Resend {
                        upstream: state.upstream.clone(),
                        key,
                        body: body.clone(),
                        user_key: user_key.clone(),
                        attempt,
                        left: policy.attempts_max.saturating_sub(attempt),
                    });
                return deliver_stream(&cx, guard, permit, resp, again);
            }
            Ok(Ok(resp)) => match read_answer(&cx, resp).await {
                Some(a) => a,
                None => break cancelled_give_up(),
            },
        };
        drop(permit);
        let c = match answer.status {
            0 => Classification {
                decision: Decision::Backoff,
                wait_ms: None,
                reason: answer.note.clone(),
            },
            // A 2xx is classified too: some providers put the error in it.
            s => classify(s, &answer.headers, &answer.body, state.clock.now(), &limits),
        };
        if c.decision == Decision::Success {
            events::attempt_end(key.id(), attempt, answer.status, "success", 0);
            let response = deliver_body(&table, key, answer);
            hold_in(&table, key, state.phase_hold.get(), "finished").await;
            return response;
        }
        if let Err(g) = after_failure(&cx, attempt, &answer, &c).await {
            break g;
        }
    };
    let _ = table.transition(
        key,
        &["admitted", "sending", "backoff", "gate-wait"],
        Phase::Finished,
    );
    events::client_write(key.id(), "error");
    if cx.mutant(Mutant::LeakOnErrorPath) {
        std::mem::forget(guard);
    }
    give_up_response(dialect, give_up)
}

/// Sends one attempt upstream; resolves when its head arrives.
async fn send(
    cx: &Ctx<'_>,
    body: &Bytes,
    stream: bool,
    user_key: Option<&str>,
) -> Result<hyper::Response<hyper::body::Incoming>, forward::ForwardError> {
    let (state, key) = (cx.state, cx.key);
    let owned_key = || user_key.map(str::to_string);
    if cx.mutant(Mutant::SlotReuseNoGeneration) {
        let boxes = &state.reply_boxes;
        return boxes
            .send(&state.upstream, key, body.clone(), owned_key())
            .await;
    }
    if cx.mutant(Mutant::StreamPipedAfterClose) && stream {
        return mutants::pipe_detached(&state.upstream, key, body.clone(), owned_key()).await;
    }
    state.upstream.send(body.clone(), user_key).await
}

/// An upstream answer that was not a success (status 0: none at all).
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
    note: String,
}

impl Answer {
    fn none(note: &str) -> Self {
        Self {
            status: 0,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
            note: note.to_string(),
        }
    }
}

/// Reads an answer's body (bounded); None when the request was cancelled.
/// A 2xx whose body breaks off counts as no answer (status 0): nothing
/// reached the client yet, so it may be tried again like a lost answer.
async fn read_answer(cx: &Ctx<'_>, resp: hyper::Response<hyper::body::Incoming>) -> Option<Answer> {
    let (parts, b) = resp.into_parts();
    let read = tokio::select! {
        biased;
        _ = cx.cancel.cancelled(), if cx.watches(Wait::Body) => return None,
        r = tokio::time::timeout_at(cx.deadline, forward::read_body(b, cx.state.cfg.upstream_body_bytes_max)) => r,
    };
    let (body, note) = match read {
        Ok(Ok(b)) => (b, String::new()),
        Ok(Err(e @ forward::ForwardError::Body(_))) if parts.status.is_success() => {
            return Some(Answer::none(&e.to_string()));
        }
        Ok(Err(e)) => (Bytes::new(), e.to_string()),
        Err(_) => (Bytes::new(), "deadline passed".to_string()),
    };
    Some(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        note,
    })
}

/// Decides and waits after a failed attempt; Err ends the request.
async fn after_failure(
    cx: &Ctx<'_>,
    attempt: u32,
    a: &Answer,
    c: &Classification,
) -> Result<(), GiveUp> {
    let (state, id) = (cx.state, cx.key.id());
    if cx.mutant(Mutant::PanicOnUnhinted429) && a.status == 429 {
        let hint = a.headers[header::RETRY_AFTER].to_str().unwrap_or("0");
        tracing::debug!(hint, "429 hint");
    }
    let ignored;
    let c = if cx.mutant(Mutant::IgnoresRetryAfter) {
        ignored = Classification {
            wait_ms: None,
            ..c.clone()
        };
        &ignored
    } else {
        c
    };
    if a.status == 429
        && c.decision == Decision::Retry
        && let Some(ms) = c.wait_ms.filter(|_| state.cfg.gate.enabled)
    {
        // Every user's requests to this key wait for the hint, not just this one.
        state
            .gates
            .close_until(&cx.gate_id, Instant::now() + Duration::from_millis(ms));
    }
    let policy = &state.cfg.retry;
    let next = state.with_rng(|rng| policy.next(c, attempt, cx.remaining_ms(), rng));
    let give_up = |retry_after_ms: Option<u64>, reason: &str| GiveUp {
        status: if a.status == 0 { 504 } else { a.status },
        message: upstream_message(&a.body).unwrap_or_else(|| reason.to_string()),
        retry_after_ms,
        quota: is_quota(&a.body),
    };
    let wait_ms = match next {
        Next::GiveUp { retry_after_ms } => {
            events::attempt_end(
                id,
                attempt,
                a.status,
                "give-up",
                retry_after_ms.unwrap_or(0),
            );
            return Err(give_up(retry_after_ms, &c.reason));
        }
        Next::Wait { wait_ms } => wait_ms,
    };
    let retry_left = if cx.mutant(Mutant::BudgetNeverCharged) {
        state.budget.peek_retry(&cx.upstream_id)
    } else {
        state.budget.try_retry(&cx.upstream_id)
    };
    if !retry_left {
        events::attempt_end(id, attempt, a.status, "budget-exhausted", wait_ms);
        return Err(give_up(
            Some(wait_ms),
            "the upstream is failing; the retry budget is spent",
        ));
    }
    let decision = if c.decision == Decision::Retry {
        "retry"
    } else {
        "backoff"
    };
    events::attempt_end(id, attempt, a.status, decision, wait_ms);
    if state
        .table
        .transition(cx.key, &["sending"], Phase::Backoff { attempt })
        .is_err()
    {
        return Err(cancelled_give_up());
    }
    events::retry_armed(id, wait_ms);
    if cx.mutant(Mutant::TimerNotCancelled) {
        return detached_timer(cx, wait_ms).await;
    }
    // A cancellation that came before the timer was armed is missed.
    let armed_cancelled = cx.mutant(Mutant::CancelMissedBeforeArm) && cx.cancel.is_cancelled();
    let wait = if cx.mutant(Mutant::BackoffInSeconds) {
        Duration::from_secs(wait_ms)
    } else {
        Duration::from_millis(wait_ms)
    };
    tokio::select! {
        biased;
        _ = cx.cancel.cancelled(), if cx.watches(Wait::Backoff) && !armed_cancelled => Err(cancelled_give_up()),
        _ = tokio::time::sleep(wait) => Ok(()),
    }
}

/// [`Mutant::TimerNotCancelled`]: the backoff as a timer nobody keeps a
/// handle to. When it fires it re-reads its request to wake the loop,
/// whether or not that request still exists.
async fn detached_timer(cx: &Ctx<'_>, wait_ms: u64) -> Result<(), GiveUp> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (table, key) = (cx.state.table.clone(), cx.key);
    mutants::spawn_detached(key, "retry_timer", async move {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        if table.read(key, "retry.timer", |_| ()).is_ok() {
            let _ = tx.send(());
        }
    });
    tokio::select! {
        biased;
        _ = cx.cancel.cancelled() => Err(cancelled_give_up()),
        _ = rx => Ok(()),
    }
}

/// Waits for the gate, then for one place among the upstream's concurrent
/// attempts (served round-robin by user, held until the answer is read).
/// The gate is checked again once the place is had: it may have closed
/// while this request queued.
async fn gate_then_place(cx: &Ctx<'_>, user: &str) -> Result<Permit, GiveUp> {
    loop {
        wait_for_gate(cx).await?;
        let permit = tokio::select! {
            biased;
            _ = cx.cancel.cancelled(), if cx.watches(Wait::Place) => return Err(cancelled_give_up()),
            p = cx.state.limiter.acquire(user) => p,
        };
        if !cx.state.cfg.gate.enabled || cx.state.gates.check(&cx.gate_id) == GateState::Open {
            return Ok(permit);
        }
    }
}

/// Waits while the upstream key's gate is closed; Err ends the request
/// (cancelled, or the gate opens only after the deadline).
async fn wait_for_gate(cx: &Ctx<'_>) -> Result<(), GiveUp> {
    let state = cx.state;
    if !state.cfg.gate.enabled {
        return Ok(());
    }
    while let GateState::ClosedUntil(until) = state.gates.check(&cx.gate_id) {
        if until >= cx.deadline {
            let wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
            return Err(GiveUp {
                status: 429,
                message: format!(
                    "the upstream is rate limited for {wait_ms} ms more, past this request's deadline"
                ),
                retry_after_ms: Some(wait_ms),
                quota: false,
            });
        }
        let _ = state.table.transition(
            cx.key,
            &["admitted", "backoff", "gate-wait"],
            Phase::GateWait,
        );
        let spread = state.cfg.gate.spread_ms;
        let wake = wake_at(
            until,
            spread,
            state.with_rng(|r| r.random_range(0..=spread)),
        );
        tokio::select! {
            biased;
            _ = cx.cancel.cancelled(), if cx.watches(Wait::Gate) => return Err(cancelled_give_up()),
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    Ok(())
}

fn cancelled_give_up() -> GiveUp {
    GiveUp {
        status: 499,
        message: "request cancelled (logged out, or the user was disabled or deleted)".into(),
        retry_after_ms: None,
        quota: false,
    }
}

/// Hands a successful streamed answer to the client: the guard and the
/// upstream place move into the body, released when the stream ends or
/// when hyper drops the body because the client left. From here on bytes
/// reach the client, so nothing is sent upstream again: a stream that
/// breaks off ends the client's with an error (`abort`), once.
/// `again` is [`Mutant::StreamRetriedAfterBytes`]'s defect.
fn deliver_stream(
    cx: &Ctx<'_>,
    guard: RequestGuard,
    permit: Permit,
    resp: hyper::Response<hyper::body::Incoming>,
    again: Option<mutants::Resend>,
) -> Response {
    let key = guard.key();
    if guard
        .table()
        .transition(key, &["sending"], Phase::Streaming)
        .is_err()
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let (parts, body) = resp.into_parts();
    events::client_write(key.id(), "head");
    let watch = forward::StreamWatch {
        idle: Some(Duration::from_millis(cx.state.cfg.stream_idle_ms)),
        stop: Some(cx.cancel.clone()),
    };
    // Fields drop in order: the second end comes after the release. Built
    // only for the mutant: an `EndAgain` made and dropped at once (as
    // `then_some` would) reports an end before the body was sent.
    let end_again = if cx.mutant(Mutant::DoubleEnd) {
        Some(EndAgain(key))
    } else {
        None
    };
    let upstream = match again {
        Some(resend) => Either::Right(resend.on_break(body)),
        None => Either::Left(body),
    };
    let body = forward::passthrough(
        upstream,
        (guard, permit, end_again),
        watch,
        |(g, _, _): &(RequestGuard, Permit, Option<EndAgain>), ended| {
            let _ = g
                .table()
                .transition(g.key(), &["streaming"], Phase::Finished);
            let what = match ended {
                forward::Ended::Complete => "end",
                forward::Ended::Cut => "abort",
            };
            events::client_write(g.key().id(), what);
        },
    );
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    copy_header(&parts.headers, out.headers_mut(), header::CONTENT_TYPE);
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out
}

/// [`Mutant::DoubleEnd`]: the close listener ends the response again.
struct EndAgain(RequestKey);

impl Drop for EndAgain {
    fn drop(&mut self) {
        events::client_write(self.0.id(), "end");
    }
}

/// Hands a successful answer's body to the client.
fn deliver_body(
    table: &super::requests::RequestTable,
    key: RequestKey,
    answer: Answer,
) -> Response {
    let _ = table.transition(key, &["sending"], Phase::Finished);
    events::client_write(key.id(), "end");
    // A 2xx whose body is not JSON is garbage, not a completion: say so
    // instead of handing it on.
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body) {
        let message = format!(
            "the upstream answered {} with a body that is not JSON ({e}); check upstream_url",
            answer.status
        );
        return (
            StatusCode::BAD_GATEWAY,
            axum::Json(json!({"error": {"message": message, "type": "upstream_error"}})),
        )
            .into_response();
    }
    let mut out = Response::new(axum::body::Body::from(answer.body));
    *out.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    copy_header(&answer.headers, out.headers_mut(), header::CONTENT_TYPE);
    out
}

/// Waits as a harness's hold asks, if there is one for this request.
async fn hold_in(
    table: &super::requests::RequestTable,
    key: RequestKey,
    hold: Option<&super::PhaseHold>,
    phase: &'static str,
) {
    let Some(hold) = hold else {
        return;
    };
    let Ok(fp) = table.read(key, "hold", |e| e.meta.fingerprint.clone()) else {
        return;
    };
    if let Some(wait) = hold(&fp, phase) {
        wait.await;
    }
}

fn copy_header(from: &http::HeaderMap, to: &mut http::HeaderMap, name: header::HeaderName) {
    if let Some(v) = from.get(&name) {
        to.insert(name, v.clone());
    }
}

/// The upstream error's message, if its body has one.
fn upstream_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn is_quota(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/type")
                .or(v.pointer("/error/code"))
                .and_then(Value::as_str)
                .map(|t| t == "insufficient_quota")
        })
        .unwrap_or(false)
}

/// Answers a request the proxy gave up on, in the caller's dialect.
fn give_up_response(dialect: Dialect, g: GiveUp) -> Response {
    let retry_after_s = g.retry_after_ms.map(|ms| ms.div_ceil(1000));
    match dialect {
        Dialect::SillyTavern => {
            axum::Json(json!({"error": {"message": g.message}, "quota_error": g.quota}))
                .into_response()
        }
        Dialect::OpenAi => {
            let status = StatusCode::from_u16(g.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let status = if status.is_client_error() || status.is_server_error() {
                status
            } else {
                StatusCode::BAD_GATEWAY
            };
            let kind = if g.status == 429 {
                "rate_limit_exceeded"
            } else {
                "upstream_error"
            };
            let mut resp = (status, axum::Json(json!({"error": {"message": g.message, "type": kind, "param": null, "code": null}}))).into_response();
            let h = resp.headers_mut();
            if let Some(s) = retry_after_s {
                h.insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            h.insert("x-should-retry", HeaderValue::from_static("false"));
            resp
        }
    }
}
