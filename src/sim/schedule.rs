//! Schedules: who does what when in one world, and what the upstream
//! answers to each attempt, made explicit so a failing world can be shrunk,
//! saved, read and replayed.
//!
//! # Brief overview
//! - [`Schedule`]: per tab, its generations; per generation, when it is
//!   sent, whether the tab refreshes or logs out meanwhile, and the
//!   upstream's answer to each attempt. Network faults between the proxy
//!   and the upstream. Serialized as JSON in saved schedules.
//! - [`strategy`]: a proptest strategy that draws a schedule from a
//!   scenario's parameters; [`Schedule::generate`] draws one per seed.
//! - [`shrink`]: greedy shrinking over the concrete schedule, coarse to
//!   fine (drop tabs, generations, refreshes; plainer answers; shorter
//!   times), keeping a simpler schedule whenever it still breaks the same
//!   invariant. (The strategies shrink too, toward the same simpler
//!   values, but one pass of greedy removal is far quicker on a world.)
//! - [`SavedSchedule`]: a schedule with its seed, scenario, variant and the
//!   commit that found it; what `tavernsim replay --schedule` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::{NewTree, ValueTree};

use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::scenario::Scenario;
use crate::upstream::{Answer, fingerprint};

/// Largest saved schedule `replay --schedule` reads.
pub const SAVED_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The saved-schedule format this build writes and reads.
pub const FORMAT: u32 = 1;

/// One world's plan.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub tabs: Vec<TabPlan>,
    /// Faults on the link between the proxy and the upstream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<Fault>,
}

/// One browser tab.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TabPlan {
    pub user: u32,
    pub tab: u32,
    /// The first page load, after the world starts.
    pub start_ms: u64,
    pub generations: Vec<GenPlan>,
}

/// One generation a tab sends.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenPlan {
    /// Its place among the tab's generations (kept when others are
    /// shrunk away, so its messages and fingerprint stay the same).
    pub index: u32,
    /// Makes the messages unique.
    pub nonce: u64,
    /// Pause before sending.
    #[serde(default)]
    pub think_ms: u64,
    #[serde(default)]
    pub stream: bool,
    /// The tab reloads the page while the generation is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshPlan>,
    /// After a refresh, the page takes this long to load again.
    #[serde(default)]
    pub page_load_ms: u64,
    /// The tab logs out this long after sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logout_after_ms: Option<u64>,
    /// An administrator disables or deletes the tab's user this long after
    /// the send (from another browser).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminPlan>,
    /// The upstream's answer to each attempt, in order; attempts past the
    /// list are answered with a completion after the scenario's shortest
    /// delay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<AttemptPlan>,
}

/// What an administrator does to a tab's user while its generation is
/// pending.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminPlan {
    pub action: AdminAction,
    pub after_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AdminAction {
    Disable,
    Delete,
}

impl AdminAction {
    /// The admin API's route for it.
    pub fn path(self) -> &'static str {
        match self {
            AdminAction::Disable => "/api/users/disable",
            AdminAction::Delete => "/api/users/delete",
        }
    }
}

/// When a tab refreshes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum RefreshPlan {
    /// This long after sending.
    AfterMs(u64),
    /// Just after the upstream answered an attempt of this generation with
    /// a 429 (the moment a retry timer is armed).
    #[serde(rename = "after-429", alias = "after429")]
    After429,
    /// As the proxy's request enters `phase` (a phase of the request table,
    /// or "after-release") for the `nth` time: `sending` 2 is the retry
    /// timer firing.
    AtPhase { phase: String, nth: u32 },
}

/// The phases a refresh can be aimed at.
pub fn aimable_phases() -> impl Iterator<Item = &'static str> {
    crate::proxy::requests::PHASE_NAMES
        .iter()
        .copied()
        .chain(std::iter::once("after-release"))
}

/// The upstream's answer to one attempt.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttemptPlan {
    pub answer: PlannedAnswer,
    /// Time before the answer head.
    pub delay_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum PlannedAnswer {
    Complete,
    /// A 429, with a `Retry-After` of this many seconds or none.
    TooMany {
        retry_after_s: Option<u64>,
    },
    ServerError {
        status: u16,
    },
    /// A 200 that breaks off: a stream after `after_chunks` of its chunks,
    /// a JSON answer halfway (see [`Answer::StreamReset`]).
    StreamReset {
        after_chunks: u32,
    },
}

impl From<PlannedAnswer> for Answer {
    fn from(a: PlannedAnswer) -> Self {
        match a {
            PlannedAnswer::Complete => Answer::Complete,
            PlannedAnswer::TooMany { retry_after_s } => Answer::TooMany { retry_after_s },
            PlannedAnswer::ServerError { status } => Answer::ServerError(status),
            PlannedAnswer::StreamReset { after_chunks } => Answer::StreamReset { after_chunks },
        }
    }
}

/// A fault on the link between the proxy and the upstream, or of the
/// proxy itself.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    pub at_ms: u64,
    pub for_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Messages between the two are dropped.
    Partition,
    /// Messages between the two are held, then delivered.
    Hold,
    /// The proxy process goes down with its requests in flight and starts
    /// again `for_ms` later (same users file, same session secret).
    Restart,
}

impl GenPlan {
    /// The messages the generation sends.
    pub fn messages(&self, user: &str, tab: u32) -> Value {
        let content = format!(
            "{user} tab {tab} generation {} nonce {:016x}",
            self.index, self.nonce
        );
        json!([{"role": "user", "content": content}])
    }
}

impl Schedule {
    /// The schedule a seed gives for a scenario.
    pub fn generate(seed: u64, sc: &Scenario) -> Self {
        let mut runner = runner_for(seed);
        match strategy(sc).new_tree(&mut runner) {
            Ok(tree) => tree.current(),
            // The strategies never reject; an empty world is still a world.
            Err(_) => Schedule::default(),
        }
    }

    /// The upstream's plan, keyed by the fingerprint of each generation's
    /// messages.
    pub fn upstream_plan(&self, user_name: impl Fn(u32) -> String) -> UpstreamPlan {
        let mut by_fp = BTreeMap::new();
        for t in &self.tabs {
            let user = user_name(t.user);
            for g in &t.generations {
                by_fp.insert(fingerprint(&g.messages(&user, t.tab)), g.upstream.clone());
            }
        }
        UpstreamPlan { by_fp }
    }

    /// What a reader counts as actions: generations sent, refreshes,
    /// logouts, upstream answers that are not a plain completion, faults.
    pub fn actions(&self) -> usize {
        let per_gen = |g: &GenPlan| {
            1 + usize::from(g.refresh.is_some())
                + usize::from(g.logout_after_ms.is_some())
                + usize::from(g.admin.is_some())
                + g.upstream
                    .iter()
                    .filter(|a| a.answer != PlannedAnswer::Complete)
                    .count()
        };
        self.tabs
            .iter()
            .flat_map(|t| &t.generations)
            .map(per_gen)
            .sum::<usize>()
            + self.faults.len()
    }

    /// Drops trailing upstream answers that say what the default says (a
    /// completion after `delay_ms_min`), so a saved schedule reads short.
    pub fn tidy(&mut self, delay_ms_min: u64) {
        let default = AttemptPlan {
            answer: PlannedAnswer::Complete,
            delay_ms: delay_ms_min,
        };
        for g in self.tabs.iter_mut().flat_map(|t| &mut t.generations) {
            while g.upstream.last() == Some(&default) {
                g.upstream.pop();
            }
        }
    }

    /// Checks a schedule read from a file against its scenario.
    pub fn validate(&self, sc: &Scenario) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tabs {
            if t.user >= sc.users || t.tab >= sc.tabs_of(t.user) {
                return Err(format!(
                    "tab {} of user {} is outside the scenario ({} users)",
                    t.tab, t.user, sc.users
                ));
            }
            if !seen.insert((t.user, t.tab)) {
                return Err(format!("tab {} of user {} is listed twice", t.tab, t.user));
            }
            if t.generations.len() > super::scenario::GENERATIONS_PER_TAB_MAX as usize {
                return Err(format!(
                    "tab {} of user {} has more than {} generations",
                    t.tab,
                    t.user,
                    super::scenario::GENERATIONS_PER_TAB_MAX
                ));
            }
            if t.start_ms > TIME_MS_MAX {
                return Err(format!(
                    "tab {} of user {}: start_ms must be at most {TIME_MS_MAX}",
                    t.tab, t.user
                ));
            }
            let mut indices = std::collections::BTreeSet::new();
            for g in &t.generations {
                let at = format!("generation {} of tab {} of user {}", g.index, t.tab, t.user);
                if !indices.insert(g.index) {
                    return Err(format!("{at} is listed twice (indices must be unique)"));
                }
                let times = [
                    Some(g.think_ms),
                    Some(g.page_load_ms),
                    g.logout_after_ms,
                    g.admin.map(|a| a.after_ms),
                    match g.refresh {
                        Some(RefreshPlan::AfterMs(ms)) => Some(ms),
                        _ => None,
                    },
                ];
                if times.iter().flatten().any(|ms| *ms > TIME_MS_MAX) {
                    return Err(format!("{at}: every time must be at most {TIME_MS_MAX} ms"));
                }
                if g.admin.is_some() && sc.p_disable + sc.p_delete <= 0.0 {
                    return Err(format!(
                        "{at} plans an administrator's act, but the scenario has no administrator (p_disable and p_delete are 0)"
                    ));
                }
                for a in &g.upstream {
                    if a.delay_ms > TIME_MS_MAX {
                        return Err(format!("{at}: an upstream delay_ms is over {TIME_MS_MAX}"));
                    }
                    match a.answer {
                        PlannedAnswer::TooMany {
                            retry_after_s: Some(s),
                        } if s > RETRY_AFTER_S_MAX => {
                            return Err(format!(
                                "{at}: retry_after_s = {s} is over {RETRY_AFTER_S_MAX}"
                            ));
                        }
                        PlannedAnswer::StreamReset { after_chunks }
                            if after_chunks >= sc.upstream.stream_chunks =>
                        {
                            return Err(format!(
                                "{at}: a stream-reset's after_chunks must be below the scenario's stream_chunks ({})",
                                sc.upstream.stream_chunks
                            ));
                        }
                        PlannedAnswer::ServerError { status } if !(500..=599).contains(&status) => {
                            return Err(format!(
                                "{at}: a server-error status must be within 500..=599, not {status}"
                            ));
                        }
                        _ => {}
                    }
                }
                if let Some(RefreshPlan::AtPhase { phase, .. }) = &g.refresh
                    && !aimable_phases().any(|p| p == phase)
                {
                    let names: Vec<_> = aimable_phases().collect();
                    return Err(format!(
                        "generation {} of tab {} of user {} aims at phase '{phase}'; phases: {}",
                        g.index,
                        t.tab,
                        t.user,
                        names.join(", ")
                    ));
                }
                if g.upstream.len() > ATTEMPTS_PLANNED_MAX {
                    return Err(format!(
                        "generation {} of tab {} of user {} plans more than {ATTEMPTS_PLANNED_MAX} attempts",
                        g.index, t.tab, t.user
                    ));
                }
            }
        }
        if self.faults.len() > FAULTS_MAX {
            return Err(format!("more than {FAULTS_MAX} faults"));
        }
        if self
            .faults
            .iter()
            .any(|f| f.at_ms > TIME_MS_MAX || f.for_ms > TIME_MS_MAX)
        {
            return Err(format!(
                "a fault's at_ms and for_ms must be at most {TIME_MS_MAX}"
            ));
        }
        Ok(())
    }
}

/// Largest time a saved schedule may name (one simulated day).
pub const TIME_MS_MAX: u64 = 24 * 3_600_000;
/// Largest `Retry-After` a saved schedule may name (as the scripts allow).
pub const RETRY_AFTER_S_MAX: u64 = 3_600;

/// Attempts planned per generation at the most.
pub const ATTEMPTS_PLANNED_MAX: usize = 64;
/// Faults per world at the most.
pub const FAULTS_MAX: usize = 64;

/// What the mock upstream answers, per fingerprint and attempt.
#[derive(Clone, Debug, Default)]
pub struct UpstreamPlan {
    pub by_fp: BTreeMap<String, Vec<AttemptPlan>>,
}

impl UpstreamPlan {
    /// The answer to attempt `attempt` (1-based) of `fp`, if planned.
    pub fn answer(&self, fp: &str, attempt: u32) -> Option<AttemptPlan> {
        let i = (attempt as usize).checked_sub(1)?;
        self.by_fp.get(fp)?.get(i).copied()
    }
}

/// A proptest runner whose generator is the seed's.
fn runner_for(seed: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(
            &super::world::derive_seed(seed, 0x5c4e_d01e + i as u64).to_le_bytes(),
        );
    }
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// Upstream answers drawn per generation: enough for every retry the
/// scenario's policy (or a faithful variant's) makes.
fn attempts_planned(sc: &Scenario) -> usize {
    (sc.retry.attempts_max as usize).clamp(6, ATTEMPTS_PLANNED_MAX)
}

/// The strategy for a scenario's schedules. Everything shrinks toward
/// less: tabs and generations dropped, refreshes and logouts removed,
/// upstream answers turned into completions, delays shortened.
pub fn strategy(sc: &Scenario) -> BoxedStrategy<Schedule> {
    let mut tabs = Vec::new();
    for u in 0..sc.users {
        for t in 0..sc.tabs_of(u) {
            tabs.push(droppable(
                1.0,
                tab_strategy(sc, u, t, sc.generations_per_tab),
            ));
        }
    }
    let faults = fault_strategy(sc);
    (tabs, faults)
        .prop_map(|(tabs, faults)| Schedule {
            tabs: tabs.into_iter().flatten().collect(),
            faults,
        })
        .boxed()
}

/// One tab's plan of `generations` generations, drawn from the seed (the
/// probe's tabs, which are not part of a simulated world).
pub fn tab_plan(sc: &Scenario, seed: u64, tab: u32, generations: u32) -> TabPlan {
    let mut runner = runner_for(seed);
    tab_strategy(sc, 0, tab, generations)
        .new_tree(&mut runner)
        .map(|t| t.current())
        .unwrap_or(TabPlan {
            user: 0,
            tab,
            start_ms: 10,
            generations: Vec::new(),
        })
}

fn tab_strategy(sc: &Scenario, user: u32, tab: u32, generations: u32) -> BoxedStrategy<TabPlan> {
    let gens: Vec<_> = (0..generations)
        .map(|i| droppable(1.0, gen_strategy(sc, i)))
        .collect();
    (10u64..=200, gens)
        .prop_map(move |(start_ms, gens)| TabPlan {
            user,
            tab,
            start_ms,
            generations: gens.into_iter().flatten().collect(),
        })
        .boxed()
}

fn gen_strategy(sc: &Scenario, index: u32) -> BoxedStrategy<GenPlan> {
    let refresh = droppable(
        sc.p_refresh,
        prop_oneof![
            weight(1.0 - sc.p_aim_after_429 - sc.p_aim_phase) =>
                log_uniform_ms(sc.refresh_after_ms_max).prop_map(RefreshPlan::AfterMs),
            weight(sc.p_aim_after_429) => Just(RefreshPlan::After429),
            weight(sc.p_aim_phase) => (
                proptest::sample::select(aimable_phases().collect::<Vec<_>>()),
                1u32..=2,
            )
                .prop_map(|(phase, nth)| RefreshPlan::AtPhase { phase: phase.to_string(), nth }),
        ],
    );
    let logout = droppable(sc.p_logout, log_uniform_ms(sc.logout_after_ms_max));
    let admin = droppable(
        sc.p_disable + sc.p_delete,
        (
            prop_oneof![
                weight(sc.p_disable / (sc.p_disable + sc.p_delete).max(1e-12)) => Just(AdminAction::Disable),
                weight(sc.p_delete / (sc.p_disable + sc.p_delete).max(1e-12)) => Just(AdminAction::Delete),
            ],
            log_uniform_ms(sc.admin_after_ms_max),
        )
            .prop_map(|(action, after_ms)| AdminPlan { action, after_ms }),
    );
    // A resend after a refresh goes out at once.
    let p_resend = sc.p_resend * sc.p_refresh;
    let think = prop_oneof![
        weight(p_resend) => Just(0u64),
        weight(1.0 - p_resend) => 0..=sc.think_ms_max,
    ];
    let upstream: Vec<_> = (0..attempts_planned(sc))
        .map(|_| attempt_strategy(sc))
        .collect();
    (
        any::<u64>().no_shrink(),
        think,
        droppable(sc.p_stream, Just(())).prop_map(|s| s.is_some()),
        refresh,
        sc.page_load_ms_min..=sc.page_load_ms_max,
        (logout, admin),
        upstream,
    )
        .prop_map(
            move |(
                nonce,
                think_ms,
                stream,
                refresh,
                page_load_ms,
                (logout_after_ms, admin),
                upstream,
            )| {
                GenPlan {
                    index,
                    nonce,
                    think_ms,
                    stream,
                    refresh,
                    page_load_ms,
                    logout_after_ms,
                    admin,
                    upstream,
                }
            },
        )
        .boxed()
}

fn attempt_strategy(sc: &Scenario) -> BoxedStrategy<AttemptPlan> {
    let s = &sc.upstream;
    let p_complete = (1.0 - s.p_429 - s.p_5xx - s.p_stream_reset).max(0.0);
    let hinted = droppable(s.p_retry_after, 0..=s.retry_after_s_max);
    // The last arm, weighing 0 unless asked for: the draws of scenarios
    // without stream resets stay as they were.
    let answer = prop_oneof![
        weight(p_complete) => Just(PlannedAnswer::Complete),
        weight(s.p_429) => hinted.prop_map(|retry_after_s| PlannedAnswer::TooMany { retry_after_s }),
        weight(s.p_5xx) => prop_oneof![Just(500u16), Just(503u16)]
            .prop_map(|status| PlannedAnswer::ServerError { status }),
        weight(s.p_stream_reset) => (0..s.stream_chunks)
            .prop_map(|after_chunks| PlannedAnswer::StreamReset { after_chunks }),
    ];
    (answer, s.delay_ms_min..=s.delay_ms_max)
        .prop_map(|(answer, delay_ms)| AttemptPlan { answer, delay_ms })
        .boxed()
}

fn fault_strategy(sc: &Scenario) -> BoxedStrategy<Vec<Fault>> {
    let f = &sc.faults;
    if f.per_world == 0 {
        return Just(Vec::new()).boxed();
    }
    let restart = if f.restarts { 1 } else { 0 };
    let one = (
        prop_oneof![
            1 => Just(FaultKind::Partition),
            1 => Just(FaultKind::Hold),
            restart => Just(FaultKind::Restart),
        ],
        0..=f.within_ms,
        f.for_ms_min..=f.for_ms_max,
    )
        .prop_map(|(kind, at_ms, for_ms)| Fault {
            kind,
            at_ms,
            for_ms,
        });
    let each: Vec<_> = (0..f.per_world)
        .map(|_| droppable(1.0, one.clone()))
        .collect();
    each.prop_map(|v| {
        let mut v: Vec<Fault> = v.into_iter().flatten().collect();
        v.sort_by_key(|f| (f.at_ms, f.for_ms));
        v
    })
    .boxed()
}

/// A probability as a `prop_oneof!` weight (0 is never drawn; the weights
/// of one union add up to one million).
fn weight(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 1_000_000.0).round() as u32
}

/// A delay between 10 ms and `max_ms`, uniform in its logarithm: as many
/// land in the first second (a fast retry) as in the last minute (a long
/// backoff). Shrinks toward 10 ms.
fn log_uniform_ms(max_ms: u64) -> BoxedStrategy<u64> {
    let (lo, hi) = (10f64.ln(), (max_ms as f64).max(11.0).ln());
    (0u32..=10_000)
        .prop_map(move |k| (lo + (hi - lo) * f64::from(k) / 10_000.0).exp() as u64)
        .boxed()
}

/// `Some` with probability `p`, shrinking to `None`: a value that can be
/// dropped from a schedule. (proptest's `option::weighted` takes only
/// probabilities strictly between 0 and 1.)
fn droppable<S: Strategy + 'static>(p: f64, inner: S) -> BoxedStrategy<Option<S::Value>>
where
    S::Tree: 'static,
{
    Droppable { p, inner }.boxed()
}

#[derive(Debug)]
struct Droppable<S> {
    p: f64,
    inner: S,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropState {
    /// Present; dropping not tried yet.
    Fresh,
    /// Trying it dropped.
    Trying,
    /// Dropped for good.
    Dropped,
    /// Needed: only its value shrinks now.
    Kept,
}

struct DroppableTree<T> {
    /// None when drawn absent: nothing to shrink.
    inner: Option<T>,
    state: DropState,
}

impl<S: Strategy> Strategy for Droppable<S> {
    type Tree = DroppableTree<S::Tree>;
    type Value = Option<S::Value>;

    fn new_tree(&self, runner: &mut TestRunner) -> NewTree<Self> {
        let present = self.p >= 1.0 || (self.p > 0.0 && runner.rng().random_bool(self.p));
        // An absent value draws nothing more: a scenario whose share is 0
        // makes no draw for it at all.
        let inner = if present {
            Some(self.inner.new_tree(runner)?)
        } else {
            None
        };
        Ok(DroppableTree {
            inner,
            state: if present {
                DropState::Fresh
            } else {
                DropState::Dropped
            },
        })
    }
}

impl<T: ValueTree> ValueTree for DroppableTree<T> {
    type Value = Option<T::Value>;

    fn current(&self) -> Self::Value {
        match self.state {
            DropState::Fresh | DropState::Kept => self.inner.as_ref().map(T::current),
            DropState::Trying | DropState::Dropped => None,
        }
    }

    fn simplify(&mut self) -> bool {
        match self.state {
            DropState::Fresh => {
                self.state = DropState::Trying;
                true
            }
            // Dropping it still failed: keep it dropped.
            DropState::Trying => {
                self.state = DropState::Dropped;
                false
            }
            DropState::Dropped => false,
            DropState::Kept => self.inner.as_mut().is_some_and(T::simplify),
        }
    }

    fn complicate(&mut self) -> bool {
        match self.state {
            DropState::Trying => {
                self.state = DropState::Kept;
                true
            }
            DropState::Kept => self.inner.as_mut().is_some_and(T::complicate),
            DropState::Fresh | DropState::Dropped => false,
        }
    }
}

/// Bounds on one shrink.
#[derive(Clone, Copy, Debug)]
pub struct ShrinkBudget {
    pub runs_max: u32,
    pub wall: Duration,
}

impl Default for ShrinkBudget {
    fn default() -> Self {
        Self {
            runs_max: 2_000,
            wall: Duration::from_secs(120),
        }
    }
}

/// How a shrink went.
#[derive(Clone, Debug)]
pub struct Shrunk {
    pub schedule: Schedule,
    /// Worlds run while shrinking.
    pub runs: u32,
    /// The budget ran out before the schedule was minimal.
    pub budget_hit: bool,
    pub actions_before: usize,
}

/// Shrinks the seed's schedule for `sc` while `still_fails` holds (it runs
/// the world and says whether the same invariant broke). The returned
/// schedule fails; it is the original when nothing simpler does.
///
/// Greedy, coarse to fine: drop faults, tabs, generations, refreshes and
/// logouts; turn upstream answers into completions and cut the answers
/// after them; then shorten delays. After each simpler schedule that still
/// fails, the pass goes on from the same place; passes repeat until one
/// changes nothing.
pub fn shrink(
    seed: u64,
    sc: &Scenario,
    budget: ShrinkBudget,
    still_fails: &mut dyn FnMut(&Schedule) -> bool,
    progress: &mut dyn FnMut(u32, usize),
) -> Shrunk {
    let started = Instant::now();
    let mut best = Schedule::generate(seed, sc);
    let actions_before = best.actions();
    let mut runs = 0;
    let mut budget_hit = false;
    let mut tried = std::collections::BTreeSet::new();
    'passes: loop {
        let mut changed = false;
        let mut i = 0;
        loop {
            let candidates = simpler(&best, sc);
            let Some(candidate) = candidates.into_iter().skip(i).find(|c| {
                i += 1;
                *c != best && !tried.contains(&serde_json::to_string(c).unwrap_or_default())
            }) else {
                break;
            };
            if runs >= budget.runs_max || started.elapsed() >= budget.wall {
                budget_hit = true;
                break 'passes;
            }
            runs += 1;
            tried.insert(serde_json::to_string(&candidate).unwrap_or_default());
            if still_fails(&candidate) {
                best = candidate;
                changed = true;
                progress(runs, best.actions());
                // The list is rebuilt for the simpler schedule: go on from
                // about the same place.
                i = i.saturating_sub(1);
            }
        }
        if !changed {
            break;
        }
    }
    Shrunk {
        schedule: best,
        runs,
        budget_hit,
        actions_before,
    }
}

/// Every schedule one step simpler than `s`, coarsest first.
fn simpler(s: &Schedule, sc: &Scenario) -> Vec<Schedule> {
    let mut out = Vec::new();
    let with = |f: &dyn Fn(&mut Schedule)| {
        let mut c = s.clone();
        f(&mut c);
        c
    };
    for i in 0..s.faults.len() {
        out.push(with(&|c| {
            c.faults.remove(i);
        }));
    }
    for t in 0..s.tabs.len() {
        out.push(with(&|c| {
            c.tabs.remove(t);
        }));
    }
    for (t, tab) in s.tabs.iter().enumerate() {
        for g in 0..tab.generations.len() {
            out.push(with(&|c| {
                c.tabs[t].generations.remove(g);
            }));
        }
    }
    let gens = || {
        s.tabs
            .iter()
            .enumerate()
            .flat_map(|(t, tab)| (0..tab.generations.len()).map(move |g| (t, g)))
    };
    for (t, g) in gens() {
        let gp = &s.tabs[t].generations[g];
        if gp.refresh.is_some() {
            out.push(with(&|c| c.tabs[t].generations[g].refresh = None));
        }
        if gp.logout_after_ms.is_some() {
            out.push(with(&|c| c.tabs[t].generations[g].logout_after_ms = None));
        }
        if gp.admin.is_some() {
            out.push(with(&|c| c.tabs[t].generations[g].admin = None));
        }
        for a in 0..gp.upstream.len() {
            if gp.upstream[a].answer != PlannedAnswer::Complete {
                // A completion here: later answers are never asked for.
                out.push(with(&|c| {
                    let up = &mut c.tabs[t].generations[g].upstream;
                    up[a].answer = PlannedAnswer::Complete;
                    up.truncate(a + 1);
                }));
            }
        }
    }
    // Finer: plainer answers and shorter times.
    let min_delay = sc.upstream.delay_ms_min;
    for (t, g) in gens() {
        let gp = &s.tabs[t].generations[g];
        if gp.stream {
            out.push(with(&|c| c.tabs[t].generations[g].stream = false));
        }
        if gp.think_ms > 0 {
            out.push(with(&|c| c.tabs[t].generations[g].think_ms = 0));
        }
        if gp.page_load_ms > sc.page_load_ms_min {
            out.push(with(&|c| {
                c.tabs[t].generations[g].page_load_ms = sc.page_load_ms_min
            }));
        }
        if let Some(RefreshPlan::AfterMs(ms)) = gp.refresh
            && ms > 10
        {
            out.push(with(&|c| {
                c.tabs[t].generations[g].refresh = Some(RefreshPlan::AfterMs(10 + (ms - 10) / 2))
            }));
        }
        for a in 0..gp.upstream.len() {
            let at = gp.upstream[a];
            if at.delay_ms > min_delay {
                out.push(with(&|c| {
                    c.tabs[t].generations[g].upstream[a].delay_ms = min_delay
                }));
            }
            if let PlannedAnswer::TooMany {
                retry_after_s: Some(n),
            } = at.answer
                && n > 0
            {
                out.push(with(&|c| {
                    c.tabs[t].generations[g].upstream[a].answer = PlannedAnswer::TooMany {
                        retry_after_s: Some(n / 2),
                    }
                }));
            }
        }
    }
    for t in 0..s.tabs.len() {
        if s.tabs[t].start_ms > 10 {
            out.push(with(&|c| c.tabs[t].start_ms = 10));
        }
    }
    for i in 0..s.faults.len() {
        if s.faults[i].for_ms > sc.faults.for_ms_min {
            out.push(with(&|c| c.faults[i].for_ms = sc.faults.for_ms_min));
        }
    }
    out
}

/// A schedule saved to a file, with what is needed to run it again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedSchedule {
    pub format: u32,
    pub seed: u64,
    /// The variant it ran against.
    pub variant: String,
    /// The invariant it broke (empty: none).
    pub invariant: String,
    #[serde(default)]
    pub message: String,
    /// The trace hash of the run that saved it, with the build below.
    #[serde(default)]
    pub trace_hash: String,
    /// The build that saved it.
    #[serde(default)]
    pub tavernsim: String,
    #[serde(default)]
    pub commit: String,
    /// Where the scenario came from, and the whole scenario (a replay needs
    /// no file besides this one).
    pub scenario_origin: String,
    pub scenario: Scenario,
    pub schedule: Schedule,
}

impl SavedSchedule {
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
        if meta.len() > SAVED_BYTES_MAX {
            return Err(format!(
                "{shown}: larger than {SAVED_BYTES_MAX} bytes; is it a saved schedule?"
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{shown}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let saved: SavedSchedule =
            serde_json::from_str(text).map_err(|e| format!("not a saved schedule ({e})"))?;
        if saved.format != FORMAT {
            return Err(format!(
                "schedule format {} (this build reads format {FORMAT})",
                saved.format
            ));
        }
        saved.scenario.validate()?;
        saved.schedule.validate(&saved.scenario)?;
        Ok(saved)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn scenario(&self) -> Arc<Scenario> {
        Arc::new(self.scenario.clone())
    }
}

/// The commit this binary was built from, when built from a git checkout.
pub fn build_commit() -> &'static str {
    option_env!("TAVERNSIM_COMMIT").unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario::load("refresh-during-retry").unwrap()
    }

    #[test]
    fn a_seed_gives_one_schedule() {
        let sc = scenario();
        let a = Schedule::generate(7, &sc);
        assert_eq!(a, Schedule::generate(7, &sc));
        assert_ne!(a, Schedule::generate(8, &sc));
        assert_eq!(a.tabs.len(), (sc.users * sc.tabs_per_user) as usize);
        for t in &a.tabs {
            assert_eq!(t.generations.len(), sc.generations_per_tab as usize);
        }
        // The scenario's shares show in the draws.
        let gens: Vec<_> = (0..50)
            .flat_map(|s| Schedule::generate(s, &sc).tabs)
            .flat_map(|t| t.generations)
            .collect();
        let refreshed = gens.iter().filter(|g| g.refresh.is_some()).count();
        let share = refreshed as f64 / gens.len() as f64;
        assert!((0.35..0.65).contains(&share), "refresh share {share}");
        let answers: Vec<_> = gens.iter().flat_map(|g| &g.upstream).collect();
        let too_many = answers
            .iter()
            .filter(|a| matches!(a.answer, PlannedAnswer::TooMany { .. }))
            .count();
        let share = too_many as f64 / answers.len() as f64;
        assert!((0.5..0.7).contains(&share), "429 share {share}");
    }

    #[test]
    fn stream_resets_are_drawn_at_their_share_and_shrink_to_completions() {
        let sc = Scenario::load("stream-reset").unwrap();
        let chunks = sc.upstream.stream_chunks;
        let answers: Vec<AttemptPlan> = (0..20)
            .flat_map(|s| Schedule::generate(s, &sc).tabs)
            .flat_map(|t| t.generations)
            .flat_map(|g| g.upstream)
            .collect();
        let resets: Vec<u32> = answers
            .iter()
            .filter_map(|a| match a.answer {
                PlannedAnswer::StreamReset { after_chunks } => Some(after_chunks),
                _ => None,
            })
            .collect();
        let share = resets.len() as f64 / answers.len() as f64;
        let p = sc.upstream.p_stream_reset;
        assert!((p - 0.1..p + 0.1).contains(&share), "reset share {share}");
        assert!(resets.iter().all(|&n| n < chunks));
        assert!(resets.contains(&0) && resets.contains(&(chunks - 1)));
        // Written as the other answers are, and read back.
        let reset = PlannedAnswer::StreamReset { after_chunks: 2 };
        let text = serde_json::to_string(&reset).unwrap();
        assert_eq!(text, r#"{"stream-reset":{"after_chunks":2}}"#);
        assert_eq!(serde_json::from_str::<PlannedAnswer>(&text).unwrap(), reset);
        // A schedule one step simpler answers it with a completion.
        let mut one = Schedule::generate(0, &sc);
        one.tabs.truncate(1);
        one.tabs[0].generations.truncate(1);
        one.tabs[0].generations[0].upstream = vec![AttemptPlan {
            answer: reset,
            delay_ms: 20,
        }];
        assert!(simpler(&one, &sc).iter().any(|c| {
            c.tabs
                .first()
                .and_then(|t| t.generations.first())
                .is_some_and(|g| {
                    g.upstream.first().map(|a| a.answer) == Some(PlannedAnswer::Complete)
                })
        }));
        // No resets asked for: none drawn.
        let plain = scenario();
        assert_eq!(plain.upstream.p_stream_reset, 0.0);
        let none = (0..20)
            .flat_map(|s| Schedule::generate(s, &plain).tabs)
            .flat_map(|t| t.generations)
            .flat_map(|g| g.upstream)
            .any(|a| matches!(a.answer, PlannedAnswer::StreamReset { .. }));
        assert!(!none);
    }

    #[test]
    fn shrinking_finds_the_one_action_that_matters() {
        // "Fails" when some generation is refreshed after a 429: the
        // minimal schedule keeps one tab, one generation, that refresh and
        // that 429, and nothing else.
        let sc = scenario();
        let fails = |s: &Schedule| {
            s.tabs.iter().flat_map(|t| &t.generations).any(|g| {
                g.refresh.is_some()
                    && g.upstream
                        .first()
                        .is_some_and(|a| matches!(a.answer, PlannedAnswer::TooMany { .. }))
            })
        };
        let seed = (0..100)
            .find(|&s| fails(&Schedule::generate(s, &sc)))
            .expect("some seed fails");
        let shrunk = shrink(
            seed,
            &sc,
            ShrinkBudget::default(),
            &mut |s| fails(s),
            &mut |_, _| {},
        );
        assert!(!shrunk.budget_hit);
        assert!(fails(&shrunk.schedule));
        assert_eq!(shrunk.schedule.tabs.len(), 1);
        assert_eq!(shrunk.schedule.tabs[0].generations.len(), 1);
        assert_eq!(shrunk.schedule.actions(), 3, "{:#?}", shrunk.schedule);
        assert!(shrunk.actions_before > 10);
        let g = &shrunk.schedule.tabs[0].generations[0];
        assert_eq!(g.think_ms, 0);
        assert_eq!(g.upstream[0].delay_ms, sc.upstream.delay_ms_min);
    }

    #[test]
    fn saved_schedules_round_trip_and_bad_files_say_why() {
        let sc = scenario();
        let mut schedule = Schedule::generate(3, &sc);
        schedule.tidy(sc.upstream.delay_ms_min);
        let saved = SavedSchedule {
            format: FORMAT,
            seed: 3,
            variant: "fixed".into(),
            invariant: String::new(),
            message: String::new(),
            trace_hash: String::new(),
            tavernsim: env!("CARGO_PKG_VERSION").into(),
            commit: build_commit().into(),
            scenario_origin: "refresh-during-retry".into(),
            scenario: sc.clone(),
            schedule,
        };
        let back = SavedSchedule::parse(&saved.to_json()).unwrap();
        assert_eq!(back, saved);
        assert!(
            SavedSchedule::parse("{}")
                .unwrap_err()
                .contains("not a saved schedule")
        );
        let mut wrong = saved.clone();
        wrong.format = 99;
        assert!(
            SavedSchedule::parse(&wrong.to_json())
                .unwrap_err()
                .contains("format 99")
        );
        let mut outside = saved;
        outside.schedule.tabs[0].user = 40;
        assert!(
            SavedSchedule::parse(&outside.to_json())
                .unwrap_err()
                .contains("outside")
        );
    }
}
