//! `/api/queues`: list (paginated and filtered), get, declare (`PUT`),
//! delete and purge queues.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{QueueDeclare, QueueInfo};

use super::{flag, listing, ApiResult};
use crate::convert::{self, field_table_json};
use crate::error::ApiError;
use crate::scope::Scope;
use crate::server::AppState;

fn queue_json(state: &AppState, vhost: &str, q: &QueueInfo) -> Value {
    let mut v = json!({
        "name": q.name.as_str(),
        "vhost": vhost,
        "type": q.queue_type.as_str(),
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive,
        "arguments": field_table_json(&q.arguments),
        "messages": q.ready + q.unacked,
        "messages_ready": q.ready,
        "messages_unacknowledged": q.unacked,
        "consumers": q.consumers,
    });
    if let Some(stats) = state.rates().queue_stats(vhost, q.name.as_str()) {
        v["message_stats"] = stats;
    }
    v
}

fn vhost_queues(state: &AppState, vhost: &str) -> ApiResult<Vec<Value>> {
    Ok(state
        .broker()
        .queues(vhost)?
        .iter()
        .map(|q| queue_json(state, vhost, q))
        .collect())
}

/// Every queue of every vhost the caller sees (`name`, `page`, `page_size` apply).
pub(crate) async fn list_all_queues(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let mut items = Vec::new();
    for vhost in scope.vhosts(state.broker()) {
        // A vhost deleted since it was listed has no queues to show.
        items.extend(vhost_queues(&state, vhost.as_str()).unwrap_or_default());
    }
    Ok(Json(listing(items, &query)?))
}

/// Every queue of a vhost.
pub(crate) async fn list_queues(
    State(state): State<AppState>,
    Path(vhost): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Ok(Json(listing(vhost_queues(&state, &vhost)?, &query)?))
}

/// One queue.
pub(crate) async fn get_queue(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let info = state.broker().queue_info(&vhost, &name)?;
    Ok(Json(queue_json(&state, &vhost, &info)))
}

fn yes() -> bool {
    true
}

/// The body of `PUT /api/queues/{vhost}/{name}`.
#[derive(Debug, Deserialize)]
struct DeclareBody {
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    exclusive: bool,
    #[serde(default)]
    arguments: Option<Value>,
}

/// Declares a queue: 201 if created, 204 if an equivalent one existed,
/// 409 if one with other properties (or another connection's exclusive
/// queue) exists.
pub(crate) async fn put_queue(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let body: DeclareBody = convert::body(&body)?;
    if body.exclusive {
        return Err(ApiError::bad_request(
            "exclusive queues belong to the connection that declares them; declare them over AMQP",
        ));
    }
    let arguments = convert::optional_table("arguments", body.arguments.as_ref())?;
    let existed = state.broker().queue_info(&vhost, &name).is_ok();
    let mut declare = QueueDeclare::new(name);
    declare.durable = body.durable;
    declare.auto_delete = body.auto_delete;
    declare.arguments = arguments;
    state
        .broker()
        .declare_queue(&vhost, declare, state.connection())
        .await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

/// Deletes a queue; `if-unused=true` refuses while it has consumers and
/// `if-empty=true` while it holds messages (409).
pub(crate) async fn delete_queue(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let if_unused = flag(&query, "if-unused")?;
    let if_empty = flag(&query, "if-empty")?;
    state
        .broker()
        .delete_queue(&vhost, &name, if_unused, if_empty, state.connection())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes every ready message from a queue.
pub(crate) async fn purge_queue(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state
        .broker()
        .purge_queue(&vhost, &name, state.connection())?;
    Ok(StatusCode::NO_CONTENT)
}
