//! The request table: every piece of per-request state lives here, keyed by
//! a generational key.
//!
//! # Brief overview
//! - [`RequestTable::admit`] puts a request in the table and hands back a
//!   [`RequestGuard`]; dropping the guard is the **only** way a slot is
//!   released.
//! - [`RequestTable::transition`] moves a request between [`Phase`]s with a
//!   compare-and-set on the expected phase.
//! - Any access with a released key fails with [`Stale`], is reported as a
//!   `req.stale` event, and touches nothing else: a stale key can never
//!   reach the slot's next occupant (slotmap bumps the generation).
//!
//! Architecture Invariant: only this module releases request state.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use slotmap::{Key, SlotMap, new_key_type};
use tokio_util::sync::CancellationToken;

use crate::events;

new_key_type! {
    /// Slot index plus generation.
    pub struct RequestKey;
}

impl RequestKey {
    /// The key as one number (index and generation), as events report it.
    pub fn id(self) -> u64 {
        self.data().as_ffi()
    }
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Admitted,
    GateWait,
    Sending { attempt: u32 },
    Backoff { attempt: u32 },
    Streaming,
    Finished,
}

/// Every phase's name, in the order of a request's life.
pub const PHASE_NAMES: [&str; 6] = [
    "admitted",
    "gate-wait",
    "sending",
    "backoff",
    "streaming",
    "finished",
];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Admitted => "admitted",
            Phase::GateWait => "gate-wait",
            Phase::Sending { .. } => "sending",
            Phase::Backoff { .. } => "backoff",
            Phase::Streaming => "streaming",
            Phase::Finished => "finished",
        }
    }
}

/// Who a request belongs to and what it asks for.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    pub user: String,
    pub session_id: u64,
    pub fingerprint: String,
    pub stream: bool,
}

/// One request's state.
#[derive(Debug)]
pub struct Entry {
    pub meta: RequestMeta,
    pub phase: Phase,
    pub cancel: CancellationToken,
}

/// The key was released: its state is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request state was already released")]
pub struct Stale;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("request state was already released")]
    Stale,
    #[error("request is in phase {found}, not {expected}")]
    Conflict {
        expected: &'static str,
        found: &'static str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the proxy has {0} requests in flight, its limit; try again shortly")]
pub struct TableFull(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Full(TableFull),
    #[error(
        "you already have {0} requests in flight, the most one user may have; wait for one to finish"
    )]
    UserCap(usize),
}

/// The table, shared by every handler of one proxy.
pub struct RequestTable {
    slots: Mutex<SlotMap<RequestKey, Entry>>,
    requests_max: usize,
}

impl RequestTable {
    pub fn new(requests_max: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Mutex::new(SlotMap::with_key()),
            requests_max,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotMap<RequestKey, Entry>> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request; the returned guard releases it when dropped.
    pub fn admit(self: &Arc<Self>, meta: RequestMeta) -> Result<RequestGuard, TableFull> {
        self.admit_capped(meta, usize::MAX).map_err(|e| match e {
            AdmitError::Full(f) => f,
            AdmitError::UserCap(_) => TableFull(self.requests_max),
        })
    }

    /// Admits a request unless the table is full or its user already has
    /// `user_requests_max` requests in it (checked under one lock).
    pub fn admit_capped(
        self: &Arc<Self>,
        meta: RequestMeta,
        user_requests_max: usize,
    ) -> Result<RequestGuard, AdmitError> {
        let mut slots = self.lock();
        if slots.len() >= self.requests_max {
            return Err(AdmitError::Full(TableFull(self.requests_max)));
        }
        if user_requests_max < usize::MAX
            && slots.values().filter(|e| e.meta.user == meta.user).count() >= user_requests_max
        {
            return Err(AdmitError::UserCap(user_requests_max));
        }
        let (user, session, fp, stream) = (
            meta.user.clone(),
            meta.session_id,
            meta.fingerprint.clone(),
            meta.stream,
        );
        let key = slots.insert(Entry {
            meta,
            phase: Phase::Admitted,
            cancel: CancellationToken::new(),
        });
        drop(slots);
        events::req_admit(key.id(), &user, session, &fp, stream);
        Ok(RequestGuard {
            table: Arc::clone(self),
            key,
        })
    }

    /// Reads a request's state; a released key reports `req.stale` under `op`.
    pub fn read<R>(
        &self,
        key: RequestKey,
        op: &str,
        f: impl FnOnce(&Entry) -> R,
    ) -> Result<R, Stale> {
        let slots = self.lock();
        match slots.get(key) {
            Some(entry) => Ok(f(entry)),
            None => {
                drop(slots);
                events::req_stale(key.id(), op);
                Err(Stale)
            }
        }
    }

    /// Moves `key` from a phase named `expected` to `to`.
    pub fn transition(
        &self,
        key: RequestKey,
        expected: &[&'static str],
        to: Phase,
    ) -> Result<(), TableError> {
        let mut slots = self.lock();
        let Some(entry) = slots.get_mut(key) else {
            drop(slots);
            events::req_stale(key.id(), "transition");
            return Err(TableError::Stale);
        };
        let found = entry.phase.name();
        if !expected.contains(&found) {
            drop(slots);
            let expected = expected.first().copied().unwrap_or("?");
            events::req_phase_conflict(key.id(), expected, found);
            return Err(TableError::Conflict { expected, found });
        }
        entry.phase = to;
        drop(slots);
        if found != to.name() {
            events::req_phase(key.id(), found, to.name());
        }
        Ok(())
    }

    /// The request's cancellation token.
    pub fn cancel_token(&self, key: RequestKey) -> Result<CancellationToken, Stale> {
        self.read(key, "cancel_token", |e| e.cancel.clone())
    }

    /// Cancels every request `pred` selects; never frees a slot.
    /// Returns how many were cancelled.
    pub fn cancel_where(&self, reason: &str, pred: impl Fn(&RequestMeta) -> bool) -> usize {
        let chosen: Vec<(RequestKey, CancellationToken)> = self
            .lock()
            .iter()
            .filter(|(_, e)| pred(&e.meta) && !e.cancel.is_cancelled())
            .map(|(k, e)| (k, e.cancel.clone()))
            .collect();
        for (key, token) in &chosen {
            events::req_cancel(key.id(), reason);
            token.cancel();
        }
        chosen.len()
    }

    /// Requests in the table now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests per phase name, in phase order (for metrics).
    pub fn phase_counts(&self) -> Vec<(&'static str, usize)> {
        let slots = self.lock();
        PHASE_NAMES
            .iter()
            .map(|n| (*n, slots.values().filter(|e| e.phase.name() == *n).count()))
            .collect()
    }

    fn release(&self, key: RequestKey) {
        let removed = self.lock().remove(key);
        match removed {
            Some(entry) => {
                // Anything still waiting on this request must stop now.
                entry.cancel.cancel();
                events::req_release(key.id());
            }
            // A guard is the only owner of its key, and drops once.
            None => events::req_stale(key.id(), "release"),
        }
    }
}

/// Runs `fut` as a task nothing will ever cancel, reported as
/// `task.spawn`/`task.end` for request `key` (so the oracle's leak check
/// and the measurements see it).
pub fn spawn_detached(
    key: RequestKey,
    what: &'static str,
    fut: impl Future<Output = ()> + Send + 'static,
) {
    struct TaskEnd(u64, &'static str);
    impl Drop for TaskEnd {
        fn drop(&mut self) {
            events::task_end(self.0, self.1);
        }
    }
    events::task_spawn(key.id(), what);
    let end = TaskEnd(key.id(), what);
    tokio::spawn(async move {
        let _end = end;
        fut.await;
    });
}

/// Owns one request's slot; dropping it releases the slot.
///
/// Held by the handler future (or by a streaming body), so a client
/// disconnect, a deadline, a panic or a normal end all release here.
pub struct RequestGuard {
    table: Arc<RequestTable>,
    key: RequestKey,
}

impl RequestGuard {
    pub fn key(&self) -> RequestKey {
        self.key
    }

    pub fn table(&self) -> &Arc<RequestTable> {
        &self.table
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.table.release(self.key);
    }
}

impl std::fmt::Debug for RequestGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestGuard({:#x})", self.key.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(user: &str) -> RequestMeta {
        RequestMeta {
            user: user.into(),
            session_id: 1,
            fingerprint: format!("fp-{user}"),
            stream: false,
        }
    }

    #[test]
    fn stale_key_never_reaches_next_occupant() {
        let table = RequestTable::new(8);
        let first = table.admit(meta("alice")).unwrap();
        let stale = first.key();
        drop(first);
        // The next request takes the same slot index with a new generation.
        let second = table.admit(meta("bob")).unwrap();
        assert_ne!(stale, second.key());
        assert_eq!(
            table.read(stale, "test", |e| e.meta.user.clone()),
            Err(Stale)
        );
        assert_eq!(
            table.transition(stale, &["admitted"], Phase::Sending { attempt: 1 }),
            Err(TableError::Stale)
        );
        assert!(table.cancel_token(stale).is_err());
        // bob's request is untouched by every stale access above.
        let (user, phase, cancelled) = table
            .read(second.key(), "test", |e| {
                (e.meta.user.clone(), e.phase, e.cancel.is_cancelled())
            })
            .unwrap();
        assert_eq!(
            (user.as_str(), phase, cancelled),
            ("bob", Phase::Admitted, false)
        );
    }

    #[test]
    fn release_happens_only_in_guard_drop_and_cancels() {
        let table = RequestTable::new(8);
        let guard = table.admit(meta("alice")).unwrap();
        let token = table.cancel_token(guard.key()).unwrap();
        assert_eq!(table.len(), 1);
        drop(guard);
        assert_eq!(table.len(), 0);
        assert!(
            token.is_cancelled(),
            "release must stop whatever still waits on the request"
        );
    }

    #[test]
    fn transition_is_compare_and_set() {
        let table = RequestTable::new(8);
        let g = table.admit(meta("alice")).unwrap();
        table
            .transition(g.key(), &["admitted"], Phase::Sending { attempt: 1 })
            .unwrap();
        let err = table
            .transition(g.key(), &["admitted"], Phase::Streaming)
            .unwrap_err();
        assert_eq!(
            err,
            TableError::Conflict {
                expected: "admitted",
                found: "sending"
            }
        );
        assert_eq!(
            table.read(g.key(), "t", |e| e.phase).unwrap(),
            Phase::Sending { attempt: 1 }
        );
    }

    #[test]
    fn cancel_where_selects_by_meta_and_keeps_slots() {
        let table = RequestTable::new(8);
        let a1 = table.admit(meta("alice")).unwrap();
        let b1 = table.admit(meta("bob")).unwrap();
        assert_eq!(table.cancel_where("logout", |m| m.user == "alice"), 1);
        assert!(table.cancel_token(a1.key()).unwrap().is_cancelled());
        assert!(!table.cancel_token(b1.key()).unwrap().is_cancelled());
        assert_eq!(table.len(), 2, "cancelling never frees a slot");
    }

    #[test]
    fn per_user_cap_is_enforced_at_admission() {
        let table = RequestTable::new(8);
        let _a1 = table.admit_capped(meta("alice"), 2).unwrap();
        let _a2 = table.admit_capped(meta("alice"), 2).unwrap();
        assert_eq!(
            table.admit_capped(meta("alice"), 2).unwrap_err(),
            AdmitError::UserCap(2)
        );
        assert!(
            table.admit_capped(meta("bob"), 2).is_ok(),
            "one user's cap never blocks another"
        );
    }

    #[test]
    fn table_is_bounded() {
        let table = RequestTable::new(2);
        let _a = table.admit(meta("a")).unwrap();
        let _b = table.admit(meta("b")).unwrap();
        assert_eq!(table.admit(meta("c")).unwrap_err(), TableFull(2));
    }
}
