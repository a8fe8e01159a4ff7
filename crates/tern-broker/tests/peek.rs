//! `Broker::peek` against a model: after random publishes, gets with and
//! without ack, acks, requeues and rejects (on a plain queue and on a
//! priority queue), a peek returns exactly the model's ready messages in
//! delivery order (priority first, then publish order, returned messages
//! in their place), with `redelivered` and delivery counts right, and
//! changes nothing: the ready count stays, and the next get returns the
//! first peeked message.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use tern_broker::{
    Broker, BrokerConfig, DeliveryTag, ExchangeName, FieldTable, FieldValue, Message, Properties,
    QueueDeclare,
};

#[derive(Debug, Clone)]
enum Op {
    Publish { priority: u8 },
    Get,
    GetNoAck,
    Ack(Index),
    Requeue(Index),
    Reject(Index),
    Peek(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4).prop_map(|priority| Op::Publish { priority }),
        2 => Just(Op::Get),
        1 => Just(Op::GetNoAck),
        1 => any::<Index>().prop_map(Op::Ack),
        1 => any::<Index>().prop_map(Op::Requeue),
        1 => any::<Index>().prop_map(Op::Reject),
        2 => (1usize..8).prop_map(Op::Peek),
    ]
}

/// A message of the model: its sequence number (its body) and priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// Higher priority sorts first in a priority queue; 0 in a plain one.
    rank: std::cmp::Reverse<u8>,
    seq: u64,
}

#[derive(Default)]
struct Model {
    ready: BTreeMap<Key, u32>, // -> deliveries so far
    unacked: Vec<(DeliveryTag, Key, u32)>,
}

fn run(priority_queue: bool, ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        let mut declare = QueueDeclare::new("q");
        if priority_queue {
            let mut args = FieldTable::new();
            args.insert("x-max-priority".into(), FieldValue::I32(5));
            declare.arguments = args;
        }
        broker.declare_queue("/", declare, conn).await.unwrap();
        let mut ch = broker.open_channel("/", conn).unwrap();
        let mut model = Model::default();
        let mut seq = 0u64;
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Publish { priority } => {
                    let m = Message {
                        exchange: ExchangeName::default_exchange(),
                        routing_key: "q".into(),
                        properties: Properties {
                            priority: Some(*priority),
                            ..Properties::default()
                        },
                        body: Bytes::from(seq.to_string()),
                    };
                    broker.publish("/", m).unwrap().confirmed().await.unwrap();
                    let rank = std::cmp::Reverse(if priority_queue { *priority } else { 0 });
                    model.ready.insert(Key { rank, seq }, 0);
                    seq += 1;
                }
                Op::Get | Op::GetNoAck => {
                    let no_ack = matches!(op, Op::GetNoAck);
                    let got = ch.get("q", no_ack).unwrap();
                    let want = model.ready.pop_first();
                    match (got, want) {
                        (None, None) => {}
                        (Some(got), Some((key, count))) => {
                            assert_eq!(
                                got.message.body,
                                Bytes::from(key.seq.to_string()),
                                "step {step}"
                            );
                            assert_eq!(got.redelivered, count > 0, "step {step}");
                            if !no_ack {
                                model.unacked.push((got.tag, key, count + 1));
                            }
                        }
                        (got, want) => panic!("step {step}: got {got:?}, model {want:?}"),
                    }
                }
                Op::Ack(i) | Op::Requeue(i) | Op::Reject(i) => {
                    if model.unacked.is_empty() {
                        continue;
                    }
                    let (tag, key, count) = model.unacked.remove(i.index(model.unacked.len()));
                    match op {
                        Op::Ack(_) => ch.ack(tag, false).unwrap(),
                        Op::Requeue(_) => {
                            ch.reject(tag, true).unwrap();
                            model.ready.insert(key, count);
                        }
                        _ => ch.reject(tag, false).unwrap(),
                    }
                }
                Op::Peek(n) => {
                    let before = broker.queue_info("/", "q").unwrap();
                    let peeked = broker.peek("/", "q", *n, conn).unwrap();
                    let want: Vec<(&Key, &u32)> = model.ready.iter().take(*n).collect();
                    let got: Vec<String> = peeked
                        .iter()
                        .map(|p| String::from_utf8(p.message.body.to_vec()).unwrap())
                        .collect();
                    let expected: Vec<String> =
                        want.iter().map(|(k, _)| k.seq.to_string()).collect();
                    assert_eq!(got, expected, "step {step}: peek {n}");
                    for (p, (_, count)) in peeked.iter().zip(&want) {
                        assert_eq!(p.delivery_count, **count, "step {step}");
                        assert_eq!(p.redelivered, **count > 0, "step {step}");
                    }
                    let after = broker.queue_info("/", "q").unwrap();
                    assert_eq!(
                        after.ready, before.ready,
                        "step {step}: peek changed the queue"
                    );
                    assert_eq!(after.ready, model.ready.len() as u64, "step {step}");
                    assert_eq!(after.unacked, model.unacked.len() as u64, "step {step}");
                }
            }
        }
        ch.close();
        broker.close().unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn peek_shows_the_models_ready_messages(
        priority_queue in any::<bool>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(priority_queue, &ops);
    }
}
