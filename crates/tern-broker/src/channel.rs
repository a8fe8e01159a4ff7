//! A channel: the unit a client consumes and acknowledges through, as an
//! AMQP channel is, without any frames.
//!
//! A channel numbers its deliveries (delivery tags), remembers which queue
//! and offset each unacked tag stands for, holds its consumers, and applies
//! `basic.qos`: a per-consumer prefetch for consumers created afterwards, or
//! a limit shared by the whole channel. When a channel is closed or dropped,
//! its consumers are cancelled and every message it has not acknowledged
//! returns to its queue, in the queue's original order, marked redelivered.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::registry::ConsumerRegistration;
use crate::trace::{TraceEventKind, TraceKey};
use crate::value::FieldTable;

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
    /// The consumer's other arguments: on a stream, `x-stream-offset` and
    /// `x-stream-consumer-name` (see [`crate::stream`]).
    pub arguments: FieldTable,
}

#[derive(Debug)]
struct Pending {
    queue: Arc<Queue>,
    offset: Offset,
    took_credit: bool,
    /// The consumer it was delivered to (`None` for `basic.get`).
    consumer: Option<ConsumerId>,
    /// The message's trace key, when tracing recorded it.
    trace: Option<TraceKey>,
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
    /// Tags whose messages a single-active-consumer queue took back when
    /// their consumer was cancelled: acking or rejecting them does nothing,
    /// since the message may already be with the next consumer.
    revoked_tags: BTreeSet<DeliveryTag>,
    /// Cancelled consumers whose deliveries were taken back: any of theirs
    /// still on the way to this channel is dropped, not delivered.
    revoked_consumers: HashSet<ConsumerId>,
    consumers: HashMap<String, (Arc<Queue>, ConsumerId)>,
    prefetch: u32,
    credit: Arc<ChannelCredit>,
    closed: bool,
    /// The registry's copy of `unacked.len()`, for the channel listing.
    unacked_gauge: Arc<AtomicU64>,
}

impl Channel {
    pub(crate) fn new(
        broker: Broker,
        id: u64,
        connection: ConnectionId,
        vhost: VhostName,
    ) -> Channel {
        let (tx, rx) = mpsc::unbounded_channel();
        let unacked_gauge = broker
            .registry()
            .add_channel(ChannelId(id), connection, vhost.clone());
        Channel {
            broker,
            id: ChannelId(id),
            connection,
            vhost,
            tx,
            rx,
            next_tag: 1,
            unacked: BTreeMap::new(),
            revoked_tags: BTreeSet::new(),
            revoked_consumers: HashSet::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            credit: Arc::new(ChannelCredit::default()),
            closed: false,
            unacked_gauge,
        }
    }

    /// Records the number its front door gave the channel (an AMQP channel
    /// number), for listings.
    pub fn set_number(&self, number: u16) {
        self.broker.registry().set_channel_number(self.id, number);
    }

    fn note_unacked(&self) {
        self.unacked_gauge
            .store(self.unacked.len() as u64, Ordering::Relaxed);
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
            arguments: options.arguments,
        })?;
        self.broker.registry().add_consumer(ConsumerRegistration {
            id,
            channel: self.id,
            connection: self.connection,
            tag: tag.clone(),
            queue: queue.name.clone(),
            vhost: self.vhost.clone(),
            prefetch: self.prefetch,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            priority: options.priority,
        });
        self.consumers.insert(tag.clone(), (queue, id));
        Ok(tag)
    }

    /// Stops a consumer. Its unacked deliveries stay unacked on this channel,
    /// except on a single-active-consumer queue: there they go back to the
    /// queue at once, ahead of newer messages, for the next consumer (later
    /// acks of their tags are ignored). Returns whether the consumer existed.
    pub fn cancel(&mut self, consumer_tag: &str) -> bool {
        let Some((queue, id)) = self.consumers.remove(consumer_tag) else {
            return false;
        };
        self.broker.registry().remove_consumer(id);
        let removed = queue.remove_consumer(id);
        if removed.revoked {
            self.revoked_consumers.insert(id);
            let tags: Vec<DeliveryTag> = self
                .unacked
                .iter()
                .filter(|(_, p)| p.consumer == Some(id))
                .map(|(t, _)| *t)
                .collect();
            let mut credits = 0;
            for tag in tags {
                if let Some(p) = self.unacked.remove(&tag) {
                    credits += u32::from(p.took_credit);
                    self.revoked_tags.insert(tag);
                }
            }
            self.release_credit(credits);
        }
        if removed.auto_delete {
            self.broker.auto_delete_queue(&queue);
        }
        true
    }

    /// Frees channel-wide prefetch credit, letting every queue deliver again.
    fn release_credit(&self, credits: u32) {
        if credits > 0 {
            self.credit.release(credits);
            self.pump_all();
        }
    }

    /// The next event for this channel's consumers.
    pub async fn recv(&mut self) -> Option<ChannelEvent> {
        loop {
            let event = self.rx.recv().await?;
            if let Some(event) = self.accept(event) {
                return Some(event);
            }
        }
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&mut self) -> Option<ChannelEvent> {
        loop {
            let event = self.rx.try_recv().ok()?;
            if let Some(event) = self.accept(event) {
                return Some(event);
            }
        }
    }

    /// Numbers a delivery, or drops it if its queue already took it back.
    fn accept(&mut self, event: QueueEvent) -> Option<ChannelEvent> {
        Some(match event {
            QueueEvent::Cancelled { consumer_tag } => {
                if let Some((_, id)) = self.consumers.remove(&consumer_tag) {
                    self.broker.registry().remove_consumer(id);
                }
                ChannelEvent::Cancelled { consumer_tag }
            }
            QueueEvent::Delivery(d) if self.revoked_consumers.contains(&d.consumer) => {
                // Sent before the consumer's cancel; the queue has requeued it.
                self.release_credit(u32::from(d.took_credit));
                return None;
            }
            QueueEvent::Delivery(d) => {
                let tag = DeliveryTag(self.next_tag);
                self.next_tag += 1;
                let queue_name = d.queue.name.clone();
                let trace = self.broker.tracer().key(&d.message);
                if let Some(key) = &trace {
                    self.broker.tracer().event(
                        key,
                        TraceEventKind::Delivered,
                        &queue_name,
                        Some(&d.consumer_tag),
                    );
                }
                if !d.settled {
                    self.unacked.insert(
                        tag,
                        Pending {
                            queue: d.queue,
                            offset: d.offset,
                            took_credit: d.took_credit,
                            consumer: Some(d.consumer),
                            trace,
                        },
                    );
                    self.note_unacked();
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
        })
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
        let trace = self.broker.tracer().key(&fetched.message);
        if let Some(key) = &trace {
            self.broker
                .tracer()
                .event(key, TraceEventKind::Delivered, &queue.name, None);
        }
        if !no_ack {
            self.unacked.insert(
                tag,
                Pending {
                    queue,
                    offset: fetched.offset,
                    took_credit: false,
                    consumer: None,
                    trace,
                },
            );
            self.note_unacked();
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
    /// Revoked tags among them are forgotten and yield nothing.
    fn take(&mut self, tag: DeliveryTag, multiple: bool) -> Result<Vec<Pending>, BrokerError> {
        if multiple {
            let upto = if tag.0 == 0 { u64::MAX } else { tag.0 };
            if tag.0 != 0 && !self.unacked.contains_key(&tag) && !self.revoked_tags.contains(&tag) {
                return Err(unknown_tag(tag));
            }
            let after = DeliveryTag(upto.saturating_add(1));
            self.revoked_tags = self.revoked_tags.split_off(&after);
            let rest = self.unacked.split_off(&after);
            let taken = std::mem::replace(&mut self.unacked, rest);
            Ok(taken.into_values().collect())
        } else if self.revoked_tags.remove(&tag) {
            Ok(Vec::new())
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
        self.revoked_tags.clear();
        let taken = std::mem::take(&mut self.unacked).into_values().collect();
        self.settle(taken, Settle::Requeue);
    }

    fn settle(&mut self, taken: Vec<Pending>, how: Settle) {
        self.note_unacked();
        let credits: u32 = taken.iter().filter(|p| p.took_credit).count() as u32;
        self.credit.release(credits);
        let kind = match how {
            Settle::Ack => TraceEventKind::Acked,
            Settle::Drop => TraceEventKind::Rejected,
            Settle::Requeue => TraceEventKind::Requeued,
        };
        for p in &taken {
            if let Some(key) = &p.trace {
                self.broker.tracer().event(key, kind, &p.queue.name, None);
            }
        }
        let mut by_queue: Vec<(Arc<Queue>, Vec<Offset>)> = Vec::new();
        for p in taken {
            if let (true, Some(consumer)) = (p.queue.is_stream(), p.consumer) {
                // Streams delete nothing: every settlement is an ack (credit
                // and a commit), as RabbitMQ ignores requeue there.
                p.queue.settle_stream(consumer, &[p.offset]);
                continue;
            }
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
        self.broker.registry().remove_channel(self.id);
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

/// What a front door needs for AMQP transactions and direct reply-to, kept
/// apart from the rest of the channel: reading which deliveries an ack would
/// settle (a transaction checks and remembers them at ack time but settles
/// them at commit), and numbering a delivery the front door makes itself.
impl Channel {
    /// The unacked deliveries that settling `tag` would settle: `tag`
    /// itself, or with `multiple` every unacked tag up to it (every one for
    /// tag 0), in order. Nothing changes. An unknown tag is the same 406
    /// error [`Channel::ack`] gives.
    pub fn unacked_tags(
        &self,
        tag: DeliveryTag,
        multiple: bool,
    ) -> Result<Vec<DeliveryTag>, BrokerError> {
        if multiple && tag.0 == 0 {
            return Ok(self.unacked.keys().copied().collect());
        }
        if !self.unacked.contains_key(&tag) {
            return Err(unknown_tag(tag));
        }
        if !multiple {
            return Ok(vec![tag]);
        }
        Ok(self.unacked.range(..=tag).map(|(t, _)| *t).collect())
    }

    /// Takes the next delivery tag for a delivery that did not come from a
    /// queue (a direct reply-to message): it is never unacked, but it must
    /// share the channel's numbering with every other delivery.
    pub fn next_delivery_tag(&mut self) -> DeliveryTag {
        let tag = DeliveryTag(self.next_tag);
        self.next_tag += 1;
        tag
    }
}
