//! The mock OpenAI-compatible upstream: `POST /v1/chat/completions`, JSON
//! and SSE, each attempt answered from a seeded script.
//!
//! # Brief overview
//! - [`UpstreamScript`]: how often attempts get a 429 (with or without
//!   `Retry-After`), a 5xx, or a 200 that breaks off midway, how long
//!   answers take, how streams are chunked.
//! - [`MockUpstream`] holds the script and a seeded generator; [`app`]
//!   serves it as an axum `Router`, on either network.
//! - [`fingerprint`]: a digest of a request's messages. Every completion
//!   carries the fingerprint of the request it answers, so a client can
//!   prove an answer is its own.
//!
//! Every attempt is reported as an `upstream.attempt` event.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::events;

/// Largest request body the mock reads.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Length of a fingerprint in hex characters.
pub const FINGERPRINT_CHARS: usize = 16;

/// How the mock answers attempts. Probabilities are per attempt.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamScript {
    /// Share of attempts answered 429.
    pub p_429: f64,
    /// Share of 429s that carry a `Retry-After` header.
    pub p_retry_after: f64,
    /// Largest `Retry-After` the mock sends, in whole seconds.
    pub retry_after_s_max: u64,
    /// Share of attempts answered 500 or 503.
    pub p_5xx: f64,
    /// Share of attempts answered 200 whose body breaks off midway (see
    /// [`Answer::StreamReset`]). 0 by default: no draw changes then.
    pub p_stream_reset: f64,
    /// Time before the answer head, drawn uniformly from this range.
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
    /// A streamed completion comes in this many chunks...
    pub stream_chunks: u32,
    /// ...this far apart.
    pub chunk_gap_ms: u64,
}

impl Default for UpstreamScript {
    fn default() -> Self {
        Self {
            p_429: 0.5,
            p_retry_after: 0.5,
            retry_after_s_max: 3,
            p_5xx: 0.05,
            p_stream_reset: 0.0,
            delay_ms_min: 20,
            delay_ms_max: 400,
            stream_chunks: 4,
            chunk_gap_ms: 100,
        }
    }
}

impl UpstreamScript {
    /// Checks the script's values; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("p_429", self.p_429),
            ("p_retry_after", self.p_retry_after),
            ("p_5xx", self.p_5xx),
            ("p_stream_reset", self.p_stream_reset),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "upstream.{name} = {p}: a probability must be within 0.0..=1.0"
                ));
            }
        }
        if self.p_429 + self.p_5xx + self.p_stream_reset > 1.0 {
            return Err(
                "upstream.p_429 + upstream.p_5xx + upstream.p_stream_reset must not exceed 1.0"
                    .into(),
            );
        }
        if self.delay_ms_min > self.delay_ms_max {
            return Err("upstream.delay_ms_min must not exceed upstream.delay_ms_max".into());
        }
        if self.delay_ms_max > 600_000
            || self.retry_after_s_max > 3_600
            || self.chunk_gap_ms > 60_000
        {
            return Err("upstream: delay_ms_max <= 600000, retry_after_s_max <= 3600, chunk_gap_ms <= 60000".into());
        }
        if !(1..=1_000).contains(&self.stream_chunks) {
            return Err("upstream.stream_chunks must be within 1..=1000".into());
        }
        Ok(())
    }
}

/// What the mock does with one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    TooMany {
        retry_after_s: Option<u64>,
    },
    ServerError(u16),
    Complete,
    /// A 200 whose body breaks off: the connection is aborted mid-body.
    /// A streamed completion sends its head and `after_chunks` of its
    /// chunks, never `[DONE]` (with 0, the connection usually breaks before
    /// even the head got out: a reset before the head); a non-streamed one
    /// sends its head and the first half of its JSON body (`after_chunks`
    /// does not matter then). Either way the reader never sees a complete
    /// answer.
    StreamReset {
        after_chunks: u32,
    },
}

impl Answer {
    fn name(self) -> &'static str {
        match self {
            Answer::TooMany {
                retry_after_s: Some(_),
            } => "429-retry-after",
            Answer::TooMany {
                retry_after_s: None,
            } => "429",
            Answer::ServerError(_) => "5xx",
            Answer::Complete => "complete",
            Answer::StreamReset { .. } => "stream-reset",
        }
    }
}

/// What the mock tells whoever listens (a tab aiming its refresh), as it
/// happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockNote {
    pub fp: String,
    pub attempt: u32,
    /// 0: the attempt arrived; else the status the mock answered with.
    pub status: u16,
}

/// Notes kept for slow listeners; older ones are dropped for them.
const NOTES_CAPACITY: usize = 1024;

/// The mock's state: script, generator, attempt counts.
pub struct MockUpstream {
    script: UpstreamScript,
    rng: Mutex<ChaCha8Rng>,
    attempts: Mutex<BTreeMap<String, u32>>,
    notes: tokio::sync::broadcast::Sender<MockNote>,
    /// Answers decided in advance (a simulated world's schedule), by
    /// fingerprint and attempt; the script's draws when absent.
    planned: Option<Planned>,
}

/// Decides an attempt in advance: `(fingerprint, attempt)` to the answer
/// and the delay before it; `None` answers with a completion after the
/// script's shortest delay.
pub type Planned = Arc<dyn Fn(&str, u32) -> Option<(Answer, Duration)> + Send + Sync>;

impl MockUpstream {
    pub fn new(script: UpstreamScript, seed: u64) -> Arc<Self> {
        Self::build(script, seed, Self::notes_channel(), None)
    }

    /// A mock whose every answer is planned (see [`Planned`]), telling
    /// `notes` about every attempt.
    pub fn planned(
        script: UpstreamScript,
        planned: Planned,
        notes: tokio::sync::broadcast::Sender<MockNote>,
    ) -> Arc<Self> {
        Self::build(script, 0, notes, Some(planned))
    }

    /// A mock that tells `notes` about every attempt (shared with tabs that
    /// aim their refreshes).
    pub fn with_notes(
        script: UpstreamScript,
        seed: u64,
        notes: tokio::sync::broadcast::Sender<MockNote>,
    ) -> Arc<Self> {
        Self::build(script, seed, notes, None)
    }

    fn build(
        script: UpstreamScript,
        seed: u64,
        notes: tokio::sync::broadcast::Sender<MockNote>,
        planned: Option<Planned>,
    ) -> Arc<Self> {
        Arc::new(Self {
            script,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            attempts: Mutex::new(BTreeMap::new()),
            notes,
            planned,
        })
    }

    /// A channel for [`MockUpstream::with_notes`].
    pub fn notes_channel() -> tokio::sync::broadcast::Sender<MockNote> {
        tokio::sync::broadcast::channel(NOTES_CAPACITY).0
    }

    /// Hears about every attempt as it arrives and as it is answered.
    pub fn listen(&self) -> tokio::sync::broadcast::Receiver<MockNote> {
        self.notes.subscribe()
    }

    fn note(&self, fp: &str, attempt: u32, status: u16) {
        // Nobody listening is fine.
        let _ = self.notes.send(MockNote {
            fp: fp.to_string(),
            attempt,
            status,
        });
    }

    /// The answer and the delay for attempt `attempt` of `fp`: planned, or
    /// drawn from the script.
    fn decide(&self, fp: &str, attempt: u32) -> (Answer, Duration) {
        let s = &self.script;
        if let Some(planned) = &self.planned {
            return planned(fp, attempt)
                .unwrap_or((Answer::Complete, Duration::from_millis(s.delay_ms_min)));
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let delay_ms = rng.random_range(s.delay_ms_min..=s.delay_ms_max);
        let roll: f64 = rng.random();
        let answer = if roll < s.p_429 {
            let hinted = rng.random_bool(s.p_retry_after);
            Answer::TooMany {
                retry_after_s: hinted.then(|| rng.random_range(0..=s.retry_after_s_max)),
            }
        } else if roll < s.p_429 + s.p_5xx {
            Answer::ServerError(if rng.random_bool(0.5) { 500 } else { 503 })
        } else if roll < s.p_429 + s.p_5xx + s.p_stream_reset {
            Answer::StreamReset {
                after_chunks: rng.random_range(0..s.stream_chunks),
            }
        } else {
            Answer::Complete
        };
        (answer, Duration::from_millis(delay_ms))
    }

    fn count_attempt(&self, fp: &str) -> u32 {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let n = attempts.entry(fp.to_string()).or_insert(0);
        *n += 1;
        *n
    }
}

/// The mock's routes.
pub fn app(mock: Arc<MockUpstream>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/health", get(|| async { "ok" }))
        .with_state(mock)
}

/// Digest of a request's messages: the contents of every message, in order.
pub fn fingerprint(messages: &Value) -> String {
    let mut hasher = Sha256::new();
    if let Some(list) = messages.as_array() {
        for m in list {
            let content = m.get("content").map(content_text).unwrap_or_default();
            hasher.update((content.len() as u64).to_le_bytes());
            hasher.update(content.as_bytes());
        }
    }
    let mut out = hex::encode(hasher.finalize());
    out.truncate(FINGERPRINT_CHARS);
    out
}

fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Finds the fingerprint an answer's text carries (`fp=<hex>`).
pub fn fingerprint_in(text: &str) -> Option<&str> {
    let start = text.find("fp=")? + 3;
    let candidate = text.get(start..start + FINGERPRINT_CHARS)?;
    candidate
        .bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then_some(candidate)
}

async fn chat_completions(State(mock): State<Arc<MockUpstream>>, body: Bytes) -> Response {
    if body.len() > BODY_BYTES_MAX {
        return openai_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
            "invalid_request_error",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "request body is not JSON",
            "invalid_request_error",
        );
    };
    let fp = fingerprint(request.get("messages").unwrap_or(&Value::Null));
    let user = request
        .get("user")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let attempt = mock.count_attempt(&fp);
    let (answer, delay) = mock.decide(&fp, attempt);
    events::upstream_attempt(&fp, attempt, &user, answer.name());
    mock.note(&fp, attempt, 0);
    // A zero delay answers at once: even sleep(0) waits for a timer tick.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, hint_ms) = match answer {
        Answer::TooMany { retry_after_s } => (429, retry_after_s.unwrap_or(0) * 1000),
        Answer::ServerError(code) => (code, 0),
        Answer::Complete | Answer::StreamReset { .. } => (200, 0),
    };
    events::upstream_answer(&fp, attempt, status, hint_ms);
    mock.note(&fp, attempt, status);
    match answer {
        Answer::TooMany { retry_after_s } => too_many(retry_after_s),
        Answer::ServerError(code) => openai_error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "The server had an error while processing your request.",
            "server_error",
        ),
        Answer::Complete if stream => stream_completion(&mock.script, &fp, None),
        Answer::Complete => completion(&fp),
        Answer::StreamReset { after_chunks } if stream => {
            stream_completion(&mock.script, &fp, Some(after_chunks))
        }
        Answer::StreamReset { .. } => truncated_completion(&fp),
    }
}

fn too_many(retry_after_s: Option<u64>) -> Response {
    let mut resp = openai_error(
        StatusCode::TOO_MANY_REQUESTS,
        "Rate limit reached for requests in organization org-mock on requests per min (RPM).",
        "requests",
    );
    if let Some(s) = retry_after_s {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

fn openai_error(status: StatusCode, message: &str, kind: &str) -> Response {
    let code = if status == StatusCode::TOO_MANY_REQUESTS {
        json!("rate_limit_exceeded")
    } else {
        Value::Null
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

fn answer_text(fp: &str) -> String {
    format!("Mock answer for fp={fp}. The quick brown fox jumps over the lazy dog.")
}

fn completion(fp: &str) -> Response {
    axum::Json(completion_json(fp)).into_response()
}

fn completion_json(fp: &str) -> Value {
    json!({
        "id": format!("chatcmpl-{fp}"),
        "object": "chat.completion",
        "model": "mock-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_text(fp)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}
    })
}

/// The body error that aborts a broken answer's connection.
fn reset() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "the mock broke the answer off",
    )
}

/// A completion whose JSON body breaks off halfway: the head, half the
/// body, then the connection is aborted.
fn truncated_completion(fp: &str) -> Response {
    let mut text = completion_json(fp).to_string();
    text.truncate(text.len() / 2);
    let parts = [Ok(Bytes::from(text)), Err(reset())];
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures::stream::iter(parts)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A streamed completion; with `reset_after`, only that many of its chunks,
/// then the connection is aborted (no `[DONE]`).
fn stream_completion(script: &UpstreamScript, fp: &str, reset_after: Option<u32>) -> Response {
    let text = answer_text(fp);
    let pieces = split_even(&text, script.stream_chunks as usize);
    let gap = Duration::from_millis(script.chunk_gap_ms);
    let id = format!("chatcmpl-{fp}");
    let mut frames: Vec<String> = pieces
        .into_iter()
        .map(|p| {
            let chunk = json!({"id": id, "object": "chat.completion.chunk", "model": "mock-1",
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]});
            format!("data: {chunk}\n\n")
        })
        .collect();
    let frames: Vec<Result<Bytes, std::io::Error>> = match reset_after {
        None => {
            frames.push("data: [DONE]\n\n".to_string());
            frames.into_iter().map(|f| Ok(Bytes::from(f))).collect()
        }
        Some(n) => {
            frames.truncate(n as usize);
            let sent = frames.into_iter().map(|f| Ok(Bytes::from(f)));
            sent.chain(std::iter::once(Err(reset()))).collect()
        }
    };
    let stream = futures::stream::unfold(
        (frames.into_iter(), true),
        move |(mut it, first)| async move {
            let frame = it.next()?;
            if !first {
                tokio::time::sleep(gap).await;
            }
            Some((frame, (it, false)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Splits `text` into `n` pieces of about equal length, on char boundaries.
fn split_even(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    let size = chars.len().div_ceil(n);
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_distinguishes_messages_and_is_found_in_answers() {
        let a = json!([{"role": "user", "content": "hello 1"}]);
        let b = json!([{"role": "user", "content": "hello 2"}]);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        let fp = fingerprint(&a);
        assert_eq!(fingerprint_in(&answer_text(&fp)), Some(fp.as_str()));
        assert_eq!(fingerprint_in("no marker"), None);
        assert_eq!(fingerprint_in("fp=zz"), None);
    }

    #[test]
    fn split_even_keeps_every_char() {
        for n in [1, 3, 4, 100] {
            let parts = split_even("héllo wörld", n);
            assert_eq!(parts.concat(), "héllo wörld");
        }
    }

    #[test]
    fn script_validation_names_the_field() {
        let bad = UpstreamScript {
            p_429: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("p_429"));
        assert!(UpstreamScript::default().validate().is_ok());
        let too_many = UpstreamScript {
            p_429: 0.5,
            p_5xx: 0.2,
            p_stream_reset: 0.4,
            ..Default::default()
        };
        assert!(too_many.validate().unwrap_err().contains("p_stream_reset"));
    }

    /// The mock's answer to `messages` (its first attempt breaks off after
    /// two chunks): the bytes it sent, and whether the body ended in an
    /// error.
    async fn first_answer(content: &str, stream: bool) -> (String, bool) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let planned: Planned = Arc::new(|_, attempt| {
            (attempt == 1).then_some((Answer::StreamReset { after_chunks: 2 }, Duration::ZERO))
        });
        let mock = MockUpstream::planned(
            UpstreamScript::default(),
            planned,
            MockUpstream::notes_channel(),
        );
        let body = json!({"messages": [{"role": "user", "content": content}], "stream": stream});
        let req = http::Request::post("/v1/chat/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app(mock).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut seen = String::new();
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    seen.push_str(std::str::from_utf8(f.data_ref().unwrap()).unwrap());
                }
                Some(Err(_)) => return (seen, true),
                None => return (seen, false),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_reset_breaks_the_answer_off_midway() {
        let (seen, broke) = first_answer("streamed", true).await;
        assert!(broke, "the stream ended cleanly: {seen}");
        assert_eq!(seen.matches("data: ").count(), 2, "{seen}");
        assert!(!seen.contains("[DONE]"), "{seen}");
        let (seen, broke) = first_answer("not streamed", false).await;
        assert!(broke, "the answer ended cleanly: {seen}");
        assert!(seen.starts_with("{\"") && !seen.is_empty(), "{seen}");
        assert!(serde_json::from_str::<Value>(&seen).is_err(), "{seen}");
    }
}
