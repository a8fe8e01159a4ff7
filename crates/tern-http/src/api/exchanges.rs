//! `/api/exchanges`: list (all, or one vhost's), get, declare (`PUT`) and
//! delete exchanges.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{ExchangeDeclare, ExchangeInfo, ExchangeKind};

use super::{exchange_from_path, flag, listing, ApiResult};
use crate::convert::{self, field_table_json};
use crate::error::ApiError;
use crate::scope::Scope;
use crate::server::AppState;

fn exchange_json(state: &AppState, vhost: &str, e: &ExchangeInfo) -> Value {
    let mut v = json!({
        "name": e.name.as_str(),
        "vhost": vhost,
        "type": e.type_name,
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": field_table_json(&e.arguments),
    });
    if let Some(stats) = state.rates().exchange_stats(vhost, e.name.as_str()) {
        v["message_stats"] = stats;
    }
    v
}

fn vhost_exchanges(state: &AppState, vhost: &str) -> ApiResult<Vec<Value>> {
    Ok(state
        .broker()
        .exchanges(vhost)?
        .iter()
        .map(|e| exchange_json(state, vhost, e))
        .collect())
}

/// Every exchange of every vhost the caller sees (`name`, `page`, `page_size` apply).
pub(crate) async fn list_all_exchanges(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let mut items = Vec::new();
    for vhost in scope.vhosts(state.broker()) {
        // A vhost deleted since it was listed has no exchanges to show.
        items.extend(vhost_exchanges(&state, vhost.as_str()).unwrap_or_default());
    }
    Ok(Json(listing(items, &query)?))
}

/// Every exchange of a vhost.
pub(crate) async fn list_exchanges(
    State(state): State<AppState>,
    Path(vhost): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Ok(Json(listing(vhost_exchanges(&state, &vhost)?, &query)?))
}

/// One exchange.
pub(crate) async fn get_exchange(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let info = state
        .broker()
        .exchange_info(&vhost, exchange_from_path(&name))?;
    Ok(Json(exchange_json(&state, &vhost, &info)))
}

fn yes() -> bool {
    true
}

/// The body of `PUT /api/exchanges/{vhost}/{name}`.
#[derive(Debug, Deserialize)]
struct DeclareBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: Option<Value>,
}

/// Declares an exchange: 201 if created, 204 if an equivalent one existed,
/// 409 if one with other properties exists.
pub(crate) async fn put_exchange(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let body: DeclareBody = convert::body(&body)?;
    if !tern_broker::is_exchange_type(&body.kind) {
        return Err(ApiError::bad_request(format!(
            "unknown exchange type '{}'; use direct, fanout, topic, headers, x-delayed-message, x-message-deduplication or x-super-stream",
            body.kind
        )));
    }
    // The routing kind is the broker's to derive from the type name (and
    // the arguments, for the plugin types).
    let kind = body.kind.parse().unwrap_or(ExchangeKind::Fanout);
    let arguments = convert::optional_table("arguments", body.arguments.as_ref())?;
    let existed = state.broker().exchange_info(&vhost, &name).is_ok();
    let mut declare = ExchangeDeclare::new(name, kind);
    declare.kind = body.kind;
    declare.durable = body.durable;
    declare.auto_delete = body.auto_delete;
    declare.internal = body.internal;
    declare.arguments = arguments;
    state.broker().declare_exchange(&vhost, declare).await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

/// Deletes an exchange; with `if-unused=true`, only if it has no bindings
/// (409 otherwise).
pub(crate) async fn delete_exchange(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let if_unused = flag(&query, "if-unused")?;
    state
        .broker()
        .delete_exchange(&vhost, &name, if_unused)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
