//! `/api/users`, `/api/permissions` and `/api/whoami`: the broker's users
//! and their per-vhost permissions, shaped like RabbitMQ's management API.
//! Everything but `whoami` is for administrators. Passwords and their
//! hashes never appear in a response.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{Change, PermissionInfo, Permissions, UserInfo, UserTag};

use super::ApiResult;
use crate::auth::Principal;
use crate::convert;
use crate::error::ApiError;
use crate::server::AppState;

fn user_json(u: &UserInfo) -> Value {
    let tags: Vec<&str> = u.tags.iter().map(|t| t.as_str()).collect();
    json!({ "name": u.name.as_str(), "tags": tags, "has_password": u.has_password })
}

fn permission_json(p: &PermissionInfo) -> Value {
    json!({
        "user": p.user.as_str(),
        "vhost": p.vhost.as_str(),
        "configure": p.permissions.configure.as_str(),
        "write": p.permissions.write.as_str(),
        "read": p.permissions.read.as_str(),
    })
}

fn created(change: Change) -> StatusCode {
    match change {
        Change::Created => StatusCode::CREATED,
        Change::Updated => StatusCode::NO_CONTENT,
    }
}

/// Who the request is authenticated as.
pub(crate) async fn whoami(Extension(me): Extension<Principal>) -> Json<Value> {
    let tags: Vec<&str> = me.tags.iter().map(|t| t.as_str()).collect();
    Json(json!({ "name": me.user, "tags": tags }))
}

/// Every user.
pub(crate) async fn list_users(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    me.require_administrator("list users")?;
    let users: Vec<Value> = state.broker().users().iter().map(user_json).collect();
    Ok(Json(Value::Array(users)))
}

/// One user.
pub(crate) async fn get_user(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    me.require_administrator("read users")?;
    Ok(Json(user_json(&state.broker().user(&name)?)))
}

/// `tags` as RabbitMQ accepts it: a comma-separated string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Tags {
    List(Vec<String>),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    password: Option<String>,
    tags: Option<Tags>,
}

/// Creates or replaces a user: 201, or 204 if it existed. Without
/// `password`, an existing user keeps theirs and a new one cannot log in.
pub(crate) async fn put_user(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    me.require_administrator("create or change users")?;
    let body: UserBody = convert::body(&body)?;
    let tags = match body.tags {
        None => Vec::new(),
        Some(Tags::Text(list)) => UserTag::parse_list(&list)?,
        Some(Tags::List(list)) => UserTag::parse_list(&list.join(","))?,
    };
    let change = state
        .broker()
        .put_user(&name, body.password.as_deref(), tags)
        .await?;
    Ok(created(change))
}

/// Deletes a user and their permissions.
pub(crate) async fn delete_user(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    me.require_administrator("delete users")?;
    state.broker().delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every permissions entry.
pub(crate) async fn list_permissions(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    me.require_administrator("list permissions")?;
    let all: Vec<Value> = state
        .broker()
        .permissions()
        .iter()
        .map(permission_json)
        .collect();
    Ok(Json(Value::Array(all)))
}

/// One user's permissions in every vhost.
pub(crate) async fn user_permissions(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    me.require_administrator("list permissions")?;
    state.broker().user(&name)?;
    let all: Vec<Value> = state
        .broker()
        .permissions()
        .iter()
        .filter(|p| p.user.as_str() == name)
        .map(permission_json)
        .collect();
    Ok(Json(Value::Array(all)))
}

/// Every user's permissions in one vhost.
pub(crate) async fn vhost_permissions(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    me.require_administrator("list permissions")?;
    if !state.broker().vhosts().iter().any(|v| v.as_str() == vhost) {
        return Err(tern_broker::AccessError::VhostNotFound(vhost).into());
    }
    let all: Vec<Value> = state
        .broker()
        .permissions()
        .iter()
        .filter(|p| p.vhost.as_str() == vhost)
        .map(permission_json)
        .collect();
    Ok(Json(Value::Array(all)))
}

/// One user's permissions in one vhost.
pub(crate) async fn get_permission(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    me.require_administrator("read permissions")?;
    Ok(Json(permission_json(
        &state.broker().permission(&vhost, &user)?,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionBody {
    configure: String,
    write: String,
    read: String,
}

/// Sets a user's permissions in a vhost: 201, or 204 if they had some.
pub(crate) async fn put_permission(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    me.require_administrator("set permissions")?;
    let body: PermissionBody = convert::body(&body)?;
    let permissions = Permissions::new(&body.configure, &body.write, &body.read)?;
    let change = state
        .broker()
        .set_permissions(&vhost, &user, permissions)
        .await?;
    Ok(created(change))
}

/// Removes a user's permissions in a vhost.
pub(crate) async fn delete_permission(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    me.require_administrator("clear permissions")?;
    state.broker().clear_permissions(&vhost, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

impl From<tern_broker::AccessError> for ApiError {
    /// Unknown names are 404; invalid names, tags, patterns and passwords
    /// 400; refusals 403; only a storage failure is the server's (500).
    fn from(e: tern_broker::AccessError) -> ApiError {
        use tern_broker::AccessError as E;
        let reason = e.to_string();
        let (status, error) = match &e {
            E::UserNotFound(_) | E::VhostNotFound(_) | E::PermissionsNotFound { .. } => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            E::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            E::InvalidTag(_) => (StatusCode::BAD_REQUEST, "invalid_tag"),
            E::InvalidPattern { .. } => (StatusCode::BAD_REQUEST, "invalid_pattern"),
            E::InvalidPassword { .. } => (StatusCode::BAD_REQUEST, "invalid_password"),
            E::VhostRefused { .. } | E::Refused { .. } => (StatusCode::FORBIDDEN, "access_refused"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        ApiError::new(status, error, reason)
    }
}
