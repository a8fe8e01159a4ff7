//! Validated names of vhosts, exchanges, queues and users.
//!
//! AMQP short strings carry at most 255 bytes of UTF-8; every name entering
//! the broker is checked once here, so the rest of the engine can trust it.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Longer than 255 bytes.
    #[error("{kind} name is {len} bytes long; the limit is 255")]
    TooLong {
        /// Which kind of name.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// Empty where a name is required.
    #[error("{kind} name must not be empty")]
    Empty {
        /// Which kind of name.
        kind: &'static str,
    },
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, allow_empty = $allow_empty:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// Validates and wraps a name.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                if name.len() > 255 {
                    return Err(NameError::TooLong { kind: $kind, len: name.len() });
                }
                if !$allow_empty && name.is_empty() {
                    return Err(NameError::Empty { kind: $kind });
                }
                Ok($ty(name))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A virtual host's name, such as `/`.
    VhostName, "vhost", allow_empty = false
);
name_type!(
    /// An exchange's name. The empty name is the default exchange.
    ExchangeName, "exchange", allow_empty = true
);
name_type!(
    /// A user's name, such as `guest`.
    UserName, "user", allow_empty = false
);
name_type!(
    /// A queue's name. The empty name asks the server to choose one.
    QueueName, "queue", allow_empty = true
);

impl ExchangeName {
    /// The default exchange, which routes to the queue named by the routing key.
    pub fn default_exchange() -> ExchangeName {
        ExchangeName(String::new())
    }

    /// Whether this is the default exchange.
    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_255_bytes_are_refused() {
        assert!(QueueName::new("q".repeat(255)).is_ok());
        assert_eq!(
            QueueName::new("é".repeat(128)),
            Err(NameError::TooLong {
                kind: "queue",
                len: 256
            })
        );
        assert_eq!(VhostName::new(""), Err(NameError::Empty { kind: "vhost" }));
        assert!(ExchangeName::new("").is_ok_and(|e| e.is_default()));
    }
}
