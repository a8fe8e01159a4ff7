//! `/api/bindings`: list bindings (all, a vhost's, or those between one
//! exchange and one queue or exchange), bind (`POST`) and unbind (`DELETE`
//! of one binding, named by its properties key).
//!
//! A binding's properties key names it in a path, as in RabbitMQ: its
//! routing key (`~` when that is empty) when it has no arguments, otherwise
//! the routing key, `~`, and a hash of the arguments. `GET` lists it as
//! `properties_key`, and `POST` answers with it in `Location`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{BindingInfo, Destination, FieldTable};

use super::{exchange_from_path, listing, ApiResult};
use crate::convert::{self, field_table_json};
use crate::error::ApiError;
use crate::scope::Scope;
use crate::server::AppState;

/// FNV-1a over the arguments' rendering: stable across runs and builds (the
/// table is ordered by key), unlike the standard library's hasher.
fn arguments_hash(arguments: &FieldTable) -> u32 {
    let text = format!("{arguments:?}");
    text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The properties key of a binding.
fn properties_key(routing_key: &str, arguments: &FieldTable) -> String {
    match (routing_key.is_empty(), arguments.is_empty()) {
        (true, true) => "~".to_string(),
        (false, true) => routing_key.to_string(),
        (_, false) => format!("{routing_key}~{:08x}", arguments_hash(arguments)),
    }
}

fn binding_json(vhost: &str, b: &BindingInfo) -> Value {
    let (destination, destination_type) = match &b.destination {
        Destination::Queue(q) => (q.as_str(), "queue"),
        Destination::Exchange(x) => (x.as_str(), "exchange"),
    };
    json!({
        "source": b.source.as_str(),
        "vhost": vhost,
        "destination": destination,
        "destination_type": destination_type,
        "routing_key": b.routing_key,
        "arguments": field_table_json(&b.arguments),
        "properties_key": properties_key(&b.routing_key, &b.arguments),
    })
}

/// Lists `name` as the source for name filtering.
fn with_name(mut v: Value) -> Value {
    if let Some(source) = v.get("source").cloned() {
        v["name"] = source;
    }
    v
}

fn vhost_bindings(state: &AppState, vhost: &str) -> ApiResult<Vec<Value>> {
    Ok(state
        .broker()
        .bindings(vhost)?
        .iter()
        .map(|b| binding_json(vhost, b))
        .collect())
}

/// Every binding of every vhost the caller sees.
pub(crate) async fn list_all_bindings(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let mut items = Vec::new();
    for vhost in scope.vhosts(state.broker()) {
        items.extend(vhost_bindings(&state, vhost.as_str()).unwrap_or_default());
    }
    Ok(Json(listing(
        items.into_iter().map(with_name).collect(),
        &query,
    )?))
}

/// Every binding of a vhost.
pub(crate) async fn list_bindings(
    State(state): State<AppState>,
    Path(vhost): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let items = vhost_bindings(&state, &vhost)?;
    Ok(Json(listing(
        items.into_iter().map(with_name).collect(),
        &query,
    )?))
}

/// The bindings of a vhost that `keep` selects, once `exists` has checked
/// (404) the entity they are listed for.
fn bindings_of(
    state: &AppState,
    vhost: &str,
    exists: impl FnOnce() -> ApiResult<()>,
    keep: impl Fn(&BindingInfo) -> bool,
) -> ApiResult<Json<Value>> {
    exists()?;
    Ok(Json(Value::Array(
        state
            .broker()
            .bindings(vhost)?
            .iter()
            .filter(|b| keep(b))
            .map(|b| binding_json(vhost, b))
            .collect(),
    )))
}

/// The bindings that route to a queue (the default exchange's implicit
/// one is not listed).
pub(crate) async fn queue_bindings(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let exists = || {
        state
            .broker()
            .queue_info(&vhost, &name)
            .map(|_| ())
            .map_err(ApiError::from)
    };
    bindings_of(
        &state,
        &vhost,
        exists,
        |b| matches!(&b.destination, Destination::Queue(q) if q.as_str() == name),
    )
}

/// The bindings an exchange routes by.
pub(crate) async fn exchange_source_bindings(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let name = exchange_from_path(&name);
    let exists = || {
        state
            .broker()
            .exchange_info(&vhost, name)
            .map(|_| ())
            .map_err(ApiError::from)
    };
    bindings_of(&state, &vhost, exists, |b| b.source.as_str() == name)
}

/// The exchange-to-exchange bindings that route to an exchange.
pub(crate) async fn exchange_destination_bindings(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let name = exchange_from_path(&name);
    let exists = || {
        state
            .broker()
            .exchange_info(&vhost, name)
            .map(|_| ())
            .map_err(ApiError::from)
    };
    bindings_of(
        &state,
        &vhost,
        exists,
        |b| matches!(&b.destination, Destination::Exchange(x) if x.as_str() == name),
    )
}

/// Which destination a binding path names.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Queue,
    Exchange,
}

/// The bindings from `source` to the destination, after checking that
/// both exist (404 otherwise).
fn between(
    state: &AppState,
    vhost: &str,
    source: &str,
    kind: Kind,
    destination: &str,
) -> ApiResult<Vec<BindingInfo>> {
    let broker = state.broker();
    broker.exchange_info(vhost, source)?;
    match kind {
        Kind::Queue => broker.queue_info(vhost, destination).map(|_| ())?,
        Kind::Exchange => broker.exchange_info(vhost, destination).map(|_| ())?,
    }
    Ok(broker
        .bindings(vhost)?
        .into_iter()
        .filter(|b| {
            b.source.as_str() == source
                && match (&b.destination, kind) {
                    (Destination::Queue(q), Kind::Queue) => q.as_str() == destination,
                    (Destination::Exchange(x), Kind::Exchange) => x.as_str() == destination,
                    _ => false,
                }
        })
        .collect())
}

fn list_between(
    state: &AppState,
    (vhost, source, destination): (String, String, String),
    kind: Kind,
) -> ApiResult<Json<Value>> {
    let source = exchange_from_path(&source);
    let items = between(state, &vhost, source, kind, &destination)?;
    Ok(Json(Value::Array(
        items.iter().map(|b| binding_json(&vhost, b)).collect(),
    )))
}

fn find(
    state: &AppState,
    (vhost, source, destination, props): (String, String, String, String),
    kind: Kind,
) -> ApiResult<BindingInfo> {
    let source = exchange_from_path(&source);
    between(state, &vhost, source, kind, &destination)?
        .into_iter()
        .find(|b| properties_key(&b.routing_key, &b.arguments) == props)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no binding with properties key '{props}' from exchange '{source}' to '{destination}' in vhost '{vhost}'"
            ))
        })
}

/// The bindings from an exchange to a queue.
pub(crate) async fn list_queue_bindings(
    State(state): State<AppState>,
    Path(path): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    list_between(&state, path, Kind::Queue)
}

/// The bindings from an exchange to an exchange.
pub(crate) async fn list_exchange_bindings(
    State(state): State<AppState>,
    Path(path): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    list_between(&state, path, Kind::Exchange)
}

/// One binding from an exchange to a queue.
pub(crate) async fn get_queue_binding(
    State(state): State<AppState>,
    Path(path): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let vhost = path.0.clone();
    Ok(Json(binding_json(
        &vhost,
        &find(&state, path, Kind::Queue)?,
    )))
}

/// One binding from an exchange to an exchange.
pub(crate) async fn get_exchange_binding(
    State(state): State<AppState>,
    Path(path): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let vhost = path.0.clone();
    Ok(Json(binding_json(
        &vhost,
        &find(&state, path, Kind::Exchange)?,
    )))
}

/// The body of a bind request.
#[derive(Debug, Deserialize)]
struct BindBody {
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Option<Value>,
}

fn created(routing_key: &str, arguments: &FieldTable) -> Response {
    let key = properties_key(routing_key, arguments);
    let mut response = StatusCode::CREATED.into_response();
    // The key as a relative reference; characters that cannot stand in a
    // header leave it out rather than fail the bind that already happened.
    if let Ok(value) = header::HeaderValue::from_str(&key) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Binds a queue to an exchange: 201 with the binding's properties key.
pub(crate) async fn bind_queue(
    State(state): State<AppState>,
    Path((vhost, source, destination)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let body: BindBody = convert::body(&body)?;
    let arguments = convert::optional_table("arguments", body.arguments.as_ref())?;
    state
        .broker()
        .bind_queue(
            &vhost,
            &destination,
            exchange_from_path(&source),
            &body.routing_key,
            &arguments,
            state.connection(),
        )
        .await?;
    Ok(created(&body.routing_key, &arguments))
}

/// Binds an exchange to an exchange: 201 with the binding's properties key.
pub(crate) async fn bind_exchange(
    State(state): State<AppState>,
    Path((vhost, source, destination)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let body: BindBody = convert::body(&body)?;
    let arguments = convert::optional_table("arguments", body.arguments.as_ref())?;
    state
        .broker()
        .bind_exchange(
            &vhost,
            &destination,
            exchange_from_path(&source),
            &body.routing_key,
            &arguments,
        )
        .await?;
    Ok(created(&body.routing_key, &arguments))
}

/// Removes one binding from an exchange to a queue.
pub(crate) async fn unbind_queue(
    State(state): State<AppState>,
    Path(path): Path<(String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let vhost = path.0.clone();
    let b = find(&state, path, Kind::Queue)?;
    if let Destination::Queue(q) = &b.destination {
        state
            .broker()
            .unbind_queue(
                &vhost,
                q.as_str(),
                b.source.as_str(),
                &b.routing_key,
                &b.arguments,
                state.connection(),
            )
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Removes one binding from an exchange to an exchange.
pub(crate) async fn unbind_exchange(
    State(state): State<AppState>,
    Path(path): Path<(String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let vhost = path.0.clone();
    let b = find(&state, path, Kind::Exchange)?;
    if let Destination::Exchange(x) = &b.destination {
        state
            .broker()
            .unbind_exchange(
                &vhost,
                x.as_str(),
                b.source.as_str(),
                &b.routing_key,
                &b.arguments,
            )
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_broker::FieldValue;

    #[test]
    fn properties_keys_name_bindings() {
        let none = FieldTable::new();
        assert_eq!(properties_key("", &none), "~");
        assert_eq!(properties_key("a.b", &none), "a.b");
        let mut args = FieldTable::new();
        args.insert("x-match".into(), FieldValue::String("all".into()));
        let k1 = properties_key("a", &args);
        assert!(k1.starts_with("a~"), "{k1}");
        assert_eq!(k1, properties_key("a", &args.clone()));
        args.insert("x".into(), FieldValue::I64(1));
        assert_ne!(k1, properties_key("a", &args));
    }
}
