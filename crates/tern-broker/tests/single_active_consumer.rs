//! Single active consumer (`x-single-active-consumer: true`), driven through
//! the broker's in-process API: one consumer receives at a time, the next
//! takes over when it is cancelled or its channel closes, and the messages
//! it had not acknowledged come back first, in their original order.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use bytes::Bytes;
use tern_broker::*;

fn message(key: &str, body: &str) -> Message {
    Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: key.to_string(),
        properties: Properties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

async fn publish(broker: &Broker, key: &str, body: &str) {
    let published = broker.publish("/", message(key, body)).unwrap();
    assert_eq!(published.routed, 1);
    published.confirmed().await.unwrap();
}

async fn next_delivery(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn no_delivery(ch: &mut Channel) {
    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(150), ch.recv()).await {
        panic!("expected no delivery, got {ev:?}");
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

fn sac_queue(name: &str) -> QueueDeclare {
    let mut d = QueueDeclare::new(name);
    d.arguments
        .insert("x-single-active-consumer".into(), FieldValue::Bool(true));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_consumer_receives_and_a_cancel_hands_over_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", sac_queue("sac"), conn)
        .await
        .unwrap();
    let mut first = broker.open_channel("/", conn).unwrap();
    let mut second = broker.open_channel("/", conn).unwrap();
    first.qos(3, false);
    let first_tag = first.consume("sac", ConsumeOptions::default()).unwrap();
    second.consume("sac", ConsumeOptions::default()).unwrap();
    for i in 0..6 {
        publish(&broker, "sac", &format!("m{i}")).await;
    }
    // The first consumer gets its prefetch; the second, although it has
    // credit to spare, gets nothing while the first is active.
    let got: Vec<Delivery> = vec![
        next_delivery(&mut first).await,
        next_delivery(&mut first).await,
        next_delivery(&mut first).await,
    ];
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["m0", "m1", "m2"]);
    no_delivery(&mut second).await;
    first.ack(got[0].tag, false).unwrap();
    assert_eq!(body(&next_delivery(&mut first).await), "m3");
    no_delivery(&mut second).await;

    // Cancelling the active consumer with m1, m2, m3 unacked: they go back
    // and the second consumer gets them first, in order, then the rest.
    assert!(first.cancel(&first_tag));
    let mut order = Vec::new();
    for _ in 0..5 {
        let d = next_delivery(&mut second).await;
        order.push((body(&d), d.redelivered));
        second.ack(d.tag, false).unwrap();
    }
    assert_eq!(
        order,
        [
            ("m1".to_string(), true),
            ("m2".to_string(), true),
            ("m3".to_string(), true),
            ("m4".to_string(), false),
            ("m5".to_string(), false),
        ]
    );
    // The old consumer's late acks are ignored rather than settling the
    // messages the new consumer now holds, and are not a channel error.
    first.ack(got[1].tag, false).unwrap();
    first.ack(got[2].tag, true).unwrap();
    no_delivery(&mut first).await;
    let info = broker.queue_info("/", "sac").unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers), (0, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_active_consumers_channel_activates_the_next_in_registration_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", sac_queue("sac"), conn)
        .await
        .unwrap();
    let mut a = broker.open_channel("/", conn).unwrap();
    let mut b = broker.open_channel("/", conn).unwrap();
    let mut c = broker.open_channel("/", conn).unwrap();
    a.consume("sac", ConsumeOptions::default()).unwrap();
    b.consume("sac", ConsumeOptions::default()).unwrap();
    // A higher priority does not take over: registration order decides.
    c.consume(
        "sac",
        ConsumeOptions {
            priority: 10,
            ..ConsumeOptions::default()
        },
    )
    .unwrap();
    for i in 0..4 {
        publish(&broker, "sac", &format!("m{i}")).await;
    }
    for i in 0..4 {
        assert_eq!(body(&next_delivery(&mut a).await), format!("m{i}"));
    }
    no_delivery(&mut b).await;
    no_delivery(&mut c).await;
    a.close();
    for i in 0..4 {
        let d = next_delivery(&mut b).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(d.redelivered);
        if i < 2 {
            b.ack(d.tag, false).unwrap();
        }
    }
    no_delivery(&mut c).await;
    drop(b);
    for i in 2..4 {
        assert_eq!(body(&next_delivery(&mut c).await), format!("m{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_flight_to_a_cancelled_consumer_are_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", sac_queue("sac"), conn)
        .await
        .unwrap();
    for i in 0..20 {
        publish(&broker, "sac", &format!("m{i}")).await;
    }
    let mut a = broker.open_channel("/", conn).unwrap();
    let mut b = broker.open_channel("/", conn).unwrap();
    // A channel-wide limit, to check that taken-back deliveries return
    // their credit.
    a.qos(5, true);
    let tag = a.consume("sac", ConsumeOptions::default()).unwrap();
    b.consume("sac", ConsumeOptions::default()).unwrap();
    // Let the queue hand deliveries to `a` without `a` receiving them yet.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(a.cancel(&tag));
    no_delivery(&mut a).await;
    for i in 0..20 {
        let d = next_delivery(&mut b).await;
        assert_eq!(body(&d), format!("m{i}"));
        b.ack(d.tag, false).unwrap();
    }
    // `a`'s channel credit came back: a new consumer on it receives.
    publish(&broker, "sac", "later").await;
    drop(b);
    a.consume("sac", ConsumeOptions::default()).unwrap();
    assert_eq!(body(&next_delivery(&mut a).await), "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_survives_a_restart_and_must_be_a_boolean() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_queue("/", sac_queue("sac"), conn)
            .await
            .unwrap();
        let mut bad = QueueDeclare::new("bad");
        bad.arguments.insert(
            "x-single-active-consumer".into(),
            FieldValue::String("true".into()),
        );
        let err = broker.declare_queue("/", bad, conn).await.unwrap_err();
        assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed);
        for i in 0..4 {
            publish(&broker, "sac", &format!("m{i}")).await;
        }
        broker.close().unwrap();
    }
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    // Redeclaring with the same argument is equivalent; without it is not.
    broker
        .declare_queue("/", sac_queue("sac"), conn)
        .await
        .unwrap();
    let err = broker
        .declare_queue("/", QueueDeclare::new("sac"), conn)
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed);
    let mut a = broker.open_channel("/", conn).unwrap();
    let mut b = broker.open_channel("/", conn).unwrap();
    a.consume("sac", ConsumeOptions::default()).unwrap();
    b.consume("sac", ConsumeOptions::default()).unwrap();
    for i in 0..4 {
        assert_eq!(body(&next_delivery(&mut a).await), format!("m{i}"));
    }
    no_delivery(&mut b).await;
}
