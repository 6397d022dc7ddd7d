//! `tavernsim serve`: the proxy on real sockets, from a TOML config or in
//! demo mode with the mock upstream in-process.
//!
//! # Brief overview
//! - [`ServeConfig`]: the config file (`listen`, `users_file`,
//!   `session_secret`, `[limits]` = [`ServeLimits`], `[proxy]` =
//!   [`ProxyConfig`] with `[proxy.retry]` and `[proxy.login]`). Unknown
//!   keys are errors that name the key and the file.
//! - [`start`] binds and serves a config; [`start_demo`] first starts a
//!   [`MockUpstream`] that answers some attempts with 429 on a loopback port
//!   and serves the proxy in front of it with the demo user.
//! - [`demo_commands`]: the curl commands `serve --demo` prints.
//!
//! Randomness here comes from the OS (session secret, proxy seed); the
//! proxy itself still only sees the seeded generator it is given.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::net::{Listener, ServeLimits, Transport, serve};
use crate::proxy::session::{SECRET_BYTES, SessionSecret};
use crate::proxy::users::{HashCost, User, UserStore, hash_password, token_digest};
use crate::proxy::{Clock, ExitHook, ProxyConfig, ProxyState, app, forward};
use crate::upstream::{self, MockUpstream, UpstreamScript};

/// Largest config file read.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// The demo's user, password and bearer token (demo mode only).
pub const DEMO_USER: &str = "demo";
pub const DEMO_PASSWORD: &str = "demo";
pub const DEMO_TOKEN: &str = "demo-token";

/// A `tavernsim serve --config FILE`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// The users file (TOML, `[[user]]` tables); admin changes are written
    /// back to it atomically. Required outside demo mode.
    pub users_file: Option<PathBuf>,
    /// 64 hex digits signing session cookies and CSRF tokens. Unset: a
    /// random secret per process (everyone logs in again after a restart).
    pub session_secret: Option<String>,
    /// Per-connection bounds (header and body sizes and timeouts).
    pub limits: ServeLimits,
    /// The proxy: upstream, key, retry policy, request and body limits.
    pub proxy: ProxyConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8000)),
            users_file: None,
            session_secret: None,
            limits: ServeLimits::default(),
            proxy: ProxyConfig::default(),
        }
    }
}

impl ServeConfig {
    /// Reads and checks a config file; every error names the file, and the
    /// bad key where there is one.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read the config file {shown}; check the path"))?
            .len();
        if len > CONFIG_FILE_BYTES_MAX {
            anyhow::bail!(
                "config file {shown} is {len} bytes, over {CONFIG_FILE_BYTES_MAX}; is it the right file?"
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {shown}"))?;
        let mut cfg =
            Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {shown}: {e}"))?;
        // A relative users file is relative to the config file.
        if let (Some(users), Some(dir)) = (&cfg.users_file, path.parent())
            && users.is_relative()
        {
            cfg.users_file = Some(dir.join(users));
        }
        Ok(cfg)
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            format!(
                "{}; see README.md, section `tavernsim serve`, for every key",
                e.to_string().trim_end()
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        self.limits.validate()?;
        let p = &self.proxy;
        p.retry.validate().map_err(|e| format!("proxy.{e}"))?;
        p.login.validate().map_err(|e| format!("proxy.{e}"))?;
        let ranges = [
            ("proxy.requests_max", p.requests_max, 1, 1_000_000),
            ("proxy.body_bytes_max", p.body_bytes_max, 1, 1 << 30),
            (
                "proxy.upstream_body_bytes_max",
                p.upstream_body_bytes_max,
                1,
                1 << 30,
            ),
            (
                "proxy.upstream_idle_per_host_max",
                p.upstream_idle_per_host_max,
                0,
                100_000,
            ),
        ];
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{name} = {v}: must be within {lo}..={hi}"));
            }
        }
        if p.session_max_age_s == 0 {
            return Err("proxy.session_max_age_s must be at least 1".into());
        }
        if let Some(s) = &self.session_secret {
            parse_secret(s)?;
        }
        Ok(())
    }
}

/// `session_secret`: exactly 64 hex digits.
fn parse_secret(s: &str) -> Result<SessionSecret, String> {
    let mut bytes = [0u8; SECRET_BYTES];
    hex::decode_to_slice(s.trim(), &mut bytes).map_err(|_| {
        "session_secret must be 64 hex digits (32 bytes); make one with `openssl rand -hex 32`, or leave it out for a random one per process".to_string()
    })?;
    Ok(SessionSecret::from_bytes(bytes))
}

/// A serving proxy.
pub struct Running {
    /// Where the proxy listens.
    pub addr: SocketAddr,
    /// The in-process mock upstream's API root (demo mode only).
    pub upstream_url: Option<String>,
    pub state: Arc<ProxyState>,
    task: JoinHandle<std::io::Result<()>>,
    _upstream_task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Serves until the listener fails.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task)
            .await
            .context("the server task ended abnormally")?
            .context("the listener failed")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self._upstream_task {
            t.abort();
        }
    }
}

/// What `start` needs besides the config.
pub struct StartOptions {
    pub users: UserStore,
    /// Where admin changes are saved (`None`: in memory only).
    pub users_file: Option<PathBuf>,
    pub exit: ExitHook,
}

/// Binds `cfg.listen` and serves the proxy on it (in a spawned task).
pub async fn start(cfg: ServeConfig, opts: StartOptions) -> anyhow::Result<Running> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let mut os = ChaCha20Rng::from_os_rng();
    let secret = match &cfg.session_secret {
        Some(s) => parse_secret(s).map_err(anyhow::Error::msg)?,
        None => SessionSecret::from_bytes(os.random()),
    };
    let p = &cfg.proxy;
    let upstream = forward::Upstream::new(
        Transport::Tokio,
        &p.upstream_url,
        p.upstream_key.clone(),
        p.upstream_idle_per_host_max,
    )?;
    let mut state = ProxyState::new(
        p.clone(),
        opts.users,
        secret,
        upstream,
        os.random(),
        Clock::system(),
        opts.exit,
    )
    .with_hash_cost(HashCost::Standard);
    if let Some(path) = opts.users_file {
        state = state.with_users_file(path);
    }
    let listener = Listener::bind(Transport::Tokio, cfg.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another server using it? Pick another with --listen ADDR",
                cfg.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, app(Arc::clone(&state)), cfg.limits));
    Ok(Running {
        addr,
        upstream_url: None,
        state,
        task,
        _upstream_task: None,
    })
}

/// Loads `cfg.users_file` and serves `cfg`.
pub async fn start_from_config(cfg: ServeConfig, exit: ExitHook) -> anyhow::Result<Running> {
    let Some(path) = cfg.users_file.clone() else {
        anyhow::bail!(
            "the config has no users_file; add `users_file = \"users.toml\"` (a file of [[user]] tables), or try `tavernsim serve --demo`"
        );
    };
    let users = UserStore::load(&path)?;
    if users.is_empty() {
        tracing::warn!(file = %path.display(), "the users file has no users: nobody can log in");
    }
    start(
        cfg,
        StartOptions {
            users,
            users_file: Some(path),
            exit,
        },
    )
    .await
}

/// The mock upstream's script in demo mode: about 3 attempts in 10 get a
/// 429 (most with a short `Retry-After`), so the retry path shows.
pub fn demo_script() -> UpstreamScript {
    UpstreamScript {
        p_429: 0.3,
        p_retry_after: 0.7,
        retry_after_s_max: 1,
        p_5xx: 0.0,
        p_stream_reset: 0.0,
        delay_ms_min: 20,
        delay_ms_max: 200,
        stream_chunks: 8,
        chunk_gap_ms: 60,
    }
}

/// Starts the mock upstream on a loopback port, then the proxy (`variant`,
/// `fixed` but for tests) on `listen` in front of it with the demo user (in
/// memory only).
///
/// With `upstream_url`, no mock is started: the demo proxy forwards there
/// (for example to `tavernsim probe`'s mock).
pub async fn start_demo(
    listen: SocketAddr,
    variant: crate::proxy::Variant,
    upstream_url: Option<String>,
    exit: ExitHook,
) -> anyhow::Result<Running> {
    let mut os = ChaCha20Rng::from_os_rng();
    let (upstream_url, up_task) = match upstream_url {
        Some(url) => (url, None),
        None => {
            let mock = MockUpstream::new(demo_script(), os.random());
            let up_listener =
                Listener::bind(Transport::Tokio, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                    .await
                    .context("cannot bind a loopback port for the demo's mock upstream")?;
            let up_addr = up_listener.local_addr()?;
            let task = tokio::spawn(serve(
                up_listener,
                upstream::app(mock),
                ServeLimits::default(),
            ));
            (format!("http://{up_addr}/v1"), Some(task))
        }
    };
    let mut demo = User::new(DEMO_USER);
    demo.admin = true;
    demo.password_hash = hash_password(DEMO_PASSWORD, &os.random(), HashCost::Standard)?;
    demo.token_sha256 = Some(token_digest(DEMO_TOKEN));
    let mut users = UserStore::new();
    users.create(demo)?;
    let cfg = ServeConfig {
        listen,
        proxy: ProxyConfig {
            variant,
            upstream_url: upstream_url.clone(),
            // 3 attempts in 10 get a 429: with 8 attempts a request gives
            // up about once in 150000, so pasted commands just work.
            retry: crate::proxy::RetryPolicy {
                attempts_max: 8,
                ..Default::default()
            },
            ..ProxyConfig::default()
        },
        ..ServeConfig::default()
    };
    let mut running = start(
        cfg,
        StartOptions {
            users,
            users_file: None,
            exit,
        },
    )
    .await?;
    running.upstream_url = Some(upstream_url);
    running._upstream_task = up_task;
    Ok(running)
}

/// The commands `serve --demo` prints: each works pasted into a POSIX shell
/// while the demo runs.
pub fn demo_commands(addr: SocketAddr) -> String {
    let base = format!("http://{addr}");
    let jar = "/tmp/tavernsim-demo.cookies";
    let json = "-H 'content-type: application/json'";
    let bearer = format!("-H 'authorization: Bearer {DEMO_TOKEN}'");
    let msg = r#"[{"role":"user","content":"Hello, tavern!"}]"#;
    [
        "# 1. Log in as demo/demo; the session cookie goes to a cookie jar.".to_string(),
        format!(
            r#"curl -s -c {jar} {json} -d '{{"handle":"{DEMO_USER}","password":"{DEMO_PASSWORD}"}}' {base}/api/users/login"#
        ),
        "# 2. Fetch the CSRF token of that session.".to_string(),
        format!(
            r#"TOKEN=$(curl -s -b {jar} {base}/csrf-token | sed -E 's/.*"token":"([^"]+)".*/\1/')"#
        ),
        "# 3. Generate on SillyTavern's route: cookie and x-csrf-token.".to_string(),
        format!(
            r#"curl -s -b {jar} -H "x-csrf-token: $TOKEN" {json} -d '{{"messages":{msg}}}' {base}/api/backends/chat-completions/generate"#
        ),
        "# 4. OpenAI's route with the bearer token, then streaming.".to_string(),
        format!(
            r#"curl -s {bearer} {json} -d '{{"model":"mock-1","messages":{msg}}}' {base}/v1/chat/completions"#
        ),
        format!(
            r#"curl -sN {bearer} {json} -d '{{"model":"mock-1","stream":true,"messages":{msg}}}' {base}/v1/chat/completions"#
        ),
        "# 5. What the proxy did: requests, attempts, retries by reason.".to_string(),
        format!("curl -s {base}/metrics | grep -v '^#'"),
    ]
    .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_and_users_file_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let cfg = ServeConfig::load(&dir.join("tavernsim.toml")).unwrap();
        assert_eq!(
            ServeConfig {
                users_file: None,
                ..cfg.clone()
            },
            ServeConfig {
                users_file: None,
                ..ServeConfig::default()
            },
            "the example shows the defaults"
        );
        let users = UserStore::load(&cfg.users_file.unwrap()).unwrap();
        assert!(users.get("admin").unwrap().admin);
        assert!(users.verify_password("admin", "change-me").is_ok());
    }

    #[test]
    fn errors_name_the_bad_key() {
        let cases = [
            ("lisen = \"127.0.0.1:1\"", "lisen"),
            ("listen = \"nowhere\"", "listen"),
            ("[proxy]\nupstream = \"x\"", "upstream"),
            (
                "[proxy.retry]\nattempts_max = 0",
                "proxy.retry.attempts_max",
            ),
            ("[proxy.login]\nwindow_ms = 0", "proxy.login.window_ms"),
            ("[proxy]\nrequests_max = 0", "proxy.requests_max"),
            (
                "[limits]\nbody_read_timeout_ms = 0",
                "limits.body_read_timeout_ms",
            ),
            ("[limits]\nheader_bytes = 1", "header_bytes"),
            ("session_secret = \"abc\"", "session_secret"),
            ("[proxy]\nbody_bytes_max = -1", "body_bytes_max"),
        ];
        for (text, key) in cases {
            let err = ServeConfig::parse(text).unwrap_err();
            assert!(
                err.contains(key),
                "{text:?} gave {err:?}, which does not name {key}"
            );
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tavernsim-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[proxy]\nupstream_ur = \"http://x\"\n").unwrap();
        let err = format!("{:#}", ServeConfig::load(&bad).unwrap_err());
        assert!(
            err.contains("bad.toml") && err.contains("upstream_ur"),
            "{err}"
        );
        let missing = format!(
            "{:#}",
            ServeConfig::load(&dir.join("nope.toml")).unwrap_err()
        );
        assert!(missing.contains("nope.toml"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_session_secret_is_64_hex_digits() {
        assert!(parse_secret(&"ab".repeat(32)).is_ok());
        assert!(parse_secret(&"ab".repeat(31)).is_err());
        assert!(parse_secret(&"zz".repeat(32)).is_err());
    }
}
