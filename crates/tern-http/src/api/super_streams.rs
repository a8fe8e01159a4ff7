//! `GET /api/exchanges/{vhost}/{name}/partitions`: a super stream's
//! partitions and, per partition, each consumer group's members and active
//! member, from [`tern_broker::Broker::super_stream`].

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use tern_broker::SuperStreamInfo;

use super::ApiResult;
use crate::server::AppState;

/// The JSON of a super stream.
pub(crate) fn partitions_json(vhost: &str, s: &SuperStreamInfo) -> Value {
    json!({
        "vhost": vhost,
        "name": s.name.as_str(),
        "partition_key_header": s.key_header,
        "partitions": s.partitions.iter().map(|p| json!({
            "index": p.index,
            "queue": p.queue.as_str(),
            "exists": p.exists,
            "messages": p.messages,
            "groups": p.groups.iter().map(|g| json!({
                "name": g.group.as_str(),
                "members": g.members,
                "active": g.active,
                "committed": g.committed,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A super stream's partitions: 404 for a missing exchange, 409 for one
/// that is not a super stream.
pub(crate) async fn super_stream_partitions(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let info = state.broker().super_stream(&vhost, &name)?;
    Ok(Json(partitions_json(&vhost, &info)))
}
