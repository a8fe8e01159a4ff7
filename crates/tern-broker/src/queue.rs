//! A queue: its messages in a `tern-storage` log, its durable ack state in
//! a second log, and the in-memory delivery state (ready, unacked,
//! consumers) under one lock.
//!
//! Offsets of the message log identify messages. A message is *settled*
//! once acked (or dropped); the *floor* is the lowest unsettled offset, and
//! log segments wholly below it are deleted. Everything in `[floor, end)`
//! is settled, unacked (delivered and awaiting an ack), requeued (returned,
//! to be delivered again before anything newer), or not yet reached by the
//! *scan* position. Only a bounded read-ahead window of records is held in
//! memory; a queue of ten million messages keeps them on disk.
//!
//! The ack log holds records of two kinds: a list of settled offsets, and a
//! checkpoint (the floor and every settled offset above it), written now and
//! then so that the ack log can drop its older segments. Replaying it in
//! order on open rebuilds the settled set; acks are written without waiting
//! for an fsync, since losing one only means a redelivery, which
//! at-least-once allows.

mod groups;
mod peek;
pub(crate) mod stream;

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tern_storage::{Appended, Log, Message as StoredRecord, Offset, Reader, Record, Timestamp};
use tokio::sync::{mpsc, Notify};

use crate::codec::{self, StoredMeta};
use crate::dead_letter::{self, Reason};
use crate::dedup::Dedup;
use crate::error::BrokerError;
use crate::message::Message;
use crate::name::{QueueName, VhostName};
use crate::observe::QueueMetrics;
use crate::policy::{self, Overflow, QueuePolicy};
use crate::value::FieldTable;

/// Where a queue sends the messages it dead-letters: the broker republishes
/// them to their dead-letter exchange.
#[derive(Clone)]
pub(crate) struct DeadLetterSink(pub(crate) Arc<dyn Fn(Vec<Message>) + Send + Sync>);

impl std::fmt::Debug for DeadLetterSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadLetterSink")
    }
}

/// How a queue asks the broker to delete it once unused for `x-expires`.
#[derive(Clone)]
pub(crate) struct QueueExpirer(pub(crate) Arc<ExpireFn>);

type ExpireFn = dyn Fn(&Arc<Queue>) + Send + Sync;

impl std::fmt::Debug for QueueExpirer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueExpirer")
    }
}

/// Identifies a client connection, which owns exclusive queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Identifies a channel within the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ChannelId(pub(crate) u64);

/// Identifies a consumer within the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConsumerId(pub(crate) u64);

/// The kinds of queue a client may declare with `x-queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// RabbitMQ's default queue type.
    Classic,
    /// A durable queue with RabbitMQ quorum-queue rules (never exclusive or
    /// auto-delete). On a single node it needs no replication.
    Quorum,
    /// An append-only log read non-destructively, each consumer from its
    /// own offset; trimmed only by retention.
    Stream,
}

impl QueueType {
    /// The name clients use in `x-queue-type`.
    pub fn as_str(&self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// Prefetch credit shared by every consumer of one channel (`basic.qos`
/// with `global` set): a limit on unacked deliveries across the channel.
#[derive(Debug, Default)]
pub(crate) struct ChannelCredit {
    limit: AtomicU32,
    used: AtomicU32,
}

impl ChannelCredit {
    pub(crate) fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Release);
    }

    fn try_acquire(&self) -> bool {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let limit = self.limit.load(Ordering::Acquire);
            if limit != 0 && used >= limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    pub(crate) fn release(&self, n: u32) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

/// What a channel receives from the queues it consumes from.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // deliveries are the common case; boxing each would allocate
pub(crate) enum QueueEvent {
    Delivery(QueuedDelivery),
    /// The queue cancelled the consumer (the queue was deleted).
    Cancelled {
        consumer_tag: String,
    },
}

/// A message handed to a consumer, before the channel gives it a delivery tag.
#[derive(Debug)]
pub(crate) struct QueuedDelivery {
    pub(crate) queue: Arc<Queue>,
    pub(crate) consumer_tag: String,
    /// The consumer it went to, so a channel can tell which deliveries a
    /// single-active-consumer queue took back.
    pub(crate) consumer: ConsumerId,
    pub(crate) offset: Offset,
    pub(crate) redelivered: bool,
    pub(crate) delivery_count: u32,
    pub(crate) message: Message,
    /// Whether the message was settled on delivery (a no-ack consumer).
    pub(crate) settled: bool,
    /// Whether the delivery took a unit of channel credit.
    pub(crate) took_credit: bool,
}

#[derive(Debug)]
struct ConsumerSlot {
    id: ConsumerId,
    tag: String,
    channel: ChannelId,
    prefetch: u32,
    in_flight: u32,
    no_ack: bool,
    priority: i32,
    exclusive: bool,
    tx: mpsc::UnboundedSender<QueueEvent>,
    credit: Arc<ChannelCredit>,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    channel: ChannelId,
    consumer: Option<ConsumerId>,
}

/// A consumer to attach to a queue.
#[derive(Debug)]
pub(crate) struct ConsumerSpec {
    pub(crate) id: ConsumerId,
    pub(crate) tag: String,
    pub(crate) channel: ChannelId,
    pub(crate) prefetch: u32,
    pub(crate) no_ack: bool,
    pub(crate) priority: i32,
    pub(crate) exclusive: bool,
    pub(crate) tx: mpsc::UnboundedSender<QueueEvent>,
    pub(crate) credit: Arc<ChannelCredit>,
    /// The consumer's arguments (a stream reads `x-stream-offset` and
    /// `x-stream-consumer-name` from them).
    pub(crate) arguments: FieldTable,
}

/// What [`Queue::remove_consumer`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemovedConsumer {
    /// The queue should now be auto-deleted.
    pub(crate) auto_delete: bool,
    /// The consumer's unacked messages went back to the queue (single
    /// active consumer): its channel must forget their delivery tags.
    pub(crate) revoked: bool,
}

/// One message fetched with `get`.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) offset: Offset,
    pub(crate) message: Message,
    pub(crate) redelivered: bool,
    pub(crate) delivery_count: u32,
    pub(crate) remaining: u64,
}

const ACKS: u8 = 0;
const CHECKPOINT: u8 = 1;
/// Offsets handed to a consumer: each record adds one to their delivery
/// counts, so that `redelivered`, `x-delivery-count` and the delivery limit
/// survive a restart (a poison message cannot reset its count by crashing
/// the broker).
const DELIVERED: u8 = 2;
/// Ack records between checkpoints of the ack log.
const CHECKPOINT_EVERY: u64 = 4096;
/// Records read ahead from the message log at a time.
const WINDOW_RECORDS: usize = 256;
const WINDOW_BYTES: usize = 1 << 20;

/// The byte count behind `x-max-length-bytes`.
#[derive(Debug)]
struct ByteAccount {
    ready: u64,
    taken: HashMap<u64, u64>,
    accounted_to: u64,
    reader: Reader,
}

#[derive(Debug)]
struct QueueState {
    floor: u64,
    scan: u64,
    settled: BTreeSet<u64>,
    /// Messages ready to be delivered before the scan position: returned ones,
    /// and in a priority queue every scanned one. Ordered by priority (highest
    /// first), then offset, so a plain queue (all priority 0) is FIFO.
    requeued: BTreeSet<(Reverse<u8>, u64)>,
    /// For a priority queue (`x-max-priority`): the priority of every message
    /// taken from the scan and not yet settled.
    max_priority: Option<u8>,
    priorities: HashMap<u64, u8>,
    /// For a queue with `x-message-group-header`: the ready messages the
    /// scan reached, by group, and which groups have a message out.
    groups: Option<groups::Groups>,
    /// For a queue with `x-max-length-bytes`: the body bytes of its ready
    /// messages, the sizes of those taken from ready and not yet settled,
    /// and a reader that counts committed messages in up to `accounted_to`.
    bytes: Option<ByteAccount>,
    /// Delivered at least once: for the `redelivered` flag and delivery counts.
    delivered: HashMap<u64, u32>,
    unacked: HashMap<u64, Holder>,
    window: VecDeque<Record>,
    reader: Reader,
    random: Reader,
    /// In registration order: under single active consumer the first one is
    /// the active one.
    consumers: Vec<ConsumerSlot>,
    next_consumer: usize,
    /// `x-single-active-consumer`: only `consumers[0]` receives.
    single_active: bool,
    ever_consumed: bool,
    acks_since_checkpoint: u64,
}

/// A queue and its state. Shared by the vhost, the queue's task and the
/// channels holding its deliveries.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) vhost: VhostName,
    pub(crate) name: QueueName,
    pub(crate) id: u64,
    pub(crate) durable: bool,
    pub(crate) exclusive_owner: Option<ConnectionId>,
    pub(crate) auto_delete: bool,
    pub(crate) arguments: FieldTable,
    pub(crate) queue_type: QueueType,
    pub(crate) policy: QueuePolicy,
    sink: Option<DeadLetterSink>,
    expirer: Option<QueueExpirer>,
    /// `x-message-deduplication`: the window of keys seen.
    dedup: Option<Dedup>,
    /// When the queue was last used (milliseconds since the epoch): a
    /// consumer came or went, a `get`, or a redeclaration. Drives `x-expires`.
    last_used: AtomicU64,
    metrics: QueueMetrics,
    log: Log,
    acks: Log,
    state: Mutex<QueueState>,
    /// Set for a stream (`x-queue-type: stream`), which delivers from it
    /// instead of the destructive state above.
    stream: Option<stream::Stream>,
    pub(crate) wake: Notify,
    pub(crate) deleted: AtomicBool,
}

/// What a queue is declared with.
#[derive(Debug, Clone)]
pub(crate) struct QueueSettings {
    pub(crate) vhost: VhostName,
    pub(crate) name: QueueName,
    pub(crate) id: u64,
    pub(crate) durable: bool,
    pub(crate) exclusive_owner: Option<ConnectionId>,
    pub(crate) auto_delete: bool,
    pub(crate) arguments: FieldTable,
    pub(crate) queue_type: QueueType,
    pub(crate) policy: QueuePolicy,
    pub(crate) sink: Option<DeadLetterSink>,
    pub(crate) expirer: Option<QueueExpirer>,
    /// The log of its deduplication window, if it deduplicates.
    pub(crate) dedup_log: Option<Log>,
    /// Retention and segment size, for a stream.
    pub(crate) stream: Option<crate::stream::StreamPolicy>,
}

fn storage(e: tern_storage::StorageError) -> BrokerError {
    BrokerError::from(e)
}

impl Queue {
    /// Opens a queue over its two logs, rebuilding its settled set from the ack log.
    pub(crate) fn open(
        settings: QueueSettings,
        log: Log,
        acks: Log,
    ) -> Result<Arc<Queue>, BrokerError> {
        let mut floor = 0u64;
        let mut settled = BTreeSet::new();
        let mut delivered: HashMap<u64, u32> = HashMap::new();
        let stream = match settings.stream {
            Some(policy) => Some(stream::Stream::open(policy, &log, &acks)?),
            None => None,
        };
        let mut reader = acks.reader(acks.start()).map_err(storage)?;
        // A stream's ack log holds commits, not settled offsets.
        while stream.is_none() {
            let batch = reader.read(1024, 4 << 20).map_err(storage)?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                apply_ack_record(&rec.body, &mut floor, &mut settled, &mut delivered);
            }
        }
        floor = floor.max(log.start().0);
        settled = settled.split_off(&floor);
        while settled.remove(&floor) {
            floor += 1;
        }
        delivered.retain(|o, _| *o >= floor && !settled.contains(o));
        let reader = log.reader(Offset(floor)).map_err(storage)?;
        let random = log.reader(Offset(floor)).map_err(storage)?;
        let metrics = QueueMetrics::new(settings.vhost.as_str(), settings.name.as_str());
        let max_priority = settings.policy.max_priority;
        let single_active = settings.policy.single_active_consumer;
        let groups = settings
            .policy
            .message_group_header
            .clone()
            .map(groups::Groups::new);
        let bytes = match settings.policy.max_length_bytes {
            Some(_) => Some(ByteAccount {
                ready: 0,
                taken: HashMap::new(),
                accounted_to: floor,
                reader: log.reader(Offset(floor)).map_err(storage)?,
            }),
            None => None,
        };
        let dedup = match (settings.dedup_log, settings.policy.dedup) {
            (Some(log), Some(policy)) => Some(Dedup::open(log, policy)?),
            _ => None,
        };
        Ok(Arc::new(Queue {
            dedup,
            vhost: settings.vhost,
            name: settings.name,
            id: settings.id,
            durable: settings.durable,
            exclusive_owner: settings.exclusive_owner,
            auto_delete: settings.auto_delete,
            arguments: settings.arguments,
            queue_type: settings.queue_type,
            policy: settings.policy,
            sink: settings.sink,
            expirer: settings.expirer,
            last_used: AtomicU64::new(Timestamp::now().0),
            metrics,
            log,
            acks,
            state: Mutex::new(QueueState {
                floor,
                scan: floor,
                settled,
                requeued: BTreeSet::new(),
                max_priority,
                priorities: HashMap::new(),
                groups,
                bytes,
                delivered,
                unacked: HashMap::new(),
                window: VecDeque::new(),
                reader,
                random,
                consumers: Vec::new(),
                next_consumer: 0,
                single_active,
                ever_consumed: false,
                acks_since_checkpoint: 0,
            }),
            stream,
            wake: Notify::new(),
            deleted: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The message log, for the queue's task to wait on.
    pub(crate) fn log(&self) -> &Log {
        &self.log
    }

    /// Whether the queue refuses a new message because it is full
    /// (`x-overflow` reject-publish or reject-publish-dlx). A refused message
    /// is dead-lettered under reject-publish-dlx.
    pub(crate) fn refuses(&self, message: &Message) -> bool {
        if self.policy.overflow == Overflow::DropHead {
            return false;
        }
        let full = {
            let mut st = self.lock();
            let end = self.log.end().0;
            st.account(end);
            self.policy
                .max_length
                .is_some_and(|max| st.ready(end) >= max)
                || self.policy.max_length_bytes.is_some_and(|max| {
                    st.ready_bytes().saturating_add(message.body.len() as u64) > max
                })
        };
        if !full {
            return false;
        }
        if self.policy.overflow == Overflow::RejectPublishDlx {
            self.publish_dead(self.dead_lettered(vec![(message.clone(), Reason::MaxLen)]));
        }
        true
    }

    /// Rewrites messages for the dead-letter exchange, if the queue has one.
    fn dead_lettered(&self, dead: Vec<(Message, Reason)>) -> Vec<Message> {
        let has_dlx = self.policy.dead_letter_exchange.is_some();
        for (_, reason) in &dead {
            self.metrics.died(*reason, has_dlx);
        }
        let Some(dlx) = &self.policy.dead_letter_exchange else {
            return Vec::new();
        };
        let now = Timestamp::now().0 / 1000;
        dead.into_iter()
            .map(|(m, reason)| {
                dead_letter::dead_letter(
                    m,
                    self.name.as_str(),
                    reason,
                    dlx,
                    self.policy.dead_letter_routing_key.as_deref(),
                    now,
                )
            })
            .collect()
    }

    /// Hands dead-lettered messages to the broker. Called without the state
    /// lock held, because republishing takes the vhost's lock.
    fn publish_dead(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        if let Some(sink) = &self.sink {
            (sink.0)(messages);
        }
    }

    /// When a stored message expires, by the queue's TTL or its own, if ever.
    fn expires_at(&self, rec: &Record, meta: &StoredMeta) -> Option<u64> {
        let own = meta
            .properties
            .expiration
            .as_deref()
            .and_then(|e| policy::parse_expiration(e).ok());
        let ttl = match (self.policy.message_ttl, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(rec.timestamp.0.saturating_add(ttl))
    }

    /// Appends a published message, unless the queue deduplicates and has
    /// seen its key within the window. The tickets resolve when it may be
    /// confirmed.
    pub(crate) fn append_published(&self, message: &Message) -> Result<Vec<Appended>, BrokerError> {
        match &self.dedup {
            Some(dedup) => Ok(dedup.admit(message, || Ok(vec![self.append(message)?]))?.0),
            None => Ok(vec![self.append(message)?]),
        }
    }

    /// Appends a routed message. The returned ticket resolves when it is durable.
    pub(crate) fn append(&self, message: &Message) -> Result<tern_storage::Appended, BrokerError> {
        let mut meta = BytesMut::new();
        codec::encode_meta(
            &StoredMeta {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                properties: message.properties.clone(),
                delivery_count: 0,
            },
            &mut meta,
        );
        let record = StoredRecord {
            timestamp: Timestamp::now(),
            headers: meta.freeze(),
            body: message.body.clone(),
        };
        let appended = self
            .log
            .append(std::slice::from_ref(&record))
            .map_err(storage)?;
        self.metrics.published.increment(1);
        self.metrics
            .published_bytes
            .increment(message.body.len() as u64);
        Ok(appended)
    }

    /// Publishes the queue's current depths to its gauges.
    fn observe(&self, st: &QueueState) {
        self.metrics.ready.set(st.ready(self.log.end().0) as f64);
        self.metrics.unacked.set(st.unacked.len() as f64);
        self.metrics.consumers.set(st.consumers.len() as f64);
    }

    /// Records a use of the queue, which postpones its `x-expires`.
    pub(crate) fn touch(&self) {
        self.last_used.store(Timestamp::now().0, Ordering::Release);
    }

    /// When the queue expires for want of use, if it has `x-expires` and no
    /// consumers; deletes it if that time has come.
    fn check_unused(self: &Arc<Self>) -> Option<u64> {
        let expires = self.policy.expires?;
        if self.consumer_count() > 0 {
            return None;
        }
        let at = self
            .last_used
            .load(Ordering::Acquire)
            .saturating_add(expires);
        if at > Timestamp::now().0 {
            return Some(at);
        }
        if let Some(expirer) = &self.expirer {
            (expirer.0)(self);
        }
        None
    }

    /// Messages ready for delivery.
    pub(crate) fn message_count(&self) -> u64 {
        if self.is_stream() {
            // Nothing is consumed away: a stream holds everything retained.
            return self.log.end().0.saturating_sub(self.log.start().0);
        }
        let st = self.lock();
        st.ready(self.log.end().0)
    }

    /// Attached consumers.
    pub(crate) fn consumer_count(&self) -> usize {
        if let Some(stream) = &self.stream {
            return self.stream_consumer_count(stream);
        }
        self.lock().consumers.len()
    }

    /// Messages delivered and not yet acknowledged.
    pub(crate) fn unacked_count(&self) -> usize {
        if self.is_stream() {
            // Deliveries are consumers' cursors, not messages held back
            // from the stream: everything stays counted as ready.
            return 0;
        }
        self.lock().unacked.len()
    }

    pub(crate) fn add_consumer(self: &Arc<Self>, spec: ConsumerSpec) -> Result<(), BrokerError> {
        if let Some(stream) = &self.stream {
            return self.add_stream_consumer(stream, spec);
        }
        let mut st = self.lock();
        if st.consumers.iter().any(|c| c.exclusive) || (spec.exclusive && !st.consumers.is_empty())
        {
            return Err(BrokerError::AccessRefused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, self.vhost
            )));
        }
        st.consumers.push(ConsumerSlot {
            id: spec.id,
            tag: spec.tag,
            channel: spec.channel,
            prefetch: spec.prefetch,
            in_flight: 0,
            no_ack: spec.no_ack,
            priority: spec.priority,
            exclusive: spec.exclusive,
            tx: spec.tx,
            credit: spec.credit,
        });
        st.ever_consumed = true;
        drop(st);
        self.touch();
        self.pump();
        Ok(())
    }

    /// Detaches a consumer. Its unacked messages stay with its channel,
    /// except under single active consumer: there they return to the queue
    /// (in offset order, ahead of everything newer) before the next consumer
    /// becomes active, so that no message is processed out of order; the
    /// channel then forgets them ([`RemovedConsumer::revoked`]).
    pub(crate) fn remove_consumer(self: &Arc<Self>, id: ConsumerId) -> RemovedConsumer {
        if let Some(stream) = &self.stream {
            self.remove_stream_consumers(stream, |c, _| c == id);
            return RemovedConsumer {
                auto_delete: false,
                revoked: false,
            };
        }
        let mut st = self.lock();
        st.consumers.retain(|c| c.id != id);
        let revoked = st.single_active;
        if revoked {
            let back: Vec<u64> = st
                .unacked
                .iter()
                .filter(|(_, h)| h.consumer == Some(id))
                .map(|(o, _)| *o)
                .collect();
            for o in back {
                st.unacked.remove(&o);
                st.requeue_one(o);
            }
        }
        // The x-expires clock starts when the last consumer goes; the task
        // must look again only once the consumer is gone.
        self.touch();
        self.wake.notify_one();
        let auto_delete = self.auto_delete && st.ever_consumed && st.consumers.is_empty();
        drop(st);
        if revoked {
            self.pump();
        }
        RemovedConsumer {
            auto_delete,
            revoked,
        }
    }

    /// Delivers ready messages to consumers with credit, until either runs out.
    pub(crate) fn pump(self: &Arc<Self>) {
        if self.deleted.load(Ordering::Acquire) {
            return;
        }
        if let Some(stream) = &self.stream {
            return self.pump_stream(stream);
        }
        let dead = {
            let mut st = self.lock();
            self.pump_locked(&mut st)
        };
        self.publish_dead(self.dead_lettered(dead));
    }

    fn pump_locked(self: &Arc<Self>, st: &mut QueueState) -> Vec<(Message, Reason)> {
        let end = self.log.end().0;
        let now = Timestamp::now().0;
        let mut settled_now = Vec::new();
        let mut delivered_now = Vec::new();
        let mut dead = Vec::new();
        self.enforce_max_length(st, end, &mut settled_now, &mut dead);
        while st.has_ready(end) {
            let Some(ci) = st.pick_consumer() else {
                break;
            };
            let Some(Ok(rec)) = st.next_ready(end) else {
                // Nothing ready after all, or the log reported damage: stop
                // delivering rather than skip anything.
                st.release_pick(ci);
                break;
            };
            let offset = rec.offset.0;
            let Ok(meta) = codec::decode_meta(&rec.headers) else {
                // A record the codec cannot read was never written by this broker
                // version; it is settled rather than delivered as garbage.
                st.release_pick(ci);
                settled_now.push(offset);
                st.settle_one(offset);
                continue;
            };
            if self.expires_at(&rec, &meta).is_some_and(|t| t <= now) {
                st.release_pick(ci);
                settled_now.push(offset);
                st.settle_one(offset);
                dead.push((stored_message(meta, rec.body), Reason::Expired));
                continue;
            }
            let count = st.delivered.get(&offset).copied().unwrap_or(0);
            let Some(slot) = st.consumers.get(ci) else {
                break;
            };
            let (no_ack, tag, tx, channel, consumer) = (
                slot.no_ack,
                slot.tag.clone(),
                slot.tx.clone(),
                slot.channel,
                slot.id,
            );
            let delivery = QueuedDelivery {
                queue: Arc::clone(self),
                consumer_tag: tag,
                consumer,
                offset: rec.offset,
                redelivered: count > 0,
                delivery_count: count + meta.delivery_count,
                message: self.outgoing(meta, rec.body, count),
                settled: no_ack,
                took_credit: !no_ack,
            };
            if no_ack {
                settled_now.push(offset);
                st.settle_one(offset);
            } else {
                st.delivered.insert(offset, count + 1);
                delivered_now.push(offset);
                if count > 0 {
                    self.metrics.redelivered.increment(1);
                }
                st.unacked.insert(
                    offset,
                    Holder {
                        channel,
                        consumer: Some(consumer),
                    },
                );
            }
            if tx.send(QueueEvent::Delivery(delivery)).is_err() {
                // The channel is gone: take the message back and drop the consumer.
                if !no_ack {
                    st.unacked.remove(&offset);
                    st.requeue_one(offset);
                }
                st.consumers.retain(|c| c.id != consumer);
            }
        }
        self.metrics.delivered.increment(delivered_now.len() as u64);
        self.persist_delivered(st, &delivered_now);
        self.persist_settled(st, &settled_now);
        self.observe(st);
        dead
    }

    /// The message as delivered: quorum queues tell consumers how many
    /// times it was delivered before, in `x-delivery-count`.
    fn outgoing(&self, meta: StoredMeta, body: Bytes, count: u32) -> Message {
        let mut message = stored_message(meta, body);
        if self.queue_type == QueueType::Quorum && count > 0 {
            message
                .properties
                .headers
                .get_or_insert_with(FieldTable::new)
                .insert(
                    "x-delivery-count".into(),
                    crate::value::FieldValue::I64(i64::from(count)),
                );
        }
        message
    }

    /// Drops (or dead-letters) the oldest ready messages while the queue is
    /// longer than `x-max-length` under the drop-head overflow.
    fn enforce_max_length(
        &self,
        st: &mut QueueState,
        end: u64,
        settled: &mut Vec<u64>,
        dead: &mut Vec<(Message, Reason)>,
    ) {
        if self.policy.overflow != Overflow::DropHead {
            return;
        }
        let (max, max_bytes) = (self.policy.max_length, self.policy.max_length_bytes);
        if max.is_none() && max_bytes.is_none() {
            return;
        }
        st.account(end);
        while max.is_some_and(|m| st.ready(end) > m)
            || max_bytes.is_some_and(|m| st.ready_bytes() > m)
        {
            let Some(Ok(rec)) = st.next_ready(end) else {
                break;
            };
            let offset = rec.offset.0;
            settled.push(offset);
            st.settle_one(offset);
            if let Ok(meta) = codec::decode_meta(&rec.headers) {
                dead.push((stored_message(meta, rec.body), Reason::MaxLen));
            }
        }
    }

    /// Removes expired messages from the head of the queue. Returns when
    /// the next one expires, in milliseconds since the epoch, if any does.
    pub(crate) fn expire(self: &Arc<Self>) -> Option<u64> {
        let mut dead = Vec::new();
        let next = {
            let mut st = self.lock();
            let end = self.log.end().0;
            let now = Timestamp::now().0;
            let mut settled = Vec::new();
            let next = loop {
                let Some(Ok(rec)) = st.peek_ready(end) else {
                    break None;
                };
                let Ok(meta) = codec::decode_meta(&rec.headers) else {
                    break None;
                };
                match self.expires_at(&rec, &meta) {
                    Some(t) if t <= now => {
                        if let Some(Ok(rec)) = st.next_ready(end) {
                            settled.push(rec.offset.0);
                            st.settle_one(rec.offset.0);
                            dead.push((stored_message(meta, rec.body), Reason::Expired));
                        }
                    }
                    other => break other,
                }
            };
            if !settled.is_empty() {
                self.persist_settled(&mut st, &settled);
            }
            next
        };
        self.publish_dead(self.dead_lettered(dead));
        next
    }

    /// Fetches one message for `basic.get`.
    pub(crate) fn get(
        self: &Arc<Self>,
        channel: ChannelId,
        no_ack: bool,
    ) -> Result<Option<Fetched>, BrokerError> {
        if self.is_stream() {
            return Err(BrokerError::NotImplemented(format!(
                "basic.get not supported by stream queues queue '{}' in vhost '{}'",
                self.name, self.vhost
            )));
        }
        self.touch();
        let mut st = self.lock();
        let end = self.log.end().0;
        loop {
            let Some(rec) = st.next_ready(end) else {
                return Ok(None);
            };
            let rec = rec?;
            let offset = rec.offset.0;
            let Ok(meta) = codec::decode_meta(&rec.headers) else {
                st.settle_one(offset);
                self.persist_settled(&mut st, &[offset]);
                continue;
            };
            if self
                .expires_at(&rec, &meta)
                .is_some_and(|t| t <= Timestamp::now().0)
            {
                st.settle_one(offset);
                self.persist_settled(&mut st, &[offset]);
                let dead =
                    self.dead_lettered(vec![(stored_message(meta, rec.body), Reason::Expired)]);
                drop(st);
                self.publish_dead(dead);
                st = self.lock();
                continue;
            }
            let count = st.delivered.get(&offset).copied().unwrap_or(0);
            if no_ack {
                st.settle_one(offset);
                self.persist_settled(&mut st, &[offset]);
            } else {
                st.delivered.insert(offset, count + 1);
                self.persist_delivered(&mut st, &[offset]);
                st.unacked.insert(
                    offset,
                    Holder {
                        channel,
                        consumer: None,
                    },
                );
            }
            self.metrics.delivered.increment(1);
            if count > 0 {
                self.metrics.redelivered.increment(1);
            }
            self.observe(&st);
            let remaining = st.ready(end);
            return Ok(Some(Fetched {
                offset: rec.offset,
                delivery_count: count + meta.delivery_count,
                message: self.outgoing(meta, rec.body, count),
                redelivered: count > 0,
                remaining,
            }));
        }
    }

    /// Settles acknowledged messages. Offsets that are not unacked here are ignored.
    pub(crate) fn ack(self: &Arc<Self>, offsets: &[Offset]) {
        let mut st = self.lock();
        let done: Vec<u64> = st.take_unacked(offsets).iter().map(|o| o.0).collect();
        for o in &done {
            st.settle_one(*o);
        }
        self.metrics.acked.increment(done.len() as u64);
        self.persist_settled(&mut st, &done);
        drop(st);
        self.pump();
    }

    /// Returns unacked messages to the queue, ahead of newer ones, marked
    /// redelivered; a message past its delivery limit is dead-lettered instead.
    pub(crate) fn requeue(self: &Arc<Self>, offsets: &[Offset]) {
        let dead = {
            let mut st = self.lock();
            let mut over_limit = Vec::new();
            for o in st.take_unacked(offsets) {
                let delivered = u64::from(st.delivered.get(&o.0).copied().unwrap_or(0));
                if self
                    .policy
                    .delivery_limit
                    .is_some_and(|limit| delivered > limit)
                {
                    over_limit.push(o);
                } else {
                    st.requeue_one(o.0);
                }
            }
            self.settle_dead(&mut st, &over_limit, Reason::DeliveryLimit)
        };
        self.publish_dead(self.dead_lettered(dead));
        self.pump();
    }

    /// Settles rejected (not requeued) messages, dead-lettering them if the
    /// queue has a dead-letter exchange.
    pub(crate) fn reject(self: &Arc<Self>, offsets: &[Offset]) {
        let dead = {
            let mut st = self.lock();
            let taken = st.take_unacked(offsets);
            self.settle_dead(&mut st, &taken, Reason::Rejected)
        };
        self.publish_dead(self.dead_lettered(dead));
        self.pump();
    }

    /// Settles messages that are no longer unacked, reading them back for
    /// dead-lettering when the queue has somewhere to send them.
    fn settle_dead(
        &self,
        st: &mut QueueState,
        offsets: &[Offset],
        reason: Reason,
    ) -> Vec<(Message, Reason)> {
        let mut dead = Vec::new();
        if offsets.is_empty() {
            return dead;
        }
        for o in offsets {
            if self.policy.dead_letter_exchange.is_none() {
                self.metrics.died(reason, false);
            } else if let Some(Ok(rec)) = st.read_at(o.0) {
                if let Ok(meta) = codec::decode_meta(&rec.headers) {
                    dead.push((stored_message(meta, rec.body), reason));
                }
            }
            st.settle_one(o.0);
        }
        let raw: Vec<u64> = offsets.iter().map(|o| o.0).collect();
        self.persist_settled(st, &raw);
        dead
    }

    /// A channel closed: its consumers go, and its unacked messages return.
    pub(crate) fn release_channel(self: &Arc<Self>, channel: ChannelId) -> bool {
        if let Some(stream) = &self.stream {
            // Unacked deliveries simply lapse: a named consumer's commit
            // stays below them, so it sees them again when it returns.
            self.remove_stream_consumers(stream, |_, ch| ch == channel);
            return false;
        }
        let mut st = self.lock();
        st.consumers.retain(|c| c.channel != channel);
        self.touch();
        self.wake.notify_one();
        let back: Vec<u64> = st
            .unacked
            .iter()
            .filter(|(_, h)| h.channel == channel)
            .map(|(o, _)| *o)
            .collect();
        for o in back {
            st.unacked.remove(&o);
            st.requeue_one(o);
        }
        let auto_delete = self.auto_delete && st.ever_consumed && st.consumers.is_empty();
        drop(st);
        self.pump();
        auto_delete
    }

    /// Removes every ready message. Returns how many were removed.
    pub(crate) fn purge(self: &Arc<Self>) -> u64 {
        let mut st = self.lock();
        let end = self.log.end().0;
        let count = st.ready(end);
        st.window.clear();
        st.requeued.clear();
        st.priorities.clear();
        if let Some(groups) = st.groups.as_mut() {
            groups.purge();
        }
        if let Some(bytes) = st.bytes.as_mut() {
            bytes.ready = 0;
            bytes.accounted_to = end;
        }
        if st.unacked.is_empty() {
            st.floor = end;
            st.scan = end;
            st.settled.clear();
            st.delivered.clear();
        } else {
            for o in st.floor..end {
                if !st.unacked.contains_key(&o) {
                    st.settled.insert(o);
                }
            }
            st.scan = end;
            st.advance_floor();
        }
        self.checkpoint(&mut st);
        self.observe(&st);
        count
    }

    /// Marks the queue deleted and tells its consumers.
    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        if let Some(stream) = &self.stream {
            self.cancel_stream_consumers(stream);
        }
        let mut st = self.lock();
        for c in st.consumers.drain(..) {
            let _ = c.tx.send(QueueEvent::Cancelled {
                consumer_tag: c.tag,
            });
        }
        drop(st);
        self.wake.notify_one();
    }

    fn persist_settled(&self, st: &mut QueueState, offsets: &[u64]) {
        self.persist_offsets(st, ACKS, offsets);
    }

    fn persist_delivered(&self, st: &mut QueueState, offsets: &[u64]) {
        self.persist_offsets(st, DELIVERED, offsets);
    }

    fn persist_offsets(&self, st: &mut QueueState, kind: u8, offsets: &[u64]) {
        if offsets.is_empty() {
            return;
        }
        let mut body = BytesMut::with_capacity(1 + offsets.len() * 8);
        body.put_u8(kind);
        for o in offsets {
            body.put_u64_le(*o);
        }
        // A lost ack only causes a redelivery, so a failed write is not fatal.
        let _ = self.acks.append(&[StoredRecord {
            timestamp: Timestamp::now(),
            headers: Bytes::new(),
            body: body.freeze(),
        }]);
        st.acks_since_checkpoint += 1;
        if st.acks_since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoint(st);
        }
    }

    /// Writes the whole settled state as one record, then lets the ack log
    /// and the message log drop what lies below it.
    fn checkpoint(&self, st: &mut QueueState) {
        let mut body = BytesMut::with_capacity(17 + st.settled.len() * 8);
        body.put_u8(CHECKPOINT);
        body.put_u64_le(st.floor);
        body.put_u64_le(st.settled.len() as u64);
        for o in &st.settled {
            body.put_u64_le(*o);
        }
        body.put_u64_le(st.delivered.len() as u64);
        for (o, count) in &st.delivered {
            body.put_u64_le(*o);
            body.put_u32_le(*count);
        }
        let record = StoredRecord {
            timestamp: Timestamp::now(),
            headers: Bytes::new(),
            body: body.freeze(),
        };
        if let Ok(appended) = self.acks.append(&[record]) {
            st.acks_since_checkpoint = 0;
            // The checkpoint must be on disk before the records it replaces
            // go, or a power cut could lose acks older than the sync interval.
            if self.acks.sync().is_ok() {
                let _ = self.acks.delete_before(appended.offsets().start);
            }
        }
        let _ = self.log.delete_before(Offset(st.floor));
    }

    /// Fsyncs the ack log (on shutdown).
    pub(crate) fn sync(&self) {
        let _ = self.acks.sync();
    }
}

impl QueueState {
    fn ready(&self, end: u64) -> u64 {
        end.saturating_sub(self.floor)
            .saturating_sub(self.settled.len() as u64)
            .saturating_sub(self.unacked.len() as u64)
    }

    fn has_ready(&self, end: u64) -> bool {
        !self.requeued.is_empty()
            || self.scan < end
            || self.groups.as_ref().is_some_and(|g| g.has_runnable())
    }

    /// The consumer to deliver to next: highest priority first, round-robin
    /// among equals, only those with credit. Takes a unit of channel credit.
    /// Under single active consumer only the first registered one is a
    /// candidate; the others wait until it goes.
    fn pick_consumer(&mut self) -> Option<usize> {
        let n = if self.single_active {
            self.consumers.len().min(1)
        } else {
            self.consumers.len()
        };
        if n == 0 {
            return None;
        }
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (self.next_consumer + k) % n;
            let Some(c) = self.consumers.get(i) else {
                continue;
            };
            let has_credit = c.no_ack || c.prefetch == 0 || c.in_flight < c.prefetch;
            if !has_credit {
                continue;
            }
            let better = match best.and_then(|b| self.consumers.get(b)) {
                None => true,
                Some(b) => c.priority > b.priority,
            };
            if better {
                // Channel credit is checked last, and only for a candidate.
                if c.no_ack || c.credit.try_acquire() {
                    if let Some(prev) = best.and_then(|b| self.consumers.get(b)) {
                        if !prev.no_ack {
                            prev.credit.release(1);
                        }
                    }
                    best = Some(i);
                }
            }
        }
        let i = best?;
        self.next_consumer = (i + 1) % n;
        if let Some(c) = self.consumers.get_mut(i) {
            if !c.no_ack {
                c.in_flight += 1;
            }
        }
        Some(i)
    }

    fn release_pick(&mut self, i: usize) {
        if let Some(c) = self.consumers.get_mut(i) {
            if !c.no_ack {
                c.in_flight = c.in_flight.saturating_sub(1);
                c.credit.release(1);
            }
        }
    }

    /// Takes the given offsets out of the unacked map, releasing their
    /// consumers' credit. Offsets that are not unacked here are skipped.
    fn take_unacked(&mut self, offsets: &[Offset]) -> Vec<Offset> {
        let mut taken = Vec::with_capacity(offsets.len());
        for o in offsets {
            if let Some(holder) = self.unacked.remove(&o.0) {
                self.release_holder(holder);
                taken.push(*o);
            }
        }
        taken
    }

    fn release_holder(&mut self, holder: Holder) {
        if let Some(id) = holder.consumer {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
        }
    }

    /// Reads the record at offset `o` out of order.
    fn read_at(&mut self, o: u64) -> Option<Result<Record, BrokerError>> {
        let rec = self
            .random
            .seek(Offset(o))
            .and_then(|()| self.random.read(1, 1))
            .map_err(storage)
            .and_then(|mut v| {
                v.pop().ok_or_else(|| {
                    BrokerError::Storage(format!("message at offset {o} is missing"))
                })
            });
        Some(rec)
    }

    /// The message [`next_ready`](Self::next_ready) would return, left in place.
    fn peek_ready(&mut self, end: u64) -> Option<Result<Record, BrokerError>> {
        if self.max_priority.is_some() {
            if let Err(e) = self.absorb(end) {
                return Some(Err(e));
            }
        }
        if self.groups.is_some() {
            let o = self.reach_runnable(end)?;
            return match o {
                Ok(o) => self.read_at(o),
                Err(e) => Some(Err(e)),
            };
        }
        if let Some(&(_, o)) = self.requeued.first() {
            return self.read_at(o);
        }
        match self.reach_ready(end)? {
            Ok(()) => self.window.front().cloned().map(Ok),
            Err(e) => Some(Err(e)),
        }
    }

    /// The next message to deliver: requeued ones first, in offset order,
    /// then new ones from the scan position.
    fn next_ready(&mut self, end: u64) -> Option<Result<Record, BrokerError>> {
        // Counted in before taken out, so the byte count never runs short.
        self.account(end);
        let next = self.next_ready_untracked(end);
        if let (Some(Ok(rec)), Some(bytes)) = (&next, self.bytes.as_mut()) {
            let size = rec.body.len() as u64;
            bytes.ready = bytes.ready.saturating_sub(size);
            bytes.taken.insert(rec.offset.0, size);
        }
        next
    }

    /// The body bytes of the ready messages (0 unless the queue counts them).
    fn ready_bytes(&self) -> u64 {
        self.bytes.as_ref().map_or(0, |b| b.ready)
    }

    /// Counts the bodies of messages committed since the last call.
    fn account(&mut self, end: u64) {
        let Some(bytes) = self.bytes.as_mut() else {
            return;
        };
        while bytes.accounted_to < end {
            if bytes.reader.position().0 != bytes.accounted_to
                && bytes.reader.seek(Offset(bytes.accounted_to)).is_err()
            {
                return;
            }
            let Ok(batch) = bytes.reader.read(WINDOW_RECORDS, WINDOW_BYTES) else {
                return;
            };
            if batch.is_empty() {
                return;
            }
            for rec in batch {
                let o = rec.offset.0;
                bytes.accounted_to = o + 1;
                if o >= self.floor && !self.settled.contains(&o) && !self.unacked.contains_key(&o) {
                    bytes.ready += rec.body.len() as u64;
                }
            }
        }
    }

    fn next_ready_untracked(&mut self, end: u64) -> Option<Result<Record, BrokerError>> {
        if self.max_priority.is_some() {
            if let Err(e) = self.absorb(end) {
                return Some(Err(e));
            }
        }
        if self.groups.is_some() {
            return self.next_grouped(end);
        }
        if let Some((_, o)) = self.requeued.pop_first() {
            return self.read_at(o);
        }
        self.next_scanned(end)
    }

    /// The offset a grouped queue would deliver next, left in place: takes
    /// in scanned messages until some group (or a message without one) may
    /// deliver.
    fn reach_runnable(&mut self, end: u64) -> Option<Result<u64, BrokerError>> {
        loop {
            if let Some(o) = self.groups.as_ref()?.first() {
                return Some(Ok(o));
            }
            if let Err(e) = self.absorb_grouped(end)? {
                return Some(Err(e));
            }
        }
    }

    /// The next message of a grouped queue, its group now locked. Reads
    /// the scan only as far as the first message that may deliver, so a
    /// backlog is read once, as deliveries need it, never rescanned.
    fn next_grouped(&mut self, end: u64) -> Option<Result<Record, BrokerError>> {
        loop {
            if let Some(o) = self.groups.as_mut()?.take() {
                let rec = self.read_at(o);
                if let Some(Err(_)) = &rec {
                    // Not lost: it stays its group's next message.
                    if let Some(groups) = self.groups.as_mut() {
                        groups.put_back(o);
                    }
                }
                return rec;
            }
            let rec = match self.absorb_grouped(end)? {
                Ok(rec) => rec,
                Err(e) => return Some(Err(e)),
            };
            let groups = self.groups.as_mut()?;
            if groups.first() == Some(rec.offset.0) {
                // Runnable at once (nothing else was): no need to read it again.
                groups.take();
                return Some(Ok(rec));
            }
        }
    }

    /// Moves one scanned message into its group.
    fn absorb_grouped(&mut self, end: u64) -> Option<Result<Record, BrokerError>> {
        let rec = match self.next_scanned(end)? {
            Ok(rec) => rec,
            Err(e) => return Some(Err(e)),
        };
        let groups = self.groups.as_mut()?;
        // A record the codec cannot read has no group; delivery settles it.
        let key = codec::decode_meta(&rec.headers)
            .ok()
            .and_then(|meta| groups.group_of(&meta));
        groups.absorb(rec.offset.0, key);
        Some(Ok(rec))
    }

    /// The next unsettled message at the scan position, through the read-ahead window.
    fn next_scanned(&mut self, end: u64) -> Option<Result<Record, BrokerError>> {
        if let Err(e) = self.reach_ready(end)? {
            return Some(Err(e));
        }
        let rec = self.window.pop_front()?;
        self.scan += 1;
        Some(Ok(rec))
    }

    /// Moves the scan past settled messages until the window's front is the
    /// unsettled message at the scan position. `None` if there is none yet.
    fn reach_ready(&mut self, end: u64) -> Option<Result<(), BrokerError>> {
        while self.scan < end {
            if self.window.is_empty() {
                if self.reader.position().0 != self.scan {
                    if let Err(e) = self.reader.seek(Offset(self.scan)) {
                        return Some(Err(storage(e)));
                    }
                }
                match self.reader.read(WINDOW_RECORDS, WINDOW_BYTES) {
                    Ok(batch) if batch.is_empty() => return None,
                    Ok(batch) => self.window.extend(batch),
                    Err(e) => return Some(Err(storage(e))),
                }
            }
            let front = self.window.front()?.offset.0;
            if front != self.scan {
                self.window.clear();
                continue;
            }
            if self.settled.contains(&front) {
                self.window.pop_front();
                self.scan += 1;
                continue;
            }
            return Some(Ok(()));
        }
        None
    }

    /// Puts an unacked message back among the ready ones, in its priority's place.
    fn requeue_one(&mut self, o: u64) {
        if let Some(bytes) = self.bytes.as_mut() {
            if let Some(size) = bytes.taken.remove(&o) {
                bytes.ready += size;
            }
        }
        if let Some(groups) = self.groups.as_mut() {
            groups.put_back(o);
            return;
        }
        let priority = self.priorities.get(&o).copied().unwrap_or(0);
        self.requeued.insert((Reverse(priority), o));
    }

    /// Priority queues order every ready message by priority, so they take
    /// everything committed from the scan into the ordered set, reading each
    /// message's priority once. This costs an entry in memory per ready
    /// message, which is why it is only done for queues that ask for it.
    fn absorb(&mut self, end: u64) -> Result<(), BrokerError> {
        let max = self.max_priority.unwrap_or(0);
        while self.scan < end {
            let Some(rec) = self.next_scanned(end) else {
                break;
            };
            let rec = rec?;
            let priority = codec::decode_meta(&rec.headers)
                .ok()
                .and_then(|m| m.properties.priority)
                .unwrap_or(0)
                .min(max);
            self.priorities.insert(rec.offset.0, priority);
            self.requeued.insert((Reverse(priority), rec.offset.0));
        }
        Ok(())
    }

    fn settle_one(&mut self, o: u64) {
        if let Some(bytes) = self.bytes.as_mut() {
            bytes.taken.remove(&o);
        }
        self.delivered.remove(&o);
        self.priorities.remove(&o);
        if let Some(groups) = self.groups.as_mut() {
            groups.settle(o);
        }
        if o >= self.floor {
            self.settled.insert(o);
        }
        self.advance_floor();
    }

    fn advance_floor(&mut self) {
        while self.settled.remove(&self.floor) {
            self.floor += 1;
        }
        if self.scan < self.floor {
            self.scan = self.floor;
            self.window.clear();
        }
    }
}

fn stored_message(meta: StoredMeta, body: Bytes) -> Message {
    Message {
        exchange: meta.exchange,
        routing_key: meta.routing_key,
        properties: meta.properties,
        body,
    }
}

/// Applies one ack-log record to the settled state being rebuilt.
fn apply_ack_record(
    body: &Bytes,
    floor: &mut u64,
    settled: &mut BTreeSet<u64>,
    delivered: &mut HashMap<u64, u32>,
) {
    let mut b = body.clone();
    if !b.has_remaining() {
        return;
    }
    match b.get_u8() {
        ACKS => {
            while b.remaining() >= 8 {
                let o = b.get_u64_le();
                if o >= *floor {
                    settled.insert(o);
                }
                delivered.remove(&o);
            }
        }
        DELIVERED => {
            while b.remaining() >= 8 {
                *delivered.entry(b.get_u64_le()).or_insert(0) += 1;
            }
        }
        CHECKPOINT if b.remaining() >= 16 => {
            let f = b.get_u64_le();
            let n = b.get_u64_le();
            *floor = (*floor).max(f);
            for _ in 0..n {
                if b.remaining() < 8 {
                    break;
                }
                settled.insert(b.get_u64_le());
            }
            // A checkpoint states every delivery count in full.
            delivered.clear();
            if b.remaining() >= 8 {
                let n = b.get_u64_le();
                for _ in 0..n {
                    if b.remaining() < 12 {
                        break;
                    }
                    let o = b.get_u64_le();
                    delivered.insert(o, b.get_u32_le());
                }
            }
        }
        _ => {}
    }
}

/// Sleeps until `at` (milliseconds since the epoch), or forever if `None`.
async fn sleep_until_ms(at: Option<u64>) {
    match at {
        Some(at) => {
            let wait = at.saturating_sub(Timestamp::now().0);
            tokio::time::sleep(std::time::Duration::from_millis(wait.max(1))).await;
        }
        None => std::future::pending().await,
    }
}

/// Keeps delivering as messages arrive and expiring them when due, until the
/// queue is deleted.
pub(crate) async fn run(queue: Arc<Queue>) {
    if queue.is_stream() {
        return stream::run(queue).await;
    }
    let Ok(mut tail) = queue.log().reader(queue.log().end()) else {
        return;
    };
    loop {
        if queue.deleted.load(Ordering::Acquire) {
            return;
        }
        // Read the end before delivering: a commit that lands while the queue
        // delivers then wakes the wait below, instead of going unnoticed.
        let end = queue.log().end();
        queue.pump();
        let next_expiry = match (queue.expire(), queue.check_unused()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if tail.seek(end).is_err() {
            return;
        }
        tokio::select! {
            more = tail.wait_async() => {
                if !more {
                    // The log closed: the broker is shutting down.
                    return;
                }
            }
            _ = queue.wake.notified() => {}
            _ = sleep_until_ms(next_expiry) => {}
        }
    }
}
