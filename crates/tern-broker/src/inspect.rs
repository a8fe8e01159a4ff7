//! Read-only views of a vhost's definitions, for operators: listings of
//! exchanges, queues and bindings with their properties, as the management
//! API and the CLI show them. Nothing here changes the broker.
//!
//! Each listing takes the vhost's read lock once and copies out what it
//! reports, so it is a consistent picture of the definitions at one moment
//! (queue depths are read a moment later, queue by queue).

use crate::broker::{Broker, QueueInfo};
use crate::error::BrokerError;
use crate::exchange::Exchange;
use crate::name::ExchangeName;
use crate::queue::Queue;
use crate::routing::{Destination, ExchangeKind};
use crate::value::FieldTable;

/// Facts about an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeInfo {
    /// Its name; empty for the default exchange.
    pub name: ExchangeName,
    /// How it routes.
    pub kind: ExchangeKind,
    /// The type it was declared with: the kind, or a plugin type
    /// (`x-delayed-message`, `x-message-deduplication`).
    pub type_name: &'static str,
    /// Whether it survives a restart.
    pub durable: bool,
    /// Whether it is deleted when its last binding goes.
    pub auto_delete: bool,
    /// Whether clients may not publish to it directly.
    pub internal: bool,
    /// The arguments it was declared with (`alternate-exchange`...).
    pub arguments: FieldTable,
    /// How many bindings have it as their source.
    pub bindings: usize,
}

impl ExchangeInfo {
    fn of(ex: &Exchange) -> ExchangeInfo {
        ExchangeInfo {
            name: ex.name.clone(),
            kind: ex.kind,
            type_name: ex.type_name(),
            durable: ex.durable,
            auto_delete: ex.auto_delete,
            internal: ex.internal,
            arguments: ex.arguments.clone(),
            bindings: ex.table.len(),
        }
    }
}

/// One binding: messages `source` routes with `routing_key` (and, for a
/// headers exchange, `arguments`) go on to `destination`.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingInfo {
    /// The exchange the binding belongs to.
    pub source: ExchangeName,
    /// The queue or exchange it routes to.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// The binding's arguments (`x-match` and the headers to match...).
    pub arguments: FieldTable,
}

impl QueueInfo {
    pub(crate) fn of(queue: &Queue) -> QueueInfo {
        QueueInfo {
            name: queue.name.clone(),
            durable: queue.durable,
            exclusive: queue.exclusive_owner.is_some(),
            auto_delete: queue.auto_delete,
            queue_type: queue.queue_type,
            arguments: queue.arguments.clone(),
            ready: queue.message_count(),
            unacked: queue.unacked_count() as u64,
            consumers: queue.consumer_count() as u32,
        }
    }
}

impl Broker {
    /// Every exchange of a vhost, by name (the default exchange, named "",
    /// first).
    pub fn exchanges(&self, vhost: &str) -> Result<Vec<ExchangeInfo>, BrokerError> {
        let vh = self.vhost(vhost)?;
        let mut all: Vec<ExchangeInfo> =
            vh.read().exchanges.values().map(ExchangeInfo::of).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Facts about one exchange.
    pub fn exchange_info(&self, vhost: &str, name: &str) -> Result<ExchangeInfo, BrokerError> {
        let vh = self.vhost(vhost)?;
        let name = ExchangeName::new(name)?;
        let st = vh.read();
        st.exchanges
            .get(&name)
            .map(ExchangeInfo::of)
            .ok_or_else(|| BrokerError::ExchangeNotFound {
                vhost: vh.name.to_string(),
                exchange: name.to_string(),
            })
    }

    /// Every queue of a vhost with its properties and counts, by name.
    /// Exclusive queues of every connection are included.
    pub fn queues(&self, vhost: &str) -> Result<Vec<QueueInfo>, BrokerError> {
        let vh = self.vhost(vhost)?;
        // Copy the handles out first: counting takes each queue's lock,
        // which must not be held under the vhost's (lock order: vhost, then
        // queue, and publishers hold the vhost's for reading meanwhile).
        let queues: Vec<_> = vh.read().queues.values().cloned().collect();
        let mut all: Vec<QueueInfo> = queues.iter().map(|q| QueueInfo::of(q)).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Every binding of a vhost, ordered by source exchange, then
    /// destination, then routing key. The default exchange's implicit
    /// binding to every queue is not listed.
    pub fn bindings(&self, vhost: &str) -> Result<Vec<BindingInfo>, BrokerError> {
        let vh = self.vhost(vhost)?;
        let st = vh.read();
        let mut exchanges: Vec<&Exchange> = st.exchanges.values().collect();
        exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        let mut all = Vec::new();
        for ex in exchanges {
            for (destination, routing_key, arguments) in ex.table.bindings() {
                all.push(BindingInfo {
                    source: ex.name.clone(),
                    destination,
                    routing_key,
                    arguments,
                });
            }
        }
        Ok(all)
    }
}
