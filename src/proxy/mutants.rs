//! Mutants: deliberate defects of the fixed proxy, one small difference
//! each, so the harness can show it catches every defect its oracle claims
//! to see. For testing only; never the default (`Variant::Mutant`).
//!
//! # Brief overview
//! - [`Mutant`]: every mutant, documented by the reference race (see the
//!   project's notes on SillyTavern 1.12.6) or the invariant it breaks, and
//!   [`Mutant::target`], the oracle invariant that must kill it.
//! - The defects themselves live where the fixed code would have them
//!   (`fixed.rs`, each behind `Ctx::mutant`); this module holds the few
//!   pieces of machinery they need: a detached task that reports itself
//!   ([`spawn_detached`]), a late catch that writes into a released response
//!   ([`CatchOnAbort`]), a streaming call that pipes its head whoever
//!   listens ([`pipe_detached`]), reply boxes keyed by slot index
//!   ([`ReplyBoxes`]), and a stream sent again when it breaks off
//!   ([`Resend`]).
//!
//! Every invariant the oracle checks has at least one mutant here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use slotmap::Key;
use tokio::sync::oneshot;

use super::forward::{BoxError, ForwardError, Upstream};
use super::requests::RequestKey;
use crate::events;

/// A deliberate defect of the fixed proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutant {
    /// Race 1 (refresh while the retry timer is armed). The backoff wait is
    /// a detached timer whose handle is dropped; when it fires it re-reads
    /// its request from the table to wake the retry loop, even when the
    /// client left and the request was released meanwhile. Killed by
    /// `stale-access`.
    TimerNotCancelled,
    /// Race 2 (refresh while a retry's upstream call is in flight). The
    /// abort of the call in flight is caught on a later tick and the catch
    /// writes `{"error":true}` into the response, which by then was
    /// released. Killed by `write-after-release`.
    AbortWritesError,
    /// Race 3 (the client leaves between the 429 and the timer being
    /// armed). Only a backoff wait that is already armed listens for the
    /// request's cancellation: a cancellation (a logout) that lands while an
    /// attempt is in flight is not checked when the next timer is armed nor
    /// when it fires, and the retry goes on. Killed by
    /// `attempt-after-cancel`; needs tabs that log out.
    CancelMissedBeforeArm,
    /// Race 5 (a second terminal write after headers were sent). The
    /// streaming passthrough ends the response when the upstream body ends,
    /// and its close listener ends it again after the request was released.
    /// Killed by `double-terminal` (the second end also breaks
    /// `write-after-release`).
    DoubleEnd,
    /// Race 6 (streaming: the client is gone before the upstream answers).
    /// A streaming attempt runs detached and pipes the upstream's head into
    /// the response as soon as it arrives, whether or not the client is
    /// still there. Killed by `write-after-release`.
    StreamPipedAfterClose,
    /// Race 7 (the user logs out while a retry is pending). Instead of
    /// watching its request's cancellation, the retry re-resolves its user
    /// before each attempt; a logged-out user still resolves, so the retry
    /// goes on. Killed by `attempt-after-cancel`; needs tabs that log out.
    RetryReresolvesUser,
    /// A slot reused without a generation check. Upstream calls run
    /// detached and hand their answer to a reply box keyed by the slot index
    /// alone: the late answer of a released request goes to whichever
    /// request took its slot, another user's perhaps. Killed by
    /// `cross-user-delivery`.
    SlotReuseNoGeneration,
    /// A panic on a path: a 429 is assumed to carry `Retry-After`, and one
    /// without it panics the handler (the proxy host goes down). Killed by
    /// `proxy-crash`.
    PanicOnUnhinted429,
    /// The release guard is skipped on the error path: a request the proxy
    /// gives up on is answered but its slot is never released. Killed by
    /// `leak`.
    LeakOnErrorPath,
    /// The retry ignores `Retry-After` (and so never closes the shared
    /// gate): a hinted 429 is backed off from on the proxy's own schedule.
    /// Killed by `retry-after-violated`.
    IgnoresRetryAfter,
    /// The shared gate is kept per user instead of per upstream key: a
    /// hinted 429 holds back its own user only, and other users' requests
    /// reach the rate-limited key. Killed by `gate-violated`.
    GatePerUser,
    /// The per-user cap counts every user's requests, not the user's own:
    /// once one user fills the table to the cap, every other user is turned
    /// away. Killed by `starvation`.
    CapCountsAllUsers,
    /// A unit slip: the backoff wait, in milliseconds, is slept as seconds.
    /// A 500 ms backoff lasts 500 s, past the tab's request timeout, and
    /// no answer ever comes. Killed by `liveness`.
    BackoffInSeconds,
    /// The retry loop outlives its client: it runs in a task of its own
    /// that the handler only awaits, so when the client leaves and the
    /// handler is dropped the retries go on, as a popular Python proxy was
    /// measured to do (2 to 3 upstream attempts after the client left).
    /// Killed by `attempt-after-cancel`; the probe sees it from outside.
    RetryOutlivesClient,
    /// The retry budget is never charged (issue 6): the retry loop asks
    /// whether a retry is left but never takes it, so the floor and the
    /// ratio bound nothing and a failing upstream gets every retry the
    /// policy allows, from every request at once. Killed by
    /// `budget-exceeded`; needs a budget that binds (a low floor, most
    /// attempts failing).
    BudgetNeverCharged,
    /// Race 8 (two tabs of one user share a cookie). Cancellation is keyed
    /// by session instead of by request: when a client leaves, every
    /// request of its session is cancelled, so refreshing tab A also
    /// cancels the generation tab B is still waiting for. Killed by
    /// `wrong-cancel`; needs tabs that share a session.
    CancelBySession,
    /// A stream retried after bytes reached the client (issue 6). When the
    /// upstream's stream breaks off midway, the proxy sends the request
    /// upstream again and pipes the new stream on into the same client
    /// response, as if the first had never begun: the client gets the start
    /// of one completion followed by another whole one, under a 200 it
    /// already has. Killed by `retry-after-bytes`; needs an upstream that
    /// breaks streams (`p_stream_reset`).
    StreamRetriedAfterBytes,
}

impl Mutant {
    pub const ALL: [Mutant; 17] = [
        Mutant::TimerNotCancelled,
        Mutant::AbortWritesError,
        Mutant::CancelMissedBeforeArm,
        Mutant::DoubleEnd,
        Mutant::StreamPipedAfterClose,
        Mutant::RetryReresolvesUser,
        Mutant::SlotReuseNoGeneration,
        Mutant::PanicOnUnhinted429,
        Mutant::LeakOnErrorPath,
        Mutant::IgnoresRetryAfter,
        Mutant::GatePerUser,
        Mutant::CapCountsAllUsers,
        Mutant::BackoffInSeconds,
        Mutant::RetryOutlivesClient,
        Mutant::BudgetNeverCharged,
        Mutant::CancelBySession,
        Mutant::StreamRetriedAfterBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::TimerNotCancelled => "mutant-timer-not-cancelled",
            Mutant::AbortWritesError => "mutant-abort-writes-error",
            Mutant::CancelMissedBeforeArm => "mutant-cancel-missed-before-arm",
            Mutant::DoubleEnd => "mutant-double-end",
            Mutant::StreamPipedAfterClose => "mutant-stream-piped-after-close",
            Mutant::RetryReresolvesUser => "mutant-retry-reresolves-user",
            Mutant::SlotReuseNoGeneration => "mutant-slot-reuse-no-generation",
            Mutant::PanicOnUnhinted429 => "mutant-panic-on-unhinted-429",
            Mutant::LeakOnErrorPath => "mutant-leak-on-error-path",
            Mutant::IgnoresRetryAfter => "mutant-ignores-retry-after",
            Mutant::GatePerUser => "mutant-gate-per-user",
            Mutant::CapCountsAllUsers => "mutant-cap-counts-all-users",
            Mutant::BackoffInSeconds => "mutant-backoff-in-seconds",
            Mutant::RetryOutlivesClient => "mutant-retry-outlives-client",
            Mutant::BudgetNeverCharged => "mutant-budget-never-charged",
            Mutant::CancelBySession => "mutant-cancel-by-session",
            Mutant::StreamRetriedAfterBytes => "mutant-stream-retried-after-bytes",
        }
    }

    /// The oracle invariant that must kill this mutant.
    pub fn target(self) -> &'static str {
        match self {
            Mutant::TimerNotCancelled => "stale-access",
            Mutant::AbortWritesError | Mutant::StreamPipedAfterClose => "write-after-release",
            Mutant::DoubleEnd => "double-terminal",
            Mutant::CancelMissedBeforeArm
            | Mutant::RetryReresolvesUser
            | Mutant::RetryOutlivesClient => "attempt-after-cancel",
            Mutant::SlotReuseNoGeneration => "cross-user-delivery",
            Mutant::PanicOnUnhinted429 => "proxy-crash",
            Mutant::LeakOnErrorPath => "leak",
            Mutant::IgnoresRetryAfter => "retry-after-violated",
            Mutant::GatePerUser => "gate-violated",
            Mutant::CapCountsAllUsers => "starvation",
            Mutant::BackoffInSeconds => "liveness",
            Mutant::BudgetNeverCharged => "budget-exceeded",
            Mutant::CancelBySession => "wrong-cancel",
            Mutant::StreamRetriedAfterBytes => "retry-after-bytes",
        }
    }

    /// The race of the reference notes this mutant reproduces, if any.
    pub fn race(self) -> Option<u8> {
        match self {
            Mutant::TimerNotCancelled => Some(1),
            Mutant::AbortWritesError => Some(2),
            Mutant::CancelMissedBeforeArm => Some(3),
            Mutant::DoubleEnd => Some(5),
            Mutant::StreamPipedAfterClose => Some(6),
            Mutant::RetryReresolvesUser => Some(7),
            Mutant::CancelBySession => Some(8),
            _ => None,
        }
    }
}

pub use super::requests::spawn_detached;

/// The catch of an aborted upstream call ([`Mutant::AbortWritesError`]):
/// dropped while armed (the handler went away with the call in flight), it
/// writes an error to the client on a later tick, after the release.
pub struct CatchOnAbort(Option<RequestKey>);

impl CatchOnAbort {
    pub fn arm(key: RequestKey) -> Self {
        Self(Some(key))
    }

    /// The call ended normally: nothing to catch.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

/// `CancelBySession`: armed while a request is handled; dropped armed (the
/// client left), it cancels every request of the session.
pub struct SessionCancelOnDrop {
    table: Arc<super::requests::RequestTable>,
    session_id: u64,
    armed: bool,
}

impl SessionCancelOnDrop {
    pub fn arm(table: Arc<super::requests::RequestTable>, session_id: u64) -> Self {
        Self {
            table,
            session_id,
            armed: true,
        }
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for SessionCancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let sid = self.session_id;
            self.table
                .cancel_where("client-gone", |m| m.session_id == sid);
        }
    }
}

impl Drop for CatchOnAbort {
    fn drop(&mut self) {
        if let Some(key) = self.0.take() {
            spawn_detached(key, "abort_catch", async move {
                events::client_write(key.id(), "error");
            });
        }
    }
}

type Reply = Result<hyper::Response<Incoming>, ForwardError>;

/// What [`Mutant::StreamRetriedAfterBytes`] needs to send a streaming
/// request upstream again: the request, and attempts left under the policy.
pub struct Resend {
    pub upstream: Upstream,
    pub key: RequestKey,
    pub body: Bytes,
    pub user_key: Option<String>,
    /// The attempt whose stream is being piped.
    pub attempt: u32,
    /// Attempts the policy still allows.
    pub left: u32,
}

/// An upstream body that, when it breaks off, is replaced by the body of
/// the same request sent again, while attempts are left.
pub type ResendBody = StreamBody<BoxStream<'static, Result<Frame<Bytes>, BoxError>>>;

impl Resend {
    /// `first`, and whenever the stream piped breaks off, the stream of the
    /// request sent again (a 2xx), piped on into the same response.
    pub fn on_break(self, first: Incoming) -> ResendBody {
        let frames = futures::stream::unfold(Some((first, self)), |state| async move {
            let (mut body, mut r) = state?;
            loop {
                match body.frame().await {
                    None => return None,
                    Some(Ok(frame)) => return Some((Ok(frame), Some((body, r)))),
                    Some(Err(e)) if r.left == 0 => return Some((Err(e.into()), None)),
                    Some(Err(_broke_off)) => match r.again().await {
                        Ok(next) => body = next,
                        Err(e) => return Some((Err(e), None)),
                    },
                }
            }
        });
        StreamBody::new(frames.boxed())
    }

    async fn again(&mut self) -> Result<Incoming, BoxError> {
        self.left -= 1;
        self.attempt += 1;
        let id = self.key.id();
        events::attempt_start(id, self.attempt);
        let resp = self
            .upstream
            .send(self.body.clone(), self.user_key.as_deref())
            .await?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            events::attempt_end(id, self.attempt, status, "give-up", 0);
            return Err(format!("the upstream answered {status} to the stream sent again").into());
        }
        events::attempt_end(id, self.attempt, status, "success", 0);
        Ok(resp.into_body())
    }
}

/// Sends a streaming attempt detached ([`Mutant::StreamPipedAfterClose`]):
/// a 2xx head is piped to the client as soon as it arrives, whether or not
/// that client is still there, then handed to the handler if it waits.
pub async fn pipe_detached(
    upstream: &Upstream,
    key: RequestKey,
    body: Bytes,
    user_key: Option<String>,
) -> Reply {
    let (tx, rx) = oneshot::channel();
    let upstream = upstream.clone();
    spawn_detached(key, "stream_pipe", async move {
        let reply = upstream.send(body, user_key.as_deref()).await;
        if reply.as_ref().is_ok_and(|r| r.status().is_success()) {
            events::client_write(key.id(), "head");
        }
        let _ = tx.send(reply);
    });
    rx.await
        .unwrap_or_else(|_| Err(ForwardError::Connect("the pipe task ended".into())))
}

/// Reply boxes keyed by slot index, the generation dropped
/// ([`Mutant::SlotReuseNoGeneration`]).
#[derive(Clone, Default)]
pub struct ReplyBoxes(Arc<Mutex<BTreeMap<u32, oneshot::Sender<Reply>>>>);

/// The slot index of a key, without its generation.
fn slot_index(key: RequestKey) -> u32 {
    (key.data().as_ffi() & 0xffff_ffff) as u32
}

impl ReplyBoxes {
    /// Sends one attempt detached; its answer is handed to whoever waits in
    /// `key`'s slot when it arrives.
    pub async fn send(
        &self,
        upstream: &Upstream,
        key: RequestKey,
        body: Bytes,
        user_key: Option<String>,
    ) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(slot_index(key), tx);
        let (boxes, upstream) = (self.clone(), upstream.clone());
        spawn_detached(key, "upstream_call", async move {
            let reply = upstream.send(body, user_key.as_deref()).await;
            let waiting = boxes.lock().remove(&slot_index(key));
            if let Some(tx) = waiting {
                let _ = tx.send(reply);
            }
        });
        rx.await
            .unwrap_or_else(|_| Err(ForwardError::Connect("the reply box was taken".into())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, oneshot::Sender<Reply>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
