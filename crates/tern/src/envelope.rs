//! The envelope every message travels in: a CloudEvents 1.0 event.
//!
//! Tern owns the attributes CloudEvents defines (`id`, `source`, `type`,
//! `specversion`, `time`, `subject`, `datacontenttype`, `dataschema`) and
//! three extensions: `correlationid` and `causationid`, which tie a
//! conversation together across services, and `traceparent` (W3C trace
//! context). `partitionkey` is CloudEvents' partitioning extension and is
//! the ordering key.
//!
//! On the wire an envelope uses CloudEvents' *binary content mode*: the body
//! is the data, untouched, and each attribute is a header. [`Envelope::to_headers`]
//! and [`Envelope::from_headers`] do that mapping once for every transport;
//! each transport only chooses the prefix (`cloudEvents_` in AMQP
//! application properties, as the CloudEvents AMQP binding recommends, and
//! `ce-` in NATS headers) and moves `datacontenttype` into the
//! transport's own content-type field.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use uuid::Uuid;

/// The CloudEvents extension carrying a message's deduplication id (see
/// [`Envelope::dedup_id`]).
pub const DEDUP_EXTENSION: &str = "terndedupid";

/// The CloudEvents version Tern writes and reads.
pub const SPEC_VERSION: &str = "1.0";

/// A message's envelope and its encoded data.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique per message (a UUIDv7, so ids sort by creation time).
    pub id: String,
    /// Who produced it: the service name, or `tern://bus` outside a handler.
    pub source: String,
    /// The message type, for example `orders.order-placed.v1`.
    pub ty: String,
    /// When it was produced.
    pub time: Option<SystemTime>,
    /// What it is about, if the producer says.
    pub subject: Option<String>,
    /// The media type of `data`, `application/json` by default.
    pub datacontenttype: Option<String>,
    /// Where the schema of `data` is described.
    pub dataschema: Option<String>,
    /// The conversation this message belongs to: the id of the message that
    /// started it, copied from cause to effect.
    pub correlation_id: Option<String>,
    /// The id of the message whose handling produced this one.
    pub causation_id: Option<String>,
    /// W3C trace context of the span that produced this message.
    pub traceparent: Option<String>,
    /// The ordering key: messages with the same key are handled in order
    /// where the transport and the topology allow it.
    pub partition_key: Option<String>,
    /// Other CloudEvents extension attributes, kept as strings.
    pub extensions: BTreeMap<String, String>,
    /// The encoded message.
    pub data: Bytes,
}

/// Why headers do not make a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A required CloudEvents attribute is absent.
    #[error("the CloudEvents attribute `{0}` is missing")]
    Missing(&'static str),
    /// The producer speaks a CloudEvents version Tern does not.
    #[error("CloudEvents specversion `{0}` is not supported (Tern reads 1.0)")]
    SpecVersion(String),
    /// `time` is not an RFC 3339 timestamp.
    #[error("the CloudEvents attribute `time` is not RFC 3339: `{0}`")]
    Time(String),
}

impl Envelope {
    /// A new envelope with a fresh UUIDv7 id and the current time.
    pub fn new(source: impl Into<String>, ty: impl Into<String>, data: Bytes) -> Envelope {
        Envelope {
            id: Uuid::now_v7().to_string(),
            source: source.into(),
            ty: ty.into(),
            time: Some(SystemTime::now()),
            subject: None,
            datacontenttype: None,
            dataschema: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            partition_key: None,
            extensions: BTreeMap::new(),
            data,
        }
    }

    /// The deduplication id the sender chose, if any: transports that
    /// deduplicate hand it to the broker (AMQP's `x-deduplication-header`,
    /// JetStream's `Nats-Msg-Id`), so a second send with the same id within
    /// the window is accepted but not delivered again.
    pub fn dedup_id(&self) -> Option<&str> {
        self.extensions.get(DEDUP_EXTENSION).map(String::as_str)
    }

    /// Sets the deduplication id.
    pub fn set_dedup_id(&mut self, id: impl Into<String>) {
        self.extensions
            .insert(DEDUP_EXTENSION.to_string(), id.into());
    }

    /// Makes this envelope an effect of `cause`: same conversation, caused
    /// by that message, same trace.
    pub fn caused_by(mut self, cause: &Envelope) -> Envelope {
        self.correlation_id = Some(
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.id.clone()),
        );
        self.causation_id = Some(cause.id.clone());
        if self.traceparent.is_none() {
            self.traceparent.clone_from(&cause.traceparent);
        }
        self
    }

    /// The attributes as `(name, value)` pairs with `prefix` before each
    /// CloudEvents attribute name, leaving out `datacontenttype` (which goes
    /// in the transport's content-type field) and the data.
    pub fn to_headers(&self, prefix: &str) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(8 + self.extensions.len());
        let mut put = |name: &str, value: &str| out.push((format!("{prefix}{name}"), value.into()));
        put("specversion", SPEC_VERSION);
        put("id", &self.id);
        put("source", &self.source);
        put("type", &self.ty);
        if let Some(time) = self.time {
            put("time", &humantime::format_rfc3339_micros(time).to_string());
        }
        let optional = [
            ("subject", &self.subject),
            ("dataschema", &self.dataschema),
            ("correlationid", &self.correlation_id),
            ("causationid", &self.causation_id),
            ("traceparent", &self.traceparent),
            ("partitionkey", &self.partition_key),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                put(name, value);
            }
        }
        for (name, value) in &self.extensions {
            put(name, value);
        }
        out
    }

    /// Reads an envelope from headers written with `prefix` (case-blind,
    /// since some transports fold header case), the transport's content type
    /// and the body. Headers without the prefix are ignored.
    pub fn from_headers<'a>(
        prefix: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        content_type: Option<&str>,
        data: Bytes,
    ) -> Result<Envelope, EnvelopeError> {
        let mut attributes: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            let Some(prefix_part) = name.get(..prefix.len()) else {
                continue;
            };
            if !prefix_part.eq_ignore_ascii_case(prefix) {
                continue;
            }
            let attribute = name[prefix.len()..].to_ascii_lowercase();
            attributes.insert(attribute, value.to_string());
        }
        let version = attributes
            .remove("specversion")
            .ok_or(EnvelopeError::Missing("specversion"))?;
        if version != SPEC_VERSION {
            return Err(EnvelopeError::SpecVersion(version));
        }
        let id = attributes
            .remove("id")
            .ok_or(EnvelopeError::Missing("id"))?;
        let source = attributes
            .remove("source")
            .ok_or(EnvelopeError::Missing("source"))?;
        let ty = attributes
            .remove("type")
            .ok_or(EnvelopeError::Missing("type"))?;
        let time = match attributes.remove("time") {
            Some(text) => {
                Some(humantime::parse_rfc3339_weak(&text).map_err(|_| EnvelopeError::Time(text))?)
            }
            None => None,
        };
        Ok(Envelope {
            id,
            source,
            ty,
            time,
            subject: attributes.remove("subject"),
            datacontenttype: content_type.map(str::to_string),
            dataschema: attributes.remove("dataschema"),
            correlation_id: attributes.remove("correlationid"),
            causation_id: attributes.remove("causationid"),
            traceparent: attributes.remove("traceparent"),
            partition_key: attributes.remove("partitionkey"),
            extensions: attributes,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        let mut envelope = Envelope::new(
            "orders",
            "orders.order-placed.v1",
            Bytes::from_static(b"{}"),
        );
        envelope.subject = Some("order-7".into());
        envelope.datacontenttype = Some("application/json".into());
        envelope.correlation_id = Some("c-1".into());
        envelope.partition_key = Some("customer-9".into());
        envelope.extensions.insert("tenant".into(), "acme".into());
        envelope
    }

    #[test]
    fn headers_round_trip_every_attribute() {
        let envelope = sample();
        let headers = envelope.to_headers("cloudEvents_");
        let read = Envelope::from_headers(
            "cloudEvents_",
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            Some("application/json"),
            envelope.data.clone(),
        )
        .unwrap();
        // Time is written with microseconds, so compare it at that precision.
        let micros = |t: Option<SystemTime>| {
            t.unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_micros()
        };
        assert_eq!(micros(read.time), micros(envelope.time));
        assert_eq!(
            Envelope { time: None, ..read },
            Envelope {
                time: None,
                ..envelope
            }
        );
    }

    #[test]
    fn header_names_are_read_case_blind() {
        let headers = [
            ("CE-SPECVERSION", "1.0"),
            ("ce-Id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("other", "ignored"),
        ];
        let read = Envelope::from_headers("ce-", headers, None, Bytes::new()).unwrap();
        assert_eq!((read.id.as_str(), read.ty.as_str()), ("1", "t"));
        assert!(read.extensions.is_empty());
    }

    #[test]
    fn missing_or_foreign_attributes_are_named() {
        let no_type = [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
        ];
        assert_eq!(
            Envelope::from_headers("ce-", no_type, None, Bytes::new()),
            Err(EnvelopeError::Missing("type"))
        );
        let old = [("ce-specversion", "0.3")];
        assert_eq!(
            Envelope::from_headers("ce-", old, None, Bytes::new()),
            Err(EnvelopeError::SpecVersion("0.3".into()))
        );
        let bad_time = [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-time", "yesterday"),
        ];
        assert!(matches!(
            Envelope::from_headers("ce-", bad_time, None, Bytes::new()),
            Err(EnvelopeError::Time(_))
        ));
    }

    #[test]
    fn an_effect_joins_the_conversation_of_its_cause() {
        let cause = Envelope::new("a", "x.happened.v1", Bytes::new());
        let effect = Envelope::new("b", "y.do.v1", Bytes::new()).caused_by(&cause);
        assert_eq!(effect.correlation_id.as_deref(), Some(cause.id.as_str()));
        assert_eq!(effect.causation_id.as_deref(), Some(cause.id.as_str()));
        let next = Envelope::new("c", "z.done.v1", Bytes::new()).caused_by(&effect);
        assert_eq!(next.correlation_id.as_deref(), Some(cause.id.as_str()));
        assert_eq!(next.causation_id.as_deref(), Some(effect.id.as_str()));
    }
}
