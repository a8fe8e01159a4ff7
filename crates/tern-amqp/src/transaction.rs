//! A channel's transaction (`tx.select` mode), as RabbitMQ runs one:
//! publishes and settlements (ack, nack, reject) are buffered here and
//! applied at `tx.commit`, publishes first and then settlements, each in the
//! order received; `tx.rollback` drops them. A transaction is not atomic
//! across queues (neither is RabbitMQ's): it only defers.
//!
//! A settlement is checked when it arrives, against the broker channel's
//! unacked deliveries less those this transaction already settles, so an
//! unknown or twice-settled tag fails at once with 406, as in RabbitMQ; the
//! tags it covers are remembered then, so a `multiple` ack does not grow to
//! cover deliveries that arrive before the commit.

use std::collections::BTreeSet;

use amq_protocol::protocol::{basic, BasicProperties};
use bytes::Bytes;
use tern_broker::{BrokerError, DeliveryTag};

/// A `basic.publish` waiting for the commit.
#[derive(Debug)]
pub(crate) struct BufferedPublish {
    pub(crate) method: basic::Publish,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
}

/// What a buffered settlement does to its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// `basic.ack`.
    Ack,
    /// `basic.nack` / `basic.reject`, back to the queue or not.
    Reject { requeue: bool },
}

/// A settlement waiting for the commit, with the deliveries it covers.
#[derive(Debug)]
pub(crate) struct Settlement {
    pub(crate) how: Settle,
    pub(crate) tags: Vec<DeliveryTag>,
}

/// The buffered work of the channel's current transaction.
#[derive(Debug, Default)]
pub(crate) struct Transaction {
    publishes: Vec<BufferedPublish>,
    settlements: Vec<Settlement>,
    /// Every tag a buffered settlement covers.
    settled: BTreeSet<DeliveryTag>,
}

impl Transaction {
    /// Buffers a publish.
    pub(crate) fn publish(&mut self, publish: BufferedPublish) {
        self.publishes.push(publish);
    }

    /// Buffers a settlement of `tag` (with `multiple`, of every earlier
    /// one too). `unacked` is what the broker channel would settle
    /// (`Channel::unacked_tags`); tags this transaction already settles are
    /// left out, and naming one of them is an unknown tag (406).
    pub(crate) fn settle(
        &mut self,
        tag: DeliveryTag,
        multiple: bool,
        unacked: Vec<DeliveryTag>,
        how: Settle,
    ) -> Result<(), BrokerError> {
        if (tag.0 != 0 || !multiple) && self.settled.contains(&tag) {
            return Err(BrokerError::PreconditionFailed(format!(
                "unknown delivery tag {}",
                tag.0
            )));
        }
        let tags: Vec<DeliveryTag> = unacked
            .into_iter()
            .filter(|t| !self.settled.contains(t))
            .collect();
        self.settled.extend(tags.iter().copied());
        self.settlements.push(Settlement { how, tags });
        Ok(())
    }

    /// Whether a buffered settlement covers `tag`.
    pub(crate) fn settles(&self, tag: DeliveryTag) -> bool {
        self.settled.contains(&tag)
    }

    /// Takes the buffered work for a commit, leaving the transaction empty
    /// (the channel stays transactional).
    pub(crate) fn take(&mut self) -> (Vec<BufferedPublish>, Vec<Settlement>) {
        self.settled.clear();
        (
            std::mem::take(&mut self.publishes),
            std::mem::take(&mut self.settlements),
        )
    }

    /// Drops the buffered work: publishes are discarded, and the deliveries
    /// the settlements covered stay unacked.
    pub(crate) fn rollback(&mut self) {
        let _ = self.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(ts: &[u64]) -> Vec<DeliveryTag> {
        ts.iter().map(|t| DeliveryTag(*t)).collect()
    }

    #[test]
    fn settling_a_tag_twice_in_one_transaction_is_an_unknown_tag() {
        let mut tx = Transaction::default();
        tx.settle(DeliveryTag(2), false, tags(&[2]), Settle::Ack)
            .unwrap();
        assert!(tx
            .settle(DeliveryTag(2), false, tags(&[2]), Settle::Ack)
            .is_err());
        assert!(tx
            .settle(DeliveryTag(2), true, tags(&[1, 2]), Settle::Ack)
            .is_err());
        // A multiple settlement skips what is already settled.
        tx.settle(
            DeliveryTag(3),
            true,
            tags(&[1, 2, 3]),
            Settle::Reject { requeue: true },
        )
        .unwrap();
        let (_, settlements) = tx.take();
        assert_eq!(settlements.len(), 2);
        assert_eq!(settlements[1].tags, tags(&[1, 3]));
        // After the commit the tags are free again (for the broker to judge).
        tx.settle(DeliveryTag(2), false, tags(&[2]), Settle::Ack)
            .unwrap();
    }

    #[test]
    fn multiple_with_tag_zero_covers_everything_not_yet_settled() {
        let mut tx = Transaction::default();
        tx.settle(DeliveryTag(1), false, tags(&[1]), Settle::Ack)
            .unwrap();
        tx.settle(DeliveryTag(0), true, tags(&[1, 2, 5]), Settle::Ack)
            .unwrap();
        tx.rollback();
        let (publishes, settlements) = tx.take();
        assert!(publishes.is_empty() && settlements.is_empty());
    }
}
