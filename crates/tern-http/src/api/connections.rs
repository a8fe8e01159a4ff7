//! `/api/connections`, `/api/channels`, `/api/consumers`: who is connected,
//! read from the broker's registry, and closing a connection by name.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde_json::{json, Value};
use tern_broker::{AckMode, ChannelInfo, ConnectionId, ConnectionInfo, ConsumerInfo};

use super::{listing, ApiResult};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::scope::Scope;
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

/// A connection as RabbitMQ shows it, with its bytes received and sent
/// (`recv_oct`, `send_oct`) and their rates over the last sampling interval.
pub(super) fn connection_json(state: &AppState, c: &ConnectionInfo) -> Value {
    let (recv_rate, send_rate) = state.rates().connection_rates(&c.name);
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
        "recv_oct": c.received_bytes,
        "send_oct": c.sent_bytes,
        "recv_oct_details": {"rate": recv_rate},
        "send_oct_details": {"rate": send_rate},
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

/// The client connections the caller sees.
pub(super) fn visible_connections(state: &AppState, scope: &Scope) -> Vec<ConnectionInfo> {
    let mut all = state.broker().connections();
    all.retain(|c| scope.sees_connection_of(&c.user));
    all
}

/// Every client connection the caller sees (`name`, `page`, `page_size` apply).
pub(crate) async fn list_connections(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let items = visible_connections(&state, &scope)
        .iter()
        .map(|c| connection_json(&state, c))
        .collect();
    Ok(Json(listing(items, &query)?))
}

/// One connection, by name; one the caller may not see is not found.
pub(crate) async fn get_connection(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    visible_connections(&state, &scope)
        .iter()
        .find(|c| c.name == name)
        .map(|c| Json(connection_json(&state, c)))
        .ok_or_else(|| ApiError::not_found(format!("no connection named {name:?}")))
}

/// Asks a connection to close with the reason in `X-Reason`; 204 once
/// asked (the client is told with `connection.close`, 320 CONNECTION_FORCED).
/// Administrators close any connection, other users their own: one they
/// see but do not own (a monitoring user's view) is 403.
pub(crate) async fn close_connection(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Extension(me): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let Some(target) = visible_connections(&state, &scope)
        .into_iter()
        .find(|c| c.name == name)
    else {
        return Err(ApiError::not_found(format!("no connection named {name:?}")));
    };
    if !me.is_administrator() && target.user != me.user {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_refused",
            format!(
                "user '{}' may not close connection {name:?} of user '{}': only its own user or an administrator may",
                me.user, target.user
            ),
        ));
    }
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

/// Every open channel the caller sees (`name`, `page`, `page_size`
/// apply): those of the connections they see. Channels of no registered
/// connection (the API's own, the embedded transport's) are shown only to
/// those who see everything.
pub(crate) async fn list_channels(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let mut channels = state.broker().channels();
    if scope != Scope::Everything {
        let mine: HashSet<ConnectionId> = visible_connections(&state, &scope)
            .iter()
            .map(|c| c.id)
            .collect();
        channels.retain(|ch| mine.contains(&ch.connection));
    }
    let items = channels.iter().map(channel_json).collect();
    Ok(Json(listing(items, &query)?))
}

/// The consumers of the vhosts the caller sees (of one vhost if given).
pub(super) fn visible_consumers(
    state: &AppState,
    scope: &Scope,
    vhost: Option<&str>,
) -> ApiResult<Vec<Value>> {
    let channels = state.broker().channels();
    let mut all = state.broker().consumers(vhost)?;
    all.retain(|c| scope.sees_vhost(c.vhost.as_str()));
    Ok(all.iter().map(|c| consumer_json(c, &channels)).collect())
}

/// Every consumer the caller sees, by queue.
pub(crate) async fn list_all_consumers(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(visible_consumers(&state, &scope, None)?)))
}

/// The consumers of a vhost's queues.
pub(crate) async fn list_consumers(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(visible_consumers(
        &state,
        &scope,
        Some(&vhost),
    )?)))
}
