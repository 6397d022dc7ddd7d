//! The system under test: a multi-user, OpenAI-compatible proxy.
//!
//! # Brief overview
//! - [`ProxyConfig`] and [`ProxyState`]; [`app`] builds the axum `Router`
//!   that `serve` and the simulation both run.
//! - Routes: `POST /api/users/login`, `POST /api/users/logout`,
//!   `GET /api/users/me`, `POST /api/backends/chat-completions/generate`
//!   (SillyTavern's shape, cookie session), `POST /v1/chat/completions`
//!   (OpenAI's shape, bearer token), `GET /health`, `GET /metrics`, and the
//!   admin API and `GET /csrf-token` ([`admin`]). Both generation routes
//!   go through one core, [`generate`], which admits the request into the
//!   [`requests::RequestTable`] and runs the configured [`Variant`].
//!
//! Architecture Invariant: `proxy/` knows nothing about turmoil. Time comes
//! from tokio and the injected [`Clock`], randomness from a seeded
//! generator.

pub mod admin;
pub mod budget;
pub mod classify;
pub mod error;
pub mod fair;
pub mod fixed;
pub mod forward;
pub mod gate;
mod input;
pub mod mutants;
pub mod requests;
pub mod retry;
pub mod session;
pub mod sillytavern;
pub mod throttle;
pub mod users;
pub mod variant;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use error::ProxyError;
pub use input::CSRF_HEADER;
pub use retry::RetryPolicy;
pub use variant::{Mutant, Variant};

use crate::metrics::COUNTERS;
use crate::upstream::fingerprint;
use input::{Body, PeerIp, check_csrf};
use requests::{RequestGuard, RequestMeta, RequestTable};
use session::{Session, SessionSecret};
use users::{AuthError, HashCost, UserStore};

/// Logged-out sessions remembered at the most (each until its cookie's
/// expiry).
pub const REVOKED_SESSIONS_MAX: usize = 100_000;

/// Everything the proxy is configured with, bar users and secrets.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Which proxy runs (testing only for anything but `fixed`).
    #[serde(skip)]
    pub variant: Variant,
    /// The upstream API root, e.g. `http://127.0.0.1:9000/v1`.
    pub upstream_url: String,
    /// Shared upstream key, used when a user has none of their own.
    pub upstream_key: Option<String>,
    pub retry: RetryPolicy,
    /// The shared per-upstream-key rate-limit gate.
    pub gate: gate::GateConfig,
    /// The per-upstream-key retry budget.
    pub budget: budget::BudgetConfig,
    /// Per-user cap and round-robin upstream concurrency.
    pub fairness: fair::FairnessConfig,
    /// Requests in flight over all users.
    pub requests_max: usize,
    /// Largest client request body.
    pub body_bytes_max: usize,
    /// Largest non-streamed upstream answer the proxy reads.
    pub upstream_body_bytes_max: usize,
    /// A session cookie expires this long after login.
    pub session_max_age_s: u64,
    /// A streamed answer whose upstream sends nothing for this long is cut.
    pub stream_idle_ms: u64,
    /// Idle upstream connections kept per host (0: close after each answer).
    pub upstream_idle_per_host_max: usize,
    /// Per-IP login throttling.
    pub login: throttle::LoginLimits,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            variant: Variant::Fixed,
            upstream_url: "http://127.0.0.1:9000/v1".into(),
            upstream_key: None,
            retry: RetryPolicy::default(),
            gate: gate::GateConfig::default(),
            budget: budget::BudgetConfig::default(),
            fairness: fair::FairnessConfig::default(),
            requests_max: 4_096,
            body_bytes_max: 2 * 1024 * 1024,
            upstream_body_bytes_max: 8 * 1024 * 1024,
            session_max_age_s: 7 * 24 * 3600,
            upstream_idle_per_host_max: 32,
            stream_idle_ms: 60_000,
            login: throttle::LoginLimits::default(),
        }
    }
}

/// Where "now" comes from: the system clock for a real proxy, the
/// simulation's clock in a world.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(SystemTime::now))
    }
    pub fn from_fn(f: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
    pub fn now_s(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }
}

/// What the process does when an error nothing handles ends it (only the
/// SillyTavern 1.12.7 variant has such a path).
#[derive(Clone)]
pub struct ExitHook(Arc<dyn Fn(&str) + Send + Sync>);

impl ExitHook {
    /// Exits the real process, as Node's uncaught-exception handler does.
    pub fn process() -> Self {
        Self(Arc::new(|reason: &str| {
            eprintln!("tavernsim: {reason}");
            std::process::exit(70);
        }))
    }
    pub fn from_fn(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
    pub fn exit(&self, reason: &str) {
        (self.0)(reason)
    }
}

/// Shared state of one proxy process.
pub struct ProxyState {
    pub cfg: ProxyConfig,
    pub users: RwLock<UserStore>,
    pub secret: SessionSecret,
    pub table: Arc<RequestTable>,
    pub upstream: forward::Upstream,
    pub rng: Mutex<ChaCha8Rng>,
    pub clock: Clock,
    pub exit: ExitHook,
    pub gates: gate::Gates,
    pub budget: budget::RetryBudget,
    pub limiter: Arc<fair::FairLimiter>,
    sessions_issued: AtomicU64,
    /// Sessions logged out, until their cookie would have expired anyway
    /// (a signed cookie stays valid until then: logout must revoke it).
    revoked: Mutex<std::collections::BTreeMap<u64, u64>>,
    pub throttle: throttle::LoginThrottle,
    /// Where admin changes are saved; `None`: users live in memory only.
    pub users_file: Option<PathBuf>,
    /// Cost of password hashes the admin API makes.
    pub hash_cost: HashCost,
    /// Serializes admin changes to the users.
    admin_lock: Mutex<()>,
    /// Used by one mutant only (`Mutant::SlotReuseNoGeneration`).
    pub reply_boxes: mutants::ReplyBoxes,
    /// A harness's hold on requests entering a phase (see [`PhaseHold`]);
    /// a served proxy has none.
    pub phase_hold: std::sync::OnceLock<PhaseHold>,
}

/// Lets a harness keep a request in a phase for a while: called with the
/// request's fingerprint and the phase it just entered, it returns a wait
/// the request's handler awaits there, or `None` to go on at once. The
/// simulation uses it to hold a request between "finished" and its
/// release, a window the fixed design otherwise closes in one step, so a
/// refresh aimed at it lands in it.
pub type PhaseHold = Arc<
    dyn Fn(&str, &'static str) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>
        + Send
        + Sync,
>;

impl ProxyState {
    pub fn new(
        cfg: ProxyConfig,
        users: UserStore,
        secret: SessionSecret,
        upstream: forward::Upstream,
        seed: u64,
        clock: Clock,
        exit: ExitHook,
    ) -> Arc<Self> {
        let cfg_login = cfg.login.clone();
        let budget = budget::RetryBudget::new(cfg.budget.clone());
        // The SillyTavern variants reproduce a proxy without a budget.
        if !cfg.variant.is_sillytavern() {
            budget.announce();
        }
        Arc::new(Self {
            table: RequestTable::new(cfg.requests_max),
            gates: gate::Gates::default(),
            budget,
            limiter: fair::FairLimiter::with_order(
                cfg.fairness.upstream_concurrency_max,
                cfg.fairness.round_robin,
            ),
            cfg,
            users: RwLock::new(users),
            secret,
            upstream,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            clock,
            exit,
            sessions_issued: AtomicU64::new(0),
            revoked: Mutex::new(std::collections::BTreeMap::new()),
            throttle: throttle::LoginThrottle::new(cfg_login),
            users_file: None,
            hash_cost: HashCost::Standard,
            admin_lock: Mutex::new(()),
            reply_boxes: mutants::ReplyBoxes::default(),
            phase_hold: std::sync::OnceLock::new(),
        })
    }

    /// Saves admin changes to `path` from now on. Call before sharing the
    /// state (a programmer error otherwise).
    pub fn with_users_file(mut self: Arc<Self>, path: PathBuf) -> Arc<Self> {
        Arc::get_mut(&mut self)
            .expect("with_users_file before the state is shared")
            .users_file = Some(path);
        self
    }

    /// Hashes passwords the admin API sets at `cost`. Call before sharing.
    pub fn with_hash_cost(mut self: Arc<Self>, cost: HashCost) -> Arc<Self> {
        Arc::get_mut(&mut self)
            .expect("with_hash_cost before the state is shared")
            .hash_cost = cost;
        self
    }

    /// Refuses session `id` from now on (logout).
    pub fn revoke_session(&self, id: u64) {
        let now = self.clock.now_s();
        let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        if revoked.len() >= REVOKED_SESSIONS_MAX {
            revoked.retain(|_, until| *until > now);
        }
        if revoked.len() >= REVOKED_SESSIONS_MAX {
            // Still full: forget the revocation that expires first.
            if let Some(first) = revoked.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                revoked.remove(&first);
            }
        }
        revoked.insert(id, now.saturating_add(self.cfg.session_max_age_s));
    }

    /// Whether session `id` logged out.
    pub fn is_revoked(&self, id: u64) -> bool {
        let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        revoked
            .get(&id)
            .is_some_and(|until| *until > self.clock.now_s())
    }

    pub fn with_rng<R>(&self, f: impl FnOnce(&mut ChaCha8Rng) -> R) -> R {
        f(&mut self.rng.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn users(&self) -> std::sync::RwLockReadGuard<'_, UserStore> {
        self.users.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The proxy's routes.
pub fn app(state: Arc<ProxyState>) -> Router {
    let body_max = state.cfg.body_bytes_max;
    Router::new()
        .route("/api/users/login", post(login))
        .route("/api/users/logout", post(logout))
        .route("/api/users/me", get(me))
        .route(
            "/api/backends/chat-completions/generate",
            post(generate_sillytavern),
        )
        .route("/v1/chat/completions", post(generate_openai))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(admin::routes())
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(state)
}

/// Who is asking.
#[derive(Clone, Debug)]
pub struct Principal {
    pub handle: String,
    pub session_id: u64,
    pub upstream_key: Option<String>,
}

/// How the caller wants errors answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `/v1`: OpenAI-shaped errors with the upstream's status.
    OpenAi,
    /// SillyTavern's route: HTTP 200 with `{"error":{"message"},"quota_error"}`.
    SillyTavern,
}

#[derive(Deserialize)]
struct LoginBody {
    handle: String,
    #[serde(default)]
    password: String,
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProxyError> {
    serde_json::from_slice(body).map_err(|e| {
        ProxyError::BadRequest(format!(
            "request body is not valid JSON for this route: {e}"
        ))
    })
}

async fn metrics(State(state): State<Arc<ProxyState>>) -> Response {
    let text = crate::metrics::render(&state.table.phase_counts());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// Password login. Exempt from CSRF (there is no session yet), but it must
/// be `application/json`, which a cross-site form cannot send; throttled
/// per IP, a success clears the address's count.
async fn login(
    State(state): State<Arc<ProxyState>>,
    PeerIp(ip): PeerIp,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ProxyError> {
    if let Some(ip) = ip
        && let Err(wait) = state.throttle.try_acquire(ip, tokio::time::Instant::now())
    {
        COUNTERS.login("throttled");
        let retry_after_s = wait.as_millis().div_ceil(1000).max(1) as u64;
        return Err(ProxyError::LoginThrottled { retry_after_s });
    }
    if !input::is_json(&headers) {
        return Err(ProxyError::UnsupportedMediaType(
            "login needs Content-Type: application/json and a body {\"handle\":...,\"password\":...}".into(),
        ));
    }
    let LoginBody { handle, password } = parse_json(&body)?;
    let verified = state
        .users()
        .verify_password(&handle, &password)
        .map(|u| u.handle.clone());
    let user = match verified {
        Ok(user) => user,
        Err(e) => {
            COUNTERS.login("failed");
            tracing::info!(handle = %handle.escape_debug(), ip = ?ip, reason = %e, "login failed");
            // One message for unknown handles and wrong passwords, so
            // handles stay private; "disabled" only to the right password.
            return Err(ProxyError::Forbidden(match e {
                AuthError::Disabled => e.to_string(),
                _ => "login failed: wrong handle or password; check both and try again".into(),
            }));
        }
    };
    if let Some(ip) = ip {
        state.throttle.forget(ip);
    }
    COUNTERS.login("ok");
    let n = state.sessions_issued.fetch_add(1, Ordering::Relaxed);
    let session_id = state.with_rng(|r| r.random::<u64>()) ^ n;
    let session = Session {
        handle: user.clone(),
        session_id,
        issued_at_s: state.clock.now_s(),
    };
    let cookie = session::sign(&state.secret, &session);
    let mut resp = Json(json!({"handle": user})).into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie_header(
        &cookie,
        state.cfg.session_max_age_s,
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

async fn logout(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    let who = principal_from_cookie(&state, &headers)?;
    check_csrf(&state, &headers, &who)?;
    // Revoke first: a request of this session admitted from now on is
    // refused after admission, one admitted before is cancelled here.
    state.revoke_session(who.session_id);
    let cancelled = state.table.cancel_where("logout", |m| {
        m.user == who.handle && m.session_id == who.session_id
    });
    let mut resp = Json(json!({"ok": true, "cancelled": cancelled})).into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie_header()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

async fn me(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    let who = principal_from_cookie(&state, &headers)?;
    Ok(Json(json!({"handle": who.handle})).into_response())
}

/// Re-reads the user on every request, like SillyTavern: a deleted or
/// disabled user's cookie stops working at once.
pub(crate) fn principal_from_cookie(
    state: &ProxyState,
    headers: &HeaderMap,
) -> Result<Principal, ProxyError> {
    let value = session::cookie_value(headers).ok_or(ProxyError::Unauthorized)?;
    let s = session::verify(
        &state.secret,
        value,
        state.clock.now_s(),
        state.cfg.session_max_age_s,
    )
    .map_err(|_| ProxyError::Unauthorized)?;
    if state.is_revoked(s.session_id) {
        return Err(ProxyError::Unauthorized);
    }
    let users = state.users();
    let user = users.get(&s.handle).ok_or(ProxyError::Unauthorized)?;
    if !user.enabled {
        return Err(ProxyError::Forbidden(format!(
            "user '{}' is disabled; ask an admin",
            user.handle
        )));
    }
    Ok(Principal {
        handle: user.handle.clone(),
        session_id: s.session_id,
        upstream_key: user.upstream_key.clone(),
    })
}

fn principal_from_bearer(state: &ProxyState, headers: &HeaderMap) -> Result<Principal, ProxyError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ProxyError::Unauthorized)?;
    let users = state.users();
    let user = users
        .user_for_token(token.trim())
        .ok_or(ProxyError::Unauthorized)?;
    Ok(Principal {
        handle: user.handle.clone(),
        session_id: 0,
        upstream_key: user.upstream_key.clone(),
    })
}

async fn generate_sillytavern(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    body: Result<Body, ProxyError>,
) -> Response {
    COUNTERS.request("sillytavern");
    let who = match principal_from_cookie(&state, &headers)
        .and_then(|who| check_csrf(&state, &headers, &who).map(|()| who))
    {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let body = match body {
        Ok(Body(b)) => b,
        Err(e) => return e.into_response(),
    };
    match sillytavern_to_openai(&body) {
        Ok(req) => generate(state, who, req, Dialect::SillyTavern).await,
        Err(e) => e.into_response(),
    }
}

async fn generate_openai(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    body: Result<Body, ProxyError>,
) -> Response {
    COUNTERS.request("openai");
    let who = match principal_from_bearer(&state, &headers) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let body = match body {
        Ok(Body(b)) => b,
        Err(e) => return e.into_response(),
    };
    match parse_json::<Value>(&body).and_then(check_openai_request) {
        Ok(req) => generate(state, who, req, Dialect::OpenAi).await,
        Err(e) => e.into_response(),
    }
}

/// SillyTavern's generate body carries the OpenAI fields plus its own
/// (`chat_completion_source`, `custom_url`, ...): keep the OpenAI ones.
fn sillytavern_to_openai(body: &[u8]) -> Result<Value, ProxyError> {
    let v: Value = parse_json(body)?;
    let Some(obj) = v.as_object() else {
        return Err(ProxyError::BadRequest(
            "request body must be a JSON object".into(),
        ));
    };
    let mut out = serde_json::Map::new();
    for field in [
        "model",
        "messages",
        "stream",
        "temperature",
        "max_tokens",
        "top_p",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
    ] {
        if let Some(x) = obj.get(field) {
            out.insert(field.into(), x.clone());
        }
    }
    check_openai_request(Value::Object(out))
}

fn check_openai_request(v: Value) -> Result<Value, ProxyError> {
    let messages = v.get("messages").and_then(Value::as_array);
    if messages.is_none_or(|m| m.is_empty()) {
        return Err(ProxyError::BadRequest(
            "'messages' must be a non-empty array".into(),
        ));
    }
    if v.get("stream")
        .is_some_and(|s| !s.is_boolean() && !s.is_null())
    {
        return Err(ProxyError::BadRequest(
            "'stream' must be true or false".into(),
        ));
    }
    Ok(v)
}

/// The one generation core both routes go through.
pub async fn generate(
    state: Arc<ProxyState>,
    who: Principal,
    mut req: Value,
    dialect: Dialect,
) -> Response {
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let meta = RequestMeta {
        user: who.handle.clone(),
        session_id: who.session_id,
        fingerprint: fingerprint(req.get("messages").unwrap_or(&Value::Null)),
        stream,
    };
    // The SillyTavern variants reproduce a proxy without a per-user cap.
    let user_cap = match state.cfg.variant {
        Variant::Fixed | Variant::Mutant(_) => state.cfg.fairness.user_requests_max,
        Variant::SillyTavern1126 | Variant::SillyTavern1127 => usize::MAX,
    };
    let guard = match state.table.admit_capped(meta, user_cap) {
        Ok(g) => g,
        Err(requests::AdmitError::Full(full)) => {
            COUNTERS.requests_rejected_busy.inc();
            return ProxyError::Busy(full.to_string()).into_response();
        }
        Err(e @ requests::AdmitError::UserCap(_)) => {
            return ProxyError::TooManyAttempts {
                message: e.to_string(),
                retry_after_s: 1,
            }
            .into_response();
        }
    };
    // The session may have logged out between authentication and admission;
    // its cancel_where ran before this request was in the table.
    if who.session_id != 0 && state.is_revoked(who.session_id) {
        drop(guard);
        return ProxyError::Unauthorized.into_response();
    }
    // An admin may have disabled or deleted the user between authentication
    // and admission; their cancel_where ran before this request was in the
    // table, so check again now that it is.
    if !state.users().get(&who.handle).is_some_and(|u| u.enabled) {
        drop(guard);
        return ProxyError::Forbidden(format!(
            "user '{}' was disabled or deleted; ask an admin",
            who.handle
        ))
        .into_response();
    }
    if let Some(obj) = req.as_object_mut() {
        obj.insert("user".into(), Value::String(who.handle.clone()));
        obj.entry("model")
            .or_insert_with(|| Value::String("mock-1".into()));
    }
    let upstream_body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
    let job = Job {
        state,
        guard,
        user: who.handle,
        body: upstream_body,
        stream,
        dialect,
        user_key: who.upstream_key,
    };
    match job.state.cfg.variant {
        Variant::Mutant(mutants::Mutant::RetryOutlivesClient) => {
            // The handler only awaits the task: dropping it leaves the task running.
            tokio::spawn(fixed::run(job))
                .await
                .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Variant::Fixed | Variant::Mutant(_) => fixed::run(job).await,
        Variant::SillyTavern1126 | Variant::SillyTavern1127 => sillytavern::run(job).await,
    }
}

/// One admitted generation, handed to a variant.
pub struct Job {
    pub state: Arc<ProxyState>,
    pub guard: RequestGuard,
    pub user: String,
    pub body: Bytes,
    pub stream: bool,
    pub dialect: Dialect,
    pub user_key: Option<String>,
}
