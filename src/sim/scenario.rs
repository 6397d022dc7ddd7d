//! Scenario files (`sims/*.toml`): the workloads the harness runs, as data.
//!
//! A scenario is loaded by name (one of the embedded defaults) or by path.
//! Every field has a default; an unknown or out-of-range field is an error
//! that names it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::proxy::RetryPolicy;
use crate::proxy::budget::BudgetConfig;
use crate::proxy::fair::FairnessConfig;
use crate::proxy::gate::GateConfig;
use crate::upstream::UpstreamScript;

/// The scenarios compiled into the binary, run by `fuzz` by default.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "refresh-during-retry",
        include_str!("../../sims/refresh-during-retry.toml"),
    ),
    (
        "streaming-refresh",
        include_str!("../../sims/streaming-refresh.toml"),
    ),
    ("burst-429", include_str!("../../sims/burst-429.toml")),
    (
        "one-user-floods",
        include_str!("../../sims/one-user-floods.toml"),
    ),
];

/// Scenarios aimed at one race (a refresh or a logout at a precise phase)
/// or at one policy (a budget that binds), loadable by name. `tavernsim
/// mutants` runs them to kill the mutants that need them; `fuzz` runs them
/// only when named.
pub const AIMED: &[(&str, &str)] = &[
    (
        "network-faults",
        include_str!("../../sims/aimed/network-faults.toml"),
    ),
    (
        "slow-upstream",
        include_str!("../../sims/aimed/slow-upstream.toml"),
    ),
    (
        "budget-storm",
        include_str!("../../sims/aimed/budget-storm.toml"),
    ),
    (
        "logout-during-retry",
        include_str!("../../sims/aimed/logout-during-retry.toml"),
    ),
    (
        "refresh-during-attempt",
        include_str!("../../sims/aimed/refresh-during-attempt.toml"),
    ),
    (
        "proxy-restart",
        include_str!("../../sims/aimed/proxy-restart.toml"),
    ),
    (
        "disable-during-retry",
        include_str!("../../sims/aimed/disable-during-retry.toml"),
    ),
    (
        "two-tabs-one-session",
        include_str!("../../sims/aimed/two-tabs-one-session.toml"),
    ),
    (
        "stream-reset",
        include_str!("../../sims/aimed/stream-reset.toml"),
    ),
];

/// Limits that keep one world bounded whatever a scenario asks for.
pub const USERS_MAX: u32 = 32;
pub const TABS_PER_USER_MAX: u32 = 8;
pub const GENERATIONS_PER_TAB_MAX: u32 = 100;
pub const HEAVY_TABS_PER_USER_MAX: u32 = 64;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub users: u32,
    pub tabs_per_user: u32,
    /// The first `heavy_users` users open `heavy_tabs_per_user` tabs each
    /// instead (a user flooding the proxy).
    pub heavy_users: u32,
    pub heavy_tabs_per_user: u32,
    /// A user's tabs share one session (one login, one cookie), as tabs of
    /// one browser do; else each tab signs in on its own.
    pub tabs_share_session: bool,
    pub generations_per_tab: u32,
    pub p_stream: f64,
    pub p_refresh: f64,
    pub refresh_after_ms_max: u64,
    /// Share of refreshes aimed at the moment just after the mock answered
    /// the request with a 429 (the backoff), instead of a random time.
    pub p_aim_after_429: f64,
    /// Share of refreshes aimed at the moment the proxy's request enters a
    /// phase (drawn among the table's phases and "after-release"; the 1st
    /// or 2nd time: the 2nd "sending" is a retry timer firing).
    pub p_aim_phase: f64,
    pub page_load_ms_min: u64,
    pub page_load_ms_max: u64,
    pub p_resend: f64,
    /// Share of generations whose tab logs out while the generation is
    /// pending (0: never; then no draw is made, so seeds replay as before).
    pub p_logout: f64,
    /// The logout lands 10 ms to this after the send, uniform in the logarithm.
    pub logout_after_ms_max: u64,
    /// Shares of generations during which an administrator disables, or
    /// deletes, the tab's user (0: never).
    pub p_disable: f64,
    pub p_delete: f64,
    /// The administrator acts 10 ms to this after the send.
    pub admin_after_ms_max: u64,
    pub think_ms_max: u64,
    /// A tab gives up on an answer after this long.
    pub request_timeout_ms: u64,
    pub upstream: UpstreamScript,
    /// The fixed proxy's retry policy in this world.
    pub retry: RetryPolicy,
    pub gate: GateConfig,
    pub budget: BudgetConfig,
    pub fairness: FairnessConfig,
    pub world: WorldParams,
    pub faults: FaultParams,
}

/// Faults on the link between the proxy and the upstream: partitions
/// (messages dropped) and holds (messages delayed, then delivered).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FaultParams {
    /// Faults drawn per world (0: none).
    pub per_world: u32,
    /// Each starts within this long of the world's start...
    pub within_ms: u64,
    /// ...and lasts this long.
    pub for_ms_min: u64,
    pub for_ms_max: u64,
    /// Faults may also be proxy restarts (down for the fault's length).
    pub restarts: bool,
}

impl Default for FaultParams {
    fn default() -> Self {
        Self {
            per_world: 0,
            within_ms: 30_000,
            for_ms_min: 100,
            for_ms_max: 5_000,
            restarts: false,
        }
    }
}

/// The simulated network and the world's time bounds.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorldParams {
    /// Simulated time per step; also the finest timer resolution.
    pub tick_ms: u64,
    pub latency_ms_min: u64,
    pub latency_ms_max: u64,
    /// After the last tab is done, wait at most this long for the proxy to
    /// become quiescent (empty table, no request task, no upstream
    /// connection) before calling it a leak.
    pub quiesce_ms_max: u64,
    /// Hard bound on a world's simulated time.
    pub sim_ms_max: u64,
    /// Grace between a client leaving and an upstream attempt for its
    /// request counting as `attempt-after-cancel` (message latency).
    pub cancel_grace_ms: u64,
}

impl Default for WorldParams {
    fn default() -> Self {
        Self {
            tick_ms: 10,
            latency_ms_min: 1,
            latency_ms_max: 30,
            quiesce_ms_max: 200_000,
            sim_ms_max: 900_000,
            cancel_grace_ms: 200,
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "custom".into(),
            description: String::new(),
            users: 2,
            tabs_per_user: 1,
            heavy_users: 0,
            heavy_tabs_per_user: 1,
            tabs_share_session: false,
            generations_per_tab: 3,
            p_stream: 0.2,
            p_refresh: 0.3,
            refresh_after_ms_max: 10_000,
            p_aim_after_429: 0.0,
            p_aim_phase: 0.0,
            page_load_ms_min: 200,
            page_load_ms_max: 2_000,
            p_resend: 0.5,
            p_logout: 0.0,
            logout_after_ms_max: 2_000,
            p_disable: 0.0,
            p_delete: 0.0,
            admin_after_ms_max: 5_000,
            think_ms_max: 2_000,
            request_timeout_ms: 300_000,
            upstream: UpstreamScript::default(),
            retry: RetryPolicy::default(),
            gate: GateConfig::default(),
            budget: BudgetConfig::default(),
            fairness: FairnessConfig::default(),
            world: WorldParams::default(),
            faults: FaultParams::default(),
        }
    }
}

impl Scenario {
    /// Tabs user `u` opens.
    pub fn tabs_of(&self, u: u32) -> u32 {
        if u < self.heavy_users {
            self.heavy_tabs_per_user
        } else {
            self.tabs_per_user
        }
    }

    /// Loads an embedded scenario by name, or a file by path.
    pub fn load(name_or_path: &str) -> Result<Self, String> {
        if let Some((_, text)) = EMBEDDED
            .iter()
            .chain(AIMED)
            .find(|(n, _)| *n == name_or_path)
        {
            return Self::parse(text, name_or_path);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<_> = EMBEDDED.iter().chain(AIMED).map(|(n, _)| *n).collect();
            return Err(format!(
                "no scenario named '{name_or_path}' and no such file; embedded scenarios: {}",
                names.join(", ")
            ));
        }
        let meta = std::fs::metadata(path).map_err(|e| format!("{name_or_path}: {e}"))?;
        if meta.len() > 1024 * 1024 {
            return Err(format!(
                "{name_or_path}: a scenario file must be under 1 MiB"
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{name_or_path}: {e}"))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("custom");
        Self::parse(&text, stem)
    }

    /// Every embedded scenario.
    pub fn defaults() -> Vec<Self> {
        EMBEDDED
            .iter()
            .map(|(n, t)| {
                Self::parse(t, n)
                    .unwrap_or_else(|e| panic!("embedded scenario {n} is invalid: {e}"))
            })
            .collect()
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let mut s: Scenario =
            toml::from_str(text).map_err(|e| format!("scenario {origin}: {e}"))?;
        if s.name.is_empty() || s.name == "custom" {
            s.name = origin.to_string();
        }
        s.validate()
            .map_err(|e| format!("scenario {origin}: {e}"))?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), String> {
        let ranges = [
            ("users", self.users, 1, USERS_MAX),
            ("tabs_per_user", self.tabs_per_user, 1, TABS_PER_USER_MAX),
            ("heavy_users", self.heavy_users, 0, self.users),
            (
                "heavy_tabs_per_user",
                self.heavy_tabs_per_user,
                1,
                HEAVY_TABS_PER_USER_MAX,
            ),
            (
                "generations_per_tab",
                self.generations_per_tab,
                1,
                GENERATIONS_PER_TAB_MAX,
            ),
        ];
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{name} = {v}: must be within {lo}..={hi}"));
            }
        }
        for (name, p) in [
            ("p_stream", self.p_stream),
            ("p_refresh", self.p_refresh),
            ("p_resend", self.p_resend),
            ("p_aim_after_429", self.p_aim_after_429),
            ("p_aim_phase", self.p_aim_phase),
            ("p_logout", self.p_logout),
            ("p_disable", self.p_disable),
            ("p_delete", self.p_delete),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "{name} = {p}: a probability must be within 0.0..=1.0"
                ));
            }
        }
        if self.p_disable + self.p_delete > 1.0 {
            return Err("p_disable + p_delete must not exceed 1.0".into());
        }
        if self.admin_after_ms_max > 3_600_000 {
            return Err("admin_after_ms_max must be at most 3600000".into());
        }
        if self.p_aim_after_429 + self.p_aim_phase > 1.0 {
            return Err("p_aim_after_429 + p_aim_phase must not exceed 1.0".into());
        }
        if self.page_load_ms_min > self.page_load_ms_max {
            return Err("page_load_ms_min must not exceed page_load_ms_max".into());
        }
        let w = &self.world;
        if !(1..=1_000).contains(&w.tick_ms) {
            return Err(format!(
                "world.tick_ms = {}: must be within 1..=1000",
                w.tick_ms
            ));
        }
        if w.latency_ms_min > w.latency_ms_max {
            return Err("world.latency_ms_min must not exceed world.latency_ms_max".into());
        }
        if w.sim_ms_max > 24 * 3_600_000 {
            return Err("world.sim_ms_max must be at most one simulated day".into());
        }
        let f = &self.faults;
        if f.per_world > 16 {
            return Err(format!(
                "faults.per_world = {}: must be within 0..=16",
                f.per_world
            ));
        }
        if f.for_ms_min > f.for_ms_max || f.for_ms_max > 600_000 {
            return Err(
                "faults.for_ms_min must not exceed faults.for_ms_max, which must be at most 600000"
                    .into(),
            );
        }
        if f.within_ms > w.sim_ms_max {
            return Err("faults.within_ms must not exceed world.sim_ms_max".into());
        }
        if self.think_ms_max > 3_600_000
            || self.page_load_ms_max > 600_000
            || self.refresh_after_ms_max > 3_600_000
            || self.logout_after_ms_max > 3_600_000
        {
            return Err("think_ms_max, refresh_after_ms_max and logout_after_ms_max must be at most 3600000, page_load_ms_max at most 600000".into());
        }
        self.upstream.validate()?;
        self.budget.validate()?;
        self.fairness.validate()?;
        self.retry.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_scenarios_load() {
        let all = Scenario::defaults();
        assert_eq!(all.len(), EMBEDDED.len());
        assert_eq!(all[0].name, "refresh-during-retry");
        for (name, _) in AIMED {
            assert_eq!(Scenario::load(name).unwrap().name, *name);
        }
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            ("users = 0", "users"),
            ("p_refresh = 2.0", "p_refresh"),
            ("no_such_field = 1", "no_such_field"),
            ("[upstream]\np_429 = -1.0", "p_429"),
            ("[world]\ntick_ms = 0", "tick_ms"),
            ("[retry]\nattempts_max = 0", "attempts_max"),
        ];
        for (text, field) in cases {
            let err = Scenario::parse(text, "t").unwrap_err();
            assert!(
                err.contains(field),
                "{text:?} gave {err:?}, which does not name {field}"
            );
        }
        assert!(
            Scenario::load("no-such-scenario")
                .unwrap_err()
                .contains("refresh-during-retry")
        );
    }
}
