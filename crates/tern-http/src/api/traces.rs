//! Message tracing over HTTP: `GET /api/traces/{correlation_id}` returns a
//! flow's messages from the broker's trace index, and
//! `/api/trace-settings` turns the index on (bounded, optionally sampled)
//! or off. It is off by default.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{TraceEventKind, TraceSettings, TracedMessage};

use super::ApiResult;
use crate::convert;
use crate::error::ApiError;
use crate::scope::Scope;
use crate::server::AppState;

/// The most messages the index may be asked to keep.
const MAX_CAPACITY: usize = 1_000_000;
const DEFAULT_CAPACITY: usize = 10_000;
/// The sparsest sampling accepted.
const MAX_SAMPLE: u32 = 1_000_000;

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn kind(k: TraceEventKind) -> &'static str {
    match k {
        TraceEventKind::Delivered => "delivered",
        TraceEventKind::Acked => "acked",
        TraceEventKind::Rejected => "rejected",
        TraceEventKind::Requeued => "requeued",
    }
}

fn traced_json(m: &TracedMessage) -> Value {
    json!({
        "message_id": m.message_id,
        "correlation_id": m.correlation_id,
        "causation_id": m.causation_id,
        "type": m.message_type,
        "app_id": m.app_id,
        "vhost": m.vhost.as_str(),
        "exchange": m.exchange,
        "routing_key": m.routing_key,
        "queues": m.queues.iter().map(|q| q.as_str()).collect::<Vec<_>>(),
        "published_at": millis(m.published_at),
        "events": m.events.iter().map(|e| json!({
            "kind": kind(e.kind),
            "queue": e.queue.as_str(),
            "consumer_tag": e.consumer_tag,
            "at": millis(e.at),
        })).collect::<Vec<_>>(),
    })
}

/// A flow: every traced message with this correlation id, in publish order.
pub(crate) async fn get_trace(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Path(correlation_id): Path<String>,
) -> ApiResult<Json<Value>> {
    if state.broker().tracing().is_none() {
        return Err(ApiError::not_found(
            "tracing is off; turn it on with PUT /api/trace-settings",
        ));
    }
    let mut messages = state.broker().trace(&correlation_id);
    // Messages of vhosts the caller does not see are left out, as if untraced.
    messages.retain(|m| scope.sees_vhost(m.vhost.as_str()));
    if messages.is_empty() {
        return Err(ApiError::not_found(format!(
            "no traced message has correlation id {correlation_id:?} (it may be older than the index holds, or not sampled)"
        )));
    }
    Ok(Json(json!({
        "correlation_id": correlation_id,
        "messages": messages.iter().map(traced_json).collect::<Vec<_>>(),
    })))
}

fn settings_json(settings: Option<TraceSettings>) -> Value {
    match settings {
        Some(s) => {
            json!({"enabled": true, "capacity": s.capacity, "sample_one_in": s.sample_one_in})
        }
        None => json!({"enabled": false, "capacity": null, "sample_one_in": null}),
    }
}

/// How tracing is set.
pub(crate) async fn get_trace_settings(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(settings_json(state.broker().tracing())))
}

/// The body of `PUT /api/trace-settings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    enabled: bool,
    #[serde(default)]
    capacity: Option<usize>,
    #[serde(default)]
    sample_one_in: Option<u32>,
}

/// Turns tracing on (clearing the index) or off; answers the new settings.
pub(crate) async fn put_trace_settings(
    State(state): State<AppState>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let body: SettingsBody = convert::body(&body)?;
    // Checked even when turning tracing off: a bad value is a bad request.
    let capacity = body.capacity.unwrap_or(DEFAULT_CAPACITY);
    if !(1..=MAX_CAPACITY).contains(&capacity) {
        return Err(ApiError::bad_request(format!(
            "capacity must be from 1 to {MAX_CAPACITY}, not {capacity}"
        )));
    }
    let sample_one_in = body.sample_one_in.unwrap_or(1);
    if !(1..=MAX_SAMPLE).contains(&sample_one_in) {
        return Err(ApiError::bad_request(format!(
            "sample_one_in must be from 1 to {MAX_SAMPLE}, not {sample_one_in}"
        )));
    }
    let settings = if body.enabled {
        Some(TraceSettings {
            capacity,
            sample_one_in,
        })
    } else {
        None
    };
    state.broker().set_tracing(settings);
    Ok((StatusCode::OK, Json(settings_json(settings))))
}
