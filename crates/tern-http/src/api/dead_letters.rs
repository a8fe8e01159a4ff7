//! Dead letters: which queues hold them (`/api/dlq`), a non-destructive
//! peek at a queue's messages with their deaths decoded, and redrive jobs
//! that move them back (`/api/queues/{vhost}/{name}/redrive`,
//! `/api/redrives/{id}`).
//!
//! A queue is a dead-letter queue if it is named `*.dlq` (the `tern`
//! toolkit's convention) or if some queue's `x-dead-letter-exchange`
//! (with its `x-dead-letter-routing-key`, if any) routes to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{Destination, ExchangeKind, FieldValue, PeekedMessage};

use super::{exchange_from_path, ApiResult};
use crate::convert;
use crate::error::ApiError;
use crate::redrive::{self, RedriveSpec, ERROR_HEADER, FAILED_SERVICE_HEADER};
use crate::scope::Scope;
use crate::server::AppState;

/// The most messages one peek shows.
const MAX_PEEK: usize = 1000;
/// How many a peek shows unless asked.
const DEFAULT_PEEK: usize = 10;
/// The fastest redrive rate accepted.
const MAX_RATE: f64 = 10_000.0;
/// The slowest: one message in 1000 s (slower rates would overflow the pause).
const MIN_RATE: f64 = 0.001;

fn argument<'a>(args: &'a tern_broker::FieldTable, name: &str) -> Option<&'a str> {
    args.get(name).and_then(FieldValue::as_str)
}

/// The dead-letter queues of a vhost, each with the queues that
/// dead-letter into it.
pub(crate) fn vhost_dlqs(state: &AppState, vhost: &str) -> ApiResult<Vec<Value>> {
    let broker = state.broker();
    let queues = broker.queues(vhost)?;
    let bindings = broker.bindings(vhost)?;
    let kinds: HashMap<String, ExchangeKind> = broker
        .exchanges(vhost)?
        .into_iter()
        .map(|e| (e.name.as_str().to_string(), e.kind))
        .collect();
    let mut sources: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for q in &queues {
        if q.name.as_str().ends_with(".dlq") {
            sources.entry(q.name.as_str().to_string()).or_default();
        }
        let Some(dlx) = argument(&q.arguments, "x-dead-letter-exchange") else {
            continue;
        };
        let key = argument(&q.arguments, "x-dead-letter-routing-key");
        let mut targets = Vec::new();
        if dlx.is_empty() {
            // The default exchange routes by queue name; without a key the
            // message keeps its own, which names no queue we can know.
            targets.extend(key.map(str::to_string));
        } else {
            let kind = kinds.get(dlx).copied();
            for b in bindings.iter().filter(|b| b.source.as_str() == dlx) {
                let Destination::Queue(dest) = &b.destination else {
                    continue;
                };
                let matches = match (kind, key) {
                    // Without a dead-letter key, any of the messages' own keys
                    // may come; every binding is a possible target.
                    (_, None) => true,
                    (Some(ExchangeKind::Fanout | ExchangeKind::Headers), _) => true,
                    (Some(ExchangeKind::Topic), Some(k)) => {
                        tern_broker::routing::topic_matches(&b.routing_key, k)
                    }
                    (_, Some(k)) => b.routing_key == k,
                };
                if matches {
                    targets.push(dest.as_str().to_string());
                }
            }
        }
        for target in targets {
            if queues.iter().any(|x| x.name.as_str() == target) {
                sources
                    .entry(target)
                    .or_default()
                    .insert(q.name.as_str().to_string());
            }
        }
    }
    Ok(queues
        .iter()
        .filter_map(|q| {
            let from = sources.get(q.name.as_str())?;
            Some(json!({
                "name": q.name.as_str(),
                "vhost": vhost,
                "messages": q.ready + q.unacked,
                "messages_ready": q.ready,
                "messages_unacknowledged": q.unacked,
                "consumers": q.consumers,
                "sources": from.iter().collect::<Vec<_>>(),
            }))
        })
        .collect())
}

/// Every dead-letter queue of every vhost the caller sees, with depths.
pub(crate) async fn list_dlqs(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    let mut all = Vec::new();
    for vhost in scope.vhosts(state.broker()) {
        // A vhost deleted since it was listed has none.
        all.extend(vhost_dlqs(&state, vhost.as_str()).unwrap_or_default());
    }
    Ok(Json(Value::Array(all)))
}

/// One `x-death` entry, decoded.
fn death_json(entry: &FieldValue) -> Option<Value> {
    let FieldValue::Table(t) = entry else {
        return None;
    };
    let text = |k: &str| t.get(k).and_then(FieldValue::as_str).map(str::to_string);
    let keys: Vec<String> = match t.get("routing-keys") {
        Some(FieldValue::Array(keys)) => keys
            .iter()
            .filter_map(FieldValue::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    let time = match t.get("time") {
        Some(FieldValue::Timestamp(s)) => Some(*s),
        _ => None,
    };
    Some(json!({
        "queue": text("queue"),
        "reason": text("reason"),
        "count": t.get("count").and_then(FieldValue::as_i64),
        "exchange": text("exchange"),
        "routing_keys": keys,
        "time": time,
        "original_expiration": text("original-expiration"),
    }))
}

fn peeked_json(p: &PeekedMessage) -> Value {
    let m = &p.message;
    let headers = m.properties.headers.as_ref();
    let header_text = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .and_then(FieldValue::as_str)
            .map(str::to_string)
    };
    let deaths: Vec<Value> = match headers.and_then(|h| h.get("x-death")) {
        Some(FieldValue::Array(entries)) => entries.iter().filter_map(death_json).collect(),
        _ => Vec::new(),
    };
    let (payload, payload_encoding) = convert::encode_payload(&m.body, false);
    let target = redrive::default_target(m)
        .map(|t| json!({"exchange": t.exchange, "routing_key": t.routing_key}));
    json!({
        "offset": p.offset,
        "payload": payload,
        "payload_encoding": payload_encoding,
        "payload_bytes": m.body.len(),
        "redelivered": p.redelivered,
        "delivery_count": p.delivery_count,
        "exchange": m.exchange.as_str(),
        "routing_key": m.routing_key,
        "properties": convert::properties_json(&m.properties),
        "deaths": deaths,
        "error": header_text(ERROR_HEADER),
        "failed_service": header_text(FAILED_SERVICE_HEADER),
        "redrive_target": target,
    })
}

/// `GET /api/queues/{vhost}/{name}/messages?peek=N`: the next N messages,
/// left in the queue.
pub(crate) async fn peek_messages(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let count = match query.get("peek") {
        None => DEFAULT_PEEK,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_PEEK).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "peek must be an integer from 1 to {MAX_PEEK}, not {v:?}"
                )))
            }
        },
    };
    let peeked = state
        .broker()
        .peek(&vhost, &name, count, state.connection())?;
    Ok(Json(Value::Array(peeked.iter().map(peeked_json).collect())))
}

/// The body of `POST /api/queues/{vhost}/{name}/redrive`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    rate_per_second: f64,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    to_exchange: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
}

/// Starts moving a queue's messages back to where they came from; 202
/// with the job's progress (and its address in `Location`).
pub(crate) async fn start_redrive(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(
    StatusCode,
    [(axum::http::HeaderName, String); 1],
    Json<Value>,
)> {
    let body: RedriveBody = convert::body(&body)?;
    if !(MIN_RATE..=MAX_RATE).contains(&body.rate_per_second) {
        return Err(ApiError::bad_request(format!(
            "rate_per_second must be from {MIN_RATE} to {MAX_RATE}, not {}",
            body.rate_per_second
        )));
    }
    if body.limit == Some(0) {
        return Err(ApiError::bad_request("limit must be at least 1"));
    }
    // Refuse what would fail at once: a missing queue or target exchange.
    state.broker().queue_info(&vhost, &name)?;
    let to_exchange = body
        .to_exchange
        .as_deref()
        .map(|x| exchange_from_path(x).to_string());
    if let Some(x) = &to_exchange {
        state.broker().exchange_info(&vhost, x)?;
    }
    let job = state.redrives().start(
        state.broker().clone(),
        state.connection(),
        RedriveSpec {
            vhost,
            queue: name,
            rate_per_second: body.rate_per_second,
            limit: body.limit,
            to_exchange,
            routing_key: body.routing_key,
        },
    );
    let progress = job.progress();
    let location = format!("/api/redrives/{}", progress["id"]);
    Ok((
        StatusCode::ACCEPTED,
        [(axum::http::header::LOCATION, location)],
        Json(progress),
    ))
}

/// `GET /api/redrives/{id}`: a job's progress.
pub(crate) async fn get_redrive(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "a redrive id is a number, not {id:?}"
        )));
    }
    // A number too large for an id names no job.
    let parsed = id
        .parse::<u64>()
        .map_err(|_| ApiError::not_found(format!("no redrive job {id}")))?;
    state
        .redrives()
        .get(parsed)
        .filter(|job| scope.sees_vhost(job.vhost()))
        .map(|job| Json(job.progress()))
        .ok_or_else(|| ApiError::not_found(format!("no redrive job {parsed}")))
}

/// `GET /api/redrives`: every job the server remembers in the vhosts the
/// caller sees, oldest first.
pub(crate) async fn list_redrives(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    let all = state.redrives().all();
    Ok(Json(Value::Array(
        all.iter()
            .filter(|j| scope.sees_vhost(j.vhost()))
            .map(|j| j.progress())
            .collect(),
    )))
}
