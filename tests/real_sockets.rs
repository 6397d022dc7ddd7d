//! The transport seam: the same proxy and mock upstream routers that run in
//! the simulation serve on real loopback sockets.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use tavernsim::net::{Listener, ServeLimits, Transport, serve};
use tavernsim::proxy::session::SessionSecret;
use tavernsim::proxy::users::{HashCost, User, UserStore, hash_password, token_digest};
use tavernsim::proxy::{Clock, ExitHook, ProxyConfig, ProxyState, app, forward};
use tavernsim::upstream::{self, MockUpstream, UpstreamScript, fingerprint, fingerprint_in};

async fn start(app: axum::Router) -> SocketAddr {
    let listener = Listener::bind(Transport::Tokio, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, app, ServeLimits::default()));
    addr
}

#[tokio::test]
async fn proxy_and_mock_serve_on_loopback() {
    let script = UpstreamScript {
        p_429: 0.0,
        p_5xx: 0.0,
        delay_ms_min: 0,
        delay_ms_max: 5,
        ..Default::default()
    };
    let up = start(upstream::app(MockUpstream::new(script, 1))).await;

    let mut users = UserStore::new();
    let mut alice = User::new("alice");
    alice.password_hash = hash_password("pw", &[1; 16], HashCost::Simulation).unwrap();
    alice.token_sha256 = Some(token_digest("alice-token"));
    users.create(alice).unwrap();
    let cfg = ProxyConfig {
        upstream_url: format!("http://{up}/v1"),
        ..Default::default()
    };
    let upstream = forward::Upstream::new(Transport::Tokio, &cfg.upstream_url, None, 4).unwrap();
    let state = ProxyState::new(
        cfg,
        users,
        SessionSecret::from_bytes([9; 32]),
        upstream,
        1,
        Clock::system(),
        ExitHook::from_fn(|_| {}),
    );
    let proxy = start(app(state)).await;

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let messages = json!([{"role": "user", "content": "hello over real sockets"}]);
    for stream in [false, true] {
        let req = hyper::Request::post(format!("http://{proxy}/v1/chat/completions"))
            .header("authorization", "Bearer alice-token")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"messages": messages, "stream": stream}).to_string(),
            )))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "stream={stream}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body).to_string();
        let content = if stream {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| {
                    v.pointer("/choices/0/delta/content")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect::<String>()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            fingerprint_in(&content),
            Some(fingerprint(&messages).as_str()),
            "stream={stream}: {text}"
        );
    }

    // A wrong token is refused with an OpenAI-shaped error.
    let req = hyper::Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("authorization", "Bearer nope")
        .body(Full::new(Bytes::from(
            json!({"messages": messages}).to_string(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(body.pointer("/error/message").is_some());
}
