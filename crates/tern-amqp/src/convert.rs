//! Conversions between `amq-protocol`'s wire types and the broker's own
//! vocabulary: field tables and values, and basic properties.
//!
//! A long string that is valid UTF-8 becomes a broker string (and goes back
//! out as a long string); one that is not becomes bytes, which go back out as
//! a byte array. Short strings become strings and go back as long strings,
//! as RabbitMQ does.

use std::collections::BTreeMap;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable as WireTable, LongString,
    ShortString,
};
use bytes::Bytes;
use tern_broker::{FieldTable, FieldValue, Properties};

use crate::frame::short;

/// A wire table as a broker table.
pub(crate) fn table_from_wire(table: &WireTable) -> FieldTable {
    table
        .into_iter()
        .map(|(k, v)| (k.as_str().to_string(), value_from_wire(v)))
        .collect()
}

/// A broker table as a wire table. Keys longer than 255 bytes are cut.
pub(crate) fn table_to_wire(table: &FieldTable) -> WireTable {
    let map: BTreeMap<ShortString, AMQPValue> = table
        .iter()
        .map(|(k, v)| (short(k), value_to_wire(v)))
        .collect();
    WireTable::from(map)
}

fn string_or_bytes(bytes: &[u8]) -> FieldValue {
    match std::str::from_utf8(bytes) {
        Ok(s) => FieldValue::String(s.to_string()),
        Err(_) => FieldValue::Bytes(Bytes::copy_from_slice(bytes)),
    }
}

/// A wire value as a broker value.
pub(crate) fn value_from_wire(value: &AMQPValue) -> FieldValue {
    match value {
        AMQPValue::Boolean(b) => FieldValue::Bool(*b),
        AMQPValue::ShortShortInt(v) => FieldValue::I8(*v),
        AMQPValue::ShortShortUInt(v) => FieldValue::U8(*v),
        AMQPValue::ShortInt(v) => FieldValue::I16(*v),
        AMQPValue::ShortUInt(v) => FieldValue::U16(*v),
        AMQPValue::LongInt(v) => FieldValue::I32(*v),
        AMQPValue::LongUInt(v) => FieldValue::U32(*v),
        AMQPValue::LongLongInt(v) => FieldValue::I64(*v),
        AMQPValue::Float(v) => FieldValue::F32(*v),
        AMQPValue::Double(v) => FieldValue::F64(*v),
        AMQPValue::DecimalValue(d) => FieldValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => FieldValue::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => string_or_bytes(s.as_bytes()),
        AMQPValue::FieldArray(a) => {
            FieldValue::Array(a.as_slice().iter().map(value_from_wire).collect())
        }
        AMQPValue::Timestamp(t) => FieldValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => FieldValue::Table(table_from_wire(t)),
        AMQPValue::ByteArray(b) => FieldValue::Bytes(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => FieldValue::Void,
    }
}

/// A broker value as a wire value.
pub(crate) fn value_to_wire(value: &FieldValue) -> AMQPValue {
    match value {
        FieldValue::Bool(b) => AMQPValue::Boolean(*b),
        FieldValue::I8(v) => AMQPValue::ShortShortInt(*v),
        FieldValue::U8(v) => AMQPValue::ShortShortUInt(*v),
        FieldValue::I16(v) => AMQPValue::ShortInt(*v),
        FieldValue::U16(v) => AMQPValue::ShortUInt(*v),
        FieldValue::I32(v) => AMQPValue::LongInt(*v),
        FieldValue::U32(v) => AMQPValue::LongUInt(*v),
        FieldValue::I64(v) => AMQPValue::LongLongInt(*v),
        FieldValue::F32(v) => AMQPValue::Float(*v),
        FieldValue::F64(v) => AMQPValue::Double(*v),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        FieldValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(&b[..])),
        FieldValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        FieldValue::Table(t) => AMQPValue::FieldTable(table_to_wire(t)),
        FieldValue::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(value_to_wire).collect::<Vec<_>>(),
        )),
        FieldValue::Void => AMQPValue::Void,
    }
}

fn text(s: &Option<ShortString>) -> Option<String> {
    s.as_ref().map(|s| s.as_str().to_string())
}

/// Wire basic properties as the broker's properties.
pub(crate) fn properties_from_wire(p: &BasicProperties) -> Properties {
    Properties {
        content_type: text(p.content_type()),
        content_encoding: text(p.content_encoding()),
        headers: p.headers().as_ref().map(table_from_wire),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: text(p.correlation_id()),
        reply_to: text(p.reply_to()),
        expiration: text(p.expiration()),
        message_id: text(p.message_id()),
        timestamp: *p.timestamp(),
        kind: text(p.kind()),
        user_id: text(p.user_id()),
        app_id: text(p.app_id()),
        cluster_id: text(p.cluster_id()),
    }
}

/// The broker's properties as wire basic properties.
pub(crate) fn properties_to_wire(p: &Properties) -> BasicProperties {
    let mut w = BasicProperties::default();
    if let Some(v) = &p.content_type {
        w = w.with_content_type(short(v));
    }
    if let Some(v) = &p.content_encoding {
        w = w.with_content_encoding(short(v));
    }
    if let Some(v) = &p.headers {
        w = w.with_headers(table_to_wire(v));
    }
    if let Some(v) = p.delivery_mode {
        w = w.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        w = w.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        w = w.with_correlation_id(short(v));
    }
    if let Some(v) = &p.reply_to {
        w = w.with_reply_to(short(v));
    }
    if let Some(v) = &p.expiration {
        w = w.with_expiration(short(v));
    }
    if let Some(v) = &p.message_id {
        w = w.with_message_id(short(v));
    }
    if let Some(v) = p.timestamp {
        w = w.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        w = w.with_type(short(v));
    }
    if let Some(v) = &p.user_id {
        w = w.with_user_id(short(v));
    }
    if let Some(v) = &p.app_id {
        w = w.with_app_id(short(v));
    }
    if let Some(v) = &p.cluster_id {
        w = w.with_cluster_id(short(v));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip() {
        let mut inner = FieldTable::new();
        inner.insert("n".into(), FieldValue::I64(-3));
        let mut t = FieldTable::new();
        t.insert("s".into(), FieldValue::String("hé".into()));
        t.insert(
            "b".into(),
            FieldValue::Bytes(Bytes::from_static(&[0xff, 0])),
        );
        t.insert("t".into(), FieldValue::Table(inner));
        t.insert(
            "a".into(),
            FieldValue::Array(vec![FieldValue::Bool(true), FieldValue::Void]),
        );
        t.insert("d".into(), FieldValue::Decimal { scale: 2, value: 5 });
        t.insert("ts".into(), FieldValue::Timestamp(7));
        assert_eq!(table_from_wire(&table_to_wire(&t)), t);
    }

    #[test]
    fn properties_round_trip() {
        let mut headers = FieldTable::new();
        headers.insert("x".into(), FieldValue::I32(1));
        let p = Properties {
            content_type: Some("text/plain".into()),
            content_encoding: Some("gzip".into()),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(5),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            expiration: Some("1000".into()),
            message_id: Some("m".into()),
            timestamp: Some(12),
            kind: Some("k".into()),
            user_id: Some("guest".into()),
            app_id: Some("app".into()),
            cluster_id: Some("cl".into()),
        };
        assert_eq!(properties_from_wire(&properties_to_wire(&p)), p);
    }
}
