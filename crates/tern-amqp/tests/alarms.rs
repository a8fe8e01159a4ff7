//! Resource alarms against real clients: with the broker's disk alarm
//! raised by its own monitor (a free-space limit above any disk's free
//! space), a connection that publishes is told `connection.blocked` (lapin,
//! which announces the capability) and is no longer read, so a publish sent
//! meanwhile (amqprs, which does not announce it and keeps writing) is
//! neither routed nor confirmed; a consumer on a connection that never
//! published still drains what is queued. When the limit drops, the alarm
//! clears: `connection.unblocked`, and the held publishes are routed and
//! confirmed. A blocked connection is not dropped by the heartbeat timeout,
//! though its heartbeats go unread.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::{Ack, BasicProperties as AmqprsProperties, Cancel, CloseChannel, Nack, Return};
use futures_lite::{Stream, StreamExt};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, Event};
use tern_amqp::AmqpServer;
use tern_broker::alarm::{AlarmLimits, MemoryLimit, Resource};
use tern_broker::{Broker, BrokerConfig};
use tokio::sync::mpsc;

const QUEUE: &str = "alarmed";

/// Limits that never raise an alarm, sampled rarely: only a change of
/// limits makes the monitor look again, so the test decides when.
fn quiet() -> AlarmLimits {
    AlarmLimits {
        memory: MemoryLimit::Bytes(u64::MAX),
        disk_free: 0,
        interval: Duration::from_secs(3600),
    }
}

async fn lapin_connect(port: u16) -> Connection {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap()
}

async fn lapin_publish(ch: &lapin::Channel, body: &[u8]) -> lapin::PublisherConfirm {
    ch.basic_publish(
        "".into(),
        QUEUE.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
}

/// The next blocked / unblocked event of a lapin connection.
async fn next_flow_event(events: &mut (impl Stream<Item = Event> + Unpin)) -> Event {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(e @ (Event::ConnectionBlocked(_) | Event::ConnectionUnblocked)) => return e,
                Some(_) => {}
                None => panic!("the connection's events ended"),
            }
        }
    })
    .await
    .expect("a blocked or unblocked event within 10 s")
}

/// amqprs publisher confirms, by delivery tag.
struct Confirms(mpsc::UnboundedSender<u64>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(ack.delivery_tag());
    }
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {}
    async fn publish_return(&mut self, _: &Channel, _: Return, _: AmqprsProperties, _: Vec<u8>) {}
}

async fn amqprs_publish(ch: &Channel, body: &[u8]) {
    ch.basic_publish(
        AmqprsProperties::default().with_delivery_mode(2).finish(),
        body.to_vec(),
        BasicPublishArguments::new("", QUEUE),
    )
    .await
    .unwrap();
}

fn ready(broker: &Broker) -> u64 {
    broker
        .queues("/")
        .unwrap()
        .into_iter()
        .find(|q| q.name.as_str() == QUEUE)
        .map(|q| q.ready + q.unacked)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_alarm_blocks_publishers_while_consumers_drain_and_clears_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone())
        .await
        .unwrap();
    let port = server.local_addr().port();
    let monitor = broker.alarms().monitor(quiet(), dir.path());

    // Two publishers, each with a confirmed publish before the alarm.
    let lapin_pub = lapin_connect(port).await;
    let mut lapin_events = lapin_pub.events_listener();
    let lch = lapin_pub.create_channel().await.unwrap();
    lch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    lch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for body in [&b"q1"[..], b"q2"] {
        let confirm = lapin_publish(&lch, body).await;
        assert_eq!(confirm.await.unwrap(), Confirmation::Ack(None));
    }
    let amqprs_pub = amqprs::connection::Connection::open(
        &amqprs::connection::OpenConnectionArguments::new("127.0.0.1", port, "guest", "guest"),
    )
    .await
    .unwrap();
    let ach = amqprs_pub.open_channel(None).await.unwrap();
    let (tx, mut amqprs_confirms) = mpsc::unbounded_channel();
    ach.register_callback(Confirms(tx)).await.unwrap();
    ach.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    amqprs_publish(&ach, b"q3").await;
    assert_eq!(amqprs_confirms.recv().await, Some(1));
    assert_eq!(ready(&broker), 3);

    // The disk alarm: no disk has u64::MAX bytes free.
    monitor.set_limits(AlarmLimits {
        disk_free: u64::MAX,
        ..quiet()
    });
    match next_flow_event(&mut lapin_events).await {
        Event::ConnectionBlocked(reason) => assert!(reason.contains("disk"), "{reason}"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    assert!(broker.alarms().current().contains(Resource::Disk));

    // Publishes sent now are held: amqprs writes it to the socket regardless;
    // lapin holds its own while blocked. Neither is routed nor confirmed.
    amqprs_publish(&ach, b"held-amqprs").await;
    // lapin's publish completes only once written, which it is not while
    // blocked: it runs on its own task.
    let held_ch = lch.clone();
    let lapin_held =
        tokio::spawn(async move { lapin_publish(&held_ch, b"held-lapin").await.await });

    // A consumer on a connection that never published drains the queue.
    let consumer_conn = lapin_connect(port).await;
    let mut consumer_events = consumer_conn.events_listener();
    let cch = consumer_conn.create_channel().await.unwrap();
    let mut consumer = cch
        .basic_consume(
            QUEUE.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        got.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(got, ["q1", "q2", "q3"]);
    // The consumer's acks were read: the queue empties while the alarm holds,
    // and the held publishes have not arrived.
    tokio::time::timeout(Duration::from_secs(10), async {
        while ready(&broker) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the consumer's acks are read while the alarm holds");
    assert!(
        amqprs_confirms.try_recv().is_err(),
        "no confirm while blocked"
    );
    assert!(broker.alarms().current().contains(Resource::Disk));

    // The alarm clears by itself once the limit is below the free space.
    monitor.set_limits(quiet());
    assert!(matches!(
        next_flow_event(&mut lapin_events).await,
        Event::ConnectionUnblocked
    ));
    let tag = tokio::time::timeout(Duration::from_secs(10), amqprs_confirms.recv())
        .await
        .expect("the held amqprs publish is confirmed once unblocked");
    assert_eq!(tag, Some(2));
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), lapin_held)
            .await
            .expect("the held lapin publish is confirmed once unblocked")
            .unwrap()
            .unwrap(),
        Confirmation::Ack(None)
    );
    let mut late = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        late.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    late.sort();
    assert_eq!(late, ["held-amqprs", "held-lapin"]);

    // The consumer's connection was never blocked.
    let consumer_flow = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            match consumer_events.next().await {
                Some(e @ (Event::ConnectionBlocked(_) | Event::ConnectionUnblocked)) => return e,
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    assert!(consumer_flow.is_err(), "{consumer_flow:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_publish_during_an_alarm_blocks_its_connection_then() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone())
        .await
        .unwrap();
    broker.alarms().set(Resource::Memory, true);

    // Declaring and opening work under the alarm: nothing has been published.
    let conn = lapin_connect(server.local_addr().port()).await;
    let mut events = conn.events_listener();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publisher = ch.clone();
    let held = tokio::spawn(async move { lapin_publish(&publisher, b"first").await.await });
    match next_flow_event(&mut events).await {
        Event::ConnectionBlocked(reason) => assert!(reason.contains("memory"), "{reason}"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    assert_eq!(ready(&broker), 0, "the publish is held");

    broker.alarms().set(Resource::Memory, false);
    assert!(matches!(
        next_flow_event(&mut events).await,
        Event::ConnectionUnblocked
    ));
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("confirmed once unblocked")
            .unwrap()
            .unwrap(),
        Confirmation::Ack(None)
    );
    assert_eq!(ready(&broker), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_connection_outlives_its_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone())
        .await
        .unwrap();
    // One-second heartbeats: the server drops a peer silent for two.
    let conn = amqprs::connection::Connection::open(
        amqprs::connection::OpenConnectionArguments::new(
            "127.0.0.1",
            server.local_addr().port(),
            "guest",
            "guest",
        )
        .heartbeat(1),
    )
    .await
    .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(amqprs::channel::QueueDeclareArguments::durable_client_named(QUEUE))
        .await
        .unwrap();
    let (tx, mut confirms) = mpsc::unbounded_channel();
    ch.register_callback(Confirms(tx)).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    amqprs_publish(&ch, b"before").await;
    assert_eq!(confirms.recv().await, Some(1));

    broker.alarms().set(Resource::Disk, true);
    amqprs_publish(&ch, b"held").await;
    // Its heartbeats go unread for twice the timeout; the server's own keep
    // the client content (amqprs drops a server silent for two intervals).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(confirms.try_recv().is_err(), "no confirm while blocked");
    assert_eq!(broker.connections().len(), 1, "the server kept it");
    assert!(conn.is_open(), "the client kept it");

    broker.alarms().set(Resource::Disk, false);
    let tag = tokio::time::timeout(Duration::from_secs(10), confirms.recv())
        .await
        .expect("confirmed once unblocked");
    assert_eq!(tag, Some(2));
    assert_eq!(ready(&broker), 2);
    server.shutdown().await;
}
