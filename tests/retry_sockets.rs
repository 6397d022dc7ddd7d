//! The retry path on real sockets, with wiremock (or a raw socket, where
//! wiremock cannot misbehave enough) as the upstream.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use support::*;

const COMPLETIONS: &str = "/v1/chat/completions";

fn too_many(retry_after: Option<&str>) -> ResponseTemplate {
    let t = ResponseTemplate::new(429).set_body_json(
        json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
    );
    match retry_after {
        Some(v) => t.insert_header("retry-after", v),
        None => t,
    }
}

/// Answers from a list in order (the last one repeats) and records when
/// each request arrived.
struct Script {
    answers: Vec<ResponseTemplate>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl Respond for Script {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut arrivals = self.arrivals.lock().unwrap();
        arrivals.push(Instant::now());
        let i = (arrivals.len() - 1).min(self.answers.len() - 1);
        self.answers[i].clone()
    }
}

async fn scripted(answers: Vec<ResponseTemplate>) -> (MockServer, Arc<Mutex<Vec<Instant>>>) {
    let server = MockServer::start().await;
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path(COMPLETIONS))
        .respond_with(Script {
            answers,
            arrivals: Arc::clone(&arrivals),
        })
        .mount(&server)
        .await;
    (server, arrivals)
}

#[tokio::test]
async fn a_429_then_a_200_reaches_the_client_as_200() {
    let ok = ResponseTemplate::new(200).set_body_json(completion("hello after a 429"));
    let (server, arrivals) = scripted(vec![too_many(None), ok]).await;
    let p = proxy(config(&server.uri())).await;
    let a = Http::new(p.addr).openai("carol", chat("hi", false)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["choices"][0]["message"]["content"],
        "hello after a 429"
    );
    assert_eq!(arrivals.lock().unwrap().len(), 2);
    assert!(p.state.table.is_empty());
    // The retry shows in /metrics (counters are per process and only grow,
    // so other tests running beside this one cannot make it fail).
    let m = Http::new(p.addr)
        .call("GET", "/metrics", &[], "")
        .await
        .text();
    let retries: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("tavernsim_retries_total{reason=\"backoff\",status=\"429\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no backoff retry counter in {m}"));
    assert!(retries >= 1, "{m}");
}

#[tokio::test]
async fn retry_after_is_honoured_before_the_next_attempt() {
    let ok = ResponseTemplate::new(200).set_body_json(completion("waited"));
    let (server, arrivals) = scripted(vec![too_many(Some("1")), ok]).await;
    let p = proxy(config(&server.uri())).await;
    let sent = Instant::now();
    let a = Http::new(p.addr).openai("carol", chat("hi", false)).await;
    let answered = Instant::now();
    assert_eq!(a.status, 200, "{}", a.text());
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 2);
    // Order, not wall time: the second attempt came no earlier than the
    // hint after the first, and the answer after the second attempt.
    assert!(sent <= arrivals[0] && arrivals[1] <= answered);
    let gap = arrivals[1] - arrivals[0];
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
}

#[tokio::test]
async fn a_client_leaving_during_the_backoff_stops_every_further_attempt() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETIONS))
        .respond_with(too_many(Some("2")))
        .expect(1)
        .mount(&server)
        .await;
    let p = proxy(config(&server.uri())).await;
    let auth = format!("authorization: Bearer {}\r\n", token("carol"));
    let conn = raw_post(p.addr, COMPLETIONS, &auth, &chat("hi", false).to_string()).await;
    eventually("the request waits out its backoff", || {
        in_phase(&p, "backoff") == 1
    })
    .await;
    drop(conn);
    eventually("the request is released", || p.state.table.is_empty()).await;
    // Past the 2 s hint: the attempt that would have followed never comes.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    server.verify().await;
}

/// An upstream whose SSE stream never ends by itself and reports when the
/// proxy drops it.
async fn endless_stream_upstream() -> (String, Arc<AtomicBool>) {
    use axum::body::{Body, Bytes};
    struct Closed(Arc<AtomicBool>);
    impl Drop for Closed {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    let app = axum::Router::new().route(
        COMPLETIONS,
        axum::routing::post(move || {
            let guard = Closed(Arc::clone(&flag));
            async move {
                let chunks = futures::stream::unfold((guard, 0u32), |(g, i)| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    (i < 2_000).then(|| {
                        let chunk = json!({"choices": [{"index": 0, "delta": {"content": format!("tick {i} ")}}]});
                        (Ok::<_, std::convert::Infallible>(Bytes::from(format!("data: {chunk}\n\n"))), (g, i + 1))
                    })
                });
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(chunks))
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), closed)
}

#[tokio::test]
async fn a_client_leaving_mid_stream_closes_the_upstream_stream() {
    let (root, upstream_closed) = endless_stream_upstream().await;
    let p = proxy(config(&root)).await;
    let auth = format!("authorization: Bearer {}\r\n", token("carol"));
    let mut conn = raw_post(p.addr, COMPLETIONS, &auth, &chat("hi", true).to_string()).await;
    let seen = read_until(&mut conn, "tick 2").await;
    assert!(seen.contains("200 OK") && seen.contains("tick 2"), "{seen}");
    assert!(!upstream_closed.load(Ordering::SeqCst));
    drop(conn);
    eventually("the upstream stream is dropped", || {
        upstream_closed.load(Ordering::SeqCst)
    })
    .await;
    eventually("the request is released", || p.state.table.is_empty()).await;
}

#[tokio::test]
async fn giving_up_answers_each_dialect_in_its_own_shape() {
    // A hint past wait_ms_max (30 s by default) means: give up now.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETIONS))
        .respond_with(too_many(Some("120")))
        .mount(&server)
        .await;
    let p = proxy(config(&server.uri())).await;
    let http = Http::new(p.addr);

    let a = http.openai("carol", chat("hi", false)).await;
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(a.header("retry-after"), Some("120"));
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert_eq!(a.json()["error"]["type"], "rate_limit_exceeded");
    assert!(a.message().contains("Rate limit"), "{}", a.text());

    let s = http.login("carol").await;
    let a = http
        .post_as(
            &s,
            "/api/backends/chat-completions/generate",
            chat("hi", false),
        )
        .await;
    assert_eq!(a.status, 200, "SillyTavern's route answers errors with 200");
    let v = a.json();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Rate limit")
    );
    assert_eq!(v["quota_error"], false);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_exhausted_quota_is_a_quota_error_on_sillytaverns_route() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETIONS))
        .respond_with(ResponseTemplate::new(429).set_body_json(json!({"error": {
            "message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}})))
        .mount(&server)
        .await;
    let p = proxy(config(&server.uri())).await;
    let http = Http::new(p.addr);
    let s = http.login("carol").await;
    let a = http
        .post_as(
            &s,
            "/api/backends/chat-completions/generate",
            chat("hi", false),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["quota_error"], true, "{}", a.text());
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "never retried"
    );
}

#[tokio::test]
async fn an_upstream_that_never_answers_times_out_with_a_clear_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETIONS))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&server)
        .await;
    let mut cfg = config(&server.uri());
    cfg.proxy.retry.attempt_timeout_ms = 200;
    cfg.proxy.retry.attempts_max = 2;
    let p = proxy(cfg).await;
    let a = Http::new(p.addr).openai("carol", chat("hi", false)).await;
    assert_eq!(a.status, 504, "{}", a.text());
    assert!(a.message().contains("no answer"), "{}", a.text());
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert!(p.state.table.is_empty());
}

/// A raw upstream that answers every connection with `reply` and then
/// resets it (linger 0), or, with `hold`, keeps it open a while first.
async fn raw_upstream(reply: &'static [u8], hold: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                let _ = s.write_all(reply).await;
                tokio::time::sleep(hold).await;
                // Linger 0: dropping the socket sends a reset, the point here.
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_upstream_sending_garbage_gets_a_clear_error_not_a_panic() {
    let root = raw_upstream(
        b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    let mut cfg = config(&root);
    cfg.proxy.retry.attempts_max = 2;
    let p = proxy(cfg).await;
    let http = Http::new(p.addr);
    let a = http.openai("carol", chat("hi", false)).await;
    assert_eq!(a.status, 504, "{}", a.text());
    assert!(a.message().contains("no answer"), "{}", a.text());
    assert_eq!(http.call("GET", "/health", &[], "").await.status, 200);
}

#[tokio::test]
async fn an_upstream_resetting_mid_stream_ends_the_client_stream_and_frees_the_request() {
    const HEAD_AND_ONE_CHUNK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n1a\r\ndata: {\"choices\":[]}\n\n\r\n";
    let root = raw_upstream(HEAD_AND_ONE_CHUNK, Duration::from_millis(200)).await;
    let p = proxy(config(&root)).await;
    let auth = format!("authorization: Bearer {}\r\n", token("carol"));
    let mut conn = raw_post(p.addr, COMPLETIONS, &auth, &chat("hi", true).to_string()).await;
    // The client sees the head and the chunk, then the stream breaks off
    // (no terminating chunk): the connection closes.
    let seen = read_until(&mut conn, "\r\n0\r\n\r\n").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        !seen.contains("\r\n0\r\n\r\n"),
        "the stream must not look complete: {seen}"
    );
    eventually("the request is released", || p.state.table.is_empty()).await;
    let http = Http::new(p.addr);
    assert_eq!(http.call("GET", "/health", &[], "").await.status, 200);
}

#[tokio::test]
async fn each_user_reaches_the_upstream_with_their_own_key_or_the_shared_one() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer sk-bob"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("bob's key")))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer sk-shared"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("shared key")))
        .mount(&server)
        .await;
    let p = proxy(config(&server.uri())).await;
    let http = Http::new(p.addr);
    let bob = http.openai("bob", chat("hi", false)).await;
    assert_eq!(bob.json()["choices"][0]["message"]["content"], "bob's key");
    let carol = http.openai("carol", chat("hi", false)).await;
    assert_eq!(
        carol.json()["choices"][0]["message"]["content"],
        "shared key"
    );
}

#[tokio::test]
async fn two_tabs_of_one_user_are_independent() {
    let ok = ResponseTemplate::new(200).set_body_json(completion("tab b's answer"));
    let (server, arrivals) = scripted(vec![too_many(Some("1")), too_many(Some("1")), ok]).await;
    let p = proxy(config(&server.uri())).await;
    let http = std::sync::Arc::new(Http::new(p.addr));
    let s = http.login("carol").await;
    // Tab A: a raw connection it will drop (a refresh); tab B shares the cookie.
    let headers = format!("cookie: {}\r\nx-csrf-token: {}\r\n", s.cookie, s.csrf);
    let generate = "/api/backends/chat-completions/generate";
    let tab_a = raw_post(p.addr, generate, &headers, &chat("a", false).to_string()).await;
    eventually("tab a backs off", || in_phase(&p, "backoff") == 1).await;
    let tab_b = {
        let http = std::sync::Arc::clone(&http);
        tokio::spawn(async move { http.post_as(&s, generate, chat("b", false)).await })
    };
    // Tab a's hinted 429 closed the shared gate: tab b waits at it (or, once
    // it got its own 429, in backoff).
    eventually("both tabs wait", || {
        in_phase(&p, "backoff") + in_phase(&p, "gate-wait") == 2
    })
    .await;
    drop(tab_a);
    let b = tab_b.await.unwrap();
    assert_eq!(
        b.json()["choices"][0]["message"]["content"],
        "tab b's answer"
    );
    eventually("every request is released", || p.state.table.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(arrivals.lock().unwrap().len(), 3, "tab a never retried");
}

/// The shared gate on real sockets: alice's hinted 429 holds carol's
/// request back too (they share the upstream key), and the gate shows in
/// `/metrics`.
#[tokio::test]
async fn a_hinted_429_for_one_user_gates_another_user_on_the_same_key() {
    let ok = ResponseTemplate::new(200).set_body_json(completion("after the gate"));
    let (server, arrivals) = scripted(vec![too_many(Some("2")), ok]).await;
    let p = proxy(config(&server.uri())).await;
    let http = Arc::new(Http::new(p.addr));
    let alice = {
        let http = Arc::clone(&http);
        tokio::spawn(async move { http.openai("alice", chat("a", false)).await })
    };
    eventually("alice backs off", || in_phase(&p, "backoff") == 1).await;
    let started = Instant::now();
    let carol = http.openai("carol", chat("c", false)).await;
    assert_eq!(carol.status, 200, "{}", carol.text());
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "carol went to the rate-limited key after {:?}",
        started.elapsed()
    );
    assert_eq!(alice.await.unwrap().status, 200);
    let times = arrivals.lock().unwrap().clone();
    assert!(
        times[1] - times[0] >= Duration::from_secs(2),
        "the second attempt came {:?} after the 429",
        times[1] - times[0]
    );
    let metrics = http.call("GET", "/metrics", &[], "").await.text();
    let gated = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tavernsim_gate_waits_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        gated.is_some_and(|n| n >= 1),
        "no gate wait in /metrics:\n{metrics}"
    );
}
