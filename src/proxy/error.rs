//! The proxy's one error type. Every variant answers with an OpenAI-shaped
//! JSON body and never leaks internals to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "not signed in: log in at POST /api/users/login, or send Authorization: Bearer <token>"
    )]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "request body is larger than {0} bytes (body_bytes_max); send a smaller body, or raise the limit in the proxy's config"
    )]
    TooLarge(usize),
    #[error("{0}")]
    Busy(String),
    #[error("{message}")]
    TooManyAttempts { message: String, retry_after_s: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The client did not send its whole body in time.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Too many login attempts from one address.
    #[error(
        "too many login attempts from your address; wait {retry_after_s} s (see Retry-After) and try again"
    )]
    LoginThrottled { retry_after_s: u64 },
    /// The proxy could not do what it should have (e.g. save the users
    /// file); the message says what was and was not done.
    #[error("{0}")]
    Internal(String),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooManyAttempts { .. } | ProxyError::LoginThrottled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::Conflict(_) => StatusCode::CONFLICT,
            ProxyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::TooLarge(_)
            | ProxyError::NotFound(_)
            | ProxyError::Conflict(_)
            | ProxyError::Timeout(_)
            | ProxyError::UnsupportedMediaType(_) => "invalid_request_error",
            ProxyError::Unauthorized | ProxyError::Forbidden(_) => "authentication_error",
            ProxyError::Busy(_) | ProxyError::Internal(_) => "server_error",
            ProxyError::TooManyAttempts { .. } | ProxyError::LoginThrottled { .. } => {
                "rate_limit_exceeded"
            }
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.to_string(), "type": self.kind(), "param": null, "code": null}});
        let mut resp = (self.status(), Json(body)).into_response();
        match &self {
            ProxyError::TooManyAttempts { retry_after_s, .. }
            | ProxyError::LoginThrottled { retry_after_s } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ProxyError::Busy(_) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        resp
    }
}
