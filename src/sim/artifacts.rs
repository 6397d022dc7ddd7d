//! What a campaign leaves behind for a developer: for each distinct
//! violation, its schedule shrunk to the fewest actions that still break the
//! same invariant, saved as JSON beside the trace of its run, and the command
//! that replays it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::campaign::{CampaignSpec, Finding, Report};
use super::schedule::{self, FORMAT, SavedSchedule, Schedule, ShrinkBudget, Shrunk};
use super::trace::to_json_lines;
use super::world::{WorldRun, WorldSpec, run_world};

/// How findings are shrunk and where they are saved.
#[derive(Clone, Debug)]
pub struct ArtifactOptions {
    pub out: PathBuf,
    /// Shrink each finding's schedule (else save the seed's as it is).
    pub shrink: bool,
    pub budget: ShrinkBudget,
}

/// The command that replays a saved schedule.
pub fn replay_schedule_command(path: &Path) -> String {
    format!("tavernsim replay --schedule {}", path.display())
}

/// Runs `schedule` for `finding`'s seed and scenario.
pub fn run_schedule(spec: &CampaignSpec, finding: &Finding, schedule: Schedule) -> WorldRun {
    let named = scenario_of(spec, finding);
    let mut world = WorldSpec::new(finding.seed, Arc::clone(&named), spec.variant);
    world.schedule = Some(Arc::new(schedule));
    run_world(&world)
}

fn scenario_of(spec: &CampaignSpec, finding: &Finding) -> Arc<super::scenario::Scenario> {
    spec.scenarios
        .iter()
        .find(|s| s.origin == finding.origin)
        .or_else(|| {
            spec.scenarios
                .iter()
                .find(|s| s.scenario.name == finding.scenario)
        })
        .map(|s| Arc::clone(&s.scenario))
        .unwrap_or_default()
}

/// Shrinks (unless told not to) and saves every finding of `report`,
/// rewriting each one's replay command to run its saved schedule.
/// `progress` hears what is going on, for a terminal.
pub fn save_findings(
    spec: &CampaignSpec,
    report: &mut Report,
    opts: &ArtifactOptions,
    progress: &mut dyn FnMut(&str),
) -> std::io::Result<()> {
    if report.violations.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(&opts.out)?;
    for finding in &mut report.violations {
        let sc = scenario_of(spec, finding);
        let shrinkable = opts.shrink && finding.invariant != "nondeterminism";
        let Shrunk {
            mut schedule,
            runs,
            budget_hit,
            actions_before,
        } = if shrinkable {
            let invariant = finding.invariant.clone();
            let label = format!("{} seed {} {}", finding.scenario, finding.seed, invariant);
            schedule::shrink(
                finding.seed,
                &sc,
                opts.budget,
                &mut |candidate| {
                    run_schedule(spec, finding, candidate.clone())
                        .violations
                        .iter()
                        .any(|v| v.invariant == invariant)
                },
                &mut |runs, actions| {
                    progress(&format!(
                        "shrinking {label}: {actions} actions after {runs} runs"
                    ))
                },
            )
        } else {
            let s = Schedule::generate(finding.seed, &sc);
            Shrunk {
                actions_before: s.actions(),
                schedule: s,
                runs: 0,
                budget_hit: false,
            }
        };
        let untidy = schedule.clone();
        schedule.tidy(sc.upstream.delay_ms_min);
        let mut run = run_schedule(spec, finding, schedule.clone());
        let breaks = |run: &WorldRun| {
            run.violations
                .iter()
                .any(|v| v.invariant == finding.invariant)
        };
        if !breaks(&run) {
            // Tidying changed the world (it should not): keep it as it was.
            schedule = untidy;
            run = run_schedule(spec, finding, schedule.clone());
        }
        let broke = run
            .violations
            .iter()
            .find(|v| v.invariant == finding.invariant);
        if broke.is_none() {
            progress(&format!(
                "warning: {} seed {} {}: the saved schedule does not break it again (nondeterminism?)",
                finding.scenario, finding.seed, finding.invariant
            ));
        }
        let stem = format!(
            "{}-seed{}-{}",
            sanitize(&finding.origin),
            finding.seed,
            finding.invariant
        );
        let saved = SavedSchedule {
            format: FORMAT,
            seed: finding.seed,
            variant: spec.variant.to_string(),
            invariant: finding.invariant.clone(),
            message: broke
                .map(|v| v.message.clone())
                .unwrap_or_else(|| finding.message.clone()),
            trace_hash: run.trace_hash.clone(),
            tavernsim: env!("CARGO_PKG_VERSION").into(),
            commit: schedule::build_commit().into(),
            scenario_origin: finding.origin.clone(),
            scenario: (*sc).clone(),
            schedule,
        };
        let path = opts.out.join(format!("{stem}.schedule.json"));
        std::fs::write(&path, saved.to_json())?;
        std::fs::write(
            opts.out.join(format!("{stem}.trace.jsonl")),
            to_json_lines(&run.events),
        )?;
        finding.actions = Some((actions_before, saved.schedule.actions()));
        // What the saved schedule shows when replayed.
        finding.message = saved.message.clone();
        finding.trace_hash = saved.trace_hash.clone();
        finding.replay = replay_schedule_command(&path);
        finding.schedule_file = Some(path.display().to_string());
        if shrinkable {
            progress(&format!(
                "shrunk {} seed {} {}: {} actions to {} in {runs} runs{}",
                finding.scenario,
                finding.seed,
                finding.invariant,
                actions_before,
                saved.schedule.actions(),
                if budget_hit {
                    " (budget spent: maybe not minimal)"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(())
}

/// A file-name-safe form of a scenario name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
