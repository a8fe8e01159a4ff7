//! `GET /api/queues/{vhost}/{name}/offsets`: a stream's extent and each
//! consumer's position, committed offset (named consumers) and lag, from
//! [`tern_broker::Broker::stream_offsets`].

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use tern_broker::StreamOffsets;

use super::ApiResult;
use crate::server::AppState;

/// The JSON of a stream's offsets.
pub(crate) fn offsets_json(vhost: &str, name: &str, o: &StreamOffsets) -> Value {
    json!({
        "vhost": vhost,
        "name": name,
        "first": o.first,
        "end": o.end,
        "consumers": o.consumers.iter().map(|c| json!({
            "name": c.name.as_ref().map(|n| n.as_str()),
            "consumer_tag": c.consumer_tag,
            "next": c.next,
            "committed": c.committed,
            "lag": c.lag,
        })).collect::<Vec<_>>(),
    })
}

/// A stream's offsets: 404 for a missing queue, 409 for one that is not a stream.
pub(crate) async fn stream_offsets(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let offsets = state.broker().stream_offsets(&vhost, &name)?;
    Ok(Json(offsets_json(&vhost, &name, &offsets)))
}
