//! A browser tab actor: logs in, fetches its CSRF token, sends generations
//! (with the `x-csrf-token` header, as SillyTavern's page does), and
//! refreshes at random moments (drops its connection, waits a page load,
//! reconnects with its cookie, re-reads the session and the CSRF token, and
//! may send again).
//!
//! Every choice comes from the tab's own generator, derived from the seed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::scenario::Scenario;
use crate::events;
use crate::net::{Stream, Transport};
use crate::upstream::{fingerprint, fingerprint_in};

/// Largest answer a tab reads.
const ANSWER_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Connection attempts before a tab decides the proxy is gone.
const CONNECT_TRIES_MAX: u32 = 5;

/// Where a tab finds the proxy, and who it is.
#[derive(Clone)]
pub struct TabSpec {
    pub transport: Transport,
    pub proxy_host: String,
    pub proxy_port: u16,
    pub user: String,
    pub password: String,
    pub tab: u32,
    pub seed: u64,
}

/// Aborts a connection's driver task when dropped: the tab's socket closes.
struct Conn(JoinHandle<()>);

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn connect(
    spec: &TabSpec,
) -> std::io::Result<(hyper::client::conn::http1::SendRequest<Full<Bytes>>, Conn)> {
    let mut last = None;
    for i in 0..CONNECT_TRIES_MAX {
        match Stream::connect(spec.transport, &spec.proxy_host, spec.proxy_port).await {
            Ok(s) => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(std::io::Error::other)?;
                let driver = tokio::spawn(async move {
                    let _ = conn.await;
                });
                return Ok((sender, Conn(driver)));
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50 << i)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("connect failed")))
}

/// A logged-in tab's credentials: the session cookie and the CSRF token.
struct Login {
    cookie: String,
    csrf: String,
}

/// One request on a fresh connection (a page load or a fetch).
async fn exchange(
    spec: &TabSpec,
    method: &str,
    path: &str,
    login: Option<&Login>,
    body: Option<Value>,
) -> std::io::Result<Answer> {
    let (mut sender, _conn) = connect(spec).await?;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, spec.proxy_host.as_str());
    if let Some(l) = login {
        req = req.header(http::header::COOKIE, l.cookie.as_str());
        if !l.csrf.is_empty() {
            req = req.header(crate::proxy::CSRF_HEADER, l.csrf.as_str());
        }
    }
    let bytes = match body {
        Some(v) => {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(bytes)).map_err(std::io::Error::other)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, ANSWER_BYTES_MAX)
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Runs one tab to the end of its plan.
pub async fn run_tab(spec: TabSpec, sc: Arc<Scenario>) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    // Let the servers bind before the first page load.
    tokio::time::sleep(Duration::from_millis(rng.random_range(10..=200))).await;
    let Some(mut session) = login(&spec).await else {
        return Ok(());
    };
    let mut resend = false;
    for g in 0..sc.generations_per_tab {
        if !resend {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..=sc.think_ms_max))).await;
        }
        let content = format!(
            "{} tab {} generation {} nonce {:016x}",
            spec.user,
            spec.tab,
            g,
            rng.random::<u64>()
        );
        let messages = json!([{"role": "user", "content": content}]);
        let fp = fingerprint(&messages);
        let stream = rng.random_bool(sc.p_stream);
        let refresh_at = rng
            .random_bool(sc.p_refresh)
            .then(|| log_uniform_ms(&mut rng, sc.refresh_after_ms_max));
        let body = json!({"messages": messages, "model": "mock-1", "stream": stream,
            "chat_completion_source": "custom", "custom_url": "http://upstream:9000/v1"});
        events::tab_send(&spec.user, spec.tab, &fp, stream);
        let request = exchange(
            &spec,
            "POST",
            "/api/backends/chat-completions/generate",
            Some(&session),
            Some(body),
        );
        let limit = refresh_at
            .unwrap_or(sc.request_timeout_ms)
            .min(sc.request_timeout_ms);
        let outcome = tokio::select! {
            biased;
            r = request => Some(r),
            _ = tokio::time::sleep(Duration::from_millis(limit)) => None,
        };
        resend = false;
        match outcome {
            Some(Ok(answer)) => judge_answer(&spec, &fp, stream, &answer),
            Some(Err(e)) => {
                events::tab_io_error(&spec.user, spec.tab, &fp, &e.to_string());
                return Ok(());
            }
            None => {
                // The select dropped the request future: the connection is gone.
                events::tab_abandon(&spec.user, spec.tab, &fp);
                tokio::time::sleep(Duration::from_millis(
                    rng.random_range(sc.page_load_ms_min..=sc.page_load_ms_max),
                ))
                .await;
                match exchange(&spec, "GET", "/api/users/me", Some(&session), None).await {
                    Ok(a) => events::tab_reload(&spec.user, spec.tab, a.status.as_u16()),
                    Err(e) => {
                        events::tab_io_error(&spec.user, spec.tab, "", &e.to_string());
                        return Ok(());
                    }
                }
                // The reloaded page fetches its CSRF token again.
                match csrf_token(&spec, &session.cookie).await {
                    Some(token) => session.csrf = token,
                    None => return Ok(()),
                }
                resend = rng.random_bool(sc.p_resend);
            }
        }
    }
    Ok(())
}

/// A delay between 10 ms and `max_ms`, uniform in its logarithm: refreshes
/// land as often in the first second (a fast retry) as in the last minute
/// (a long backoff).
fn log_uniform_ms(rng: &mut ChaCha8Rng, max_ms: u64) -> u64 {
    let (lo, hi) = (10f64, (max_ms as f64).max(11.0));
    let x: f64 = rng.random_range(lo.ln()..hi.ln());
    x.exp() as u64
}

/// Logs in, then fetches the session's CSRF token.
async fn login(spec: &TabSpec) -> Option<Login> {
    let body = json!({"handle": spec.user, "password": spec.password});
    match exchange(spec, "POST", "/api/users/login", None, Some(body)).await {
        Ok(a) if a.status == StatusCode::OK => {
            let set = a.headers.get(http::header::SET_COOKIE)?.to_str().ok()?;
            let cookie = set.split(';').next()?.to_string();
            let csrf = csrf_token(spec, &cookie).await?;
            Some(Login { cookie, csrf })
        }
        Ok(a) => {
            events::tab_io_error(
                &spec.user,
                spec.tab,
                "",
                &format!("login answered {}", a.status),
            );
            None
        }
        Err(e) => {
            events::tab_io_error(&spec.user, spec.tab, "", &e.to_string());
            None
        }
    }
}

/// `GET /csrf-token` with the session cookie.
async fn csrf_token(spec: &TabSpec, cookie: &str) -> Option<String> {
    let login = Login {
        cookie: cookie.to_string(),
        csrf: String::new(),
    };
    let failed = |what: String| {
        events::tab_io_error(&spec.user, spec.tab, "", &what);
        None
    };
    match exchange(spec, "GET", "/csrf-token", Some(&login), None).await {
        Ok(a) if a.status == StatusCode::OK => {
            let v: Value = serde_json::from_slice(&a.body).ok()?;
            match v.get("token").and_then(Value::as_str) {
                Some(t) => Some(t.to_string()),
                None => failed("csrf-token answered without a token".into()),
            }
        }
        Ok(a) => failed(format!("csrf-token answered {}", a.status)),
        Err(e) => failed(e.to_string()),
    }
}

/// Reports what the tab got: the fingerprint its answer carries, if any.
fn judge_answer(spec: &TabSpec, fp: &str, stream: bool, a: &Answer) {
    let text = if stream && a.status.is_success() {
        sse_text(&a.body)
    } else {
        json_text(&a.body)
    };
    let got = text.as_deref().and_then(fingerprint_in).unwrap_or("");
    events::tab_recv(
        &spec.user,
        spec.tab,
        fp,
        got,
        a.status.as_u16(),
        got.is_empty(),
    );
}

fn json_text(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Joins the `delta.content` of every SSE `data:` line.
fn sse_text(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out = String::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<Value>(data)
            && let Some(c) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        {
            out.push_str(c);
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_text_joins_deltas() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"fp=01234567\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"89abcdef!\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(sse_text(body).as_deref(), Some("fp=0123456789abcdef!"));
        assert_eq!(sse_text(b"garbage"), None);
    }
}
