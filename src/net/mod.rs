//! Transport seam: the same servers and clients over `tokio::net` (real
//! sockets) or `turmoil::net` (the simulated network).
//!
//! # Brief overview
//! - [`Transport`] picks the network.
//! - [`Listener`] and [`Stream`] wrap either kind of socket; [`serve`] runs
//!   an axum `Router` on a listener with hyper's HTTP/1 server.
//! - [`Connector`] is a hyper-util connector, so the proxy's upstream client
//!   connects over either network.
//!
//! Architecture Invariant: nothing outside this module names `turmoil::net`
//! or `tokio::net`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Which network the sockets live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Real sockets (`tavernsim serve`, `probe`, `bench`).
    Tokio,
    /// The simulated network of a turmoil world.
    Turmoil,
}

/// A bound listener on either network.
pub enum Listener {
    Tokio(tokio::net::TcpListener),
    Turmoil(turmoil::net::TcpListener),
}

impl Listener {
    pub async fn bind(transport: Transport, addr: SocketAddr) -> io::Result<Self> {
        match transport {
            Transport::Tokio => Ok(Self::Tokio(tokio::net::TcpListener::bind(addr).await?)),
            Transport::Turmoil => Ok(Self::Turmoil(turmoil::net::TcpListener::bind(addr).await?)),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tokio(l) => l.local_addr(),
            Self::Turmoil(l) => l.local_addr(),
        }
    }

    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Self::Tokio(l) => {
                let (s, a) = l.accept().await?;
                // Small JSON exchanges: Nagle only adds latency.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tokio(s), a))
            }
            Self::Turmoil(l) => {
                let (s, a) = l.accept().await?;
                Ok((Stream::Turmoil(s), a))
            }
        }
    }
}

/// A connected byte stream on either network.
pub enum Stream {
    Tokio(tokio::net::TcpStream),
    Turmoil(turmoil::net::TcpStream),
}

impl Stream {
    /// Connects to `host:port`; in the simulation `host` is a turmoil host name.
    pub async fn connect(transport: Transport, host: &str, port: u16) -> io::Result<Self> {
        match transport {
            Transport::Tokio => {
                let s = tokio::net::TcpStream::connect((host, port)).await?;
                let _ = s.set_nodelay(true);
                Ok(Self::Tokio(s))
            }
            Transport::Turmoil => Ok(Self::Turmoil(
                turmoil::net::TcpStream::connect((host, port)).await?,
            )),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tokio(s) => Pin::new(s).poll_read(cx, buf),
            Self::Turmoil(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tokio(s) => Pin::new(s).poll_write(cx, b),
            Self::Turmoil(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tokio(s) => Pin::new(s).poll_flush(cx),
            Self::Turmoil(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tokio(s) => Pin::new(s).poll_shutdown(cx),
            Self::Turmoil(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Bounds on what one HTTP/1 connection may cost the server (`[limits]` in
/// a serve config).
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeLimits {
    /// A client that has not sent a whole request head by then is dropped.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line and headers) accepted; hyper
    /// answers 431 past it. Values below 8192 count as 8192 (hyper's floor).
    pub header_bytes_max: usize,
    /// Most header lines in one request head; hyper answers 431 past it.
    pub headers_max: usize,
    /// A request body not complete this long after its head arrived fails
    /// with [`BodyTimeout`] (the proxy answers 408).
    pub body_read_timeout_ms: u64,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            header_bytes_max: 64 * 1024,
            headers_max: 100,
            body_read_timeout_ms: 30_000,
        }
    }
}

impl ServeLimits {
    /// Checks the values; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (
                (1..=3_600_000).contains(&self.header_read_timeout_ms),
                "limits.header_read_timeout_ms must be within 1..=3600000",
            ),
            (
                (1..=16 * 1024 * 1024).contains(&self.header_bytes_max),
                "limits.header_bytes_max must be within 1..=16777216",
            ),
            (
                (1..=10_000).contains(&self.headers_max),
                "limits.headers_max must be within 1..=10000",
            ),
            (
                (1..=3_600_000).contains(&self.body_read_timeout_ms),
                "limits.body_read_timeout_ms must be within 1..=3600000",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err((*msg).to_string()),
            None => Ok(()),
        }
    }
}

/// A request body did not arrive within `body_read_timeout_ms`.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error(
    "the request body did not arrive within {0} ms (body_read_timeout_ms); send the whole body at once"
)]
pub struct BodyTimeout(pub u64);

/// A request body that fails with [`BodyTimeout`] once its deadline passes.
struct TimeoutBody {
    inner: hyper::body::Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout_ms: u64,
}

impl http_body::Body for TimeoutBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout_ms))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until the listener fails.
///
/// Each connection runs in its own task. When a client goes away, hyper
/// drops the request's handler future; the proxy's cancellation rides on
/// that drop. Every request carries the peer's address as axum's
/// `ConnectInfo<SocketAddr>` extension, and its body is bounded in time by
/// `limits.body_read_timeout_ms`.
pub async fn serve(listener: Listener, app: Router, limits: ServeLimits) -> io::Result<()> {
    serve_until(listener, app, limits, CancellationToken::new()).await
}

/// [`serve`] until `stop` is cancelled; then every connection is dropped
/// on its next poll, as a killed process drops them (the simulation's
/// proxy restarts: connections die in the order they are woken, which is
/// the order they were made, not the order tokio would drop its tasks).
pub async fn serve_until(
    listener: Listener,
    app: Router,
    limits: ServeLimits,
    stop: CancellationToken,
) -> io::Result<()> {
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            // Out of descriptors or a reset before accept: keep serving.
            Err(e) if is_transient_accept_error(&e) => continue,
            Err(e) => return Err(e),
        };
        let stop = stop.clone();
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| handle(app.clone(), req, peer, limits));
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
                .max_headers(limits.headers_max)
                .max_buf_size(limits.header_bytes_max.max(8192));
            // A connection error is the client's business, not the server's.
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                _ = builder.serve_connection(TokioIo::new(stream), service) => {}
            }
        });
    }
}

/// One request: bounds its head and body, records the peer, runs `app`.
async fn handle(
    app: Router,
    req: hyper::Request<hyper::body::Incoming>,
    peer: SocketAddr,
    limits: ServeLimits,
) -> Result<axum::response::Response, std::convert::Infallible> {
    if head_bytes(&req) > limits.header_bytes_max {
        return Ok(head_too_large(limits.header_bytes_max));
    }
    let timeout_ms = limits.body_read_timeout_ms;
    let mut req = req.map(|inner| {
        axum::body::Body::new(TimeoutBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(timeout_ms))),
            timeout_ms,
        })
    });
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    tower::ServiceExt::oneshot(app, req).await
}

/// Bytes of a request head as sent: request line and header lines.
/// hyper's own bound (`max_buf_size`) is per read buffer and lets a head of
/// up to about twice the limit through; this one is exact.
fn head_bytes<B>(req: &hyper::Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

fn head_too_large(limit: usize) -> axum::response::Response {
    let body = serde_json::json!({"error": {"message": format!(
        "request headers are larger than {limit} bytes (header_bytes_max); send fewer or shorter headers"
    ), "type": "invalid_request_error", "param": null, "code": null}});
    let mut resp = axum::response::Response::new(axum::body::Body::from(body.to_string()));
    *resp.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE: too many open files
}

/// A stream handed to hyper-util's client: hyper's IO traits plus
/// [`Connection`], and an optional hook run when the connection closes.
pub struct ClientIo {
    io: TokioIo<Stream>,
    on_close: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if let Some(f) = self.on_close.take() {
            f();
        }
    }
}

impl Connection for ClientIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Hooks a connector calls as connections open and close (the harness
/// counts open upstream connections through them).
pub trait ConnObserver: Send + Sync + 'static {
    fn opened(&self, host: &str);
    fn closed(&self, host: &str);
}

/// hyper-util connector over either network.
#[derive(Clone)]
pub struct Connector {
    transport: Transport,
    observer: Option<std::sync::Arc<dyn ConnObserver>>,
}

impl Connector {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            observer: None,
        }
    }

    pub fn with_observer(mut self, observer: std::sync::Arc<dyn ConnObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

impl tower::Service<Uri> for Connector {
    type Response = ClientIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let transport = self.transport;
        let observer = self.observer.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "upstream URL has no host")
                })?
                .trim_matches(|c| c == '[' || c == ']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let stream = Stream::connect(transport, &host, port).await?;
            let on_close: Option<Box<dyn FnOnce() + Send + Sync>> = observer.map(|o| {
                o.opened(&host);
                Box::new(move || o.closed(&host)) as Box<dyn FnOnce() + Send + Sync>
            });
            Ok(ClientIo {
                io: TokioIo::new(stream),
                on_close,
            })
        })
    }
}
