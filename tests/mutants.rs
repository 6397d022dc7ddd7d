//! Every mutant is killed, by the invariant it was written to break, within
//! a stated seed budget on the scenario aimed at it; the fixed proxy stays
//! clean on those scenarios; every invariant the oracle checks has a mutant.
//! See: issue 6, and `tavernsim mutants` for the full table.

use std::sync::Arc;

use tavernsim::proxy::{Mutant, Variant};
use tavernsim::sim::campaign::{self, CampaignSpec, NamedScenario};
use tavernsim::sim::mutants::{Budget, kill, plan, plan_scenarios};
use tavernsim::sim::oracle::INVARIANTS;
use tavernsim::sim::scenario::Scenario;
use tavernsim::sim::world::{WorldSpec, run_world};

fn jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[test]
fn every_mutant_is_killed_by_its_target_within_its_seed_budget() {
    let mut survivors = Vec::new();
    for m in Mutant::ALL {
        let p = plan(m);
        let budget = Budget {
            seeds: p.test_seeds_max,
            time: None,
            jobs: jobs(),
        };
        let k = kill(m, &budget);
        eprintln!(
            "{}: {} after {} seeds of {}",
            k.name,
            if k.killed { "killed" } else { "SURVIVED" },
            k.seeds_run,
            k.scenario
        );
        if !k.killed {
            survivors.push(format!(
                "{} survived seeds 0..{} of {}: its target {} never fired{} (replay: tavernsim replay --seed 0 --scenario {} --variant {})",
                k.name,
                k.seeds_run,
                k.scenario,
                k.target,
                if k.also.is_empty() {
                    String::new()
                } else {
                    format!(", though {} did", k.also.join(", "))
                },
                k.scenario,
                k.name
            ));
        }
    }
    assert!(survivors.is_empty(), "{}", survivors.join("\n"));
}

#[test]
fn every_invariant_the_oracle_checks_has_a_mutant() {
    for invariant in INVARIANTS {
        assert!(
            Mutant::ALL.iter().any(|m| m.target() == *invariant),
            "no mutant breaks {invariant}: its check could pass vacuously"
        );
    }
    for m in Mutant::ALL {
        assert!(
            INVARIANTS.contains(&m.target()),
            "{m:?} targets an unknown invariant"
        );
    }
}

#[test]
fn mutant_names_are_kebab_case_unique_and_parse_back() {
    let mut names: Vec<&str> = Mutant::ALL.iter().map(|m| m.name()).collect();
    for name in &names {
        assert!(name.starts_with("mutant-"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name} is not kebab-case"
        );
        assert_eq!(
            name.parse::<Variant>()
                .ok()
                .and_then(Variant::mutant)
                .map(|m| m.name()),
            Some(*name)
        );
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Mutant::ALL.len());
    assert!(
        !Variant::ALL.iter().any(|v| v.mutant().is_some()),
        "a mutant is never a plain variant"
    );
    assert_eq!(Variant::default(), Variant::Fixed);
}

/// Seeds of each planned scenario the fixed proxy must be clean on here
/// (`tavernsim mutants` runs more).
const FIXED_SEEDS: u64 = 30;

#[test]
fn fixed_proxy_is_clean_on_every_planned_scenario() {
    let scenarios: Vec<NamedScenario> = plan_scenarios()
        .into_iter()
        .map(|name| NamedScenario {
            origin: name.to_string(),
            scenario: Arc::new(Scenario::load(name).expect("planned scenario loads")),
        })
        .collect();
    let report = campaign::run(&CampaignSpec {
        scenarios,
        variant: Variant::Fixed,
        seed_start: 0,
        seeds: FIXED_SEEDS,
        jobs: jobs(),
        stop_on_first: false,
        progress: false,
        ..CampaignSpec::default()
    });
    assert!(
        report.harness_errors.is_empty(),
        "{:?}",
        report.harness_errors
    );
    assert!(
        report.violations.is_empty(),
        "the fixed proxy broke invariants on a planned scenario:\n{}",
        report
            .violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_mutant_world_replays_to_the_same_trace_hash() {
    for m in [Mutant::SlotReuseNoGeneration, Mutant::CancelMissedBeforeArm] {
        let spec = WorldSpec::new(
            1,
            Arc::new(Scenario::load(plan(m).scenario).unwrap()),
            Variant::Mutant(m),
        );
        let (a, b) = (run_world(&spec), run_world(&spec));
        assert_eq!(
            a.trace_hash,
            b.trace_hash,
            "{} is not deterministic",
            m.name()
        );
    }
}
