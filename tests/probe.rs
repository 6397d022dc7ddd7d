//! The probe on loopback against `tavernsim serve` (the built binary): it
//! finds nothing wrong with the fixed proxy over a few hundred requests with
//! refreshes, and sees the SillyTavern 1.12.7 variant die.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tavernsim::probe::{Credential, ProbeReport, ProbeSpec, run};
use tavernsim::proxy::Dialect;
use tavernsim::sim::scenario::Scenario;

const FAST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/probe-fast.toml");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `tavernsim serve --demo` child, killed when dropped.
struct Served {
    child: Child,
    port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(variant: &str, upstream_port: u16) -> Served {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tavernsim"))
        .args(["serve", "--demo", "--variant", variant])
        .args([
            "--upstream",
            &format!("http://127.0.0.1:{upstream_port}/v1"),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tavernsim serve starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "tavernsim serve never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Served { child, port }
}

fn probe(served: &Served, upstream_port: u16, requests: u64, time_s: u64) -> ProbeReport {
    let spec = ProbeSpec {
        target: format!("http://127.0.0.1:{}", served.port),
        dialect: Dialect::OpenAi,
        credentials: vec![Credential::Bearer("demo-token".into())],
        upstream_listen: format!("127.0.0.1:{upstream_port}").parse().unwrap(),
        scenario: Arc::new(Scenario::load(FAST).unwrap()),
        scenario_origin: FAST.into(),
        requests,
        time: Duration::from_secs(time_s),
        seed: 7,
        concurrency: 16,
        target_pid: Some(served.child.id()),
        grace: Duration::from_secs(1),
        settle: Duration::from_secs(2),
    };
    run(&spec).expect("the probe runs")
}

#[test]
fn the_fixed_proxy_survives_a_probe_with_refreshes() {
    let up = free_port();
    let served = serve("fixed", up);
    let report = probe(&served, up, 300, 60);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(
        report.requests_sent >= 200,
        "only {} requests were sent",
        report.requests_sent
    );
    assert!(
        report.refreshes >= 20,
        "only {} refreshes",
        report.refreshes
    );
    assert!(
        report.upstream_attempts > report.requests_sent,
        "no retries were exercised"
    );
    assert!(!report.target_went_down);
}

#[test]
fn the_sillytavern_1_12_7_crash_is_seen_from_outside() {
    let up = free_port();
    let served = serve("sillytavern-1.12.7", up);
    let report = probe(&served, up, 300, 40);
    let crash = report
        .violations
        .iter()
        .find(|v| v.invariant == "proxy-crash");
    assert!(crash.is_some(), "no crash seen: {:#?}", report.violations);
    assert!(report.target_went_down);
}

#[test]
fn a_proxy_that_retries_after_its_client_left_is_seen_from_outside() {
    let up = free_port();
    let served = serve("mutant-retry-outlives-client", up);
    let report = probe(&served, up, 200, 30);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.invariant == "attempt-after-cancel"),
        "no late attempt seen: {:#?}",
        report.violations
    );
    assert!(!report.target_went_down);
}
