//! What the proxy takes from a request before any route logic: the body
//! (bounded in size and time, every failure a clear [`ProxyError`]), the
//! peer's address, and the CSRF check for cookie sessions.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::{Principal, ProxyError, ProxyState, session};
use crate::net::BodyTimeout;

/// Name of the CSRF header a cookie session must send on every
/// state-changing route.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A whole request body, at most `body_bytes_max` bytes, read within the
/// server's `body_read_timeout_ms`: 413 past the size, 408 past the time,
/// 400 when the client broke off.
pub struct Body(pub Bytes);

impl FromRequest<Arc<ProxyState>> for Body {
    type Rejection = ProxyError;

    async fn from_request(req: Request, state: &Arc<ProxyState>) -> Result<Self, ProxyError> {
        let limit = state.cfg.body_bytes_max;
        match axum::body::to_bytes(req.into_body(), limit).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(e) => Err(body_error(e.into_inner().as_ref(), limit)),
        }
    }
}

fn body_error(e: &(dyn std::error::Error + 'static), limit: usize) -> ProxyError {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return ProxyError::TooLarge(limit);
        }
        if let Some(t) = err.downcast_ref::<BodyTimeout>() {
            return ProxyError::Timeout(t.to_string());
        }
        cur = err.source();
    }
    ProxyError::BadRequest(format!(
        "the request body broke off before its end ({e}); send it again"
    ))
}

/// The client's IP address, when the server recorded it (`net::serve`
/// does; a router driven directly by a test may not).
pub struct PeerIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// Double-submit check for a cookie session: the `x-csrf-token` header must
/// be the token `GET /csrf-token` hands out for this session.
pub fn check_csrf(
    state: &ProxyState,
    headers: &HeaderMap,
    who: &Principal,
) -> Result<(), ProxyError> {
    let Some(value) = headers.get(CSRF_HEADER) else {
        return Err(ProxyError::Forbidden(format!(
            "missing {CSRF_HEADER} header: GET /csrf-token with your session cookie and send its token in the {CSRF_HEADER} header"
        )));
    };
    let presented = value.to_str().unwrap_or("");
    if session::verify_csrf(&state.secret, who.session_id, presented) {
        Ok(())
    } else {
        Err(ProxyError::Forbidden(format!(
            "the {CSRF_HEADER} header does not match this session (tokens change at every login): GET /csrf-token again and resend"
        )))
    }
}

/// Whether a request says its body is JSON (`application/json`, any
/// parameters). Login demands it: a cross-site HTML form cannot send it
/// without a CORS preflight, which the proxy never grants.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}
