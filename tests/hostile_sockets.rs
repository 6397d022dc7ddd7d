//! Hostile input on real sockets: every case gets a clear answer (or, for
//! a client that never finishes its head, a closed connection), nothing
//! panics, and the proxy serves the next client as before.
//!
//! Data-driven: one row per case (what is sent, the status expected, words
//! the error message must carry).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tavernsim::proxy::session::{Session as Cookie, SessionSecret, sign};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use support::*;

const BODY_BYTES_MAX: usize = 4096;
const SLOW_MS: u64 = 300;

/// Sends `request` as-is on a fresh connection and reads the whole answer
/// (the proxy closes after it: every request says `connection: close`).
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(read.is_ok(), "no answer in time; got {text:?}");
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn post(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn hostile_requests_get_clear_errors_and_nothing_breaks() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("fine")))
        .mount(&upstream)
        .await;
    let mut cfg = config(&upstream.uri());
    cfg.proxy.body_bytes_max = BODY_BYTES_MAX;
    cfg.limits.body_read_timeout_ms = SLOW_MS;
    cfg.limits.header_read_timeout_ms = SLOW_MS;
    let p = proxy(cfg).await;
    let http = Http::new(p.addr);
    let carol = http.login("carol").await;
    let bearer = format!("authorization: Bearer {}\r\n", token("carol"));
    let session = format!(
        "cookie: {}\r\nx-csrf-token: {}\r\n",
        carol.cookie, carol.csrf
    );
    let forged = sign(
        &SessionSecret::from_bytes([1; 32]),
        &Cookie {
            handle: "alice".into(),
            session_id: 1,
            issued_at_s: 1_900_000_000,
        },
    );
    let v1 = "/v1/chat/completions";
    let st = "/api/backends/chat-completions/generate";
    let ok = chat("hi", false).to_string();
    let nested = format!("{}{}", "[".repeat(2_000), "]".repeat(2_000));
    let big =
        json!({"messages": [{"role": "user", "content": "x".repeat(BODY_BYTES_MAX)}]}).to_string();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("control: a valid request", post(v1, &bearer, &ok), 200, "fine"),
        ("malformed JSON", post(v1, &bearer, "{\"messages\": [}"), 400, "not valid JSON"),
        ("truncated JSON", post(v1, &bearer, "{\"messages\": [{\"role\""), 400, "EOF while parsing"),
        ("not UTF-8", post(v1, &bearer, "{\"messages\": \"\u{fffd}\"}").into_iter().map(|b| if b == 0xbd { 0xff } else { b }).collect(), 400, "not valid JSON"),
        ("nested 2000 deep", post(v1, &bearer, &nested), 400, "recursion limit"),
        ("messages not an array", post(v1, &bearer, "{\"messages\": \"hi\"}"), 400, "'messages' must be a non-empty array"),
        ("empty messages", post(v1, &bearer, "{\"messages\": []}"), 400, "'messages' must be a non-empty array"),
        ("stream not a bool", post(v1, &bearer, "{\"messages\": [{\"role\":\"user\",\"content\":\"x\"}], \"stream\": \"yes\"}"), 400, "'stream' must be true or false"),
        ("body an array", post(st, &session, "[1,2]"), 400, "must be a JSON object"),
        ("body over the limit", post(v1, &bearer, &big), 413, "body_bytes_max"),
        ("chunked body over the limit", format!("POST {v1} HTTP/1.1\r\nhost: p\r\nconnection: close\r\n{bearer}transfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n", big.len()).into_bytes(), 413, "body_bytes_max"),
        ("body slower than body_read_timeout_ms", format!("POST {v1} HTTP/1.1\r\nhost: p\r\nconnection: close\r\n{bearer}content-length: 100\r\n\r\n{{\"messages\"").into_bytes(), 408, "body_read_timeout_ms"),
        ("login with wrong types", post("/api/users/login", "", "{\"handle\": 5, \"password\": []}"), 400, "invalid type"),
        ("login of an unknown user", post("/api/users/login", "", "{\"handle\": \"nobody\", \"password\": \"x\"}"), 403, "wrong handle or password"),
        ("login with a path as handle", post("/api/users/login", "", "{\"handle\": \"../../etc/passwd\", \"password\": \"x\"}"), 403, "wrong handle or password"),
        ("garbage cookie", post(st, "cookie: tavernsim_session=garbage\r\n", &ok), 401, "log in"),
        ("forged cookie", post(st, &format!("cookie: tavernsim_session={forged}\r\n"), &ok), 401, "log in"),
        ("cookie not UTF-8", b"GET /api/users/me HTTP/1.1\r\nhost: p\r\nconnection: close\r\ncookie: tavernsim_session=\xff\xfe\r\n\r\n".to_vec(), 401, "log in"),
        ("missing CSRF", post(st, &format!("cookie: {}\r\n", carol.cookie), &ok), 403, "missing x-csrf-token"),
        ("wrong CSRF", post(st, &format!("cookie: {}\r\nx-csrf-token: {}\r\n", carol.cookie, "A".repeat(43)), &ok), 403, "does not match"),
        ("unknown bearer token", post(v1, "authorization: Bearer not-a-token\r\n", &ok), 401, "Bearer"),
        ("huge bearer token", post(v1, &format!("authorization: Bearer {}\r\n", "t".repeat(20_000)), &ok), 401, "Bearer"),
        ("headers over header_bytes_max", post(v1, &format!("x-junk: {}\r\n", "j".repeat(100 * 1024)), &ok), 431, ""),
        ("more than headers_max headers", post(v1, &"x-a: b\r\n".repeat(200), &ok), 431, ""),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello TLS\r\n\r\n".to_vec(), 400, ""),
    ];
    for (name, request, status, needle) in cases {
        let (got, text) = exchange(p.addr, &request).await;
        assert_eq!(got, status, "{name}: {text}");
        assert!(text.contains(needle), "{name}: no {needle:?} in {text}");
        if status != 200 && !needle.is_empty() {
            assert!(
                text.contains("{\"error\""),
                "{name}: not a JSON error: {text}"
            );
        }
    }
    // A client that never finishes its head is dropped after
    // header_read_timeout_ms, with no request admitted.
    let mut slow = raw(
        p.addr,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n",
        b"",
    )
    .await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_millis(SLOW_MS * 10),
        slow.read_to_end(&mut sink),
    )
    .await;
    assert!(closed.is_ok(), "a slow head must be cut off");
    // Nothing leaked, nothing broke.
    assert!(p.state.table.is_empty());
    assert_eq!(http.call("GET", "/health", &[], "").await.status, 200);
    let again = http.openai("carol", chat("still here?", false)).await;
    assert_eq!(again.status, 200, "{}", again.text());
}

#[tokio::test]
async fn an_upstream_answering_200_with_garbage_is_a_502_not_a_completion() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>captive portal</html>"))
        .mount(&upstream)
        .await;
    let p = proxy(config(&upstream.uri())).await;
    let a = Http::new(p.addr).openai("carol", chat("hi", false)).await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert!(a.message().contains("not JSON"), "{}", a.text());
}
