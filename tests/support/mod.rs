//! Shared helpers for the real-socket tests: a proxy on a loopback port
//! (through `tavernsim::serve::start`, as `tavernsim serve` runs it), a
//! small HTTP client, and raw-socket requests for the tests that hang up.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use tavernsim::proxy::users::{HashCost, User, UserStore, hash_password, token_digest};
use tavernsim::proxy::{ExitHook, ProxyConfig, RetryPolicy};
use tavernsim::serve::{Running, ServeConfig, StartOptions, start};

/// Upper bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// alice (admin), bob (own upstream key), carol: password `<handle>-pw`,
/// bearer token `<handle>-token-0123456789abcdef0123456789`.
pub fn users() -> UserStore {
    let mut store = UserStore::new();
    for (handle, admin, key) in [
        ("alice", true, None),
        ("bob", false, Some("sk-bob")),
        ("carol", false, None),
    ] {
        let mut u = User::new(handle);
        u.admin = admin;
        u.password_hash =
            hash_password(&format!("{handle}-pw"), &[3; 16], HashCost::Simulation).unwrap();
        u.token_sha256 = Some(token_digest(&token(handle)));
        u.upstream_key = key.map(str::to_string);
        store.create(u).unwrap();
    }
    store
}

pub fn token(handle: &str) -> String {
    format!("{handle}-token-0123456789abcdef0123456789")
}

/// A retry policy fast enough for tests.
pub fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        backoff_base_ms: 20,
        backoff_max_ms: 100,
        hint_jitter_ms_max: 10,
        ..RetryPolicy::default()
    }
}

/// The proxy's config in front of `upstream_root` (e.g. wiremock's uri).
pub fn config(upstream_root: &str) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        proxy: ProxyConfig {
            upstream_url: format!("{upstream_root}/v1"),
            upstream_key: Some("sk-shared".into()),
            retry: quick_retry(),
            ..ProxyConfig::default()
        },
        ..ServeConfig::default()
    }
}

pub async fn proxy(cfg: ServeConfig) -> Running {
    start(
        cfg,
        StartOptions {
            users: users(),
            users_file: None,
            exit: ExitHook::from_fn(|r| panic!("the proxy tried to exit: {r}")),
        },
    )
    .await
    .unwrap()
}

/// One answer, whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The error message of an OpenAI- or SillyTavern-shaped error.
    pub fn message(&self) -> String {
        self.json()
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no error.message in {}", self.text()))
            .to_string()
    }
}

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    pub base: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = tokio::time::timeout(WAIT, self.client.request(req))
            .await
            .expect("the proxy answered in time")
            .expect("the proxy answered");
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("the body arrived in time")
            .expect("the body arrived whole")
            .to_bytes();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub async fn post_json(&self, path: &str, headers: &[(&str, &str)], body: Value) -> Answer {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        self.call("POST", path, &h, body.to_string()).await
    }

    /// Logs in; returns the cookie pair and the session's CSRF token.
    pub async fn login(&self, handle: &str) -> Session {
        let a = self
            .post_json(
                "/api/users/login",
                &[],
                json!({"handle": handle, "password": format!("{handle}-pw")}),
            )
            .await;
        assert_eq!(a.status, 200, "login of {handle}: {}", a.text());
        let cookie = a
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let t = self
            .call("GET", "/csrf-token", &[("cookie", &cookie)], "")
            .await;
        assert_eq!(t.status, 200, "{}", t.text());
        let csrf = t.json()["token"].as_str().unwrap().to_string();
        Session { cookie, csrf }
    }

    /// A state-changing cookie request with the session's CSRF token.
    pub async fn post_as(&self, s: &Session, path: &str, body: Value) -> Answer {
        self.post_json(
            path,
            &[("cookie", &s.cookie), ("x-csrf-token", &s.csrf)],
            body,
        )
        .await
    }

    pub async fn openai(&self, handle: &str, body: Value) -> Answer {
        let auth = format!("Bearer {}", token(handle));
        self.post_json("/v1/chat/completions", &[("authorization", &auth)], body)
            .await
    }
}

pub struct Session {
    pub cookie: String,
    pub csrf: String,
}

pub fn chat(content: &str, stream: bool) -> Value {
    json!({"model": "mock-1", "stream": stream, "messages": [{"role": "user", "content": content}]})
}

/// An OpenAI chat completion answering with `content`.
pub fn completion(content: &str) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "mock-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
}

/// Opens a raw connection and writes `head` (and `body`) as-is: for the
/// tests that send malformed requests or hang up.
pub async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s
}

/// A raw POST with a JSON body and extra header lines ("name: value\r\n").
pub async fn raw_post(addr: SocketAddr, path: &str, extra: &str, body: &str) -> TcpStream {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
        body.len()
    );
    raw(addr, &head, body.as_bytes()).await
}

/// Reads until `needle` shows up or the stream ends; returns what was read.
pub async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("read timed out")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&out).contains(needle) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `cond` every 10 ms until it holds; panics after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Requests in the table in phase `name`.
pub fn in_phase(r: &Running, name: &str) -> usize {
    r.state
        .table
        .phase_counts()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| c)
        .unwrap_or(0)
}
