//! Stream queues (`x-queue-type: stream`) over AMQP 0-9-1 with lapin.
//!
//! The RabbitMQ-compatible scenarios are differential (see
//! `target/mod.rs`): declaration refusals, the consume-time refusals
//! (prefetch required, no automatic acks; `basic.get` and `queue.purge` are
//! 540), every `x-stream-offset` form with the `x-stream-offset` delivery
//! header, acks granting credit, and a consumer that dies without acking
//! losing nothing. Nack and reject are acks on Tern (as in later RabbitMQ
//! versions); RabbitMQ 3.10 closes the connection with 540 instead, which
//! the RabbitMQ half of that scenario accepts. Named consumers
//! (`x-stream-consumer-name`, a Tern extension) run against Tern only.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use target::{reply_code, run_on, run_on_both, Target};

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn declare_stream(conn: &Connection, name: &str) {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        table(&[("x-queue-type", s("stream"))]),
    )
    .await
    .unwrap();
}

/// Publishes `bodies` one at a time, each confirmed before the next (so on
/// RabbitMQ each is its own chunk, which `last` depends on).
async fn publish_all(conn: &Connection, queue: &str, bodies: &[&str]) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for b in bodies {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
}

async fn consumer(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    args: &[(&str, AMQPValue)],
) -> (lapin::Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            table(args),
        )
        .await
        .unwrap();
    (ch, c)
}

async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the consumer is open")
        .unwrap()
}

async fn nothing_more(consumer: &mut lapin::Consumer) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await {
        panic!(
            "expected no delivery, got {:?}",
            d.map(|d| d.map(|d| d.data))
        );
    }
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

fn offset(d: &lapin::message::Delivery) -> i64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(o)) => o,
        other => panic!("expected an x-stream-offset long, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_declarations_are_refused_as_rabbitmq_refuses_them() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = t.connect().await;
        let name = t.queue("bad-stream");
        let attempt = |opts: QueueDeclareOptions, args: Vec<(&'static str, AMQPValue)>| {
            let (conn, name) = (&conn, name.clone());
            async move {
                let ch = conn.create_channel().await.unwrap();
                let mut all = vec![("x-queue-type", s("stream"))];
                all.extend(args);
                ch.queue_declare(name.as_str().into(), opts, table(&all))
                    .await
                    .unwrap_err()
            }
        };
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for (opts, needle) in [
            (QueueDeclareOptions::default(), "non-durable"),
            (
                QueueDeclareOptions {
                    exclusive: true,
                    ..durable
                },
                "exclusive",
            ),
            (
                QueueDeclareOptions {
                    auto_delete: true,
                    ..durable
                },
                "auto-delete",
            ),
        ] {
            let e = attempt(opts, vec![]).await;
            assert_eq!(reply_code(&e), Some(406), "{}: {e}", t.label);
            assert!(e.to_string().contains(needle), "{}: {e}", t.label);
        }
        for (arg, value) in [
            ("x-max-age", s("7X")),
            ("x-max-age", AMQPValue::LongInt(5)),
            ("x-max-length-bytes", AMQPValue::LongLongInt(-5)),
            ("x-stream-max-segment-size-bytes", s("big")),
            ("x-message-ttl", AMQPValue::LongInt(5)),
            ("x-max-length", AMQPValue::LongInt(5)),
            ("x-dead-letter-exchange", s("dlx")),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-overflow", s("reject-publish")),
        ] {
            let e = attempt(durable, vec![(arg, value)]).await;
            assert_eq!(reply_code(&e), Some(406), "{}: {e}", t.label);
            assert!(e.to_string().contains(arg), "{}: {e} names {arg}", t.label);
        }
        // RabbitMQ's interval units and the segment size are accepted.
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            name.as_str().into(),
            durable,
            table(&[
                ("x-queue-type", s("stream")),
                ("x-max-age", s("7D")),
                ("x-max-length-bytes", AMQPValue::LongLongInt(1 << 30)),
                (
                    "x-stream-max-segment-size-bytes",
                    AMQPValue::LongInt(1 << 20),
                ),
            ]),
        )
        .await
        .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_consumers_need_prefetch_and_manual_acks_and_get_and_purge_are_540() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = t.connect().await;
        let name = t.queue("stream");
        declare_stream(&conn, &name).await;
        publish_all(&conn, &name, &["m0"]).await;

        // No consumer prefetch (none, or only a channel-wide one): 406.
        for global in [None, Some(true)] {
            let ch = conn.create_channel().await.unwrap();
            if let Some(global) = global {
                ch.basic_qos(10, BasicQosOptions { global }).await.unwrap();
            }
            let e = ch
                .basic_consume(
                    name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap_err();
            assert_eq!(reply_code(&e), Some(406), "{}: {e}", t.label);
            assert!(
                e.to_string().contains("consumer prefetch count is not set"),
                "{}: {e}",
                t.label
            );
        }
        // The rest close the connection (540), each tried on a fresh one.
        let refusals: [(&str, &str); 3] = [
            (
                "no-ack",
                "automatic acknowledgement not supported by stream queues",
            ),
            ("get", "basic.get not supported by stream queues"),
            ("purge", "queue.purge not supported by stream queues"),
        ];
        for (what, needle) in refusals {
            let conn = t.connect().await;
            let ch = conn.create_channel().await.unwrap();
            ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
            let e = match what {
                "no-ack" => ch
                    .basic_consume(
                        name.as_str().into(),
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map(|_| ())
                    .unwrap_err(),
                "get" => ch
                    .basic_get(name.as_str().into(), BasicGetOptions::default())
                    .await
                    .map(|_| ())
                    .unwrap_err(),
                _ => ch
                    .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            };
            assert_eq!(reply_code(&e), Some(540), "{} {what}: {e}", t.label);
            assert!(e.to_string().contains(needle), "{} {what}: {e}", t.label);
        }
        // A bad offset spec is a 406 naming the argument.
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        let e = ch
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                table(&[("x-stream-offset", s("1x"))]),
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{}: {e}", t.label);
        assert!(
            e.to_string().contains("x-stream-offset"),
            "{}: {e}",
            t.label
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offset_spec_starts_where_rabbitmq_starts() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = t.connect().await;
        let name = t.queue("stream");
        declare_stream(&conn, &name).await;
        publish_all(&conn, &name, &["m0", "m1", "m2", "m3", "m4"]).await;
        let far_future = AMQPValue::Timestamp(u64::from(u32::MAX) * 2);
        for (spec, expected) in [
            (s("first"), vec!["m0", "m1", "m2", "m3", "m4"]),
            (AMQPValue::LongLongInt(3), vec!["m3", "m4"]),
            (
                AMQPValue::LongLongInt(-1),
                vec!["m0", "m1", "m2", "m3", "m4"],
            ),
            (AMQPValue::LongLongInt(1000), vec![]),
            (s("last"), vec!["m4"]),
            (s("next"), vec![]),
            (AMQPValue::Timestamp(0), vec!["m0", "m1", "m2", "m3", "m4"]),
            (far_future, vec![]),
            (s("1h"), vec!["m0", "m1", "m2", "m3", "m4"]),
        ] {
            let (ch, mut c) =
                consumer(&conn, &name, 10, &[("x-stream-offset", spec.clone())]).await;
            let mut got = Vec::new();
            for _ in 0..expected.len() {
                let d = next(&mut c).await;
                let at = offset(&d);
                assert_eq!(format!("m{at}"), body(&d), "{}: {spec:?}", t.label);
                got.push(body(&d));
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            assert_eq!(got, expected, "{}: {spec:?}", t.label);
            nothing_more(&mut c).await;
            ch.close(200, "done".into()).await.unwrap();
        }
        // No offset means "next": only what is published afterwards.
        let (_ch, mut c) = consumer(&conn, &name, 10, &[]).await;
        nothing_more(&mut c).await;
        publish_all(&conn, &name, &["m5"]).await;
        let d = next(&mut c).await;
        assert_eq!((body(&d), offset(&d)), ("m5".to_string(), 5), "{}", t.label);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_grant_credit_consumers_are_independent_and_nacks_are_acks_on_tern() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = t.connect().await;
        let name = t.queue("stream");
        declare_stream(&conn, &name).await;
        publish_all(&conn, &name, &["m0", "m1", "m2", "m3"]).await;
        let (a_ch, mut a) = consumer(&conn, &name, 2, &[("x-stream-offset", s("first"))]).await;
        let (_b_ch, mut b) = consumer(&conn, &name, 10, &[("x-stream-offset", s("first"))]).await;
        let d0 = next(&mut a).await;
        let d1 = next(&mut a).await;
        assert_eq!(
            (body(&d0), body(&d1)),
            ("m0".into(), "m1".into()),
            "{}",
            t.label
        );
        nothing_more(&mut a).await;
        // The other consumer reads everything from its own position.
        let mut all = Vec::new();
        for _ in 0..4 {
            let d = next(&mut b).await;
            all.push(body(&d));
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        assert_eq!(all, ["m0", "m1", "m2", "m3"], "{}", t.label);
        // An ack grants credit.
        d1.ack(BasicAckOptions::default()).await.unwrap();
        assert_eq!(body(&next(&mut a).await), "m2", "{}", t.label);
        nothing_more(&mut a).await;
        if t.broker().is_none() {
            // RabbitMQ 3.10 closes the connection on a nack or reject on a
            // stream; later versions treat them as acks, as Tern does.
            let e = d0
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .and(a_ch.basic_qos(2, BasicQosOptions::default()).await);
            if let Err(e) = e {
                assert_eq!(reply_code(&e), Some(540), "{}: {e}", t.label);
                return;
            }
        } else {
            // A nack with requeue frees credit but nothing comes back.
            d0.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .unwrap();
        }
        let d3 = next(&mut a).await;
        assert_eq!(
            (body(&d3), d3.redelivered),
            ("m3".into(), false),
            "{}",
            t.label
        );
        nothing_more(&mut a).await;
        publish_all(&conn, &name, &["m4"]).await;
        // A reject is an ack too.
        d3.reject(BasicRejectOptions { requeue: true })
            .await
            .unwrap();
        assert_eq!(body(&next(&mut a).await), "m4", "{}", t.label);
        nothing_more(&mut a).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_dies_without_acking_loses_nothing() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = t.connect().await;
        let name = t.queue("stream");
        declare_stream(&conn, &name).await;
        publish_all(&conn, &name, &["m0", "m1", "m2"]).await;
        {
            let doomed = t.connect().await;
            let (_ch, mut c) = consumer(
                &doomed,
                &name,
                10,
                &[("x-stream-offset", AMQPValue::LongLongInt(1))],
            )
            .await;
            assert_eq!(body(&next(&mut c).await), "m1", "{}", t.label);
            assert_eq!(body(&next(&mut c).await), "m2", "{}", t.label);
            // Gone without an ack.
            doomed.close(320, "dies".into()).await.unwrap();
        }
        let (_ch, mut c) = consumer(
            &conn,
            &name,
            10,
            &[("x-stream-offset", AMQPValue::LongLongInt(1))],
        )
        .await;
        assert_eq!(body(&next(&mut c).await), "m1", "{}", t.label);
        assert_eq!(body(&next(&mut c).await), "m2", "{}", t.label);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_consumer_resumes_from_its_committed_offset() {
    // `x-stream-consumer-name` is Tern's: RabbitMQ ignores it.
    run_on(
        Arc::new(Target::tern().await),
        &|t: Arc<Target>| async move {
            let conn = t.connect().await;
            let name = t.queue("stream");
            declare_stream(&conn, &name).await;
            publish_all(&conn, &name, &["m0", "m1", "m2", "m3", "m4"]).await;
            let named = [("x-stream-consumer-name", s("billing"))];
            {
                let doomed = t.connect().await;
                let (_ch, mut c) = consumer(
                    &doomed,
                    &name,
                    10,
                    &[named[0].clone(), ("x-stream-offset", s("first"))],
                )
                .await;
                let d: Vec<_> = [next(&mut c).await, next(&mut c).await, next(&mut c).await].into();
                d[0].ack(BasicAckOptions::default()).await.unwrap();
                d[1].ack(BasicAckOptions::default()).await.unwrap();
                // m2 is delivered, never acked: the connection dies.
                let broker = t.broker().unwrap();
                let offsets = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let o = broker.stream_offsets("/", &name).unwrap();
                        if o.consumers.first().and_then(|c| c.committed) == Some(2) {
                            return o;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .expect("the acks commit offset 2");
                assert_eq!(offsets.consumers[0].lag, 3);
                assert_eq!(offsets.end, 5);
                doomed.close(320, "dies".into()).await.unwrap();
            }
            // Attaching again by name alone resumes at the first unacked message.
            let (_ch, mut c) = consumer(&conn, &name, 10, &named).await;
            for expected in ["m2", "m3", "m4"] {
                let d = next(&mut c).await;
                assert_eq!(body(&d), expected);
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            nothing_more(&mut c).await;
            let o = t.broker().unwrap().stream_offsets("/", &name).unwrap();
            assert_eq!((o.consumers[0].committed, o.consumers[0].lag), (Some(5), 0));
        },
    )
    .await;
}
