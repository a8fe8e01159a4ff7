//! What can go wrong, by layer: the transport, the bus, and a handler.

use std::fmt;
use std::time::Duration;

/// A transport could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A command or query was sent but no service handles its type.
    #[error(
        "no service handles `{0}`: start a service that registers a handler for it before sending"
    )]
    NoHandler(String),
    /// The broker refused an operation.
    #[error("{transport}: {operation} failed: {reason}")]
    Broker {
        /// Which transport.
        transport: &'static str,
        /// What was being done, naming the entity (`declare queue 'orders'`).
        operation: String,
        /// The broker's reason.
        reason: String,
    },
    /// The connection to the broker failed or is gone.
    #[error("{transport}: connection to {target} failed: {reason}")]
    Connection {
        /// Which transport.
        transport: &'static str,
        /// Where it tried to connect.
        target: String,
        /// Why it failed.
        reason: String,
    },
    /// A transport URL names no transport Tern has.
    #[error("unsupported transport URL `{0}`: use `embedded:DIR`, `amqp://HOST:PORT` or `nats://HOST:PORT`")]
    UnsupportedUrl(String),
    /// The transport cannot carry what was asked (a feature it lacks).
    #[error("the {transport} transport cannot {what}")]
    Unsupported {
        /// Which transport.
        transport: &'static str,
        /// What it cannot do.
        what: String,
    },
    /// The transport was closed.
    #[error("the {0} transport is closed")]
    Closed(&'static str),
}

/// A bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A message could not be encoded or decoded.
    #[error("cannot {direction} message of type `{ty}`: {reason}")]
    Codec {
        /// `encode` or `decode`.
        direction: &'static str,
        /// The message type.
        ty: String,
        /// The codec's complaint.
        reason: String,
    },
    /// A query's answer did not come in time.
    #[error("query `{ty}` got no answer within {after:?}")]
    Timeout {
        /// The query type.
        ty: String,
        /// How long it waited.
        after: Duration,
    },
    /// The answering service failed to handle the query.
    #[error("query `{ty}` failed in the answering service: {reason}")]
    QueryFailed {
        /// The query type.
        ty: String,
        /// The handler's error.
        reason: String,
    },
    /// A schedule is not valid.
    #[error("invalid schedule: {reason}")]
    InvalidSchedule {
        /// What is wrong, naming the schedule or the expression.
        reason: String,
    },
    /// A service definition is not valid.
    #[error("service `{service}`: {reason}")]
    InvalidService {
        /// The service's name.
        service: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a handler returns when it could not handle a message.
///
/// By default a failure is *transient*: the retry middleware tries again
/// after a backoff. A *permanent* failure (bad data that no retry will fix)
/// goes straight to the dead-letter queue.
pub struct HandlerError {
    error: Box<dyn std::error::Error + Send + Sync>,
    permanent: bool,
    pub(crate) retry_after: Option<Duration>,
    deferred: bool,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HandlerError {
        HandlerError {
            error: error.into(),
            permanent: false,
            retry_after: None,
            deferred: false,
        }
    }

    /// The handler was not run (an open circuit, say): try again after
    /// `delay` without counting an attempt.
    pub fn deferred(
        reason: impl Into<Box<dyn std::error::Error + Send + Sync>>,
        delay: Duration,
    ) -> HandlerError {
        HandlerError {
            deferred: true,
            retry_after: Some(delay),
            ..HandlerError::transient(reason)
        }
    }

    /// Whether the handler was not run at all, so no attempt was spent.
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// A failure no retry will fix: dead-letter the message now.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HandlerError {
        HandlerError {
            permanent: true,
            ..HandlerError::transient(error)
        }
    }

    /// Whether the message should be dead-lettered without another attempt.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The delay before the next attempt, once a retry policy chose one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Asks for another attempt after `delay` (what the retry middleware does).
    pub fn with_retry_after(mut self, delay: Duration) -> HandlerError {
        self.retry_after = Some(delay);
        self
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.error.as_ref()
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for HandlerError {
    fn from(error: E) -> HandlerError {
        HandlerError::transient(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("error", &self.error.to_string())
            .field("permanent", &self.permanent)
            .field("retry_after", &self.retry_after)
            .field("deferred", &self.deferred)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}
