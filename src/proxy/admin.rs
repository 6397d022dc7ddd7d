//! The admin API and the CSRF token route.
//!
//! # Brief overview
//! - `GET /csrf-token`: the double-submit token of the caller's cookie
//!   session (401 without one: log in first).
//! - `GET /api/users/list`, `POST /api/users/create`, `/disable`,
//!   `/enable`, `/delete` (`{"handle": ...}`): admin cookie session; the
//!   POSTs need the `x-csrf-token` header.
//!
//! A change is made on a copy of the store, written to the users file (when
//! the proxy was started from one) with `UserStore::save_atomic`, and only
//! then swapped in: a failed write changes nothing. Disable and delete then
//! cancel the user's requests through `RequestTable::cancel_where`; they
//! never free request state themselves.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;

use super::input::{Body, check_csrf};
use super::users::{TOKEN_BYTES_MAX, User, UserStore, UsersError, hash_password, token_digest};
use super::{Principal, ProxyError, ProxyState, parse_json, principal_from_cookie, session};

/// Shortest bearer token an admin may set: 128 bits as hex.
pub const TOKEN_BYTES_MIN: usize = 32;
/// Longest per-user upstream key accepted.
pub const UPSTREAM_KEY_BYTES_MAX: usize = 1024;

/// The routes this module serves.
pub fn routes() -> Router<Arc<ProxyState>> {
    Router::new()
        .route("/csrf-token", get(csrf_token))
        .route("/api/users/list", get(list))
        .route("/api/users/create", post(create))
        .route("/api/users/disable", post(disable))
        .route("/api/users/enable", post(enable))
        .route("/api/users/delete", post(delete))
}

async fn csrf_token(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    let who = principal_from_cookie(&state, &headers)?;
    let token = session::csrf_token(&state.secret, who.session_id);
    Ok(Json(json!({"token": token})).into_response())
}

/// The caller, if they are an admin with a cookie session (and, for a
/// state-changing route, the matching CSRF token).
fn admin(state: &ProxyState, headers: &HeaderMap, csrf: bool) -> Result<Principal, ProxyError> {
    let who = principal_from_cookie(state, headers)?;
    if csrf {
        check_csrf(state, headers, &who)?;
    }
    let is_admin = state.users().get(&who.handle).is_some_and(|u| u.admin);
    if !is_admin {
        return Err(ProxyError::Forbidden(format!(
            "user '{}' is not an admin; ask an admin to do this",
            who.handle
        )));
    }
    Ok(who)
}

async fn list(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
) -> Result<Response, ProxyError> {
    admin(&state, &headers, false)?;
    let users: Vec<_> = state
        .users()
        .iter()
        .map(|u| {
            json!({"handle": u.handle, "name": u.name, "enabled": u.enabled, "admin": u.admin,
                "password": !u.password_hash.is_empty(), "token": u.token_sha256.is_some(),
                "upstream_key": u.upstream_key.is_some()})
        })
        .collect();
    Ok(Json(json!({"users": users})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    handle: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: Option<String>,
    /// A bearer token for `/v1`; only its SHA-256 is stored.
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    upstream_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandleBody {
    handle: String,
}

async fn create(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ProxyError> {
    let who = admin(&state, &headers, true)?;
    let req: CreateBody = parse_json(&body)?;
    let user = new_user(&state, req)?;
    let handle = user.handle.clone();
    update_users(&state, |store| store.create(user))?;
    tracing::info!(admin = %who.handle, user = %handle, "user created");
    Ok(Json(json!({"handle": handle, "created": true})).into_response())
}

/// Checks a create request and builds the record (hashing the password).
fn new_user(state: &ProxyState, req: CreateBody) -> Result<User, ProxyError> {
    super::users::validate_handle(&req.handle).map_err(bad)?;
    let mut user = User::new(req.handle);
    user.name = req.name;
    user.admin = req.admin;
    if let Some(token) = req.token {
        if !(TOKEN_BYTES_MIN..=TOKEN_BYTES_MAX).contains(&token.len()) {
            return Err(ProxyError::BadRequest(format!(
                "'token' must be {TOKEN_BYTES_MIN} to {TOKEN_BYTES_MAX} bytes; make one with `openssl rand -hex 24`"
            )));
        }
        user.token_sha256 = Some(token_digest(&token));
    }
    if let Some(key) = req.upstream_key {
        let printable = key.bytes().all(|b| b.is_ascii_graphic());
        if key.is_empty() || key.len() > UPSTREAM_KEY_BYTES_MAX || !printable {
            return Err(ProxyError::BadRequest(format!(
                "'upstream_key' must be 1 to {UPSTREAM_KEY_BYTES_MAX} printable ASCII characters without spaces; omit it to use the shared key"
            )));
        }
        user.upstream_key = Some(key);
    }
    if let Some(password) = req.password {
        let salt: [u8; 16] = state.with_rng(|r| r.random());
        user.password_hash = hash_password(&password, &salt, state.hash_cost).map_err(bad)?;
    }
    Ok(user)
}

async fn disable(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ProxyError> {
    set_enabled(&state, &headers, &body, false)
}

async fn enable(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ProxyError> {
    set_enabled(&state, &headers, &body, true)
}

fn set_enabled(
    state: &ProxyState,
    headers: &HeaderMap,
    body: &[u8],
    enabled: bool,
) -> Result<Response, ProxyError> {
    let who = admin(state, headers, true)?;
    let handle = target_handle(&who, body, !enabled)?;
    update_users(state, |store| store.set_enabled(&handle, enabled))?;
    // After the swap: a request admitted from now on sees the disabled user
    // (generate re-checks after admission), one admitted before is here.
    let cancelled = if enabled {
        0
    } else {
        state
            .table
            .cancel_where("user-disabled", |m| m.user == handle)
    };
    tracing::info!(admin = %who.handle, user = %handle, enabled, cancelled, "user updated");
    Ok(Json(json!({"handle": handle, "enabled": enabled, "cancelled": cancelled})).into_response())
}

async fn delete(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ProxyError> {
    let who = admin(&state, &headers, true)?;
    let handle = target_handle(&who, &body, true)?;
    update_users(&state, |store| store.delete(&handle).map(drop))?;
    let cancelled = state
        .table
        .cancel_where("user-deleted", |m| m.user == handle);
    tracing::info!(admin = %who.handle, user = %handle, cancelled, "user deleted");
    Ok(Json(json!({"handle": handle, "deleted": true, "cancelled": cancelled})).into_response())
}

/// The `{"handle"}` of a body, checked; an admin may not lock themselves out.
fn target_handle(who: &Principal, body: &[u8], locks_out: bool) -> Result<String, ProxyError> {
    let HandleBody { handle } = parse_json(body)?;
    super::users::validate_handle(&handle).map_err(bad)?;
    if locks_out && handle == who.handle {
        return Err(ProxyError::Conflict(
            "you cannot disable or delete your own account; ask another admin".into(),
        ));
    }
    Ok(handle)
}

/// Applies `change` to a copy of the store, saves the copy when the proxy
/// has a users file, then swaps it in. Admin changes are serialized, so
/// none is lost; requests keep reading the old store meanwhile.
fn update_users<R>(
    state: &ProxyState,
    change: impl FnOnce(&mut UserStore) -> Result<R, UsersError>,
) -> Result<R, ProxyError> {
    let _one_at_a_time = state.admin_lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut next = state.users().clone();
    let out = change(&mut next).map_err(users_error)?;
    if let Some(path) = &state.users_file {
        next.save_atomic(path).map_err(|e| {
            ProxyError::Internal(format!(
                "could not save the users file, so nothing was changed: {e}"
            ))
        })?;
    }
    *state.users.write().unwrap_or_else(|p| p.into_inner()) = next;
    Ok(out)
}

fn bad(e: UsersError) -> ProxyError {
    ProxyError::BadRequest(e.to_string())
}

fn users_error(e: UsersError) -> ProxyError {
    match e {
        UsersError::UnknownUser(_) => ProxyError::NotFound(e.to_string()),
        UsersError::DuplicateHandle(_)
        | UsersError::DuplicateToken { .. }
        | UsersError::TooManyUsers => ProxyError::Conflict(e.to_string()),
        _ => bad(e),
    }
}
