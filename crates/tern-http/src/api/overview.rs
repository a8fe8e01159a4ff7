//! `GET /api/overview`: the broker at a glance: version, uptime, object
//! counts and message totals, message counters and their rates (when a
//! metrics recorder is installed), what the storage journal has done, and
//! the resource alarms raised now (`["memory", "disk"]`, empty when all is
//! well); and `GET /api/rates`, the sampled history behind the dashboard's
//! charts.

use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::ApiResult;
use crate::scope::Scope;
use crate::server::AppState;

/// The overview, of the vhosts the caller sees.
pub(crate) async fn overview(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    Ok(Json(overview_json(&state, &scope)))
}

/// The last samples' rates and queue depths of the vhosts the caller
/// sees, oldest first.
pub(crate) async fn rates(
    State(state): State<AppState>,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    Ok(Json(state.rates().history(&|v| scope.sees_vhost(v))))
}

/// The overview's body, also pushed by `/api/events`: totals and counters
/// over the vhosts the caller sees (RabbitMQ's "global statistics covering
/// all their virtual hosts" for a management user).
pub(crate) fn overview_json(state: &AppState, scope: &Scope) -> Value {
    let broker = state.broker();
    let vhosts = scope.vhosts(broker);
    let (mut exchanges, mut queues, mut bindings, mut consumers) = (0usize, 0usize, 0usize, 0u64);
    let (mut ready, mut unacked) = (0u64, 0u64);
    for vhost in &vhosts {
        // A vhost deleted meanwhile simply counts for nothing.
        if let Ok(list) = broker.exchanges(vhost.as_str()) {
            exchanges += list.len();
            bindings += list.iter().map(|e| e.bindings).sum::<usize>();
        }
        if let Ok(list) = broker.queues(vhost.as_str()) {
            queues += list.len();
            for q in list {
                ready += q.ready;
                unacked += q.unacked;
                consumers += u64::from(q.consumers);
            }
        }
    }
    let journal = broker.journal_stats().map(|j| {
        json!({
            "commits": j.commits,
            "batches": j.batches,
            "records": j.records,
            "bytes": j.bytes,
            "checkpoints": j.checkpoints,
        })
    });
    json!({
        "product_name": "Tern",
        "tern_version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": u64::try_from(state.started().elapsed().as_millis()).unwrap_or(u64::MAX),
        "object_totals": {
            "vhosts": vhosts.len(),
            "exchanges": exchanges,
            "queues": queues,
            "bindings": bindings,
            "consumers": consumers,
        },
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
        "message_stats": message_stats(state, scope),
        "journal": journal,
        "alarms": broker
            .alarms()
            .current()
            .raised()
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>(),
    })
}

/// The recorder's totals under their own names (`published`...), and
/// RabbitMQ's `publish`, `deliver_get`, `ack`, `redeliver` with
/// `*_details.rate` from the sampled counters; null without a recorder.
fn message_stats(state: &AppState, scope: &Scope) -> Value {
    let sees = |v: &str| scope.sees_vhost(v);
    let Some(totals) = crate::metrics::message_totals(state, &sees) else {
        return Value::Null;
    };
    let mut out: serde_json::Map<String, Value> = totals
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    if let Some(rates) = state.rates().overview_stats(&sees) {
        out.extend(rates);
    }
    Value::Object(out)
}
