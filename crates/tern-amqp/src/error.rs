//! The front door's errors: [`AmqpError`] for what ends a connection's
//! machinery (I/O, encoding), and [`ProtocolError`], an AMQP reply code with
//! its text and the method that caused it, which closes a channel or the
//! connection with `channel.close` / `connection.close`.

use std::io;

use tern_broker::BrokerError;

/// What can go wrong in the AMQP server itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A frame could not be serialised.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The connection's writer is gone: the peer disconnected.
    #[error("connection closed")]
    Closed,
}

/// AMQP 0-9-1 reply codes used by the server.
pub(crate) mod code {
    pub(crate) const NO_ROUTE: u16 = 312;
    pub(crate) const CONNECTION_FORCED: u16 = 320;
    pub(crate) const ACCESS_REFUSED: u16 = 403;
    pub(crate) const NOT_FOUND: u16 = 404;
    pub(crate) const PRECONDITION_FAILED: u16 = 406;
    pub(crate) const FRAME_ERROR: u16 = 501;
    pub(crate) const SYNTAX_ERROR: u16 = 502;
    pub(crate) const COMMAND_INVALID: u16 = 503;
    pub(crate) const CHANNEL_ERROR: u16 = 504;
    pub(crate) const UNEXPECTED_FRAME: u16 = 505;
    pub(crate) const NOT_ALLOWED: u16 = 530;
    pub(crate) const NOT_IMPLEMENTED: u16 = 540;
    pub(crate) const INTERNAL_ERROR: u16 = 541;

    /// The reply code's name, as RabbitMQ prefixes reply texts with it.
    pub(crate) fn name(code: u16) -> &'static str {
        match code {
            200 => "OK",
            311 => "CONTENT_TOO_LARGE",
            312 => "NO_ROUTE",
            313 => "NO_CONSUMERS",
            320 => "CONNECTION_FORCED",
            402 => "INVALID_PATH",
            403 => "ACCESS_REFUSED",
            404 => "NOT_FOUND",
            405 => "RESOURCE_LOCKED",
            406 => "PRECONDITION_FAILED",
            501 => "FRAME_ERROR",
            502 => "SYNTAX_ERROR",
            503 => "COMMAND_INVALID",
            504 => "CHANNEL_ERROR",
            505 => "UNEXPECTED_FRAME",
            506 => "RESOURCE_ERROR",
            530 => "NOT_ALLOWED",
            540 => "NOT_IMPLEMENTED",
            _ => "INTERNAL_ERROR",
        }
    }
}

/// An AMQP error to report to the client with a `close` method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError {
    /// The reply code.
    pub(crate) code: u16,
    /// The reply text, such as "NOT_FOUND - no queue 'q' in vhost '/'".
    pub(crate) text: String,
    /// The class of the method that failed (0 if none).
    pub(crate) class_id: u16,
    /// The method that failed (0 if none).
    pub(crate) method_id: u16,
}

impl ProtocolError {
    /// An error not tied to a method.
    pub(crate) fn new(code: u16, text: impl std::fmt::Display) -> ProtocolError {
        ProtocolError {
            code,
            text: format!("{} - {text}", code::name(code)),
            class_id: 0,
            method_id: 0,
        }
    }

    /// An error caused by a method.
    pub(crate) fn for_method(
        code: u16,
        text: impl std::fmt::Display,
        (class_id, method_id): (u16, u16),
    ) -> ProtocolError {
        ProtocolError {
            class_id,
            method_id,
            ..ProtocolError::new(code, text)
        }
    }

    /// Whether the code is a connection-level ("hard") error: it closes the
    /// whole connection with `connection.close`, even when a channel method
    /// raised it, as RabbitMQ does. The others close only their channel.
    pub(crate) fn is_connection_error(&self) -> bool {
        !matches!(self.code, 200 | 311..=313 | 403..=406)
    }

    /// A broker error raised by a method, with the broker's reply code.
    pub(crate) fn from_broker(e: &BrokerError, method: (u16, u16)) -> ProtocolError {
        ProtocolError::for_method(e.reply_code() as u16, e, method)
    }
}
