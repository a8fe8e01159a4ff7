//! Direct reply-to, as RabbitMQ offers it: request/reply without declaring
//! a reply queue. A channel that consumes, in no-ack mode, from the pseudo
//! queue `amq.rabbitmq.reply-to` gets a reply address of its own,
//! `amq.rabbitmq.reply-to.<opaque key>`; its publishes with that pseudo
//! queue as `reply_to` carry the address instead; and a publish to the
//! default exchange with the address as routing key goes straight to that
//! channel's consumer, through no queue and no storage.
//!
//! The [`ReplyRegistry`] is shared by every connection of one server and
//! maps each live address to its channel. The broker never sees these
//! messages: direct reply-to works between AMQP clients of one Tern server.
//! An address lives as long as its [`ReplyAddress`] (the consumer, or its
//! channel); a reply to an address that is gone is unroutable.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use tokio::sync::mpsc;

/// The pseudo queue a reply consumer consumes from, and the `reply_to` a
/// request names to ask for its channel's address.
pub(crate) const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";

/// What every reply address starts with.
const ADDRESS_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// A reply on its way to the channel that asked for it.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The routing key it was published with: the reply address.
    pub(crate) routing_key: String,
    /// Its properties, as published.
    pub(crate) properties: BasicProperties,
    /// Its body.
    pub(crate) body: Bytes,
}

type Senders = HashMap<String, mpsc::UnboundedSender<Reply>>;

/// The live reply addresses of one server. Clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplyRegistry {
    addresses: Arc<Mutex<Senders>>,
}

/// A channel's reply address; dropping it removes the address.
#[derive(Debug)]
pub(crate) struct ReplyAddress {
    registry: ReplyRegistry,
    address: String,
}

impl ReplyAddress {
    /// The full address: `amq.rabbitmq.reply-to.<key>`.
    pub(crate) fn as_str(&self) -> &str {
        &self.address
    }
}

impl Drop for ReplyAddress {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.address);
    }
}

/// Whether a routing key on the default exchange names a reply address.
pub(crate) fn is_address(routing_key: &str) -> bool {
    routing_key.starts_with(ADDRESS_PREFIX)
}

impl ReplyRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Senders> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.addresses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates a new, unguessable address and the receiver of its replies.
    pub(crate) fn register(&self) -> (ReplyAddress, mpsc::UnboundedReceiver<Reply>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut addresses = self.lock();
        let address = loop {
            let candidate = format!("{ADDRESS_PREFIX}{:016x}{:016x}", secret(), secret());
            if !addresses.contains_key(&candidate) {
                break candidate;
            }
        };
        addresses.insert(address.clone(), tx);
        let address = ReplyAddress {
            registry: self.clone(),
            address,
        };
        (address, rx)
    }

    /// Hands a reply to the channel whose address is its routing key.
    /// Returns whether that channel is still there (false: unroutable).
    pub(crate) fn deliver(&self, reply: Reply) -> bool {
        let addresses = self.lock();
        match addresses.get(&reply.routing_key) {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Whether an address is live.
    pub(crate) fn contains(&self, address: &str) -> bool {
        self.lock().contains_key(address)
    }
}

/// A consumer tag for a reply consumer that did not name one.
pub(crate) fn consumer_tag() -> String {
    format!("amq.ctag-reply-{:016x}", secret())
}

/// 64 unpredictable bits: SipHash, keyed at random per process thread, of
/// a counter. Not a cryptographic generator, but no client can predict
/// another's address from its own.
fn secret() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(to: &str) -> Reply {
        Reply {
            routing_key: to.to_string(),
            properties: BasicProperties::default(),
            body: Bytes::from_static(b"r"),
        }
    }

    #[test]
    fn an_address_receives_its_replies_until_it_is_dropped() {
        let registry = ReplyRegistry::default();
        let (a, mut rx_a) = registry.register();
        let (b, _rx_b) = registry.register();
        assert_ne!(a.as_str(), b.as_str());
        assert!(is_address(a.as_str()));
        assert!(registry.deliver(reply(a.as_str())));
        assert_eq!(
            rx_a.try_recv().map(|r| r.routing_key).ok().as_deref(),
            Some(a.as_str())
        );
        assert!(!registry.deliver(reply("amq.rabbitmq.reply-to.nope")));
        let gone = a.as_str().to_string();
        drop(a);
        assert!(!registry.contains(&gone));
        assert!(!registry.deliver(reply(&gone)));
        assert!(registry.contains(b.as_str()));
    }
}
