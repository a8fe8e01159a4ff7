//! Header and argument values, independent of any wire protocol.
//!
//! AMQP field tables, HTTP JSON bodies and the toolkit's headers all convert
//! to and from these types at the edge, so the engine has one vocabulary.

use std::collections::BTreeMap;

use bytes::Bytes;

/// A table of named values: message headers, or declaration arguments.
pub type FieldTable = BTreeMap<String, FieldValue>;

/// One header or argument value. The variants follow AMQP 0-9-1's field
/// types as RabbitMQ uses them, since that is what clients send.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A boolean.
    Bool(bool),
    /// A signed 8-bit integer.
    I8(i8),
    /// An unsigned 8-bit integer.
    U8(u8),
    /// A signed 16-bit integer.
    I16(i16),
    /// An unsigned 16-bit integer.
    U16(u16),
    /// A signed 32-bit integer.
    I32(i32),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A signed 64-bit integer.
    I64(i64),
    /// A 32-bit float.
    F32(f32),
    /// A 64-bit float.
    F64(f64),
    /// A decimal: `value` scaled down by 10^`scale`.
    Decimal {
        /// Digits after the point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// A UTF-8 string (AMQP long string).
    String(String),
    /// Raw bytes (AMQP byte array, or a long string that is not UTF-8).
    Bytes(Bytes),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    /// A nested table.
    Table(FieldTable),
    /// A list of values.
    Array(Vec<FieldValue>),
    /// No value.
    Void,
}

impl FieldValue {
    /// The value as a signed integer, if it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string, if it is one (or valid UTF-8 bytes).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::String(s) => Some(s),
            FieldValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Bool(_) => "bool",
            FieldValue::I8(_) | FieldValue::I16(_) | FieldValue::I32(_) | FieldValue::I64(_) => {
                "signed integer"
            }
            FieldValue::U8(_) | FieldValue::U16(_) | FieldValue::U32(_) => "unsigned integer",
            FieldValue::F32(_) | FieldValue::F64(_) => "float",
            FieldValue::Decimal { .. } => "decimal",
            FieldValue::String(_) => "string",
            FieldValue::Bytes(_) => "bytes",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Table(_) => "table",
            FieldValue::Array(_) => "array",
            FieldValue::Void => "void",
        }
    }
}
