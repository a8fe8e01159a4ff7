//! Tern's broker engine: the messaging model that the AMQP front door, the
//! HTTP API, the CLI and the toolkit's embedded transport all drive.
//!
//! It knows nothing of AMQP frames or HTTP. A [`Broker`] holds vhosts with
//! their exchanges, queues and bindings, and the users and permissions that
//! guard them, all durable on `tern-storage`; a
//! [`Channel`] consumes, fetches and acknowledges as an AMQP channel does.
//! This crate is being built up in slices; `ARCHITECTURE.md` says what exists.

mod access;
pub mod alarm;
mod broker;
mod browse;
mod channel;
pub mod codec;
mod dead_letter;
mod dedup;
mod definitions;
mod delay;
pub mod error;
mod exchange;
mod inspect;
pub mod message;
pub mod name;
mod observe;
mod permissions;
mod policy;
mod queue;
mod registry;
pub mod routing;
pub mod stream;
pub mod super_stream;
mod trace;
mod traffic;
mod users;
pub mod value;

pub use access::{AccessConfig, AccessError, AuthError, AuthUser, Change, DEFAULT_USER};
pub use broker::{
    Broker, BrokerConfig, ExchangeDeclare, Published, QueueDeclare, QueueDeclareOk, QueueInfo,
};
pub use browse::PeekedMessage;
pub use channel::{Channel, ChannelEvent, ConsumeOptions, Delivery, DeliveryTag, GetOk};
pub use exchange::is_exchange_type;
pub use inspect::{BindingInfo, ExchangeInfo};
pub use permissions::{
    Access, PermissionInfo, PermissionPattern, Permissions, Resource, ResourceKind,
};
pub use queue::{ConnectionId, QueueType};
pub use registry::{
    AckMode, ChannelInfo, ConnectionHandle, ConnectionInfo, ConnectionMeta, ConsumerInfo,
};
pub use stream::{ConsumerName, OffsetSpec, StreamConsumerOffset, StreamOffsets};
pub use super_stream::{GroupAssignment, PartitionInfo, SuperStreamInfo};
pub use trace::{TraceEvent, TraceEventKind, TraceSettings, TracedMessage};
pub use traffic::ConnectionTraffic;
pub use users::{UserInfo, UserTag};

pub use error::{BrokerError, ReplyCode};
pub use message::{Message, Properties};
pub use name::{ExchangeName, NameError, QueueName, UserName, VhostName};
pub use routing::{Destination, ExchangeKind, RoutingTable};
pub use value::{FieldTable, FieldValue};

/// The storage journal's counters, from [`Broker::journal_stats`].
pub use tern_storage::JournalStats;
/// The storage's fsync latency histogram, from [`Broker::fsync_histogram`],
/// and its bucket bounds in seconds.
pub use tern_storage::{FsyncHistogram, FSYNC_BUCKETS};
