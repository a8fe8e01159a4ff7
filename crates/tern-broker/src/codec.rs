//! The compact binary encoding of a message's metadata, stored in a
//! tern-storage record's `headers` bytes, and of standalone field tables
//! (such as the arguments of stored definitions).
//!
//! This module owns the byte layout below and nothing else: the body is
//! stored separately as the record body and is not part of it. Encoding
//! never fails and allocates nothing beyond the output buffer. Decoding never
//! panics on arbitrary bytes: every malformation is a [`CodecError`] naming
//! what was wrong and at which byte. It never allocates more than the input
//! could hold (declared lengths and counts are checked against the bytes
//! remaining before anything is reserved), and it rejects tables and arrays
//! nested deeper than [`MAX_DEPTH`], so hostile input cannot exhaust the stack.
//!
//! # Layout, version 1
//!
//! Integers are little-endian. A *varint* is an unsigned LEB128 integer of
//! at most 10 bytes (7 bits per byte, low groups first, high bit set on every
//! byte but the last); the decoder rejects over-long forms, so every value has
//! exactly one encoding. A *str* is a varint byte length followed by that many
//! bytes of UTF-8. Lengths are varints rather than AMQP's fixed `u8`/`u32`
//! prefixes because every string here is an unbounded Rust `String` (names
//! and properties may arrive over HTTP, not only as AMQP short strings), and
//! a varint costs one byte for anything shorter than 128 bytes.
//!
//! Message metadata ([`encode_meta`]):
//!
//! ```text
//! offset  size  field
//! 0       1     version = 1
//! 1       4     delivery count (u32); fixed position, so it can be patched in place
//! 5       2     property presence flags (u16), bit i set when property i is present
//! 7       ..    exchange name (str, at most 255 bytes)
//! ..      ..    routing key (str)
//! ..      ..    each present property, in bit order:
//!                bit  0  content-type      str
//!                bit  1  content-encoding  str
//!                bit  2  headers           table
//!                bit  3  delivery-mode     u8
//!                bit  4  priority          u8
//!                bit  5  correlation-id    str
//!                bit  6  reply-to          str
//!                bit  7  expiration        str
//!                bit  8  message-id        str
//!                bit  9  timestamp         u64
//!                bit 10  type              str
//!                bit 11  user-id           str
//!                bit 12  app-id            str
//!                bit 13  cluster-id        str
//!               bits 14 and 15 are reserved and must be clear.
//! ```
//!
//! A standalone table ([`encode_table`]) is the version byte (1) followed by
//! a table. Both encodings must end exactly where their last field ends;
//! trailing bytes are an error.
//!
//! A *table* is a varint entry count followed by that many entries, each a
//! key (str) and a value; keys are strictly increasing in byte order (as a
//! `BTreeMap` iterates), so duplicates are rejected. A *value* is a one-byte
//! type tag, AMQP's letters, followed by its payload:
//!
//! ```text
//! tag  FieldValue  payload
//! 't'  Bool        u8, 0 or 1
//! 'b'  I8          i8
//! 'B'  U8          u8
//! 's'  I16         i16
//! 'u'  U16         u16
//! 'I'  I32         i32
//! 'i'  U32         u32
//! 'l'  I64         i64
//! 'f'  F32         IEEE 754 bits, u32
//! 'd'  F64         IEEE 754 bits, u64
//! 'D'  Decimal     scale u8, then value u32
//! 'S'  String      str
//! 'x'  Bytes       varint length, then the bytes
//! 'T'  Timestamp   u64
//! 'F'  Table       table
//! 'A'  Array       varint element count, then that many values
//! 'V'  Void        nothing
//! ```
//!
//! The outermost table (headers, or a standalone table) is nesting level 1,
//! and each table or array inside a value adds a level. The encoder writes
//! any depth, so whatever accepts headers from a client must refuse those
//! nested deeper than [`MAX_DEPTH`], or the stored message will not decode.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::BrokerError;
use crate::message::Properties;
use crate::name::ExchangeName;
use crate::value::{FieldTable, FieldValue};

/// The encoding version this build writes, and the only one it reads.
pub const VERSION: u8 = 1;

/// The deepest nesting of tables and arrays the decoder accepts, counting the
/// outermost table as level 1.
pub const MAX_DEPTH: usize = 32;

/// Metadata stored with each message in a queue's log.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMeta {
    /// The exchange the message was published to.
    pub exchange: ExchangeName,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its basic properties.
    pub properties: Properties,
    /// How many times the message was delivered before this record was
    /// written (for requeue / `x-delivery-count`); 0 on publish.
    pub delivery_count: u32,
}

/// Why stored bytes could not be decoded. Every variant says where: `at` is
/// a byte offset into the decoded input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The version byte names an encoding this build does not read.
    #[error(
        "unsupported encoding version {version} at byte 0; this build reads version {VERSION}"
    )]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The input ended in the middle of a field.
    #[error("input ends while reading {what}: {needed}-byte read at byte {at}, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where the read started.
        at: usize,
        /// How many bytes the read needed.
        needed: usize,
        /// How many bytes were left.
        available: usize,
    },
    /// A length or count claims more than the rest of the input could hold.
    #[error(
        "{what} at byte {at} declares {declared}, more than the {available} bytes left could hold"
    )]
    LengthOverrun {
        /// The length or count being read.
        what: &'static str,
        /// Where the length or count starts.
        at: usize,
        /// The declared length or count.
        declared: u64,
        /// How many bytes were left after it.
        available: usize,
    },
    /// A varint is longer than 10 bytes, overflows 64 bits, or is not in its
    /// shortest form.
    #[error("malformed varint for {what} at byte {at}")]
    BadVarint {
        /// The length or count being read.
        what: &'static str,
        /// Where the varint starts.
        at: usize,
    },
    /// A string is not valid UTF-8.
    #[error("invalid UTF-8 in {what} at byte {at}")]
    InvalidUtf8 {
        /// The string being read.
        what: &'static str,
        /// The offset of the first invalid byte.
        at: usize,
    },
    /// The exchange name is longer than 255 bytes.
    #[error("exchange name at byte {at} is {len} bytes long; the limit is 255")]
    ExchangeNameTooLong {
        /// Where the name's bytes start.
        at: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// Reserved property flag bits are set.
    #[error("unknown property flags {flags:#06x} at byte {at}")]
    UnknownPropertyFlags {
        /// The whole flags word.
        flags: u16,
        /// Where the flags start.
        at: usize,
    },
    /// A field value's type tag is not one this encoding defines.
    #[error("unknown field value type tag {tag:#04x} at byte {at}")]
    UnknownTag {
        /// The tag found.
        tag: u8,
        /// Where the tag is.
        at: usize,
    },
    /// A boolean's byte is neither 0 nor 1.
    #[error("invalid boolean byte {byte:#04x} at byte {at}")]
    InvalidBool {
        /// The byte found.
        byte: u8,
        /// Where it is.
        at: usize,
    },
    /// A table key is not greater than the key before it.
    #[error("table key at byte {at} is a duplicate or out of order")]
    UnorderedKey {
        /// Where the key starts.
        at: usize,
    },
    /// Tables and arrays are nested deeper than [`MAX_DEPTH`].
    #[error("tables and arrays nested deeper than {MAX_DEPTH} levels at byte {at}")]
    TooDeep {
        /// Where the level too many starts.
        at: usize,
    },
    /// Bytes remain after the encoding ended.
    #[error("{count} unexpected trailing bytes at byte {at}")]
    TrailingBytes {
        /// Where the encoding ended.
        at: usize,
        /// How many bytes follow it.
        count: usize,
    },
}

impl From<CodecError> for BrokerError {
    fn from(e: CodecError) -> Self {
        BrokerError::Storage(format!("undecodable stored record: {e}"))
    }
}

// Property presence bits, in AMQP 0-9-1's property order.
const CONTENT_TYPE: u16 = 1 << 0;
const CONTENT_ENCODING: u16 = 1 << 1;
const HEADERS: u16 = 1 << 2;
const DELIVERY_MODE: u16 = 1 << 3;
const PRIORITY: u16 = 1 << 4;
const CORRELATION_ID: u16 = 1 << 5;
const REPLY_TO: u16 = 1 << 6;
const EXPIRATION: u16 = 1 << 7;
const MESSAGE_ID: u16 = 1 << 8;
const TIMESTAMP: u16 = 1 << 9;
const TYPE: u16 = 1 << 10;
const USER_ID: u16 = 1 << 11;
const APP_ID: u16 = 1 << 12;
const CLUSTER_ID: u16 = 1 << 13;
const KNOWN_PROPERTIES: u16 = (1 << 14) - 1;

/// Appends the encoding of `meta` to `out`.
pub fn encode_meta(meta: &StoredMeta, out: &mut BytesMut) {
    let p = &meta.properties;
    let strings = [
        &p.content_type,
        &p.content_encoding,
        &p.correlation_id,
        &p.reply_to,
        &p.expiration,
        &p.message_id,
        &p.kind,
        &p.user_id,
        &p.app_id,
        &p.cluster_id,
    ];
    // Everything but the headers, whose size is found by writing them.
    let estimate = 7
        + 2
        + meta.exchange.as_str().len()
        + meta.routing_key.len()
        + strings
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.len() + 1))
            .sum::<usize>()
        + 10;
    out.reserve(estimate);

    let mut flags = 0;
    for (present, bit) in [
        (p.content_type.is_some(), CONTENT_TYPE),
        (p.content_encoding.is_some(), CONTENT_ENCODING),
        (p.headers.is_some(), HEADERS),
        (p.delivery_mode.is_some(), DELIVERY_MODE),
        (p.priority.is_some(), PRIORITY),
        (p.correlation_id.is_some(), CORRELATION_ID),
        (p.reply_to.is_some(), REPLY_TO),
        (p.expiration.is_some(), EXPIRATION),
        (p.message_id.is_some(), MESSAGE_ID),
        (p.timestamp.is_some(), TIMESTAMP),
        (p.kind.is_some(), TYPE),
        (p.user_id.is_some(), USER_ID),
        (p.app_id.is_some(), APP_ID),
        (p.cluster_id.is_some(), CLUSTER_ID),
    ] {
        if present {
            flags |= bit;
        }
    }

    out.put_u8(VERSION);
    out.put_u32_le(meta.delivery_count);
    out.put_u16_le(flags);
    put_str(out, meta.exchange.as_str());
    put_str(out, &meta.routing_key);
    put_opt_str(out, &p.content_type);
    put_opt_str(out, &p.content_encoding);
    if let Some(headers) = &p.headers {
        put_table(out, headers);
    }
    if let Some(mode) = p.delivery_mode {
        out.put_u8(mode);
    }
    if let Some(priority) = p.priority {
        out.put_u8(priority);
    }
    put_opt_str(out, &p.correlation_id);
    put_opt_str(out, &p.reply_to);
    put_opt_str(out, &p.expiration);
    put_opt_str(out, &p.message_id);
    if let Some(timestamp) = p.timestamp {
        out.put_u64_le(timestamp);
    }
    put_opt_str(out, &p.kind);
    put_opt_str(out, &p.user_id);
    put_opt_str(out, &p.app_id);
    put_opt_str(out, &p.cluster_id);
}

/// Decodes metadata written by [`encode_meta`]; `bytes` must hold exactly
/// one encoding.
pub fn decode_meta(bytes: &[u8]) -> Result<StoredMeta, CodecError> {
    let mut r = Reader::new(bytes);
    r.version()?;
    let delivery_count = u32::from_le_bytes(r.fixed("delivery count")?);
    let flags_at = r.pos;
    let flags = u16::from_le_bytes(r.fixed("property flags")?);
    if flags & !KNOWN_PROPERTIES != 0 {
        return Err(CodecError::UnknownPropertyFlags {
            flags,
            at: flags_at,
        });
    }
    let exchange_at = r.pos;
    let exchange = r.str("exchange name")?;
    let exchange = ExchangeName::new(exchange).map_err(|_| CodecError::ExchangeNameTooLong {
        at: exchange_at,
        len: exchange.len(),
    })?;
    let routing_key = r.str("routing key")?.to_owned();

    let properties = Properties {
        content_type: r.opt_string(flags, CONTENT_TYPE, "content-type")?,
        content_encoding: r.opt_string(flags, CONTENT_ENCODING, "content-encoding")?,
        headers: if flags & HEADERS != 0 {
            Some(r.table(1)?)
        } else {
            None
        },
        delivery_mode: if flags & DELIVERY_MODE != 0 {
            Some(r.u8("delivery-mode")?)
        } else {
            None
        },
        priority: if flags & PRIORITY != 0 {
            Some(r.u8("priority")?)
        } else {
            None
        },
        correlation_id: r.opt_string(flags, CORRELATION_ID, "correlation-id")?,
        reply_to: r.opt_string(flags, REPLY_TO, "reply-to")?,
        expiration: r.opt_string(flags, EXPIRATION, "expiration")?,
        message_id: r.opt_string(flags, MESSAGE_ID, "message-id")?,
        timestamp: if flags & TIMESTAMP != 0 {
            Some(u64::from_le_bytes(r.fixed("timestamp")?))
        } else {
            None
        },
        kind: r.opt_string(flags, TYPE, "type")?,
        user_id: r.opt_string(flags, USER_ID, "user-id")?,
        app_id: r.opt_string(flags, APP_ID, "app-id")?,
        cluster_id: r.opt_string(flags, CLUSTER_ID, "cluster-id")?,
    };
    r.finish()?;
    Ok(StoredMeta {
        exchange,
        routing_key,
        properties,
        delivery_count,
    })
}

/// Appends the encoding of a standalone table (version byte, then the
/// table) to `out`.
pub fn encode_table(t: &FieldTable, out: &mut BytesMut) {
    out.put_u8(VERSION);
    put_table(out, t);
}

/// Decodes a table written by [`encode_table`]; `bytes` must hold exactly
/// one encoding.
pub fn decode_table(bytes: &[u8]) -> Result<FieldTable, CodecError> {
    let mut r = Reader::new(bytes);
    r.version()?;
    let table = r.table(1)?;
    r.finish()?;
    Ok(table)
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn put_len(out: &mut BytesMut, len: usize) {
    put_varint(out, len as u64);
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_len(out, s.len());
    out.put_slice(s.as_bytes());
}

fn put_opt_str(out: &mut BytesMut, s: &Option<String>) {
    if let Some(s) = s {
        put_str(out, s);
    }
}

fn put_table(out: &mut BytesMut, t: &FieldTable) {
    put_len(out, t.len());
    for (key, value) in t {
        put_str(out, key);
        put_value(out, value);
    }
}

fn put_value(out: &mut BytesMut, v: &FieldValue) {
    match v {
        FieldValue::Bool(b) => {
            out.put_u8(b't');
            out.put_u8(u8::from(*b));
        }
        FieldValue::I8(x) => {
            out.put_u8(b'b');
            out.put_i8(*x);
        }
        FieldValue::U8(x) => {
            out.put_u8(b'B');
            out.put_u8(*x);
        }
        FieldValue::I16(x) => {
            out.put_u8(b's');
            out.put_i16_le(*x);
        }
        FieldValue::U16(x) => {
            out.put_u8(b'u');
            out.put_u16_le(*x);
        }
        FieldValue::I32(x) => {
            out.put_u8(b'I');
            out.put_i32_le(*x);
        }
        FieldValue::U32(x) => {
            out.put_u8(b'i');
            out.put_u32_le(*x);
        }
        FieldValue::I64(x) => {
            out.put_u8(b'l');
            out.put_i64_le(*x);
        }
        FieldValue::F32(x) => {
            out.put_u8(b'f');
            out.put_u32_le(x.to_bits());
        }
        FieldValue::F64(x) => {
            out.put_u8(b'd');
            out.put_u64_le(x.to_bits());
        }
        FieldValue::Decimal { scale, value } => {
            out.put_u8(b'D');
            out.put_u8(*scale);
            out.put_u32_le(*value);
        }
        FieldValue::String(s) => {
            out.put_u8(b'S');
            put_str(out, s);
        }
        FieldValue::Bytes(b) => {
            out.put_u8(b'x');
            put_len(out, b.len());
            out.put_slice(b);
        }
        FieldValue::Timestamp(t) => {
            out.put_u8(b'T');
            out.put_u64_le(*t);
        }
        FieldValue::Table(t) => {
            out.put_u8(b'F');
            put_table(out, t);
        }
        FieldValue::Array(values) => {
            out.put_u8(b'A');
            put_len(out, values.len());
            for v in values {
                put_value(out, v);
            }
        }
        FieldValue::Void => out.put_u8(b'V'),
    }
}

/// A cursor over the input; `pos` never exceeds `buf.len()`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    fn truncated(&self, what: &'static str, needed: usize) -> CodecError {
        CodecError::Truncated {
            what,
            at: self.pos,
            needed,
            available: self.rest().len(),
        }
    }

    fn version(&mut self) -> Result<(), CodecError> {
        match self.u8("version byte")? {
            VERSION => Ok(()),
            version => Err(CodecError::UnsupportedVersion { version }),
        }
    }

    fn finish(&self) -> Result<(), CodecError> {
        match self.rest().len() {
            0 => Ok(()),
            count => Err(CodecError::TrailingBytes {
                at: self.pos,
                count,
            }),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        match self.rest().get(..n) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(self.truncated(what, n)),
        }
    }

    fn fixed<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        match self.rest().first_chunk::<N>() {
            Some(bytes) => {
                self.pos += N;
                Ok(*bytes)
            }
            None => Err(self.truncated(what, N)),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        let [b] = self.fixed::<1>(what)?;
        Ok(b)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, CodecError> {
        let at = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8(what)?;
            // The tenth byte carries bit 63 only.
            if i == 9 && byte > 1 {
                return Err(CodecError::BadVarint { what, at });
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                // A zero final group after the first byte is an over-long form.
                if byte == 0 && i > 0 {
                    return Err(CodecError::BadVarint { what, at });
                }
                return Ok(value);
            }
        }
        Err(CodecError::BadVarint { what, at })
    }

    /// Reads a length or count of items each taking at least `min_item_size`
    /// bytes, refusing one that the rest of the input could not hold.
    fn len(&mut self, what: &'static str, min_item_size: usize) -> Result<usize, CodecError> {
        let at = self.pos;
        let declared = self.varint(what)?;
        let available = self.rest().len();
        let overrun = CodecError::LengthOverrun {
            what,
            at,
            declared,
            available,
        };
        match usize::try_from(declared) {
            Ok(n) if n <= available / min_item_size => Ok(n),
            _ => Err(overrun),
        }
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let len = self.len(what, 1)?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| CodecError::InvalidUtf8 {
            what,
            at: at + e.valid_up_to(),
        })
    }

    fn opt_string(
        &mut self,
        flags: u16,
        bit: u16,
        what: &'static str,
    ) -> Result<Option<String>, CodecError> {
        if flags & bit == 0 {
            return Ok(None);
        }
        Ok(Some(self.str(what)?.to_owned()))
    }

    /// Reads a table at nesting level `depth` (1 for the outermost).
    fn table(&mut self, depth: usize) -> Result<FieldTable, CodecError> {
        if depth > MAX_DEPTH {
            return Err(CodecError::TooDeep { at: self.pos });
        }
        // An entry is at least a key length and a type tag.
        let count = self.len("table entry count", 2)?;
        let mut table = FieldTable::new();
        let mut previous: Option<&str> = None;
        for _ in 0..count {
            let at = self.pos;
            let key = self.str("table key")?;
            if previous.is_some_and(|p| key <= p) {
                return Err(CodecError::UnorderedKey { at });
            }
            let value = self.value(depth)?;
            table.insert(key.to_owned(), value);
            previous = Some(key);
        }
        Ok(table)
    }

    /// Reads an array's count and elements, at nesting level `depth`.
    fn array(&mut self, depth: usize) -> Result<Vec<FieldValue>, CodecError> {
        if depth > MAX_DEPTH {
            return Err(CodecError::TooDeep { at: self.pos });
        }
        // An element is at least a type tag.
        let count = self.len("array element count", 1)?;
        // Reserve modestly: the count is only bounded by the input's size, and
        // a value is far bigger in memory than its one-byte minimum encoding.
        let mut values = Vec::with_capacity(count.min(16));
        for _ in 0..count {
            values.push(self.value(depth)?);
        }
        Ok(values)
    }

    /// Reads a tagged value found in a table or array at level `depth`.
    fn value(&mut self, depth: usize) -> Result<FieldValue, CodecError> {
        let at = self.pos;
        let tag = self.u8("field value type tag")?;
        let value = match tag {
            b't' => {
                let at = self.pos;
                match self.u8("boolean")? {
                    0 => FieldValue::Bool(false),
                    1 => FieldValue::Bool(true),
                    byte => return Err(CodecError::InvalidBool { byte, at }),
                }
            }
            b'b' => FieldValue::I8(i8::from_le_bytes(self.fixed("i8")?)),
            b'B' => FieldValue::U8(self.u8("u8")?),
            b's' => FieldValue::I16(i16::from_le_bytes(self.fixed("i16")?)),
            b'u' => FieldValue::U16(u16::from_le_bytes(self.fixed("u16")?)),
            b'I' => FieldValue::I32(i32::from_le_bytes(self.fixed("i32")?)),
            b'i' => FieldValue::U32(u32::from_le_bytes(self.fixed("u32")?)),
            b'l' => FieldValue::I64(i64::from_le_bytes(self.fixed("i64")?)),
            b'f' => FieldValue::F32(f32::from_bits(u32::from_le_bytes(self.fixed("f32")?))),
            b'd' => FieldValue::F64(f64::from_bits(u64::from_le_bytes(self.fixed("f64")?))),
            b'D' => {
                let scale = self.u8("decimal scale")?;
                let value = u32::from_le_bytes(self.fixed("decimal value")?);
                FieldValue::Decimal { scale, value }
            }
            b'S' => FieldValue::String(self.str("string value")?.to_owned()),
            b'x' => {
                let len = self.len("byte array length", 1)?;
                FieldValue::Bytes(Bytes::copy_from_slice(self.take(len, "byte array")?))
            }
            b'T' => FieldValue::Timestamp(u64::from_le_bytes(self.fixed("timestamp")?)),
            b'F' => FieldValue::Table(self.table(depth + 1)?),
            b'A' => FieldValue::Array(self.array(depth + 1)?),
            b'V' => FieldValue::Void,
            tag => return Err(CodecError::UnknownTag { tag, at }),
        };
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn meta_bytes(meta: &StoredMeta) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_meta(meta, &mut out);
        out.to_vec()
    }

    fn table_bytes(t: &FieldTable) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_table(t, &mut out);
        out.to_vec()
    }

    fn empty_meta() -> StoredMeta {
        StoredMeta {
            exchange: ExchangeName::default_exchange(),
            routing_key: String::new(),
            properties: Properties::default(),
            delivery_count: 0,
        }
    }

    /// A table holding one value of every type, nested tables and arrays
    /// included.
    fn every_value_type() -> FieldTable {
        let mut inner = FieldTable::new();
        inner.insert("count".into(), FieldValue::I64(3));
        inner.insert("queue".into(), FieldValue::String("orders".into()));
        let mut t = FieldTable::new();
        t.insert("bool".into(), FieldValue::Bool(true));
        t.insert("i8".into(), FieldValue::I8(-8));
        t.insert("u8".into(), FieldValue::U8(200));
        t.insert("i16".into(), FieldValue::I16(-16_000));
        t.insert("u16".into(), FieldValue::U16(65_000));
        t.insert("i32".into(), FieldValue::I32(i32::MIN));
        t.insert("u32".into(), FieldValue::U32(u32::MAX));
        t.insert("i64".into(), FieldValue::I64(i64::MIN));
        t.insert("f32".into(), FieldValue::F32(1.5));
        t.insert("f64".into(), FieldValue::F64(-0.25));
        t.insert(
            "decimal".into(),
            FieldValue::Decimal {
                scale: 2,
                value: 12_345,
            },
        );
        t.insert("string".into(), FieldValue::String("héllo".into()));
        t.insert(
            "bytes".into(),
            FieldValue::Bytes(Bytes::from_static(b"\x00\xff")),
        );
        t.insert("timestamp".into(), FieldValue::Timestamp(1_700_000_000));
        t.insert("table".into(), FieldValue::Table(inner.clone()));
        t.insert(
            "array".into(),
            FieldValue::Array(vec![
                FieldValue::Table(inner),
                FieldValue::Array(vec![]),
                FieldValue::Void,
            ]),
        );
        t.insert("void".into(), FieldValue::Void);
        t.insert("".into(), FieldValue::String("x".repeat(300)));
        t
    }

    fn full_meta() -> StoredMeta {
        StoredMeta {
            exchange: ExchangeName::new("amq.topic").expect("valid name"),
            routing_key: "orders.eu.created".into(),
            properties: Properties {
                content_type: Some("application/json".into()),
                content_encoding: Some("gzip".into()),
                headers: Some(every_value_type()),
                delivery_mode: Some(2),
                priority: Some(9),
                correlation_id: Some("corr-1".into()),
                reply_to: Some("amq.rabbitmq.reply-to".into()),
                expiration: Some("60000".into()),
                message_id: Some("msg-1".into()),
                timestamp: Some(1_700_000_000),
                kind: Some("order.created".into()),
                user_id: Some("guest".into()),
                app_id: Some("shop".into()),
                cluster_id: Some("c".into()),
            },
            delivery_count: 7,
        }
    }

    /// `levels` tables nested inside each other, the outermost included.
    fn nested_table(levels: usize) -> FieldTable {
        let mut t = FieldTable::new();
        for _ in 1..levels {
            let mut outer = FieldTable::new();
            outer.insert("t".into(), FieldValue::Table(t));
            t = outer;
        }
        t
    }

    #[test]
    fn a_fully_populated_meta_round_trips() {
        let meta = full_meta();
        assert_eq!(decode_meta(&meta_bytes(&meta)), Ok(meta));
    }

    #[test]
    fn an_empty_meta_round_trips_in_nine_bytes() {
        let meta = empty_meta();
        let bytes = meta_bytes(&meta);
        // Version, delivery count, no properties, empty exchange and routing key.
        assert_eq!(bytes, [1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_meta(&bytes), Ok(meta));
    }

    #[test]
    fn the_layout_is_as_documented() {
        let mut meta = empty_meta();
        meta.exchange = ExchangeName::new("ex").expect("valid name");
        meta.routing_key = "rk".into();
        meta.delivery_count = 0x0102_0304;
        meta.properties.priority = Some(5);
        meta.properties.timestamp = Some(0x0a0b);
        let mut headers = FieldTable::new();
        headers.insert("n".into(), FieldValue::I16(-2));
        meta.properties.headers = Some(headers);
        #[rustfmt::skip]
        let expected = [
            1,                                    // version
            0x04, 0x03, 0x02, 0x01,               // delivery count, little-endian
            0b0001_0100, 0b0000_0010,             // flags: headers, priority, timestamp
            2, b'e', b'x',                        // exchange
            2, b'r', b'k',                        // routing key
            1, 1, b'n', b's', 0xfe, 0xff,         // headers: one entry, "n" => i16 -2
            5,                                    // priority
            0x0b, 0x0a, 0, 0, 0, 0, 0, 0,         // timestamp
        ];
        assert_eq!(meta_bytes(&meta), expected);
        assert_eq!(decode_meta(&expected), Ok(meta));
    }

    #[test]
    fn lengths_of_128_bytes_and_more_take_a_multi_byte_varint() {
        let mut meta = empty_meta();
        meta.routing_key = "k".repeat(300);
        let bytes = meta_bytes(&meta);
        // 300 = 0b10_0101100: low seven bits with the continuation bit, then 2.
        assert_eq!(bytes[8..10], [0xac, 0x02]);
        assert_eq!(bytes.len(), 10 + 300);
        assert_eq!(decode_meta(&bytes), Ok(meta));
    }

    #[test]
    fn a_standalone_table_round_trips() {
        let t = every_value_type();
        assert_eq!(decode_table(&table_bytes(&t)), Ok(t));
        assert_eq!(table_bytes(&FieldTable::new()), [1, 0]);
        assert_eq!(decode_table(&[1, 0]), Ok(FieldTable::new()));
    }

    #[test]
    fn encoding_appends_to_what_the_buffer_already_holds() {
        let mut out = BytesMut::from(&b"prefix"[..]);
        encode_meta(&full_meta(), &mut out);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(decode_meta(&out[6..]), Ok(full_meta()));
    }

    #[test]
    fn an_unknown_version_is_named_in_the_error() {
        let mut bytes = meta_bytes(&empty_meta());
        bytes[0] = 2;
        let err = decode_meta(&bytes).expect_err("version 2 is unknown");
        assert_eq!(err, CodecError::UnsupportedVersion { version: 2 });
        assert!(err.to_string().contains("version 2"), "{err}");
        assert_eq!(
            decode_table(&[0, 0]),
            Err(CodecError::UnsupportedVersion { version: 0 })
        );
    }

    #[test]
    fn truncating_a_meta_at_every_length_is_an_error() {
        let bytes = meta_bytes(&full_meta());
        for len in 0..bytes.len() {
            assert!(
                decode_meta(&bytes[..len]).is_err(),
                "a {len}-byte prefix of {} decoded",
                bytes.len()
            );
        }
    }

    #[test]
    fn truncating_a_table_at_every_length_is_an_error() {
        let bytes = table_bytes(&every_value_type());
        for len in 0..bytes.len() {
            assert!(decode_table(&bytes[..len]).is_err(), "prefix {len} decoded");
        }
    }

    #[test]
    fn truncation_errors_say_what_and_where() {
        let bytes = meta_bytes(&empty_meta());
        let err = decode_meta(&bytes[..3]).expect_err("truncated");
        assert_eq!(
            err,
            CodecError::Truncated {
                what: "delivery count",
                at: 1,
                needed: 4,
                available: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "input ends while reading delivery count: 4-byte read at byte 1, 2 left"
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = meta_bytes(&empty_meta());
        bytes.push(0);
        assert_eq!(
            decode_meta(&bytes),
            Err(CodecError::TrailingBytes { at: 9, count: 1 })
        );
        assert_eq!(
            decode_table(&[1, 0, 0, 0]),
            Err(CodecError::TrailingBytes { at: 2, count: 2 })
        );
    }

    #[test]
    fn nesting_up_to_max_depth_is_accepted_and_one_more_level_is_rejected() {
        let deepest = nested_table(MAX_DEPTH);
        assert_eq!(decode_table(&table_bytes(&deepest)), Ok(deepest));

        let too_deep = table_bytes(&nested_table(MAX_DEPTH + 1));
        let err = decode_table(&too_deep).expect_err("too deep");
        assert!(matches!(err, CodecError::TooDeep { .. }), "{err}");

        let mut meta = empty_meta();
        meta.properties.headers = Some(nested_table(MAX_DEPTH + 1));
        let err = decode_meta(&meta_bytes(&meta)).expect_err("too deep");
        assert!(matches!(err, CodecError::TooDeep { .. }), "{err}");
    }

    #[test]
    fn hostile_deep_nesting_is_rejected_without_exhausting_the_stack() {
        // One table holding "" => an array of one array of one array... a
        // hundred thousand levels deep, which a naive recursive decoder
        // would follow until the stack overflowed.
        let mut bytes = vec![1, 1, 0];
        for _ in 0..100_000 {
            bytes.extend_from_slice(&[b'A', 1]);
        }
        bytes.push(b'V');
        let err = decode_table(&bytes).expect_err("too deep");
        // Level 1 is the table, so level 33 is the 32nd array, at 3 + 31 * 2.
        assert_eq!(err, CodecError::TooDeep { at: 66 });
        assert!(err.to_string().contains("at byte 66"), "{err}");
    }

    #[test]
    fn huge_declared_lengths_are_rejected_before_anything_is_allocated() {
        // Each declares 2^62, a size whose allocation would abort the process:
        // these pass only because the length is checked against the input.
        let huge = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40];
        let huge_len = 1u64 << 62;

        // An exchange name.
        let mut bytes = vec![1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&huge);
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            decode_meta(&bytes),
            Err(CodecError::LengthOverrun {
                what: "exchange name",
                at: 7,
                declared: huge_len,
                available: 3
            })
        );

        // A table's entry count, an array's element count, a byte array.
        for (prefix, what) in [
            (&[1][..], "table entry count"),
            (&[1, 1, 0, b'A'][..], "array element count"),
            (&[1, 1, 0, b'x'][..], "byte array length"),
            (&[1, 1, 0, b'S'][..], "string value"),
        ] {
            let mut bytes = prefix.to_vec();
            bytes.extend_from_slice(&huge);
            bytes.extend_from_slice(b"abc");
            let err = decode_table(&bytes).expect_err("overrun");
            assert_eq!(
                err,
                CodecError::LengthOverrun {
                    what,
                    at: prefix.len(),
                    declared: huge_len,
                    available: 3
                }
            );
        }

        // The largest varint there is.
        let mut bytes = vec![1];
        bytes.extend_from_slice(&[0xff; 9]);
        bytes.push(0x01);
        let err = decode_table(&bytes).expect_err("overrun");
        assert!(
            matches!(
                err,
                CodecError::LengthOverrun {
                    declared: u64::MAX,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn malformed_varints_are_rejected() {
        // Over-long: 0 written in two bytes.
        assert_eq!(
            decode_table(&[1, 0x80, 0x00]),
            Err(CodecError::BadVarint {
                what: "table entry count",
                at: 1
            })
        );
        // Overflows 64 bits.
        let mut bytes = vec![1];
        bytes.extend_from_slice(&[0xff; 9]);
        bytes.push(0x02);
        assert!(matches!(
            decode_table(&bytes),
            Err(CodecError::BadVarint { at: 1, .. })
        ));
        // More than ten bytes.
        let mut bytes = vec![1];
        bytes.extend_from_slice(&[0x80; 11]);
        assert!(matches!(
            decode_table(&bytes),
            Err(CodecError::BadVarint { at: 1, .. })
        ));
    }

    #[test]
    fn malformed_values_are_rejected_with_their_position() {
        // Unknown type tag.
        assert_eq!(
            decode_table(&[1, 1, 1, b'k', b'?']),
            Err(CodecError::UnknownTag { tag: b'?', at: 4 })
        );
        // A boolean that is neither 0 nor 1.
        assert_eq!(
            decode_table(&[1, 1, 1, b'k', b't', 2]),
            Err(CodecError::InvalidBool { byte: 2, at: 5 })
        );
        // Invalid UTF-8 in a string value, pointing at the bad byte.
        assert_eq!(
            decode_table(&[1, 1, 1, b'k', b'S', 3, b'a', 0xff, b'b']),
            Err(CodecError::InvalidUtf8 {
                what: "string value",
                at: 7
            })
        );
        // Keys out of order, or repeated.
        assert_eq!(
            decode_table(&[1, 2, 1, b'b', b'V', 1, b'a', b'V']),
            Err(CodecError::UnorderedKey { at: 5 })
        );
        assert_eq!(
            decode_table(&[1, 2, 1, b'a', b'V', 1, b'a', b'V']),
            Err(CodecError::UnorderedKey { at: 5 })
        );
    }

    #[test]
    fn malformed_metadata_is_rejected_with_its_position() {
        // Reserved property bits.
        assert_eq!(
            decode_meta(&[1, 0, 0, 0, 0, 0, 0x40, 0, 0]),
            Err(CodecError::UnknownPropertyFlags {
                flags: 0x4000,
                at: 5
            })
        );
        // An exchange name longer than 255 bytes.
        let mut bytes = vec![1, 0, 0, 0, 0, 0, 0, 0x80, 0x02];
        bytes.extend_from_slice(&[b'e'; 256]);
        bytes.push(0);
        assert_eq!(
            decode_meta(&bytes),
            Err(CodecError::ExchangeNameTooLong { at: 7, len: 256 })
        );
        // A property flagged present but missing.
        let err =
            decode_meta(&[1, 0, 0, 0, 0, 0b0001_0000, 0, 0, 0]).expect_err("priority missing");
        assert_eq!(
            err.to_string(),
            "input ends while reading priority: 1-byte read at byte 9, 0 left"
        );
    }

    #[test]
    fn codec_errors_become_storage_errors() {
        let err = BrokerError::from(CodecError::UnsupportedVersion { version: 9 });
        assert_eq!(err.reply_code(), crate::error::ReplyCode::InternalError);
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    fn arb_value() -> impl Strategy<Value = FieldValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(FieldValue::Bool),
            any::<i8>().prop_map(FieldValue::I8),
            any::<u8>().prop_map(FieldValue::U8),
            any::<i16>().prop_map(FieldValue::I16),
            any::<u16>().prop_map(FieldValue::U16),
            any::<i32>().prop_map(FieldValue::I32),
            any::<u32>().prop_map(FieldValue::U32),
            any::<i64>().prop_map(FieldValue::I64),
            // NaN round-trips bit for bit but never compares equal.
            any::<f32>()
                .prop_filter("not NaN", |f| !f.is_nan())
                .prop_map(FieldValue::F32),
            any::<f64>()
                .prop_filter("not NaN", |f| !f.is_nan())
                .prop_map(FieldValue::F64),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| FieldValue::Decimal { scale, value }),
            ".{0,20}".prop_map(FieldValue::String),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|b| FieldValue::Bytes(Bytes::from(b))),
            any::<u64>().prop_map(FieldValue::Timestamp),
            Just(FieldValue::Void),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::btree_map(".{0,8}", inner.clone(), 0..6)
                    .prop_map(FieldValue::Table),
                proptest::collection::vec(inner, 0..6).prop_map(FieldValue::Array),
            ]
        })
    }

    fn arb_table() -> impl Strategy<Value = FieldTable> {
        proptest::collection::btree_map(".{0,12}", arb_value(), 0..8)
    }

    fn arb_properties() -> impl Strategy<Value = Properties> {
        let s = || proptest::option::of(".{0,40}");
        (
            (s(), s(), proptest::option::of(arb_table())),
            (
                proptest::option::of(any::<u8>()),
                proptest::option::of(any::<u8>()),
            ),
            (s(), s(), s(), s()),
            proptest::option::of(any::<u64>()),
            (s(), s(), s(), s()),
        )
            .prop_map(
                |(
                    (content_type, content_encoding, headers),
                    (delivery_mode, priority),
                    (correlation_id, reply_to, expiration, message_id),
                    timestamp,
                    (kind, user_id, app_id, cluster_id),
                )| Properties {
                    content_type,
                    content_encoding,
                    headers,
                    delivery_mode,
                    priority,
                    correlation_id,
                    reply_to,
                    expiration,
                    message_id,
                    timestamp,
                    kind,
                    user_id,
                    app_id,
                    cluster_id,
                },
            )
    }

    fn arb_meta() -> impl Strategy<Value = StoredMeta> {
        (".{0,60}", ".{0,200}", arb_properties(), any::<u32>()).prop_map(
            |(exchange, routing_key, properties, delivery_count)| StoredMeta {
                // Sixty characters are at most 240 bytes, within the limit.
                exchange: ExchangeName::new(exchange).expect("at most 240 bytes"),
                routing_key,
                properties,
                delivery_count,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_table_round_trips(t in arb_table()) {
            prop_assert_eq!(decode_table(&table_bytes(&t)), Ok(t));
        }

        #[test]
        fn any_meta_round_trips(meta in arb_meta()) {
            prop_assert_eq!(decode_meta(&meta_bytes(&meta)), Ok(meta));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..256),
            force_version in any::<bool>(),
        ) {
            if force_version && !bytes.is_empty() {
                bytes[0] = VERSION;
            }
            // Whatever decodes is canonical: it encodes back to the same bytes.
            if let Ok(meta) = decode_meta(&bytes) {
                prop_assert_eq!(meta_bytes(&meta), bytes.clone());
            }
            if let Ok(t) = decode_table(&bytes) {
                prop_assert_eq!(table_bytes(&t), bytes);
            }
        }

        #[test]
        fn decoding_a_corrupted_encoding_never_panics(
            meta in arb_meta(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = meta_bytes(&meta);
            for (index, byte) in flips {
                let i = index.index(bytes.len());
                bytes[i] = byte;
            }
            if let Ok(decoded) = decode_meta(&bytes) {
                prop_assert_eq!(meta_bytes(&decoded), bytes);
            }
        }
    }
}
