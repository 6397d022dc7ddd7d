//! tavernsim: a deterministic simulation harness for multi-user LLM chat
//! proxies that retry `429 Too Many Requests`, the proxy it runs against,
//! and a probe for proxies that are not ours.
//!
//! # What the harness proves
//! A simulated network (turmoil) stands up a mock 429-returning upstream
//! ([`upstream`]) beside the multi-user proxy ([`proxy`]) and browser tabs
//! that refresh while their request is being retried ([`sim`]). Every part
//! reports structured [`events`]; the oracle ([`sim::oracle`]) judges each
//! world from those events alone: no request state used after release, no
//! write to a released client, no upstream attempt after cancellation, no
//! answer delivered to the wrong tab, no crash, no leak.
//!
//! # Running it
//! ```text
//! cargo run --release -- fuzz                                   # default campaign, fixed proxy
//! cargo run --release -- fuzz --variant sillytavern-1.12.7      # the real defect: caught
//! cargo run --release -- replay --seed 3 --scenario refresh-during-retry --variant sillytavern-1.12.7
//! ```
//! A seed fixes everything: the same seed gives the same trace hash.

// turmoil seeds each host's tokio runtime, and reports a host's panic, only
// under this cfg; without it a seed does not replay.
#[cfg(not(tokio_unstable))]
compile_error!(
    "tavernsim must be built with `--cfg tokio_unstable` (set in .cargo/config.toml); \
     if you set RUSTFLAGS yourself, add `--cfg tokio_unstable` to it"
);

pub mod bench;
pub mod events;
pub mod metrics;
pub mod net;
pub mod probe;
pub mod proxy;
pub mod serve;
pub mod sim;
pub mod upstream;
