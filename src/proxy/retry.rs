//! Retry policy: how long to wait before the next attempt, and when to
//! stop.
//!
//! The decision about one upstream answer comes from
//! [`classify`](super::classify); this module turns it into a wait, under
//! one deadline that includes every wait (so no request lives longer than
//! `deadline_ms`, whatever the upstream says).

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::classify::{Classification, Decision};

/// Bounds on the retry loop. All waits in milliseconds.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Upstream attempts per request, the first one included.
    pub attempts_max: u32,
    /// First backoff ceiling; doubles per attempt (full jitter below it).
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling.
    pub backoff_max_ms: u64,
    /// Extra wait drawn on top of a server hint (never below the hint).
    pub hint_jitter_ms_max: u64,
    /// A server hint longer than this means: give up now, tell the client
    /// when to come back.
    pub wait_ms_max: u64,
    /// One deadline for the whole request: every attempt and every wait.
    pub deadline_ms: u64,
    /// Time one attempt may take to answer with its head.
    pub attempt_timeout_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts_max: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 8_000,
            hint_jitter_ms_max: 250,
            wait_ms_max: 30_000,
            deadline_ms: 120_000,
            attempt_timeout_ms: 60_000,
        }
    }
}

/// What to do after an attempt that did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try again.
    Wait { wait_ms: u64 },
    /// Stop; `retry_after_ms` tells the client when to come back, if known.
    GiveUp { retry_after_ms: Option<u64> },
}

impl RetryPolicy {
    /// Checks the policy's values; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (
                self.attempts_max >= 1 && self.attempts_max <= 100,
                "attempts_max must be within 1..=100",
            ),
            (
                self.backoff_base_ms >= 1,
                "backoff_base_ms must be at least 1",
            ),
            (
                self.backoff_max_ms >= self.backoff_base_ms,
                "backoff_max_ms must be >= backoff_base_ms",
            ),
            (
                self.deadline_ms >= 1 && self.deadline_ms <= 3_600_000,
                "deadline_ms must be within 1..=3600000",
            ),
            (
                self.attempt_timeout_ms >= 1,
                "attempt_timeout_ms must be at least 1",
            ),
            (
                self.wait_ms_max <= self.deadline_ms,
                "wait_ms_max must not exceed deadline_ms",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(format!("retry.{msg}")),
            None => Ok(()),
        }
    }

    /// The next step after attempt number `attempt` (1-based) was answered
    /// as `c`, with `remaining_ms` left before the deadline.
    pub fn next(
        &self,
        c: &Classification,
        attempt: u32,
        remaining_ms: u64,
        rng: &mut impl Rng,
    ) -> Next {
        let wait_ms = match c.decision {
            Decision::Success | Decision::GiveUp => {
                return Next::GiveUp {
                    retry_after_ms: c.wait_ms,
                };
            }
            Decision::Retry => {
                let hint = c.wait_ms.unwrap_or(0);
                if hint > self.wait_ms_max {
                    return Next::GiveUp {
                        retry_after_ms: Some(hint),
                    };
                }
                hint.saturating_add(rng.random_range(0..=self.hint_jitter_ms_max))
            }
            // An overloaded provider's hint is a floor under our own backoff.
            Decision::Backoff => {
                let floor = c.wait_ms.unwrap_or(0);
                if floor > self.wait_ms_max {
                    return Next::GiveUp {
                        retry_after_ms: Some(floor),
                    };
                }
                floor.saturating_add(rng.random_range(0..=self.backoff_ceiling_ms(attempt)))
            }
        };
        if attempt >= self.attempts_max {
            return Next::GiveUp {
                retry_after_ms: c.wait_ms,
            };
        }
        if wait_ms >= remaining_ms {
            // Waiting would overrun the deadline: answer now instead.
            return Next::GiveUp {
                retry_after_ms: Some(wait_ms),
            };
        }
        Next::Wait { wait_ms }
    }

    fn backoff_ceiling_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(32);
        self.backoff_base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn class(decision: Decision, wait_ms: Option<u64>) -> Classification {
        Classification {
            decision,
            wait_ms,
            reason: String::new(),
        }
    }

    #[test]
    fn hint_is_a_floor_and_jitter_is_bounded() {
        let p = RetryPolicy::default();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            match p.next(&class(Decision::Retry, Some(2_000)), 1, 100_000, &mut rng) {
                Next::Wait { wait_ms } => {
                    assert!((2_000..=2_000 + p.hint_jitter_ms_max).contains(&wait_ms))
                }
                other => panic!("expected a wait, got {other:?}"),
            }
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling() {
        let p = RetryPolicy::default();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for attempt in 1..p.attempts_max {
            let ceiling = (p.backoff_base_ms << (attempt - 1)).min(p.backoff_max_ms);
            for _ in 0..100 {
                let Next::Wait { wait_ms } =
                    p.next(&class(Decision::Backoff, None), attempt, u64::MAX, &mut rng)
                else {
                    panic!("expected a wait");
                };
                assert!(
                    wait_ms <= ceiling,
                    "attempt {attempt}: {wait_ms} > {ceiling}"
                );
            }
        }
    }

    #[test]
    fn an_overload_hint_is_a_floor_under_backoff() {
        let p = RetryPolicy::default();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for attempt in 1..p.attempts_max {
            let Next::Wait { wait_ms } = p.next(
                &class(Decision::Backoff, Some(4_000)),
                attempt,
                u64::MAX,
                &mut rng,
            ) else {
                panic!("expected a wait");
            };
            assert!(
                wait_ms >= 4_000,
                "attempt {attempt}: {wait_ms} is below the server's floor"
            );
        }
    }

    #[test]
    fn gives_up_on_attempts_deadline_and_long_hints() {
        let p = RetryPolicy::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let backoff = class(Decision::Backoff, None);
        assert!(matches!(
            p.next(&backoff, p.attempts_max, u64::MAX, &mut rng),
            Next::GiveUp { .. }
        ));
        let hinted = class(Decision::Retry, Some(5_000));
        match p.next(&hinted, 1, 1_000, &mut rng) {
            Next::GiveUp {
                retry_after_ms: Some(w),
            } => assert!(w >= 5_000, "client told to come back too early: {w}"),
            other => panic!("a wait past the deadline must give up, got {other:?}"),
        }
        let long = class(Decision::Retry, Some(p.wait_ms_max + 1));
        assert_eq!(
            p.next(&long, 1, u64::MAX, &mut rng),
            Next::GiveUp {
                retry_after_ms: Some(p.wait_ms_max + 1)
            }
        );
        assert!(
            RetryPolicy {
                attempts_max: 0,
                ..RetryPolicy::default()
            }
            .validate()
            .unwrap_err()
            .contains("attempts_max")
        );
    }
}
