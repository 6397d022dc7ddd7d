//! One simulated world per seed: the mock upstream host, the proxy host
//! (built with a [`Variant`]), and one client host per user whose tabs
//! refresh while their requests are retried.
//!
//! # Brief overview
//! [`WorldSpec`] (seed, scenario, variant) goes in, [`WorldRun`] (events,
//! verdict, trace hash) comes out of [`run_world`]. The driver steps turmoil
//! tick by tick: it takes the proxy host down when the proxy's process
//! exits, and ends the world as soon as the tabs are done and the proxy is
//! quiescent, so idle time costs nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tracing_subscriber::layer::SubscriberExt;

use super::browser::{TabSpec, run_tab};
use super::oracle::{self, Ending, Violation};
use super::scenario::Scenario;
use super::trace::{Event, Recorder, TraceLayer, trace_hash};
use crate::events;
use crate::net::{Listener, ServeLimits, Transport, serve};
use crate::proxy::session::SessionSecret;
use crate::proxy::users::{HashCost, User, UserStore, hash_password, token_digest};
use crate::proxy::{Clock, ExitHook, ProxyConfig, ProxyState, Variant, app, forward};
use crate::upstream::{self, MockUpstream};

pub const PROXY_HOST: &str = "proxy";
pub const PROXY_PORT: u16 = 8000;
pub const UPSTREAM_HOST: &str = "upstream";
pub const UPSTREAM_PORT: u16 = 9000;
/// Events kept per world at the most.
pub const EVENTS_MAX: usize = 2_000_000;
/// The simulated epoch: fixed, so cookies and dates repeat per seed.
const EPOCH_S: u64 = 1_750_000_000;

/// Salts that keep each host's generator independent of the others'.
const SALT_UPSTREAM: u64 = 0x7570_7374_7265_616d;
const SALT_PROXY: u64 = 0x7072_6f78_7900_0000;
const SALT_TAB: u64 = 0x7461_6200_0000_0000;

/// What to run.
#[derive(Clone, Debug)]
pub struct WorldSpec {
    pub seed: u64,
    pub scenario: Arc<Scenario>,
    pub variant: Variant,
}

/// How the driver stopped the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// Tabs done and the proxy quiescent.
    Quiescent,
    /// The proxy host went down.
    ProxyCrashed,
    /// Tabs done, but the proxy never became quiescent in time.
    QuiesceTimeout,
    /// The world hit its simulated-time bound.
    TimeLimit,
    /// turmoil reported an error for a host other than the proxy.
    HarnessError,
}

/// What came out.
#[derive(Debug)]
pub struct WorldRun {
    pub events: Vec<Event>,
    pub violations: Vec<Violation>,
    pub end: EndReason,
    pub sim_ms: u64,
    pub trace_hash: String,
    pub error: Option<String>,
}

/// Derives a sub-seed: a SplitMix64 step over seed and salt, so related
/// seeds give unrelated streams.
pub fn derive_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn user_handle(i: u32) -> String {
    format!("user-{i}")
}

fn user_password(i: u32) -> String {
    format!("password-{i}")
}

/// Runs one world to its end and judges it.
pub fn run_world(spec: &WorldSpec) -> WorldRun {
    let recorder = Recorder::new(EVENTS_MAX);
    let subscriber = tracing_subscriber::registry().with(TraceLayer::new(recorder.clone()));
    let (end, sim_ms, error) =
        tracing::subscriber::with_default(subscriber, || drive(spec, &recorder));
    let live = recorder.live();
    let events = recorder.take();
    let ending = Ending {
        crashed: end == EndReason::ProxyCrashed,
        live,
        quiescent: matches!(end, EndReason::Quiescent | EndReason::ProxyCrashed),
    };
    let grace_us = spec.scenario.world.cancel_grace_ms * 1000;
    let violations = oracle::check(&events, &ending, grace_us);
    WorldRun {
        trace_hash: trace_hash(&events),
        events,
        violations,
        end,
        sim_ms,
        error,
    }
}

fn users_for(sc: &Scenario, seed: u64) -> UserStore {
    let mut store = UserStore::new();
    for i in 0..sc.users {
        let mut user = User::new(user_handle(i));
        let salt = derive_seed(seed, i as u64).to_le_bytes();
        let mut salt16 = [0u8; 16];
        salt16[..8].copy_from_slice(&salt);
        salt16[8..].copy_from_slice(&salt);
        user.password_hash =
            hash_password(&user_password(i), &salt16, HashCost::Simulation).unwrap_or_default();
        user.token_sha256 = Some(token_digest(&format!("token-{i}")));
        let _ = store.create(user);
    }
    store
}

fn build_sim(spec: &WorldSpec, exited: Arc<Mutex<Option<String>>>) -> turmoil::Sim<'static> {
    let sc = Arc::clone(&spec.scenario);
    let w = &sc.world;
    let mut sim = turmoil::Builder::new()
        .rng_seed(spec.seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .tick_duration(Duration::from_millis(w.tick_ms))
        .min_message_latency(Duration::from_millis(w.latency_ms_min))
        .max_message_latency(Duration::from_millis(w.latency_ms_max))
        .simulation_duration(Duration::from_millis(
            w.sim_ms_max + w.quiesce_ms_max + 1_000,
        ))
        .build();

    let script = sc.upstream.clone();
    let upstream_seed = derive_seed(spec.seed, SALT_UPSTREAM);
    sim.host(UPSTREAM_HOST, move || {
        let mock = MockUpstream::new(script.clone(), upstream_seed);
        async move {
            let listener = Listener::bind(
                Transport::Turmoil,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, UPSTREAM_PORT)),
            )
            .await?;
            serve(listener, upstream::app(mock), ServeLimits::default()).await?;
            Ok(())
        }
    });

    let proxy_seed = derive_seed(spec.seed, SALT_PROXY);
    let users = users_for(&sc, spec.seed);
    let cfg = ProxyConfig {
        variant: spec.variant,
        upstream_url: format!("http://{UPSTREAM_HOST}:{UPSTREAM_PORT}/v1"),
        retry: sc.retry.clone(),
        gate: sc.gate.clone(),
        budget: sc.budget.clone(),
        fairness: sc.fairness.clone(),
        // Every upstream connection closes after its answer, so "no upstream
        // connection open" at quiescence is exact.
        upstream_idle_per_host_max: 0,
        ..ProxyConfig::default()
    };
    sim.host(PROXY_HOST, move || {
        let cfg = cfg.clone();
        let users = users.clone();
        let exited = Arc::clone(&exited);
        async move {
            let upstream = forward::Upstream::new(
                Transport::Turmoil,
                &cfg.upstream_url,
                None,
                cfg.upstream_idle_per_host_max,
            )?;
            let secret = SessionSecret::from_bytes(
                derive_seed(proxy_seed, 1)
                    .to_le_bytes()
                    .repeat(4)
                    .try_into()
                    .unwrap_or([7; 32]),
            );
            let clock = Clock::from_fn(|| UNIX_EPOCH + turmoil::since_epoch().unwrap_or_default());
            let exit = ExitHook::from_fn(move |reason: &str| {
                *exited.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
            });
            let state = ProxyState::new(cfg, users, secret, upstream, proxy_seed, clock, exit);
            let listener = Listener::bind(
                Transport::Turmoil,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT)),
            )
            .await?;
            serve(listener, app(state), ServeLimits::default()).await?;
            Ok(())
        }
    });

    for u in 0..sc.users {
        let sc = Arc::clone(&sc);
        let seed = spec.seed;
        sim.client(format!("tabs-{}", user_handle(u)), async move {
            let tabs = (0..sc.tabs_of(u)).map(|t| {
                let spec = TabSpec {
                    transport: Transport::Turmoil,
                    proxy_host: PROXY_HOST.into(),
                    proxy_port: PROXY_PORT,
                    user: user_handle(u),
                    password: user_password(u),
                    tab: t,
                    seed: derive_seed(seed, SALT_TAB ^ ((u as u64) << 16) ^ t as u64),
                };
                let sc = Arc::clone(&sc);
                tokio::spawn(async move { run_tab(spec, sc).await.map_err(|e| e.to_string()) })
            });
            let handles: Vec<_> = tabs.collect();
            for h in handles {
                let _ = h.await;
            }
            Ok(())
        });
    }
    sim
}

/// Steps the world until it ends; returns why, when (ms) and any error.
fn drive(spec: &WorldSpec, recorder: &Recorder) -> (EndReason, u64, Option<String>) {
    let exited = Arc::new(Mutex::new(None::<String>));
    let mut sim = build_sim(spec, Arc::clone(&exited));
    let ended = step_to_end(spec, recorder, &mut sim, &exited);
    // Freeze before the world is torn down (the proxy crash included):
    // teardown drops tasks in an order that is not part of the run.
    recorder.freeze();
    if ended.0 == EndReason::ProxyCrashed && sim.is_host_running(PROXY_HOST) {
        sim.crash(PROXY_HOST);
    }
    ended
}

fn step_to_end(
    spec: &WorldSpec,
    recorder: &Recorder,
    sim: &mut turmoil::Sim<'static>,
    exited: &Mutex<Option<String>>,
) -> (EndReason, u64, Option<String>) {
    let w = &spec.scenario.world;
    let mut clients_done_at: Option<Duration> = None;
    loop {
        let step = sim.step();
        let now = sim.elapsed();
        let ms = now.as_millis() as u64;
        if let Some(reason) = exited.lock().unwrap_or_else(|p| p.into_inner()).take() {
            events::world_proxy_crash(&reason);
            return (EndReason::ProxyCrashed, ms, None);
        }
        let done = match step {
            Ok(done) => done,
            Err(e) => {
                let text = e.to_string();
                if text.contains(PROXY_HOST) {
                    events::world_proxy_crash(&text);
                    return (EndReason::ProxyCrashed, ms, Some(text));
                }
                return (EndReason::HarnessError, ms, Some(text));
            }
        };
        if recorder.overflowed() {
            return (
                EndReason::TimeLimit,
                ms,
                Some(format!("more than {EVENTS_MAX} events")),
            );
        }
        if done {
            let since = *clients_done_at.get_or_insert(now);
            let live = recorder.live();
            if live.requests == 0 && live.tasks == 0 && live.upstream_conns == 0 {
                return (EndReason::Quiescent, ms, None);
            }
            if (now - since).as_millis() as u64 > w.quiesce_ms_max {
                return (EndReason::QuiesceTimeout, ms, None);
            }
        }
        if ms > w.sim_ms_max && clients_done_at.is_none() {
            return (EndReason::TimeLimit, ms, None);
        }
    }
}
