//! `GET /api/openapi.json`: the OpenAPI 3 document of the API, written by
//! hand next to the router (a test checks that every route is in it).

use axum::Json;
use serde_json::{json, Map, Value};

/// A path parameter. Names are at most 255 bytes of UTF-8; `maxLength`
/// counts characters, so it is the nearest the schema can say.
fn path_param(name: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": "path",
        "required": true,
        "description": description,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    })
}

fn vhost() -> Value {
    path_param("vhost", "The vhost, percent-encoded (`%2F` is `/`).")
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

/// The `name`, `page` and `page_size` parameters of lists.
fn list_params() -> Vec<Value> {
    vec![
        query_param(
            "name",
            "Only items whose name contains this.",
            json!({"type": "string"}),
        ),
        query_param(
            "page",
            "Return this page (from 1), wrapped with counts.",
            json!({"type": "integer", "minimum": 1, "maximum": 1_000_000_000}),
        ),
        query_param(
            "page_size",
            "Items per page (default 100).",
            json!({"type": "integer", "minimum": 1, "maximum": 500}),
        ),
    ]
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// A list answer: an array, or a page of one when `page` is given.
fn list_of(item: &str) -> Value {
    json!({"oneOf": [
        {"type": "array", "items": schema_ref(item)},
        {"allOf": [schema_ref("Page"), {"type": "object", "properties": {"items": {"type": "array", "items": schema_ref(item)}}}]},
    ]})
}

/// One operation: summary, parameters, optional request body schema, the
/// success statuses (`201,204` for two) with their schema (None for no
/// body), and error statuses.
fn op(
    summary: &str,
    params: Vec<Value>,
    body: Option<Value>,
    ok: (&str, Option<Value>),
    errors: &[&str],
) -> Value {
    let mut responses = Map::new();
    let mut success = json!({"description": summary});
    if let Some(schema) = ok.1 {
        success["content"] = json_content(schema);
    }
    for code in ok.0.split(',') {
        responses.insert(code.to_string(), success.clone());
    }
    for code in errors {
        responses.insert(
            (*code).to_string(),
            json!({"$ref": format!("#/components/responses/E{code}")}),
        );
    }
    responses.insert("401".into(), json!({"$ref": "#/components/responses/E401"}));
    let mut o = json!({"summary": summary, "parameters": params, "responses": responses});
    if let Some(schema) = body {
        o["requestBody"] = json!({"required": true, "content": json_content(schema)});
    }
    o
}

fn components() -> Value {
    // Null reads as absent (no arguments, no headers).
    let table = json!({"type": "object", "nullable": true, "additionalProperties": true});
    let error_response = |description: &str| json!({"description": description, "content": json_content(schema_ref("Error"))});
    json!({
        "securitySchemes": {
            "basic": {"type": "http", "scheme": "basic"},
            "bearer": {"type": "http", "scheme": "bearer"},
        },
        "responses": {
            "E400": error_response("The request is malformed or invalid."),
            "E401": error_response("Missing or invalid credentials."),
            "E403": error_response("The operation is refused: reserved names, internal exchanges, a vhost or an exchange or queue the user's permissions do not cover (users who are not administrators), or an administrator's operation by another user."),
            "E404": error_response("The vhost, exchange, queue or binding does not exist."),
            "E409": error_response("The request conflicts with the entity's state or properties."),
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error", "reason"], "properties": {
                "error": {"type": "string"}, "reason": {"type": "string"}}},
            "Table": table,
            "Page": {"type": "object", "required": ["items", "page", "page_size", "page_count", "item_count", "filtered_count", "total_count"], "properties": {
                "items": {"type": "array"},
                "page": {"type": "integer"}, "page_size": {"type": "integer"},
                "page_count": {"type": "integer"}, "item_count": {"type": "integer"},
                "filtered_count": {"type": "integer"}, "total_count": {"type": "integer"}}},
            "Overview": {"type": "object", "required": ["tern_version", "uptime_ms", "object_totals", "queue_totals"], "properties": {
                "product_name": {"type": "string"},
                "tern_version": {"type": "string"},
                "uptime_ms": {"type": "integer"},
                "object_totals": {"type": "object", "properties": {
                    "vhosts": {"type": "integer"}, "exchanges": {"type": "integer"},
                    "queues": {"type": "integer"}, "bindings": {"type": "integer"},
                    "consumers": {"type": "integer"}}},
                "queue_totals": {"type": "object", "properties": {
                    "messages": {"type": "integer"}, "messages_ready": {"type": "integer"},
                    "messages_unacknowledged": {"type": "integer"}}},
                "message_stats": {"allOf": [schema_ref("QueueMessageStats"), {"type": "object", "description": "The broker's message counters since start, summed over queues, and their rates over the last sampling interval; null without a metrics recorder.", "properties": {
                    "published": {"type": "number"}, "delivered": {"type": "number"},
                    "redelivered": {"type": "number"}, "acked": {"type": "number"},
                    "dead_lettered": {"type": "number"}, "unroutable": {"type": "number"}}}], "nullable": true},
                "journal": {"type": "object", "nullable": true, "properties": {
                    "commits": {"type": "integer"}, "batches": {"type": "integer"},
                    "records": {"type": "integer"}, "bytes": {"type": "integer"},
                    "checkpoints": {"type": "integer"}}},
                "alarms": {"type": "array", "description": "The resource alarms raised now; while any is, publishing connections are blocked.", "items": {"type": "string", "enum": ["memory", "disk"]}}}},
            "Rate": {"type": "object", "required": ["rate"], "properties": {
                "rate": {"type": "number", "minimum": 0, "description": "Messages per second over the last sampling interval."}}},
            "QueueMessageStats": {"type": "object", "description": "RabbitMQ-shaped counters since start, each with its rate; present only with a metrics recorder.", "properties": {
                "publish": {"type": "integer", "minimum": 0, "description": "Messages stored."},
                "publish_details": schema_ref("Rate"),
                "deliver_get": {"type": "integer", "minimum": 0, "description": "Deliveries to consumers and gets."},
                "deliver_get_details": schema_ref("Rate"),
                "ack": {"type": "integer", "minimum": 0}, "ack_details": schema_ref("Rate"),
                "redeliver": {"type": "integer", "minimum": 0}, "redeliver_details": schema_ref("Rate")}},
            "ExchangeMessageStats": {"type": "object", "description": "Messages published to the exchange, and those it routed to at least one queue, with their rates; present only with a metrics recorder.", "properties": {
                "publish_in": {"type": "integer", "minimum": 0}, "publish_in_details": schema_ref("Rate"),
                "publish_out": {"type": "integer", "minimum": 0}, "publish_out_details": schema_ref("Rate")}},
            "RateHistory": {"type": "object", "required": ["interval_ms", "samples", "queues"], "properties": {
                "interval_ms": {"type": "integer", "minimum": 1},
                "samples": {"type": "array", "description": "Oldest first; rates are over the interval ending at each sample (null for the first, and without a metrics recorder).", "items": {"type": "object", "required": ["timestamp", "messages", "publish", "deliver_get", "ack", "redeliver"], "properties": {
                    "timestamp": {"type": "integer", "description": "Milliseconds since the Unix epoch."},
                    "messages": {"type": "integer", "minimum": 0, "description": "Messages in every queue."},
                    "publish": {"type": "number", "nullable": true}, "deliver_get": {"type": "number", "nullable": true},
                    "ack": {"type": "number", "nullable": true}, "redeliver": {"type": "number", "nullable": true}}}},
                "queues": {"type": "array", "items": {"type": "object", "required": ["vhost", "name", "messages"], "properties": {
                    "vhost": {"type": "string"}, "name": {"type": "string"},
                    "messages": {"type": "array", "description": "The queue's depth at each sample; null where it did not exist.", "items": {"type": "integer", "nullable": true}}}}}}},
            "Vhost": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "queues": {"type": "integer"},
                "messages": {"type": "integer"}, "messages_ready": {"type": "integer"},
                "messages_unacknowledged": {"type": "integer"}}},
            "Exchange": {"type": "object", "required": ["name", "vhost", "type", "durable", "auto_delete", "internal", "arguments"], "properties": {
                "name": {"type": "string"}, "vhost": {"type": "string"},
                "type": {"type": "string", "enum": ["direct", "fanout", "topic", "headers", "x-delayed-message", "x-message-deduplication"]},
                "durable": {"type": "boolean"}, "auto_delete": {"type": "boolean"},
                "internal": {"type": "boolean"}, "arguments": schema_ref("Table"),
                "message_stats": schema_ref("ExchangeMessageStats")}},
            "ExchangeDeclare": {"type": "object", "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["direct", "fanout", "topic", "headers", "x-delayed-message", "x-message-deduplication"]},
                "durable": {"type": "boolean", "default": true},
                "auto_delete": {"type": "boolean", "default": false},
                "internal": {"type": "boolean", "default": false},
                "arguments": schema_ref("Table")}},
            "StreamOffsets": {"type": "object", "required": ["vhost", "name", "first", "end", "consumers"], "properties": {
                "vhost": {"type": "string"},
                "name": {"type": "string"},
                "first": {"type": "integer", "minimum": 0, "description": "The oldest offset retention has kept."},
                "end": {"type": "integer", "minimum": 0, "description": "The offset the next message gets."},
                "consumers": {"type": "array", "items": {"type": "object", "required": ["name", "consumer_tag", "next", "committed", "lag"], "properties": {
                    "name": {"type": "string", "nullable": true, "description": "x-stream-consumer-name, if given."},
                    "consumer_tag": {"type": "string", "nullable": true, "description": "null for a named consumer that is not attached."},
                    "next": {"type": "integer", "nullable": true, "minimum": 0, "description": "The next offset the attached consumer is sent."},
                    "committed": {"type": "integer", "nullable": true, "minimum": 0, "description": "A named consumer's committed offset: every message below it is acknowledged."},
                    "lag": {"type": "integer", "minimum": 0, "description": "end minus committed (named) or next (unnamed)."},
                }}},
            }},
            "SuperStream": super_stream_schema(),
            "Queue": {"type": "object", "required": ["name", "vhost", "type", "durable", "auto_delete", "exclusive", "arguments", "messages", "messages_ready", "messages_unacknowledged", "consumers"], "properties": {
                "name": {"type": "string"}, "vhost": {"type": "string"},
                "type": {"type": "string", "enum": ["classic", "quorum", "stream"]},
                "durable": {"type": "boolean"}, "auto_delete": {"type": "boolean"},
                "exclusive": {"type": "boolean"}, "arguments": schema_ref("Table"),
                "messages": {"type": "integer"}, "messages_ready": {"type": "integer"},
                "messages_unacknowledged": {"type": "integer"}, "consumers": {"type": "integer"},
                "message_stats": schema_ref("QueueMessageStats")}},
            "QueueDeclare": {"type": "object", "properties": {
                "durable": {"type": "boolean", "default": true},
                "auto_delete": {"type": "boolean", "default": false},
                "exclusive": {"type": "boolean", "enum": [false], "description": "Exclusive queues are declared over AMQP only."},
                "arguments": schema_ref("Table")}},
            "Binding": {"type": "object", "required": ["source", "vhost", "destination", "destination_type", "routing_key", "arguments", "properties_key"], "properties": {
                "source": {"type": "string"}, "vhost": {"type": "string"},
                "destination": {"type": "string"},
                "destination_type": {"type": "string", "enum": ["queue", "exchange"]},
                "routing_key": {"type": "string"}, "arguments": schema_ref("Table"),
                "properties_key": {"type": "string"}}},
            "BindingDeclare": {"type": "object", "properties": {
                "routing_key": {"type": "string", "default": ""},
                "arguments": schema_ref("Table")}},
            "Properties": {"type": "object", "properties": {
                "content_type": {"type": "string"}, "content_encoding": {"type": "string"},
                "headers": schema_ref("Table"),
                "delivery_mode": {"type": "integer", "enum": [1, 2]},
                "priority": {"type": "integer", "minimum": 0, "maximum": 255},
                "correlation_id": {"type": "string"}, "reply_to": {"type": "string"},
                "expiration": {"type": "string", "pattern": "^[0-9]{1,19}$", "description": "Time to live in milliseconds."},
                "message_id": {"type": "string"},
                "timestamp": {"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_991u64}, "type": {"type": "string"},
                "user_id": {"type": "string"}, "app_id": {"type": "string"},
                "cluster_id": {"type": "string"}}},
            "PublishRequest": {"oneOf": [
                {"type": "object", "required": ["routing_key", "payload"], "properties": {
                    "routing_key": {"type": "string"}, "payload": {"type": "string"},
                    "payload_encoding": {"type": "string", "enum": ["string"], "default": "string"},
                    "properties": schema_ref("Properties")}},
                {"type": "object", "required": ["routing_key", "payload", "payload_encoding"], "properties": {
                    "routing_key": {"type": "string"},
                    "payload": {"type": "string", "pattern": "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"},
                    "payload_encoding": {"type": "string", "enum": ["base64"]},
                    "properties": schema_ref("Properties")}},
            ]},
            "PublishResult": {"type": "object", "required": ["routed", "rejected"], "properties": {
                "routed": {"type": "boolean"}, "rejected": {"type": "boolean"}}},
            "GetRequest": {"type": "object", "required": ["count", "ackmode"], "properties": {
                "count": {"type": "integer", "minimum": 1, "maximum": 10000},
                "ackmode": {"type": "string", "enum": ["ack_requeue_true", "ack_requeue_false", "reject_requeue_true", "reject_requeue_false"]},
                "encoding": {"type": "string", "enum": ["auto", "base64"], "default": "auto"},
                "truncate": {"type": "integer", "nullable": true, "minimum": 0, "maximum": 4294967295u64}}},
            "GetMessage": {"type": "object", "required": ["payload", "payload_encoding", "payload_bytes", "redelivered", "exchange", "routing_key", "message_count", "properties"], "properties": {
                "payload": {"type": "string"},
                "payload_encoding": {"type": "string", "enum": ["string", "base64"]},
                "payload_bytes": {"type": "integer"}, "redelivered": {"type": "boolean"},
                "exchange": {"type": "string"}, "routing_key": {"type": "string"},
                "message_count": {"type": "integer"}, "properties": schema_ref("Properties")}},
        },
    })
}

fn with_operator_schemas(mut components: Value) -> Value {
    if let (Some(all), Value::Object(more)) =
        (components["schemas"].as_object_mut(), operator_schemas())
    {
        all.extend(more);
    }
    if let (Some(all), Value::Object(more)) =
        (components["schemas"].as_object_mut(), access_schemas())
    {
        all.extend(more);
    }
    components
}

/// The schemas of connections, channels, consumers, dead letters and
/// redrives (apart from `components` only to keep each `json!` small
/// enough for the macro's recursion limit).
fn operator_schemas() -> Value {
    let mut more = trace_schemas();
    if let (Some(more), Value::Object(rest)) = (more.as_object_mut(), operator_schemas_rest()) {
        more.extend(rest);
    }
    more
}

fn trace_schemas() -> Value {
    json!({
        "TraceSettings": {"type": "object", "required": ["enabled", "capacity", "sample_one_in"], "properties": {
            "enabled": {"type": "boolean"},
            "capacity": {"type": "integer", "nullable": true},
            "sample_one_in": {"type": "integer", "nullable": true}}},
        "TraceSettingsRequest": {"type": "object", "required": ["enabled"], "additionalProperties": false, "properties": {
            "enabled": {"type": "boolean"},
            "capacity": {"type": "integer", "nullable": true, "minimum": 1, "maximum": 1_000_000, "default": 10_000},
            "sample_one_in": {"type": "integer", "nullable": true, "minimum": 1, "maximum": 1_000_000, "default": 1}}},
        "Trace": {"type": "object", "required": ["correlation_id", "messages"], "properties": {
            "correlation_id": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "object", "required": ["correlation_id", "vhost", "exchange", "routing_key", "queues", "published_at", "events"], "properties": {
                "message_id": {"type": "string", "nullable": true},
                "correlation_id": {"type": "string"},
                "causation_id": {"type": "string", "nullable": true},
                "type": {"type": "string", "nullable": true},
                "app_id": {"type": "string", "nullable": true},
                "vhost": {"type": "string"},
                "exchange": {"type": "string"}, "routing_key": {"type": "string"},
                "queues": {"type": "array", "items": {"type": "string"}},
                "published_at": {"type": "integer", "description": "Milliseconds since the Unix epoch."},
                "events": {"type": "array", "items": {"type": "object", "required": ["kind", "queue", "consumer_tag", "at"], "properties": {
                    "kind": {"type": "string", "enum": ["delivered", "acked", "rejected", "requeued"]},
                    "queue": {"type": "string"},
                    "consumer_tag": {"type": "string", "nullable": true},
                    "at": {"type": "integer"}}}}}}}}},
    })
}

fn operator_schemas_rest() -> Value {
    json!({
            "DeadLetterQueue": {"type": "object", "required": ["name", "vhost", "messages", "messages_ready", "messages_unacknowledged", "consumers", "sources"], "properties": {
                "name": {"type": "string"}, "vhost": {"type": "string"},
                "messages": {"type": "integer"}, "messages_ready": {"type": "integer"},
                "messages_unacknowledged": {"type": "integer"}, "consumers": {"type": "integer"},
                "sources": {"type": "array", "items": {"type": "string"}, "description": "The queues whose dead-letter exchange routes here."}}},
            "Death": {"type": "object", "description": "One x-death entry, most recent first.", "properties": {
                "queue": {"type": "string", "nullable": true}, "reason": {"type": "string", "nullable": true},
                "count": {"type": "integer", "nullable": true}, "exchange": {"type": "string", "nullable": true},
                "routing_keys": {"type": "array", "items": {"type": "string"}},
                "time": {"type": "integer", "nullable": true, "description": "Seconds since the Unix epoch."},
                "original_expiration": {"type": "string", "nullable": true}}},
            "PeekedMessage": {"type": "object", "required": ["offset", "payload", "payload_encoding", "payload_bytes", "redelivered", "delivery_count", "exchange", "routing_key", "properties", "deaths", "error", "failed_service", "redrive_target"], "properties": {
                "offset": {"type": "integer"}, "payload": {"type": "string"},
                "payload_encoding": {"type": "string", "enum": ["string", "base64"]},
                "payload_bytes": {"type": "integer"}, "redelivered": {"type": "boolean"},
                "delivery_count": {"type": "integer"},
                "exchange": {"type": "string"}, "routing_key": {"type": "string"},
                "properties": schema_ref("Properties"),
                "deaths": {"type": "array", "items": schema_ref("Death")},
                "error": {"type": "string", "nullable": true, "description": "The tern-error header."},
                "failed_service": {"type": "string", "nullable": true, "description": "The tern-failed-service header."},
                "redrive_target": {"type": "object", "nullable": true, "properties": {
                    "exchange": {"type": "string"}, "routing_key": {"type": "string"}}}}},
            "RedriveRequest": {"type": "object", "required": ["rate_per_second"], "additionalProperties": false, "properties": {
                "rate_per_second": {"type": "number", "minimum": 0.001, "maximum": 10000},
                "limit": {"type": "integer", "nullable": true, "minimum": 1, "maximum": 9_007_199_254_740_991u64},
                "to_exchange": {"type": "string", "nullable": true, "description": "Send every message here (`amq.default` or empty: the default exchange) instead of where it came from."},
                "routing_key": {"type": "string", "nullable": true, "description": "Send every message with this routing key instead of its target's."}}},
            "Redrive": {"type": "object", "required": ["id", "vhost", "queue", "state", "moved", "remaining", "total", "rate_per_second", "reason"], "properties": {
                "id": {"type": "integer"}, "vhost": {"type": "string"}, "queue": {"type": "string"},
                "state": {"type": "string", "enum": ["running", "completed", "failed"]},
                "moved": {"type": "integer"}, "remaining": {"type": "integer"},
                "total": {"type": "integer"}, "rate_per_second": {"type": "number"},
                "reason": {"type": "string", "nullable": true}}},
            "Connection": {"type": "object", "required": ["name", "peer_host", "peer_port", "host", "port", "user", "vhost", "protocol", "connected_at", "channels", "recv_oct", "send_oct", "recv_oct_details", "send_oct_details"], "properties": {
                "recv_oct": {"type": "integer", "minimum": 0, "description": "Bytes received from the client."},
                "send_oct": {"type": "integer", "minimum": 0, "description": "Bytes sent to the client."},
                "recv_oct_details": {"type": "object", "required": ["rate"], "properties": {"rate": {"type": "number", "description": "Bytes per second received over the last sampling interval."}}},
                "send_oct_details": {"type": "object", "required": ["rate"], "properties": {"rate": {"type": "number", "description": "Bytes per second sent over the last sampling interval."}}},
                "name": {"type": "string"}, "peer_host": {"type": "string"},
                "peer_port": {"type": "integer"}, "host": {"type": "string"},
                "port": {"type": "integer"}, "user": {"type": "string"},
                "vhost": {"type": "string"}, "protocol": {"type": "string"},
                "connected_at": {"type": "integer", "description": "Milliseconds since the Unix epoch."},
                "channels": {"type": "integer"}}},
            "Channel": {"type": "object", "required": ["name", "number", "connection_name", "vhost", "consumer_count", "messages_unacknowledged"], "properties": {
                "name": {"type": "string"},
                "number": {"type": "integer", "nullable": true},
                "connection_name": {"type": "string", "nullable": true},
                "vhost": {"type": "string"}, "consumer_count": {"type": "integer"},
                "messages_unacknowledged": {"type": "integer"}}},
            "Consumer": {"type": "object", "required": ["consumer_tag", "queue", "vhost", "channel", "connection_name", "prefetch_count", "ack_mode", "ack_required", "exclusive", "priority"], "properties": {
                "consumer_tag": {"type": "string"}, "queue": {"type": "string"},
                "vhost": {"type": "string"}, "channel": {"type": "string"},
                "connection_name": {"type": "string", "nullable": true},
                "prefetch_count": {"type": "integer"},
                "ack_mode": {"type": "string", "enum": ["manual", "auto"]},
                "ack_required": {"type": "boolean"}, "exclusive": {"type": "boolean"},
                "priority": {"type": "integer"}}},
    })
}

/// Every basic property may be null, which reads as not set.
fn nullable_properties(mut components: Value) -> Value {
    if let Some(props) = components["schemas"]["Properties"]["properties"].as_object_mut() {
        for schema in props.values_mut() {
            if schema.get("$ref").is_none() {
                schema["nullable"] = Value::Bool(true);
            }
        }
    }
    components
}

/// The OpenAPI 3 document of the API.
pub fn document() -> Value {
    let name = |what: &str| path_param("name", what);
    let ex = || name("The exchange (`amq.default` for the default exchange).");
    let q = || name("The queue.");
    let src = || {
        path_param(
            "source",
            "The source exchange (`amq.default` for the default exchange).",
        )
    };
    let dq = || path_param("destination", "The destination queue.");
    let dx = || path_param("destination", "The destination exchange.");
    let props = || path_param("props", "The binding's properties key, as listed by GET.");
    let if_unused = || {
        query_param(
            "if-unused",
            "Refuse (409) while in use.",
            json!({"type": "boolean"}),
        )
    };
    let mut list_vhost = list_params();
    list_vhost.insert(0, vhost());

    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Tern management API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Manage and inspect a Tern broker: vhosts, exchanges, queues, bindings and messages. Errors are JSON {error, reason}. Administrators and monitoring users see every vhost; other users see only the vhosts they have permissions in (and only their own connections and channels), in every listing, and change exchanges, queues and bindings where their permission patterns allow, as over AMQP.",
        },
        "security": [{"basic": []}, {"bearer": []}],
        "components": nullable_properties(with_operator_schemas(components())),
        "paths": {
            "/api/overview": {
                "get": op("The broker at a glance, over the vhosts the caller sees.", vec![], None, ("200", Some(schema_ref("Overview"))), &[]),
            },
            "/api/vhosts": {
                "get": op("Every vhost the caller sees.", vec![], None, ("200", Some(json!({"type": "array", "items": schema_ref("Vhost")}))), &[]),
            },
            "/api/vhosts/{vhost}": {
                "get": op("One vhost.", vec![vhost()], None, ("200", Some(schema_ref("Vhost"))), &["400", "404"]),
                "put": op("Creates a vhost (204 if it exists). Administrators only.", vec![vhost()], None, ("201,204", None), &["400", "403"]),
                "delete": op("Deletes a vhost with everything in it, permissions included. Administrators only.", vec![vhost()], None, ("204", None), &["400", "403", "404"]),
            },
            "/api/exchanges": {
                "get": op("Every exchange of the vhosts the caller sees.", list_params(), None, ("200", Some(list_of("Exchange"))), &["400"]),
            },
            "/api/exchanges/{vhost}": {
                "get": op("The exchanges of a vhost.", list_vhost.clone(), None, ("200", Some(list_of("Exchange"))), &["400", "404"]),
            },
            "/api/exchanges/{vhost}/{name}": {
                "get": op("One exchange.", vec![vhost(), ex()], None, ("200", Some(schema_ref("Exchange"))), &["400", "404"]),
                "put": op("Declares an exchange (204 if an equivalent one exists).", vec![vhost(), ex()], Some(schema_ref("ExchangeDeclare")), ("201,204", None), &["400", "403", "404", "409"]),
                "delete": op("Deletes an exchange.", vec![vhost(), ex(), if_unused()], None, ("204", None), &["400", "403", "404", "409"]),
            },
            "/api/exchanges/{vhost}/{name}/publish": {
                "post": op("Publishes a message; answers once it is durable.", vec![vhost(), ex()], Some(schema_ref("PublishRequest")), ("200", Some(schema_ref("PublishResult"))), &["400", "403", "404"]),
            },
            "/api/exchanges/{vhost}/{name}/bindings/source": {
                "get": op("The bindings this exchange routes by.", vec![vhost(), ex()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Binding")}))), &["400", "404"]),
            },
            "/api/exchanges/{vhost}/{name}/bindings/destination": {
                "get": op("The exchange-to-exchange bindings that route to this exchange.", vec![vhost(), ex()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Binding")}))), &["400", "404"]),
            },
            "/api/queues": {
                "get": op("Every queue of the vhosts the caller sees.", list_params(), None, ("200", Some(list_of("Queue"))), &["400"]),
            },
            "/api/queues/{vhost}": {
                "get": op("The queues of a vhost.", list_vhost.clone(), None, ("200", Some(list_of("Queue"))), &["400", "404"]),
            },
            "/api/queues/{vhost}/{name}": {
                "get": op("One queue.", vec![vhost(), q()], None, ("200", Some(schema_ref("Queue"))), &["400", "404"]),
                "put": op("Declares a queue (204 if an equivalent one exists).", vec![vhost(), q()], Some(schema_ref("QueueDeclare")), ("201,204", None), &["400", "403", "404", "409"]),
                "delete": op("Deletes a queue and its messages.", vec![vhost(), q(), if_unused(),
                    query_param("if-empty", "Refuse (409) while it holds messages.", json!({"type": "boolean"}))],
                    None, ("204", None), &["400", "404", "409"]),
            },
            "/api/queues/{vhost}/{name}/contents": {
                "delete": op("Purges the queue's ready messages.", vec![vhost(), q()], None, ("204", None), &["400", "404", "409"]),
            },
            "/api/queues/{vhost}/{name}/get": {
                "post": op("Fetches messages (destructive unless requeued).", vec![vhost(), q()], Some(schema_ref("GetRequest")), ("200", Some(json!({"type": "array", "items": schema_ref("GetMessage")}))), &["400", "404", "409"]),
            },
            "/api/queues/{vhost}/{name}/bindings": {
                "get": op("The bindings that route to this queue (not the default exchange's implicit one).", vec![vhost(), q()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Binding")}))), &["400", "404"]),
            },
            "/api/queues/{vhost}/{name}/offsets": {
                "get": op("A stream's first and end offsets and, per consumer (attached ones, then named ones that are away), its next offset, committed offset (named consumers) and lag; 409 if the queue is not a stream.", vec![vhost(), q()], None, ("200", Some(schema_ref("StreamOffsets"))), &["400", "404", "409"]),
            },
            "/api/bindings": {
                "get": op("Every binding of the vhosts the caller sees.", list_params(), None, ("200", Some(list_of("Binding"))), &["400"]),
            },
            "/api/bindings/{vhost}": {
                "get": op("The bindings of a vhost.", list_vhost, None, ("200", Some(list_of("Binding"))), &["400", "404"]),
            },
            "/api/bindings/{vhost}/e/{source}/q/{destination}": {
                "get": op("The bindings from an exchange to a queue.", vec![vhost(), src(), dq()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Binding")}))), &["400", "404"]),
                "post": op("Binds a queue to an exchange; Location names the binding.", vec![vhost(), src(), dq()], Some(schema_ref("BindingDeclare")), ("201", None), &["400", "403", "404", "409"]),
            },
            "/api/bindings/{vhost}/e/{source}/q/{destination}/{props}": {
                "get": op("One binding from an exchange to a queue.", vec![vhost(), src(), dq(), props()], None, ("200", Some(schema_ref("Binding"))), &["400", "404"]),
                "delete": op("Removes a binding from an exchange to a queue.", vec![vhost(), src(), dq(), props()], None, ("204", None), &["400", "403", "404", "409"]),
            },
            "/api/bindings/{vhost}/e/{source}/e/{destination}": {
                "get": op("The bindings from an exchange to an exchange.", vec![vhost(), src(), dx()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Binding")}))), &["400", "404"]),
                "post": op("Binds an exchange to an exchange; Location names the binding.", vec![vhost(), src(), dx()], Some(schema_ref("BindingDeclare")), ("201", None), &["400", "403", "404"]),
            },
            "/api/bindings/{vhost}/e/{source}/e/{destination}/{props}": {
                "get": op("One binding from an exchange to an exchange.", vec![vhost(), src(), dx(), props()], None, ("200", Some(schema_ref("Binding"))), &["400", "404"]),
                "delete": op("Removes a binding from an exchange to an exchange.", vec![vhost(), src(), dx(), props()], None, ("204", None), &["400", "403", "404"]),
            },
            "/api/openapi.json": {
                "get": {"summary": "This document.", "security": [], "responses": {"200": {"description": "The OpenAPI document.", "content": json_content(json!({"type": "object"}))}}},
            },
            "/metrics": {
                "get": {"summary": "Prometheus metrics in text format.", "security": [], "responses": {"200": {"description": "Prometheus text exposition.", "content": {"text/plain": {"schema": {"type": "string"}}}}}},
            },
        },
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        paths.extend(operator_paths());
        paths.extend(super_stream_paths());
        paths.extend(access_paths());
        for (path, item) in paths.iter_mut() {
            if path.contains("{vhost}") {
                refusable(item);
            }
        }
    }
    doc
}

/// Every operation on a vhost's entities may be 403 for a user who is not
/// an administrator: a vhost they have no permissions in, or an exchange or
/// queue their permission patterns do not cover (`scope.rs`).
fn refusable(item: &mut Value) {
    let Some(ops) = item.as_object_mut() else {
        return;
    };
    for op in ops.values_mut() {
        if let Some(responses) = op["responses"].as_object_mut() {
            responses
                .entry("403")
                .or_insert_with(|| json!({"$ref": "#/components/responses/E403"}));
        }
    }
}

/// The super stream route.
fn super_stream_paths() -> Map<String, Value> {
    let ex = || path_param("name", "The super stream's exchange.");
    let Value::Object(paths) = json!({
            "/api/exchanges/{vhost}/{name}/partitions": {
                "get": op("A super stream's partitions (an x-super-stream exchange's streams NAME-0..N-1) and, per partition, each consumer group's members in arrival order, its active member (null during a hand-over) and committed offset; 409 if the exchange is not a super stream.", vec![vhost(), ex()], None, ("200", Some(schema_ref("SuperStream"))), &["400", "404", "409"]),
            }
    }) else {
        return Map::new();
    };
    paths
}

/// A super stream's partitions and consumer groups (its own function: the
/// components' `json!` would otherwise pass the macro recursion limit).
fn super_stream_schema() -> Value {
    json!({"type": "object", "required": ["vhost", "name", "partition_key_header", "partitions"], "properties": {
        "vhost": {"type": "string"},
        "name": {"type": "string"},
        "partition_key_header": {"type": "string", "nullable": true, "description": "x-partition-key-header: the header whose value is the partition key, else the routing key."},
        "partitions": {"type": "array", "items": {"type": "object", "required": ["index", "queue", "exists", "messages", "groups"], "properties": {
            "index": {"type": "integer", "minimum": 0},
            "queue": {"type": "string", "description": "The partition's stream, NAME-index."},
            "exists": {"type": "boolean", "description": "false if the stream was deleted on its own."},
            "messages": {"type": "integer", "minimum": 0},
            "groups": {"type": "array", "items": {"type": "object", "required": ["name", "members", "active", "committed"], "properties": {
                "name": {"type": "string", "description": "The group: its members' x-stream-consumer-name."},
                "members": {"type": "array", "items": {"type": "string"}, "description": "Consumer tags, in arrival order."},
                "active": {"type": "string", "nullable": true, "description": "The consumer tag that receives; null while the previous one finishes its in-flight messages."},
                "committed": {"type": "integer", "nullable": true, "minimum": 0, "description": "The group's committed offset on this partition."},
            }}},
        }}},
    }})
}

/// Users, permissions and whoami (administrators only, but whoami).
fn access_paths() -> Map<String, Value> {
    let user = || path_param("name", "The user.");
    let puser = || path_param("user", "The user.");
    let admin = "Administrators only.";
    let paths = json!({
        "/api/whoami": {
            "get": op("Who the request is authenticated as.", vec![], None, ("200", Some(schema_ref("Whoami"))), &[]),
        },
        "/api/users": {
            "get": op(&format!("Every user (never a password or its hash). {admin}"), vec![], None, ("200", Some(json!({"type": "array", "items": schema_ref("User")}))), &["403"]),
        },
        "/api/users/{name}": {
            "get": op(&format!("One user. {admin}"), vec![user()], None, ("200", Some(schema_ref("User"))), &["400", "403", "404"]),
            "put": op(&format!("Creates or replaces a user (204 if it existed); without a password an existing user keeps theirs. {admin}"), vec![user()], Some(schema_ref("UserPut")), ("201,204", None), &["400", "403"]),
            "delete": op(&format!("Deletes a user and their permissions. {admin}"), vec![user()], None, ("204", None), &["400", "403", "404"]),
        },
        "/api/users/{name}/permissions": {
            "get": op(&format!("A user's permissions in every vhost. {admin}"), vec![user()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Permission")}))), &["400", "403", "404"]),
        },
        "/api/vhosts/{vhost}/permissions": {
            "get": op(&format!("Every user's permissions in a vhost. {admin}"), vec![vhost()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Permission")}))), &["400", "403", "404"]),
        },
        "/api/permissions": {
            "get": op(&format!("Every user's permissions in every vhost. {admin}"), vec![], None, ("200", Some(json!({"type": "array", "items": schema_ref("Permission")}))), &["403"]),
        },
        "/api/permissions/{vhost}/{user}": {
            "get": op(&format!("A user's permissions in a vhost. {admin}"), vec![vhost(), puser()], None, ("200", Some(schema_ref("Permission"))), &["400", "403", "404"]),
            "put": op(&format!("Sets a user's permissions in a vhost (204 if they had some): regular expressions matched anywhere in a name, as RabbitMQ's; empty grants nothing. {admin}"), vec![vhost(), puser()], Some(schema_ref("PermissionPut")), ("201,204", None), &["400", "403", "404"]),
            "delete": op(&format!("Removes a user's permissions in a vhost. {admin}"), vec![vhost(), puser()], None, ("204", None), &["400", "403", "404"]),
        },
    });
    match paths {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn access_schemas() -> Value {
    let tags = json!({"type": "array", "items": {"type": "string", "enum": ["administrator", "management", "monitoring", "policymaker"]}});
    json!({
        "Whoami": {"type": "object", "required": ["name", "tags"], "properties": {
            "name": {"type": "string"}, "tags": tags.clone()}},
        "User": {"type": "object", "required": ["name", "tags", "has_password"], "properties": {
            "name": {"type": "string"}, "tags": tags.clone(), "has_password": {"type": "boolean"}}},
        "UserPut": {"type": "object", "properties": {
            "password": {"type": "string"},
            "tags": {"description": "A list, or RabbitMQ's comma-separated string.", "oneOf": [tags, {"type": "string"}]}}},
        "Permission": {"type": "object", "required": ["user", "vhost", "configure", "write", "read"], "properties": {
            "user": {"type": "string"}, "vhost": {"type": "string"},
            "configure": {"type": "string"}, "write": {"type": "string"}, "read": {"type": "string"}}},
        "PermissionPut": {"type": "object", "required": ["configure", "write", "read"], "properties": {
            "configure": {"type": "string"}, "write": {"type": "string"}, "read": {"type": "string"}}},
    })
}

/// Connections, channels, consumers, dead letters and redrives.
fn operator_paths() -> Map<String, Value> {
    let conn = || {
        path_param(
            "name",
            "The connection's name, `PEER -> LOCAL`, percent-encoded.",
        )
    };
    let mut events = op("Live updates: a `snapshot` event every second with the overview, queue depths, dead-letter queues, redrive jobs, connections and consumers.", vec![], None, ("200", None), &[]);
    events["responses"]["200"]["content"] = json!({"text/event-stream": {"schema": {"type": "string",
        "description": "Server-Sent Events; each `data:` is a JSON object {overview, queues, dlqs, redrives, connections, consumers}."}}});
    let paths = json!({
        "/api/events": {"get": events},
        "/api/rates": {
            "get": op("The last samples (10 minutes at 5 s by default) of the message rates and of every queue's depth, for charts.", vec![], None, ("200", Some(schema_ref("RateHistory"))), &[]),
        },
        "/api/traces/{correlation_id}": {
            "get": op("A message flow: the traced messages with this correlation id, in publish order, with their deliveries and settlements.", vec![path_param("correlation_id", "The correlation id.")],
                None, ("200", Some(schema_ref("Trace"))), &["404"]),
        },
        "/api/trace-settings": {
            "get": op("How message tracing is set (off by default).", vec![], None, ("200", Some(schema_ref("TraceSettings"))), &[]),
            "put": op("Turns message tracing on (clearing the index) or off. Administrators only.", vec![], Some(schema_ref("TraceSettingsRequest")), ("200", Some(schema_ref("TraceSettings"))), &["400", "403"]),
        },
            "/api/dlq": {
                "get": op("The dead-letter queues (named *.dlq, or targets of some queue's dead-letter exchange) with depths.", vec![], None, ("200", Some(json!({"type": "array", "items": schema_ref("DeadLetterQueue")}))), &[]),
            },
            "/api/queues/{vhost}/{name}/messages": {
                "get": op("The next messages of a queue, left in it, with x-death and tern-error decoded.", vec![vhost(), path_param("name", "The queue."),
                    query_param("peek", "How many (default 10).", json!({"type": "integer", "minimum": 1, "maximum": 1000}))],
                    None, ("200", Some(json!({"type": "array", "items": schema_ref("PeekedMessage")}))), &["400", "404", "409"]),
            },
            "/api/queues/{vhost}/{name}/redrive": {
                "post": op("Starts moving a queue's messages back where they came from, rate-limited; each is acked only after its republish is confirmed.", vec![vhost(), path_param("name", "The queue.")],
                    Some(schema_ref("RedriveRequest")), ("202", Some(schema_ref("Redrive"))), &["400", "404"]),
            },
            "/api/redrives": {
                "get": op("Every redrive job the server remembers, of the vhosts the caller sees.", vec![], None, ("200", Some(json!({"type": "array", "items": schema_ref("Redrive")}))), &[]),
            },
            "/api/redrives/{id}": {
                "get": op("A redrive job's progress.", vec![json!({"name": "id", "in": "path", "required": true, "description": "The job's id.", "schema": {"type": "integer", "minimum": 0}})],
                    None, ("200", Some(schema_ref("Redrive"))), &["400", "404"]),
            },
            "/api/connections": {
                "get": op("Every client connection the caller sees (their own, unless administrator or monitoring).", list_params(), None, ("200", Some(list_of("Connection"))), &["400"]),
            },
            "/api/connections/{name}": {
                "get": op("One connection.", vec![conn()], None, ("200", Some(schema_ref("Connection"))), &["404"]),
                "delete": op("Closes a connection (AMQP 320 CONNECTION_FORCED with the reason): any for an administrator, one's own for other users (403 for another's they see, 404 for one they do not).", vec![conn(),
                    json!({"name": "X-Reason", "in": "header", "required": false, "description": "Why, as the client is told (at most 200 bytes).", "schema": {"type": "string", "maxLength": 200}})],
                    None, ("204", None), &["400", "403", "404"]),
            },
            "/api/channels": {
                "get": op("Every open channel the caller sees (of their own connections, unless administrator or monitoring).", list_params(), None, ("200", Some(list_of("Channel"))), &["400"]),
            },
            "/api/consumers": {
                "get": op("Every consumer of the vhosts the caller sees.", vec![], None, ("200", Some(json!({"type": "array", "items": schema_ref("Consumer")}))), &[]),
            },
            "/api/consumers/{vhost}": {
                "get": op("The consumers of a vhost's queues.", vec![vhost()], None, ("200", Some(json!({"type": "array", "items": schema_ref("Consumer")}))), &["400", "404"]),
            },
    });
    match paths {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The `/api/openapi.json` handler.
pub(crate) async fn serve() -> Json<Value> {
    Json(document())
}
