//! A channel: the unit a client consumes and acknowledges through, as an
//! AMQP channel is, without any frames.
//!
//! A channel numbers its deliveries (delivery tags), remembers which queue
//! and offset each unacked tag stands for, holds its consumers, and applies
//! `basic.qos`: a per-consumer prefetch for consumers created afterwards, or
//! a limit shared by the whole channel. When a channel is closed or dropped,
//! its consumers are cancelled and every message it has not acknowledged
//! returns to its queue, in the queue's original order, marked redelivered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tern_storage::Offset;
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::message::Message;
use crate::name::{QueueName, VhostName};
use crate::queue::{
    ChannelCredit, ChannelId, ConnectionId, ConsumerId, ConsumerSpec, Queue, QueueEvent,
};

/// The number a channel gives each delivery, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryTag(pub u64);

/// A message delivered to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The tag to acknowledge it with.
    pub tag: DeliveryTag,
    /// The consumer it was delivered to.
    pub consumer_tag: String,
    /// The queue it came from.
    pub queue: QueueName,
    /// Whether it was delivered before (and returned to the queue).
    pub redelivered: bool,
    /// How many times it was delivered before this delivery.
    pub delivery_count: u32,
    /// The message.
    pub message: Message,
}

/// A message fetched with [`Channel::get`].
#[derive(Debug, Clone)]
pub struct GetOk {
    /// The tag to acknowledge it with (unless fetched with `no_ack`).
    pub tag: DeliveryTag,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// How many times it was delivered before.
    pub delivery_count: u32,
    /// Messages still ready in the queue.
    pub message_count: u64,
    /// The message.
    pub message: Message,
}

/// What a channel receives.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // deliveries are the common case; boxing each would allocate
pub enum ChannelEvent {
    /// A delivery to one of the channel's consumers.
    Delivery(Delivery),
    /// The broker cancelled a consumer, for example because its queue was deleted.
    Cancelled {
        /// The cancelled consumer.
        consumer_tag: String,
    },
}

/// How to consume.
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// The consumer tag; empty asks the broker to choose one.
    pub consumer_tag: String,
    /// Deliveries count as acknowledged when sent.
    pub no_ack: bool,
    /// No other consumer may consume from the queue meanwhile.
    pub exclusive: bool,
    /// Higher-priority consumers receive messages first (`x-priority`).
    pub priority: i32,
}

#[derive(Debug)]
struct Pending {
    queue: Arc<Queue>,
    offset: Offset,
    took_credit: bool,
}

/// A channel. Dropping it has the same effect as [`Channel::close`].
#[derive(Debug)]
pub struct Channel {
    broker: Broker,
    id: ChannelId,
    connection: ConnectionId,
    vhost: VhostName,
    tx: mpsc::UnboundedSender<QueueEvent>,
    rx: mpsc::UnboundedReceiver<QueueEvent>,
    next_tag: u64,
    unacked: BTreeMap<DeliveryTag, Pending>,
    consumers: HashMap<String, (Arc<Queue>, ConsumerId)>,
    prefetch: u32,
    credit: Arc<ChannelCredit>,
    closed: bool,
}

impl Channel {
    pub(crate) fn new(
        broker: Broker,
        id: u64,
        connection: ConnectionId,
        vhost: VhostName,
    ) -> Channel {
        let (tx, rx) = mpsc::unbounded_channel();
        Channel {
            broker,
            id: ChannelId(id),
            connection,
            vhost,
            tx,
            rx,
            next_tag: 1,
            unacked: BTreeMap::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            credit: Arc::new(ChannelCredit::default()),
            closed: false,
        }
    }

    /// The vhost the channel works in.
    pub fn vhost(&self) -> &VhostName {
        &self.vhost
    }

    /// The connection the channel belongs to.
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }

    /// Sets the prefetch window, as `basic.qos` does: with `global` false it
    /// applies to each consumer created afterwards; with `global` true it
    /// limits unacked deliveries across the whole channel. Zero means no limit.
    pub fn qos(&mut self, prefetch_count: u16, global: bool) {
        if global {
            self.credit.set_limit(u32::from(prefetch_count));
            self.pump_all();
        } else {
            self.prefetch = u32::from(prefetch_count);
        }
    }

    /// Starts consuming from `queue`. Returns the consumer tag.
    pub fn consume(&mut self, queue: &str, options: ConsumeOptions) -> Result<String, BrokerError> {
        let queue = self
            .broker
            .find_queue(&self.vhost, queue, Some(self.connection))?;
        let tag = if options.consumer_tag.is_empty() {
            format!("amq.ctag-{}", self.broker.next_id())
        } else {
            options.consumer_tag
        };
        if self.consumers.contains_key(&tag) {
            return Err(BrokerError::NotAllowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        let id = ConsumerId(self.broker.next_id());
        queue.add_consumer(ConsumerSpec {
            id,
            tag: tag.clone(),
            channel: self.id,
            prefetch: self.prefetch,
            no_ack: options.no_ack,
            priority: options.priority,
            exclusive: options.exclusive,
            tx: self.tx.clone(),
            credit: Arc::clone(&self.credit),
        })?;
        self.consumers.insert(tag.clone(), (queue, id));
        Ok(tag)
    }

    /// Stops a consumer. Its unacked deliveries stay unacked on this channel.
    /// Returns whether the consumer existed.
    pub fn cancel(&mut self, consumer_tag: &str) -> bool {
        let Some((queue, id)) = self.consumers.remove(consumer_tag) else {
            return false;
        };
        if queue.remove_consumer(id) {
            self.broker.auto_delete_queue(&queue);
        }
        true
    }

    /// The next event for this channel's consumers.
    pub async fn recv(&mut self) -> Option<ChannelEvent> {
        let event = self.rx.recv().await?;
        Some(self.accept(event))
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&mut self) -> Option<ChannelEvent> {
        let event = self.rx.try_recv().ok()?;
        Some(self.accept(event))
    }

    fn accept(&mut self, event: QueueEvent) -> ChannelEvent {
        match event {
            QueueEvent::Cancelled { consumer_tag } => {
                self.consumers.remove(&consumer_tag);
                ChannelEvent::Cancelled { consumer_tag }
            }
            QueueEvent::Delivery(d) => {
                let tag = DeliveryTag(self.next_tag);
                self.next_tag += 1;
                let queue_name = d.queue.name.clone();
                if !d.settled {
                    self.unacked.insert(
                        tag,
                        Pending {
                            queue: d.queue,
                            offset: d.offset,
                            took_credit: d.took_credit,
                        },
                    );
                }
                ChannelEvent::Delivery(Delivery {
                    tag,
                    consumer_tag: d.consumer_tag,
                    queue: queue_name,
                    redelivered: d.redelivered,
                    delivery_count: d.delivery_count,
                    message: d.message,
                })
            }
        }
    }

    /// Fetches one message from `queue` (`basic.get`), or `None` if it is empty.
    pub fn get(&mut self, queue: &str, no_ack: bool) -> Result<Option<GetOk>, BrokerError> {
        let queue = self
            .broker
            .find_queue(&self.vhost, queue, Some(self.connection))?;
        let Some(fetched) = queue.get(self.id, no_ack)? else {
            return Ok(None);
        };
        let tag = DeliveryTag(self.next_tag);
        self.next_tag += 1;
        if !no_ack {
            self.unacked.insert(
                tag,
                Pending {
                    queue,
                    offset: fetched.offset,
                    took_credit: false,
                },
            );
        }
        Ok(Some(GetOk {
            tag,
            redelivered: fetched.redelivered,
            delivery_count: fetched.delivery_count,
            message_count: fetched.remaining,
            message: fetched.message,
        }))
    }

    /// The tags that `tag` (and, with `multiple`, every earlier tag) names.
    /// Tag 0 with `multiple` means every unacked delivery.
    fn take(&mut self, tag: DeliveryTag, multiple: bool) -> Result<Vec<Pending>, BrokerError> {
        if multiple {
            let upto = if tag.0 == 0 { u64::MAX } else { tag.0 };
            if tag.0 != 0 && !self.unacked.contains_key(&tag) {
                return Err(unknown_tag(tag));
            }
            let rest = self.unacked.split_off(&DeliveryTag(upto.saturating_add(1)));
            let taken = std::mem::replace(&mut self.unacked, rest);
            Ok(taken.into_values().collect())
        } else {
            self.unacked
                .remove(&tag)
                .map(|p| vec![p])
                .ok_or_else(|| unknown_tag(tag))
        }
    }

    /// Acknowledges a delivery (and, with `multiple`, every earlier one).
    /// An unknown tag is a channel error (406), as in AMQP.
    pub fn ack(&mut self, tag: DeliveryTag, multiple: bool) -> Result<(), BrokerError> {
        let taken = self.take(tag, multiple)?;
        self.settle(taken, Settle::Ack);
        Ok(())
    }

    /// Rejects a delivery (and, with `multiple`, every earlier one): back to
    /// the queue with `requeue`, otherwise dropped.
    pub fn nack(
        &mut self,
        tag: DeliveryTag,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), BrokerError> {
        let taken = self.take(tag, multiple)?;
        self.settle(
            taken,
            if requeue {
                Settle::Requeue
            } else {
                Settle::Drop
            },
        );
        Ok(())
    }

    /// Rejects one delivery, as `basic.reject` does.
    pub fn reject(&mut self, tag: DeliveryTag, requeue: bool) -> Result<(), BrokerError> {
        self.nack(tag, false, requeue)
    }

    /// Returns every unacked delivery to its queue (`basic.recover` with requeue).
    pub fn recover(&mut self) {
        let taken = std::mem::take(&mut self.unacked).into_values().collect();
        self.settle(taken, Settle::Requeue);
    }

    fn settle(&mut self, taken: Vec<Pending>, how: Settle) {
        let credits: u32 = taken.iter().filter(|p| p.took_credit).count() as u32;
        self.credit.release(credits);
        let mut by_queue: Vec<(Arc<Queue>, Vec<Offset>)> = Vec::new();
        for p in taken {
            match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &p.queue)) {
                Some((_, offsets)) => offsets.push(p.offset),
                None => by_queue.push((p.queue, vec![p.offset])),
            }
        }
        for (queue, offsets) in by_queue {
            match how {
                Settle::Ack => queue.ack(&offsets),
                Settle::Drop => queue.reject(&offsets),
                Settle::Requeue => queue.requeue(&offsets),
            }
        }
        if credits > 0 {
            self.pump_all();
        }
    }

    /// Channel credit was freed: any queue this channel consumes from may deliver again.
    fn pump_all(&self) {
        for (queue, _) in self.consumers.values() {
            queue.pump();
        }
    }

    /// Closes the channel: cancels its consumers and returns its unacked messages.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut queues: Vec<Arc<Queue>> = self.consumers.drain().map(|(_, (q, _))| q).collect();
        let add = |queue: Arc<Queue>, queues: &mut Vec<Arc<Queue>>| {
            if !queues.iter().any(|q| Arc::ptr_eq(q, &queue)) {
                queues.push(queue);
            }
        };
        for (_, pending) in std::mem::take(&mut self.unacked) {
            add(pending.queue, &mut queues);
        }
        // Deliveries sent but never received are unacked at their queue too.
        self.rx.close();
        while let Ok(event) = self.rx.try_recv() {
            if let QueueEvent::Delivery(d) = event {
                add(d.queue, &mut queues);
            }
        }
        for queue in queues {
            if queue.release_channel(self.id) {
                self.broker.auto_delete_queue(&queue);
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Drop,
    Requeue,
}

fn unknown_tag(tag: DeliveryTag) -> BrokerError {
    BrokerError::PreconditionFailed(format!("unknown delivery tag {}", tag.0))
}
