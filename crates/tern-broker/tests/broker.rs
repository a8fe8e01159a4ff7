//! The broker engine, driven through its in-process API as a front door
//! would: declare, bind, publish with confirms, consume with prefetch,
//! acknowledge, reject, restart.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use bytes::Bytes;
use tern_broker::*;

fn message(exchange: &str, key: &str, body: &str) -> Message {
    Message {
        exchange: ExchangeName::new(exchange).unwrap(),
        routing_key: key.to_string(),
        properties: Properties {
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

async fn publish(broker: &Broker, exchange: &str, key: &str, body: &str) -> usize {
    let published = broker.publish("/", message(exchange, key, body)).unwrap();
    let routed = published.routed;
    published.confirmed().await.unwrap();
    routed
}

async fn next_delivery(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn no_delivery(ch: &mut Channel) {
    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(100), ch.recv()).await {
        panic!("expected no delivery, got {ev:?}");
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_receives_messages_in_order_and_acks_remove_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("orders"), conn)
        .await
        .unwrap();
    for i in 0..10 {
        assert_eq!(publish(&broker, "", "orders", &format!("m{i}")).await, 1);
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.consume("orders", ConsumeOptions::default()).unwrap();
    for i in 0..10 {
        let d = next_delivery(&mut ch).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(!d.redelivered);
        ch.ack(d.tag, false).unwrap();
    }
    let info = broker.queue_info("/", "orders").unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers), (0, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacked_deliveries_and_acks_release_more() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("q"), conn)
        .await
        .unwrap();
    for i in 0..5 {
        publish(&broker, "", "q", &format!("m{i}")).await;
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.qos(2, false);
    ch.consume("q", ConsumeOptions::default()).unwrap();
    let a = next_delivery(&mut ch).await;
    let b = next_delivery(&mut ch).await;
    no_delivery(&mut ch).await;
    ch.ack(b.tag, true).unwrap(); // multiple: acks a and b
    let c = next_delivery(&mut ch).await;
    let d = next_delivery(&mut ch).await;
    no_delivery(&mut ch).await;
    assert_eq!(
        (body(&a), body(&c), body(&d)),
        ("m0".into(), "m2".into(), "m3".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_wide_prefetch_is_shared_by_its_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    for q in ["q1", "q2"] {
        broker
            .declare_queue("/", QueueDeclare::new(q), conn)
            .await
            .unwrap();
        for i in 0..3 {
            publish(&broker, "", q, &format!("{q}-{i}")).await;
        }
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.qos(3, true);
    ch.consume("q1", ConsumeOptions::default()).unwrap();
    ch.consume("q2", ConsumeOptions::default()).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_delivery(&mut ch).await);
    }
    no_delivery(&mut ch).await;
    ch.ack(got[0].tag, false).unwrap();
    next_delivery(&mut ch).await;
    no_delivery(&mut ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_messages_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("work"), conn)
        .await
        .unwrap();
    let mut ch = broker.open_channel("/", conn).unwrap();
    let t1 = ch.consume("work", ConsumeOptions::default()).unwrap();
    let t2 = ch.consume("work", ConsumeOptions::default()).unwrap();
    for i in 0..6 {
        publish(&broker, "", "work", &format!("m{i}")).await;
    }
    let mut per = std::collections::HashMap::new();
    for _ in 0..6 {
        let d = next_delivery(&mut ch).await;
        *per.entry(d.consumer_tag.clone()).or_insert(0) += 1;
        ch.ack(d.tag, false).unwrap();
    }
    assert_eq!(per.get(&t1), Some(&3));
    assert_eq!(per.get(&t2), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_return_in_order_and_redelivered_when_the_channel_closes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("q"), conn)
        .await
        .unwrap();
    for i in 0..4 {
        publish(&broker, "", "q", &format!("m{i}")).await;
    }
    let mut first = broker.open_channel("/", conn).unwrap();
    first.consume("q", ConsumeOptions::default()).unwrap();
    let m0 = next_delivery(&mut first).await;
    let _m1 = next_delivery(&mut first).await;
    let _m2 = next_delivery(&mut first).await;
    first.ack(m0.tag, false).unwrap();
    drop(first); // m1, m2 (and m3 if it was sent) go back

    let mut second = broker.open_channel("/", conn).unwrap();
    second.consume("q", ConsumeOptions::default()).unwrap();
    let again: Vec<Delivery> = [
        next_delivery(&mut second).await,
        next_delivery(&mut second).await,
        next_delivery(&mut second).await,
    ]
    .into();
    assert_eq!(
        again.iter().map(body).collect::<Vec<_>>(),
        ["m1", "m2", "m3"]
    );
    assert!(again[0].redelivered && again[1].redelivered);
    assert_eq!(again[0].delivery_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_requeue_redelivers_and_without_requeue_drops() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("q"), conn)
        .await
        .unwrap();
    publish(&broker, "", "q", "a").await;
    publish(&broker, "", "q", "b").await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let a = ch.get("q", false).unwrap().unwrap();
    assert_eq!(a.message_count, 1);
    ch.nack(a.tag, false, true).unwrap();
    let a2 = ch.get("q", false).unwrap().unwrap();
    assert!(a2.redelivered);
    assert_eq!(&a2.message.body[..], b"a");
    ch.reject(a2.tag, false).unwrap();
    let b = ch.get("q", true).unwrap().unwrap();
    assert_eq!(&b.message.body[..], b"b");
    assert!(ch.get("q", false).unwrap().is_none());
    assert_eq!(
        ch.ack(DeliveryTag(999), false).unwrap_err().reply_code(),
        ReplyCode::PreconditionFailed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_route_by_kind_through_exchange_bindings_and_alternates() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    for q in ["all", "eu", "unrouted"] {
        broker
            .declare_queue("/", QueueDeclare::new(q), conn)
            .await
            .unwrap();
    }
    broker
        .declare_exchange("/", ExchangeDeclare::new("fallback", ExchangeKind::Fanout))
        .await
        .unwrap();
    let mut topic = ExchangeDeclare::new("events", ExchangeKind::Topic);
    topic.arguments.insert(
        "alternate-exchange".into(),
        FieldValue::String("fallback".into()),
    );
    broker.declare_exchange("/", topic).await.unwrap();
    broker
        .declare_exchange("/", ExchangeDeclare::new("fan", ExchangeKind::Fanout))
        .await
        .unwrap();
    let none = FieldTable::new();
    broker
        .bind_queue("/", "eu", "events", "orders.eu.*", &none, conn)
        .await
        .unwrap();
    broker
        .bind_exchange("/", "fan", "events", "orders.#", &none)
        .await
        .unwrap();
    broker
        .bind_queue("/", "all", "fan", "", &none, conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "unrouted", "fallback", "", &none, conn)
        .await
        .unwrap();

    assert_eq!(publish(&broker, "events", "orders.eu.placed", "1").await, 2);
    assert_eq!(publish(&broker, "events", "orders.us.placed", "2").await, 1);
    assert_eq!(publish(&broker, "events", "payments.done", "3").await, 1);
    assert_eq!(publish(&broker, "amq.direct", "nobody", "4").await, 0);
    let count = |q| broker.queue_info("/", q).unwrap().ready;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!((count("all"), count("eu"), count("unrouted")), (2, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_amqp_reply_code_they_map_to() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let owner = broker.new_connection_id();
    let other = broker.new_connection_id();
    let code = |e: BrokerError| e.reply_code();

    let mut excl = QueueDeclare::new("mine");
    excl.exclusive = true;
    broker.declare_queue("/", excl, owner).await.unwrap();
    let err = broker
        .declare_queue(
            "/",
            QueueDeclare {
                exclusive: true,
                ..QueueDeclare::new("mine")
            },
            other,
        )
        .await;
    assert_eq!(code(err.unwrap_err()), ReplyCode::ResourceLocked);
    let mut ch = broker.open_channel("/", other).unwrap();
    assert_eq!(
        code(ch.consume("mine", ConsumeOptions::default()).unwrap_err()),
        ReplyCode::ResourceLocked
    );

    assert_eq!(
        code(
            ch.consume("missing", ConsumeOptions::default())
                .unwrap_err()
        ),
        ReplyCode::NotFound
    );
    assert_eq!(
        code(
            broker
                .publish("/", message("missing", "k", "x"))
                .unwrap_err()
        ),
        ReplyCode::NotFound
    );

    broker
        .declare_queue("/", QueueDeclare::new("durable"), owner)
        .await
        .unwrap();
    let mut transient = QueueDeclare::new("durable");
    transient.durable = false;
    let err = broker
        .declare_queue("/", transient, owner)
        .await
        .unwrap_err();
    assert_eq!(code(err.clone()), ReplyCode::PreconditionFailed);
    assert!(err.to_string().contains("durable"), "{err}");

    let err = broker
        .declare_exchange(
            "/",
            ExchangeDeclare::new("amq.custom", ExchangeKind::Direct),
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), ReplyCode::AccessRefused);
    let err = broker
        .delete_exchange("/", "amq.topic", false)
        .await
        .unwrap_err();
    assert_eq!(code(err), ReplyCode::AccessRefused);

    let mut quorum = QueueDeclare::new("qq");
    quorum
        .arguments
        .insert("x-queue-type".into(), FieldValue::String("quorum".into()));
    quorum.exclusive = true;
    let err = broker.declare_queue("/", quorum, owner).await.unwrap_err();
    assert_eq!(code(err), ReplyCode::PreconditionFailed);

    let mut ttl = QueueDeclare::new("ttl");
    ttl.arguments
        .insert("x-queue-mode".into(), FieldValue::String("lazy".into()));
    assert_eq!(
        code(broker.declare_queue("/", ttl, owner).await.unwrap_err()),
        ReplyCode::NotImplemented
    );

    assert_eq!(
        code(
            QueueName::new("x".repeat(256))
                .map_err(BrokerError::from)
                .unwrap_err()
        ),
        ReplyCode::PreconditionFailed
    );
    assert_eq!(
        code(broker.open_channel("nope", owner).unwrap_err()),
        ReplyCode::NotAllowed
    );

    publish(&broker, "", "durable", "x").await;
    let err = broker
        .delete_queue("/", "durable", false, true, owner)
        .await
        .unwrap_err();
    assert_eq!(code(err), ReplyCode::PreconditionFailed);
    assert_eq!(broker.purge_queue("/", "durable", owner).unwrap(), 1);
    assert_eq!(
        broker
            .delete_queue("/", "durable", false, true, owner)
            .await
            .unwrap(),
        0
    );

    broker.connection_closed(owner).await.unwrap();
    assert_eq!(
        code(broker.queue_info("/", "mine").unwrap_err()),
        ReplyCode::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_definitions_and_unacked_messages_and_forgets_acked_ones() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_exchange("/", ExchangeDeclare::new("events", ExchangeKind::Topic))
            .await
            .unwrap();
        broker
            .declare_queue("/", QueueDeclare::new("keep"), conn)
            .await
            .unwrap();
        let mut transient = QueueDeclare::new("gone");
        transient.durable = false;
        broker.declare_queue("/", transient, conn).await.unwrap();
        broker
            .bind_queue("/", "keep", "events", "a.#", &FieldTable::new(), conn)
            .await
            .unwrap();
        for i in 0..100 {
            assert_eq!(publish(&broker, "events", "a.b", &format!("m{i}")).await, 1);
        }
        let mut ch = broker.open_channel("/", conn).unwrap();
        for _ in 0..40 {
            let m = ch.get("keep", false).unwrap().unwrap();
            ch.ack(m.tag, false).unwrap();
        }
        // Five more are delivered but never acked: they must come back.
        for _ in 0..5 {
            ch.get("keep", false).unwrap().unwrap();
        }
        drop(ch);
        broker.close().unwrap();
    }
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    assert_eq!(broker.queue_info("/", "keep").unwrap().ready, 60);
    assert_eq!(
        broker.queue_info("/", "gone").unwrap_err().reply_code(),
        ReplyCode::NotFound
    );
    assert_eq!(
        publish(&broker, "events", "a.c", "after").await,
        1,
        "the binding survived"
    );
    let mut ch = broker.open_channel("/", conn).unwrap();
    let first = ch.get("keep", false).unwrap().unwrap();
    assert_eq!(&first.message.body[..], b"m40");
    let redeclared = broker
        .declare_queue("/", QueueDeclare::new("keep"), conn)
        .await
        .unwrap();
    assert_eq!(redeclared.message_count, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_log_is_compacted_on_open_and_keeps_every_definition() {
    let dir = tempfile::tempdir().unwrap();
    let defs_dir = dir.path().join("store/logs/definitions");
    let segments = || {
        std::fs::read_dir(&defs_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_exchange("/", ExchangeDeclare::new("events", ExchangeKind::Topic))
            .await
            .unwrap();
        broker
            .declare_queue("/", QueueDeclare::new("kept"), conn)
            .await
            .unwrap();
        broker
            .bind_queue("/", "kept", "events", "a.*", &FieldTable::new(), conn)
            .await
            .unwrap();
        for i in 0..1500 {
            let name = format!("churn-{i}");
            broker
                .declare_queue("/", QueueDeclare::new(name.clone()), conn)
                .await
                .unwrap();
            broker
                .delete_queue("/", &name, false, false, conn)
                .await
                .unwrap();
        }
        broker.close().unwrap();
    }
    let before = segments();
    assert!(
        before > 2,
        "3000 events fill several segments, got {before}"
    );
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    broker.close().unwrap();
    let after = segments();
    assert!(
        after < before,
        "compaction dropped old segments: {before} -> {after}"
    );
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    assert_eq!(
        broker.queue_names("/").unwrap(),
        vec![QueueName::new("kept").unwrap()]
    );
    assert_eq!(
        publish(&broker, "events", "a.b", "x").await,
        1,
        "the binding survived compaction"
    );
}
