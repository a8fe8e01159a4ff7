//! Typed messages: what a Rust type must say to travel on a bus.
//!
//! A message type names its CloudEvents `type` (`orders.order-placed.v1`),
//! its kind and its codec. The kind decides the delivery pattern:
//! - an [`Event`] (past tense: `order-placed`) fans out to every service
//!   that subscribes to it;
//! - a [`Command`] (verb-noun: `reserve-stock`) goes to the one service that
//!   handles it;
//! - a [`Query`] (verb-noun: `get-stock`) goes to the one service that
//!   answers it, and its [`Query::Reply`] comes back to the asker.
//!
//! The [`message!`](crate::message!) macro implements all of this in one line.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The delivery pattern of a message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Fans out to every subscribed service.
    Event,
    /// Goes to the one service that handles it.
    Command,
    /// Goes to the one service that answers it; the answer comes back.
    Query,
}

/// How a message's data is encoded.
pub trait Codec: Send + Sync + 'static {
    /// The media type written to `datacontenttype`.
    const CONTENT_TYPE: &'static str;
    /// Encodes a value.
    fn encode<T: Serialize>(value: &T) -> Result<Bytes, CodecError>;
    /// Decodes a value.
    fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, CodecError>;
}

/// A value that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// JSON through serde, the default codec.
#[derive(Debug, Clone, Copy)]
pub struct Json;

impl Codec for Json {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode<T: Serialize>(value: &T) -> Result<Bytes, CodecError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| CodecError(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(data).map_err(|e| CodecError(e.to_string()))
    }
}

/// A type that travels on a bus. Implement it with [`message!`](crate::message!).
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`: lower case, dot-separated, ending in a
    /// version (`orders.order-placed.v1`).
    const TYPE: &'static str;
    /// The delivery pattern.
    const KIND: MessageKind;
    /// How the data is encoded.
    type Codec: Codec;
}

/// A message that fans out to every subscribed service.
pub trait Event: Message {}

/// A message for the one service that handles it.
pub trait Command: Message {}

/// A message for the one service that answers it with a [`Query::Reply`].
pub trait Query: Message {
    /// The answer's type.
    type Reply: Serialize + DeserializeOwned + Send + Sync + 'static;
}

/// Checks a CloudEvents type against Tern's naming rule: non-empty
/// dot-separated segments of lower-case ASCII letters, digits and `-`.
/// Routing keys and NATS subjects are built from it, so anything else would
/// route wrongly on some transport.
pub fn valid_type_name(ty: &str) -> bool {
    !ty.is_empty()
        && ty.len() <= 200
        && ty.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Implements [`Message`] and its kind trait for a serde type.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: u64 }
/// #[derive(Serialize, Deserialize)]
/// struct ReserveStock { sku: String }
/// #[derive(Serialize, Deserialize)]
/// struct GetStock { sku: String }
/// #[derive(Serialize, Deserialize)]
/// struct StockLevel { available: u32 }
///
/// tern::message!(event OrderPlaced = "orders.order-placed.v1");
/// tern::message!(command ReserveStock = "inventory.reserve-stock.v1");
/// tern::message!(query GetStock = "inventory.get-stock.v1", reply StockLevel);
/// ```
///
/// A codec other than JSON goes last: `message!(event E = "x.y.v1", codec MyCodec)`.
#[macro_export]
macro_rules! message {
    (event $ty:ty = $name:literal $(, codec $codec:ty)?) => {
        $crate::message!(@impl $ty, $name, Event $(, $codec)?);
        impl $crate::Event for $ty {}
    };
    (command $ty:ty = $name:literal $(, codec $codec:ty)?) => {
        $crate::message!(@impl $ty, $name, Command $(, $codec)?);
        impl $crate::Command for $ty {}
    };
    (query $ty:ty = $name:literal, reply $reply:ty $(, codec $codec:ty)?) => {
        $crate::message!(@impl $ty, $name, Query $(, $codec)?);
        impl $crate::Query for $ty {
            type Reply = $reply;
        }
    };
    (@impl $ty:ty, $name:literal, $kind:ident) => {
        $crate::message!(@impl $ty, $name, $kind, $crate::Json);
    };
    (@impl $ty:ty, $name:literal, $kind:ident, $codec:ty) => {
        impl $crate::Message for $ty {
            const TYPE: &'static str = $name;
            const KIND: $crate::MessageKind = $crate::MessageKind::$kind;
            type Codec = $codec;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_dotted_lower_case_segments() {
        for good in ["orders.order-placed.v1", "a", "x.y2.z-3"] {
            assert!(valid_type_name(good), "{good}");
        }
        for bad in [
            "",
            "Orders.placed",
            "a..b",
            "a.b.",
            "a b",
            "a.*",
            "a.>",
            "ä",
        ] {
            assert!(!valid_type_name(bad), "{bad}");
        }
    }
}
