//! `tavernsim bench sim` through the built binary: one JSON object with
//! the three headline figures. No timing is asserted (machines are noisy).

use std::process::Command;

#[test]
fn bench_sim_json_has_the_three_figures_finite_and_positive() {
    let out = Command::new(env!("CARGO_BIN_EXE_tavernsim"))
        .args(["bench", "sim", "--seeds", "1", "--format", "json"])
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("exactly one JSON object");
    for key in [
        "seeds_per_second_per_core",
        "time_compression",
        "harness_over_bare",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing or not a number in {stdout}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert_eq!(report["seeds"], 4, "one seed of each default scenario");
    assert_eq!(report["violating_worlds"], 0);
}
