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

use super::browser::{self, TabSpec, run_tab};
use super::oracle::{self, Ending, Grace, Violation};
use super::scenario::Scenario;
use super::schedule::{FaultKind, Schedule};
use super::trace::{Event, PhaseNote, Recorder, TraceLayer, trace_hash};
use crate::events;
use crate::net::{Listener, ServeLimits, Transport, serve, serve_until};
use crate::proxy::session::SessionSecret;
use crate::proxy::users::{HashCost, User, UserStore, hash_password, token_digest};
use crate::proxy::{Clock, ExitHook, ProxyConfig, ProxyState, Variant, app, forward};
use crate::upstream::{self, MockUpstream};

pub const PROXY_HOST: &str = "proxy";
pub const PROXY_PORT: u16 = 8000;
/// Errors the proxy host returns start with this, so the driver can tell a
/// proxy failure from the harness's own.
const PROXY_ERROR_PREFIX: &str = "proxy host: ";
pub const UPSTREAM_HOST: &str = "upstream";
pub const UPSTREAM_PORT: u16 = 9000;
/// Events kept per world at the most.
pub const EVENTS_MAX: usize = 2_000_000;
/// The simulated epoch: fixed, so cookies and dates repeat per seed.
const EPOCH_S: u64 = 1_750_000_000;

/// Salts that keep each host's generator independent of the others'.
const SALT_PROXY: u64 = 0x7072_6f78_7900_0000;

/// What to run.
#[derive(Clone, Debug)]
pub struct WorldSpec {
    pub seed: u64,
    pub scenario: Arc<Scenario>,
    pub variant: Variant,
    /// The world's schedule; `None`: the one the seed gives.
    pub schedule: Option<Arc<Schedule>>,
}

impl WorldSpec {
    /// The seed's own world.
    pub fn new(seed: u64, scenario: Arc<Scenario>, variant: Variant) -> Self {
        Self {
            seed,
            scenario,
            variant,
            schedule: None,
        }
    }

    /// The schedule this world runs.
    pub fn schedule(&self) -> Arc<Schedule> {
        self.schedule
            .clone()
            .unwrap_or_else(|| Arc::new(Schedule::generate(self.seed, &self.scenario)))
    }
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
    /// turmoil reported an error for a host other than the proxy, or the
    /// harness itself failed.
    HarnessError,
    /// The world recorded more events than it may keep.
    EventLimit,
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
        // The harness failed, not the proxy: judge nothing about the end.
        cut_short: matches!(end, EndReason::HarnessError | EndReason::EventLimit),
        outside: false,
    };
    let violations = oracle::check(&events, &ending, &Grace::of(&spec.scenario.world));
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
    // The administrator, when the scenario has one act.
    if sc.p_disable + sc.p_delete > 0.0 {
        let mut admin = User::new(browser::ADMIN_HANDLE.to_string());
        admin.admin = true;
        admin.password_hash =
            hash_password(browser::ADMIN_PASSWORD, &[9; 16], HashCost::Simulation)
                .unwrap_or_default();
        let _ = store.create(admin);
    }
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

/// Kills the proxy's current life (see [`serve_until`]).
type KillSwitch = Arc<Mutex<Option<tokio_util::sync::CancellationToken>>>;

fn build_sim(
    spec: &WorldSpec,
    schedule: &Schedule,
    phases: tokio::sync::broadcast::Sender<PhaseNote>,
    exited: Arc<Mutex<Option<String>>>,
    kill: KillSwitch,
) -> turmoil::Sim<'static> {
    let sc = Arc::clone(&spec.scenario);
    let w = &sc.world;
    let mut sim = turmoil::Builder::new()
        .rng_seed(spec.seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .tick_duration(Duration::from_millis(w.tick_ms))
        .min_message_latency(Duration::from_millis(w.latency_ms_min))
        .max_message_latency(Duration::from_millis(w.latency_ms_max))
        .simulation_duration(Duration::from_millis(
            w.sim_ms_max
                .saturating_add(w.quiesce_ms_max)
                .saturating_add(1_000),
        ))
        .build();

    let script = sc.upstream.clone();
    // Every answer comes from the schedule.
    let plan = Arc::new(schedule.upstream_plan(user_handle));
    let planned: upstream::Planned = Arc::new(move |fp: &str, attempt: u32| {
        plan.answer(fp, attempt)
            .map(|a| (a.answer.into(), Duration::from_millis(a.delay_ms)))
    });
    // The mock's notes reach the tabs directly (not over the simulated
    // network): a harness side channel for aiming refreshes.
    let notes = MockUpstream::notes_channel();
    let mock_notes = notes.clone();
    sim.host(UPSTREAM_HOST, move || {
        let mock = MockUpstream::planned(script.clone(), Arc::clone(&planned), mock_notes.clone());
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
    let kill_proxy = Arc::clone(&kill);
    let holds = browser::Holds::default();
    let proxy_holds = Arc::clone(&holds);
    // Long enough for an aimed tab to hear of the phase, drop its
    // connection, and for the proxy to see it gone.
    let hold_for = Duration::from_millis(
        w.latency_ms_max
            .saturating_mul(2)
            .saturating_add(w.tick_ms.saturating_mul(3)),
    );
    sim.host(PROXY_HOST, move || {
        let cfg = cfg.clone();
        let users = users.clone();
        let exited = Arc::clone(&exited);
        let kill = Arc::clone(&kill_proxy);
        let holds = Arc::clone(&proxy_holds);
        async move {
            let upstream = forward::Upstream::new(
                Transport::Turmoil,
                &cfg.upstream_url,
                None,
                cfg.upstream_idle_per_host_max,
            )
            .map_err(|e| format!("{PROXY_ERROR_PREFIX}{e}"))?;
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
            let hold: crate::proxy::PhaseHold = Arc::new(move |fp: &str, phase: &'static str| {
                let held = phase == "finished"
                    && holds.lock().unwrap_or_else(|p| p.into_inner()).contains(fp);
                held.then(|| {
                    Box::pin(tokio::time::sleep(hold_for))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                })
            });
            let _ = state.phase_hold.set(hold);
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT));
            let tagged = |e: std::io::Error| format!("{PROXY_ERROR_PREFIX}{e}");
            let listener = Listener::bind(Transport::Turmoil, addr)
                .await
                .map_err(tagged)?;
            // The driver kills this life of the proxy through `stop`.
            let stop = tokio_util::sync::CancellationToken::new();
            *kill.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.clone());
            serve_until(listener, app(state), ServeLimits::default(), stop)
                .await
                .map_err(tagged)?;
            // Killed: wait for the crash, as a dying process does nothing.
            std::future::pending::<()>().await;
            Ok(())
        }
    });

    let mut browsers = Vec::new();
    for u in 0..sc.users {
        let plans: Vec<_> = schedule
            .tabs
            .iter()
            .filter(|t| t.user == u)
            .cloned()
            .collect();
        if plans.is_empty() {
            continue;
        }
        let sc = Arc::clone(&sc);
        let notes = notes.clone();
        let phases = phases.clone();
        let holds = Arc::clone(&holds);
        browsers.push(async move {
            let spec_of = |tab: u32| {
                let mut spec = TabSpec::simulated(
                    (PROXY_HOST, PROXY_PORT),
                    user_handle(u),
                    user_password(u),
                    tab,
                    format!("http://{UPSTREAM_HOST}:{UPSTREAM_PORT}/v1"),
                );
                spec.notes = Some(notes.clone());
                spec.phases = Some(phases.clone());
                spec.holds = Some(Arc::clone(&holds));
                spec
            };
            // Tabs of one browser: one login before the first tab starts.
            let shared = if sc.tabs_share_session {
                let first = plans.iter().map(|p| p.start_ms).min().unwrap_or(10);
                tokio::time::sleep(Duration::from_millis(first)).await;
                browser::sign_in_shared(&spec_of(plans[0].tab)).await
            } else {
                None
            };
            // Tabs sharing a session already waited for the first of them.
            let waited = if shared.is_some() {
                plans.iter().map(|p| p.start_ms).min().unwrap_or(0)
            } else {
                0
            };
            let tabs = plans.into_iter().map(|mut plan| {
                plan.start_ms = plan.start_ms.saturating_sub(waited);
                let spec = spec_of(plan.tab);
                let sc = Arc::clone(&sc);
                let shared = shared.clone();
                tokio::spawn(async move {
                    run_tab(spec, plan, sc, shared)
                        .await
                        .map_err(|e| e.to_string())
                })
            });
            let handles: Vec<_> = tabs.collect();
            for h in handles {
                let _ = h.await;
            }
        });
    }
    // Every user's browser on one client host: each host costs a poll per
    // tick, and users' addresses matter to nothing the harness checks.
    sim.client(BROWSERS_HOST, async move {
        let users: Vec<_> = browsers.into_iter().map(tokio::spawn).collect();
        for u in users {
            let _ = u.await;
        }
        Ok(())
    });
    sim
}

/// The client host every simulated browser runs on.
pub const BROWSERS_HOST: &str = "browsers";

/// Steps the world until it ends; returns why, when (ms) and any error.
fn drive(spec: &WorldSpec, recorder: &Recorder) -> (EndReason, u64, Option<String>) {
    let exited = Arc::new(Mutex::new(None::<String>));
    let schedule = spec.schedule();
    let kill = KillSwitch::default();
    let mut sim = build_sim(
        spec,
        &schedule,
        recorder.phases(),
        Arc::clone(&exited),
        Arc::clone(&kill),
    );
    let ended =
        panics::guarded(|| step_to_end(spec, &schedule, recorder, &mut sim, &exited, &kill));
    // Freeze before the world is torn down (the proxy crash included):
    // teardown drops tasks in an order that is not part of the run.
    recorder.freeze();
    match ended {
        Ok(ended) => {
            if ended.0 == EndReason::ProxyCrashed && sim.is_host_running(PROXY_HOST) {
                sim.crash(PROXY_HOST);
            }
            ended
        }
        Err(panic) => {
            // A panic left turmoil's state half-borrowed: never touch (or
            // drop) this world again.
            std::mem::forget(sim);
            let ms = panic.at_ms;
            if panic.host.as_deref() == Some(PROXY_HOST) {
                let reason = format!("the proxy panicked: {}", panic.message);
                recorder.unfreeze_for(|| events::world_proxy_crash(&reason));
                (EndReason::ProxyCrashed, ms, Some(reason))
            } else {
                let host = panic.host.unwrap_or_else(|| "the harness".into());
                (
                    EndReason::HarnessError,
                    ms,
                    Some(format!("{host} panicked: {}", panic.message)),
                )
            }
        }
    }
}

fn step_to_end(
    spec: &WorldSpec,
    schedule: &Schedule,
    recorder: &Recorder,
    sim: &mut turmoil::Sim<'static>,
    exited: &Mutex<Option<String>>,
    kill: &KillSwitch,
) -> (EndReason, u64, Option<String>) {
    let w = &spec.scenario.world;
    // Once quiescent, keep going this long so nothing still on the wire
    // (a late attempt, a late write) escapes the oracle.
    let settle = Duration::from_millis(
        w.latency_ms_max
            .saturating_mul(2)
            .saturating_add(w.tick_ms.saturating_mul(2)),
    );
    let mut clients_done_at: Option<Duration> = None;
    let mut quiet_since: Option<Duration> = None;
    let mut link = LinkState::default();
    let mut proxy = ProxyLife::Up;
    loop {
        let step = sim.step();
        let now = sim.elapsed();
        panics::set_sim_ms(now.as_millis() as u64);
        let ms = now.as_millis() as u64;
        link.apply(sim, schedule, ms);
        proxy = restart(sim, recorder, schedule, ms, proxy, kill);
        if let Some(reason) = exited.lock().unwrap_or_else(|p| p.into_inner()).take() {
            events::world_proxy_crash(&reason);
            return (EndReason::ProxyCrashed, ms, None);
        }
        let done = match step {
            Ok(done) => done,
            Err(e) => {
                let text = e.to_string();
                if text.starts_with(PROXY_ERROR_PREFIX) {
                    events::world_proxy_crash(&text);
                    return (EndReason::ProxyCrashed, ms, Some(text));
                }
                return (EndReason::HarnessError, ms, Some(text));
            }
        };
        if recorder.overflowed() {
            return (
                EndReason::EventLimit,
                ms,
                Some(format!("more than {EVENTS_MAX} events in one world")),
            );
        }
        if done {
            let since = *clients_done_at.get_or_insert(now);
            let live = recorder.live();
            if live.requests == 0 && live.tasks == 0 && live.upstream_conns == 0 {
                let quiet = *quiet_since.get_or_insert(now);
                if now - quiet >= settle {
                    return (EndReason::Quiescent, ms, None);
                }
            } else {
                quiet_since = None;
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

/// Where the proxy process is in a planned restart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ProxyLife {
    Up,
    /// Killed: its connections die on this step's polls.
    Dying,
    Down,
}

/// Takes the proxy down, or starts it again, as the schedule's restarts
/// want it at `ms`. Going down takes two steps: first every connection is
/// killed (in the order the connections were made), then the host crashes
/// (what is left: timers, detached tasks), its events in canonical order.
fn restart(
    sim: &mut turmoil::Sim<'static>,
    recorder: &Recorder,
    schedule: &Schedule,
    ms: u64,
    life: ProxyLife,
    kill: &KillSwitch,
) -> ProxyLife {
    let want_down = schedule.faults.iter().any(|f| {
        f.kind == FaultKind::Restart && f.at_ms <= ms && ms < f.at_ms.saturating_add(f.for_ms)
    });
    match (life, want_down) {
        (ProxyLife::Up, true) => {
            if let Some(stop) = kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
                stop.cancel();
            }
            ProxyLife::Dying
        }
        (ProxyLife::Dying, _) => {
            recorder.in_canonical_order(|| sim.crash(PROXY_HOST));
            events::world_restart(false);
            ProxyLife::Down
        }
        (ProxyLife::Down, false) => {
            sim.bounce(PROXY_HOST);
            events::world_restart(true);
            ProxyLife::Up
        }
        (life, _) => life,
    }
}

/// The link between the proxy and the upstream, as the schedule's faults
/// want it at each step.
#[derive(Default, PartialEq, Eq, Clone, Copy)]
struct LinkState {
    partitioned: bool,
    held: bool,
}

impl LinkState {
    fn apply(&mut self, sim: &mut turmoil::Sim<'static>, schedule: &Schedule, ms: u64) {
        if schedule.faults.is_empty() {
            return;
        }
        let active = |kind| {
            schedule
                .faults
                .iter()
                .any(|f| f.kind == kind && f.at_ms <= ms && ms < f.at_ms.saturating_add(f.for_ms))
        };
        let want = LinkState {
            partitioned: active(FaultKind::Partition),
            held: active(FaultKind::Hold),
        };
        if want == *self {
            return;
        }
        // turmoil: a partition drops what it holds; a release delivers what
        // a hold kept; a repair only lifts a partition.
        if want.partitioned {
            sim.partition(PROXY_HOST, UPSTREAM_HOST);
        } else if want.held {
            if self.partitioned {
                sim.repair(PROXY_HOST, UPSTREAM_HOST);
            }
            if !self.held || self.partitioned {
                sim.hold(PROXY_HOST, UPSTREAM_HOST);
            }
        } else if self.held && !self.partitioned {
            sim.release(PROXY_HOST, UPSTREAM_HOST);
        } else {
            sim.repair(PROXY_HOST, UPSTREAM_HOST);
        }
        events::world_link(want.partitioned, want.held);
        *self = want;
    }
}

/// Turns a panic inside a world into a verdict instead of a dead campaign.
mod panics {
    use std::cell::{Cell, RefCell};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Once;

    thread_local! {
        static IN_WORLD: Cell<bool> = const { Cell::new(false) };
        static SIM_MS: Cell<u64> = const { Cell::new(0) };
        static FIRST: RefCell<Option<(Option<String>, String)>> = const { RefCell::new(None) };
    }

    pub struct Panic {
        pub host: Option<String>,
        pub message: String,
        pub at_ms: u64,
    }

    pub fn set_sim_ms(ms: u64) {
        SIM_MS.with(|c| c.set(ms));
    }

    /// Runs `f`; a panic in it (on any host) comes back as [`Panic`],
    /// naming the host that panicked first.
    pub fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
        install_hook();
        IN_WORLD.with(|c| c.set(true));
        FIRST.with(|c| c.borrow_mut().take());
        let out = catch_unwind(AssertUnwindSafe(f));
        IN_WORLD.with(|c| c.set(false));
        out.map_err(|payload| {
            let (host, message) = FIRST
                .with(|c| c.borrow_mut().take())
                .unwrap_or_else(|| (None, payload_text(&*payload)));
            Panic {
                host,
                message,
                at_ms: SIM_MS.with(Cell::get),
            }
        })
    }

    fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into())
    }

    /// Inside a world, record the first panic and its host quietly; outside,
    /// the default hook prints as usual.
    fn install_hook() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !IN_WORLD.with(Cell::get) {
                    return default(info);
                }
                FIRST.with(|c| {
                    let mut first = c.borrow_mut();
                    if first.is_none() {
                        let host = super::super::trace::current_node();
                        *first = Some((host, payload_text(info.payload())));
                    }
                });
            }));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that panics must come back as a verdict naming that host, not
    /// as a dead campaign.
    #[test]
    fn a_panicking_host_is_named_not_fatal() {
        let recorder = Recorder::new(1_000);
        let subscriber = tracing_subscriber::registry().with(TraceLayer::new(recorder));
        let outcome = tracing::subscriber::with_default(subscriber, || {
            let mut sim = turmoil::Builder::new().build();
            sim.host(PROXY_HOST, || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                panic!("boom in the proxy");
            });
            sim.client("tab", async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            });
            let out = panics::guarded(|| sim.run());
            if out.is_err() {
                std::mem::forget(sim);
            }
            out
        });
        let panic = outcome.expect_err("the host's panic must surface");
        assert_eq!(panic.host.as_deref(), Some(PROXY_HOST));
        assert!(
            panic.message.contains("boom in the proxy"),
            "{}",
            panic.message
        );
    }
}
