//! The probe: the harness's browsers and oracle over real sockets, against
//! any running proxy (SillyTavern, LiteLLM, our own `serve`) pointed at the
//! mock upstream this process runs.
//!
//! # Brief overview
//! [`ProbeSpec`] in, [`ProbeReport`] out of [`run`]. The mock listens on
//! `upstream_listen`; tabs sign in as a browser does for the dialect, send
//! the scenario's generations (streaming and not) and refresh, many of them
//! just after the mock answered 429 (the backoff SillyTavern's detached
//! timer waits out). A watcher connects to the target every
//! [`WATCH_INTERVAL_MS`] to see it go down. The oracle then judges what is
//! visible from outside. Real sockets are not deterministic: a seed fixes
//! the schedule, not the timing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tracing_subscriber::layer::SubscriberExt;

use crate::events;
use crate::net::{Listener, ServeLimits, Stream, Transport, serve};
use crate::proxy::Dialect;
use crate::sim::browser::{TabSpec, run_tab};
use crate::sim::oracle::{self, Ending, Grace};
use crate::sim::scenario::Scenario;
use crate::sim::schedule::tab_plan;
use crate::sim::trace::{Event, Live, Recorder, TraceLayer, to_json_lines};
use crate::sim::world::derive_seed;
use crate::upstream::{self, MockUpstream};

/// Hard caps: the probe is polite whatever it is asked.
pub const REQUESTS_MAX: u64 = 10_000;
pub const CONCURRENCY_MAX: u32 = 64;
pub const TIME_MAX: Duration = Duration::from_secs(3_600);
/// How often the watcher checks that the target still accepts connections.
pub const WATCH_INTERVAL_MS: u64 = 250;
/// Events kept at the most.
const EVENTS_MAX: usize = 1_000_000;

/// The invariants visible from outside a proxy.
pub const OUTSIDE_INVARIANTS: &[&str] = &[
    "attempt-after-cancel",
    "proxy-crash",
    "cross-user-delivery",
    "retry-after-violated",
    "liveness",
    "leak",
];

/// How a tab authenticates.
#[derive(Clone, Debug)]
pub enum Credential {
    Bearer(String),
    User { handle: String, password: String },
}

/// What to probe, and how hard.
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    /// e.g. `http://127.0.0.1:8000`
    pub target: String,
    pub dialect: Dialect,
    pub credentials: Vec<Credential>,
    pub upstream_listen: SocketAddr,
    pub scenario: Arc<Scenario>,
    pub scenario_origin: String,
    pub requests: u64,
    pub time: Duration,
    pub seed: u64,
    pub concurrency: u32,
    pub target_pid: Option<u32>,
    /// A client that left this long ago must see no more upstream attempts.
    pub grace: Duration,
    /// After the last tab, watch this long for attempts that should not come.
    pub settle: Duration,
}

impl ProbeSpec {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=REQUESTS_MAX).contains(&self.requests) {
            return Err(format!("--requests must be within 1..={REQUESTS_MAX}"));
        }
        if !(1..=CONCURRENCY_MAX).contains(&self.concurrency) {
            return Err(format!(
                "--concurrency must be within 1..={CONCURRENCY_MAX}"
            ));
        }
        if self.time.is_zero() || self.time > TIME_MAX || self.settle > TIME_MAX {
            return Err("--time and --settle must be within 1s..=1h".into());
        }
        if self.credentials.is_empty() && self.dialect == Dialect::OpenAi {
            return Err(
                "the openai dialect needs --bearer TOKEN (the proxy's key for a client)".into(),
            );
        }
        target_host_port(&self.target).map(|_| ())
    }
}

/// One broken invariant, as `fuzz` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeFinding {
    pub invariant: String,
    pub message: String,
    /// Seconds since the probe started.
    pub at_seconds: f64,
}

/// What the probe ran.
#[derive(Clone, Debug, Serialize)]
pub struct Schedule {
    pub scenario: String,
    pub tabs: u32,
    pub generations_per_tab: u32,
    pub requests_max: u64,
    pub time_seconds: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub target: String,
    pub dialect: String,
    pub upstream: String,
    pub deterministic: bool,
    pub note: String,
    pub schedule: Schedule,
    pub requests_sent: u64,
    pub refreshes: u64,
    pub upstream_attempts: u64,
    pub target_went_down: bool,
    pub violations: Vec<ProbeFinding>,
    pub wall_seconds: f64,
    #[serde(skip)]
    pub events: Vec<Event>,
}

/// `host` and `port` of an `http://host:port` URL.
pub fn target_host_port(url: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = url.parse().map_err(|e| {
        format!("--target '{url}' is not a URL ({e}); give one like http://127.0.0.1:8000")
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "--target '{url}' must start with http:// (put a TLS proxy's plain port here)"
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("--target '{url}' has no host"))?;
    Ok((
        host.trim_matches(|c| c == '[' || c == ']').to_string(),
        uri.port_u16().unwrap_or(80),
    ))
}

/// Runs the probe to its end (bounded by `time` + request timeouts + `settle`).
pub fn run(spec: &ProbeSpec) -> anyhow::Result<ProbeReport> {
    spec.validate().map_err(anyhow::Error::msg)?;
    let recorder = Recorder::real_time(EVENTS_MAX);
    let subscriber = tracing_subscriber::registry().with(TraceLayer::new(recorder.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let outcome = tracing::subscriber::with_default(subscriber, || rt.block_on(drive(spec)))?;
    recorder.freeze();
    let events = recorder.take();
    Ok(judge(spec, outcome, events, started.elapsed()))
}

struct Outcome {
    upstream_url: String,
    went_down: bool,
    tabs_done_us: u64,
}

async fn drive(spec: &ProbeSpec) -> anyhow::Result<Outcome> {
    let notes = MockUpstream::notes_channel();
    let mock = MockUpstream::with_notes(
        spec.scenario.upstream.clone(),
        derive_seed(spec.seed, 1),
        notes.clone(),
    );
    let listener = Listener::bind(Transport::Tokio, spec.upstream_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the mock upstream; pick another --upstream-listen",
                spec.upstream_listen
            )
        })?;
    let upstream_url = format!("http://{}/v1", listener.local_addr()?);
    let mock_task = tokio::spawn(serve(listener, upstream::app(mock), ServeLimits::default()));
    let (host, port) = target_host_port(&spec.target).map_err(anyhow::Error::msg)?;
    let started = tokio::time::Instant::now();
    let watcher = tokio::spawn(watch(host.clone(), port, spec.target_pid));

    let tabs = spec.concurrency;
    let per_tab = spec.requests.div_ceil(u64::from(tabs)) as u32;
    let stop_at = started + spec.time;
    let mut handles = Vec::new();
    for t in 0..tabs {
        let which = t as usize % spec.credentials.len().max(1);
        let (user, password, bearer) = match spec.credentials.get(which) {
            Some(Credential::Bearer(b)) => {
                (format!("bearer-{which}"), String::new(), Some(b.clone()))
            }
            Some(Credential::User { handle, password }) => (handle.clone(), password.clone(), None),
            None => (String::new(), String::new(), None),
        };
        let tab = TabSpec {
            transport: Transport::Tokio,
            proxy_host: host.clone(),
            proxy_port: port,
            user,
            dialect: spec.dialect,
            password,
            bearer,
            tab: t,
            upstream_url: upstream_url.clone(),
            stop_at: Some(stop_at),
            notes: Some(notes.clone()),
            phases: None,
            holds: None,
        };
        let plan = tab_plan(
            &spec.scenario,
            derive_seed(spec.seed, 1_000 + u64::from(t)),
            t,
            per_tab,
        );
        let sc = Arc::clone(&spec.scenario);
        handles.push(tokio::spawn(async move {
            run_tab(tab, plan, sc, None)
                .await
                .map_err(|e| e.to_string())
        }));
    }
    // Tabs stop starting generations at `time`; one in flight may take its
    // request timeout more.
    let bound = spec.time
        + Duration::from_millis(spec.scenario.request_timeout_ms)
        + Duration::from_secs(5);
    let _ = tokio::time::timeout(bound, futures::future::join_all(handles)).await;
    let tabs_done_us = started.elapsed().as_micros() as u64;
    tokio::time::sleep(spec.settle).await;
    let went_down = watcher.is_finished();
    watcher.abort();
    mock_task.abort();
    Ok(Outcome {
        upstream_url,
        went_down,
        tabs_done_us,
    })
}

/// Resolves when the target stops accepting connections (after it once
/// did), or its process is gone.
async fn watch(host: String, port: u16, pid: Option<u32>) {
    let mut seen_up = false;
    loop {
        tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS)).await;
        if let Some(pid) = pid.filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            events::world_proxy_crash(&format!("the target's process {pid} is gone"));
            return;
        }
        let up = tokio::time::timeout(
            Duration::from_secs(2),
            Stream::connect(Transport::Tokio, &host, port),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if up {
            seen_up = true;
        } else if seen_up {
            events::world_proxy_crash(&format!(
                "the target {host}:{port} stopped accepting connections"
            ));
            return;
        }
    }
}

fn judge(spec: &ProbeSpec, outcome: Outcome, events: Vec<Event>, wall: Duration) -> ProbeReport {
    let grace_us = spec.grace.as_micros() as u64;
    let grace = Grace {
        network_us: grace_us,
        client_gone_us: grace_us,
    };
    let ending = Ending {
        crashed: outcome.went_down,
        live: Live::default(),
        quiescent: true,
        cut_short: false,
        outside: true,
    };
    let mut violations: Vec<ProbeFinding> = oracle::check(&events, &ending, &grace)
        .into_iter()
        .filter(|v| OUTSIDE_INVARIANTS.contains(&v.invariant))
        .map(|v| ProbeFinding {
            invariant: v.invariant.into(),
            message: v.message,
            at_seconds: v.t_us as f64 / 1e6,
        })
        .collect();
    if !outcome.went_down
        && let Some(late) = late_attempts(&events, outcome.tabs_done_us + grace_us)
    {
        violations.push(late);
    }
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count() as u64;
    ProbeReport {
        target: spec.target.clone(),
        dialect: match spec.dialect {
            Dialect::OpenAi => "openai".into(),
            Dialect::SillyTavern => "sillytavern".into(),
        },
        upstream: outcome.upstream_url,
        deterministic: false,
        note: "real sockets: the seed fixes the schedule, not the timing; a rerun may differ"
            .into(),
        schedule: Schedule {
            scenario: spec.scenario_origin.clone(),
            tabs: spec.concurrency,
            generations_per_tab: spec.requests.div_ceil(u64::from(spec.concurrency)) as u32,
            requests_max: spec.requests,
            time_seconds: spec.time.as_secs_f64(),
            seed: spec.seed,
        },
        requests_sent: count("tab.send"),
        refreshes: count("tab.abandon"),
        upstream_attempts: count("upstream.attempt"),
        target_went_down: outcome.went_down,
        violations,
        wall_seconds: wall.as_secs_f64(),
        events,
    }
}

/// `leak`: attempts reaching the mock after every tab was done (and the
/// grace passed): nobody is waiting for them.
fn late_attempts(events: &[Event], after_us: u64) -> Option<ProbeFinding> {
    let late: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "upstream.attempt" && e.t_us > after_us)
        .collect();
    let first = late.first()?;
    Some(ProbeFinding {
        invariant: "leak".into(),
        message: format!(
            "{} upstream attempts arrived after every tab was done (the first, attempt {} of generation {}, at {:.3}s)",
            late.len(),
            first.u64("attempt"),
            first.str("fp"),
            first.t_us as f64 / 1e6
        ),
        at_seconds: first.t_us as f64 / 1e6,
    })
}

/// Writes the report and the trace under `dir`.
pub fn write_artifacts(report: &ProbeReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )
    .with_context(|| format!("cannot write {}", dir.join("report.json").display()))?;
    std::fs::write(dir.join("trace.jsonl"), to_json_lines(&report.events))
        .with_context(|| format!("cannot write {}", dir.join("trace.jsonl").display()))?;
    Ok(())
}

/// Parses `90`, `90s`, `2m`, `500ms`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; write 90s, 2m, 500ms or 1h"))?;
    let ms = match unit {
        "" | "s" => n.checked_mul(1_000),
        "ms" => Some(n),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("'{text}' is not a duration; write 90s, 2m, 500ms or 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_say_how() {
        for (text, ms) in [
            ("90", 90_000),
            ("90s", 90_000),
            ("2m", 120_000),
            ("500ms", 500),
            ("1h", 3_600_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in ["", "s", "1.5s", "10x", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).unwrap_err().contains("90s"), "{bad}");
        }
    }

    #[test]
    fn targets_must_be_plain_http_urls() {
        assert_eq!(
            target_host_port("http://127.0.0.1:8000"),
            Ok(("127.0.0.1".into(), 8000))
        );
        assert!(target_host_port("https://x").is_err());
        assert!(target_host_port("not a url").is_err());
    }
}
