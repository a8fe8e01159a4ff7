//! `/api/vhosts`: list, get, create (`PUT`) and delete virtual hosts; the
//! last two for administrators.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{json, Value};
use tern_broker::{BrokerError, VhostName};

use super::ApiResult;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::scope::Scope;
use crate::server::AppState;

fn vhost_json(state: &AppState, name: &str) -> Value {
    let (mut ready, mut unacked, mut queues) = (0u64, 0u64, 0usize);
    if let Ok(list) = state.broker().queues(name) {
        queues = list.len();
        for q in list {
            ready += q.ready;
            unacked += q.unacked;
        }
    }
    json!({
        "name": name,
        "queues": queues,
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
    })
}

/// Every vhost the caller sees.
pub(crate) async fn list_vhosts(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
) -> Json<Value> {
    let items: Vec<Value> = scope
        .vhosts(state.broker())
        .iter()
        .map(|v| vhost_json(&state, v.as_str()))
        .collect();
    Json(Value::Array(items))
}

/// One vhost.
pub(crate) async fn get_vhost(
    State(state): State<AppState>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    let name = VhostName::new(vhost).map_err(BrokerError::from)?;
    if !state.broker().vhosts().contains(&name) {
        return Err(BrokerError::VhostNotFound(name.to_string()).into());
    }
    Ok(Json(vhost_json(&state, name.as_str())))
}

/// Creates a vhost: 201, or 204 if it existed.
pub(crate) async fn put_vhost(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(vhost): Path<String>,
) -> ApiResult<StatusCode> {
    me.require_administrator("create vhosts")?;
    let name = VhostName::new(vhost).map_err(BrokerError::from)?;
    let existed = state.broker().vhosts().contains(&name);
    state.broker().add_vhost(name.as_str()).await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

/// Deletes a vhost with everything in it, permissions included.
pub(crate) async fn delete_vhost(
    State(state): State<AppState>,
    Extension(me): Extension<Principal>,
    Path(vhost): Path<String>,
) -> ApiResult<StatusCode> {
    me.require_administrator("delete vhosts")?;
    state
        .broker()
        .delete_vhost(&vhost)
        .await
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
