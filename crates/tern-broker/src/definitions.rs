//! Durable definitions: vhosts, exchanges, queues, bindings, users and
//! permissions survive a restart because every change to a durable one is
//! appended to a `tern-storage` log (`definitions`, fsynced before the change
//! is acknowledged) and replayed in order on start.
//!
//! Record layout: one event per record body, `u8` event kind, then its
//! fields: strings as `u16` length + UTF-8, flags as `u8`, argument tables as
//! `u32` length + [`codec::encode_table`] bytes.

use bytes::{BufMut, BytesMut};

use crate::codec;
use crate::exchange::ExchangeFlavor;
use crate::routing::{Destination, ExchangeKind};
use crate::value::FieldTable;

/// One change to the durable definitions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DefEvent {
    VhostAdded {
        vhost: String,
    },
    VhostDeleted {
        vhost: String,
    },
    ExchangeDeclared {
        vhost: String,
        name: String,
        kind: ExchangeKind,
        /// A delayed or deduplicating exchange, routing as `kind`. Recorded
        /// as its type name (`x-delayed-message`, `x-message-deduplication`);
        /// `kind` and the flavor's settings then come from the arguments.
        flavor: ExchangeFlavor,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    },
    ExchangeDeleted {
        vhost: String,
        name: String,
    },
    QueueDeclared {
        vhost: String,
        name: String,
        id: u64,
        auto_delete: bool,
        arguments: FieldTable,
    },
    QueueDeleted {
        vhost: String,
        name: String,
    },
    Bound {
        vhost: String,
        source: String,
        destination: Destination,
        routing_key: String,
        arguments: FieldTable,
    },
    Unbound {
        vhost: String,
        source: String,
        destination: Destination,
        routing_key: String,
        arguments: FieldTable,
    },
    /// Everything before this is replaced by the events that follow it in
    /// the same batch: the definitions log's compaction.
    Snapshot,
    /// The first start's default user was created: never again, even if
    /// every user is deleted.
    AccessInitialised,
    /// A user was created or replaced.
    UserPut {
        name: String,
        /// An argon2 PHC string; `None` for a user without a password.
        password_hash: Option<String>,
        /// Comma-separated tags, as RabbitMQ writes them.
        tags: String,
    },
    UserDeleted {
        name: String,
    },
    PermissionSet {
        vhost: String,
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    PermissionCleared {
        vhost: String,
        user: String,
    },
}

const VHOST_ADDED: u8 = 1;
const VHOST_DELETED: u8 = 2;
const EXCHANGE_DECLARED: u8 = 3;
const EXCHANGE_DELETED: u8 = 4;
const QUEUE_DECLARED: u8 = 5;
const QUEUE_DELETED: u8 = 6;
const BOUND: u8 = 7;
const UNBOUND: u8 = 8;
const SNAPSHOT: u8 = 9;
const ACCESS_INITIALISED: u8 = 10;
const USER_PUT: u8 = 11;
const USER_DELETED: u8 = 12;
const PERMISSION_SET: u8 = 13;
const PERMISSION_CLEARED: u8 = 14;

fn put_str(out: &mut BytesMut, s: &str) {
    // Names are validated to at most 255 bytes and routing keys to 65535.
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_table(out: &mut BytesMut, t: &FieldTable) {
    let mut inner = BytesMut::new();
    codec::encode_table(t, &mut inner);
    out.put_u32_le(inner.len() as u32);
    out.put_slice(&inner);
}

fn put_dest(out: &mut BytesMut, d: &Destination) {
    match d {
        Destination::Queue(q) => {
            out.put_u8(0);
            put_str(out, q.as_str());
        }
        Destination::Exchange(e) => {
            out.put_u8(1);
            put_str(out, e.as_str());
        }
    }
}

impl DefEvent {
    pub(crate) fn encode(&self) -> BytesMut {
        let mut out = BytesMut::new();
        match self {
            DefEvent::Snapshot => out.put_u8(SNAPSHOT),
            DefEvent::AccessInitialised => out.put_u8(ACCESS_INITIALISED),
            DefEvent::UserPut {
                name,
                password_hash,
                tags,
            } => {
                out.put_u8(USER_PUT);
                put_str(&mut out, name);
                match password_hash {
                    Some(h) => {
                        out.put_u8(1);
                        put_str(&mut out, h);
                    }
                    None => out.put_u8(0),
                }
                put_str(&mut out, tags);
            }
            DefEvent::UserDeleted { name } => {
                out.put_u8(USER_DELETED);
                put_str(&mut out, name);
            }
            DefEvent::PermissionSet {
                vhost,
                user,
                configure,
                write,
                read,
            } => {
                out.put_u8(PERMISSION_SET);
                for s in [vhost, user, configure, write, read] {
                    put_str(&mut out, s);
                }
            }
            DefEvent::PermissionCleared { vhost, user } => {
                out.put_u8(PERMISSION_CLEARED);
                put_str(&mut out, vhost);
                put_str(&mut out, user);
            }
            DefEvent::VhostAdded { vhost } => {
                out.put_u8(VHOST_ADDED);
                put_str(&mut out, vhost);
            }
            DefEvent::VhostDeleted { vhost } => {
                out.put_u8(VHOST_DELETED);
                put_str(&mut out, vhost);
            }
            DefEvent::ExchangeDeclared {
                vhost,
                name,
                kind,
                flavor,
                auto_delete,
                internal,
                arguments,
            } => {
                out.put_u8(EXCHANGE_DECLARED);
                put_str(&mut out, vhost);
                put_str(&mut out, name);
                put_str(&mut out, flavor.type_name(*kind));
                out.put_u8(u8::from(*auto_delete));
                out.put_u8(u8::from(*internal));
                put_table(&mut out, arguments);
            }
            DefEvent::ExchangeDeleted { vhost, name } => {
                out.put_u8(EXCHANGE_DELETED);
                put_str(&mut out, vhost);
                put_str(&mut out, name);
            }
            DefEvent::QueueDeclared {
                vhost,
                name,
                id,
                auto_delete,
                arguments,
            } => {
                out.put_u8(QUEUE_DECLARED);
                put_str(&mut out, vhost);
                put_str(&mut out, name);
                out.put_u64_le(*id);
                out.put_u8(u8::from(*auto_delete));
                put_table(&mut out, arguments);
            }
            DefEvent::QueueDeleted { vhost, name } => {
                out.put_u8(QUEUE_DELETED);
                put_str(&mut out, vhost);
                put_str(&mut out, name);
            }
            DefEvent::Bound {
                vhost,
                source,
                destination,
                routing_key,
                arguments,
            }
            | DefEvent::Unbound {
                vhost,
                source,
                destination,
                routing_key,
                arguments,
            } => {
                out.put_u8(if matches!(self, DefEvent::Bound { .. }) {
                    BOUND
                } else {
                    UNBOUND
                });
                put_str(&mut out, vhost);
                put_str(&mut out, source);
                put_dest(&mut out, destination);
                put_str(&mut out, routing_key);
                put_table(&mut out, arguments);
            }
        }
        out
    }

    pub(crate) fn decode(b: &[u8]) -> Result<DefEvent, String> {
        let mut r = Reader { b, pos: 0 };
        let kind = r.u8()?;
        let ev = match kind {
            VHOST_ADDED => DefEvent::VhostAdded { vhost: r.str()? },
            VHOST_DELETED => DefEvent::VhostDeleted { vhost: r.str()? },
            EXCHANGE_DECLARED => {
                let (vhost, name, kind) = (r.str()?, r.str()?, r.str()?);
                let (auto_delete, internal, arguments) = (r.u8()? != 0, r.u8()? != 0, r.table()?);
                let (kind, flavor) =
                    crate::exchange::exchange_type(&kind, &arguments).map_err(|e| e.to_string())?;
                DefEvent::ExchangeDeclared {
                    vhost,
                    name,
                    kind,
                    flavor,
                    auto_delete,
                    internal,
                    arguments,
                }
            }
            EXCHANGE_DELETED => DefEvent::ExchangeDeleted {
                vhost: r.str()?,
                name: r.str()?,
            },
            QUEUE_DECLARED => DefEvent::QueueDeclared {
                vhost: r.str()?,
                name: r.str()?,
                id: r.u64()?,
                auto_delete: r.u8()? != 0,
                arguments: r.table()?,
            },
            QUEUE_DELETED => DefEvent::QueueDeleted {
                vhost: r.str()?,
                name: r.str()?,
            },
            BOUND | UNBOUND => {
                let vhost = r.str()?;
                let source = r.str()?;
                let destination = r.dest()?;
                let routing_key = r.str()?;
                let arguments = r.table()?;
                if kind == BOUND {
                    DefEvent::Bound {
                        vhost,
                        source,
                        destination,
                        routing_key,
                        arguments,
                    }
                } else {
                    DefEvent::Unbound {
                        vhost,
                        source,
                        destination,
                        routing_key,
                        arguments,
                    }
                }
            }
            SNAPSHOT => DefEvent::Snapshot,
            ACCESS_INITIALISED => DefEvent::AccessInitialised,
            USER_PUT => DefEvent::UserPut {
                name: r.str()?,
                password_hash: match r.u8()? {
                    0 => None,
                    _ => Some(r.str()?),
                },
                tags: r.str()?,
            },
            USER_DELETED => DefEvent::UserDeleted { name: r.str()? },
            PERMISSION_SET => DefEvent::PermissionSet {
                vhost: r.str()?,
                user: r.str()?,
                configure: r.str()?,
                write: r.str()?,
                read: r.str()?,
            },
            PERMISSION_CLEARED => DefEvent::PermissionCleared {
                vhost: r.str()?,
                user: r.str()?,
            },
            other => return Err(format!("unknown definition event kind {other}")),
        };
        if r.pos != b.len() {
            return Err(format!(
                "{} trailing bytes after definition event",
                b.len() - r.pos
            ));
        }
        Ok(ev)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let s = self
            .b
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| format!("definition event ends early at byte {}", self.pos))?;
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }

    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<String, String> {
        let n = self.u16()? as usize;
        let pos = self.pos;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| format!("string at byte {pos} is not UTF-8"))
    }

    fn table(&mut self) -> Result<FieldTable, String> {
        let n = self.u32()? as usize;
        codec::decode_table(self.take(n)?).map_err(|e| e.to_string())
    }

    fn dest(&mut self) -> Result<Destination, String> {
        let kind = self.u8()?;
        let name = self.str()?;
        match kind {
            0 => Ok(Destination::Queue(
                crate::QueueName::new(name).map_err(|e| e.to_string())?,
            )),
            1 => Ok(Destination::Exchange(
                crate::ExchangeName::new(name).map_err(|e| e.to_string())?,
            )),
            other => Err(format!("unknown destination kind {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::FieldValue;
    use crate::QueueName;

    #[test]
    fn every_event_round_trips() {
        let mut args = FieldTable::new();
        args.insert("x-match".into(), FieldValue::String("any".into()));
        let events = [
            DefEvent::Snapshot,
            DefEvent::VhostAdded { vhost: "/".into() },
            DefEvent::VhostDeleted { vhost: "v".into() },
            DefEvent::ExchangeDeclared {
                vhost: "/".into(),
                name: "orders".into(),
                kind: ExchangeKind::Topic,
                flavor: ExchangeFlavor::Plain,
                auto_delete: true,
                internal: false,
                arguments: args.clone(),
            },
            DefEvent::ExchangeDeclared {
                vhost: "/".into(),
                name: "once".into(),
                kind: ExchangeKind::Fanout,
                flavor: ExchangeFlavor::Deduplicating(crate::dedup::DedupPolicy::new(
                    Some(60_000),
                    Some(10),
                )),
                auto_delete: false,
                internal: false,
                arguments: {
                    let mut a = FieldTable::new();
                    a.insert("x-cache-ttl".into(), FieldValue::I64(60_000));
                    a.insert("x-cache-size".into(), FieldValue::I64(10));
                    a
                },
            },
            DefEvent::ExchangeDeleted {
                vhost: "/".into(),
                name: "x".into(),
            },
            DefEvent::QueueDeclared {
                vhost: "/".into(),
                name: "q".into(),
                id: 42,
                auto_delete: false,
                arguments: args.clone(),
            },
            DefEvent::QueueDeleted {
                vhost: "/".into(),
                name: "q".into(),
            },
            DefEvent::Bound {
                vhost: "/".into(),
                source: "orders".into(),
                destination: Destination::Queue(QueueName::new("q").unwrap()),
                routing_key: "a.#".into(),
                arguments: args.clone(),
            },
            DefEvent::Unbound {
                vhost: "/".into(),
                source: "orders".into(),
                destination: Destination::Exchange(crate::ExchangeName::new("e2").unwrap()),
                routing_key: "".into(),
                arguments: FieldTable::new(),
            },
            DefEvent::AccessInitialised,
            DefEvent::UserPut {
                name: "bob".into(),
                password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
                tags: "administrator,monitoring".into(),
            },
            DefEvent::UserPut {
                name: "nopass".into(),
                password_hash: None,
                tags: "".into(),
            },
            DefEvent::UserDeleted { name: "bob".into() },
            DefEvent::PermissionSet {
                vhost: "/".into(),
                user: "bob".into(),
                configure: "^$".into(),
                write: ".*".into(),
                read: "".into(),
            },
            DefEvent::PermissionCleared {
                vhost: "/".into(),
                user: "bob".into(),
            },
        ];
        for ev in events {
            let bytes = ev.encode();
            assert_eq!(DefEvent::decode(&bytes).unwrap(), ev);
            for cut in 0..bytes.len() {
                assert!(
                    DefEvent::decode(&bytes[..cut]).is_err(),
                    "truncated at {cut} must fail"
                );
            }
        }
    }
}
