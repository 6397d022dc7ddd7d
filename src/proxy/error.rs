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
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Busy(String),
    #[error("{message}")]
    TooManyAttempts { message: String, retry_after_s: u64 },
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::TooLarge(_) => "invalid_request_error",
            ProxyError::Unauthorized | ProxyError::Forbidden(_) => "authentication_error",
            ProxyError::Busy(_) => "server_error",
            ProxyError::TooManyAttempts { .. } => "rate_limit_exceeded",
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.to_string(), "type": self.kind(), "param": null, "code": null}});
        let mut resp = (self.status(), Json(body)).into_response();
        match &self {
            ProxyError::TooManyAttempts { retry_after_s, .. } => {
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
