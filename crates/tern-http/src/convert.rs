//! JSON to and from the broker's vocabulary: argument and header tables,
//! basic properties, payloads (UTF-8 strings or base64), and request bodies.
//! Every conversion of client input returns a 400 [`ApiError`] naming the
//! field that is wrong.

use base64::Engine;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use tern_broker::{FieldTable, FieldValue, Properties};

use crate::error::ApiError;

/// Parses a JSON request body, which must be an object. An empty body
/// reads as `{}`, so that declarations with only defaults need none.
pub(crate) fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?
    };
    // serde would also fill a struct from an array; only objects are meant.
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body must be a JSON object, not {value}"
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// A JSON value as a header or argument value: integers become signed
/// 64-bit (as RabbitMQ's management API makes them), other numbers floats,
/// and so do integers too large for 64 signed bits (AMQP tables have no
/// unsigned 64-bit type; JavaScript clients see such numbers as floats too).
pub(crate) fn field_value(path: &str, v: &Value) -> Result<FieldValue, ApiError> {
    Ok(match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                FieldValue::I64(i)
            } else {
                FieldValue::F64(n.as_f64().unwrap_or_default())
            }
        }
        Value::String(s) => FieldValue::String(s.clone()),
        Value::Array(items) => FieldValue::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| field_value(&format!("{path}[{i}]"), item))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => FieldValue::Table(field_table(path, map)?),
    })
}

/// A JSON object as a table.
pub(crate) fn field_table(path: &str, map: &Map<String, Value>) -> Result<FieldTable, ApiError> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), field_value(&format!("{path}.{k}"), v)?)))
        .collect()
}

/// An optional JSON value that must be an object, as a table (`{}` if absent).
pub(crate) fn optional_table(path: &str, v: Option<&Value>) -> Result<FieldTable, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(FieldTable::new()),
        Some(Value::Object(map)) => field_table(path, map),
        Some(other) => Err(ApiError::bad_request(format!(
            "{path} must be a JSON object, not {other}"
        ))),
    }
}

fn number_f64(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A header or argument value as JSON. Bytes that are not UTF-8 are shown
/// in base64; decimals as numbers.
pub(crate) fn field_value_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::I8(i) => (*i).into(),
        FieldValue::U8(i) => (*i).into(),
        FieldValue::I16(i) => (*i).into(),
        FieldValue::U16(i) => (*i).into(),
        FieldValue::I32(i) => (*i).into(),
        FieldValue::U32(i) => (*i).into(),
        FieldValue::I64(i) => (*i).into(),
        FieldValue::F32(f) => number_f64(f64::from(*f)),
        FieldValue::F64(f) => number_f64(*f),
        FieldValue::Decimal { scale, value } => {
            number_f64(f64::from(*value) / 10f64.powi(i32::from(*scale)))
        }
        FieldValue::String(s) => Value::String(s.clone()),
        FieldValue::Bytes(b) => Value::String(match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => base64::engine::general_purpose::STANDARD.encode(b),
        }),
        FieldValue::Timestamp(t) => (*t).into(),
        FieldValue::Table(t) => field_table_json(t),
        FieldValue::Array(items) => Value::Array(items.iter().map(field_value_json).collect()),
        FieldValue::Void => Value::Null,
    }
}

/// A table as a JSON object.
pub(crate) fn field_table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.clone(), field_value_json(v)))
            .collect(),
    )
}

/// Basic properties as RabbitMQ's management API spells them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct PropertiesJson {
    content_type: Option<String>,
    content_encoding: Option<String>,
    headers: Option<Map<String, Value>>,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    message_id: Option<String>,
    timestamp: Option<u64>,
    #[serde(rename = "type")]
    kind: Option<String>,
    user_id: Option<String>,
    app_id: Option<String>,
    cluster_id: Option<String>,
}

impl PropertiesJson {
    /// Checks and converts to the broker's properties.
    pub(crate) fn into_properties(self) -> Result<Properties, ApiError> {
        if let Some(mode) = self.delivery_mode {
            if mode != 1 && mode != 2 {
                return Err(ApiError::bad_request(format!(
                    "properties.delivery_mode must be 1 (transient) or 2 (persistent), not {mode}"
                )));
            }
        }
        let headers = match self.headers {
            Some(map) => Some(field_table("properties.headers", &map)?),
            None => None,
        };
        Ok(Properties {
            content_type: self.content_type,
            content_encoding: self.content_encoding,
            headers,
            delivery_mode: self.delivery_mode,
            priority: self.priority,
            correlation_id: self.correlation_id,
            reply_to: self.reply_to,
            expiration: self.expiration,
            message_id: self.message_id,
            timestamp: self.timestamp,
            kind: self.kind,
            user_id: self.user_id,
            app_id: self.app_id,
            cluster_id: self.cluster_id,
        })
    }
}

/// Properties as JSON, leaving out those not set.
pub(crate) fn properties_json(p: &Properties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("content_type", p.content_type.clone().map(Value::from));
    put(
        "content_encoding",
        p.content_encoding.clone().map(Value::from),
    );
    put("headers", p.headers.as_ref().map(field_table_json));
    put("delivery_mode", p.delivery_mode.map(Value::from));
    put("priority", p.priority.map(Value::from));
    put("correlation_id", p.correlation_id.clone().map(Value::from));
    put("reply_to", p.reply_to.clone().map(Value::from));
    put("expiration", p.expiration.clone().map(Value::from));
    put("message_id", p.message_id.clone().map(Value::from));
    put("timestamp", p.timestamp.map(Value::from));
    put("type", p.kind.clone().map(Value::from));
    put("user_id", p.user_id.clone().map(Value::from));
    put("app_id", p.app_id.clone().map(Value::from));
    put("cluster_id", p.cluster_id.clone().map(Value::from));
    Value::Object(m)
}

/// How a payload is written in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PayloadEncoding {
    /// The payload is the string's UTF-8 bytes.
    String,
    /// The payload is base64.
    Base64,
}

/// Standard base64 with padding, accepting nonzero bits after the last
/// byte (as most decoders do), so that any string of the standard form
/// decodes.
const LENIENT_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// Decodes a payload given in a request.
pub(crate) fn decode_payload(payload: &str, encoding: PayloadEncoding) -> Result<Bytes, ApiError> {
    match encoding {
        PayloadEncoding::String => Ok(Bytes::copy_from_slice(payload.as_bytes())),
        PayloadEncoding::Base64 => LENIENT_BASE64
            .decode(payload)
            .map(Bytes::from)
            .map_err(|e| ApiError::bad_request(format!("payload is not valid base64: {e}"))),
    }
}

/// A payload for a response: as a string when it is UTF-8 and `auto` was
/// asked for, else base64. Returns the payload and its encoding's name.
pub(crate) fn encode_payload(body: &[u8], force_base64: bool) -> (String, &'static str) {
    if !force_base64 {
        if let Ok(s) = std::str::from_utf8(body) {
            return (s.to_string(), "string");
        }
    }
    (
        base64::engine::general_purpose::STANDARD.encode(body),
        "base64",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_round_trip_through_json() {
        let v = json!({"a": 1, "b": "x", "c": [true, null, 1.5], "d": {"e": -2}});
        let Value::Object(map) = &v else {
            panic!("an object")
        };
        let table = field_table("arguments", map).unwrap_or_default();
        assert_eq!(table.get("a"), Some(&FieldValue::I64(1)));
        assert_eq!(field_table_json(&table), v);
    }

    #[test]
    fn integers_beyond_signed_64_bits_become_floats() {
        assert_eq!(
            field_value("arguments.x", &json!(u64::MAX)).unwrap(),
            FieldValue::F64(u64::MAX as f64)
        );
        assert_eq!(
            field_value("arguments.x", &json!(i64::MIN)).unwrap(),
            FieldValue::I64(i64::MIN)
        );
    }

    #[test]
    fn payloads_decode_and_encode() {
        assert_eq!(
            decode_payload("aGk=", PayloadEncoding::Base64).ok(),
            Some(Bytes::from_static(b"hi"))
        );
        assert!(decode_payload("***", PayloadEncoding::Base64).is_err());
        // Trailing bits set in the last symbol: still "a".
        assert_eq!(
            decode_payload("YR==", PayloadEncoding::Base64).ok(),
            Some(Bytes::from_static(b"a"))
        );
        assert_eq!(encode_payload(b"hi", false), ("hi".into(), "string"));
        assert_eq!(encode_payload(&[0xff], false), ("/w==".into(), "base64"));
        assert_eq!(encode_payload(b"hi", true), ("aGk=".into(), "base64"));
    }
}
