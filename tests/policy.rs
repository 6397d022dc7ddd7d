//! The retry policy under many users, in the simulation: the shared gate,
//! Retry-After, the retry budget and fairness each hold for the fixed
//! proxy, and each test also shows that turning the mechanism off breaks
//! what it protects, so none can pass vacuously.

use std::sync::Arc;

use tavernsim::proxy::Variant;
use tavernsim::sim::scenario::Scenario;
use tavernsim::sim::trace::Event;
use tavernsim::sim::world::{WorldRun, WorldSpec, run_world};

fn scenario(name: &str) -> Scenario {
    Scenario::load(name).expect("embedded scenario loads")
}

fn run(sc: &Scenario, seed: u64, variant: Variant) -> WorldRun {
    run_world(&WorldSpec::new(seed, Arc::new(sc.clone()), variant))
}

/// The invariants broken over `seeds`, each with the first seed that broke it.
fn broken(sc: &Scenario, seeds: std::ops::Range<u64>, variant: Variant) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for seed in seeds {
        for v in run(sc, seed, variant).violations {
            if !out.iter().any(|(i, _)| i == v.invariant) {
                out.push((v.invariant.to_string(), seed));
            }
        }
    }
    out
}

fn has(found: &[(String, u64)], invariant: &str) -> bool {
    found.iter().any(|(i, _)| i == invariant)
}

#[test]
fn gate_holds_every_user_back_after_a_hinted_429() {
    let sc = scenario("burst-429");
    let found = broken(&sc, 0..40, Variant::Fixed);
    assert!(found.is_empty(), "fixed proxy broke {found:?}");

    let mut no_gate = sc.clone();
    no_gate.gate.enabled = false;
    let found = broken(&no_gate, 0..40, Variant::Fixed);
    assert!(
        has(&found, "gate-violated"),
        "without the gate nothing was caught: {found:?}"
    );
    assert!(
        !has(&found, "retry-after-violated"),
        "each request still honours its own hint: {found:?}"
    );
}

#[test]
fn retry_after_is_honoured_and_its_violation_is_seen() {
    // Hints up to 20 s: the SillyTavern variants wait 5 s whatever the hint.
    let mut sc = scenario("burst-429");
    sc.upstream.retry_after_s_max = 20;
    sc.retry.wait_ms_max = 30_000;
    sc.users = 3;
    let found = broken(&sc, 0..20, Variant::Fixed);
    assert!(!has(&found, "retry-after-violated"), "{found:?}");
    let found = broken(&sc, 0..20, Variant::SillyTavern1126);
    assert!(
        has(&found, "retry-after-violated"),
        "a proxy ignoring Retry-After went unseen: {found:?}"
    );
}

/// (first attempts, retries) that reached the upstream.
fn attempts(events: &[Event]) -> (u64, u64) {
    events
        .iter()
        .filter(|e| e.kind == "upstream.attempt")
        .fold((0, 0), |(first, retries), e| {
            if e.u64("attempt") == 1 {
                (first + 1, retries)
            } else {
                (first, retries + 1)
            }
        })
}

#[test]
fn retry_budget_bounds_retries_against_a_failing_upstream() {
    // Every attempt fails with no hint; the policy alone would retry each
    // request attempts_max - 1 times.
    let mut sc = scenario("burst-429");
    sc.upstream.p_429 = 1.0;
    sc.upstream.p_retry_after = 0.0;
    sc.retry.attempts_max = 6;
    sc.p_refresh = 0.0;
    sc.budget.retry_ratio = 0.2;
    sc.budget.retries_per_window_min = 2;
    sc.budget.window_ms = 10_000;
    let share = |sc: &Scenario| {
        let (mut first, mut retries, mut sim_ms) = (0, 0, 0);
        for seed in 0..10 {
            let r = run(sc, seed, Variant::Fixed);
            let (f, x) = attempts(&r.events);
            first += f;
            retries += x;
            sim_ms += r.sim_ms;
        }
        (first, retries, sim_ms)
    };
    let (first, retries, sim_ms) = share(&sc);
    let windows = sim_ms / sc.budget.window_ms + 10;
    let allowed = (first as f64 * sc.budget.retry_ratio) as u64
        + windows * u64::from(sc.budget.retries_per_window_min);
    eprintln!("with the budget: {retries} retries for {first} requests (allowed {allowed})");
    assert!(
        retries <= allowed,
        "{retries} retries for {first} requests, budget allows {allowed}"
    );

    let mut unlimited = sc.clone();
    unlimited.budget.enabled = false;
    let (first, retries, _) = share(&unlimited);
    eprintln!("without the budget: {retries} retries for {first} requests");
    assert!(
        retries > allowed,
        "without the budget retries stayed low ({retries} for {first} requests): the check above proves nothing"
    );
}

/// Mean simulated time from send to answer for the users who do not flood.
fn light_users_wait_ms(sc: &Scenario) -> f64 {
    let (mut total_us, mut n) = (0u64, 0u64);
    for seed in 0..12 {
        let r = run(sc, seed, Variant::Fixed);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        let mut sent = std::collections::BTreeMap::new();
        for e in &r.events {
            if e.str("user") == "user-0" {
                continue;
            }
            match e.kind.as_str() {
                "tab.send" => {
                    sent.insert(e.str("fp").to_string(), e.t_us);
                }
                "tab.recv" => {
                    if let Some(t0) = sent.remove(e.str("fp")) {
                        total_us += e.t_us - t0;
                        n += 1;
                    }
                }
                _ => {}
            }
        }
    }
    assert!(n > 20, "too few answers to compare: {n}");
    total_us as f64 / n as f64 / 1000.0
}

#[test]
fn one_user_flooding_does_not_starve_the_others() {
    let fair = scenario("one-user-floods");
    let mut unfair = fair.clone();
    unfair.fairness.round_robin = false;
    unfair.fairness.user_requests_max = 1_000;
    let (fair_ms, unfair_ms) = (light_users_wait_ms(&fair), light_users_wait_ms(&unfair));
    eprintln!("other users' mean wait: {fair_ms:.0} ms with fairness, {unfair_ms:.0} ms without");
    assert!(
        unfair_ms > fair_ms * 1.5,
        "the other users waited {fair_ms:.0} ms with fairness and {unfair_ms:.0} ms without: fairness made no difference"
    );
}
