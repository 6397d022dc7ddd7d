//! `tavernsim bench sim`: what one seed of the harness costs, against a
//! bare turmoil world doing the same HTTP work, in one run.
//!
//! # Brief overview
//! - For each seed of each default scenario, [`run`] times one harness
//!   world (`run_world`: proxy, mock upstream, tabs, tracing, oracle, trace
//!   hash) against the fixed variant, counts the HTTP exchanges it made
//!   ([`exchanges`]), then times two bare turmoil worlds making that many
//!   exchanges against a server that answers `ok` with no proxy logic:
//!   - *paced* ([`BareShape::spread`] = the harness world's simulated
//!     time): the same tick, latencies, number of hosts and simulated
//!     duration, so the same number of ticks. `harness_over_bare` is the
//!     harness's total wall time over this world's: what the proxy, the
//!     tabs, the trace and the oracle cost beyond turmoil itself.
//!   - *back to back* (no spread): the exchanges alone, as fast as the
//!     simulated network allows; the difference from the paced world is
//!     what idle ticks cost.
//! - Every world is timed on the thread that runs it, so the figures are
//!   per core whatever `jobs` is (as long as `jobs` does not exceed the
//!   free cores). Beside wall time, the thread's CPU time is read (Linux),
//!   so a busy shared machine shows as wall time above CPU time.
//!
//! A bare exchange is one request and its answer on a fresh connection, as
//! the tabs and the proxy's upstream client make them (neither keeps idle
//! connections in a world).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::net::{Listener, ServeLimits, Stream, Transport, serve};
use crate::proxy::Variant;
use crate::sim::scenario::{Scenario, WorldParams};
use crate::sim::trace::Event;
use crate::sim::world::{EndReason, WorldSpec, run_world};

/// Target: simulated seconds per wall second of one core, at least.
pub const TIME_COMPRESSION_MIN: f64 = 1_000.0;
/// Target: harness wall time over the paced bare world's, at most.
pub const HARNESS_OVER_BARE_MAX: f64 = 2.0;
/// Seeds per scenario by default: about 20-40 s on one core in release.
pub const SEEDS_DEFAULT: u64 = 75;
/// Most seeds per scenario.
pub const SEEDS_MAX: u64 = 1_000_000;
/// Most worker threads.
pub const JOBS_MAX: usize = 256;
/// Exchanges one tab makes to sign in: the CSRF token, the login, the
/// session's CSRF token (`sim/browser.rs`, `sign_in`).
const SIGN_IN_EXCHANGES: u64 = 3;
const BARE_SERVER: &str = "server";
const BARE_PORT: u16 = 8000;
/// Connection attempts of a bare client before it fails (the server binds
/// in the world's first tick).
const BARE_CONNECT_TRIES_MAX: u32 = 5;
/// Simulated time a bare world may run past its spread before it fails.
const BARE_OVERRUN_MS_MAX: u64 = 600_000;

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct SimBenchSpec {
    /// Seeds per default scenario, from 0.
    pub seeds: u64,
    /// Worker threads; each world is timed on its own thread.
    pub jobs: usize,
}

impl Default for SimBenchSpec {
    fn default() -> Self {
        Self {
            seeds: SEEDS_DEFAULT,
            jobs: 1,
        }
    }
}

impl SimBenchSpec {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=SEEDS_MAX).contains(&self.seeds) {
            return Err(format!("--seeds must be within 1..={SEEDS_MAX}"));
        }
        if !(1..=JOBS_MAX).contains(&self.jobs) {
            return Err(format!("--jobs must be within 1..={JOBS_MAX}"));
        }
        Ok(())
    }
}

/// The figures. The first three are the ones the targets are about.
#[derive(Clone, Debug, Serialize)]
pub struct SimBenchReport {
    /// Harness worlds per second of one core.
    pub seeds_per_second_per_core: f64,
    /// Simulated seconds per wall second of one core, over harness worlds.
    pub time_compression: f64,
    /// Harness wall time over the paced bare worlds' (same exchanges,
    /// ticks, latencies and hosts).
    pub harness_over_bare: f64,
    /// Simulated seconds per wall second of the paced bare worlds: the
    /// ceiling turmoil's ticks put on `time_compression` at these tick
    /// lengths and host counts.
    pub bare_time_compression: f64,
    /// Harness wall time over the back-to-back bare worlds' (same
    /// exchanges only).
    pub harness_over_bare_back_to_back: f64,
    pub variant: String,
    pub scenarios: Vec<String>,
    /// Worlds run (seeds per scenario times scenarios).
    pub seeds: u64,
    pub jobs: usize,
    /// HTTP exchanges over every harness world (see [`exchanges`]).
    pub exchanges: u64,
    pub sim_seconds: f64,
    /// Turmoil steps over every harness world.
    pub ticks: u64,
    /// Core seconds in harness worlds, paced and back-to-back bare worlds.
    pub harness_seconds: f64,
    pub bare_seconds: f64,
    pub bare_back_to_back_seconds: f64,
    /// Simulated seconds of the back-to-back bare worlds.
    pub bare_back_to_back_sim_seconds: f64,
    /// The same two figures from this process's CPU time per thread (0
    /// where it cannot be read): on a shared machine, wall time also
    /// counts time the thread waited for a core.
    pub time_compression_cpu: f64,
    pub harness_over_bare_cpu: f64,
    pub harness_cpu_seconds: f64,
    pub bare_cpu_seconds: f64,
    /// Wall time of the whole bench.
    pub wall_seconds: f64,
    /// Harness worlds that broke an invariant or ended on a harness error
    /// (the fixed variant should have none; a bench of a broken build is
    /// not a measurement).
    pub violating_worlds: u64,
    pub harness_errors: u64,
    pub time_compression_min: f64,
    pub harness_over_bare_max: f64,
}

impl SimBenchReport {
    pub fn time_compression_met(&self) -> bool {
        self.time_compression >= TIME_COMPRESSION_MIN
    }
    pub fn harness_over_bare_met(&self) -> bool {
        self.harness_over_bare <= HARNESS_OVER_BARE_MAX
    }
}

/// The HTTP exchanges (request and answer) a harness world made, counted
/// from its events: every tab signs in once ([`SIGN_IN_EXCHANGES`]) and
/// again after each logout; each `tab.send`, `tab.reload`, `tab.logout` is
/// one exchange with the proxy and each `upstream.attempt` one between the
/// proxy and the mock. A sign-in cut short (a refused login) still counts
/// whole, and a connection that never got an answer (a refresh) counts as
/// one exchange.
pub fn exchanges(events: &[Event], sc: &Scenario) -> u64 {
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count() as u64;
    let tabs: u64 = (0..sc.users).map(|u| sc.tabs_of(u) as u64).sum();
    let logouts = count("tab.logout");
    let sign_ins = tabs + logouts;
    SIGN_IN_EXCHANGES * sign_ins
        + count("tab.send")
        + count("tab.reload")
        + logouts
        + count("upstream.attempt")
}

/// One bare world's shape.
#[derive(Clone, Copy, Debug)]
pub struct BareShape<'a> {
    pub seed: u64,
    /// Tick and latencies, as the harness world had them.
    pub world: &'a WorldParams,
    /// Client hosts (beside the one server host).
    pub clients: u32,
    pub exchanges: u64,
    /// Each client starts its exchanges evenly over this much simulated
    /// time (zero: back to back).
    pub spread: Duration,
}

/// A bare world's cost (this thread) and simulated time.
#[derive(Clone, Copy, Debug)]
pub struct BareRun {
    pub cost: Cost,
    pub sim: Duration,
}

/// Wall time and this thread's CPU time spent on one world.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub wall: Duration,
    /// Zero where the thread's CPU time cannot be read.
    pub cpu: Duration,
}

impl Cost {
    /// Runs `f` and what it cost this thread.
    pub fn of<R>(f: impl FnOnce() -> R) -> (R, Cost) {
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let r = f();
        let cost = Cost {
            wall: wall.elapsed(),
            cpu: thread_cpu().saturating_sub(cpu),
        };
        (r, cost)
    }
}

/// Builds and runs one bare world: a server host answering `ok` to any
/// request over the project's transport seam ([`serve`]), and `clients`
/// client hosts sharing `exchanges` exchanges, each on a fresh connection.
pub fn run_bare(shape: BareShape<'_>) -> Result<BareRun, String> {
    let (sim, cost) = Cost::of(|| bare_world(shape));
    Ok(BareRun { cost, sim: sim? })
}

fn bare_world(shape: BareShape<'_>) -> Result<Duration, String> {
    let w = shape.world;
    let mut sim = turmoil::Builder::new()
        .rng_seed(shape.seed)
        .tick_duration(Duration::from_millis(w.tick_ms))
        .min_message_latency(Duration::from_millis(w.latency_ms_min))
        .max_message_latency(Duration::from_millis(w.latency_ms_max))
        .simulation_duration(shape.spread + Duration::from_millis(BARE_OVERRUN_MS_MAX))
        .build();
    sim.host(BARE_SERVER, || async {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, BARE_PORT));
        let listener = Listener::bind(Transport::Turmoil, addr).await?;
        let app = axum::Router::new().fallback(|| async { "ok" });
        serve(listener, app, ServeLimits::default()).await?;
        Ok(())
    });
    let clients = shape.clients.max(1) as u64;
    for c in 0..clients {
        let share = shape.exchanges / clients + u64::from(c < shape.exchanges % clients);
        let spread = shape.spread;
        sim.client(format!("client-{c}"), async move {
            let start = tokio::time::Instant::now();
            for i in 0..share {
                let at = spread.mul_f64(i as f64 / share as f64);
                tokio::time::sleep_until(start + at).await;
                bare_exchange().await?;
            }
            Ok(())
        });
    }
    sim.run()
        .map_err(|e| format!("bare world of seed {}: {e}", shape.seed))?;
    Ok(sim.elapsed())
}

/// One request and its answer on a fresh connection to the bare server.
async fn bare_exchange() -> Result<(), Box<dyn std::error::Error>> {
    let mut tries = 0;
    let stream = loop {
        match Stream::connect(Transport::Turmoil, BARE_SERVER, BARE_PORT).await {
            Ok(s) => break s,
            Err(e) if tries + 1 >= BARE_CONNECT_TRIES_MAX => return Err(e.into()),
            Err(_) => tries += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::post("/")
        .header(http::header::HOST, BARE_SERVER)
        .body(Full::new(Bytes::from_static(b"{}")))?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    driver.abort();
    if !ok {
        return Err("the bare server did not answer 2xx".into());
    }
    Ok(())
}

/// What one seed measured.
struct SeedFigures {
    harness: Cost,
    sim_ms: u64,
    tick_ms: u64,
    exchanges: u64,
    violating: bool,
    harness_error: bool,
    bare: BareRun,
    back_to_back: BareRun,
}

/// Runs one seed: the harness world, then the two bare worlds.
fn measure_seed(sc: &Arc<Scenario>, seed: u64) -> Result<SeedFigures, String> {
    // Everything a campaign does per seed, the trace's drop included.
    let ((n, sim_ms, violating, harness_error), harness) = Cost::of(|| {
        let run = run_world(&WorldSpec::new(seed, Arc::clone(sc), Variant::Fixed));
        (
            exchanges(&run.events, sc),
            run.sim_ms,
            !run.violations.is_empty(),
            run.end == EndReason::HarnessError,
        )
    });
    let shape = BareShape {
        seed,
        world: &sc.world,
        // The harness's hosts are the mock, the proxy and the browsers' host:
        // the bare world's server and two clients.
        clients: 2,
        exchanges: n,
        spread: Duration::from_millis(sim_ms),
    };
    let bare = run_bare(shape)?;
    let back_to_back = run_bare(BareShape {
        spread: Duration::ZERO,
        ..shape
    })?;
    Ok(SeedFigures {
        harness,
        sim_ms,
        tick_ms: sc.world.tick_ms.max(1),
        exchanges: n,
        violating,
        harness_error,
        bare,
        back_to_back,
    })
}

/// Runs `seeds` seeds of every default scenario over `jobs` threads.
pub fn run(spec: &SimBenchSpec) -> anyhow::Result<SimBenchReport> {
    spec.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let scenarios: Vec<Arc<Scenario>> = Scenario::defaults().into_iter().map(Arc::new).collect();
    let per = spec.seeds as usize;
    let total = per * scenarios.len();
    let next = AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(total));
    std::thread::scope(|scope| {
        for _ in 0..spec.jobs {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= total {
                        break;
                    }
                    let r = measure_seed(&scenarios[index / per], (index % per) as u64);
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            });
        }
    });
    let figures = results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    Ok(report(
        spec,
        &scenarios,
        &figures,
        started.elapsed().as_secs_f64(),
    ))
}

fn report(
    spec: &SimBenchSpec,
    scenarios: &[Arc<Scenario>],
    figures: &[SeedFigures],
    wall_seconds: f64,
) -> SimBenchReport {
    let secs = |f: &dyn Fn(&SeedFigures) -> Duration| {
        figures.iter().map(|s| f(s).as_secs_f64()).sum::<f64>()
    };
    let harness = secs(&|s| s.harness.wall);
    let bare = secs(&|s| s.bare.cost.wall);
    let back_to_back = secs(&|s| s.back_to_back.cost.wall);
    let harness_cpu = secs(&|s| s.harness.cpu);
    let bare_cpu = secs(&|s| s.bare.cost.cpu);
    let sim_seconds = figures.iter().map(|s| s.sim_ms).sum::<u64>() as f64 / 1000.0;
    let ratio = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
    SimBenchReport {
        seeds_per_second_per_core: ratio(figures.len() as f64, harness),
        time_compression: ratio(sim_seconds, harness),
        harness_over_bare: ratio(harness, bare),
        bare_time_compression: ratio(sim_seconds, bare),
        harness_over_bare_back_to_back: ratio(harness, back_to_back),
        variant: Variant::Fixed.to_string(),
        scenarios: scenarios.iter().map(|s| s.name.clone()).collect(),
        seeds: figures.len() as u64,
        jobs: spec.jobs,
        exchanges: figures.iter().map(|s| s.exchanges).sum(),
        sim_seconds,
        ticks: figures.iter().map(|s| s.sim_ms / s.tick_ms).sum(),
        time_compression_cpu: ratio(sim_seconds, harness_cpu),
        harness_over_bare_cpu: ratio(harness_cpu, bare_cpu),
        harness_cpu_seconds: harness_cpu,
        bare_cpu_seconds: bare_cpu,
        harness_seconds: harness,
        bare_seconds: bare,
        bare_back_to_back_seconds: back_to_back,
        bare_back_to_back_sim_seconds: secs(&|s| s.back_to_back.sim),
        wall_seconds,
        violating_worlds: figures.iter().filter(|s| s.violating).count() as u64,
        harness_errors: figures.iter().filter(|s| s.harness_error).count() as u64,
        time_compression_min: TIME_COMPRESSION_MIN,
        harness_over_bare_max: HARNESS_OVER_BARE_MAX,
    }
}

/// CPU time this thread has used (Linux: `CLOCK_THREAD_CPUTIME_ID`).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu() -> Duration {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec (two 64-bit fields on
    // 64-bit Linux) and the clock id is Linux's constant.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu() -> Duration {
    Duration::ZERO
}

/// The report as text: the figures and whether each target is met.
pub fn render_text(r: &SimBenchReport) -> String {
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    let us_per_tick = r.harness_seconds * 1e6 / r.ticks.max(1) as f64;
    let mut out = vec![
        format!(
            "tavernsim bench sim: {} worlds ({} per scenario: {}), variant {}, {} thread(s), {:.1} s",
            r.seeds,
            r.seeds / r.scenarios.len().max(1) as u64,
            r.scenarios.join(", "),
            r.variant,
            r.jobs,
            r.wall_seconds
        ),
        format!(
            "harness: {:.1} seeds/s per core; {:.0} simulated s in {:.2} core-s ({} ticks, {:.1} us each)",
            r.seeds_per_second_per_core, r.sim_seconds, r.harness_seconds, r.ticks, us_per_tick
        ),
        format!(
            "time compression: {:.0}x real time per core (target >= {:.0}x: {})",
            r.time_compression,
            r.time_compression_min,
            mark(r.time_compression_met())
        ),
        format!(
            "bare turmoil worlds, same {} exchanges, ticks, latencies and hosts: {:.2} core-s \
             ({:.0}x real time); harness over bare {:.2}x (target <= {:.0}x: {})",
            r.exchanges,
            r.bare_seconds,
            r.bare_time_compression,
            r.harness_over_bare,
            r.harness_over_bare_max,
            mark(r.harness_over_bare_met())
        ),
        format!(
            "bare, the same exchanges back to back ({:.0} simulated s): {:.2} core-s; harness over that {:.1}x",
            r.bare_back_to_back_sim_seconds,
            r.bare_back_to_back_seconds,
            r.harness_over_bare_back_to_back
        ),
    ];
    if r.harness_cpu_seconds > 0.0 {
        out.push(format!(
            "from CPU time instead of wall time: {:.0}x real time, harness over bare {:.2}x \
             (harness {:.2} CPU-s, bare {:.2} CPU-s)",
            r.time_compression_cpu,
            r.harness_over_bare_cpu,
            r.harness_cpu_seconds,
            r.bare_cpu_seconds
        ));
    }
    if r.violating_worlds > 0 || r.harness_errors > 0 {
        out.push(format!(
            "WARNING: {} worlds broke an invariant and {} ended on a harness error; \
             run `tavernsim fuzz` before trusting these figures",
            r.violating_worlds, r.harness_errors
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanges_count_sign_ins_sends_reloads_logouts_and_attempts() {
        let sc = Scenario {
            users: 2,
            tabs_per_user: 1,
            ..Scenario::default()
        };
        let ev = |kind: &str| Event::new(0, "h", kind, serde_json::json!({}));
        let events = [
            ev("tab.send"),
            ev("upstream.attempt"),
            ev("upstream.attempt"),
            ev("tab.abandon"),
            ev("tab.reload"),
            ev("tab.logout"),
            ev("req.admit"),
        ];
        // Sign-ins: 2 tabs + 1 after the logout, 3 exchanges each.
        assert_eq!(exchanges(&events, &sc), 3 * 3 + 1 + 2 + 1 + 1);
    }

    #[test]
    fn a_bare_world_makes_its_exchanges_over_its_spread() {
        let world = WorldParams::default();
        let shape = BareShape {
            seed: 1,
            world: &world,
            clients: 3,
            exchanges: 10,
            spread: Duration::from_secs(5),
        };
        let paced = run_bare(shape).unwrap();
        assert!(paced.sim >= Duration::from_secs(3), "{:?}", paced.sim);
        let quick = run_bare(BareShape {
            spread: Duration::ZERO,
            ..shape
        })
        .unwrap();
        assert!(quick.sim < paced.sim, "{quick:?} vs {paced:?}");
    }
}
