//! The fixed design: the whole retry loop (attempt, classify, wait) runs
//! inside the handler future.
//!
//! Every wait is a biased `select!` against the request's cancellation
//! token; hyper drops the handler future when the client goes away, and
//! that drop releases the request (its guard) and cancels the upstream call
//! in flight. No task outlives its request.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::classify::{ClassifyLimits, Decision, classify};
use super::forward::{self, ForwardError};
use super::requests::{Phase, RequestGuard};
use super::retry::Next;
use super::{Dialect, Job};
use crate::events;

/// How a request ended without a completion.
struct GiveUp {
    status: u16,
    message: String,
    retry_after_ms: Option<u64>,
    quota: bool,
}

pub async fn run(job: Job) -> Response {
    let Job {
        state,
        guard,
        body,
        stream,
        dialect,
        user_key,
    } = job;
    let key = guard.key();
    let id = key.id();
    let table = guard.table().clone();
    let Ok(cancel) = table.cancel_token(key) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let policy = &state.cfg.retry;
    let limits = ClassifyLimits {
        wait_ms_max: policy.wait_ms_max,
    };
    let deadline = Instant::now() + Duration::from_millis(policy.deadline_ms);
    let mut attempt = 0u32;
    let give_up = loop {
        attempt += 1;
        if table
            .transition(key, &["admitted", "backoff"], Phase::Sending { attempt })
            .is_err()
        {
            break cancelled_give_up();
        }
        events::attempt_start(id, attempt);
        let attempt_deadline =
            deadline.min(Instant::now() + Duration::from_millis(policy.attempt_timeout_ms));
        let sent = tokio::select! {
            biased;
            _ = cancel.cancelled() => break cancelled_give_up(),
            r = tokio::time::timeout_at(attempt_deadline, state.upstream.send(body.clone(), user_key.as_deref())) => r,
        };
        let (status, headers, upstream_body) = match sent {
            Err(_elapsed) => (0, http::HeaderMap::new(), Ok(Bytes::new())),
            Ok(Err(e)) => (0, http::HeaderMap::new(), Err(e)),
            Ok(Ok(resp)) if resp.status().is_success() => {
                events::attempt_end(id, attempt, resp.status().as_u16(), "success", 0);
                return deliver(&state, guard, resp, stream, deadline, &cancel).await;
            }
            Ok(Ok(resp)) => {
                let (parts, b) = resp.into_parts();
                let read = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break cancelled_give_up(),
                    r = tokio::time::timeout_at(deadline, forward::read_body(b, state.cfg.upstream_body_bytes_max)) => r,
                };
                let read =
                    read.unwrap_or_else(|_| Err(ForwardError::Body("deadline passed".into())));
                (parts.status.as_u16(), parts.headers, read)
            }
        };
        let upstream_body = upstream_body.unwrap_or_default();
        let c = if status == 0 {
            super::classify::Classification {
                decision: Decision::Backoff,
                wait_ms: None,
                reason: "no answer from upstream".into(),
            }
        } else {
            classify(status, &headers, &upstream_body, state.clock.now(), &limits)
        };
        let remaining_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let next = state.with_rng(|rng| policy.next(&c, attempt, remaining_ms, rng));
        match next {
            Next::GiveUp { retry_after_ms } => {
                events::attempt_end(id, attempt, status, "give-up", retry_after_ms.unwrap_or(0));
                break GiveUp {
                    status: if status == 0 { 504 } else { status },
                    message: upstream_message(&upstream_body).unwrap_or(c.reason),
                    retry_after_ms,
                    quota: is_quota(&upstream_body),
                };
            }
            Next::Wait { wait_ms } => {
                events::attempt_end(
                    id,
                    attempt,
                    status,
                    if c.decision == Decision::Retry {
                        "retry"
                    } else {
                        "backoff"
                    },
                    wait_ms,
                );
                if table
                    .transition(key, &["sending"], Phase::Backoff { attempt })
                    .is_err()
                {
                    break cancelled_give_up();
                }
                events::retry_armed(id, wait_ms);
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break cancelled_give_up(),
                    _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                }
            }
        }
    };
    let _ = table.transition(key, &["admitted", "sending", "backoff"], Phase::Finished);
    events::client_write(id, "error");
    give_up_response(dialect, give_up)
}

fn cancelled_give_up() -> GiveUp {
    GiveUp {
        status: 499,
        message: "request cancelled (logged out, or the user was disabled or deleted)".into(),
        retry_after_ms: None,
        quota: false,
    }
}

/// Hands a successful upstream answer to the client.
async fn deliver(
    state: &super::ProxyState,
    guard: RequestGuard,
    resp: hyper::Response<hyper::body::Incoming>,
    stream: bool,
    deadline: Instant,
    cancel: &tokio_util::sync::CancellationToken,
) -> Response {
    let key = guard.key();
    let table = guard.table().clone();
    let (parts, body) = resp.into_parts();
    if stream {
        if table
            .transition(key, &["sending"], Phase::Streaming)
            .is_err()
        {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        events::client_write(key.id(), "head");
        // The guard moves into the body: it is released when the stream ends
        // or when hyper drops the body because the client left.
        let body = forward::passthrough(body, guard, |g: &RequestGuard| {
            let _ = g
                .table()
                .transition(g.key(), &["streaming"], Phase::Finished);
            events::client_write(g.key().id(), "end");
        });
        let mut out = Response::new(body);
        *out.status_mut() = parts.status;
        copy_header(&parts.headers, out.headers_mut(), header::CONTENT_TYPE);
        out.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return out;
    }
    let read = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(ForwardError::Body("request cancelled".into())),
        r = tokio::time::timeout_at(deadline, forward::read_body(body, state.cfg.upstream_body_bytes_max)) =>
            r.unwrap_or_else(|_| Err(ForwardError::Body("deadline passed".into()))),
    };
    let _ = table.transition(key, &["sending"], Phase::Finished);
    events::client_write(key.id(), "end");
    // A 2xx whose body is not JSON is garbage, not a completion: say so
    // instead of handing it on.
    let read = read.and_then(|bytes| {
        match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            Ok(_) => Ok(bytes),
            Err(e) => Err(ForwardError::Garbage(format!(
                "the upstream answered {} with a body that is not JSON ({e}); check upstream_url",
                parts.status.as_u16()
            ))),
        }
    });
    match read {
        Ok(bytes) => {
            let mut out = Response::new(axum::body::Body::from(bytes));
            copy_header(&parts.headers, out.headers_mut(), header::CONTENT_TYPE);
            out
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            axum::Json(json!({"error": {"message": e.to_string(), "type": "upstream_error"}})),
        )
            .into_response(),
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
