//! The kill table: every mutant ([`Mutant`]) run against the scenario aimed
//! at it until its target invariant fires, and the fixed proxy run over the
//! same scenarios beside them, clean.
//!
//! # Brief overview
//! - [`plan`]: the scenario each mutant is run against (the cheapest one that
//!   kills it; the aimed ones in `sims/aimed/` for the races that need a
//!   refresh or a logout at a precise phase) and the seed budget
//!   `cargo test` holds it to.
//! - [`kill`]: one mutant's row; [`fixed_run`]: the fixed proxy's clean run.
//!
//! A mutant counts as killed only when the invariant it was written to break
//! fires: another invariant firing first proves nothing about that check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::campaign::{self, CampaignSpec, Finding, NamedScenario};
use super::scenario::Scenario;
use crate::proxy::{Mutant, Variant};

/// Where and how hard one mutant is hunted.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub mutant: Mutant,
    /// The scenario it is run against (embedded or aimed, by name).
    pub scenario: &'static str,
    /// Seeds within which `cargo test` requires the kill.
    pub test_seeds_max: u64,
}

/// The plan for `m`.
pub fn plan(m: Mutant) -> Plan {
    let (scenario, test_seeds_max) = match m {
        Mutant::TimerNotCancelled => ("refresh-during-retry", 5),
        Mutant::AbortWritesError => ("refresh-during-attempt", 3),
        Mutant::CancelMissedBeforeArm => ("logout-during-retry", 3),
        Mutant::DoubleEnd => ("streaming-refresh", 3),
        Mutant::StreamPipedAfterClose => ("refresh-during-attempt", 3),
        Mutant::RetryReresolvesUser => ("logout-during-retry", 3),
        Mutant::SlotReuseNoGeneration => ("refresh-during-attempt", 8),
        Mutant::PanicOnUnhinted429 => ("refresh-during-retry", 3),
        Mutant::LeakOnErrorPath => ("refresh-during-retry", 3),
        Mutant::IgnoresRetryAfter => ("burst-429", 3),
        Mutant::GatePerUser => ("burst-429", 3),
        Mutant::CapCountsAllUsers => ("one-user-floods", 3),
        Mutant::BackoffInSeconds => ("refresh-during-retry", 3),
        Mutant::RetryOutlivesClient => ("refresh-during-retry", 5),
        Mutant::BudgetNeverCharged => ("budget-storm", 3),
        Mutant::CancelBySession => ("two-tabs-one-session", 5),
        Mutant::StreamRetriedAfterBytes => ("stream-reset", 3),
    };
    Plan {
        mutant: m,
        scenario,
        test_seeds_max,
    }
}

/// The scenarios of every plan, each once, in plan order.
pub fn plan_scenarios() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for m in Mutant::ALL {
        let s = plan(m).scenario;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// One row of the kill table.
#[derive(Clone, Debug, Serialize)]
pub struct Kill {
    pub name: String,
    pub killed: bool,
    /// The invariant that killed it (its target), if it was killed.
    pub invariant: Option<String>,
    /// Seeds run up to and including the one that killed it.
    pub seeds_to_kill: Option<u64>,
    pub wall_seconds: f64,
    pub target: String,
    pub race: Option<u8>,
    pub scenario: String,
    pub seeds_run: u64,
    /// Other invariants that fired on the way (a symptom of the same defect).
    pub also: Vec<String>,
    /// The command that replays the killing world.
    pub replay: Option<String>,
}

/// How the campaigns of the kill table run.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Seeds per mutant (and per scenario for the fixed run).
    pub seeds: u64,
    /// Wall time per mutant (and for the fixed run).
    pub time: Option<Duration>,
    pub jobs: usize,
}

fn load(name: &str) -> NamedScenario {
    NamedScenario {
        origin: name.to_string(),
        scenario: Arc::new(
            Scenario::load(name).unwrap_or_else(|e| panic!("a planned scenario must load: {e}")),
        ),
    }
}

/// Runs `m` against its planned scenario until its target fires.
pub fn kill(m: Mutant, budget: &Budget) -> Kill {
    let plan = plan(m);
    let spec = CampaignSpec {
        scenarios: vec![load(plan.scenario)],
        variant: Variant::Mutant(m),
        seed_start: 0,
        seeds: budget.seeds,
        jobs: budget.jobs,
        stop_on_first: true,
        progress: false,
        ..CampaignSpec::default()
    };
    let target = m.target();
    let deadline = budget.time.map(|t| Instant::now() + t);
    let report = campaign::run_until(&spec, &|f: &Finding| f.invariant == target, deadline);
    let killer = report.violations.iter().find(|f| f.invariant == target);
    let mut also: Vec<String> = report
        .violations
        .iter()
        .filter(|f| f.invariant != target)
        .map(|f| f.invariant.clone())
        .collect();
    also.sort();
    also.dedup();
    Kill {
        name: m.name().to_string(),
        killed: killer.is_some(),
        invariant: killer.map(|f| f.invariant.clone()),
        seeds_to_kill: killer.map(|_| report.seeds_run),
        wall_seconds: report.wall_seconds,
        target: target.to_string(),
        race: m.race(),
        scenario: plan.scenario.to_string(),
        seeds_run: report.seeds_run,
        also,
        replay: killer.map(|f| f.replay.clone()),
    }
}

/// The fixed proxy over every planned scenario.
#[derive(Clone, Debug, Serialize)]
pub struct FixedRun {
    pub seeds_run: u64,
    pub violations: usize,
    pub scenarios: Vec<String>,
    pub wall_seconds: f64,
    /// The first few violations, with their replay commands.
    pub first: Vec<Finding>,
}

/// Runs the fixed proxy over every planned scenario, every seed.
pub fn fixed_run(budget: &Budget) -> FixedRun {
    let names = plan_scenarios();
    let spec = CampaignSpec {
        scenarios: names.iter().map(|n| load(n)).collect(),
        variant: Variant::Fixed,
        seed_start: 0,
        seeds: budget.seeds,
        jobs: budget.jobs,
        stop_on_first: false,
        progress: false,
        ..CampaignSpec::default()
    };
    let deadline = budget.time.map(|t| Instant::now() + t);
    let report = campaign::run_until(&spec, &|_| false, deadline);
    FixedRun {
        seeds_run: report.seeds_run,
        violations: report.violations.len() + report.harness_errors.len(),
        scenarios: names.iter().map(|s| s.to_string()).collect(),
        wall_seconds: report.wall_seconds,
        first: report.violations.into_iter().take(5).collect(),
    }
}

/// The median of the seeds-to-kill of the killed mutants.
pub fn median_seeds_to_kill(kills: &[Kill]) -> Option<f64> {
    let mut n: Vec<u64> = kills.iter().filter_map(|k| k.seeds_to_kill).collect();
    n.sort_unstable();
    match n.len() {
        0 => None,
        len if len % 2 == 1 => Some(n[len / 2] as f64),
        len => Some((n[len / 2 - 1] + n[len / 2]) as f64 / 2.0),
    }
}

/// Both faithful SillyTavern variants, measured.
#[derive(Clone, Debug, Serialize)]
pub struct Faithful {
    #[serde(rename = "sillytavern-1.12.6")]
    pub st_1126: Vec<super::measure::Touched>,
    #[serde(rename = "sillytavern-1.12.7")]
    pub st_1127: Vec<super::measure::Died>,
}

/// The whole report of `tavernsim mutants`.
#[derive(Clone, Debug, Serialize)]
pub struct KillTable {
    pub mutants: Vec<Kill>,
    pub fixed: FixedRun,
    pub median_seeds_to_kill: Option<f64>,
    pub faithful: Option<Faithful>,
}

impl KillTable {
    /// Every mutant killed by its target and the fixed proxy clean.
    pub fn passed(&self) -> bool {
        self.mutants.iter().all(|k| k.killed) && self.fixed.violations == 0
    }
}

/// Runs `mutants` (each reported to `on_row` as it is done), the fixed
/// proxy beside them, and, with `measure`, the faithful variants over the
/// embedded scenarios.
pub fn run_table(
    mutants: &[Mutant],
    budget: &Budget,
    measure: bool,
    on_row: &dyn Fn(&Kill),
) -> KillTable {
    let kills: Vec<Kill> = mutants
        .iter()
        .map(|m| {
            let k = kill(*m, budget);
            on_row(&k);
            k
        })
        .collect();
    let fixed = fixed_run(budget);
    let faithful = measure.then(|| {
        let scenarios: Vec<NamedScenario> = super::scenario::EMBEDDED
            .iter()
            .map(|(n, _)| load(n))
            .collect();
        Faithful {
            st_1126: super::measure::measure_1126(&scenarios, budget.seeds, budget.jobs),
            st_1127: super::measure::measure_1127(&scenarios, budget.seeds, budget.jobs),
        }
    });
    KillTable {
        median_seeds_to_kill: median_seeds_to_kill(&kills),
        mutants: kills,
        fixed,
        faithful,
    }
}

/// The table's header line, then one line per mutant ([`row_text`]).
pub const HEADER: &str = "mutant                            race  target                verdict    seeds  wall s  scenario";

/// One mutant's line of the text table.
pub fn row_text(k: &Kill) -> String {
    let verdict = if k.killed { "killed" } else { "SURVIVED" };
    let seeds = k.seeds_to_kill.unwrap_or(k.seeds_run);
    let race = k.race.map_or("-".to_string(), |r| r.to_string());
    let mut line = format!(
        "{:<33} {:<5} {:<21} {:<8} {:>7} {:>7.2}  {}",
        k.name, race, k.target, verdict, seeds, k.wall_seconds, k.scenario
    );
    if !k.also.is_empty() {
        line.push_str(&format!(" (also: {})", k.also.join(", ")));
    }
    line
}

/// Everything after the rows: the fixed run, the median, the measurements.
pub fn summary_text(t: &KillTable) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let f = &t.fixed;
    let _ = writeln!(
        out,
        "{:<33} {:<5} {:<21} {:<8} {:>7} {:>7.2}  {}",
        "fixed",
        "-",
        "(every invariant)",
        if f.violations == 0 { "clean" } else { "BROKEN" },
        f.seeds_run,
        f.wall_seconds,
        f.scenarios.join(", ")
    );
    for v in &f.first {
        let _ = writeln!(
            out,
            "  fixed broke {}: {}\n  replay: {}",
            v.invariant, v.message, v.replay
        );
    }
    let killed = t.mutants.iter().filter(|k| k.killed).count();
    let _ = writeln!(
        out,
        "\n{killed} of {} mutants killed by their target invariant; median seeds to kill: {}",
        t.mutants.len(),
        t.median_seeds_to_kill
            .map_or("-".to_string(), |m| format!("{m}"))
    );
    for k in t.mutants.iter().filter(|k| !k.killed) {
        let _ = writeln!(
            out,
            "  {} survived {} seeds of {}: replay one with `tavernsim replay --seed 0 --scenario {} --variant {}`",
            k.name, k.seeds_run, k.scenario, k.scenario, k.name
        );
    }
    if let Some(m) = &t.faithful {
        out.push_str(&faithful_text(m));
    }
    out
}

fn faithful_text(m: &Faithful) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nsillytavern-1.12.6: released state touched after a refresh, and detached tasks outliving their client"
    );
    let _ = writeln!(
        out,
        "  {:<22} {:>6} {:>9} {:>8} {:>8} {:>15}  {:>9} {:>17}  {:>12}",
        "scenario",
        "seeds",
        "refreshes",
        "admitted",
        "touched",
        "per 1000 (adm.)",
        "timers",
        "outlived med/p90/max s",
        "armed after"
    );
    for r in &m.st_1126 {
        let _ = writeln!(
            out,
            "  {:<22} {:>6} {:>9} {:>8} {:>8} {:>15}  {:>9} {:>17}  {:>12}",
            r.scenario,
            r.seeds,
            r.refreshes,
            r.admitted,
            r.touched,
            format!(
                "{:.0} ({:.0})",
                r.touched_per_thousand_refreshes, r.touched_per_thousand_admitted
            ),
            r.outliving,
            format!(
                "{:.1}/{:.1}/{:.1}",
                r.outlived_s_median, r.outlived_s_p90, r.outlived_s_max
            ),
            r.timers_armed_after_leave
        );
    }
    let _ = writeln!(
        out,
        "  (touched: a req.stale or client.write after the release, per 1000 refreshes and per 1000 refreshes of admitted requests;\n   timers: refreshed requests whose retry timer outlived the client, from tab.abandon to the timer task's end;\n   armed after: retry.armed after the client left)"
    );
    let _ = writeln!(
        out,
        "\nsillytavern-1.12.7: seeds in which the proxy died, and other users' requests that died with it"
    );
    let _ = writeln!(
        out,
        "  {:<22} {:>6} {:>6} {:>7}  {:>14} {:>6} {:>5}  {:>16}",
        "scenario", "seeds", "died", "share", "others' reqs", "mean", "max", "other users mean"
    );
    for r in &m.st_1127 {
        let _ = writeln!(
            out,
            "  {:<22} {:>6} {:>6} {:>6.1}%  {:>14} {:>6.1} {:>5}  {:>16.1}",
            r.scenario,
            r.seeds,
            r.died,
            r.died_share * 100.0,
            r.other_requests,
            r.other_requests_mean,
            r.other_requests_max,
            r.other_users_mean
        );
    }
    out
}
