//! Who is connected: the live connections, channels and consumers, for
//! operators (the management API's listings, closing a connection).
//!
//! Front doors register a connection once it is open and hold the
//! [`ConnectionHandle`] for as long as it lives; dropping the handle takes
//! the connection out. Channels and consumers register themselves (a
//! [`crate::Channel`] on open and on `consume`), so connections of the
//! embedded transport show their channels and consumers too. Nothing here
//! is on a message's path: the registry is touched when a connection,
//! channel or consumer comes or goes, and when a channel's unacked count
//! changes (one atomic store).
//!
//! The registry knows nothing of protocols: a front door names itself in
//! [`ConnectionMeta::protocol`] and answers a close request
//! ([`ConnectionHandle::close_requested`]) however its protocol closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::oneshot;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::name::{QueueName, VhostName};
use crate::queue::{ChannelId, ConnectionId, ConsumerId};
use crate::traffic::ConnectionTraffic;

/// What a front door says about a connection it registers.
#[derive(Debug, Clone)]
pub struct ConnectionMeta {
    /// The client's address.
    pub peer: SocketAddr,
    /// The server's address the client connected to.
    pub local: SocketAddr,
    /// The user the client authenticated as.
    pub user: String,
    /// The vhost the connection opened.
    pub vhost: String,
    /// The protocol, such as `AMQP 0-9-1`.
    pub protocol: String,
    /// The bytes its front door counts in and out (from before the
    /// handshake, so a connection's totals include it).
    pub traffic: ConnectionTraffic,
}

/// A connection as the registry reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The broker's identity of the connection.
    pub id: ConnectionId,
    /// Its name, `PEER -> LOCAL` as RabbitMQ names connections; unique
    /// among live connections, since a peer address is.
    pub name: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// The server's address.
    pub local: SocketAddr,
    /// The user it authenticated as.
    pub user: String,
    /// Its vhost.
    pub vhost: String,
    /// Its protocol.
    pub protocol: String,
    /// When it registered (after its handshake).
    pub connected_at: SystemTime,
    /// How many channels it has open.
    pub channels: usize,
    /// Bytes read from the client so far.
    pub received_bytes: u64,
    /// Bytes written to the client so far.
    pub sent_bytes: u64,
}

/// A channel as the registry reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The broker's identity of the channel.
    pub id: u64,
    /// The connection it belongs to.
    pub connection: ConnectionId,
    /// The connection's name, if the connection is registered (the
    /// management API's own short-lived channels belong to none).
    pub connection_name: Option<String>,
    /// The channel number its front door gave it, if any.
    pub number: Option<u16>,
    /// Its vhost.
    pub vhost: VhostName,
    /// How many consumers it has.
    pub consumers: usize,
    /// How many deliveries await its acknowledgement.
    pub unacked: u64,
}

/// How a consumer's deliveries are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// The client acknowledges each delivery.
    Manual,
    /// Deliveries count as acknowledged when sent (`no_ack`).
    Auto,
}

/// A consumer as the registry reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// Its tag, unique within its channel.
    pub tag: String,
    /// The queue it consumes from.
    pub queue: QueueName,
    /// The queue's vhost.
    pub vhost: VhostName,
    /// The channel it belongs to.
    pub channel: u64,
    /// The channel's connection.
    pub connection: ConnectionId,
    /// The connection's name, if it is registered.
    pub connection_name: Option<String>,
    /// Its prefetch window (0: none).
    pub prefetch: u32,
    /// How its deliveries are settled.
    pub ack_mode: AckMode,
    /// Whether it holds the queue exclusively.
    pub exclusive: bool,
    /// Its priority (`x-priority`).
    pub priority: i32,
}

#[derive(Debug)]
struct ConnectionEntry {
    name: String,
    meta: ConnectionMeta,
    connected_at: SystemTime,
    close: Option<oneshot::Sender<String>>,
}

#[derive(Debug)]
struct ChannelEntry {
    connection: ConnectionId,
    vhost: VhostName,
    number: Option<u16>,
    unacked: Arc<AtomicU64>,
}

#[derive(Debug)]
struct ConsumerEntry {
    channel: ChannelId,
    connection: ConnectionId,
    tag: String,
    queue: QueueName,
    vhost: VhostName,
    prefetch: u32,
    no_ack: bool,
    exclusive: bool,
    priority: i32,
}

#[derive(Debug, Default)]
struct Tables {
    connections: HashMap<ConnectionId, ConnectionEntry>,
    channels: HashMap<ChannelId, ChannelEntry>,
    consumers: HashMap<ConsumerId, ConsumerEntry>,
}

/// The broker's table of live connections, channels and consumers.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    tables: Mutex<Tables>,
}

/// A consumer to register, as [`crate::Channel::consume`] created it.
#[derive(Debug)]
pub(crate) struct ConsumerRegistration {
    pub(crate) id: ConsumerId,
    pub(crate) channel: ChannelId,
    pub(crate) connection: ConnectionId,
    pub(crate) tag: String,
    pub(crate) queue: QueueName,
    pub(crate) vhost: VhostName,
    pub(crate) prefetch: u32,
    pub(crate) no_ack: bool,
    pub(crate) exclusive: bool,
    pub(crate) priority: i32,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a channel; returns the counter its unacked count goes into.
    pub(crate) fn add_channel(
        &self,
        id: ChannelId,
        connection: ConnectionId,
        vhost: VhostName,
    ) -> Arc<AtomicU64> {
        let unacked = Arc::new(AtomicU64::new(0));
        self.lock().channels.insert(
            id,
            ChannelEntry {
                connection,
                vhost,
                number: None,
                unacked: Arc::clone(&unacked),
            },
        );
        unacked
    }

    pub(crate) fn set_channel_number(&self, id: ChannelId, number: u16) {
        if let Some(ch) = self.lock().channels.get_mut(&id) {
            ch.number = Some(number);
        }
    }

    /// Takes a channel out, with its consumers.
    pub(crate) fn remove_channel(&self, id: ChannelId) {
        let mut t = self.lock();
        t.channels.remove(&id);
        t.consumers.retain(|_, c| c.channel != id);
    }

    pub(crate) fn add_consumer(&self, c: ConsumerRegistration) {
        self.lock().consumers.insert(
            c.id,
            ConsumerEntry {
                channel: c.channel,
                connection: c.connection,
                tag: c.tag,
                queue: c.queue,
                vhost: c.vhost,
                prefetch: c.prefetch,
                no_ack: c.no_ack,
                exclusive: c.exclusive,
                priority: c.priority,
            },
        );
    }

    pub(crate) fn remove_consumer(&self, id: ConsumerId) {
        self.lock().consumers.remove(&id);
    }
}

/// A registered connection. Dropping it unregisters the connection.
#[derive(Debug)]
pub struct ConnectionHandle {
    broker: Broker,
    id: ConnectionId,
    close: Option<oneshot::Receiver<String>>,
}

impl ConnectionHandle {
    /// Waits until an operator asks for the connection to be closed
    /// ([`Broker::close_connection`]) and returns the reason they gave.
    /// Pending forever if nobody asks; cancel-safe, so it can sit in a
    /// `select!` loop.
    pub async fn close_requested(&mut self) -> String {
        if let Some(rx) = self.close.as_mut() {
            if let Ok(reason) = rx.await {
                self.close = None;
                return reason;
            }
            self.close = None;
        }
        std::future::pending().await
    }
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        self.broker.registry().lock().connections.remove(&self.id);
    }
}

/// Where connections, channels and consumers are registered and listed.
impl Broker {
    /// Registers an open connection under `id` (from
    /// [`Broker::new_connection_id`]); it is listed until the handle drops.
    pub fn register_connection(&self, id: ConnectionId, meta: ConnectionMeta) -> ConnectionHandle {
        let (tx, rx) = oneshot::channel();
        let name = format!("{} -> {}", meta.peer, meta.local);
        self.registry().lock().connections.insert(
            id,
            ConnectionEntry {
                name,
                meta,
                connected_at: SystemTime::now(),
                close: Some(tx),
            },
        );
        ConnectionHandle {
            broker: self.clone(),
            id,
            close: Some(rx),
        }
    }

    /// Every registered connection, by name.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let t = self.registry().lock();
        let mut all: Vec<ConnectionInfo> = t
            .connections
            .iter()
            .map(|(id, c)| ConnectionInfo {
                id: *id,
                name: c.name.clone(),
                peer: c.meta.peer,
                local: c.meta.local,
                user: c.meta.user.clone(),
                vhost: c.meta.vhost.clone(),
                protocol: c.meta.protocol.clone(),
                connected_at: c.connected_at,
                channels: t
                    .channels
                    .values()
                    .filter(|ch| ch.connection == *id)
                    .count(),
                received_bytes: c.meta.traffic.received(),
                sent_bytes: c.meta.traffic.sent(),
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Every open channel, by connection name and channel number.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let t = self.registry().lock();
        let mut all: Vec<ChannelInfo> = t
            .channels
            .iter()
            .map(|(id, ch)| ChannelInfo {
                id: id.0,
                connection: ch.connection,
                connection_name: t.connections.get(&ch.connection).map(|c| c.name.clone()),
                number: ch.number,
                vhost: ch.vhost.clone(),
                consumers: t.consumers.values().filter(|c| c.channel == *id).count(),
                unacked: ch.unacked.load(Ordering::Relaxed),
            })
            .collect();
        all.sort_by(|a, b| {
            (&a.connection_name, a.number, a.id).cmp(&(&b.connection_name, b.number, b.id))
        });
        all
    }

    /// Every consumer, or a vhost's (an unknown vhost is an error), by
    /// queue, then tag.
    pub fn consumers(&self, vhost: Option<&str>) -> Result<Vec<ConsumerInfo>, BrokerError> {
        let only = match vhost {
            Some(v) => Some(self.vhost(v)?.name.clone()),
            None => None,
        };
        let t = self.registry().lock();
        let mut all: Vec<ConsumerInfo> = t
            .consumers
            .values()
            .filter(|c| only.as_ref().is_none_or(|v| *v == c.vhost))
            .map(|c| ConsumerInfo {
                tag: c.tag.clone(),
                queue: c.queue.clone(),
                vhost: c.vhost.clone(),
                channel: c.channel.0,
                connection: c.connection,
                connection_name: t.connections.get(&c.connection).map(|x| x.name.clone()),
                prefetch: c.prefetch,
                ack_mode: if c.no_ack {
                    AckMode::Auto
                } else {
                    AckMode::Manual
                },
                exclusive: c.exclusive,
                priority: c.priority,
            })
            .collect();
        all.sort_by(|a, b| {
            (&a.vhost, &a.queue, &a.tag, a.channel).cmp(&(&b.vhost, &b.queue, &b.tag, b.channel))
        });
        Ok(all)
    }

    /// Asks the connection named `name` to close, giving `reason`. Returns
    /// whether such a connection is registered; the front door closes it in
    /// its own time (a second request while it closes changes nothing).
    pub fn close_connection(&self, name: &str, reason: &str) -> bool {
        let mut t = self.registry().lock();
        let Some(entry) = t.connections.values_mut().find(|c| c.name == name) else {
            return false;
        };
        if let Some(tx) = entry.close.take() {
            // A front door that stopped listening is going away anyway.
            let _ = tx.send(reason.to_string());
        }
        true
    }
}
