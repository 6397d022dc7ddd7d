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
use super::trace::Event;
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
    /// Seeds per scenario (in this shard: the seed space is split).
    pub seeds: u64,
    pub jobs: usize,
    /// Stop at the first violating world (after the ones in flight end).
    pub stop_on_first: bool,
    /// Draw a progress bar (on a terminal only).
    pub progress: bool,
    /// This campaign runs the seeds `seed_start + shard.index + k *
    /// shard.count` only.
    pub shard: Shard,
    /// Run every world twice and compare the traces.
    pub check_determinism: bool,
}

impl Default for CampaignSpec {
    fn default() -> Self {
        Self {
            scenarios: Vec::new(),
            variant: Variant::Fixed,
            seed_start: 0,
            seeds: 200,
            jobs: 1,
            stop_on_first: true,
            progress: false,
            shard: Shard::default(),
            check_determinism: false,
        }
    }
}

/// One part of a campaign split over several machines: `index/count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(try_from = "RawShard")]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

/// A shard as a report file says it, checked before it is believed.
#[derive(serde::Deserialize)]
struct RawShard {
    index: u64,
    count: u64,
}

impl TryFrom<RawShard> for Shard {
    type Error = String;
    fn try_from(r: RawShard) -> Result<Self, String> {
        format!("{}/{}", r.index, r.count).parse()
    }
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a shard; write i/n with 0 <= i < n, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count || count > 1_000_000 {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One violation found, with everything needed to replay it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Finding {
    pub seed: u64,
    pub scenario: String,
    /// How the scenario was named (a name or a path): what replays it.
    #[serde(default)]
    pub origin: String,
    pub invariant: String,
    pub message: String,
    pub trace_hash: String,
    pub replay: String,
    /// Worlds of the campaign that broke this invariant in this scenario
    /// (with `--keep-going`; the finding is the first of them).
    #[serde(default = "one")]
    pub worlds: u64,
    /// The shrunk schedule saved for it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_file: Option<String>,
    /// Actions in the seed's schedule and in the shrunk one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<(usize, usize)>,
}

fn one() -> u64 {
    1
}

/// The campaign's result.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Report {
    pub variant: String,
    pub seeds_run: u64,
    /// Distinct violations (by invariant and scenario), each with the first
    /// world that showed it.
    pub violations: Vec<Finding>,
    pub wall_seconds: f64,
    pub sim_seconds: f64,
    /// Worlds that ended on an error of the harness itself.
    pub harness_errors: Vec<String>,
    /// Refreshes per phase of the refreshed request, over every world run.
    pub coverage: std::collections::BTreeMap<String, u64>,
    pub seeds_per_second: f64,
    /// The part of the seed space this report covers.
    #[serde(default)]
    pub shard: Shard,
    #[serde(default)]
    pub seed_start: u64,
    /// The scenarios run, as named.
    #[serde(default)]
    pub scenarios: Vec<String>,
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

/// The scenario and seed of the `index`th world: scenarios take turns, so
/// a campaign cut short by time has run each about equally.
pub fn world_at(spec: &CampaignSpec, index: usize) -> (&NamedScenario, u64) {
    let n = spec.scenarios.len().max(1);
    let k = (index / n) as u64;
    let seed = spec
        .seed_start
        .wrapping_add(spec.shard.index)
        .wrapping_add(k.wrapping_mul(spec.shard.count));
    (&spec.scenarios[index % n], seed)
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
    let total = (spec.seeds as usize).saturating_mul(spec.scenarios.len());
    let bar = progress_bar(spec.progress, deadline.is_none().then_some(total as u64));
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
                    let outcome = run_one(spec, index);
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
    let seeds_run = outcomes.len() as u64;
    Report {
        variant: spec.variant.to_string(),
        seeds_run,
        coverage,
        seeds_per_second: if wall_seconds > 0.0 {
            seeds_run as f64 / wall_seconds
        } else {
            0.0
        },
        sim_seconds: outcomes.iter().map(|o| o.sim_ms).sum::<u64>() as f64 / 1000.0,
        harness_errors: outcomes
            .iter()
            .filter_map(|o| o.harness_error.clone())
            .collect(),
        violations: distinct(outcomes.into_iter().flat_map(|o| o.findings)),
        wall_seconds,
        shard: spec.shard,
        seed_start: spec.seed_start,
        scenarios: spec.scenarios.iter().map(|s| s.origin.clone()).collect(),
    }
}

/// Keeps the first finding of each (scenario as named, invariant), counting the
/// worlds that repeated it; order of first appearance.
fn distinct(findings: impl IntoIterator<Item = Finding>) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut at = std::collections::BTreeMap::<(String, String), usize>::new();
    for f in findings {
        let key = (f.origin.clone(), f.invariant.clone());
        match at.get(&key) {
            Some(&i) => out[i].worlds += f.worlds,
            None => {
                at.insert(key, out.len());
                out.push(f);
            }
        }
    }
    out
}

/// Combines the reports of a campaign's shards into one. The shards must
/// have run the same variant, scenarios and seed space, and be distinct.
pub fn merge(reports: Vec<Report>) -> Result<Report, String> {
    let Some(first) = reports.first().cloned() else {
        return Err("no reports to merge".into());
    };
    let mut seen = std::collections::BTreeSet::new();
    for r in &reports {
        if (
            r.variant.as_str(),
            &r.scenarios,
            r.seed_start,
            r.shard.count,
        ) != (
            first.variant.as_str(),
            &first.scenarios,
            first.seed_start,
            first.shard.count,
        ) {
            return Err(format!(
                "shard {} ran {} on {:?} from seed {} in {} shards, unlike shard {} ({} on {:?} from seed {} in {} shards): merge reports of one campaign",
                r.shard,
                r.variant,
                r.scenarios,
                r.seed_start,
                r.shard.count,
                first.shard,
                first.variant,
                first.scenarios,
                first.seed_start,
                first.shard.count
            ));
        }
        if !seen.insert(r.shard.index) {
            return Err(format!("shard {} is given twice", r.shard));
        }
    }
    let mut merged = first.clone();
    merged.seeds_run = reports.iter().map(|r| r.seeds_run).sum();
    merged.sim_seconds = reports.iter().map(|r| r.sim_seconds).sum();
    // Shards run side by side: the campaign took as long as the slowest.
    merged.wall_seconds = reports.iter().map(|r| r.wall_seconds).fold(0.0, f64::max);
    merged.seeds_per_second = reports.iter().map(|r| r.seeds_per_second).sum();
    merged.harness_errors = reports
        .iter()
        .flat_map(|r| r.harness_errors.clone())
        .collect();
    merged.coverage = std::collections::BTreeMap::new();
    for r in &reports {
        super::coverage::add(&mut merged.coverage, &r.coverage);
    }
    let mut all: Vec<Finding> = reports.into_iter().flat_map(|r| r.violations).collect();
    all.sort_by(|a, b| (&a.scenario, a.seed).cmp(&(&b.scenario, b.seed)));
    merged.violations = distinct(all);
    merged.shard = Shard {
        index: 0,
        count: if seen.len() as u64 == first.shard.count {
            1
        } else {
            first.shard.count
        },
    };
    Ok(merged)
}

/// Shards of `count` missing from `reports`.
pub fn missing_shards(reports: &[Report]) -> Vec<u64> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    (0..first.shard.count)
        .filter(|i| !reports.iter().any(|r| r.shard.index == *i))
        .collect()
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
                    let run =
                        run_world(&WorldSpec::new(seed, Arc::clone(&named.scenario), variant));
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

fn run_one(spec: &CampaignSpec, index: usize) -> Outcome {
    let (named, seed) = world_at(spec, index);
    let world = WorldSpec::new(seed, Arc::clone(&named.scenario), spec.variant);
    let run = run_world(&world);
    let hash = run.trace_hash.clone();
    let finding = |invariant: &str, message: String| Finding {
        seed,
        scenario: named.scenario.name.clone(),
        origin: named.origin.clone(),
        invariant: invariant.to_string(),
        message,
        trace_hash: hash.clone(),
        replay: replay_command(seed, &named.origin, spec.variant, &hash),
        worlds: 1,
        schedule_file: None,
        actions: None,
    };
    let mut findings: Vec<Finding> = run
        .violations
        .iter()
        .map(|v| finding(v.invariant, v.message.clone()))
        .collect();
    if spec.check_determinism {
        let again = run_world(&world);
        if let Some(diff) = first_difference(&run.events, &again.events) {
            findings.push(finding(
                "nondeterminism",
                format!(
                    "the same seed ran twice gave trace hashes {} and {}; {diff}",
                    run.trace_hash, again.trace_hash
                ),
            ));
        }
    }
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

/// Where two runs of one world first differ, said so a reader can find it
/// in both traces; `None` when they are the same.
pub fn first_difference(a: &[Event], b: &[Event]) -> Option<String> {
    let shown = |e: Option<&Event>| match e {
        Some(e) => format!(
            "{} at {:.6}s on {} {}",
            e.kind,
            e.t_us as f64 / 1e6,
            if e.host.is_empty() { "-" } else { &e.host },
            serde_json::to_string(&e.fields).unwrap_or_default()
        ),
        None => "the end of the trace".into(),
    };
    let i = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))?;
    Some(format!(
        "first difference at event {i}: {} against {}",
        shown(a.get(i)),
        shown(b.get(i))
    ))
}

fn progress_bar(enabled: bool, total: Option<u64>) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
    }
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::new(n),
            "{bar:40} {pos}/{len} seeds  {per_sec}  {elapsed_precise}  {msg}",
        ),
        // Bounded by time: no length to fill.
        None => (
            ProgressBar::no_length(),
            "{spinner} {pos} seeds  {per_sec}  {elapsed_precise}  {msg}",
        ),
    };
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message("violations: 0");
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_difference_is_named_with_both_events() {
        let a = vec![
            Event::new(10, "proxy", "req.admit", json!({"key": 1})),
            Event::new(20, "proxy", "req.release", json!({"key": 1})),
        ];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[1] = Event::new(30, "proxy", "req.release", json!({"key": 1}));
        let d = first_difference(&a, &b).unwrap();
        assert!(
            d.contains("event 1") && d.contains("0.000020s") && d.contains("0.000030s"),
            "{d}"
        );
        b.truncate(1);
        assert!(
            first_difference(&a, &b)
                .unwrap()
                .contains("the end of the trace")
        );
    }

    #[test]
    fn shards_split_the_seeds_and_merge_back() {
        assert_eq!("2/8".parse::<Shard>(), Ok(Shard { index: 2, count: 8 }));
        for bad in ["8/8", "1", "a/b", "0/0"] {
            assert!(bad.parse::<Shard>().unwrap_err().contains("i/n"), "{bad}");
        }
        let named = NamedScenario {
            origin: "refresh-during-retry".into(),
            scenario: Arc::new(Scenario::load("refresh-during-retry").unwrap()),
        };
        let spec = |shard| CampaignSpec {
            scenarios: vec![named.clone()],
            seeds: 3,
            shard,
            stop_on_first: false,
            ..CampaignSpec::default()
        };
        let seeds = |s: &CampaignSpec| (0..3).map(|i| world_at(s, i).1).collect::<Vec<_>>();
        let (a, b) = (
            spec(Shard { index: 0, count: 2 }),
            spec(Shard { index: 1, count: 2 }),
        );
        assert_eq!(seeds(&a), vec![0, 2, 4]);
        assert_eq!(seeds(&b), vec![1, 3, 5]);
        let (ra, rb) = (run(&a), run(&b));
        assert_eq!(missing_shards(std::slice::from_ref(&ra)), vec![1]);
        let merged = merge(vec![ra.clone(), rb]).unwrap();
        assert_eq!(merged.seeds_run, 6);
        assert_eq!(merged.shard, Shard::default());
        assert!(merge(vec![ra.clone(), ra]).unwrap_err().contains("twice"));
    }
}
