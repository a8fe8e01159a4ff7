//! A queue's optional behaviours, read from its declaration arguments with
//! RabbitMQ's names and rules: message TTL, dead-lettering, length limits
//! and the delivery limit.

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
}

/// Arguments that RabbitMQ defines and this broker does not implement yet:
/// refused rather than silently ignored.
const NOT_YET: [&str; 3] = [
    "x-single-active-consumer",
    "x-queue-mode",
    "x-queue-master-locator",
];

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
            expires: match non_negative(args, "x-expires")? {
                Some(0) => return Err(invalid("x-expires", "must be at least 1 millisecond")),
                other => other,
            },
        })
    }
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
            "x-single-active-consumer",
            FieldValue::Bool(true),
        )]))
        .unwrap_err();

        assert!(matches!(err, BrokerError::NotImplemented(_)));
        assert_eq!(parse_expiration("250").unwrap(), 250);
        assert!(parse_expiration("-5").is_err());
    }
}
