//! The broker's typed errors and the AMQP reply code each maps onto.

use crate::name::NameError;

/// AMQP 0-9-1 reply codes, the vocabulary every front door maps errors onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyCode {
    /// 403: the caller may not do this.
    AccessRefused = 403,
    /// 404: the exchange or queue does not exist.
    NotFound = 404,
    /// 405: the queue is exclusive to another connection, or in use.
    ResourceLocked = 405,
    /// 406: the request contradicts the entity's state or properties.
    PreconditionFailed = 406,
    /// 530: the operation is not allowed (such as touching a reserved name).
    NotAllowed = 530,
    /// 540: the server does not implement this.
    NotImplemented = 540,
    /// 541: an internal error.
    InternalError = 541,
}

/// What went wrong in the broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A name is invalid.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// An argument has the wrong type, an unknown value, or contradicts another.
    #[error("invalid argument {argument}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        argument: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The vhost does not exist.
    #[error("no vhost '{0}'")]
    VhostNotFound(String),
    /// The exchange does not exist.
    #[error("no exchange '{exchange}' in vhost '{vhost}'")]
    ExchangeNotFound {
        /// The vhost.
        vhost: String,
        /// The exchange.
        exchange: String,
    },
    /// The queue does not exist.
    #[error("no queue '{queue}' in vhost '{vhost}'")]
    QueueNotFound {
        /// The vhost.
        vhost: String,
        /// The queue.
        queue: String,
    },
    /// A redeclaration differs from the existing entity.
    #[error(
        "inequivalent arg '{property}' for {entity}: received {received} but current is {current}"
    )]
    Inequivalent {
        /// The entity, such as "queue 'orders' in vhost '/'".
        entity: String,
        /// The differing property.
        property: String,
        /// What the existing entity has.
        current: String,
        /// What the redeclaration asked for.
        received: String,
    },
    /// The queue is exclusive to another connection.
    #[error("cannot obtain exclusive access to locked queue '{queue}' in vhost '{vhost}'")]
    ResourceLocked {
        /// The vhost.
        vhost: String,
        /// The queue.
        queue: String,
    },
    /// A precondition failed (if-unused, if-empty, unknown delivery tag...).
    #[error("{0}")]
    PreconditionFailed(String),
    /// The operation is refused on this entity (a reserved `amq.` name...).
    #[error("access refused: {0}")]
    AccessRefused(String),
    /// The operation is not allowed.
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The request is valid AMQP but this broker does not implement it yet.
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// Storage failed underneath.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl BrokerError {
    /// The AMQP reply code this error maps onto.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            BrokerError::InvalidName(_) | BrokerError::InvalidArgument { .. } => {
                ReplyCode::PreconditionFailed
            }
            BrokerError::Inequivalent { .. } | BrokerError::PreconditionFailed(_) => {
                ReplyCode::PreconditionFailed
            }
            BrokerError::VhostNotFound(_) => ReplyCode::NotAllowed,
            BrokerError::ExchangeNotFound { .. } | BrokerError::QueueNotFound { .. } => {
                ReplyCode::NotFound
            }
            BrokerError::ResourceLocked { .. } => ReplyCode::ResourceLocked,
            BrokerError::AccessRefused(_) => ReplyCode::AccessRefused,
            BrokerError::NotAllowed(_) => ReplyCode::NotAllowed,
            BrokerError::NotImplemented(_) => ReplyCode::NotImplemented,
            BrokerError::Storage(_) => ReplyCode::InternalError,
        }
    }
}

impl From<tern_storage::StorageError> for BrokerError {
    fn from(e: tern_storage::StorageError) -> Self {
        BrokerError::Storage(e.to_string())
    }
}
