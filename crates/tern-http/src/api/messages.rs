//! Messages over HTTP: publish to an exchange, and fetch from a queue
//! (destructive, through a broker channel, with an ack mode).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tern_broker::{ExchangeName, Message};

use super::{exchange_from_path, ApiResult};
use crate::convert::{self, PayloadEncoding, PropertiesJson};
use crate::error::ApiError;
use crate::server::AppState;

fn string_encoding() -> PayloadEncoding {
    PayloadEncoding::String
}

/// The body of `POST /api/exchanges/{vhost}/{name}/publish`.
#[derive(Debug, Deserialize)]
struct PublishBody {
    routing_key: String,
    payload: String,
    #[serde(default = "string_encoding")]
    payload_encoding: PayloadEncoding,
    #[serde(default)]
    properties: PropertiesJson,
}

/// Publishes a message and answers once it is durable in every queue it
/// reached: `{"routed": bool}` (false when no queue took it), and
/// `rejected` when a full queue (`x-overflow` reject-publish) refused it.
pub(crate) async fn publish(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let body: PublishBody = convert::body(&body)?;
    let message = Message {
        exchange: ExchangeName::new(exchange_from_path(&name))
            .map_err(tern_broker::BrokerError::from)?,
        routing_key: body.routing_key,
        properties: body.properties.into_properties()?,
        body: convert::decode_payload(&body.payload, body.payload_encoding)?,
    };
    let published = state.broker().publish(&vhost, message)?;
    let routed = published.routed > 0;
    let rejected = published.rejected;
    if !rejected {
        published.confirmed().await?;
    }
    Ok(Json(json!({ "routed": routed, "rejected": rejected })))
}

/// What happens to fetched messages, as RabbitMQ's management API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AckMode {
    /// Back to the queue (marked redelivered): a look that leaves them there.
    AckRequeueTrue,
    /// Acknowledged: removed from the queue.
    AckRequeueFalse,
    /// Rejected with requeue: back to the queue.
    RejectRequeueTrue,
    /// Rejected without requeue: dead-lettered, or dropped.
    RejectRequeueFalse,
}

/// How payloads are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum GetEncoding {
    /// UTF-8 payloads as strings, others in base64.
    Auto,
    /// Every payload in base64.
    Base64,
}

fn auto() -> GetEncoding {
    GetEncoding::Auto
}

/// The body of `POST /api/queues/{vhost}/{name}/get`.
#[derive(Debug, Deserialize)]
struct GetBody {
    count: u32,
    ackmode: AckMode,
    #[serde(default = "auto")]
    encoding: GetEncoding,
    #[serde(default)]
    truncate: Option<u32>,
}

/// The most messages one get may fetch: each is held in memory until the
/// answer is sent.
const MAX_GET: u32 = 10_000;

/// Fetches up to `count` messages, then settles them all by the ack mode.
pub(crate) async fn get_messages(
    State(state): State<AppState>,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let body: GetBody = convert::body(&body)?;
    if body.count == 0 || body.count > MAX_GET {
        return Err(ApiError::bad_request(format!(
            "count must be between 1 and {MAX_GET}, not {}",
            body.count
        )));
    }
    let mut channel = state.broker().open_channel(&vhost, state.connection())?;
    let mut out = Vec::new();
    let mut tags = Vec::new();
    // Everything is fetched before anything is settled, so that a requeued
    // message is not fetched twice.
    for _ in 0..body.count {
        let Some(got) = channel.get(&name, false)? else {
            break;
        };
        tags.push(got.tag);
        let full = &got.message.body;
        let shown = match body.truncate.and_then(|n| full.get(..n as usize)) {
            Some(cut) => cut,
            None => &full[..],
        };
        let (payload, payload_encoding) =
            convert::encode_payload(shown, body.encoding == GetEncoding::Base64);
        out.push(json!({
            "payload": payload,
            "payload_encoding": payload_encoding,
            "payload_bytes": full.len(),
            "redelivered": got.redelivered,
            "exchange": got.message.exchange.as_str(),
            "routing_key": got.message.routing_key,
            "message_count": got.message_count,
            "properties": convert::properties_json(&got.message.properties),
        }));
    }
    for tag in tags {
        match body.ackmode {
            AckMode::AckRequeueFalse => channel.ack(tag, false)?,
            AckMode::AckRequeueTrue | AckMode::RejectRequeueTrue => channel.reject(tag, true)?,
            AckMode::RejectRequeueFalse => channel.reject(tag, false)?,
        }
    }
    channel.close();
    Ok(Json(Value::Array(out)))
}
