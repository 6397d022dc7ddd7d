//! Faithful reproductions of SillyTavern 1.12.6 and 1.12.7's
//! chat-completions retry (`makeRequest`), defects included. For testing
//! only: they exist so the harness can prove it catches the real defect.
//!
//! What they do, step for step (see the project's reference notes):
//! - the handler registers a socket-close listener that aborts the request
//!   ([`CloseListener`]: hyper dropping the handler future is the close);
//! - `makeRequest(retries = 5, timeout = 5000)` runs detached from the
//!   handler; a 429 with retries left arms a plain timer that doubles
//!   `timeout` (5, 10, 20, 40, 80 s) and calls `makeRequest` again;
//!   `Retry-After` is not read and nothing ever cancels the timer;
//! - streaming requests are piped through whatever the status, never
//!   retried;
//! - any error, the abort included, is caught and `{"error":true}` is
//!   written to the response, even when that response was released long ago;
//! - 1.12.7 only: a timer that fires after the abort reuses the aborted
//!   signal, the error escapes every handler, and the process exits.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::forward;
use super::requests::spawn_detached;
use super::requests::{Phase, RequestGuard, RequestKey};
use super::{Job, ProxyState, Variant};
use crate::events;

/// `makeRequest`'s defaults in 1.12.6.
const RETRIES_MAX: u32 = 5;
const FIRST_TIMEOUT_MS: u64 = 5_000;
/// What Node printed as the process died.
const UNCAUGHT: &str = "Uncaught exception: AbortError: The operation was aborted.";

/// Node's `res`: whoever holds it can write to the client, released or not.
struct NodeResponse {
    key: RequestKey,
    tx: Mutex<Option<oneshot::Sender<Response>>>,
}

impl NodeResponse {
    /// `res.send(...)`: reported as a client write whether or not the
    /// client is still there (that is the defect the oracle looks for).
    fn send(&self, what: &str, resp: Response) {
        events::client_write(self.key.id(), what);
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(resp);
        }
    }
}

/// The socket `close` listener: when the handler future is dropped (the
/// client left) the request is released and its abort controller fires.
struct CloseListener {
    guard: Option<RequestGuard>,
    abort: CancellationToken,
}

impl Drop for CloseListener {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.abort.cancel();
    }
}

/// Everything a `makeRequest` closure captures.
struct Call {
    state: Arc<ProxyState>,
    key: RequestKey,
    res: Arc<NodeResponse>,
    abort: CancellationToken,
    body: Bytes,
    stream: bool,
    user_key: Option<String>,
}

pub async fn run(job: Job) -> Response {
    let Job {
        state,
        guard,
        body,
        stream,
        user_key,
        ..
    } = job;
    let key = guard.key();
    let abort = CancellationToken::new();
    let close = CloseListener {
        guard: Some(guard),
        abort: abort.clone(),
    };
    let (tx, rx) = oneshot::channel();
    let call = Arc::new(Call {
        state,
        key,
        res: Arc::new(NodeResponse {
            key,
            tx: Mutex::new(Some(tx)),
        }),
        abort,
        body,
        stream,
        user_key,
    });
    spawn_detached(
        key,
        "make_request",
        make_request(call, RETRIES_MAX, FIRST_TIMEOUT_MS, 1, false),
    );
    let resp = rx.await.unwrap_or_else(|_| error_true());
    if !stream {
        return resp;
    }
    // The passthrough keeps the close listener until the stream ends.
    let (parts, body) = resp.into_parts();
    let body = axum::body::Body::from_stream(WithOwner {
        inner: body.into_data_stream(),
        _owner: close,
    });
    Response::from_parts(parts, body)
}

/// A stream that keeps `_owner` alive as long as it is.
struct WithOwner<S, O> {
    inner: S,
    _owner: O,
}

impl<S: futures::Stream + Unpin, O: Unpin> futures::Stream for WithOwner<S, O> {
    type Item = S::Item;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// `makeRequest(retries, timeout)`.
fn make_request(
    call: Arc<Call>,
    retries: u32,
    timeout_ms: u64,
    attempt: u32,
    from_timer: bool,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let id = call.key.id();
        // The closure re-reads its request (options, user, prompt); after a
        // refresh that state is already released.
        let _ = call
            .state
            .table
            .read(call.key, "retry.read_request", |e| e.meta.user.clone());
        if call.abort.is_cancelled() {
            if from_timer && call.state.cfg.variant == Variant::SillyTavern1127 {
                events::proxy_exit(id, UNCAUGHT);
                call.state.exit.exit(UNCAUGHT);
                return std::future::pending().await;
            }
            // fetch rejects on the aborted signal; the catch writes.
            call.res.send("error", error_true());
            return;
        }
        let _ = call.state.table.transition(
            call.key,
            &["admitted", "backoff"],
            Phase::Sending { attempt },
        );
        events::attempt_start(id, attempt);
        let sent = tokio::select! {
            biased;
            _ = call.abort.cancelled() => None,
            r = call.state.upstream.send(call.body.clone(), call.user_key.as_deref()) => r.ok(),
        };
        let Some(resp) = sent else {
            // AbortError or a network error: caught, `{"error":true}`.
            call.res.send("error", error_true());
            return;
        };
        let status = resp.status();
        if call.stream {
            events::attempt_end(id, attempt, status.as_u16(), "pipe", 0);
            call.res.send("head", pipe(resp));
            return;
        }
        let (parts, body) = resp.into_parts();
        let bytes = tokio::select! {
            biased;
            _ = call.abort.cancelled() => None,
            r = forward::read_body(body, call.state.cfg.upstream_body_bytes_max) => r.ok(),
        };
        let Some(bytes) = bytes else {
            call.res.send("error", error_true());
            return;
        };
        if status.is_success() {
            events::attempt_end(id, attempt, status.as_u16(), "success", 0);
            let _ = call
                .state
                .table
                .transition(call.key, &["sending"], Phase::Finished);
            let mut out = Response::new(axum::body::Body::from(bytes));
            if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
                out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            call.res.send("end", out);
        } else if status == StatusCode::TOO_MANY_REQUESTS && retries > 0 {
            events::attempt_end(id, attempt, 429, "retry", timeout_ms);
            let _ = call
                .state
                .table
                .transition(call.key, &["sending"], Phase::Backoff { attempt });
            arm_timer(call, retries, timeout_ms, attempt);
        } else {
            events::attempt_end(id, attempt, status.as_u16(), "give-up", 0);
            let _ = call
                .state
                .table
                .transition(call.key, &["sending"], Phase::Finished);
            call.res.send("error", quota_answer(status, &bytes));
        }
    })
}

/// `setTimeout(() => makeRequest(retries - 1, timeout * 2), timeout)`: the
/// handle is not kept, so nothing can cancel it.
fn arm_timer(call: Arc<Call>, retries: u32, timeout_ms: u64, attempt: u32) {
    let key = call.key;
    events::retry_armed(key.id(), timeout_ms);
    spawn_detached(key, "retry_timer", async move {
        tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
        make_request(
            call,
            retries - 1,
            timeout_ms.saturating_mul(2),
            attempt + 1,
            true,
        )
        .await;
    });
}

/// Streaming passthrough, any status; 401 becomes 400.
fn pipe(resp: hyper::Response<hyper::body::Incoming>) -> Response {
    let (parts, body) = resp.into_parts();
    let status = if parts.status == StatusCode::UNAUTHORIZED {
        StatusCode::BAD_REQUEST
    } else {
        parts.status
    };
    let mut out = Response::new(forward::passthrough(
        body,
        (),
        forward::StreamWatch::default(),
        |_, _| {},
    ));
    *out.status_mut() = status;
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out
}

fn error_true() -> Response {
    axum::Json(json!({"error": true})).into_response()
}

/// `{"error":{"message"},"quota_error"}` with HTTP 200, as 1.12.6 answers.
fn quota_answer(status: StatusCode, body: &[u8]) -> Response {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("Got response status {}", status.as_u16()));
    let quota = status == StatusCode::TOO_MANY_REQUESTS
        && v.pointer("/error/type").and_then(Value::as_str) == Some("insufficient_quota");
    axum::Json(json!({"error": {"message": message}, "quota_error": quota})).into_response()
}
