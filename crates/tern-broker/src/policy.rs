//! A queue's optional behaviours, read from its declaration arguments with
//! RabbitMQ's names and rules: message TTL, dead-lettering, length limits,
//! the delivery limit, single active consumer and FIFO message groups.

use crate::dedup::DedupPolicy;
use crate::error::BrokerError;
use crate::name::ExchangeName;
use crate::value::FieldTable;

/// What a full queue does with a new message (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Overflow {
    /// Drop (or dead-letter) the oldest ready message.
    #[default]
    DropHead,
    /// Refuse the new message; the publisher gets a nack.
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The arguments-driven behaviour of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QueuePolicy {
    pub(crate) message_ttl: Option<u64>,
    pub(crate) dead_letter_exchange: Option<ExchangeName>,
    pub(crate) dead_letter_routing_key: Option<String>,
    pub(crate) max_length: Option<u64>,
    /// The most bytes of message bodies the queue holds ready (`x-max-length-bytes`).
    pub(crate) max_length_bytes: Option<u64>,
    pub(crate) overflow: Overflow,
    pub(crate) delivery_limit: Option<u64>,
    /// Delete the queue after this many milliseconds unused (`x-expires`).
    pub(crate) expires: Option<u64>,
    /// Deliver higher-priority messages first, priorities capped here (`x-max-priority`).
    pub(crate) max_priority: Option<u8>,
    /// Only one consumer receives at a time (`x-single-active-consumer`).
    pub(crate) single_active_consumer: bool,
    /// Duplicates are confirmed but not enqueued (`x-message-deduplication`).
    pub(crate) dedup: Option<DedupPolicy>,
    /// FIFO message groups: the header naming a message's group
    /// (`x-message-group-header`).
    pub(crate) message_group_header: Option<String>,
}

/// The longest header name AMQP can carry (a short string).
const MAX_HEADER_NAME: usize = 255;

/// `x-message-group-header`: a non-empty header name. Priorities would
/// reorder a group's messages, so the two are not combined.
fn message_group_header(args: &FieldTable) -> Result<Option<String>, BrokerError> {
    const ARG: &str = "x-message-group-header";
    let Some(name) = string(args, ARG)? else {
        return Ok(None);
    };
    if name.is_empty() || name.len() > MAX_HEADER_NAME {
        return Err(invalid(
            ARG,
            format!("must be a header name of 1 to {MAX_HEADER_NAME} bytes"),
        ));
    }
    if args.contains_key("x-max-priority") {
        return Err(invalid(
            ARG,
            "cannot be combined with x-max-priority: priorities would reorder a group",
        ));
    }
    Ok(Some(name.to_string()))
}

/// Arguments that RabbitMQ defines and this broker does not implement yet:
/// refused rather than silently ignored.
const NOT_YET: [&str; 2] = ["x-queue-mode", "x-queue-master-locator"];

fn invalid(argument: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument {
        argument: argument.to_string(),
        reason: reason.into(),
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

fn boolean(args: &FieldTable, name: &str) -> Result<bool, BrokerError> {
    match args.get(name) {
        None => Ok(false),
        Some(crate::value::FieldValue::Bool(b)) => Ok(*b),
        Some(v) => Err(invalid(
            name,
            format!("expected a boolean, got a {}", v.type_name()),
        )),
    }
}

fn string<'a>(args: &'a FieldTable, name: &str) -> Result<Option<&'a str>, BrokerError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| invalid(name, format!("expected a string, got a {}", v.type_name()))),
    }
}

impl QueuePolicy {
    /// Reads and checks a queue's arguments.
    pub(crate) fn from_arguments(args: &FieldTable) -> Result<QueuePolicy, BrokerError> {
        if let Some(arg) = NOT_YET.iter().find(|a| args.contains_key(**a)) {
            return Err(BrokerError::NotImplemented(format!(
                "queue argument '{arg}' is not supported yet"
            )));
        }
        let dead_letter_exchange = string(args, "x-dead-letter-exchange")?
            .map(|n| {
                ExchangeName::new(n).map_err(|e| invalid("x-dead-letter-exchange", e.to_string()))
            })
            .transpose()?;
        let dead_letter_routing_key =
            string(args, "x-dead-letter-routing-key")?.map(str::to_string);
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(invalid(
                "x-dead-letter-routing-key",
                "requires x-dead-letter-exchange to be set as well",
            ));
        }
        let overflow = match string(args, "x-overflow")? {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(invalid(
                    "x-overflow",
                    format!(
                    "unknown value '{other}'; use drop-head, reject-publish or reject-publish-dlx"
                ),
                ))
            }
        };
        Ok(QueuePolicy {
            message_ttl: non_negative(args, "x-message-ttl")?,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_length: non_negative(args, "x-max-length")?,
            max_length_bytes: non_negative(args, "x-max-length-bytes")?,
            overflow,
            delivery_limit: non_negative(args, "x-delivery-limit")?,
            max_priority: match non_negative(args, "x-max-priority")? {
                None => None,
                Some(p @ 1..=255) => Some(p as u8),
                Some(p) => {
                    return Err(invalid(
                        "x-max-priority",
                        format!("must be between 1 and 255, got {p}"),
                    ))
                }
            },
            single_active_consumer: boolean(args, "x-single-active-consumer")?,
            message_group_header: message_group_header(args)?,
            dedup: match boolean(args, "x-message-deduplication")? {
                true => Some(dedup_window(args)?),
                false => None,
            },
            expires: match non_negative(args, "x-expires")? {
                Some(0) => return Err(invalid("x-expires", "must be at least 1 millisecond")),
                other => other,
            },
        })
    }
}

/// A deduplication window from `x-cache-ttl` and `x-cache-size`, the
/// arguments a deduplicating queue and a deduplicating exchange share.
pub(crate) fn dedup_window(args: &FieldTable) -> Result<DedupPolicy, BrokerError> {
    Ok(DedupPolicy::new(
        non_negative(args, "x-cache-ttl")?,
        match non_negative(args, "x-cache-size")? {
            Some(0) => return Err(invalid("x-cache-size", "must be at least 1")),
            other => other,
        },
    ))
}

/// A per-message TTL from the `expiration` property: a non-negative
/// integer of milliseconds, as a string. Anything else is refused.
pub(crate) fn parse_expiration(expiration: &str) -> Result<u64, BrokerError> {
    expiration.parse::<u64>().map_err(|_| {
        invalid(
            "expiration",
            format!("'{expiration}' is not a non-negative integer of milliseconds"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::FieldValue;

    fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn arguments_are_read_with_rabbitmq_names_and_types() {
        let p = QueuePolicy::from_arguments(&args(&[
            ("x-message-ttl", FieldValue::I32(1000)),
            ("x-dead-letter-exchange", FieldValue::String("dlx".into())),
            (
                "x-dead-letter-routing-key",
                FieldValue::String("dead".into()),
            ),
            ("x-max-length", FieldValue::I64(10)),
            ("x-overflow", FieldValue::String("reject-publish".into())),
            ("x-delivery-limit", FieldValue::U8(3)),
        ]))
        .unwrap();
        assert_eq!(p.message_ttl, Some(1000));
        assert_eq!(p.dead_letter_exchange.unwrap().as_str(), "dlx");
        assert_eq!(p.max_length, Some(10));
        assert_eq!(p.overflow, Overflow::RejectPublish);
        assert_eq!(p.delivery_limit, Some(3));
    }

    #[test]
    fn wrong_types_and_contradictions_are_refused_naming_the_argument() {
        for bad in [
            args(&[("x-message-ttl", FieldValue::String("soon".into()))]),
            args(&[("x-message-ttl", FieldValue::I32(-1))]),
            args(&[("x-dead-letter-routing-key", FieldValue::String("k".into()))]),
            args(&[("x-overflow", FieldValue::String("explode".into()))]),
            args(&[("x-max-length", FieldValue::Bool(true))]),
        ] {
            let err = QueuePolicy::from_arguments(&bad).unwrap_err();
            assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        }
        assert!(QueuePolicy::from_arguments(&args(&[("x-expires", FieldValue::I32(0))])).is_err());
        assert!(
            QueuePolicy::from_arguments(&args(&[("x-max-priority", FieldValue::I32(0))])).is_err()
        );
        let err = QueuePolicy::from_arguments(&args(&[(
            "x-queue-mode",
            FieldValue::String("lazy".into()),
        )]))
        .unwrap_err();
        assert!(matches!(err, BrokerError::NotImplemented(_)));
        assert!(
            QueuePolicy::from_arguments(&args(&[(
                "x-single-active-consumer",
                FieldValue::Bool(true)
            )]))
            .unwrap()
            .single_active_consumer
        );
        let err = QueuePolicy::from_arguments(&args(&[(
            "x-single-active-consumer",
            FieldValue::String("yes".into()),
        )]))
        .unwrap_err();
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        assert_eq!(parse_expiration("250").unwrap(), 250);
        assert!(parse_expiration("-5").is_err());
    }
}
