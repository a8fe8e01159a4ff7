//! Super streams: one logical stream over N partition streams, as
//! RabbitMQ's super streams are, for plain AMQP 0-9-1 clients.
//!
//! This module owns the vocabulary: the `x-super-stream` exchange type and
//! its arguments, the partition queues' names and arguments, the hash that
//! picks a message's partition, the rule that picks each partition's active
//! consumer within a consumer group, and what inspection reports. The
//! declaration and deletion (atomic with the partitions) live in
//! `broker.rs`, the consumer groups at run time in `queue/stream.rs`.

use std::borrow::Cow;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::exchange::{Exchange, ExchangeFlavor};
use crate::message::Message;
use crate::name::{ExchangeName, QueueName};
use crate::stream::ConsumerName;
use crate::value::{FieldTable, FieldValue};

/// The exchange type that declares a super stream.
pub const SUPER_STREAM_EXCHANGE_TYPE: &str = "x-super-stream";
/// The exchange argument giving the number of partitions.
pub const PARTITIONS_ARGUMENT: &str = "x-partitions";
/// The exchange argument naming the header that holds the partition key.
pub const PARTITION_KEY_HEADER_ARGUMENT: &str = "x-partition-key-header";
/// The queue argument Tern gives each partition: its index.
pub const PARTITION_ARGUMENT: &str = "x-super-stream-partition";
/// The binding argument RabbitMQ gives each partition's binding: its index.
pub const PARTITION_ORDER_ARGUMENT: &str = "x-stream-partition-order";
/// The consumer argument that makes a named stream consumer one member of
/// a group with one active consumer per partition.
pub const SINGLE_ACTIVE_ARGUMENT: &str = "x-single-active-consumer";
/// The murmur3 seed RabbitMQ's stream clients hash routing keys with.
pub const HASH_SEED: u32 = 104_729;
/// The most partitions a super stream may have.
pub const MAX_PARTITIONS: u32 = 1000;

fn invalid(argument: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument {
        argument: argument.to_string(),
        reason: reason.into(),
    }
}

/// The partition a key belongs to: MurmurHash3 x86 32-bit of the key's
/// bytes with seed 104729, as an unsigned number, modulo the partition
/// count. This is what RabbitMQ's stream clients compute for their hash
/// routing strategy, so they and Tern agree on every key's partition.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    // Hashing a slice reads from memory and cannot fail.
    let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(key), HASH_SEED).unwrap_or(0);
    hash % partitions.max(1)
}

/// The name of partition `index` of super stream `name`: `name-index`, as
/// RabbitMQ names them.
pub fn partition_queue_name(name: &str, index: u32) -> String {
    format!("{name}-{index}")
}

/// Which member of a group (in arrival order) is partition `partition`'s
/// active consumer: index `partition mod members`, RabbitMQ's rule. When
/// every member attaches to every partition, consecutive partitions go to
/// consecutive members, so each member holds the partition count divided
/// by the member count, give or take one.
pub fn active_member(partition: u32, members: usize) -> Option<usize> {
    (members > 0).then(|| partition as usize % members)
}

/// Reads `x-partitions` (required, 1 to [`MAX_PARTITIONS`]).
pub(crate) fn partitions_from_arguments(args: &FieldTable) -> Result<u32, BrokerError> {
    let Some(v) = args.get(PARTITIONS_ARGUMENT) else {
        return Err(invalid(
            PARTITIONS_ARGUMENT,
            format!("an {SUPER_STREAM_EXCHANGE_TYPE} exchange needs its partition count"),
        ));
    };
    match v.as_i64() {
        Some(n) if (1..=i64::from(MAX_PARTITIONS)).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(
            PARTITIONS_ARGUMENT,
            format!("must be 1 to {MAX_PARTITIONS}, got {n}"),
        )),
        None => Err(invalid(
            PARTITIONS_ARGUMENT,
            format!("expected an integer, got a {}", v.type_name()),
        )),
    }
}

/// Checks `x-partition-key-header` (optional: a header name, 1 to 255 bytes).
pub(crate) fn check_key_header(args: &FieldTable) -> Result<(), BrokerError> {
    match args.get(PARTITION_KEY_HEADER_ARGUMENT) {
        None => Ok(()),
        Some(v) => match v.as_str() {
            Some(s) if !s.is_empty() && s.len() <= 255 => Ok(()),
            Some(s) => Err(invalid(
                PARTITION_KEY_HEADER_ARGUMENT,
                format!("must be 1 to 255 bytes, got {}", s.len()),
            )),
            None => Err(invalid(
                PARTITION_KEY_HEADER_ARGUMENT,
                format!("expected a string, got a {}", v.type_name()),
            )),
        },
    }
}

/// Reads a partition's index from its queue arguments.
pub(crate) fn partition_from_arguments(args: &FieldTable) -> Result<Option<u32>, BrokerError> {
    match args.get(PARTITION_ARGUMENT) {
        None => Ok(None),
        Some(v) => match v.as_i64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(invalid(
                PARTITION_ARGUMENT,
                "expected a non-negative integer (the partition's index)",
            )),
        },
    }
}

/// The declaration arguments of partition `index`: a durable stream with
/// the stream arguments the exchange was declared with, and its index.
pub(crate) fn partition_arguments(exchange_args: &FieldTable, index: u32) -> FieldTable {
    let mut args: FieldTable = exchange_args
        .iter()
        .filter(|(k, _)| crate::stream::STREAM_ARGUMENTS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    args.insert("x-queue-type".into(), FieldValue::String("stream".into()));
    args.insert(PARTITION_ARGUMENT.into(), FieldValue::I64(i64::from(index)));
    args
}

/// The binding key of partition `index` (RabbitMQ's keys for a super stream
/// declared with a partition count) and its binding arguments.
pub(crate) fn partition_binding(index: u32) -> (String, FieldTable) {
    let mut args = FieldTable::new();
    args.insert(
        PARTITION_ORDER_ARGUMENT.into(),
        FieldValue::I64(i64::from(index)),
    );
    (index.to_string(), args)
}

/// A message's partition key: the key header's value when the exchange
/// names one and the message has it as a string (its UTF-8 bytes) or an
/// integer (its decimal digits), otherwise the routing key.
pub fn partition_key<'m>(key_header: Option<&str>, message: &'m Message) -> Cow<'m, [u8]> {
    let value = key_header.and_then(|h| message.properties.headers.as_ref()?.get(h));
    match value {
        Some(v) => match (v.as_str(), v.as_i64()) {
            (Some(s), _) => Cow::Borrowed(s.as_bytes()),
            (None, Some(n)) => Cow::Owned(n.to_string().into_bytes()),
            _ => Cow::Borrowed(message.routing_key.as_bytes()),
        },
        None => Cow::Borrowed(message.routing_key.as_bytes()),
    }
}

/// The key a super stream exchange routes `message` by through its
/// bindings: its partition's binding key. `None` for other exchanges.
pub(crate) fn routing_key(ex: &Exchange, message: &Message) -> Option<String> {
    let ExchangeFlavor::SuperStream(partitions) = ex.flavor else {
        return None;
    };
    let header = ex
        .arguments
        .get(PARTITION_KEY_HEADER_ARGUMENT)
        .and_then(|v| v.as_str());
    let key = partition_key(header, message);
    Some(partition_of(&key, partitions).to_string())
}

/// A consumer group's members on one partition and which is active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The group: the members' `x-stream-consumer-name`.
    pub group: ConsumerName,
    /// The consumer tags of the members, in arrival order.
    pub members: Vec<String>,
    /// The tag of the member that receives now; `None` while the previous
    /// one still finishes its in-flight messages, or without members.
    pub active: Option<String>,
    /// The group's committed offset on this partition.
    pub committed: Option<u64>,
}

/// One partition of a super stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Its index, from 0.
    pub index: u32,
    /// Its stream queue (`name-index`).
    pub queue: QueueName,
    /// Whether that queue still exists (it can be deleted on its own).
    pub exists: bool,
    /// Messages it holds.
    pub messages: u64,
    /// Its consumer groups, by name.
    pub groups: Vec<GroupAssignment>,
}

/// A super stream: its partitions and their consumer groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperStreamInfo {
    /// The exchange's name.
    pub name: ExchangeName,
    /// The header whose value is the partition key, if any.
    pub key_header: Option<String>,
    /// The partitions, by index.
    pub partitions: Vec<PartitionInfo>,
}

impl Broker {
    /// A super stream's partitions and each consumer group's assignment.
    /// 404 if the exchange does not exist, 406 if it is not a super stream.
    pub fn super_stream(&self, vhost: &str, name: &str) -> Result<SuperStreamInfo, BrokerError> {
        let vh = self.vhost(vhost)?;
        let name = ExchangeName::new(name)?;
        let st = vh.read();
        let ex = st
            .exchanges
            .get(&name)
            .ok_or_else(|| BrokerError::ExchangeNotFound {
                vhost: vh.name.to_string(),
                exchange: name.to_string(),
            })?;
        let ExchangeFlavor::SuperStream(partitions) = ex.flavor else {
            return Err(BrokerError::PreconditionFailed(format!(
                "exchange '{name}' in vhost '{}' is not a super stream (type {})",
                vh.name,
                ex.type_name()
            )));
        };
        let key_header = ex
            .arguments
            .get(PARTITION_KEY_HEADER_ARGUMENT)
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let mut out = Vec::with_capacity(partitions as usize);
        for index in 0..partitions {
            let queue = QueueName::new(partition_queue_name(name.as_str(), index))?;
            let found = st.queues.get(&queue).cloned();
            out.push(PartitionInfo {
                index,
                exists: found.is_some(),
                messages: found.as_ref().map_or(0, |q| q.message_count()),
                groups: found.map(|q| q.stream_groups()).unwrap_or_default(),
                queue,
            });
        }
        Ok(SuperStreamInfo {
            name,
            key_header,
            partitions: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        let h = |s: &str, seed| murmur3::murmur3_32(&mut std::io::Cursor::new(s), seed).ok();
        // Published MurmurHash3_x86_32 test vectors.
        assert_eq!(h("", 0), Some(0));
        assert_eq!(h("", 1), Some(0x514E_28B7));
        assert_eq!(h("hello", 0), Some(0x248B_FA47));
        assert_eq!(
            h("The quick brown fox jumps over the lazy dog", 0),
            Some(0x2E4F_F723)
        );
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for n in 1..20 {
            for key in ["", "a", "order-1", "customer-42", "ü"] {
                let p = partition_of(key.as_bytes(), n);
                assert!(p < n);
                assert_eq!(p, partition_of(key.as_bytes(), n));
            }
        }
        assert_eq!(partition_of(b"anything", 1), 0);
    }

    #[test]
    fn arguments_are_checked_naming_the_argument() {
        let t = |pairs: &[(&str, FieldValue)]| -> FieldTable {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        assert_eq!(
            partitions_from_arguments(&t(&[(PARTITIONS_ARGUMENT, FieldValue::I32(3))])).ok(),
            Some(3)
        );
        for bad in [
            t(&[]),
            t(&[(PARTITIONS_ARGUMENT, FieldValue::I32(0))]),
            t(&[(PARTITIONS_ARGUMENT, FieldValue::I64(1001))]),
            t(&[(PARTITIONS_ARGUMENT, FieldValue::String("3".into()))]),
        ] {
            match partitions_from_arguments(&bad) {
                Err(BrokerError::InvalidArgument { argument, .. }) => {
                    assert_eq!(argument, PARTITIONS_ARGUMENT)
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in [FieldValue::I32(1), FieldValue::String(String::new())] {
            match check_key_header(&t(&[(PARTITION_KEY_HEADER_ARGUMENT, bad)])) {
                Err(BrokerError::InvalidArgument { argument, .. }) => {
                    assert_eq!(argument, PARTITION_KEY_HEADER_ARGUMENT)
                }
                other => panic!("{other:?}"),
            }
        }
        let args = partition_arguments(
            &t(&[
                (PARTITIONS_ARGUMENT, FieldValue::I32(3)),
                ("x-max-age", FieldValue::String("7D".into())),
                ("alternate-exchange", FieldValue::String("ae".into())),
            ]),
            2,
        );
        assert_eq!(
            args.get("x-max-age"),
            Some(&FieldValue::String("7D".into()))
        );
        assert_eq!(args.get(PARTITION_ARGUMENT), Some(&FieldValue::I64(2)));
        assert!(!args.contains_key("alternate-exchange"));
        assert!(!args.contains_key(PARTITIONS_ARGUMENT));
    }

    #[test]
    fn the_key_header_wins_when_present() {
        let mut m = Message {
            exchange: ExchangeName::new("s").unwrap_or_else(|_| ExchangeName::default_exchange()),
            routing_key: "rk".into(),
            properties: Default::default(),
            body: Default::default(),
        };
        assert_eq!(&*partition_key(Some("k"), &m), b"rk");
        let mut h = FieldTable::new();
        h.insert("k".into(), FieldValue::String("customer".into()));
        m.properties.headers = Some(h.clone());
        assert_eq!(&*partition_key(Some("k"), &m), b"customer");
        assert_eq!(&*partition_key(None, &m), b"rk");
        h.insert("k".into(), FieldValue::I32(42));
        m.properties.headers = Some(h.clone());
        assert_eq!(&*partition_key(Some("k"), &m), b"42");
        h.insert("k".into(), FieldValue::Bool(true));
        m.properties.headers = Some(h);
        assert_eq!(&*partition_key(Some("k"), &m), b"rk");
    }
}
