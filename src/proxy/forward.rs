//! One upstream attempt: the HTTP client, bounded body reads, and the
//! streaming passthrough body that owns its request's guard.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::events;
use crate::net::{ConnObserver, Connector, Transport};

/// The proxy's upstream HTTP client, over either network.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, Full<Bytes>>,
    /// `…/v1/chat/completions` on the configured upstream.
    completions: Uri,
    key: Option<String>,
}

/// Counts open upstream connections as events (for the `leak` check).
struct ConnEvents;

impl ConnObserver for ConnEvents {
    fn opened(&self, _host: &str) {
        events::upstream_conn(true);
    }
    fn closed(&self, _host: &str) {
        events::upstream_conn(false);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("could not reach the upstream: {0}")]
    Connect(String),
    #[error("the upstream's answer was larger than {0} bytes")]
    TooLarge(usize),
    #[error("the upstream's answer broke off: {0}")]
    Body(String),
    /// A success status with a body that is not what the route promises.
    #[error("{0}")]
    Garbage(String),
}

impl Upstream {
    /// `base` is the upstream's API root, e.g. `http://127.0.0.1:9000/v1`.
    pub fn new(
        transport: Transport,
        base: &str,
        key: Option<String>,
        idle_per_host_max: usize,
    ) -> anyhow::Result<Self> {
        let completions: Uri = format!("{}/chat/completions", base.trim_end_matches('/'))
            .parse()
            .map_err(|e| anyhow::anyhow!("upstream URL '{base}' is not a valid URL ({e}); give one like http://127.0.0.1:9000/v1"))?;
        if completions.scheme_str() != Some("http") {
            anyhow::bail!(
                "upstream URL '{base}' must start with http:// (TLS is left to a fronting proxy)"
            );
        }
        let connector = Connector::new(transport).with_observer(Arc::new(ConnEvents));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(idle_per_host_max)
            .build(connector);
        Ok(Self {
            client,
            completions,
            key,
        })
    }

    /// Sends one chat-completions request; resolves when the head arrives.
    pub async fn send(
        &self,
        body: Bytes,
        user_key: Option<&str>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let mut req = Request::post(self.completions.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream");
        if let Some(key) = user_key.or(self.key.as_deref()) {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ForwardError::Connect(e.to_string()))?;
        self.client
            .request(req)
            .await
            .map_err(|e| ForwardError::Connect(error_chain(&e)))
    }
}

/// Reads a whole body, at most `bytes_max` of it.
pub async fn read_body(body: Incoming, bytes_max: usize) -> Result<Bytes, ForwardError> {
    match Limited::new(body, bytes_max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ForwardError::TooLarge(bytes_max))
        }
        Err(e) => Err(ForwardError::Body(e.to_string())),
    }
}

/// What may end a stream early: an upstream that goes quiet for too long,
/// or the request's cancellation (logout, user disabled or deleted).
#[derive(Clone, Default)]
pub struct StreamWatch {
    pub idle: Option<std::time::Duration>,
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a passthrough stream ended for its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The upstream body ended: so does the client's.
    Complete,
    /// The upstream broke off or stalled, or the request was stopped: the
    /// client's stream ends with an error (hyper aborts the connection, so
    /// it never looks complete).
    Cut,
}

/// A streaming body that forwards `upstream` and keeps `owner` alive until
/// the stream ends or the client goes away (hyper drops the body then),
/// then runs `on_end` once with how it ended (not when the client left).
/// An upstream that breaks off, a stall or a stop per `watch` ends it with
/// an error (hyper then aborts the client connection); nothing is sent
/// again.
pub fn passthrough<B, G>(
    upstream: B,
    owner: G,
    watch: StreamWatch,
    on_end: impl FnOnce(&G, Ended) + Send + 'static,
) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    G: Send + 'static,
{
    struct State<B, G, F> {
        upstream: B,
        owner: G,
        watch: StreamWatch,
        on_end: Option<F>,
        failed: bool,
    }
    let state = State {
        upstream,
        owner,
        watch,
        on_end: Some(on_end),
        failed: false,
    };
    impl<B, G, F: FnOnce(&G, Ended)> State<B, G, F> {
        fn end(&mut self, how: Ended) {
            if let Some(f) = self.on_end.take() {
                f(&self.owner, how);
            }
        }
    }
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.failed {
            return None;
        }
        loop {
            let frame = tokio::select! {
                biased;
                _ = stopped(s.watch.stop.as_ref()) => Err::<_, BoxError>("request cancelled".into()),
                f = idle_bounded(s.watch.idle, s.upstream.frame()) => f,
            };
            match frame {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => return Some((Ok::<Bytes, BoxError>(data), s)),
                    Err(_trailers) => continue,
                },
                Ok(Some(Err(e))) => {
                    s.failed = true;
                    s.end(Ended::Cut);
                    return Some((Err(e.into()), s));
                }
                Err(e) => {
                    s.failed = true;
                    s.end(Ended::Cut);
                    return Some((Err(e), s));
                }
                Ok(None) => {
                    s.end(Ended::Complete);
                    return None;
                }
            }
        }
    });
    Body::from_stream(stream)
}

async fn stopped(token: Option<&tokio_util::sync::CancellationToken>) {
    match token {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn idle_bounded<T>(
    idle: Option<std::time::Duration>,
    f: impl std::future::Future<Output = T>,
) -> Result<T, BoxError> {
    match idle {
        Some(d) => tokio::time::timeout(d, f)
            .await
            .map_err(|_| "the upstream stream stalled".into()),
        None => Ok(f.await),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
