//! Fairness between users: a per-user cap on requests in flight (checked at
//! admission) and a global limit on concurrent upstream attempts whose
//! waiters are served round-robin across users, so one user's storm of
//! requests and retries cannot starve another user.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FairnessConfig {
    /// Requests one user may have in flight; more are answered 429 at once.
    pub user_requests_max: usize,
    /// Upstream attempts in flight over all users.
    pub upstream_concurrency_max: usize,
    /// Serve waiters round-robin by user (false: first come, first served,
    /// which lets one user's burst delay everyone; for comparison only).
    pub round_robin: bool,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self {
            user_requests_max: 32,
            upstream_concurrency_max: 64,
            round_robin: true,
        }
    }
}

impl FairnessConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.user_requests_max == 0 || self.upstream_concurrency_max == 0 {
            return Err("fairness.user_requests_max and fairness.upstream_concurrency_max must be at least 1".into());
        }
        Ok(())
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<()>,
}

struct Inner {
    free: usize,
    queues: BTreeMap<String, VecDeque<Waiter>>,
    /// The user served last; the next grant goes to the next user after it.
    last: Option<String>,
    next_id: u64,
    round_robin: bool,
}

/// The global upstream concurrency limit, served round-robin by user.
pub struct FairLimiter {
    inner: Mutex<Inner>,
}

/// One upstream attempt's place; dropping it hands the place on.
pub struct Permit {
    limiter: Arc<FairLimiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

impl FairLimiter {
    pub fn new(permits: usize) -> Arc<Self> {
        Self::with_order(permits, true)
    }

    /// `round_robin: false` serves waiters in arrival order.
    pub fn with_order(permits: usize, round_robin: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                free: permits,
                queues: BTreeMap::new(),
                last: None,
                next_id: 0,
                round_robin,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a place for `user`. Cancel-safe: dropping the future gives
    /// back a place it may have been granted.
    pub async fn acquire(self: &Arc<Self>, user: &str) -> Permit {
        let rx = {
            let mut inner = self.lock();
            let queued = inner.queues.values().any(|q| !q.is_empty());
            if inner.free > 0 && !queued {
                inner.free -= 1;
                return Permit {
                    limiter: Arc::clone(self),
                };
            }
            let (tx, rx) = oneshot::channel();
            let id = inner.next_id;
            inner.next_id += 1;
            inner
                .queues
                .entry(user.to_string())
                .or_default()
                .push_back(Waiter { id, tx });
            Wait {
                limiter: Arc::clone(self),
                user: user.to_string(),
                id,
                rx: Some(rx),
            }
        };
        rx.granted().await;
        Permit {
            limiter: Arc::clone(self),
        }
    }

    /// Gives a place back: to the next waiting user after the last one
    /// served, else to the pool.
    fn release(&self) {
        let mut inner = self.lock();
        loop {
            let Some(user) = next_user(&inner) else {
                inner.free += 1;
                return;
            };
            let queue = inner
                .queues
                .get_mut(&user)
                .expect("next_user names a queued user");
            let waiter = queue
                .pop_front()
                .expect("next_user names a non-empty queue");
            if queue.is_empty() {
                inner.queues.remove(&user);
            }
            inner.last = Some(user);
            if waiter.tx.send(()).is_ok() {
                return;
            }
            // That waiter is gone; offer the place to the next one.
        }
    }

    /// Users waiting now (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.lock().queues.values().map(VecDeque::len).sum()
    }
}

/// The first user with waiters after `last` in handle order, wrapping
/// (or, without round-robin, the user of the oldest waiter).
fn next_user(inner: &Inner) -> Option<String> {
    if !inner.round_robin {
        return inner
            .queues
            .iter()
            .filter_map(|(u, q)| q.front().map(|w| (w.id, u)))
            .min()
            .map(|(_, u)| u.clone());
    }
    let after = match &inner.last {
        Some(last) => inner
            .queues
            .range::<String, _>((Bound::Excluded(last), Bound::Unbounded))
            .next(),
        None => None,
    };
    after
        .or_else(|| inner.queues.iter().next())
        .map(|(u, _)| u.clone())
}

/// A queued acquire; on drop it leaves the queue, or passes on a place it
/// was granted but never took.
struct Wait {
    limiter: Arc<FairLimiter>,
    user: String,
    id: u64,
    rx: Option<oneshot::Receiver<()>>,
}

impl Wait {
    async fn granted(mut self) {
        if let Some(rx) = self.rx.as_mut() {
            // The sender lives in the queue until it grants; it is never
            // dropped unsent while this waiter is queued.
            let _ = rx.await;
        }
        self.rx = None;
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut inner = self.limiter.lock();
        if let Some(q) = inner.queues.get_mut(&self.user) {
            q.retain(|w| w.id != self.id);
            if q.is_empty() {
                inner.queues.remove(&self.user);
            }
        }
        drop(inner);
        if rx.try_recv().is_ok() {
            self.limiter.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds the only place while `users` queue in this order, then lets
    /// go: the order in which they were served.
    async fn served_order(limiter: Arc<FairLimiter>, users: &[&'static str]) -> Vec<&'static str> {
        let held = limiter.acquire("holder").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &user in users {
            let (l, o) = (Arc::clone(&limiter), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _p = l.acquire(user).await;
                o.lock().unwrap().push(user);
                tokio::task::yield_now().await;
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        order.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn places_go_round_robin_across_users() {
        // User a floods with five waiters before b and c ask once each.
        let order = served_order(FairLimiter::new(1), &["a", "a", "a", "a", "a", "b", "c"]).await;
        let pos = |u| order.iter().position(|x| *x == u).unwrap();
        assert!(
            pos("b") <= 2 && pos("c") <= 2,
            "b and c must not wait behind a's flood: {order:?}"
        );
    }

    #[tokio::test]
    async fn without_round_robin_a_flood_is_served_first() {
        // The comparison the round-robin test relies on: in arrival order,
        // b and c wait behind every one of a's requests.
        let order = served_order(
            FairLimiter::with_order(1, false),
            &["a", "a", "a", "b", "c"],
        )
        .await;
        assert_eq!(order, ["a", "a", "a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_dropped_waiter_gives_its_place_on() {
        let limiter = FairLimiter::new(1);
        let held = limiter.acquire("a").await;
        let mut waiting = Box::pin(limiter.acquire("b"));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(waiting);
        assert_eq!(limiter.waiting(), 0);
        drop(held);
        // The place is back in the pool: the next acquire is immediate.
        let p =
            tokio::time::timeout(std::time::Duration::from_millis(100), limiter.acquire("c")).await;
        assert!(p.is_ok());
    }

    #[tokio::test]
    async fn concurrency_is_bounded() {
        let limiter = FairLimiter::new(2);
        let _a = limiter.acquire("a").await;
        let _b = limiter.acquire("b").await;
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(50), limiter.acquire("c")).await;
        assert!(
            third.is_err(),
            "a third place was granted with a limit of 2"
        );
    }
}
