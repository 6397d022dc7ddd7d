//! `tavernsim bench proxy`: what the proxy costs, on loopback, in one run.
//!
//! # Brief overview
//! - One mock upstream (no delay, no 429s) and the fixed proxy in front of
//!   it, in this process, on loopback ports.
//! - Throughput: `concurrency` keep-alive connections send small
//!   non-streaming completions, first straight to the mock, then through
//!   the proxy; requests per second and p50/p99 latency for each.
//! - Latency: the same, one connection at a time (no queueing), so the
//!   difference at p50 is what the proxy adds to one request.
//! - Memory: `parked` requests held in a second mock that never answers,
//!   first straight to it, then (with those still parked) through the
//!   proxy; the RSS growth of each, per request, and the difference: the
//!   proxy's own share of one in-flight request.
//!
//! Every phase is bounded in requests and in time.
//!
//! `tavernsim bench sim` (what a seed of the harness costs against a bare
//! turmoil world) lives in [`sim`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::time::Instant;

use crate::net::{Listener, ServeLimits, Stream, Transport, serve};
use crate::proxy::users::{User, UserStore, token_digest};
use crate::proxy::{ExitHook, ProxyConfig};
use crate::serve::{Running, ServeConfig, StartOptions, start};
use crate::upstream::{self, MockUpstream, UpstreamScript};

pub mod sim;

/// Most parked requests (each holds up to 6 descriptors in this process).
pub const PARKED_MAX: usize = 3_000;
const TOKEN: &str = "bench-token-0123456789abcdef0123456789";
const BODY: &str =
    r#"{"model":"mock-1","messages":[{"role":"user","content":"a small bench prompt"}]}"#;

/// What to run; every phase stops at its count or its time, first reached.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSpec {
    /// Requests per throughput phase.
    pub requests: u64,
    /// Connections sending at once in the throughput phases.
    pub concurrency: usize,
    /// Requests per latency phase (one connection).
    pub latency_requests: u64,
    /// Time bound of each phase.
    pub phase_ms_max: u64,
    /// Requests held in flight for the memory measurement (0: skip it).
    pub parked: usize,
}

impl Default for BenchSpec {
    fn default() -> Self {
        Self {
            requests: 100_000,
            concurrency: 16,
            latency_requests: 5_000,
            phase_ms_max: 10_000,
            parked: 1_000,
        }
    }
}

/// One phase's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Memory per in-flight request, from RSS growth.
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub parked: usize,
    /// Client and mock upstream, per request.
    pub direct_bytes_per_request: i64,
    /// Client, proxy and mock upstream, per request.
    pub proxy_path_bytes_per_request: i64,
    /// The difference: what the proxy itself holds per in-flight request.
    pub proxy_bytes_per_request: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub spec: BenchSpec,
    pub direct: Phase,
    pub proxy: Phase,
    pub direct_latency: Phase,
    pub proxy_latency: Phase,
    /// Proxy throughput over direct throughput (target: at least 0.7).
    pub throughput_ratio: f64,
    /// What the proxy adds at p50, one request at a time (target: under 0.3).
    pub added_p50_ms: f64,
    pub memory: Option<Memory>,
}

impl BenchSpec {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=10_000_000).contains(&self.requests) {
            return Err("--requests must be within 1..=10000000".into());
        }
        if !(1..=1_000).contains(&self.concurrency) {
            return Err("--concurrency must be within 1..=1000".into());
        }
        if !(1..=1_000_000).contains(&self.latency_requests) {
            return Err("--latency-requests must be within 1..=1000000".into());
        }
        if !(100..=600_000).contains(&self.phase_ms_max) {
            return Err("--phase-ms-max must be within 100..=600000".into());
        }
        if self.parked > PARKED_MAX {
            return Err(format!("--parked must be at most {PARKED_MAX}"));
        }
        Ok(())
    }
}

/// Runs every phase. Call inside a multi-threaded tokio runtime.
pub async fn run(spec: BenchSpec) -> anyhow::Result<BenchReport> {
    spec.validate().map_err(anyhow::Error::msg)?;
    let fast = UpstreamScript {
        p_429: 0.0,
        p_5xx: 0.0,
        delay_ms_min: 0,
        delay_ms_max: 0,
        ..UpstreamScript::default()
    };
    let (mock_addr, _mock) = start_mock(fast).await?;
    let proxy = start_proxy(mock_addr).await?;
    let deadline = Duration::from_millis(spec.phase_ms_max);
    let auth = Some(format!("Bearer {TOKEN}"));
    // Warm both paths (connection pools, allocator) before measuring.
    load(mock_addr, None, 200, 4, deadline).await?;
    load(proxy.addr, auth.clone(), 200, 4, deadline).await?;
    let direct = load(mock_addr, None, spec.requests, spec.concurrency, deadline).await?;
    let via = load(
        proxy.addr,
        auth.clone(),
        spec.requests,
        spec.concurrency,
        deadline,
    )
    .await?;
    let direct_latency = load(mock_addr, None, spec.latency_requests, 1, deadline).await?;
    let proxy_latency = load(proxy.addr, auth, spec.latency_requests, 1, deadline).await?;
    let memory = if spec.parked > 0 {
        Some(memory(spec.parked, deadline).await?)
    } else {
        None
    };
    Ok(BenchReport {
        throughput_ratio: via.requests_per_s / direct.requests_per_s.max(f64::MIN_POSITIVE),
        added_p50_ms: proxy_latency.p50_ms - direct_latency.p50_ms,
        spec,
        direct,
        proxy: via,
        direct_latency,
        proxy_latency,
        memory,
    })
}

async fn start_mock(
    script: UpstreamScript,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = Listener::bind(Transport::Tokio, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .context("cannot bind a loopback port for the bench's mock upstream")?;
    let addr = listener.local_addr()?;
    let app = upstream::app(MockUpstream::new(script, 1));
    Ok((
        addr,
        tokio::spawn(serve(listener, app, ServeLimits::default())),
    ))
}

async fn start_proxy(upstream: SocketAddr) -> anyhow::Result<Running> {
    let mut user = User::new("bench");
    user.token_sha256 = Some(token_digest(TOKEN));
    let mut users = UserStore::new();
    users.create(user)?;
    let cfg = ServeConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        proxy: ProxyConfig {
            upstream_url: format!("http://{upstream}/v1"),
            requests_max: 2 * PARKED_MAX + 1_000,
            upstream_idle_per_host_max: 1_024,
            ..ProxyConfig::default()
        },
        ..ServeConfig::default()
    };
    start(
        cfg,
        StartOptions {
            users,
            users_file: None,
            exit: ExitHook::from_fn(|_| {}),
        },
    )
    .await
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = Stream::connect(Transport::Tokio, &addr.ip().to_string(), addr.port())
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(addr: SocketAddr, auth: Option<&str>) -> hyper::Request<Full<Bytes>> {
    let mut req = hyper::Request::post("/v1/chat/completions")
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(a) = auth {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    req.body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap_or_default()
}

/// `requests` completions over `concurrency` keep-alive connections.
async fn load(
    addr: SocketAddr,
    auth: Option<String>,
    requests: u64,
    concurrency: usize,
    time_max: Duration,
) -> anyhow::Result<Phase> {
    let left = Arc::new(std::sync::atomic::AtomicU64::new(requests));
    let start = Instant::now();
    let stop = start + time_max;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut sender = connect(addr).await?;
        let (left, auth) = (Arc::clone(&left), auth.clone());
        workers.push(tokio::spawn(async move {
            let (mut lat_us, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < stop && take_one(&left) {
                let t = Instant::now();
                let ok = match sender.send_request(request(addr, auth.as_deref())).await {
                    Ok(resp) => {
                        let good = resp.status().is_success();
                        resp.into_body().collect().await.is_ok() && good
                    }
                    Err(_) => false,
                };
                if ok {
                    lat_us.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    match connect(addr).await {
                        Ok(s) => sender = s,
                        Err(_) => break,
                    }
                }
            }
            (lat_us, errors)
        }));
    }
    let (mut lat_us, mut errors) = (Vec::new(), 0);
    for w in workers {
        let (l, e) = w.await.context("a load worker failed")?;
        lat_us.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    let pct = |p: usize| {
        lat_us
            .get((lat_us.len() * p / 100).min(lat_us.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    Ok(Phase {
        requests: lat_us.len() as u64,
        errors,
        seconds,
        requests_per_s: lat_us.len() as f64 / seconds.max(f64::MIN_POSITIVE),
        p50_ms: pct(50),
        p99_ms: pct(99),
    })
}

fn take_one(left: &std::sync::atomic::AtomicU64) -> bool {
    use std::sync::atomic::Ordering;
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Parks `n` requests straight at a mock that never answers in time, then
/// `n` more through a proxy in front of it, measuring RSS growth for each.
async fn memory(n: usize, time_max: Duration) -> anyhow::Result<Memory> {
    let slow = UpstreamScript {
        p_429: 0.0,
        p_5xx: 0.0,
        delay_ms_min: 600_000,
        delay_ms_max: 600_000,
        ..UpstreamScript::default()
    };
    let (mock_addr, _mock) = start_mock(slow).await?;
    let proxy = start_proxy(mock_addr).await?;
    let before = rss_bytes()?;
    let direct = park(mock_addr, None, n).await?;
    settle(time_max, || Ok(true)).await?;
    let mid = rss_bytes()?;
    let auth = format!("Bearer {TOKEN}");
    let via = park(proxy.addr, Some(&auth), n).await?;
    // Parked through the proxy: every request has its upstream attempt out.
    settle(time_max, || {
        Ok(proxy
            .state
            .table
            .phase_counts()
            .iter()
            .any(|(p, c)| *p == "sending" && *c == n))
    })
    .await?;
    let after = rss_bytes()?;
    for parked in direct.iter().chain(&via) {
        parked.abort();
    }
    let per = |bytes: i64| bytes / n as i64;
    let (d, p) = (per(mid - before), per(after - mid));
    Ok(Memory {
        parked: n,
        direct_bytes_per_request: d,
        proxy_path_bytes_per_request: p,
        proxy_bytes_per_request: p - d,
    })
}

/// Sends one request on each of `n` fresh connections and keeps them.
async fn park(
    addr: SocketAddr,
    auth: Option<&str>,
    n: usize,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut parked = Vec::with_capacity(n);
    for _ in 0..n {
        let mut sender = connect(addr).await?;
        let req = request(addr, auth);
        parked.push(tokio::spawn(async move {
            let _ = sender.send_request(req).await;
        }));
    }
    Ok(parked)
}

/// Waits until `ready` holds and RSS has stopped growing (two readings
/// 100 ms apart within 1%), or `time_max` passes.
async fn settle(
    time_max: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let stop = Instant::now() + time_max;
    let mut last = rss_bytes()?;
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_bytes()?;
        if ready()? && (now - last).abs() * 100 <= last {
            return Ok(());
        }
        last = now;
    }
    Ok(())
}

/// Resident set size of this process (Linux: /proc/self/status VmRSS),
/// after handing freed heap pages back to the OS, so that growth between
/// two readings is memory in use rather than the allocator's reuse of what
/// the throughput phases freed.
fn rss_bytes() -> anyhow::Result<i64> {
    trim_heap();
    let status = std::fs::read_to_string("/proc/self/status").context(
        "the memory figure needs /proc/self/status (Linux); run with --parked 0 elsewhere",
    )?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line in /proc/self/status")?;
    Ok(kib * 1024)
}

/// The report as text.
pub fn render_text(r: &BenchReport) -> String {
    let row = |name: &str, p: &Phase| {
        format!(
            "{name:<26} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  ({} requests, {} errors, {:.2} s)",
            p.requests_per_s, p.p50_ms, p.p99_ms, p.requests, p.errors, p.seconds
        )
    };
    let mark = |ok: bool| if ok { "meets" } else { "MISSES" };
    let mut out = vec![
        format!(
            "tavernsim bench proxy: small non-streaming completions on loopback, {} connections",
            r.spec.concurrency
        ),
        row("direct to the mock", &r.direct),
        row("through the proxy", &r.proxy),
        row("direct, one at a time", &r.direct_latency),
        row("proxy, one at a time", &r.proxy_latency),
        format!(
            "throughput through the proxy: {:.2}x direct ({} the 0.7x target)",
            r.throughput_ratio,
            mark(r.throughput_ratio >= 0.7)
        ),
        format!(
            "added latency at p50, one at a time: {:.3} ms ({} the 0.3 ms target)",
            r.added_p50_ms,
            mark(r.added_p50_ms < 0.3)
        ),
    ];
    if let Some(m) = &r.memory {
        let held = if m.proxy_bytes_per_request > 0 {
            format!("{} B held by the proxy", m.proxy_bytes_per_request)
        } else {
            "the proxy's share is below the noise of RSS".to_string()
        };
        out.push(format!(
            "memory per in-flight request ({} parked): {} B through the proxy path, {} B direct, so {held}",
            m.parked, m.proxy_path_bytes_per_request, m.direct_bytes_per_request
        ));
    }
    out.join("\n")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    unsafe extern "C" {
        /// glibc: release free memory from the heap to the OS.
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: malloc_trim only returns unused pages; it has no
    // preconditions and is thread-safe.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_bench_runs_and_reports_every_figure() {
        let r = run(BenchSpec {
            requests: 200,
            concurrency: 4,
            latency_requests: 50,
            phase_ms_max: 5_000,
            parked: 20,
        })
        .await
        .unwrap();
        assert_eq!((r.direct.requests, r.proxy.requests), (200, 200));
        assert_eq!((r.direct.errors, r.proxy.errors), (0, 0));
        assert!(r.throughput_ratio > 0.0 && r.proxy.p99_ms >= r.proxy.p50_ms);
        assert_eq!(r.memory.as_ref().unwrap().parked, 20);
        let text = render_text(&r);
        assert!(text.contains("req/s") && text.contains("memory per in-flight"));
        assert!(
            serde_json::to_string(&r)
                .unwrap()
                .contains("throughput_ratio")
        );
        assert!(
            BenchSpec {
                concurrency: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
