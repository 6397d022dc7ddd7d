//! Temporary minimal classifier (replaced by the full one).
use std::time::SystemTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision { Retry, Backoff, GiveUp, Success }

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Classification { pub decision: Decision, pub wait_ms: Option<u64>, pub reason: String }

pub struct ClassifyLimits { pub wait_ms_max: u64 }
impl Default for ClassifyLimits { fn default() -> Self { Self { wait_ms_max: 60_000 } } }

pub fn classify(status: u16, headers: &http::HeaderMap, _body: &[u8], _now: SystemTime, limits: &ClassifyLimits) -> Classification {
    let c = |d, w: Option<u64>, r: &str| Classification { decision: d, wait_ms: w, reason: r.into() };
    if (200..300).contains(&status) { return c(Decision::Success, None, "2xx"); }
    if status == 429 || status >= 500 {
        let hint = headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<u64>().ok()).map(|s| s.saturating_mul(1000));
        return match hint {
            Some(w) if w > limits.wait_ms_max => c(Decision::GiveUp, Some(w), "hint too long"),
            Some(w) => c(Decision::Retry, Some(w), "retry-after header"),
            None => c(Decision::Backoff, None, "no wait hint: backoff"),
        };
    }
    c(Decision::GiveUp, None, "not retryable")
}
