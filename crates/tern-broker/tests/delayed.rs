//! Delayed messages through the broker: the `x-delayed-message` exchange
//! type with `x-delay` headers (RabbitMQ's plugin), `Broker::publish_delayed`
//! for in-process retries, and both across restarts.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_broker::*;

fn message(exchange: &str, key: &str, body: &str, delay_ms: Option<i64>) -> Message {
    let headers = delay_ms.map(|ms| {
        let mut t = FieldTable::new();
        t.insert("x-delay".into(), FieldValue::I64(ms));
        t
    });
    Message {
        exchange: ExchangeName::new(exchange).unwrap(),
        routing_key: key.to_string(),
        properties: Properties {
            headers,
            ..Properties::default()
        },
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

fn delayed_exchange(name: &str, kind: &str) -> ExchangeDeclare {
    let mut d = ExchangeDeclare::new(name, ExchangeKind::Direct);
    d.kind = "x-delayed-message".into();
    d.arguments
        .insert("x-delayed-type".into(), FieldValue::String(kind.into()));
    d
}

async fn next_body(ch: &mut Channel, within: Duration) -> String {
    match tokio::time::timeout(within, ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => {
            ch.ack(d.tag, false).unwrap();
            String::from_utf8(d.message.body.to_vec()).unwrap()
        }
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn setup(broker: &Broker, conn: ConnectionId) {
    broker
        .declare_exchange("/", delayed_exchange("later", "direct"))
        .await
        .unwrap();
    broker
        .declare_queue("/", QueueDeclare::new("jobs"), conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "jobs", "later", "job", &FieldTable::new(), conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_exchange_routes_when_the_delay_expires_in_due_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    setup(&broker, conn).await;
    let start = Instant::now();
    // Published in reverse order of their delays.
    for (body, ms) in [("c", 600), ("b", 400), ("a", 200)] {
        let published = broker
            .publish("/", message("later", "job", body, Some(ms)))
            .unwrap();
        assert_eq!(
            published.routed, 1,
            "held by the delay store counts as routed"
        );
        published.confirmed().await.unwrap();
    }
    // No x-delay (or a non-positive one): routed at once.
    for body in ["now", "zero"] {
        let delay = (body == "zero").then_some(0);
        let published = broker
            .publish("/", message("later", "job", body, delay))
            .unwrap();
        published.confirmed().await.unwrap();
    }
    assert_eq!(broker.delayed_count(), 3);
    assert_eq!(broker.queue_info("/", "jobs").unwrap().ready, 2);
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.consume("jobs", ConsumeOptions::default()).unwrap();
    assert_eq!(next_body(&mut ch, Duration::from_secs(1)).await, "now");
    assert_eq!(next_body(&mut ch, Duration::from_secs(1)).await, "zero");
    for (body, ms) in [("a", 200), ("b", 400), ("c", 600)] {
        assert_eq!(next_body(&mut ch, Duration::from_secs(5)).await, body);
        assert!(
            start.elapsed() >= Duration::from_millis(ms),
            "'{body}' arrived before its delay of {ms} ms"
        );
    }
    assert_eq!(broker.delayed_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_exchange_declarations_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let mut missing = delayed_exchange("x", "direct");
    missing.arguments.clear();
    let err = broker.declare_exchange("/", missing).await.unwrap_err();
    assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{err}");
    let err = broker
        .declare_exchange("/", delayed_exchange("x", "sideways"))
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{err}");
    broker
        .declare_exchange("/", delayed_exchange("x", "topic"))
        .await
        .unwrap();
    // Same name, plain topic type: not equivalent.
    let mut plain = ExchangeDeclare::new("x", ExchangeKind::Topic);
    plain.arguments = delayed_exchange("x", "topic").arguments;
    let err = broker.declare_exchange("/", plain).await.unwrap_err();
    assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{err}");
    broker
        .declare_exchange("/", delayed_exchange("x", "topic"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_survive_a_restart_and_overdue_ones_fire_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        setup(&broker, conn).await;
        for (body, ms) in [("overdue", 100), ("later", 1_500)] {
            broker
                .publish("/", message("later", "job", body, Some(ms)))
                .unwrap()
                .confirmed()
                .await
                .unwrap();
        }
        broker
            .publish_delayed(
                "/",
                message("", "jobs", "retry", None),
                Duration::from_millis(150),
            )
            .unwrap()
            .confirmed()
            .await
            .unwrap();
        assert_eq!(broker.delayed_count(), 3);
        broker.close().unwrap();
    }
    // Down for longer than two of the delays.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    // The exchange came back as a delayed one.
    broker
        .declare_exchange("/", delayed_exchange("later", "direct"))
        .await
        .unwrap();
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.consume("jobs", ConsumeOptions::default()).unwrap();
    assert_eq!(next_body(&mut ch, Duration::from_secs(2)).await, "overdue");
    assert_eq!(next_body(&mut ch, Duration::from_secs(2)).await, "retry");
    assert_eq!(broker.delayed_count(), 1);
    assert_eq!(next_body(&mut ch, Duration::from_secs(5)).await, "later");
    broker.close().unwrap();

    // Fired messages do not fire again after another restart.
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    assert_eq!(broker.delayed_count(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.queue_info("/", "jobs").unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delayed_checks_its_exchange_now_and_drops_what_cannot_route_later() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let err = broker
        .publish_delayed(
            "/",
            message("nowhere", "k", "m", None),
            Duration::from_millis(1),
        )
        .unwrap_err();
    assert_eq!(err.reply_code(), ReplyCode::NotFound);
    broker
        .declare_queue("/", QueueDeclare::new("q"), conn)
        .await
        .unwrap();
    broker
        .publish_delayed("/", message("", "q", "m", None), Duration::from_millis(300))
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    // The queue goes before the message is due: it is dropped, not stuck.
    broker
        .delete_queue("/", "q", false, false, conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(broker.delayed_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_message_passes_its_queues_deduplication_window() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_exchange("/", delayed_exchange("later", "direct"))
        .await
        .unwrap();
    let mut jobs = QueueDeclare::new("jobs");
    jobs.arguments
        .insert("x-message-deduplication".into(), FieldValue::Bool(true));
    broker.declare_queue("/", jobs, conn).await.unwrap();
    broker
        .bind_queue("/", "jobs", "later", "job", &FieldTable::new(), conn)
        .await
        .unwrap();
    // Two delayed copies of one message (same deduplication key), and one
    // other message, all due at once.
    for (body, key) in [("a", "k1"), ("a again", "k1"), ("b", "k2")] {
        let mut m = message("later", "job", body, Some(100));
        m.properties
            .headers
            .get_or_insert_with(FieldTable::new)
            .insert(
                "x-deduplication-header".into(),
                FieldValue::String(key.into()),
            );
        broker.publish("/", m).unwrap().confirmed().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker.queue_info("/", "jobs").unwrap().ready < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Time for a wrongly admitted duplicate to arrive too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        broker.queue_info("/", "jobs").unwrap().ready,
        2,
        "the second copy of k1 is a duplicate in the queue's window"
    );
    broker.close().unwrap();
}
