//! What the AMQP operator commands (`publish`, `tail`, `dlq`) share:
//! connecting to `--url` with an error that says what to do, explaining
//! AMQP errors, and printing a message (text or JSON).

use std::io::ErrorKind as IoErrorKind;

use anyhow::Context;
use base64::Engine;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use serde_json::{json, Map, Value};

use crate::endpoint::{redact, Endpoint, DEFAULT_AMQP_URL};

/// Connects to the broker of `--url`, turning a failure into one line
/// with the fix.
pub(crate) async fn connect(endpoint: &Endpoint) -> anyhow::Result<Connection> {
    let url = endpoint.amqp()?;
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            let url = redact(&url);
            let refused = matches!(e.kind(), ErrorKind::IOError(io)
                if matches!(io.kind(), IoErrorKind::ConnectionRefused | IoErrorKind::NotFound));
            if refused {
                anyhow::anyhow!(
                    "cannot connect to {url}: connection refused; is `tern serve` running? start it with `tern serve`, or point --url (or TERN_URL) at your broker"
                )
            } else if let ErrorKind::ProtocolError(amqp) = e.kind() {
                anyhow::anyhow!(
                    "cannot connect to {url}: the broker refused ({amqp}); check the user, password and vhost in --url (or TERN_URL)"
                )
            } else {
                anyhow::anyhow!(
                    "cannot connect to {url}: {e}; check --url (or TERN_URL), e.g. {DEFAULT_AMQP_URL}"
                )
            }
        })
}

/// An AMQP error on `entity` (`queue "q"`, say) with what it means; a 404
/// names the missing thing.
pub(crate) fn explain(e: lapin::Error, doing: &str, entity: &str) -> anyhow::Error {
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        if amqp.get_id() == 404 {
            return anyhow::anyhow!(
                "{doing}: the broker answered 404 NOT_FOUND: there is no {entity} in this vhost ({}); check the name (names are case-sensitive) and the vhost in --url",
                amqp.get_message()
            );
        }
        return anyhow::anyhow!("{doing}: the broker refused: {amqp}");
    }
    anyhow::anyhow!("{doing}: {e}")
}

/// A header table as JSON (strings as strings, byte arrays as base64,
/// tables and arrays nested).
pub(crate) fn table_json(table: &FieldTable) -> Value {
    let mut map = Map::new();
    for (k, v) in table {
        map.insert(k.to_string(), value_json(v));
    }
    Value::Object(map)
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::DecimalValue(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => json!(s),
            Err(_) => json!(base64::engine::general_purpose::STANDARD.encode(s.as_bytes())),
        },
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => {
            json!(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

/// A header's value as a string, if it is one.
pub(crate) fn header_str<'a>(table: &'a FieldTable, key: &str) -> Option<&'a str> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A delivered message as one JSON object: where it came from, its
/// properties and headers, and its body as UTF-8 or, failing that, base64.
pub(crate) fn message_json(delivery: &Delivery) -> Value {
    let p = &delivery.properties;
    let mut props = Map::new();
    let strings = [
        ("content_type", p.content_type()),
        ("content_encoding", p.content_encoding()),
        ("correlation_id", p.correlation_id()),
        ("reply_to", p.reply_to()),
        ("expiration", p.expiration()),
        ("message_id", p.message_id()),
        ("type", p.kind()),
        ("user_id", p.user_id()),
        ("app_id", p.app_id()),
    ];
    for (name, value) in strings {
        if let Some(v) = value {
            props.insert(name.to_string(), json!(v.as_str()));
        }
    }
    if let Some(mode) = p.delivery_mode() {
        props.insert("delivery_mode".to_string(), json!(mode));
    }
    if let Some(priority) = p.priority() {
        props.insert("priority".to_string(), json!(priority));
    }
    if let Some(ts) = p.timestamp() {
        props.insert("timestamp".to_string(), json!(ts));
    }
    let (body, encoding) = match std::str::from_utf8(&delivery.data) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&delivery.data),
            "base64",
        ),
    };
    json!({
        "exchange": delivery.exchange.as_str(),
        "routing_key": delivery.routing_key.as_str(),
        "redelivered": delivery.redelivered,
        "properties": props,
        "headers": p.headers().as_ref().map_or(Value::Object(Map::new()), table_json),
        "body": body,
        "body_encoding": encoding,
    })
}

/// A message for a person: a heading line, the properties and headers one
/// per line, then the body.
pub(crate) fn message_text(delivery: &Delivery, index: u64) -> String {
    let m = message_json(delivery);
    let mut out = format!(
        "--- message {index}: exchange {:?}, routing key {:?}{}\n",
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        if delivery.redelivered {
            ", redelivered"
        } else {
            ""
        }
    );
    for section in ["properties", "headers"] {
        if let Some(Value::Object(map)) = m.get(section) {
            for (k, v) in map {
                out.push_str(&format!("{k}: {v}\n"));
            }
        }
    }
    let body = m.get("body").and_then(Value::as_str).unwrap_or("");
    if m.get("body_encoding").and_then(Value::as_str) == Some("base64") {
        out.push_str(&format!("body (base64, not UTF-8): {body}\n"));
    } else {
        out.push_str(&format!("body: {body}\n"));
    }
    out
}

/// Writes `text` to stdout; `Ok(false)` once the reader has gone (a
/// closed pipe, as with `tern tail … | head`), which ends a command quietly
/// where `println!` would panic.
pub(crate) fn emit(text: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == IoErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// A current-thread runtime for one operator command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
