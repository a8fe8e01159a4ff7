//! The vocabulary of stream queues (`x-queue-type: stream`): their
//! declaration arguments (retention and segment size, with RabbitMQ's names
//! and syntax), the `x-stream-offset` a consumer attaches at, the name of a
//! consumer whose offset the broker tracks, and what the inspection API
//! reports per consumer. The runtime (consumers, delivery, commits) lives in
//! `queue/stream.rs`, beside the queue it reuses the logs of.

use std::time::Duration;

use tern_storage::{LogConfig, Retention};

use crate::error::BrokerError;
use crate::value::{FieldTable, FieldValue};

/// The consumer argument that names where a stream consumer starts.
pub const OFFSET_ARGUMENT: &str = "x-stream-offset";
/// The consumer argument naming a consumer whose acks the broker commits
/// as an offset (a Tern extension; RabbitMQ ignores it).
pub const CONSUMER_NAME_ARGUMENT: &str = "x-stream-consumer-name";

/// Arguments a stream takes.
pub(crate) const STREAM_ARGUMENTS: [&str; 5] = [
    "x-max-length-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    // Cluster placement: meaningless on one node, accepted as RabbitMQ does.
    "x-queue-leader-locator",
    "x-initial-cluster-size",
];

/// Queue arguments RabbitMQ knows but refuses on a stream: they describe
/// destructive queues (expiry, length limits, dead-lettering, priorities...).
const QUEUE_ONLY_ARGUMENTS: [&str; 20] = [
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-max-priority",
    "x-single-active-consumer",
    "x-queue-mode",
    "x-queue-version",
    "x-queue-master-locator",
    "x-quorum-initial-group-size",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-message-deduplication",
    "x-cache-ttl",
    "x-cache-size",
    "x-message-group-header",
];

/// The storage's segment size bounds; a requested size is clamped into them.
const MIN_SEGMENT_BYTES: u64 = 4096;
const MAX_SEGMENT_BYTES: u64 = 1 << 31;

fn invalid(argument: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument {
        argument: argument.to_string(),
        reason: reason.into(),
    }
}

/// How long a stream keeps messages and how its log is cut into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamPolicy {
    /// `x-max-length-bytes` and `x-max-age`, applied by whole segments.
    pub(crate) retention: Retention,
    /// `x-stream-max-segment-size-bytes`, clamped to what storage allows.
    pub(crate) segment_bytes: u64,
    /// The partition's index when the stream is a super stream's partition
    /// (`x-super-stream-partition`): it spreads consumer groups.
    pub(crate) partition: Option<u32>,
}

impl Default for StreamPolicy {
    fn default() -> Self {
        StreamPolicy {
            retention: Retention::default(),
            segment_bytes: LogConfig::default().segment_bytes,
            partition: None,
        }
    }
}

impl StreamPolicy {
    /// Reads and checks a stream's declaration arguments, refusing the
    /// queue-only ones as RabbitMQ does. Arguments nobody defines are kept
    /// and ignored, as RabbitMQ does.
    pub(crate) fn from_arguments(args: &FieldTable) -> Result<StreamPolicy, BrokerError> {
        if let Some(arg) = QUEUE_ONLY_ARGUMENTS.iter().find(|a| args.contains_key(**a)) {
            return Err(invalid(arg, "a stream does not take this queue argument"));
        }
        debug_assert!(STREAM_ARGUMENTS
            .iter()
            .all(|a| !QUEUE_ONLY_ARGUMENTS.contains(a)));
        let max_bytes = non_negative(args, "x-max-length-bytes")?;
        let max_age = match args.get("x-max-age") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| {
                        invalid(
                            "x-max-age",
                            format!("expected a string such as 7D, got a {}", v.type_name()),
                        )
                    })
                    .and_then(|s| {
                        parse_interval(s).ok_or_else(|| {
                            invalid(
                                "x-max-age",
                                format!(
                                    "'{s}' is not a positive whole number followed by \
                                     Y, M, D, h, m or s (such as 7D)"
                                ),
                            )
                        })
                    })?,
            ),
        };
        let segment_bytes = non_negative(args, "x-stream-max-segment-size-bytes")?
            .map_or(LogConfig::default().segment_bytes, |b| {
                b.clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
            });
        Ok(StreamPolicy {
            retention: Retention { max_age, max_bytes },
            segment_bytes,
            partition: crate::super_stream::partition_from_arguments(args)?,
        })
    }
}

fn non_negative(args: &FieldTable, name: &str) -> Result<Option<u64>, BrokerError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n as u64)),
            Some(n) => Err(invalid(name, format!("must not be negative, got {n}"))),
            None => Err(invalid(
                name,
                format!("expected an integer, got a {}", v.type_name()),
            )),
        },
    }
}

/// RabbitMQ's interval syntax: a positive whole number and a unit, `Y`
/// (365 days), `M` (30 days), `D`, `h`, `m` or `s`.
pub(crate) fn parse_interval(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let number: u64 = s.get(..s.len() - unit.len_utf8())?.parse().ok()?;
    if number == 0 || !s.as_bytes().first()?.is_ascii_digit() {
        return None;
    }
    let seconds: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    Some(Duration::from_secs(number.checked_mul(seconds)?))
}

/// Where a stream consumer starts (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The oldest message still held.
    First,
    /// The newest message (RabbitMQ: the start of the newest chunk; each
    /// publish to a Tern stream is its own batch, so the two coincide).
    Last,
    /// Only messages published after attaching.
    Next,
    /// This offset, clamped to what the stream holds.
    Offset(u64),
    /// The first message stored at or after this time (ms since the epoch).
    Timestamp(u64),
    /// The first message stored within this interval before attaching.
    Ago(Duration),
}

impl OffsetSpec {
    /// Reads `x-stream-offset` from a consumer's arguments; `None` if absent.
    pub fn from_arguments(args: &FieldTable) -> Result<Option<OffsetSpec>, BrokerError> {
        let Some(v) = args.get(OFFSET_ARGUMENT) else {
            return Ok(None);
        };
        let bad = |why: String| invalid(OFFSET_ARGUMENT, why);
        let spec = match v {
            FieldValue::Timestamp(seconds) => OffsetSpec::Timestamp(seconds.saturating_mul(1000)),
            FieldValue::String(_) | FieldValue::Bytes(_) => match v.as_str() {
                Some("first") => OffsetSpec::First,
                Some("last") => OffsetSpec::Last,
                Some("next") => OffsetSpec::Next,
                Some(s) => OffsetSpec::Ago(parse_interval(s).ok_or_else(|| {
                    bad(format!(
                        "'{s}' is not first, last, next or an interval such as 1h"
                    ))
                })?),
                None => return Err(bad("expected a UTF-8 string".into())),
            },
            other => match other.as_i64() {
                // RabbitMQ reads a negative offset as the first one.
                Some(n) => OffsetSpec::Offset(n.max(0) as u64),
                None => {
                    return Err(bad(format!(
                        "expected first, last, next, an offset, a timestamp or an \
                         interval, got a {}",
                        other.type_name()
                    )))
                }
            },
        };
        Ok(Some(spec))
    }
}

/// The name under which a stream consumer's offset is committed
/// (`x-stream-consumer-name`): 1 to 255 bytes of UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerName(String);

impl ConsumerName {
    /// Reads the name from a consumer's arguments; `None` if absent.
    pub fn from_arguments(args: &FieldTable) -> Result<Option<ConsumerName>, BrokerError> {
        let Some(v) = args.get(CONSUMER_NAME_ARGUMENT) else {
            return Ok(None);
        };
        let s = v.as_str().ok_or_else(|| {
            invalid(
                CONSUMER_NAME_ARGUMENT,
                format!("expected a string, got a {}", v.type_name()),
            )
        })?;
        ConsumerName::new(s).map(Some)
    }

    /// Checks a name.
    pub fn new(name: &str) -> Result<ConsumerName, BrokerError> {
        if name.is_empty() || name.len() > 255 {
            return Err(invalid(
                CONSUMER_NAME_ARGUMENT,
                format!("must be 1 to 255 bytes, got {}", name.len()),
            ));
        }
        Ok(ConsumerName(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One consumer's position in a stream, for operators
/// ([`crate::Broker::stream_offsets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConsumerOffset {
    /// The tracked name, if the consumer has one.
    pub name: Option<ConsumerName>,
    /// The attached consumer's tag; `None` for a named consumer that is not
    /// attached now (its committed offset is kept).
    pub consumer_tag: Option<String>,
    /// The next offset the attached consumer will be sent.
    pub next: Option<u64>,
    /// The committed offset of a named consumer: every message below it is
    /// acknowledged.
    pub committed: Option<u64>,
    /// Messages between the consumer and the stream's end: from the
    /// committed offset for a named consumer, from the next delivery otherwise.
    pub lag: u64,
}

/// A stream's extent and its consumers' positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOffsets {
    /// The oldest offset still held.
    pub first: u64,
    /// The offset the next message will get.
    pub end: u64,
    /// Per consumer, attached ones in attach order, then detached named ones by name.
    pub consumers: Vec<StreamConsumerOffset>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn intervals_use_rabbitmq_units() {
        assert_eq!(parse_interval("7D"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_interval("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_interval("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_interval("10s"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_interval("1Y"),
            Some(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(parse_interval("1M"), Some(Duration::from_secs(30 * 86_400)));
        for bad in [
            "",
            "s",
            "0s",
            "1.5h",
            "-1h",
            "+1h",
            "7X",
            "7d",
            "h1",
            "99999999999999999999Y",
        ] {
            assert_eq!(parse_interval(bad), None, "{bad}");
        }
    }

    #[test]
    fn stream_arguments_are_checked_naming_the_argument() {
        let p = StreamPolicy::from_arguments(&args(&[
            ("x-max-age", FieldValue::String("10s".into())),
            ("x-max-length-bytes", FieldValue::I64(1000)),
            ("x-stream-max-segment-size-bytes", FieldValue::I32(500)),
            ("x-anything-else", FieldValue::Bool(true)),
        ]))
        .unwrap();
        assert_eq!(p.retention.max_age, Some(Duration::from_secs(10)));
        assert_eq!(p.retention.max_bytes, Some(1000));
        assert_eq!(p.segment_bytes, MIN_SEGMENT_BYTES);
        for (bad, arg) in [
            (("x-max-age", FieldValue::I32(5)), "x-max-age"),
            (("x-max-age", FieldValue::String("7X".into())), "x-max-age"),
            (
                ("x-max-length-bytes", FieldValue::I64(-5)),
                "x-max-length-bytes",
            ),
            (
                ("x-max-length-bytes", FieldValue::String("x".into())),
                "x-max-length-bytes",
            ),
            (("x-message-ttl", FieldValue::I32(5)), "x-message-ttl"),
            (("x-max-length", FieldValue::I32(5)), "x-max-length"),
            (
                ("x-dead-letter-exchange", FieldValue::String("d".into())),
                "x-dead-letter-exchange",
            ),
        ] {
            match StreamPolicy::from_arguments(&args(&[bad])).unwrap_err() {
                BrokerError::InvalidArgument { argument, .. } => assert_eq!(argument, arg),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn offset_specs_read_every_rabbitmq_form() {
        let spec = |v: FieldValue| OffsetSpec::from_arguments(&args(&[(OFFSET_ARGUMENT, v)]));
        assert_eq!(
            spec(FieldValue::String("first".into())).unwrap(),
            Some(OffsetSpec::First)
        );
        assert_eq!(
            spec(FieldValue::String("last".into())).unwrap(),
            Some(OffsetSpec::Last)
        );
        assert_eq!(
            spec(FieldValue::String("next".into())).unwrap(),
            Some(OffsetSpec::Next)
        );
        assert_eq!(
            spec(FieldValue::I64(7)).unwrap(),
            Some(OffsetSpec::Offset(7))
        );
        assert_eq!(
            spec(FieldValue::U8(7)).unwrap(),
            Some(OffsetSpec::Offset(7))
        );
        assert_eq!(
            spec(FieldValue::Timestamp(5)).unwrap(),
            Some(OffsetSpec::Timestamp(5000))
        );
        assert_eq!(
            spec(FieldValue::String("1h".into())).unwrap(),
            Some(OffsetSpec::Ago(Duration::from_secs(3600)))
        );
        assert!(spec(FieldValue::String("bogus".into())).is_err());
        assert!(spec(FieldValue::Bool(true)).is_err());
        assert_eq!(
            spec(FieldValue::I64(-1)).unwrap(),
            Some(OffsetSpec::Offset(0))
        );
        assert_eq!(
            OffsetSpec::from_arguments(&FieldTable::new()).unwrap(),
            None
        );
    }

    #[test]
    fn consumer_names_are_bounded() {
        assert!(ConsumerName::new("").is_err());
        assert!(ConsumerName::new(&"x".repeat(256)).is_err());
        assert_eq!(ConsumerName::new("billing").unwrap().as_str(), "billing");
        let named = args(&[(CONSUMER_NAME_ARGUMENT, FieldValue::I32(3))]);
        assert!(ConsumerName::from_arguments(&named).is_err());
    }
}
