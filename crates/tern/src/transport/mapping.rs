//! The envelope in AMQP's shape, shared by the embedded and AMQP transports.
//!
//! CloudEvents attributes go in the headers table with the `cloudEvents_`
//! prefix (the CloudEvents AMQP binding's JMS-safe spelling);
//! `datacontenttype` goes in `content-type`. The id is also the AMQP
//! `message-id`, the correlation id the AMQP `correlation-id`, the type the
//! AMQP `type` and the source the `app-id`, so tools that show AMQP
//! properties show something useful.

use std::time::Duration;

use crate::envelope::Envelope;

use super::ATTEMPT_HEADER;

/// The header prefix of CloudEvents attributes in AMQP.
pub(crate) const AMQP_PREFIX: &str = "cloudEvents_";

/// The header the broker's deduplication reads (RabbitMQ's plugin's name,
/// which Tern's broker shares).
pub(crate) const DEDUP_HEADER: &str = "x-deduplication-header";

/// The queue arguments that make a queue drop duplicates seen within
/// `window` (milliseconds, as `x-cache-ttl` takes them).
pub(crate) fn dedup_window_ms(window: Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// A message in AMQP's terms, before it becomes one client's property type.
#[derive(Debug, Clone, Default)]
pub(crate) struct AmqpShape {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) content_type: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) app_id: Option<String>,
    pub(crate) timestamp: Option<u64>,
    pub(crate) expiration: Option<String>,
    /// RabbitMQ's `x-delay` header (an integer, unlike the others), for a
    /// delayed-message exchange.
    pub(crate) delay_ms: Option<i64>,
}

impl AmqpShape {
    /// The shape of `envelope` on attempt `attempt`.
    pub(crate) fn of(envelope: &Envelope, attempt: u32, reply_to: Option<String>) -> AmqpShape {
        let mut headers = envelope.to_headers(AMQP_PREFIX);
        headers.push((ATTEMPT_HEADER.to_string(), attempt.to_string()));
        if let Some(id) = envelope.dedup_id() {
            headers.push((DEDUP_HEADER.to_string(), id.to_string()));
        }
        AmqpShape {
            headers,
            content_type: envelope.datacontenttype.clone(),
            message_id: Some(envelope.id.clone()),
            correlation_id: envelope.correlation_id.clone(),
            reply_to,
            kind: Some(envelope.ty.clone()),
            app_id: Some(envelope.source.clone()),
            timestamp: envelope.time.and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            }),
            expiration: None,
            delay_ms: None,
        }
    }

    /// Adds a header, replacing one of the same name.
    pub(crate) fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.to_string(), value.into()));
    }

    /// Gives a copy of a message (a retry, a dead letter) a deduplication
    /// key of its own:
    /// on a deduplicating queue, the original's key (its dedup id, else its
    /// message id) would have the copy (or its redrive) dropped as a
    /// duplicate of itself.
    pub(crate) fn fresh_dedup_key(&mut self) {
        self.set_header(DEDUP_HEADER, format!("tern-copy-{}", uuid::Uuid::now_v7()));
    }

    /// Holds the message for `delay` in a queue before it expires onwards.
    pub(crate) fn expire_after(&mut self, delay: Duration) {
        // A zero expiration would drop it at once in some brokers' eyes; one
        // millisecond is the shortest wait that still routes onwards.
        self.expiration = Some(delay.as_millis().max(1).to_string());
    }
}

/// The attempt number a message carries (1 when the header is absent or
/// unreadable: a message from a non-Tern producer is on its first attempt).
pub(crate) fn attempt_of<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> u32 {
    headers
        .into_iter()
        .find(|(name, _)| *name == ATTEMPT_HEADER)
        .and_then(|(_, value)| value.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}
