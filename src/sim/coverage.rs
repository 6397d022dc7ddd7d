//! Coverage: where in a request's life each refresh landed, counted from
//! the trace, so a campaign shows which race windows it reached.

use std::collections::BTreeMap;

use super::trace::Event;
use crate::proxy::requests::PHASE_NAMES;

/// The windows a refresh can land in, in the order of a request's life:
/// the table's phases ([`PHASE_NAMES`]) between "not yet in the table" and
/// "already released".
pub const PHASES: &[&str] = &[
    "before-admit",
    "admitted",
    "gate-wait",
    "sending",
    "backoff",
    "streaming",
    "finished",
    "after-release",
];

/// Refreshes per phase over one world's events (every phase present, zero
/// or not).
pub fn refreshes_per_phase(events: &[Event]) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = PHASES.iter().map(|p| (p.to_string(), 0)).collect();
    // fingerprint -> its request's phase now, as the proxy reported it.
    let mut phase: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut fp_of: BTreeMap<u64, String> = BTreeMap::new();
    for e in events {
        if let Some((fp, p)) = phase_change(&mut fp_of, e) {
            phase.insert(fp, p);
        } else if e.kind == "tab.abandon" {
            let at = phase.get(e.str("fp")).copied().unwrap_or("before-admit");
            *out.entry(at.to_string()).or_default() += 1;
        }
    }
    out
}

/// The phase a request enters with `e`, by its fingerprint: "admitted" at
/// `req.admit`, the table's phase at `req.phase`, "after-release" at
/// `req.release`. `fp_of` (key -> fingerprint of live requests) is kept up
/// to date.
pub fn phase_change(
    fp_of: &mut BTreeMap<u64, String>,
    e: &Event,
) -> Option<(String, &'static str)> {
    match e.kind.as_str() {
        "req.admit" => {
            let fp = e.str("fp").to_string();
            fp_of.insert(e.u64("key"), fp.clone());
            Some((fp, "admitted"))
        }
        "req.phase" => {
            let fp = fp_of.get(&e.u64("key"))?;
            let p = PHASE_NAMES.iter().find(|p| **p == e.str("to"))?;
            Some((fp.clone(), *p))
        }
        "req.release" => fp_of.remove(&e.u64("key")).map(|fp| (fp, "after-release")),
        _ => None,
    }
}

/// Adds `b` into `a`.
pub fn add(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: &str, fields: serde_json::Value) -> Event {
        Event::new(0, "", kind, fields)
    }

    #[test]
    fn each_refresh_counts_in_the_phase_its_request_was_in() {
        let events = vec![
            ev("tab.abandon", json!({"fp": "early"})),
            ev("req.admit", json!({"key": 1, "fp": "a"})),
            ev(
                "req.phase",
                json!({"key": 1, "from": "admitted", "to": "sending"}),
            ),
            ev(
                "req.phase",
                json!({"key": 1, "from": "sending", "to": "backoff"}),
            ),
            ev("tab.abandon", json!({"fp": "a"})),
            ev("req.admit", json!({"key": 2, "fp": "b"})),
            ev("req.release", json!({"key": 2})),
            ev("tab.abandon", json!({"fp": "b"})),
        ];
        let c = refreshes_per_phase(&events);
        assert_eq!(
            (
                c["before-admit"],
                c["backoff"],
                c["after-release"],
                c["sending"]
            ),
            (1, 1, 1, 0)
        );
        assert_eq!(c.len(), PHASES.len());
        assert_eq!(
            PHASES[1..PHASES.len() - 1],
            PHASE_NAMES,
            "coverage knows every phase of the table"
        );
    }
}
