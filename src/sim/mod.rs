//! The harness: scenarios, simulated worlds, browsers, the trace and the
//! oracle, and campaigns over many seeds.
//!
//! # Brief overview
//! - [`scenario::Scenario`]: a workload, loaded from `sims/*.toml`.
//! - [`world::run_world`]: one seed, one turmoil world, one verdict.
//! - [`schedule`]: seed + scenario -> an explicit, shrinkable schedule.
//! - [`browser`]: the tab actor that follows its part of the schedule.
//! - [`trace`]: the tracing layer that records a world's events.
//! - [`oracle`]: the invariants, judged from the events alone.
//! - [`campaign`]: many seeds over all cores, with progress and a report.
//! - [`artifacts`]: each finding shrunk, saved as a schedule with its trace.
//! - [`mutants`]: the kill table, every mutant against the scenario aimed at it.
//! - [`measure`]: counts over every event of the faithful SillyTavern variants.

pub mod artifacts;
pub mod browser;
pub mod campaign;
pub mod coverage;
pub mod measure;
pub mod mutants;
pub mod oracle;
pub mod scenario;
pub mod schedule;
pub mod trace;
pub mod world;
