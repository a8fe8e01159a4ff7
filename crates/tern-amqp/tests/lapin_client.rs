//! The AMQP server driven by a real client, lapin: handshake, declarations,
//! publish with confirms, consume with prefetch, acks and nacks, channel
//! errors, requeue on disconnect, basic.get, returns, and refused logins.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};

struct Harness {
    _dir: tempfile::TempDir,
    broker: Broker,
    server: AmqpServer,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone())
            .await
            .unwrap();
        Harness {
            _dir: dir,
            broker,
            server,
        }
    }

    fn uri(&self, user: &str, password: &str, vhost: &str) -> String {
        format!(
            "amqp://{user}:{password}@127.0.0.1:{}/{vhost}",
            self.server.local_addr().port()
        )
    }

    async fn connect(&self) -> Connection {
        Connection::connect(
            &self.uri("guest", "guest", "%2f"),
            ConnectionProperties::default(),
        )
        .await
        .unwrap()
    }
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

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) -> Confirmation {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap()
}

fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_bind_publish_with_confirms_consume_and_ack() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "orders".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = ch
        .queue_declare(
            "orders.eu".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    ch.queue_bind(
        "orders.eu".into(),
        "orders".into(),
        "eu".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let mut headers = FieldTable::default();
    headers.insert("x-origin".into(), AMQPValue::LongString("test".into()));
    let mut confirms = Vec::new();
    for i in 0..20 {
        // Bodies larger than frame-max on some messages: split into body frames.
        let body = if i == 7 {
            vec![b'x'; 300_000]
        } else {
            format!("m{i}").into_bytes()
        };
        let confirm = ch
            .basic_publish(
                "orders".into(),
                "eu".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type("text/plain".into())
                    .with_headers(headers.clone())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for c in confirms {
        assert_eq!(c.await.unwrap(), Confirmation::Ack(None));
    }
    let declared = ch
        .queue_declare(
            "orders.eu".into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 20);

    let consumer_ch = conn.create_channel().await.unwrap();
    let mut consumer = consumer_ch
        .basic_consume(
            "orders.eu".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..20 {
        let d = next(&mut consumer).await;
        if i == 7 {
            assert_eq!(d.data.len(), 300_000);
        } else {
            assert_eq!(d.data, format!("m{i}").into_bytes());
        }
        assert!(!d.redelivered);
        assert_eq!(d.exchange.as_str(), "orders");
        assert_eq!(d.routing_key.as_str(), "eu");
        assert_eq!(
            d.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(d.properties.headers().as_ref(), Some(&headers));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Acks are asynchronous: give the last one a moment to land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = h.broker.queue_info("/", "orders.eu").unwrap();
    assert_eq!((info.ready, info.unacked, info.consumers), (0, 0, 1));
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacked_deliveries() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        publish(&ch, "", "q", format!("m{i}").as_bytes()).await;
    }
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    let _second = next(&mut consumer).await;
    nothing_more(&mut consumer).await;
    first.ack(BasicAckOptions::default()).await.unwrap();
    let third = next(&mut consumer).await;
    assert_eq!(third.data, b"m2");
    nothing_more(&mut consumer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_requeue_redelivers() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, "", "q", b"again").await;
    let mut consumer = ch
        .basic_consume(
            "q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert!(!d.redelivered);
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.data, b"again");
    assert!(d.redelivered);
    d.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    nothing_more(&mut consumer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_error_closes_only_that_channel() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let good = conn.create_channel().await.unwrap();
    let bad = conn.create_channel().await.unwrap();
    good.queue_declare(
        "d".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let err = bad
        .queue_declare(
            "d".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(406), "{err:?}");
    assert!(!bad.status().connected());

    // The connection and the other channel keep working.
    assert!(conn.status().connected());
    good.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert_eq!(
        publish(&good, "", "d", b"still here").await,
        Confirmation::Ack(None)
    );
    let got = good
        .basic_get("d".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data, b"still here");
    let third = conn.create_channel().await.unwrap();
    let err = third
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "{err:?}");
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_requeues_its_unacked_messages() {
    let h = Harness::start().await;
    let first = h.connect().await;
    let ch = first.create_channel().await.unwrap();
    ch.queue_declare(
        "jobs".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        publish(&ch, "", "jobs", format!("j{i}").as_bytes()).await;
    }
    let mut consumer = ch
        .basic_consume(
            "jobs".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..3 {
        let d = next(&mut consumer).await;
        assert_eq!(d.data, format!("j{i}").into_bytes());
    }
    first.close(200, "bye".into()).await.unwrap();

    let second = h.connect().await;
    let ch = second.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "jobs".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..3 {
        let d = next(&mut consumer).await;
        assert_eq!(d.data, format!("j{i}").into_bytes());
        assert!(d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_fetches_one_message_at_a_time() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    // A server-named, exclusive queue.
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = q.name().as_str().to_string();
    assert!(!name.is_empty());
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, "", &name, b"a").await;
    publish(&ch, "", &name, b"b").await;
    let a = ch
        .basic_get(name.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.delivery.data.as_slice(), a.message_count),
        (&b"a"[..], 1)
    );
    a.delivery.ack(BasicAckOptions::default()).await.unwrap();
    let b = ch
        .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (b.delivery.data.as_slice(), b.message_count),
        (&b"b"[..], 0)
    );
    assert!(ch
        .basic_get(name.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .is_none());
    // The exclusive queue goes with its connection.
    conn.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.broker.queue_info("/", &name).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mandatory_unroutable_publish_is_returned_before_its_confirm() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    match confirm {
        Confirmation::Ack(Some(returned)) => {
            assert_eq!(returned.reply_code, 312);
            assert_eq!(returned.delivery.data, b"lost");
        }
        other => panic!("expected an ack with the returned message, got {other:?}"),
    }
    // Not mandatory: silently dropped, still acked.
    assert_eq!(
        publish(&ch, "amq.direct", "nowhere", b"dropped").await,
        Confirmation::Ack(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_missing_exchange_closes_the_channel_with_404() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let result = match ch
        .basic_publish(
            "no-such-exchange".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
    {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    // lapin reports the closed channel on the confirm (or a later call).
    let err = match result {
        Err(e) => e,
        Ok(_) => ch
            .queue_declare(
                "x".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_err(),
    };
    assert_eq!(reply_code(&err), Some(404), "{err:?}");
    assert!(!ch.status().connected());
    let other = conn.create_channel().await.unwrap();
    other
        .queue_declare(
            "ok".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_vhost_is_refused() {
    let h = Harness::start().await;
    let err = Connection::connect(
        &h.uri("guest", "wrong", "%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    let err = Connection::connect(
        &h.uri("guest", "guest", "nope"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(reply_code(&err), Some(530), "{err:?}");
    // The server still serves.
    let conn = h.connect().await;
    conn.create_channel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_cancels_its_consumers_with_basic_cancel() {
    let h = Harness::start().await;
    let conn = h.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "temp".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "temp".into(),
            "watcher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let other = conn.create_channel().await.unwrap();
    other
        .queue_delete("temp".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("the consumer ends within 5 s");
    assert!(end.is_none(), "expected the consumer to be cancelled");
    // The channel stays open.
    ch.queue_declare(
        "after".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}
