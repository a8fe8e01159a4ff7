//! A message as the broker sees it: routing information, AMQP-style basic
//! properties (protocol-independent), and the body.

use bytes::Bytes;

use crate::name::ExchangeName;
use crate::value::FieldTable;

/// The basic properties a publisher may set, as AMQP 0-9-1 defines them.
/// Every field is optional; `None` means "not sent".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    /// MIME content type of the body.
    pub content_type: Option<String>,
    /// MIME content encoding of the body.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Option<FieldTable>,
    /// 1 for transient, 2 for persistent.
    pub delivery_mode: Option<u8>,
    /// 0 to 255; queues with `x-max-priority` deliver higher first.
    pub priority: Option<u8>,
    /// Correlates a reply with its request.
    pub correlation_id: Option<String>,
    /// Where replies should go.
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<String>,
    /// Application message identifier.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Application message type name.
    pub kind: Option<String>,
    /// The publishing user, which the broker validates.
    pub user_id: Option<String>,
    /// The publishing application.
    pub app_id: Option<String>,
    /// Reserved by AMQP; kept for round-tripping.
    pub cluster_id: Option<String>,
}

impl Properties {
    /// Whether the publisher asked for the message to survive a restart.
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }
}

/// A message on its way through the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The exchange it was published to.
    pub exchange: ExchangeName,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its basic properties.
    pub properties: Properties,
    /// Its body.
    pub body: Bytes,
}
