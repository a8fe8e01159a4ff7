//! The broker engine behaves like a simple reference model of queues,
//! channels and acknowledgements.
//!
//! Random scripts run against a real broker and against the model at once:
//! publishes with confirms through a topic and a direct exchange (bound so
//! that one message may reach zero, one or two of three durable queues),
//! consumers on up to three channels with per-consumer prefetch (0 meaning
//! unlimited), channel-wide prefetch and priorities, `basic.get` with and
//! without ack, ack (single, multiple, and multiple with tag 0), nack and
//! reject with and without requeue, acks of unknown tags, cancel, recover,
//! closing channels, and restarts (the broker is closed and reopened on the
//! same directory; every channel goes away).
//!
//! The model holds, per queue, every unsettled message with the channel and
//! delivery tag holding it (if delivered and unacked) and how often it was
//! delivered, plus the set of settled messages; and, per channel, its
//! consumers, its prefetch settings, its next delivery tag and its unacked
//! deliveries. Deliveries are pushed to channels by each queue's task, so
//! after every step the test receives until the model says nothing more can
//! be delivered (no queue has a ready message and a consumer with credit),
//! then waits a little longer for stray deliveries. A delivery the model
//! expects that does not arrive within [`STALL`] fails the test. At that
//! quiescent point it checks:
//!
//! - every delivery is of a message that is ready in the model: never a
//!   settled one (acked, rejected without requeue, or fetched/consumed with
//!   no-ack), never one that is unacked on some channel, not even after a
//!   restart; and only to a consumer with per-consumer and channel credit;
//! - each queue hands out its ready messages lowest offset first (requeued
//!   ones before newer ones, in their original order): the messages a queue
//!   delivered during a step are the smallest of the messages ready at its
//!   start, and each channel receives them in increasing order;
//! - `redelivered` is set exactly when the message was delivered before, and
//!   `delivery_count` counts those deliveries, across restarts too (the ack
//!   log records deliveries, and a clean close fsyncs it);
//! - delivery tags count up from 1 per channel, over deliveries and gets;
//! - `queue_info`'s ready, unacked and consumer counts equal the model's;
//! - after a restart every unsettled message is ready, and at the end of the
//!   script a final restart and a full drain with `get` return exactly the
//!   unsettled messages, in order: nothing is lost, nothing comes back.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use tern_broker::*;

const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
const TOPIC: &str = "events";
const DIRECT: &str = "jobs";
/// The bindings: (queue, exchange, binding key).
const BINDINGS: [(usize, &str, &str); 6] = [
    (0, TOPIC, "a.*"),
    (1, TOPIC, "*.x"),
    (2, TOPIC, "#.y"),
    (0, DIRECT, "urgent"),
    (2, DIRECT, "urgent"),
    (1, DIRECT, "normal"),
];
/// What a script may publish to: (exchange, routing key, the queues it reaches).
const ROUTES: [(&str, &str, &[usize]); 8] = [
    (TOPIC, "a.x", &[0, 1]),
    (TOPIC, "a.y", &[0, 2]),
    (TOPIC, "b.x", &[1]),
    (TOPIC, "b.y", &[2]),
    (TOPIC, "c.z", &[]),
    (DIRECT, "urgent", &[0, 2]),
    (DIRECT, "normal", &[1]),
    (DIRECT, "other", &[]),
];
const CHANNELS: usize = 3;
/// How long a delivery the model expects may take before the test calls it stalled.
const STALL: Duration = Duration::from_secs(3);
/// How long the test waits, once the model expects nothing more, for stray deliveries.
const GRACE: Duration = Duration::from_millis(2);

#[derive(Debug, Clone)]
enum Op {
    /// Publishes `count` messages at once, then awaits every confirm.
    Publish {
        route: usize,
        count: usize,
    },
    /// `basic.qos` with `global` set.
    ChannelQos {
        ch: usize,
        prefetch: u16,
    },
    /// `basic.qos` per consumer, then `basic.consume`.
    Consume {
        ch: usize,
        queue: usize,
        prefetch: u16,
        no_ack: bool,
        priority: i32,
    },
    Get {
        ch: usize,
        queue: usize,
        no_ack: bool,
    },
    Ack {
        ch: usize,
        pick: Index,
        multiple: bool,
    },
    Nack {
        ch: usize,
        pick: Index,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        ch: usize,
        pick: Index,
        requeue: bool,
    },
    Cancel {
        ch: usize,
        pick: Index,
    },
    Recover {
        ch: usize,
    },
    Close {
        ch: usize,
    },
    /// Closes the broker and opens it again; with `channels_first` the
    /// channels are closed before the broker, otherwise after it.
    Restart {
        channels_first: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let ch = 0..CHANNELS;
    let queue = 0..QUEUES.len();
    let prefetch = prop_oneof![Just(0u16), 1u16..4];
    prop_oneof![
        8 => (0..ROUTES.len(), 1usize..4).prop_map(|(route, count)| Op::Publish { route, count }),
        1 => (ch.clone(), prefetch.clone()).prop_map(|(ch, prefetch)| Op::ChannelQos { ch, prefetch }),
        4 => (ch.clone(), queue.clone(), prefetch, prop::bool::weighted(0.15), 0i32..2).prop_map(
            |(ch, queue, prefetch, no_ack, priority)| Op::Consume { ch, queue, prefetch, no_ack, priority }
        ),
        3 => (ch.clone(), queue, prop::bool::weighted(0.3)).prop_map(|(ch, queue, no_ack)| Op::Get { ch, queue, no_ack }),
        5 => (ch.clone(), any::<Index>(), any::<bool>()).prop_map(|(ch, pick, multiple)| Op::Ack { ch, pick, multiple }),
        3 => (ch.clone(), any::<Index>(), any::<bool>(), any::<bool>())
            .prop_map(|(ch, pick, multiple, requeue)| Op::Nack { ch, pick, multiple, requeue }),
        2 => (ch.clone(), any::<Index>(), any::<bool>()).prop_map(|(ch, pick, requeue)| Op::Reject { ch, pick, requeue }),
        2 => (ch.clone(), any::<Index>()).prop_map(|(ch, pick)| Op::Cancel { ch, pick }),
        1 => ch.clone().prop_map(|ch| Op::Recover { ch }),
        2 => ch.prop_map(|ch| Op::Close { ch }),
        1 => any::<bool>().prop_map(|channels_first| Op::Restart { channels_first }),
    ]
}

/// An unsettled message of one queue.
#[derive(Debug)]
struct Msg {
    /// Index into [`ROUTES`]: how it was published.
    route: usize,
    /// The channel and delivery tag holding it, while delivered and unacked.
    holder: Option<(usize, u64)>,
    /// Deliveries (and gets with ack), over every run of the broker.
    deliveries: u32,
}

#[derive(Debug, Default)]
struct QueueModel {
    /// Unsettled messages by publish sequence, which is their log order.
    live: BTreeMap<u64, Msg>,
    /// Messages acked, rejected without requeue, or taken with no-ack.
    settled: BTreeSet<u64>,
}

impl QueueModel {
    fn ready(&self) -> Vec<u64> {
        self.live
            .iter()
            .filter(|(_, m)| m.holder.is_none())
            .map(|(s, _)| *s)
            .collect()
    }

    fn unacked(&self) -> usize {
        self.live.values().filter(|m| m.holder.is_some()).count()
    }
}

#[derive(Debug)]
struct ConsumerModel {
    queue: usize,
    prefetch: u16,
    no_ack: bool,
}

#[derive(Debug, Clone)]
struct Unacked {
    queue: usize,
    seq: u64,
    /// The consumer it went to, or `None` for a `get`.
    consumer: Option<String>,
}

/// An open channel and what the model knows about it.
#[derive(Debug)]
struct Slot {
    ch: Channel,
    next_tag: u64,
    global: u16,
    consumers: BTreeMap<String, ConsumerModel>,
    unacked: BTreeMap<u64, Unacked>,
}

impl Slot {
    /// Unacked deliveries to consumers: what the channel-wide prefetch counts.
    fn channel_in_flight(&self) -> usize {
        self.unacked
            .values()
            .filter(|u| u.consumer.is_some())
            .count()
    }

    fn consumer_in_flight(&self, tag: &str) -> usize {
        self.unacked
            .values()
            .filter(|u| u.consumer.as_deref() == Some(tag))
            .count()
    }

    fn has_credit(&self, tag: &str) -> bool {
        let Some(c) = self.consumers.get(tag) else {
            return false;
        };
        c.no_ack
            || ((c.prefetch == 0 || self.consumer_in_flight(tag) < usize::from(c.prefetch))
                && (self.global == 0 || self.channel_in_flight() < usize::from(self.global)))
    }
}

struct Harness {
    dir: PathBuf,
    broker: Option<Broker>,
    conn: ConnectionId,
    slots: Vec<Option<Slot>>,
    queues: Vec<QueueModel>,
    next_seq: u64,
    /// Per queue, the (channel, sequence) of each delivery received in this step.
    delivered: Vec<Vec<(usize, u64)>>,
    /// What is running, for failure messages.
    context: String,
}

fn message(route: usize, seq: u64) -> Message {
    let (exchange, key, _) = ROUTES[route];
    Message {
        exchange: ExchangeName::new(exchange).unwrap(),
        routing_key: key.to_string(),
        properties: Properties {
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body: Bytes::from(format!("m{seq}")),
    }
}

fn seq_of(message: &Message) -> u64 {
    std::str::from_utf8(&message.body)
        .ok()
        .and_then(|b| b.strip_prefix('m'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a message no script published: {message:?}"))
}

fn queue_index(name: &str) -> usize {
    QUEUES
        .iter()
        .position(|q| *q == name)
        .unwrap_or_else(|| panic!("a delivery from unknown queue {name}"))
}

/// Picks a tag among a channel's unacked deliveries; with `multiple`, one
/// pick in (unacked + 1) is tag 0, "everything". `None` when nothing is unacked.
fn pick_tag(slot: &Slot, pick: &Index, multiple: bool) -> Option<u64> {
    let n = slot.unacked.len();
    if n == 0 {
        return None;
    }
    let i = pick.index(if multiple { n + 1 } else { n });
    Some(slot.unacked.keys().nth(i).copied().unwrap_or(0))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Settle {
    Ack,
    Drop,
    Requeue,
}

impl Harness {
    async fn new(dir: &Path) -> Harness {
        let broker = Broker::open(BrokerConfig::new(dir)).unwrap();
        let conn = broker.new_connection_id();
        for q in QUEUES {
            broker
                .declare_queue("/", QueueDeclare::new(q), conn)
                .await
                .unwrap();
        }
        broker
            .declare_exchange("/", ExchangeDeclare::new(TOPIC, ExchangeKind::Topic))
            .await
            .unwrap();
        broker
            .declare_exchange("/", ExchangeDeclare::new(DIRECT, ExchangeKind::Direct))
            .await
            .unwrap();
        for (q, ex, key) in BINDINGS {
            broker
                .bind_queue("/", QUEUES[q], ex, key, &FieldTable::new(), conn)
                .await
                .unwrap();
        }
        Harness {
            dir: dir.to_path_buf(),
            broker: Some(broker),
            conn,
            slots: (0..CHANNELS).map(|_| None).collect(),
            queues: (0..QUEUES.len()).map(|_| QueueModel::default()).collect(),
            next_seq: 0,
            delivered: vec![Vec::new(); QUEUES.len()],
            context: String::new(),
        }
    }

    fn broker(&self) -> &Broker {
        self.broker.as_ref().unwrap()
    }

    /// The channel in slot `i`, opened if it is not.
    fn slot(&mut self, i: usize) -> &mut Slot {
        if self.slots[i].is_none() {
            let ch = self.broker().open_channel("/", self.conn).unwrap();
            self.slots[i] = Some(Slot {
                ch,
                next_tag: 1,
                global: 0,
                consumers: BTreeMap::new(),
                unacked: BTreeMap::new(),
            });
        }
        self.slots[i].as_mut().unwrap()
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish { route, count } => {
                let (_, _, targets) = ROUTES[route];
                let mut pending = Vec::new();
                for _ in 0..count {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let published = self.broker().publish("/", message(route, seq)).unwrap();
                    assert_eq!(
                        published.routed,
                        targets.len(),
                        "{}: message {seq} reached the wrong number of queues",
                        self.context
                    );
                    pending.push((seq, published));
                }
                for (seq, published) in pending {
                    published.confirmed().await.unwrap();
                    for &q in targets {
                        self.queues[q].live.insert(
                            seq,
                            Msg {
                                route,
                                holder: None,
                                deliveries: 0,
                            },
                        );
                    }
                }
            }
            Op::ChannelQos { ch, prefetch } => {
                let slot = self.slot(ch);
                slot.ch.qos(prefetch, true);
                slot.global = prefetch;
            }
            Op::Consume {
                ch,
                queue,
                prefetch,
                no_ack,
                priority,
            } => {
                let slot = self.slot(ch);
                slot.ch.qos(prefetch, false);
                let tag = slot
                    .ch
                    .consume(
                        QUEUES[queue],
                        ConsumeOptions {
                            no_ack,
                            priority,
                            ..ConsumeOptions::default()
                        },
                    )
                    .unwrap();
                let old = slot.consumers.insert(
                    tag.clone(),
                    ConsumerModel {
                        queue,
                        prefetch,
                        no_ack,
                    },
                );
                assert!(old.is_none(), "consumer tag {tag} given out twice");
            }
            Op::Get { ch, queue, no_ack } => self.get(ch, queue, no_ack),
            Op::Ack {
                ch,
                ref pick,
                multiple,
            } => self.settle(ch, pick, multiple, Settle::Ack),
            Op::Nack {
                ch,
                ref pick,
                multiple,
                requeue,
            } => self.settle(
                ch,
                pick,
                multiple,
                if requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                },
            ),
            Op::Reject {
                ch,
                ref pick,
                requeue,
            } => self.settle(
                ch,
                pick,
                false,
                if requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                },
            ),
            Op::Cancel { ch, ref pick } => {
                let slot = self.slot(ch);
                if slot.consumers.is_empty() {
                    assert!(!slot.ch.cancel("no-such-consumer"));
                } else {
                    let i = pick.index(slot.consumers.len());
                    let tag = slot.consumers.keys().nth(i).unwrap().clone();
                    assert!(slot.ch.cancel(&tag), "consumer {tag} should exist");
                    // Its unacked deliveries stay on the channel.
                    slot.consumers.remove(&tag);
                }
            }
            Op::Recover { ch } => {
                let slot = self.slot(ch);
                slot.ch.recover();
                let back: Vec<Unacked> = std::mem::take(&mut slot.unacked).into_values().collect();
                self.requeue(&back);
            }
            Op::Close { ch } => self.close(ch),
            Op::Restart { channels_first } => self.restart(channels_first).await,
        }
    }

    fn close(&mut self, ch: usize) {
        if let Some(slot) = self.slots[ch].take() {
            slot.ch.close();
            let back: Vec<Unacked> = slot.unacked.into_values().collect();
            self.requeue(&back);
        }
    }

    fn requeue(&mut self, back: &[Unacked]) {
        for u in back {
            let msg = self.queues[u.queue].live.get_mut(&u.seq).unwrap();
            msg.holder = None;
        }
    }

    fn get(&mut self, ch: usize, queue: usize, no_ack: bool) {
        let context = self.context.clone();
        let expected = self.queues[queue].ready().first().copied();
        self.slot(ch);
        let slot = self.slots[ch].as_mut().unwrap();
        let got = slot.ch.get(QUEUES[queue], no_ack).unwrap();
        let Some(got) = got else {
            assert_eq!(
                expected, None,
                "{context}: get on {} found nothing, but message {expected:?} is ready",
                QUEUES[queue]
            );
            return;
        };
        let seq = seq_of(&got.message);
        let tag = slot.next_tag;
        slot.next_tag += 1;
        assert_eq!(
            got.tag,
            DeliveryTag(tag),
            "{context}: delivery tags count up"
        );
        let qm = &self.queues[queue];
        assert!(
            !qm.settled.contains(&seq),
            "{context}: get on {} returned settled message {seq}",
            QUEUES[queue]
        );
        assert_eq!(
            Some(seq),
            expected,
            "{context}: get on {} must return the lowest ready message",
            QUEUES[queue]
        );
        let msg = &qm.live[&seq];
        assert_eq!(got.message, message(msg.route, seq), "{context}: content");
        assert_eq!(
            (got.redelivered, got.delivery_count),
            (msg.deliveries > 0, msg.deliveries),
            "{context}: get of message {seq} from {}: redelivered flag and delivery count",
            QUEUES[queue]
        );
        assert_eq!(
            got.message_count,
            self.queues[queue].ready().len() as u64 - 1,
            "{context}: get's message count is what stays ready"
        );
        let qm = &mut self.queues[queue];
        if no_ack {
            qm.live.remove(&seq);
            qm.settled.insert(seq);
        } else {
            let msg = qm.live.get_mut(&seq).unwrap();
            msg.holder = Some((ch, tag));
            msg.deliveries += 1;
            slot.unacked.insert(
                tag,
                Unacked {
                    queue,
                    seq,
                    consumer: None,
                },
            );
        }
    }

    fn settle(&mut self, ch: usize, pick: &Index, multiple: bool, how: Settle) {
        let context = self.context.clone();
        let slot = self.slot(ch);
        let Some(tag) = pick_tag(slot, pick, multiple) else {
            // Nothing is unacked: a tag never given out is a channel error.
            let bogus = DeliveryTag(slot.next_tag);
            let err = match how {
                Settle::Ack => slot.ch.ack(bogus, multiple),
                Settle::Drop => slot.ch.nack(bogus, multiple, false),
                Settle::Requeue => slot.ch.nack(bogus, multiple, true),
            }
            .unwrap_err();
            assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{context}");
            return;
        };
        match how {
            Settle::Ack => slot.ch.ack(DeliveryTag(tag), multiple),
            Settle::Drop => slot.ch.nack(DeliveryTag(tag), multiple, false),
            Settle::Requeue => slot.ch.nack(DeliveryTag(tag), multiple, true),
        }
        .unwrap();
        let taken: Vec<Unacked> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            let rest = slot.unacked.split_off(&upto.saturating_add(1));
            std::mem::replace(&mut slot.unacked, rest)
                .into_values()
                .collect()
        } else {
            vec![slot.unacked.remove(&tag).unwrap()]
        };
        if how == Settle::Requeue {
            self.requeue(&taken);
        } else {
            for u in taken {
                let qm = &mut self.queues[u.queue];
                qm.live.remove(&u.seq).unwrap();
                qm.settled.insert(u.seq);
            }
        }
    }

    /// Closes the broker and opens it again. Closing the channels first, one
    /// by one, hands each one's unacked messages to the consumers of the
    /// channels still open; closing the broker first stops every queue, and
    /// the channels dropped afterwards return their messages to no one.
    async fn restart(&mut self, channels_first: bool) {
        if channels_first {
            for ch in 0..CHANNELS {
                if self.slots[ch].is_some() {
                    self.close(ch);
                    self.quiesce().await;
                }
            }
        }
        let slots: Vec<Slot> = self.slots.iter_mut().filter_map(Option::take).collect();
        self.broker.take().unwrap().close().unwrap();
        drop(slots);
        let broker = Broker::open(BrokerConfig::new(&self.dir)).unwrap();
        self.conn = broker.new_connection_id();
        self.broker = Some(broker);
        for qm in &mut self.queues {
            for msg in qm.live.values_mut() {
                msg.holder = None;
            }
        }
    }

    /// Receives every event waiting on any channel and checks it against the
    /// model. Returns whether there was any.
    fn receive_available(&mut self) -> bool {
        let mut any = false;
        for i in 0..CHANNELS {
            while let Some(event) = self.slots[i].as_mut().and_then(|s| s.ch.try_recv()) {
                any = true;
                self.accept(i, event);
            }
        }
        any
    }

    fn accept(&mut self, i: usize, event: ChannelEvent) {
        let context = &self.context;
        let ChannelEvent::Delivery(d) = event else {
            panic!("{context}: unexpected event on channel {i}: {event:?}");
        };
        let slot = self.slots[i].as_mut().unwrap();
        let tag = slot.next_tag;
        slot.next_tag += 1;
        assert_eq!(d.tag, DeliveryTag(tag), "{context}: delivery tags count up");
        let queue = queue_index(d.queue.as_str());
        let seq = seq_of(&d.message);
        let qm = &mut self.queues[queue];
        assert!(
            !qm.settled.contains(&seq),
            "{context}: settled message {seq} of {} delivered again on channel {i}",
            d.queue
        );
        let Some(msg) = qm.live.get(&seq) else {
            panic!("{context}: message {seq} was never routed to {}", d.queue);
        };
        assert_eq!(
            msg.holder, None,
            "{context}: message {seq} of {} delivered on channel {i} while unacked (channel, tag)",
            d.queue
        );
        assert_eq!(d.message, message(msg.route, seq), "{context}: content");
        let Some(consumer) = slot.consumers.get(&d.consumer_tag) else {
            panic!(
                "{context}: delivery on channel {i} for consumer {} it does not have",
                d.consumer_tag
            );
        };
        assert_eq!(consumer.queue, queue, "{context}: consumer's queue");
        assert!(
            slot.has_credit(&d.consumer_tag),
            "{context}: delivery of {seq} to consumer {} on channel {i} beyond its prefetch \
             ({} of {}) or the channel's ({} of {})",
            d.consumer_tag,
            slot.consumer_in_flight(&d.consumer_tag),
            consumer.prefetch,
            slot.channel_in_flight(),
            slot.global
        );
        assert_eq!(
            (d.redelivered, d.delivery_count),
            (msg.deliveries > 0, msg.deliveries),
            "{context}: delivery of message {seq} from {}: redelivered flag and delivery count",
            d.queue
        );
        self.delivered[queue].push((i, seq));
        if consumer.no_ack {
            qm.live.remove(&seq);
            qm.settled.insert(seq);
        } else {
            let msg = qm.live.get_mut(&seq).unwrap();
            msg.holder = Some((i, tag));
            msg.deliveries += 1;
            slot.unacked.insert(
                tag,
                Unacked {
                    queue,
                    seq,
                    consumer: Some(d.consumer_tag),
                },
            );
        }
    }

    /// A queue that has a ready message and a consumer with credit for it.
    fn deliverable(&self) -> Option<usize> {
        (0..QUEUES.len()).find(|&q| {
            self.queues[q].live.values().any(|m| m.holder.is_none())
                && self.slots.iter().flatten().any(|s| {
                    s.consumers
                        .iter()
                        .any(|(tag, c)| c.queue == q && s.has_credit(tag))
                })
        })
    }

    /// Receives deliveries until the model expects no more, then checks
    /// delivery order and the queues' counts.
    async fn quiesce(&mut self) {
        let ready_before: Vec<Vec<u64>> = self.queues.iter().map(QueueModel::ready).collect();
        for d in &mut self.delivered {
            d.clear();
        }
        let deadline = Instant::now() + STALL;
        loop {
            self.receive_available();
            if let Some(q) = self.deliverable() {
                assert!(
                    Instant::now() < deadline,
                    "{}: deliveries stalled: {} has ready messages {:?} and a consumer with credit",
                    self.context,
                    QUEUES[q],
                    self.queues[q].ready()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            tokio::time::sleep(GRACE).await;
            if !self.receive_available() {
                break;
            }
        }
        for (q, delivered) in self.delivered.iter().enumerate() {
            let mut seqs: Vec<u64> = delivered.iter().map(|(_, s)| *s).collect();
            seqs.sort_unstable();
            assert_eq!(
                Some(&seqs[..]),
                ready_before[q].get(..seqs.len()),
                "{}: {} must deliver its lowest ready messages first (ready were {:?})",
                self.context,
                QUEUES[q],
                ready_before[q]
            );
            for ch in 0..CHANNELS {
                let on: Vec<u64> = delivered
                    .iter()
                    .filter(|(c, _)| *c == ch)
                    .map(|(_, s)| *s)
                    .collect();
                assert!(
                    on.windows(2).all(|w| w[0] < w[1]),
                    "{}: {} delivered out of order on channel {ch}: {on:?}",
                    self.context,
                    QUEUES[q]
                );
            }
        }
        self.check_counts();
    }

    fn check_counts(&self) {
        for (q, qm) in self.queues.iter().enumerate() {
            let info = self.broker().queue_info("/", QUEUES[q]).unwrap();
            let consumers = self
                .slots
                .iter()
                .flatten()
                .map(|s| s.consumers.values().filter(|c| c.queue == q).count())
                .sum::<usize>();
            assert_eq!(
                (info.ready, info.unacked, info.consumers),
                (
                    qm.ready().len() as u64,
                    qm.unacked() as u64,
                    consumers as u32
                ),
                "{}: queue_info of {} (ready, unacked, consumers)",
                self.context,
                QUEUES[q]
            );
        }
    }

    /// Restarts, then fetches everything: exactly the unsettled messages, in order.
    async fn final_drain(&mut self) {
        self.restart(true).await;
        let mut ch = self.broker().open_channel("/", self.conn).unwrap();
        for (q, qm) in self.queues.iter().enumerate() {
            let mut got = Vec::new();
            while let Some(m) = ch.get(QUEUES[q], false).unwrap() {
                let seq = seq_of(&m.message);
                if let Some(msg) = qm.live.get(&seq) {
                    assert_eq!(
                        (m.redelivered, m.delivery_count),
                        (msg.deliveries > 0, msg.deliveries),
                        "message {seq} of {}: delivery count after the final restart",
                        QUEUES[q]
                    );
                }
                got.push(seq);
            }
            let expected: Vec<u64> = qm.live.keys().copied().collect();
            assert_eq!(
                got, expected,
                "after the final restart {} must hold exactly its unsettled messages",
                QUEUES[q]
            );
        }
        ch.close();
        self.broker.take().unwrap().close().unwrap();
    }
}

fn run(ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(dir.path()).await;
        for (i, op) in ops.iter().enumerate() {
            h.context = format!("step {i} ({op:?})");
            h.apply(op).await;
            h.quiesce().await;
        }
        h.context = "the final drain".into();
        h.final_drain().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 512,
        // A stalled delivery costs `STALL` per shrinking step.
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_broker_behaves_like_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
