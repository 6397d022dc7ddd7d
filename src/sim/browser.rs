//! A browser tab actor: logs in, fetches its CSRF token, sends generations
//! (with the `x-csrf-token` header, as SillyTavern's page does), and
//! refreshes at random moments (drops its connection, waits a page load,
//! reconnects with its cookie, re-reads the session and the CSRF token, and
//! may send again). A tab may also log out while its generation is pending
//! (`p_logout`: a second connection posts the logout; the tab keeps waiting
//! for the answer, then signs in again).
//!
//! Every choice comes from the tab's part of the world's schedule.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::scenario::Scenario;
use super::schedule::{AdminAction, AdminPlan, GenPlan, RefreshPlan, TabPlan};
use super::trace::PhaseNote;
use crate::events;
use crate::net::{Stream, Transport};
use crate::proxy::Dialect;
use crate::upstream::{MockNote, fingerprint, fingerprint_in};

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
    /// SillyTavern: cookie session (password may be empty for a
    /// single-user server); OpenAI: `bearer`.
    pub dialect: Dialect,
    pub password: String,
    pub bearer: Option<String>,
    pub tab: u32,
    /// The upstream the generation names (SillyTavern's `custom_url`).
    pub upstream_url: String,
    /// No new generation starts after this.
    pub stop_at: Option<tokio::time::Instant>,
    /// The mock's notes, for refreshes aimed at "just after a 429".
    pub notes: Option<tokio::sync::broadcast::Sender<MockNote>>,
    /// The proxy's phase changes (simulation only), for refreshes aimed at a
    /// phase of the request.
    pub phases: Option<tokio::sync::broadcast::Sender<PhaseNote>>,
    /// Requests the simulated proxy holds in "finished" for a moment (their
    /// fingerprints): a refresh aimed there registers its own.
    pub holds: Option<Holds>,
}

/// Fingerprints of requests to hold in a phase (see `ProxyState::phase_hold`).
pub type Holds = Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>;

impl TabSpec {
    /// A tab of the simulation: SillyTavern's route, password login.
    pub fn simulated(
        proxy: (&str, u16),
        user: String,
        password: String,
        tab: u32,
        upstream_url: String,
    ) -> Self {
        Self {
            transport: Transport::Turmoil,
            proxy_host: proxy.0.to_string(),
            proxy_port: proxy.1,
            user,
            dialect: Dialect::SillyTavern,
            password,
            bearer: None,
            tab,
            upstream_url,
            stop_at: None,
            notes: None,
            phases: None,
            holds: None,
        }
    }
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

/// A logged-in tab's credentials: the session cookies and the CSRF token,
/// or a bearer token.
#[derive(Default, Clone)]
struct Login {
    cookie: String,
    csrf: String,
    bearer: Option<String>,
}

impl Login {
    /// Keeps every cookie a `Set-Cookie` header sets (a real SillyTavern
    /// sets a session and a signature cookie).
    fn absorb_cookies(&mut self, headers: &http::HeaderMap) {
        let mut jar: std::collections::BTreeMap<String, String> = self
            .cookie
            .split("; ")
            .filter_map(|c| {
                c.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        for set in headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            if let Some((k, v)) = set.split(';').next().and_then(|kv| kv.split_once('=')) {
                jar.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        self.cookie = jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
    }
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
        if let Some(token) = &l.bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if !l.cookie.is_empty() {
            req = req.header(http::header::COOKIE, l.cookie.as_str());
        }
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

/// A signed-in browser's session, to share between tabs.
#[derive(Clone)]
pub struct SharedLogin(Login);

/// Signs in once for tabs that share the session (tabs of one browser).
pub async fn sign_in_shared(spec: &TabSpec) -> Option<SharedLogin> {
    sign_in(spec).await.map(SharedLogin)
}

/// Runs one tab to the end of its plan; with `shared`, in that session
/// (after a logout it signs in on its own).
pub async fn run_tab(
    spec: TabSpec,
    plan: TabPlan,
    sc: Arc<Scenario>,
    shared: Option<SharedLogin>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Let the servers bind before the first page load.
    tokio::time::sleep(Duration::from_millis(plan.start_ms)).await;
    let session = match shared {
        Some(SharedLogin(login)) => Some(login),
        None => sign_in(&spec).await,
    };
    let Some(mut session) = session else {
        return Ok(());
    };
    for g in &plan.generations {
        if spec
            .stop_at
            .is_some_and(|t| tokio::time::Instant::now() >= t)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(g.think_ms)).await;
        let plan = Plan::of(&spec, g);
        let (sent, logged_out, removed) =
            with_logout(&spec, &session, &plan, send(&spec, &sc, &session, &plan)).await;
        match sent {
            Sent::Answered(Ok(answer)) => judge_answer(&spec, &plan.fp, plan.stream, &answer),
            // A logout may cut the answer off: expected, the tab goes on.
            Sent::Answered(Err(e)) if logged_out || removed => {
                events::tab_io_error(&spec.user, spec.tab, &plan.fp, &e.to_string());
            }
            // The proxy may be restarting: the user tries the next one
            // (a proxy that stays down fails each fast).
            Sent::Answered(Err(e)) => {
                events::tab_io_error(&spec.user, spec.tab, &plan.fp, &e.to_string());
            }
            Sent::TimedOut => events::tab_timeout(&spec.user, spec.tab, &plan.fp),
            Sent::Refreshed => {
                // The select dropped the request future: the connection is gone.
                events::tab_abandon(&spec.user, spec.tab, &plan.fp);
                tokio::time::sleep(Duration::from_millis(g.page_load_ms)).await;
                if !reload(&spec, &mut session).await {
                    return Ok(());
                }
            }
        }
        // Its user was disabled or deleted: the tab has nothing left to do.
        if removed {
            return Ok(());
        }
        if logged_out {
            match sign_in(&spec).await {
                Some(s) => session = s,
                None => return Ok(()),
            }
        }
    }
    Ok(())
}

/// Drives `waiting` (the generation's wait) to its end; meanwhile, at the
/// plan's logout time (if any), posts the logout on a second connection,
/// and at the plan's admin time (if any), an administrator disables or
/// deletes the tab's user from another browser. Returns the outcome,
/// whether the tab logged out, and whether its user was acted on.
async fn with_logout<T>(
    spec: &TabSpec,
    session: &Login,
    plan: &Plan,
    waiting: impl std::future::Future<Output = T>,
) -> (T, bool, bool) {
    let logout = async {
        match plan.logout_after_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
        events::tab_logout_sent(&spec.user, spec.tab, &plan.fp);
        let status = exchange(spec, "POST", "/api/users/logout", Some(session), None)
            .await
            .map(|a| a.status.as_u16())
            .unwrap_or(0);
        events::tab_logout(&spec.user, spec.tab, &plan.fp, status);
    };
    let removed = std::sync::atomic::AtomicBool::new(false);
    let admin = async {
        let Some(a) = plan.admin else {
            return std::future::pending().await;
        };
        tokio::time::sleep(Duration::from_millis(a.after_ms)).await;
        let action = match a.action {
            AdminAction::Disable => "disable",
            AdminAction::Delete => "delete",
        };
        let admin = TabSpec {
            user: ADMIN_HANDLE.into(),
            password: ADMIN_PASSWORD.into(),
            bearer: None,
            dialect: Dialect::SillyTavern,
            ..spec.clone()
        };
        let Some(login) = sign_in(&admin).await else {
            return;
        };
        events::tab_admin_sent(&spec.user, spec.tab, &plan.fp, action);
        let body = json!({"handle": spec.user});
        let status = exchange(&admin, "POST", a.action.path(), Some(&login), Some(body))
            .await
            .map(|a| a.status.as_u16())
            .unwrap_or(0);
        // The tab stops only once its user is known to be gone.
        if (200..300).contains(&status) {
            removed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        events::tab_admin(&spec.user, spec.tab, &plan.fp, action, status);
    };
    tokio::pin!(waiting, logout, admin);
    let (mut logged_out, mut admin_done) = (false, false);
    loop {
        tokio::select! {
            biased;
            r = &mut waiting => return (r, logged_out, removed.load(std::sync::atomic::Ordering::Relaxed)),
            () = &mut logout, if !logged_out => logged_out = true,
            () = &mut admin, if !admin_done => admin_done = true,
        }
    }
}

/// The simulated administrator (who disables and deletes users).
pub const ADMIN_HANDLE: &str = "admin";
pub const ADMIN_PASSWORD: &str = "admin-password";

/// One generation as the tab sends it.
struct Plan {
    fp: String,
    stream: bool,
    body: Value,
    refresh: Option<RefreshPlan>,
    /// Log out this long after sending (SillyTavern only).
    logout_after_ms: Option<u64>,
    /// An administrator acts on the tab's user (SillyTavern only).
    admin: Option<AdminPlan>,
}

impl Plan {
    fn of(spec: &TabSpec, g: &GenPlan) -> Self {
        let messages = g.messages(&spec.user, spec.tab);
        let fp = fingerprint(&messages);
        let stream = g.stream;
        let body = match spec.dialect {
            Dialect::SillyTavern => {
                json!({"messages": messages, "model": "mock-1", "stream": stream,
                "chat_completion_source": "custom", "custom_url": spec.upstream_url})
            }
            Dialect::OpenAi => json!({"messages": messages, "model": "mock-1", "stream": stream}),
        };
        Self {
            fp,
            stream,
            body,
            refresh: g.refresh.clone(),
            logout_after_ms: g
                .logout_after_ms
                .filter(|_| spec.dialect == Dialect::SillyTavern),
            admin: g.admin.filter(|_| spec.dialect == Dialect::SillyTavern),
        }
    }
}

enum Sent {
    Answered(std::io::Result<Answer>),
    Refreshed,
    TimedOut,
}

/// Sends a generation and waits for its answer, a refresh, or the timeout.
async fn send(spec: &TabSpec, sc: &Scenario, session: &Login, plan: &Plan) -> Sent {
    let notes = spec.notes.as_ref().map(|n| n.subscribe());
    let phases = spec.phases.as_ref().map(|n| n.subscribe());
    if let (Some(holds), Some(RefreshPlan::AtPhase { phase, .. })) = (&spec.holds, &plan.refresh)
        && phase == "finished"
    {
        holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(plan.fp.clone());
    }
    events::tab_send(&spec.user, spec.tab, &plan.fp, plan.stream);
    let path = match spec.dialect {
        Dialect::SillyTavern => "/api/backends/chat-completions/generate",
        Dialect::OpenAi => "/v1/chat/completions",
    };
    let request = exchange(spec, "POST", path, Some(session), Some(plan.body.clone()));
    tokio::select! {
        biased;
        r = request => Sent::Answered(r),
        _ = refresh_moment(&plan.refresh, &plan.fp, notes, phases) => Sent::Refreshed,
        _ = tokio::time::sleep(Duration::from_millis(sc.request_timeout_ms)) => Sent::TimedOut,
    }
}

/// Resolves when the planned refresh should happen; never without one.
async fn refresh_moment(
    refresh: &Option<RefreshPlan>,
    fp: &str,
    notes: Option<tokio::sync::broadcast::Receiver<MockNote>>,
    phases: Option<tokio::sync::broadcast::Receiver<PhaseNote>>,
) {
    if let (Some(RefreshPlan::AtPhase { phase, nth }), Some(mut rx)) = (refresh, phases) {
        let mut seen = 0;
        loop {
            match rx.recv().await {
                Ok(n) if n.fp == fp && n.phase == phase => {
                    seen += 1;
                    if seen >= *nth {
                        return;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return std::future::pending().await;
                }
            }
        }
    }
    match (refresh, notes) {
        (Some(RefreshPlan::AfterMs(ms)), _) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        (Some(RefreshPlan::After429), Some(mut rx)) => loop {
            match rx.recv().await {
                Ok(n) if n.fp == fp && n.status == 429 => {
                    // Just after the answer left the mock: the proxy is
                    // about to arm (or has armed) its backoff.
                    tokio::time::sleep(Duration::from_millis(AIM_DELAY_MS)).await;
                    return;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return std::future::pending().await;
                }
            }
        },
        _ => std::future::pending().await,
    }
}

/// How long after the mock's 429 an aimed refresh drops the connection.
const AIM_DELAY_MS: u64 = 20;

/// A page reload after a refresh: re-reads the session (SillyTavern's page
/// fetches its CSRF token again); false when the proxy is gone.
async fn reload(spec: &TabSpec, session: &mut Login) -> bool {
    if spec.dialect == Dialect::OpenAi {
        return true;
    }
    match exchange(spec, "GET", "/csrf-token", Some(session), None).await {
        Ok(a) => {
            events::tab_reload(&spec.user, spec.tab, a.status.as_u16());
            session.absorb_cookies(&a.headers);
            if let Some(t) = token_of(&a) {
                session.csrf = t;
            }
            true
        }
        Err(e) => {
            events::tab_io_error(&spec.user, spec.tab, "", &e.to_string());
            false
        }
    }
}

/// Logs in, then fetches the session's CSRF token.
/// Signs in as a browser does for the dialect: a bearer token as is; for
/// SillyTavern, the CSRF token (fetched before login too, as SillyTavern's
/// login page does), the login, then the session's CSRF token.
async fn sign_in(spec: &TabSpec) -> Option<Login> {
    let mut login = Login {
        bearer: spec.bearer.clone(),
        ..Login::default()
    };
    if spec.dialect == Dialect::OpenAi {
        return Some(login);
    }
    if let Ok(a) = exchange(spec, "GET", "/csrf-token", Some(&login), None).await {
        login.absorb_cookies(&a.headers);
        login.csrf = token_of(&a).unwrap_or_default();
    }
    if !spec.user.is_empty() {
        let body = json!({"handle": spec.user, "password": spec.password});
        match exchange(spec, "POST", "/api/users/login", Some(&login), Some(body)).await {
            Ok(a) if a.status == StatusCode::OK => login.absorb_cookies(&a.headers),
            Ok(a) => return failed(spec, format!("login answered {}", a.status)),
            Err(e) => return failed(spec, e.to_string()),
        }
    }
    match exchange(spec, "GET", "/csrf-token", Some(&login), None).await {
        Ok(a) if a.status == StatusCode::OK => {
            login.absorb_cookies(&a.headers);
            login.csrf = token_of(&a)
                .or_else(|| failed(spec, "csrf-token answered without a token".into()))?;
            Some(login)
        }
        Ok(a) => failed(spec, format!("csrf-token answered {}", a.status)),
        Err(e) => failed(spec, e.to_string()),
    }
}

fn failed<T>(spec: &TabSpec, what: String) -> Option<T> {
    events::tab_io_error(&spec.user, spec.tab, "", &what);
    None
}

fn token_of(a: &Answer) -> Option<String> {
    let v: Value = serde_json::from_slice(&a.body).ok()?;
    v.get("token").and_then(Value::as_str).map(str::to_string)
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
