//! Campaigns: many seeds of many scenarios over all cores, with a progress
//! bar and a report.
//!
//! Seeds are independent worlds; each worker thread takes the next
//! (scenario, seed) pair in order and runs it on its own thread-local trace
//! subscriber. The report lists violations in (scenario, seed) order, each
//! with the command that replays it.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::scenario::Scenario;
use super::world::{EndReason, WorldSpec, run_world};
use crate::proxy::Variant;

/// A scenario and how the user named it (a name or a path), for replay.
#[derive(Clone, Debug)]
pub struct NamedScenario {
    pub origin: String,
    pub scenario: Arc<Scenario>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct CampaignSpec {
    pub scenarios: Vec<NamedScenario>,
    pub variant: Variant,
    pub seed_start: u64,
    /// Seeds per scenario.
    pub seeds: u64,
    pub jobs: usize,
    /// Stop at the first violating world (after the ones in flight end).
    pub stop_on_first: bool,
    /// Draw a progress bar (on a terminal only).
    pub progress: bool,
}

/// One violation found, with everything needed to replay it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finding {
    pub seed: u64,
    pub scenario: String,
    pub invariant: String,
    pub message: String,
    pub trace_hash: String,
    pub replay: String,
}

/// The campaign's result.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub variant: String,
    pub seeds_run: u64,
    pub violations: Vec<Finding>,
    pub wall_seconds: f64,
    pub sim_seconds: f64,
    /// Worlds that ended on an error of the harness itself.
    pub harness_errors: Vec<String>,
    /// Refreshes per phase of the refreshed request, over every world run.
    pub coverage: std::collections::BTreeMap<String, u64>,
    pub seeds_per_second: f64,
}

impl Report {
    pub fn seeds_per_second(&self) -> f64 {
        if self.wall_seconds > 0.0 {
            self.seeds_run as f64 / self.wall_seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} seed {}: {} ({})",
            self.scenario, self.seed, self.invariant, self.replay
        )
    }
}

/// The command that replays one world.
pub fn replay_command(seed: u64, origin: &str, variant: Variant, hash: &str) -> String {
    format!(
        "tavernsim replay --seed {seed} --scenario {origin} --variant {variant} --expect-hash {hash}"
    )
}

struct Outcome {
    index: usize,
    findings: Vec<Finding>,
    sim_ms: u64,
    harness_error: Option<String>,
    coverage: std::collections::BTreeMap<String, u64>,
}

pub fn run(spec: &CampaignSpec) -> Report {
    run_until(spec, &|_| true, None)
}

/// Runs a campaign that, with `stop_on_first`, stops at the first world with
/// a finding `stops` accepts (`run` accepts any), and hands out no new world
/// after `deadline`.
pub fn run_until(
    spec: &CampaignSpec,
    stops: &(dyn Fn(&Finding) -> bool + Sync),
    deadline: Option<Instant>,
) -> Report {
    let started = Instant::now();
    let per = spec.seeds as usize;
    let total = per * spec.scenarios.len();
    let bar = progress_bar(spec.progress, total as u64);
    let next = AtomicUsize::new(0);
    // With stop_on_first: the lowest violating index so far. Indices below it
    // still run (they were handed out first), so the report names the same
    // first violation whatever the number of jobs.
    let stop_at = AtomicUsize::new(usize::MAX);
    let violations_seen = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::<Outcome>::new());
    std::thread::scope(|scope| {
        for _ in 0..spec.jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= total
                        || index > stop_at.load(Ordering::Relaxed)
                        || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    let outcome = run_one(spec, index, per);
                    if !outcome.findings.is_empty() {
                        let n = violations_seen
                            .fetch_add(outcome.findings.len(), Ordering::Relaxed)
                            + outcome.findings.len();
                        bar.set_message(format!("violations: {n}"));
                        if spec.stop_on_first && outcome.findings.iter().any(stops) {
                            stop_at.fetch_min(index, Ordering::Relaxed);
                        }
                    }
                    bar.inc(1);
                    outcomes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(outcome);
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    let first_violation = stop_at.load(Ordering::Relaxed);
    outcomes.retain(|o| o.index <= first_violation);
    outcomes.sort_by_key(|o| o.index);
    // Past a deadline, count only the unbroken run of seeds from the start.
    if let Some(gap) = outcomes.iter().enumerate().position(|(i, o)| o.index != i) {
        outcomes.truncate(gap);
    }
    let mut coverage = std::collections::BTreeMap::new();
    for o in &outcomes {
        super::coverage::add(&mut coverage, &o.coverage);
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    Report {
        variant: spec.variant.to_string(),
        seeds_run: outcomes.len() as u64,
        coverage,
        seeds_per_second: if wall_seconds > 0.0 {
            outcomes.len() as f64 / wall_seconds
        } else {
            0.0
        },
        sim_seconds: outcomes.iter().map(|o| o.sim_ms).sum::<u64>() as f64 / 1000.0,
        harness_errors: outcomes
            .iter()
            .filter_map(|o| o.harness_error.clone())
            .collect(),
        violations: outcomes.into_iter().flat_map(|o| o.findings).collect(),
        wall_seconds,
    }
}

/// Runs `seeds` seeds of each scenario against `variant` over `jobs`
/// threads and maps each world with `f`; results in (scenario, seed) order.
pub fn map_worlds<T: Send>(
    scenarios: &[NamedScenario],
    variant: Variant,
    seeds: u64,
    jobs: usize,
    f: &(dyn Fn(&NamedScenario, u64, &super::world::WorldRun) -> T + Sync),
) -> Vec<T> {
    let per = seeds as usize;
    let total = per * scenarios.len();
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::<(usize, T)>::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= total {
                        break;
                    }
                    let (named, seed) = (&scenarios[index / per], (index % per) as u64);
                    let run = run_world(&WorldSpec {
                        seed,
                        scenario: Arc::clone(&named.scenario),
                        variant,
                    });
                    let t = f(named, seed, &run);
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((index, t));
                }
            });
        }
    });
    let mut out = out.into_inner().unwrap_or_else(|p| p.into_inner());
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

fn run_one(spec: &CampaignSpec, index: usize, per: usize) -> Outcome {
    let named = &spec.scenarios[index / per];
    let seed = spec.seed_start.wrapping_add((index % per) as u64);
    let run = run_world(&WorldSpec {
        seed,
        scenario: Arc::clone(&named.scenario),
        variant: spec.variant,
    });
    let hash = run.trace_hash.clone();
    let findings = run
        .violations
        .iter()
        .map(|v| Finding {
            seed,
            scenario: named.scenario.name.clone(),
            invariant: v.invariant.to_string(),
            message: v.message.clone(),
            trace_hash: hash.clone(),
            replay: replay_command(seed, &named.origin, spec.variant, &hash),
        })
        .collect();
    let harness_error = (run.end == EndReason::HarnessError).then(|| {
        format!(
            "seed {seed} of {}: {}",
            named.origin,
            run.error.unwrap_or_default()
        )
    });
    Outcome {
        index,
        findings,
        sim_ms: run.sim_ms,
        harness_error,
        coverage: super::coverage::refreshes_per_phase(&run.events),
    }
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{bar:40} {pos}/{len} seeds  {per_sec}  {elapsed_precise}  {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message("violations: 0");
    bar
}
