//! Multi-user features on real sockets: the admin API, CSRF, logout,
//! per-IP login throttling, metrics.

mod support;

use serde_json::json;
use tavernsim::proxy::ExitHook;
use tavernsim::proxy::users::UserStore;
use tavernsim::serve::{StartOptions, start};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use support::*;

const GENERATE: &str = "/api/backends/chat-completions/generate";

/// An upstream that always answers 429 with a 5 s hint: requests sit in
/// their backoff long enough to be cancelled.
async fn slow_429s() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "5")
                .set_body_json(json!({"error": {"message": "slow down"}})),
        )
        .mount(&server)
        .await;
    server
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tavernsim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn admin_creates_a_user_who_can_log_in_and_the_users_file_follows() {
    let dir = temp_dir("admin-create");
    let file = dir.join("users.toml");
    users().save_atomic(&file).unwrap();
    let p = start(
        config("http://127.0.0.1:9"),
        StartOptions {
            users: UserStore::load(&file).unwrap(),
            users_file: Some(file.clone()),
            exit: ExitHook::from_fn(|_| {}),
        },
    )
    .await
    .unwrap();
    let http = Http::new(p.addr);
    let alice = http.login("alice").await;
    let a = http
        .post_as(
            &alice,
            "/api/users/create",
            json!({"handle": "dave", "password": "dave-pw", "name": "Dave"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let saved = UserStore::load(&file).unwrap();
    assert_eq!(saved.get("dave").unwrap().name, "Dave");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temp file left"
    );
    http.login("dave").await;

    let a = http
        .post_as(&alice, "/api/users/delete", json!({"handle": "dave"}))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(UserStore::load(&file).unwrap().get("dave").is_none());
    let list = http
        .call("GET", "/api/users/list", &[("cookie", &alice.cookie)], "")
        .await;
    assert_eq!(list.json()["users"].as_array().unwrap().len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn admin_api_errors_are_clear() {
    let p = proxy(config("http://127.0.0.1:9")).await;
    let http = Http::new(p.addr);
    let alice = http.login("alice").await;
    let carol = http.login("carol").await;
    let cases: Vec<(&str, serde_json::Value, &Session, u16, &str)> = vec![
        (
            "/api/users/create",
            json!({"handle": "bob"}),
            &alice,
            409,
            "already taken",
        ),
        (
            "/api/users/create",
            json!({"handle": "../etc"}),
            &alice,
            400,
            "invalid handle",
        ),
        (
            "/api/users/create",
            json!({"handle": "a/b"}),
            &alice,
            400,
            "invalid handle",
        ),
        (
            "/api/users/create",
            json!({"handle": "x", "token": "short"}),
            &alice,
            400,
            "'token' must be",
        ),
        (
            "/api/users/create",
            json!({"handle": "x", "upstream_key": "sk bad"}),
            &alice,
            400,
            "upstream_key",
        ),
        (
            "/api/users/create",
            json!({"handle": "x", "role": "root"}),
            &alice,
            400,
            "unknown field",
        ),
        (
            "/api/users/create",
            json!({"handle": 7}),
            &alice,
            400,
            "invalid type",
        ),
        (
            "/api/users/disable",
            json!({"handle": "nobody"}),
            &alice,
            404,
            "no user",
        ),
        (
            "/api/users/disable",
            json!({"handle": "../../root"}),
            &alice,
            400,
            "invalid handle",
        ),
        (
            "/api/users/disable",
            json!({"handle": "alice"}),
            &alice,
            409,
            "your own account",
        ),
        (
            "/api/users/delete",
            json!({"handle": "alice"}),
            &alice,
            409,
            "your own account",
        ),
        (
            "/api/users/disable",
            json!({"handle": "bob"}),
            &carol,
            403,
            "not an admin",
        ),
    ];
    for (route, body, who, status, needle) in cases {
        let a = http.post_as(who, route, body.clone()).await;
        assert_eq!(a.status, status, "{route} {body}: {}", a.text());
        assert!(a.message().contains(needle), "{route} {body}: {}", a.text());
    }
    // Without the CSRF header, or with another session's token.
    let no_csrf = http
        .post_json(
            "/api/users/disable",
            &[("cookie", &alice.cookie)],
            json!({"handle": "bob"}),
        )
        .await;
    assert_eq!(no_csrf.status, 403);
    assert!(
        no_csrf.message().contains("missing x-csrf-token"),
        "{}",
        no_csrf.text()
    );
    let forged = Session {
        cookie: alice.cookie.clone(),
        csrf: carol.csrf.clone(),
    };
    let a = http
        .post_as(&forged, "/api/users/disable", json!({"handle": "bob"}))
        .await;
    assert_eq!(a.status, 403);
    assert!(a.message().contains("does not match"), "{}", a.text());
    assert!(p.state.users.read().unwrap().get("bob").unwrap().enabled);
}

#[tokio::test]
async fn disabling_or_deleting_a_user_cancels_their_requests_and_nobody_elses() {
    let server = slow_429s().await;
    let p = proxy(config(&server.uri())).await;
    let http = std::sync::Arc::new(Http::new(p.addr));
    let alice = http.login("alice").await;
    let send = |who: &'static str| {
        let http = std::sync::Arc::clone(&http);
        tokio::spawn(async move { http.openai(who, chat(who, false)).await })
    };
    let (bob_req, carol_req) = (send("bob"), send("carol"));
    eventually("both requests back off", || in_phase(&p, "backoff") == 2).await;

    let a = http
        .post_as(&alice, "/api/users/disable", json!({"handle": "bob"}))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["cancelled"], 1);
    let bob = bob_req.await.unwrap();
    assert!(bob.message().contains("cancelled"), "{}", bob.text());
    assert_eq!(in_phase(&p, "backoff"), 1, "carol's request goes on");
    assert_eq!(http.openai("bob", chat("again", false)).await.status, 401);

    let a = http
        .post_as(&alice, "/api/users/delete", json!({"handle": "carol"}))
        .await;
    assert_eq!(a.json()["cancelled"], 1, "{}", a.text());
    let carol = carol_req.await.unwrap();
    assert!(carol.message().contains("cancelled"), "{}", carol.text());
    eventually("every request is released", || p.state.table.is_empty()).await;

    let a = http
        .post_as(&alice, "/api/users/enable", json!({"handle": "bob"}))
        .await;
    assert_eq!(a.json()["enabled"], true, "{}", a.text());
    http.login("bob").await;
}

#[tokio::test]
async fn logout_cancels_that_sessions_requests_only() {
    let server = slow_429s().await;
    let p = proxy(config(&server.uri())).await;
    let http = std::sync::Arc::new(Http::new(p.addr));
    let (s1, s2) = (http.login("carol").await, http.login("carol").await);
    let send = |s: &Session| {
        let http = std::sync::Arc::clone(&http);
        let s = Session {
            cookie: s.cookie.clone(),
            csrf: s.csrf.clone(),
        };
        tokio::spawn(async move { http.post_as(&s, GENERATE, chat("hi", false)).await })
    };
    let (r1, _r2) = (send(&s1), send(&s2));
    eventually("both requests back off", || in_phase(&p, "backoff") == 2).await;

    let no_csrf = http
        .call("POST", "/api/users/logout", &[("cookie", &s1.cookie)], "")
        .await;
    assert_eq!(no_csrf.status, 403, "logout needs the CSRF token too");
    let out = http.post_as(&s1, "/api/users/logout", json!({})).await;
    assert_eq!(out.json()["cancelled"], 1, "{}", out.text());
    let a = r1.await.unwrap();
    assert_eq!(a.status, 200, "SillyTavern's dialect");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled")
    );
    assert_eq!(
        in_phase(&p, "backoff"),
        1,
        "the other session's request goes on"
    );
}

#[tokio::test]
async fn a_logged_out_session_cookie_is_refused_afterwards() {
    // A signed cookie stays valid until it expires: logout must revoke it,
    // or a generation sent just before the logout but admitted after it
    // would run uncancelled.
    let server = slow_429s().await;
    let p = proxy(config(&server.uri())).await;
    let http = Http::new(p.addr);
    let s = http.login("carol").await;
    let out = http.post_as(&s, "/api/users/logout", json!({})).await;
    assert_eq!(out.status, 200, "{}", out.text());
    let late = http.post_as(&s, GENERATE, chat("hi", false)).await;
    assert_eq!(late.status, 401, "{}", late.text());
    assert!(p.state.table.is_empty());
    let again = http.login("carol").await;
    assert_ne!(again.cookie, s.cookie, "a new login is a new session");
}

#[tokio::test]
async fn csrf_token_needs_a_session_and_generate_needs_the_token() {
    let p = proxy(config("http://127.0.0.1:9")).await;
    let http = Http::new(p.addr);
    let a = http.call("GET", "/csrf-token", &[], "").await;
    assert_eq!(a.status, 401);
    assert!(a.message().contains("log in"), "{}", a.text());
    let s = http.login("carol").await;
    let a = http
        .post_json(GENERATE, &[("cookie", &s.cookie)], chat("hi", false))
        .await;
    assert_eq!(a.status, 403);
    assert!(a.message().contains("x-csrf-token"), "{}", a.text());
    assert!(p.state.table.is_empty(), "refused before admission");
}

#[tokio::test]
async fn login_is_throttled_per_ip_with_retry_after() {
    let p = proxy(config("http://127.0.0.1:9")).await;
    let http = Http::new(p.addr);
    let wrong = json!({"handle": "carol", "password": "nope"});
    for _ in 0..5 {
        let a = http.post_json("/api/users/login", &[], wrong.clone()).await;
        assert_eq!(a.status, 403, "{}", a.text());
        assert!(a.message().contains("wrong handle or password"));
    }
    let right = json!({"handle": "carol", "password": "carol-pw"});
    let a = http.post_json("/api/users/login", &[], right).await;
    assert_eq!(a.status, 429, "{}", a.text());
    let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(a.message().contains("too many login attempts"));
    let m = http.call("GET", "/metrics", &[], "").await;
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        m.text()
            .contains("tavernsim_logins_total{outcome=\"throttled\"}")
    );
}

#[tokio::test]
async fn login_needs_json_and_says_so() {
    let p = proxy(config("http://127.0.0.1:9")).await;
    let http = Http::new(p.addr);
    let a = http
        .call(
            "POST",
            "/api/users/login",
            &[("content-type", "application/x-www-form-urlencoded")],
            "handle=carol&password=carol-pw",
        )
        .await;
    assert_eq!(a.status, 415, "{}", a.text());
    assert!(a.message().contains("application/json"));
}
