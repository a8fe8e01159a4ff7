//! Super streams and consumer groups over AMQP 0-9-1 with lapin, against
//! Tern only: RabbitMQ has no `x-super-stream` exchange type over AMQP (its
//! super streams are made with its CLI or stream protocol, and its single
//! active consumer per stream exists only in the stream protocol).
//!
//! The scenario: a super stream of four partitions; keyed messages published
//! with confirms land on their key's hash partition; two instances of a
//! consumer group attach to every partition; the first dies without acking
//! what it holds, and the second takes over its partitions and sees every
//! message it had not acked, each key's messages in order, none twice.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ExchangeKind};
use target::{run_on, Target};
use tern_broker::super_stream::partition_of;
use tokio::sync::mpsc;

const PARTITIONS: u32 = 4;
const KEYS: usize = 12;
const PER_KEY: usize = 10;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// One group member: a channel with a consumer on every partition, whose
/// deliveries arrive, tagged with their partition, on one queue.
struct Member {
    _channel: lapin::Channel,
    deliveries: mpsc::UnboundedReceiver<(u32, lapin::message::Delivery)>,
}

async fn join(conn: &Connection, super_stream: &str, prefetch: u16) -> Member {
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let (tx, deliveries) = mpsc::unbounded_channel();
    for p in 0..PARTITIONS {
        let mut consumer = channel
            .basic_consume(
                format!("{super_stream}-{p}").as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                table(&[
                    ("x-single-active-consumer", AMQPValue::Boolean(true)),
                    ("x-stream-consumer-name", s("workers")),
                    ("x-stream-offset", s("first")),
                ]),
            )
            .await
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                if tx.send((p, d)).is_err() {
                    return;
                }
            }
        });
    }
    Member {
        _channel: channel,
        deliveries,
    }
}

async fn next(m: &mut Member) -> (u32, lapin::message::Delivery) {
    tokio::time::timeout(Duration::from_secs(5), m.deliveries.recv())
        .await
        .expect("a delivery within 5 s")
        .expect("the member's consumers are open")
}

async fn nothing_more(m: &mut Member) {
    if let Ok(Some((p, d))) =
        tokio::time::timeout(Duration::from_millis(300), m.deliveries.recv()).await
    {
        panic!(
            "expected no delivery, got {:?} from partition {p}",
            String::from_utf8_lossy(&d.data)
        );
    }
}

/// A body `key:seq` split into its key and sequence number.
fn parse(d: &lapin::message::Delivery) -> (String, usize) {
    let body = String::from_utf8(d.data.clone()).unwrap();
    let (key, seq) = body.split_once(':').unwrap();
    (key.to_string(), seq.parse().unwrap())
}

/// Waits until the broker reports `want` as each partition's active member
/// (`Some(i)`: the i-th of the group's members in arrival order).
async fn wait_for_assignment(
    t: &Target,
    name: &str,
    want: impl Fn(u32) -> Option<usize>,
) -> tern_broker::SuperStreamInfo {
    let broker = t.broker().unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let info = broker.super_stream("/", name).unwrap();
            let ok = info.partitions.iter().all(|p| {
                let g = p.groups.iter().find(|g| g.group.as_str() == "workers");
                match (g, want(p.index)) {
                    (Some(g), Some(i)) => {
                        g.active.is_some() && g.active.as_ref() == g.members.get(i)
                    }
                    (g, None) => g.is_none_or(|g| g.active.is_none()),
                    (None, Some(_)) => false,
                }
            });
            if ok {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the expected assignment within 5 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_member_takes_over_and_sees_every_message_in_order_per_key() {
    run_on(
        Arc::new(Target::tern().await),
        &|t: Arc<Target>| async move {
            let conn = t.connect().await;
            let name = t.exchange("orders");
            let ch = conn.create_channel().await.unwrap();
            ch.exchange_declare(
                name.as_str().into(),
                ExchangeKind::Custom("x-super-stream".into()),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                table(&[("x-partitions", AMQPValue::LongInt(PARTITIONS as i32))]),
            )
            .await
            .unwrap();
            // A bad partition count is a channel error naming the argument.
            let bad = conn.create_channel().await.unwrap();
            let e = bad
                .exchange_declare(
                    t.missing("bad").as_str().into(),
                    ExchangeKind::Custom("x-super-stream".into()),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    table(&[("x-partitions", AMQPValue::LongInt(0))]),
                )
                .await
                .unwrap_err();
            assert!(e.to_string().contains("x-partitions"), "{e}");

            // Keyed messages, confirmed, interleaved across keys.
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut per_partition = [0u64; PARTITIONS as usize];
            for seq in 0..PER_KEY {
                for k in 0..KEYS {
                    let key = format!("customer-{k}");
                    let confirm = ch
                        .basic_publish(
                            name.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions::default(),
                            format!("{key}:{seq}").as_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    assert!(confirm.is_ack());
                    per_partition[partition_of(key.as_bytes(), PARTITIONS) as usize] += 1;
                }
            }
            let broker = t.broker().unwrap();
            for (p, n) in per_partition.iter().enumerate() {
                let q = broker.queue_info("/", &format!("{name}-{p}")).unwrap();
                assert_eq!(q.ready, *n, "partition {p} holds its keys' messages");
            }

            // A joins first and holds every partition; it acks the first two
            // deliveries of each partition and keeps the rest unacked.
            let doomed = t.connect().await;
            let mut a = join(&doomed, &name, 5).await;
            wait_for_assignment(&t, &name, |_| Some(0)).await;
            let mut processed: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let mut seen_by_a: BTreeMap<u32, usize> = BTreeMap::new();
            let busy = per_partition.iter().filter(|n| **n > 0).count();
            let mut firsts = 0;
            while firsts < 5 * busy {
                let (p, d) = next(&mut a).await;
                firsts += 1;
                let n = seen_by_a.entry(p).or_default();
                *n += 1;
                if *n <= 2 {
                    let (key, seq) = parse(&d);
                    processed.entry(key).or_default().push(seq);
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
            }

            // B joins: it is due partitions 1 and 3, but A still holds
            // unacked messages there, so nobody receives from them yet.
            let survivor = t.connect().await;
            let mut b = join(&survivor, &name, 10).await;
            nothing_more(&mut b).await;
            let info = broker.super_stream("/", &name).unwrap();
            for p in &info.partitions {
                let g = &p.groups[0];
                assert_eq!(g.members.len(), 2);
                if p.index % 2 == 1 && seen_by_a.get(&p.index).is_some_and(|n| *n > 2) {
                    assert_eq!(g.active, None, "partition {} is handed over", p.index);
                }
            }

            // A dies without acking: B takes every partition and resumes at
            // each one's committed offset.
            doomed.close(320, "killed".into()).await.unwrap();
            drop(a);
            // B is now the only member, so index 0 of the members.
            wait_for_assignment(&t, &name, |_| Some(0)).await;
            let total = KEYS * PER_KEY;
            while processed.values().map(Vec::len).sum::<usize>() < total {
                let (_, d) = next(&mut b).await;
                let (key, seq) = parse(&d);
                processed.entry(key).or_default().push(seq);
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            nothing_more(&mut b).await;
            // Every key's messages, each once, in publish order.
            assert_eq!(processed.len(), KEYS);
            for (key, seqs) in &processed {
                assert_eq!(seqs, &(0..PER_KEY).collect::<Vec<_>>(), "{key}");
            }
            let info = broker.super_stream("/", &name).unwrap();
            for (p, n) in info.partitions.iter().zip(per_partition) {
                assert_eq!(p.groups[0].committed, Some(n));
            }

            // Deleting the super stream deletes its partitions.
            ch.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .unwrap();
            assert!(broker.queue_info("/", &format!("{name}-0")).is_err());
        },
    )
    .await;
}
