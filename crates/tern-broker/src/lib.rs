//! Tern's broker engine: the messaging model that the AMQP front door, the
//! HTTP API, the CLI and the toolkit's embedded transport all drive.
//!
//! It knows nothing of AMQP frames or HTTP. A [`Broker`] holds vhosts with
//! their exchanges, queues and bindings, all durable on `tern-storage`; a
//! [`Channel`] consumes, fetches and acknowledges as an AMQP channel does.
//! This crate is being built up in slices; `ARCHITECTURE.md` says what exists.

mod broker;
mod channel;
pub mod codec;
mod dead_letter;
mod definitions;
pub mod error;
mod exchange;
pub mod message;
pub mod name;
mod observe;
mod policy;
mod queue;
pub mod routing;
pub mod value;

pub use broker::{
    Broker, BrokerConfig, ExchangeDeclare, Published, QueueDeclare, QueueDeclareOk, QueueInfo,
};
pub use channel::{Channel, ChannelEvent, ConsumeOptions, Delivery, DeliveryTag, GetOk};
pub use queue::{ConnectionId, QueueType};

pub use error::{BrokerError, ReplyCode};
pub use message::{Message, Properties};
pub use name::{ExchangeName, NameError, QueueName, VhostName};
pub use routing::{Destination, ExchangeKind, RoutingTable};
pub use value::{FieldTable, FieldValue};

/// The storage journal's counters, from [`Broker::journal_stats`].
pub use tern_storage::JournalStats;
