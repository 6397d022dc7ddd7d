//! A tracing-subscriber `Layer` that records the project's structured
//! events (target [`crate::events::TARGET`]) of one world, with simulated
//! time and the host that emitted each.
//!
//! A world runs on one thread with this layer installed as that thread's
//! default subscriber, so worlds running in parallel never mix events.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event as TEvent, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// One recorded event.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// Simulated time since the world started, in microseconds.
    pub t_us: u64,
    /// The host that emitted it ("" outside any host).
    pub host: String,
    pub kind: String,
    pub fields: BTreeMap<String, Value>,
}

impl Event {
    /// An event built by hand (for tests of what reads traces).
    pub fn new(t_us: u64, host: &str, kind: &str, fields: serde_json::Value) -> Self {
        let fields = match fields {
            Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        Self {
            t_us,
            host: host.into(),
            kind: kind.into(),
            fields,
        }
    }

    pub fn u64(&self, name: &str) -> u64 {
        self.fields.get(name).and_then(Value::as_u64).unwrap_or(0)
    }
    pub fn str(&self, name: &str) -> &str {
        self.fields.get(name).and_then(Value::as_str).unwrap_or("")
    }
    pub fn f64(&self, name: &str) -> f64 {
        self.fields.get(name).and_then(Value::as_f64).unwrap_or(0.0)
    }
    pub fn bool(&self, name: &str) -> bool {
        self.fields
            .get(name)
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
    pub fn t_ms(&self) -> f64 {
        self.t_us as f64 / 1000.0
    }
}

/// Live counts the world's driver reads to tell when it is quiescent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub requests: i64,
    pub tasks: i64,
    pub upstream_conns: i64,
    pub proxy_exit: bool,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    live: Live,
    /// Set when the world has ended: tearing a world down drops tasks in
    /// an order tokio does not promise, so nothing after the end counts.
    frozen: bool,
    /// Live requests' fingerprints, by table key.
    fp_of: BTreeMap<u64, String>,
    /// Events held back to be recorded in a canonical order.
    held: Option<Vec<Event>>,
}

/// Phase notes kept for a slow listener.
const PHASE_NOTES_CAPACITY: usize = 4096;

/// The events of one world, shared by the layer and the driver.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
    /// Events kept at the most; a world past it is cut short (see `overflowed`).
    events_max: usize,
    /// Outside a simulation (the probe): events are timed from this instant.
    real_start: Option<std::time::Instant>,
    /// Hears each request's phase as the proxy reports it (tabs aiming a
    /// refresh at a phase listen).
    phases: tokio::sync::broadcast::Sender<PhaseNote>,
}

/// A request entered a phase of the table (or left it: "after-release").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseNote {
    /// The fingerprint of the request's messages.
    pub fp: String,
    pub phase: &'static str,
}

impl Recorder {
    pub fn new(events_max: usize) -> Self {
        Self {
            inner: Arc::default(),
            events_max,
            real_start: None,
            phases: tokio::sync::broadcast::channel(PHASE_NOTES_CAPACITY).0,
        }
    }

    /// The channel on which every phase change is told, as it happens.
    pub fn phases(&self) -> tokio::sync::broadcast::Sender<PhaseNote> {
        self.phases.clone()
    }

    /// A recorder for real sockets: events are timed by the real clock from
    /// now (the probe; nothing here is deterministic).
    pub fn real_time(events_max: usize) -> Self {
        Self {
            real_start: Some(std::time::Instant::now()),
            ..Self::new(events_max)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn live(&self) -> Live {
        self.lock().live
    }

    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn overflowed(&self) -> bool {
        self.len() >= self.events_max
    }

    /// Stops recording: the world has ended.
    pub fn freeze(&self) {
        self.lock().frozen = true;
    }

    /// Records what `f` emits although the world is frozen (the driver's
    /// own verdict after the end).
    pub fn unfreeze_for(&self, f: impl FnOnce()) {
        self.lock().frozen = false;
        f();
        self.lock().frozen = true;
    }

    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().events)
    }

    /// Runs `f` (a host's teardown, which drops its tasks in an order
    /// tokio does not promise) and records what it emitted in a canonical
    /// order: by kind, then by fields.
    pub fn in_canonical_order(&self, f: impl FnOnce()) {
        self.lock().held = Some(Vec::new());
        f();
        let mut held = self.lock().held.take().unwrap_or_default();
        held.sort_by_cached_key(|e| {
            (
                e.kind.clone(),
                serde_json::to_string(&e.fields).unwrap_or_default(),
            )
        });
        for e in held {
            self.push(e);
        }
    }

    /// Records `e`; an event from outside any host (`t_us == u64::MAX`)
    /// takes the time of the event before it.
    fn push(&self, mut e: Event) {
        let mut inner = self.lock();
        if inner.frozen {
            return;
        }
        if let Some(held) = inner.held.as_mut() {
            held.push(e);
            return;
        }
        // The proxy process is gone once it exits: what its other tasks do
        // in the rest of that tick never happened.
        if inner.live.proxy_exit && e.host == "proxy" {
            return;
        }
        if e.t_us == u64::MAX {
            e.t_us = inner.events.last().map(|l| l.t_us).unwrap_or(0);
        }
        let note = super::coverage::phase_change(&mut inner.fp_of, &e);
        if let Some((fp, phase)) = note {
            // Nobody listening is fine.
            let _ = self.phases.send(PhaseNote { fp, phase });
        }
        let live = &mut inner.live;
        match e.kind.as_str() {
            "req.admit" => live.requests += 1,
            "req.release" => live.requests -= 1,
            "task.spawn" => live.tasks += 1,
            "task.end" => live.tasks -= 1,
            "upstream.conn" if e.bool("open") => live.upstream_conns += 1,
            "upstream.conn" => live.upstream_conns -= 1,
            "proxy.exit" => live.proxy_exit = true,
            _ => {}
        }
        if inner.events.len() < self.events_max {
            inner.events.push(e);
        }
    }
}

/// The layer: filters the project's events and records them.
pub struct TraceLayer {
    recorder: Recorder,
}

impl TraceLayer {
    pub fn new(recorder: Recorder) -> Self {
        Self { recorder }
    }
}

/// turmoil runs each host's tick inside a span named `node` with a `name`.
struct NodeName(String);

thread_local! {
    /// The host whose tick runs on this thread now (for panic reports).
    static CURRENT_NODE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The simulated host running on this thread now, if any.
pub fn current_node() -> Option<String> {
    CURRENT_NODE.with(|c| c.borrow().clone())
}

impl<S> tracing_subscriber::Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "node" {
            return;
        }
        let mut v = FieldMap::default();
        attrs.record(&mut v);
        if let (Some(span), Some(Value::String(name))) = (ctx.span(id), v.0.remove("name")) {
            span.extensions_mut().insert(NodeName(name));
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(name) = ctx
            .span(id)
            .and_then(|s| s.extensions().get::<NodeName>().map(|n| n.0.clone()))
        {
            CURRENT_NODE.with(|c| *c.borrow_mut() = Some(name));
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if ctx
            .span(id)
            .is_some_and(|s| s.extensions().get::<NodeName>().is_some())
        {
            CURRENT_NODE.with(|c| *c.borrow_mut() = None);
        }
    }

    fn on_event(&self, event: &TEvent<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != crate::events::TARGET {
            return;
        }
        let mut v = FieldMap::default();
        event.record(&mut v);
        let kind = match v.0.remove("kind") {
            Some(Value::String(k)) => k,
            _ => return,
        };
        let host = ctx
            .event_scope(event)
            .and_then(|scope| {
                scope
                    .from_root()
                    .find_map(|s| s.extensions().get::<NodeName>().map(|n| n.0.clone()))
            })
            .unwrap_or_default();
        let t_us = turmoil::sim_elapsed()
            .or_else(|| self.recorder.real_start.map(|s| s.elapsed()))
            .map(|d| d.as_micros() as u64);
        self.recorder.push(Event {
            t_us: t_us.unwrap_or(u64::MAX),
            host,
            kind,
            fields: v.0,
        });
    }
}

#[derive(Default)]
struct FieldMap(BTreeMap<String, Value>);

impl Visit for FieldMap {
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0
            .insert(f.name().into(), Value::from(format!("{v:?}")));
    }
}

/// The events as JSON lines.
pub fn to_json_lines(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
    }
    out
}

/// A stable hash of a trace: the first 16 hex digits of SHA-256 over its
/// JSON lines. Two runs of one seed must give the same hash.
pub fn trace_hash(events: &[Event]) -> String {
    let mut h = Sha256::new();
    for e in events {
        h.update(serde_json::to_vec(e).unwrap_or_default());
        h.update(b"\n");
    }
    let mut s = hex::encode(h.finalize());
    s.truncate(16);
    s
}
