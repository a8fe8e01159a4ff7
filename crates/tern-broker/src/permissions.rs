//! Permissions: per (vhost, user), three regular expressions saying which
//! exchanges and queues the user may configure, write to and read from,
//! matched as RabbitMQ matches them.

use std::fmt;

use regex::Regex;

use crate::access::AccessError;
use crate::name::{UserName, VhostName};

/// One permission's regular expression. RabbitMQ matches it anywhere in the
/// name (`re:run`), so `^amq\.` and `.*` mean what they say; the empty
/// pattern matches nothing.
#[derive(Clone)]
pub struct PermissionPattern {
    source: String,
    regex: Option<Regex>,
}

impl PermissionPattern {
    /// Compiles a pattern, naming the problem if it is not a valid regex.
    pub fn new(source: impl Into<String>) -> Result<PermissionPattern, AccessError> {
        let source = source.into();
        let regex = if source.is_empty() {
            None
        } else {
            Some(
                Regex::new(&source).map_err(|e| AccessError::InvalidPattern {
                    pattern: source.clone(),
                    reason: e.to_string(),
                })?,
            )
        };
        Ok(PermissionPattern { source, regex })
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern grants access to the resource named `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.regex.as_ref().is_some_and(|r| r.is_match(name))
    }
}

impl PartialEq for PermissionPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for PermissionPattern {}

impl fmt::Debug for PermissionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

/// A user's permissions in one vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Declare and delete.
    pub configure: PermissionPattern,
    /// Publish to an exchange; bind a queue (or exchange) as the destination.
    pub write: PermissionPattern,
    /// Consume, get and purge a queue; bind from an exchange as the source.
    pub read: PermissionPattern,
}

impl Permissions {
    /// Compiles the three patterns.
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Permissions, AccessError> {
        Ok(Permissions {
            configure: PermissionPattern::new(configure)?,
            write: PermissionPattern::new(write)?,
            read: PermissionPattern::new(read)?,
        })
    }

    /// `.*` for all three.
    pub fn full() -> Permissions {
        let all = PermissionPattern {
            source: ".*".into(),
            regex: Regex::new(".*").ok(),
        };
        Permissions {
            configure: all.clone(),
            write: all.clone(),
            read: all,
        }
    }

    /// The pattern for one kind of access.
    pub fn pattern(&self, access: Access) -> &PermissionPattern {
        match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        }
    }
}

/// The kinds of access RabbitMQ distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Declare or delete.
    Configure,
    /// Publish to, or bind to as destination.
    Write,
    /// Consume from, get, purge, or bind from as source.
    Read,
}

/// What kind of entity a permission is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// An exchange.
    Exchange,
    /// A queue.
    Queue,
}

/// An exchange or queue, named as permissions see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    kind: ResourceKind,
    name: String,
}

impl Resource {
    /// An exchange; the default exchange (`""`) is `amq.default`, as in RabbitMQ.
    pub fn exchange(name: &str) -> Resource {
        let name = if name.is_empty() { "amq.default" } else { name };
        Resource {
            kind: ResourceKind::Exchange,
            name: name.to_string(),
        }
    }

    /// A queue.
    pub fn queue(name: &str) -> Resource {
        Resource {
            kind: ResourceKind::Queue,
            name: name.to_string(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ResourceKind {
        self.kind
    }

    /// The name permissions are matched against.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ResourceKind::Exchange => "exchange",
            ResourceKind::Queue => "queue",
        };
        write!(f, "{kind} '{}'", self.name)
    }
}

/// One (vhost, user) entry, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionInfo {
    /// The vhost.
    pub vhost: VhostName,
    /// The user.
    pub user: UserName,
    /// The patterns.
    pub permissions: Permissions,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_rabbitmq_does() {
        let p = PermissionPattern::new("^orders\\.").unwrap();
        assert!(p.matches("orders.eu"));
        assert!(!p.matches("all.orders.eu"));
        // Unanchored: a pattern may match inside the name.
        let p = PermissionPattern::new("orders").unwrap();
        assert!(p.matches("all.orders.eu"));
        let p = PermissionPattern::new("^(a|b)$").unwrap();
        assert!(p.matches("a") && p.matches("b") && !p.matches("ab"));
        // Empty matches nothing, not even the empty name.
        let p = PermissionPattern::new("").unwrap();
        assert!(!p.matches("") && !p.matches("x"));
        let p = PermissionPattern::new(".*").unwrap();
        assert!(p.matches("") && p.matches("anything"));
        let err = PermissionPattern::new("(").unwrap_err();
        assert!(err.to_string().contains("'('"), "{err}");
    }

    #[test]
    fn the_default_exchange_is_amq_default() {
        assert_eq!(Resource::exchange("").name(), "amq.default");
        assert_eq!(Resource::exchange("").to_string(), "exchange 'amq.default'");
        assert_eq!(Resource::queue("q").to_string(), "queue 'q'");
    }
}
