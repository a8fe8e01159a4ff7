//! Exchanges: their declared properties and their routing table.

use crate::error::BrokerError;
use crate::name::{ExchangeName, VhostName};
use crate::observe::ExchangeMetrics;
use crate::routing::{ExchangeKind, RoutingTable};
use crate::value::FieldTable;

/// The exchanges every vhost has from its creation, as RabbitMQ's do.
pub(crate) const PREDECLARED: [(&str, ExchangeKind); 6] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// An exchange in a vhost.
#[derive(Debug, Clone)]
pub(crate) struct Exchange {
    pub(crate) name: ExchangeName,
    pub(crate) kind: ExchangeKind,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
    pub(crate) arguments: FieldTable,
    pub(crate) table: RoutingTable,
    pub(crate) metrics: ExchangeMetrics,
}

impl Exchange {
    pub(crate) fn new(
        vhost: &VhostName,
        name: ExchangeName,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Exchange {
        Exchange {
            metrics: ExchangeMetrics::new(vhost.as_str(), name.as_str()),
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            table: RoutingTable::new(kind),
        }
    }

    /// The exchange named by the `alternate-exchange` argument, if any.
    pub(crate) fn alternate(&self) -> Option<&str> {
        self.arguments
            .get("alternate-exchange")
            .and_then(|v| v.as_str())
    }

    /// Checks that a redeclaration asks for exactly these properties.
    pub(crate) fn check_equivalent(
        &self,
        vhost: &VhostName,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        let entity = format!("exchange '{}' in vhost '{}'", self.name, vhost);
        let differ =
            |property: &str, current: String, received: String| BrokerError::Inequivalent {
                entity: entity.clone(),
                property: property.to_string(),
                current,
                received,
            };
        if self.kind != kind {
            return Err(differ("type", self.kind.to_string(), kind.to_string()));
        }
        if self.durable != durable {
            return Err(differ(
                "durable",
                self.durable.to_string(),
                durable.to_string(),
            ));
        }
        if self.auto_delete != auto_delete {
            return Err(differ(
                "auto_delete",
                self.auto_delete.to_string(),
                auto_delete.to_string(),
            ));
        }
        if self.internal != internal {
            return Err(differ(
                "internal",
                self.internal.to_string(),
                internal.to_string(),
            ));
        }
        crate::broker::check_arguments_equivalent(&entity, &self.arguments, arguments)
    }
}
