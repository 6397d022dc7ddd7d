//! Every saved schedule under `fixtures/regressions/` replays: against the
//! variant it was saved from it breaks the same invariant again (the
//! harness still sees the defect), and against the fixed proxy it runs
//! clean (the fix still holds).

use std::path::Path;
use std::sync::Arc;

use tavernsim::proxy::Variant;
use tavernsim::sim::schedule::SavedSchedule;
use tavernsim::sim::world::{WorldSpec, run_world};

fn replay(saved: &SavedSchedule, variant: Variant) -> Vec<&'static str> {
    let mut world = WorldSpec::new(saved.seed, saved.scenario(), variant);
    world.schedule = Some(Arc::new(saved.schedule.clone()));
    let run = run_world(&world);
    run.violations.iter().map(|v| v.invariant).collect()
}

#[test]
fn every_saved_regression_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/regressions");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures/regressions exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected the saved regressions, found {files:?}"
    );
    let mut failures = Vec::new();
    for path in &files {
        let saved = SavedSchedule::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            saved.schedule.actions() <= 10,
            "{}: a regression schedule is meant to be shrunk ({} actions)",
            path.display(),
            saved.schedule.actions()
        );
        let variant: Variant = saved.variant.parse().expect("a known variant");
        let broke = replay(&saved, variant);
        if !broke.contains(&saved.invariant.as_str()) {
            failures.push(format!(
                "{}: against {variant} it no longer breaks {} (broke: {broke:?})",
                path.display(),
                saved.invariant
            ));
        }
        if variant != Variant::Fixed {
            let fixed = replay(&saved, Variant::Fixed);
            if !fixed.is_empty() {
                failures.push(format!(
                    "{}: the fixed proxy breaks {fixed:?} on it",
                    path.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
