//! Non-destructive reading of a queue, for operators: the messages a
//! consumer would receive next, without delivering them (the management
//! API's peek and the dead-letter browser). A peeked message stays ready,
//! is not marked redelivered and does not count as a delivery.

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::message::Message;
use crate::name::VhostName;
use crate::queue::ConnectionId;

/// A message as a peek sees it.
#[derive(Debug, Clone)]
pub struct PeekedMessage {
    /// Its position in the queue's log; unique within the queue.
    pub offset: u64,
    /// Whether it was delivered before (and returned to the queue).
    pub redelivered: bool,
    /// How many times it was delivered before.
    pub delivery_count: u32,
    /// The message, with its headers (`x-death` and all).
    pub message: Message,
}

impl Broker {
    /// Up to `count` of the ready messages of `queue`, in the order a
    /// consumer would receive them, left in the queue. Another
    /// connection's exclusive queue is locked to `connection`.
    pub fn peek(
        &self,
        vhost: &str,
        queue: &str,
        count: usize,
        connection: ConnectionId,
    ) -> Result<Vec<PeekedMessage>, BrokerError> {
        let vhost = VhostName::new(vhost)?;
        let queue = self.find_queue(&vhost, queue, Some(connection))?;
        Ok(queue
            .peek(count)?
            .into_iter()
            .map(|p| PeekedMessage {
                offset: p.offset.0,
                redelivered: p.delivery_count > 0,
                delivery_count: p.delivery_count,
                message: p.message,
            })
            .collect())
    }
}
