//! `/api/connections`, `/api/channels`, `/api/consumers`: who is connected,
//! read from the broker's registry, and closing a connection by name.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use tern_broker::{AckMode, ChannelInfo, ConnectionInfo, ConsumerInfo};

use super::{listing, ApiResult};
use crate::error::ApiError;
use crate::server::AppState;

/// The header a close request's reason comes in, as RabbitMQ's.
const REASON_HEADER: &str = "x-reason";
/// The reason given when a close request names none.
const DEFAULT_REASON: &str = "closed via the management API";
/// The longest reason accepted: it travels in an AMQP short string (255
/// bytes) after the reply code's name.
const MAX_REASON: usize = 200;

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn connection_json(c: &ConnectionInfo) -> Value {
    json!({
        "name": c.name,
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "user": c.user,
        "vhost": c.vhost,
        "protocol": c.protocol,
        "connected_at": millis(c.connected_at),
        "channels": c.channels,
    })
}

/// A channel's name, as RabbitMQ's: its connection's, then its number.
fn channel_name(connection: Option<&str>, number: Option<u16>, id: u64) -> String {
    match (connection, number) {
        (Some(c), Some(n)) => format!("{c} ({n})"),
        (Some(c), None) => format!("{c} (#{id})"),
        (None, _) => format!("internal channel #{id}"),
    }
}

fn channel_json(c: &ChannelInfo) -> Value {
    json!({
        "name": channel_name(c.connection_name.as_deref(), c.number, c.id),
        "number": c.number,
        "connection_name": c.connection_name,
        "vhost": c.vhost.as_str(),
        "consumer_count": c.consumers,
        "messages_unacknowledged": c.unacked,
    })
}

pub(super) fn consumer_json(c: &ConsumerInfo, channels: &[ChannelInfo]) -> Value {
    let number = channels
        .iter()
        .find(|ch| ch.id == c.channel)
        .and_then(|ch| ch.number);
    json!({
        "consumer_tag": c.tag,
        "queue": c.queue.as_str(),
        "vhost": c.vhost.as_str(),
        "channel": channel_name(c.connection_name.as_deref(), number, c.channel),
        "connection_name": c.connection_name,
        "prefetch_count": c.prefetch,
        "ack_mode": match c.ack_mode { AckMode::Manual => "manual", AckMode::Auto => "auto" },
        "ack_required": c.ack_mode == AckMode::Manual,
        "exclusive": c.exclusive,
        "priority": c.priority,
    })
}

/// Every client connection (`name`, `page`, `page_size` apply).
pub(crate) async fn list_connections(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let items = state
        .broker()
        .connections()
        .iter()
        .map(connection_json)
        .collect();
    Ok(Json(listing(items, &query)?))
}

/// One connection, by name.
pub(crate) async fn get_connection(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state
        .broker()
        .connections()
        .iter()
        .find(|c| c.name == name)
        .map(|c| Json(connection_json(c)))
        .ok_or_else(|| ApiError::not_found(format!("no connection named {name:?}")))
}

/// Asks a connection to close with the reason in `X-Reason`; 204 once
/// asked (the client is told with `connection.close`, 320 CONNECTION_FORCED).
pub(crate) async fn close_connection(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let reason = match headers.get(REASON_HEADER) {
        None => DEFAULT_REASON.to_string(),
        Some(v) => v
            .to_str()
            .map_err(|_| ApiError::bad_request("the X-Reason header must be ASCII text"))?
            .to_string(),
    };
    if reason.len() > MAX_REASON {
        return Err(ApiError::bad_request(format!(
            "the X-Reason header is {} bytes; at most {MAX_REASON} fit in the close frame",
            reason.len()
        )));
    }
    if state.broker().close_connection(&name, &reason) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no connection named {name:?}")))
    }
}

/// Every open channel (`name`, `page`, `page_size` apply).
pub(crate) async fn list_channels(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let items = state.broker().channels().iter().map(channel_json).collect();
    Ok(Json(listing(items, &query)?))
}

fn consumers(state: &AppState, vhost: Option<&str>) -> ApiResult<Json<Value>> {
    let channels = state.broker().channels();
    let all = state.broker().consumers(vhost)?;
    Ok(Json(Value::Array(
        all.iter().map(|c| consumer_json(c, &channels)).collect(),
    )))
}

/// Every consumer, by queue.
pub(crate) async fn list_all_consumers(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    consumers(&state, None)
}

/// The consumers of a vhost's queues.
pub(crate) async fn list_consumers(
    State(state): State<AppState>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    consumers(&state, Some(&vhost))
}
