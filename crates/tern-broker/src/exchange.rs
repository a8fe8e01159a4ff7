//! Exchanges: their declared properties, their routing table, and the
//! plugin-style types that add behaviour before routing (delayed and
//! deduplicating exchanges, super streams).

use std::sync::Arc;

use crate::dedup::{Dedup, DedupPolicy};
use crate::error::BrokerError;
use crate::name::{ExchangeName, VhostName};
use crate::observe::ExchangeMetrics;
use crate::routing::{ExchangeKind, RoutingTable};
use crate::super_stream::SUPER_STREAM_EXCHANGE_TYPE;
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

/// The type name of RabbitMQ's delayed-message plugin's exchange.
pub(crate) const DELAYED_EXCHANGE_TYPE: &str = "x-delayed-message";
/// The type name of RabbitMQ's message-deduplication plugin's exchange.
pub(crate) const DEDUP_EXCHANGE_TYPE: &str = "x-message-deduplication";

/// What an exchange does before it routes, besides routing as its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExchangeFlavor {
    /// Routes at once.
    Plain,
    /// `x-delayed-message`: a message with an `x-delay` header waits in the
    /// delay store, then routes as the `x-delayed-type` kind.
    Delayed,
    /// `x-message-deduplication`: a message whose key was seen within the
    /// window is confirmed but not routed; routes as fanout, like the plugin.
    Deduplicating(DedupPolicy),
    /// `x-super-stream`: routes as direct by the binding key of the
    /// partition its key hashes to, out of this many (`super_stream.rs`).
    SuperStream(u32),
}

impl ExchangeFlavor {
    /// The type name it is declared and recorded with.
    pub(crate) fn type_name(self, kind: ExchangeKind) -> &'static str {
        match self {
            ExchangeFlavor::Plain => kind.as_str(),
            ExchangeFlavor::Delayed => DELAYED_EXCHANGE_TYPE,
            ExchangeFlavor::Deduplicating(_) => DEDUP_EXCHANGE_TYPE,
            ExchangeFlavor::SuperStream(_) => SUPER_STREAM_EXCHANGE_TYPE,
        }
    }
}

/// Parses a declared exchange type (and the arguments it depends on) into
/// the kind it routes as and its flavor. Anything unknown is 503
/// COMMAND_INVALID, as RabbitMQ answers an unknown type.
pub(crate) fn exchange_type(
    kind: &str,
    arguments: &FieldTable,
) -> Result<(ExchangeKind, ExchangeFlavor), BrokerError> {
    match kind {
        DELAYED_EXCHANGE_TYPE => {
            let invalid = |reason: String| BrokerError::InvalidArgument {
                argument: "x-delayed-type".into(),
                reason,
            };
            match arguments.get("x-delayed-type") {
                None => Err(invalid(
                    "an x-delayed-message exchange needs it: direct, fanout, topic or headers"
                        .into(),
                )),
                Some(v) => match v.as_str() {
                    Some(s) => s
                        .parse::<ExchangeKind>()
                        .map(|k| (k, ExchangeFlavor::Delayed))
                        .map_err(|e| invalid(format!("{e}; use direct, fanout, topic or headers"))),
                    None => Err(invalid(format!(
                        "expected a string, got a {}",
                        v.type_name()
                    ))),
                },
            }
        }
        DEDUP_EXCHANGE_TYPE => {
            let policy = crate::policy::dedup_window(arguments)?;
            if let Some(v) = arguments.get("x-cache-persistence") {
                if !matches!(v.as_str(), Some("disk" | "memory")) {
                    return Err(BrokerError::InvalidArgument {
                        argument: "x-cache-persistence".into(),
                        reason:
                            "use \"disk\" or \"memory\" (Tern keeps the window on disk either way)"
                                .into(),
                    });
                }
            }
            Ok((ExchangeKind::Fanout, ExchangeFlavor::Deduplicating(policy)))
        }
        SUPER_STREAM_EXCHANGE_TYPE => {
            let partitions = crate::super_stream::partitions_from_arguments(arguments)?;
            crate::super_stream::check_key_header(arguments)?;
            Ok((
                ExchangeKind::Direct,
                ExchangeFlavor::SuperStream(partitions),
            ))
        }
        other => other
            .parse::<ExchangeKind>()
            .map(|k| (k, ExchangeFlavor::Plain))
            .map_err(|e| BrokerError::NotAllowed(e.to_string())),
    }
}

/// Whether `kind` names an exchange type this broker declares.
pub fn is_exchange_type(kind: &str) -> bool {
    matches!(
        kind,
        DELAYED_EXCHANGE_TYPE | DEDUP_EXCHANGE_TYPE | SUPER_STREAM_EXCHANGE_TYPE
    ) || kind.parse::<ExchangeKind>().is_ok()
}

/// An exchange in a vhost.
#[derive(Debug, Clone)]
pub(crate) struct Exchange {
    pub(crate) name: ExchangeName,
    pub(crate) kind: ExchangeKind,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
    /// What it does before routing through `table`.
    pub(crate) flavor: ExchangeFlavor,
    /// A deduplicating exchange's window of keys seen, with its log.
    pub(crate) dedup: Option<Arc<Dedup>>,
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
            flavor: ExchangeFlavor::Plain,
            dedup: None,
            arguments,
            table: RoutingTable::new(kind),
        }
    }

    /// The type it was declared with, as clients name it.
    pub(crate) fn type_name(&self) -> &'static str {
        self.flavor.type_name(self.kind)
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
        (kind, flavor): (ExchangeKind, ExchangeFlavor),
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
        // The dedup window's settings are arguments, compared below.
        let same_flavor = std::mem::discriminant(&self.flavor) == std::mem::discriminant(&flavor);
        if self.kind != kind || !same_flavor {
            let show = |kind: ExchangeKind, flavor: ExchangeFlavor| match flavor {
                ExchangeFlavor::Plain => kind.to_string(),
                ExchangeFlavor::Delayed => format!("{DELAYED_EXCHANGE_TYPE} ({kind})"),
                ExchangeFlavor::Deduplicating(_) => DEDUP_EXCHANGE_TYPE.to_string(),
                ExchangeFlavor::SuperStream(_) => SUPER_STREAM_EXCHANGE_TYPE.to_string(),
            };
            return Err(differ(
                "type",
                show(self.kind, self.flavor),
                show(kind, flavor),
            ));
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
