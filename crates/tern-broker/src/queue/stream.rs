//! A stream queue at run time: its consumers, each reading the message log
//! from its own position, and the offsets committed by named consumers.
//!
//! A stream reuses its queue's two logs: the message log (never trimmed by
//! acks, only by retention, whole segments at a time) and the ack log,
//! which here holds commit records `(name, offset)` instead of settled
//! offsets. Acks delete nothing: they grant the consumer credit (prefetch
//! is required, as in RabbitMQ) and, for a named consumer, move its
//! committed offset to the lowest offset it has not acked yet. Commits are
//! written with the ack log's durability (fsynced every 50 ms): a crash can
//! lose the last few, which only means redelivery, as at-least-once allows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tern_storage::{Log, Message as StoredRecord, Offset, Reader, Timestamp};
use tokio::sync::mpsc;

use super::{
    codec, storage, stored_message, ChannelCredit, ChannelId, ConsumerId, ConsumerSpec, Queue,
    QueueEvent, QueuedDelivery,
};
use crate::error::BrokerError;
use crate::stream::{
    ConsumerName, OffsetSpec, StreamConsumerOffset, StreamOffsets, StreamPolicy,
    CONSUMER_NAME_ARGUMENT, OFFSET_ARGUMENT,
};
use crate::super_stream::{active_member, GroupAssignment, SINGLE_ACTIVE_ARGUMENT};
use crate::value::{FieldTable, FieldValue};

/// A commit record of the ack log: kind, offset, then the consumer's name.
const COMMIT: u8 = 3;
/// Records read from the log per consumer per pass.
const READ_RECORDS: usize = 256;
const READ_BYTES: usize = 1 << 20;
/// How often retention runs without appends crossing a segment (age-based
/// retention needs a clock, not only appends).
const RETENTION_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct StreamConsumer {
    id: ConsumerId,
    tag: String,
    channel: ChannelId,
    prefetch: u32,
    name: Option<ConsumerName>,
    /// A member of the consumer group `name` (`x-single-active-consumer`):
    /// receives only while it is the group's active consumer here.
    single_active: bool,
    /// Where it asked to start, used if it becomes its group's active
    /// consumer before the group has committed anything.
    spec: Option<OffsetSpec>,
    /// The next offset to send.
    next: u64,
    reader: Reader,
    /// Sent and not acked yet.
    outstanding: BTreeSet<u64>,
    tx: mpsc::UnboundedSender<QueueEvent>,
    credit: Arc<ChannelCredit>,
}

impl StreamConsumer {
    /// What a named consumer has committed by now: everything below the
    /// lowest offset it holds unacked, or below its next offset.
    fn commit_point(&self) -> u64 {
        self.outstanding.first().copied().unwrap_or(self.next)
    }
}

#[derive(Debug)]
struct Inner {
    consumers: Vec<StreamConsumer>,
    committed: BTreeMap<ConsumerName, u64>,
    /// Per consumer group, the member that holds this stream: the one that
    /// receives, or the previous one while its deliveries are in flight.
    active: BTreeMap<ConsumerName, ConsumerId>,
    /// Commit records in the ack log, for deciding when to rewrite it.
    commit_records: u64,
    /// The segment count when retention last ran.
    segments: usize,
}

/// A stream's run-time state, held by its [`Queue`].
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) policy: StreamPolicy,
    inner: Mutex<Inner>,
}

impl Stream {
    /// Opens the stream's state, replaying committed offsets from `commits`.
    pub(crate) fn open(
        policy: StreamPolicy,
        log: &Log,
        commits: &Log,
    ) -> Result<Stream, BrokerError> {
        let mut committed = BTreeMap::new();
        let mut records = 0u64;
        let mut reader = commits.reader(commits.start()).map_err(storage)?;
        loop {
            let batch = reader.read(1024, 4 << 20).map_err(storage)?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                if let Some((name, offset)) = decode_commit(&rec.body) {
                    committed.insert(name, offset);
                    records += 1;
                }
            }
        }
        let stream = Stream {
            policy,
            inner: Mutex::new(Inner {
                consumers: Vec::new(),
                committed,
                active: BTreeMap::new(),
                commit_records: records,
                segments: log.segment_count(),
            }),
        };
        stream.compact(commits);
        Ok(stream)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites the commit log as one record per name once it holds many
    /// times more records than names (on open only, as dedup does).
    fn compact(&self, commits: &Log) {
        let mut inner = self.lock();
        let live = inner.committed.len() as u64;
        if inner.commit_records <= 2 * live + 1024 {
            return;
        }
        let records: Vec<StoredRecord> = inner
            .committed
            .iter()
            .map(|(name, offset)| commit_record(name, *offset))
            .collect();
        if records.is_empty() {
            return;
        }
        if let Ok(appended) = commits.append(&records) {
            // The rewrite must be on disk before the records it replaces go.
            if commits.sync().is_ok() {
                let _ = commits.delete_before(appended.offsets().start);
                inner.commit_records = live;
            }
        }
    }
}

/// Reads a stream consumer's `x-single-active-consumer` (a boolean).
fn single_active_argument(args: &FieldTable) -> Result<bool, BrokerError> {
    match args.get(SINGLE_ACTIVE_ARGUMENT) {
        None => Ok(false),
        Some(FieldValue::Bool(b)) => Ok(*b),
        Some(v) => Err(BrokerError::InvalidArgument {
            argument: SINGLE_ACTIVE_ARGUMENT.into(),
            reason: format!("expected a boolean, got a {}", v.type_name()),
        }),
    }
}

fn commit_record(name: &ConsumerName, offset: u64) -> StoredRecord {
    let mut body = BytesMut::with_capacity(9 + name.as_str().len());
    body.put_u8(COMMIT);
    body.put_u64_le(offset);
    body.put_slice(name.as_str().as_bytes());
    StoredRecord {
        timestamp: Timestamp::now(),
        headers: Bytes::new(),
        body: body.freeze(),
    }
}

fn decode_commit(body: &Bytes) -> Option<(ConsumerName, u64)> {
    let mut b = body.clone();
    if b.remaining() < 9 || b.get_u8() != COMMIT {
        return None;
    }
    let offset = b.get_u64_le();
    let name = std::str::from_utf8(&b).ok()?;
    Some((ConsumerName::new(name).ok()?, offset))
}

impl Queue {
    fn stream(&self) -> Option<&Stream> {
        self.stream.as_ref()
    }

    /// Whether this queue is a stream.
    pub(crate) fn is_stream(&self) -> bool {
        self.stream.is_some()
    }

    fn stream_entity(&self) -> String {
        format!("queue '{}' in vhost '{}'", self.name, self.vhost)
    }

    /// Where a new consumer starts: a named consumer's committed offset,
    /// else its `x-stream-offset`, else the end (RabbitMQ's default, `next`).
    ///
    /// The commit wins over `x-stream-offset`, as a Kafka group's committed
    /// offset wins over `auto.offset.reset`: a client can then always send
    /// "first" (say) and get "resume where my name left off, or from the
    /// start the first time", which AMQP has no other way to ask for. It is
    /// also what a consumer group's member gets. To read again from
    /// elsewhere, a consumer attaches under another name.
    fn stream_start(
        &self,
        spec: Option<OffsetSpec>,
        committed: Option<u64>,
    ) -> Result<Reader, BrokerError> {
        let (start, end) = (self.log.start().0, self.log.end().0);
        let at = |o: u64| {
            self.log
                .reader(Offset(o.clamp(start, end)))
                .map_err(storage)
        };
        if let Some(committed) = committed {
            return at(committed);
        }
        match spec {
            None => at(end),
            Some(OffsetSpec::First) => at(start),
            Some(OffsetSpec::Last) => at(end.saturating_sub(1)),
            Some(OffsetSpec::Next) => at(end),
            Some(OffsetSpec::Offset(o)) => at(o),
            Some(OffsetSpec::Timestamp(ms)) => {
                self.log.reader_at_time(Timestamp(ms)).map_err(storage)
            }
            Some(OffsetSpec::Ago(d)) => {
                let since = Timestamp::now().0.saturating_sub(d.as_millis() as u64);
                self.log.reader_at_time(Timestamp(since)).map_err(storage)
            }
        }
    }

    /// Attaches a stream consumer (RabbitMQ's refusals: no automatic acks,
    /// a consumer prefetch is required).
    pub(crate) fn add_stream_consumer(
        self: &Arc<Self>,
        stream: &Stream,
        spec: ConsumerSpec,
    ) -> Result<(), BrokerError> {
        if spec.no_ack {
            return Err(BrokerError::NotImplemented(format!(
                "automatic acknowledgement not supported by stream queues {}",
                self.stream_entity()
            )));
        }
        if spec.prefetch == 0 {
            return Err(BrokerError::PreconditionFailed(format!(
                "consumer prefetch count is not set for '{}'",
                self.stream_entity()
            )));
        }
        let offset = OffsetSpec::from_arguments(&spec.arguments)?;
        let name = ConsumerName::from_arguments(&spec.arguments)?;
        let single_active = single_active_argument(&spec.arguments)?;
        if single_active && name.is_none() {
            return Err(BrokerError::InvalidArgument {
                argument: SINGLE_ACTIVE_ARGUMENT.into(),
                reason: format!(
                    "a single active stream consumer needs {CONSUMER_NAME_ARGUMENT}, \
                     the name of its group"
                ),
            });
        }
        let mut inner = stream.lock();
        if let Some(name) = &name {
            // Members of one group share the name; anything else may not.
            if let Some(other) = inner
                .consumers
                .iter()
                .find(|c| c.name.as_ref() == Some(name) && !(c.single_active && single_active))
            {
                let why = if other.single_active || single_active {
                    format!("; a group's members must all set {SINGLE_ACTIVE_ARGUMENT} to true")
                } else {
                    String::new()
                };
                return Err(BrokerError::PreconditionFailed(format!(
                    "a consumer named '{name}' is already attached to {}{why}",
                    self.stream_entity()
                )));
            }
        }
        let committed = name.as_ref().and_then(|n| inner.committed.get(n).copied());
        let reader = self.stream_start(offset, committed)?;
        inner.consumers.push(StreamConsumer {
            id: spec.id,
            tag: spec.tag,
            channel: spec.channel,
            prefetch: spec.prefetch,
            name,
            single_active,
            spec: offset,
            next: reader.position().0,
            reader,
            outstanding: BTreeSet::new(),
            tx: spec.tx,
            credit: spec.credit,
        });
        drop(inner);
        self.metrics.consumers.set(self.consumer_count() as f64);
        self.pump();
        Ok(())
    }

    /// Sends each consumer what its credit allows, from its own position.
    pub(crate) fn pump_stream(self: &Arc<Self>, stream: &Stream) {
        let mut inner = stream.lock();
        let (start, end) = (self.log.start().0, self.log.end().0);
        let (commits, receiving) = self.rebalance(stream, &mut inner);
        if !commits.is_empty() {
            // As with acks' commits, a lost one only means redelivery.
            let _ = self.acks.append(&commits);
        }
        let mut gone = Vec::new();
        let mut delivered = 0u64;
        for c in inner.consumers.iter_mut() {
            if c.single_active && !receiving.contains(&c.id) {
                continue;
            }
            if c.next < start {
                // Retention removed what it had not read yet.
                c.next = start;
            }
            'consumer: while c.next < end {
                let room = c.prefetch.saturating_sub(c.outstanding.len() as u32) as usize;
                if room == 0 {
                    break;
                }
                if c.reader.position().0 != c.next && c.reader.seek(Offset(c.next)).is_err() {
                    break;
                }
                let Ok(batch) = c.reader.read(room.min(READ_RECORDS), READ_BYTES) else {
                    // Damage is reported by the reader; stop rather than skip.
                    break;
                };
                if batch.is_empty() {
                    break;
                }
                for rec in batch {
                    let offset = rec.offset.0;
                    if !c.credit.try_acquire() {
                        // The channel-wide limit: read again from here later.
                        c.reader.seek(Offset(offset)).ok();
                        break 'consumer;
                    }
                    c.next = offset + 1;
                    let Ok(meta) = codec::decode_meta(&rec.headers) else {
                        // Not written by this broker version: skipped, not sent as garbage.
                        c.credit.release(1);
                        continue;
                    };
                    let mut message = stored_message(meta, rec.body);
                    message
                        .properties
                        .headers
                        .get_or_insert_with(FieldTable::new)
                        .insert(
                            OFFSET_ARGUMENT.into(),
                            FieldValue::I64(i64::try_from(offset).unwrap_or(i64::MAX)),
                        );
                    c.outstanding.insert(offset);
                    let delivery = QueuedDelivery {
                        queue: Arc::clone(self),
                        consumer_tag: c.tag.clone(),
                        consumer: c.id,
                        offset: rec.offset,
                        redelivered: false,
                        delivery_count: 0,
                        message,
                        settled: false,
                        took_credit: true,
                    };
                    delivered += 1;
                    if c.tx.send(QueueEvent::Delivery(delivery)).is_err() {
                        gone.push(c.id);
                        break 'consumer;
                    }
                }
            }
        }
        inner.consumers.retain(|c| !gone.contains(&c.id));
        self.metrics.delivered.increment(delivered);
    }

    /// Settles deliveries of a stream consumer. Ack, nack and reject are
    /// all the same here (RabbitMQ ignores requeue on streams): they return
    /// credit and, for a named consumer, commit. Acks of a consumer that is
    /// gone are ignored.
    pub(crate) fn settle_stream(self: &Arc<Self>, consumer: ConsumerId, offsets: &[Offset]) {
        let Some(stream) = self.stream() else {
            return;
        };
        let commit = {
            let mut inner = stream.lock();
            let Some(c) = inner.consumers.iter_mut().find(|c| c.id == consumer) else {
                return;
            };
            let mut acked = 0u64;
            for o in offsets {
                acked += u64::from(c.outstanding.remove(&o.0));
            }
            self.metrics.acked.increment(acked);
            match c.name.clone() {
                Some(name) => {
                    let point = c.commit_point();
                    if inner.committed.get(&name) != Some(&point) {
                        inner.committed.insert(name.clone(), point);
                        inner.commit_records += 1;
                        Some(commit_record(&name, point))
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some(record) = commit {
            // A lost commit only means a redelivery, so a failed write is not fatal.
            let _ = self.acks.append(&[record]);
        }
        self.pump();
    }

    /// Detaches stream consumers: one by id, or every one of a channel.
    /// The task then hands their groups' partitions on.
    pub(crate) fn remove_stream_consumers(
        &self,
        stream: &Stream,
        which: impl Fn(ConsumerId, ChannelId) -> bool,
    ) {
        stream.lock().consumers.retain(|c| !which(c.id, c.channel));
        self.metrics.consumers.set(self.consumer_count() as f64);
        self.wake.notify_one();
    }

    /// Brings every consumer group's active member in line with the rule
    /// (`super_stream::active_member` over the members in arrival order).
    /// A member losing the stream keeps it, receiving nothing more, until
    /// its in-flight deliveries are settled (or it is gone); only then does
    /// the next one start, at the group's committed offset, so no message
    /// is processed by two members at once or out of order. Returns the
    /// commit records to write (a group's first start point) and the
    /// members that may receive now.
    fn rebalance(
        &self,
        stream: &Stream,
        inner: &mut Inner,
    ) -> (Vec<StoredRecord>, Vec<ConsumerId>) {
        let partition = stream.policy.partition.unwrap_or(0);
        let mut records = Vec::new();
        let mut receiving = Vec::new();
        let groups: BTreeSet<ConsumerName> = inner
            .consumers
            .iter()
            .filter(|c| c.single_active)
            .filter_map(|c| c.name.clone())
            .chain(inner.active.keys().cloned())
            .collect();
        for group in groups {
            let members: Vec<ConsumerId> = inner
                .consumers
                .iter()
                .filter(|c| c.single_active && c.name.as_ref() == Some(&group))
                .map(|c| c.id)
                .collect();
            let target = active_member(partition, members.len()).map(|i| members[i]);
            let current = inner.active.get(&group).copied();
            if current != target {
                let draining = current.is_some_and(|cur| {
                    inner
                        .consumers
                        .iter()
                        .any(|c| c.id == cur && !c.outstanding.is_empty())
                });
                if draining {
                    continue;
                }
                let Some(t) = target else {
                    inner.active.remove(&group);
                    continue;
                };
                inner.active.insert(group.clone(), t);
                let committed = inner.committed.get(&group).copied();
                let end = self.log.end().0;
                let Some(c) = inner.consumers.iter_mut().find(|c| c.id == t) else {
                    continue;
                };
                let at = match committed {
                    Some(o) => o,
                    None => self
                        .stream_start(c.spec, None)
                        .map_or(end, |r| r.position().0),
                };
                c.next = at;
                c.outstanding.clear();
                if committed.is_none() {
                    // The group's position from now on, even if this member
                    // goes before acking anything.
                    inner.committed.insert(group.clone(), at);
                    inner.commit_records += 1;
                    records.push(commit_record(&group, at));
                }
            }
            if let Some(t) = target {
                if inner.active.get(&group) == Some(&t) {
                    receiving.push(t);
                }
            }
        }
        (records, receiving)
    }

    /// Each consumer group's members and active member, for inspection.
    pub(crate) fn stream_groups(&self) -> Vec<GroupAssignment> {
        let Some(stream) = self.stream() else {
            return Vec::new();
        };
        let partition = stream.policy.partition.unwrap_or(0);
        let inner = stream.lock();
        let mut groups: BTreeMap<ConsumerName, Vec<(ConsumerId, String)>> = BTreeMap::new();
        for c in inner.consumers.iter().filter(|c| c.single_active) {
            if let Some(name) = &c.name {
                groups
                    .entry(name.clone())
                    .or_default()
                    .push((c.id, c.tag.clone()));
            }
        }
        groups
            .into_iter()
            .map(|(group, members)| {
                let target = active_member(partition, members.len()).map(|i| members[i].0);
                let active = members
                    .iter()
                    .find(|(id, _)| Some(*id) == target && inner.active.get(&group) == Some(id))
                    .map(|(_, tag)| tag.clone());
                GroupAssignment {
                    committed: inner.committed.get(&group).copied(),
                    members: members.into_iter().map(|(_, tag)| tag).collect(),
                    active,
                    group,
                }
            })
            .collect()
    }

    pub(crate) fn stream_consumer_count(&self, stream: &Stream) -> usize {
        stream.lock().consumers.len()
    }

    /// Cancels every consumer (the stream was deleted).
    pub(crate) fn cancel_stream_consumers(&self, stream: &Stream) {
        for c in stream.lock().consumers.drain(..) {
            let _ = c.tx.send(QueueEvent::Cancelled {
                consumer_tag: c.tag,
            });
        }
    }

    /// Applies the stream's retention as of `now`. Returns how many
    /// segments it deleted.
    pub(crate) fn apply_stream_retention(&self, now: Timestamp) -> Result<u64, BrokerError> {
        let Some(stream) = self.stream() else {
            return Ok(0);
        };
        let deleted = self
            .log
            .apply_retention(&stream.policy.retention, now)
            .map_err(storage)?;
        stream.lock().segments = self.log.segment_count();
        Ok(deleted)
    }

    /// Where the stream starts and ends, and where each consumer is.
    pub(crate) fn stream_offsets(&self) -> Option<StreamOffsets> {
        let stream = self.stream()?;
        let inner = stream.lock();
        let (first, end) = (self.log.start().0, self.log.end().0);
        let lag = |from: u64| end.saturating_sub(from.max(first));
        let mut consumers: Vec<StreamConsumerOffset> = inner
            .consumers
            .iter()
            .map(|c| {
                let committed = c
                    .name
                    .as_ref()
                    .and_then(|n| inner.committed.get(n).copied());
                StreamConsumerOffset {
                    name: c.name.clone(),
                    consumer_tag: Some(c.tag.clone()),
                    next: Some(c.next),
                    committed,
                    lag: lag(if c.name.is_some() {
                        committed.unwrap_or(c.next)
                    } else {
                        c.next
                    }),
                }
            })
            .collect();
        for (name, offset) in &inner.committed {
            if !inner
                .consumers
                .iter()
                .any(|c| c.name.as_ref() == Some(name))
            {
                consumers.push(StreamConsumerOffset {
                    name: Some(name.clone()),
                    consumer_tag: None,
                    next: None,
                    committed: Some(*offset),
                    lag: lag(*offset),
                });
            }
        }
        Some(StreamOffsets {
            first,
            end,
            consumers,
        })
    }
}

/// A stream's task: delivers as the log grows, and applies retention after
/// appends start a new segment and every [`RETENTION_EVERY`].
pub(crate) async fn run(queue: Arc<Queue>) {
    let Ok(mut tail) = queue.log().reader(queue.log().end()) else {
        return;
    };
    let mut next_retention = tokio::time::Instant::now();
    loop {
        if queue.deleted.load(Ordering::Acquire) {
            return;
        }
        let end = queue.log().end();
        queue.pump();
        let crossed = queue
            .stream()
            .is_some_and(|s| s.lock().segments != queue.log().segment_count());
        if crossed || tokio::time::Instant::now() >= next_retention {
            let _ = queue.apply_stream_retention(Timestamp::now());
            next_retention = tokio::time::Instant::now() + RETENTION_EVERY;
        }
        if tail.seek(end).is_err() {
            // Retention moved the start past the tail; wait from the new end.
            let Ok(t) = queue.log().reader(queue.log().end()) else {
                return;
            };
            tail = t;
        }
        tokio::select! {
            more = tail.wait_async() => {
                if !more {
                    return;
                }
            }
            _ = queue.wake.notified() => {}
            _ = tokio::time::sleep_until(next_retention) => {}
        }
    }
}
