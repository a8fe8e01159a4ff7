//! The AMQP server driven by a second real client, amqprs, whose framing,
//! handshake and callback model differ from lapin's: capabilities,
//! declarations, publish with confirms (large and empty bodies), consume with
//! prefetch, ack / nack / reject / recover, basic.get, returns, consumer
//! cancellation by either side, channel errors with their reply codes,
//! connection errors raised by channel methods, requeue on channel close and
//! on disconnect, refused logins, transactions, direct reply-to, and a
//! single active consumer handing over on cancel.
//!
//! Like `lapin_client.rs`, every scenario is differential: it runs against an
//! in-process Tern and, when `TERN_TEST_RABBITMQ_URL` is set, against that
//! RabbitMQ too, with the same assertions.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::sync::Arc;
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicNackArguments, BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{
    Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return,
};
use target::{run_on_both, Target};
use tokio::sync::mpsc;

/// What the server told a channel outside the replies to its requests.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
    Return { code: u16, body: Vec<u8> },
    Closed { code: u16, text: String },
    Cancelled { consumer_tag: String },
}

/// A channel callback that records every event, in order.
struct Recorder(mpsc::UnboundedSender<Event>);

#[async_trait::async_trait]
impl ChannelCallback for Recorder {
    async fn close(
        &mut self,
        _: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::Closed {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, cancel: Cancel) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::Cancelled {
            consumer_tag: cancel.consumer_tag().clone(),
        });
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Event::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send(Event::Nack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }
    async fn publish_return(
        &mut self,
        _: &Channel,
        ret: Return,
        _: BasicProperties,
        body: Vec<u8>,
    ) {
        let _ = self.0.send(Event::Return {
            code: ret.reply_code(),
            body,
        });
    }
}

/// A connection callback that records the server's `connection.close` code.
struct ConnectionCloses(mpsc::UnboundedSender<u16>);

#[async_trait::async_trait]
impl ConnectionCallback for ConnectionCloses {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(close.reply_code());
        Ok(())
    }
    async fn blocked(&mut self, _: &Connection, _: String) {}
    async fn unblocked(&mut self, _: &Connection) {}
    async fn secret_updated(&mut self, _: &Connection) {}
}

/// Opens a connection whose `connection.close` codes arrive on the receiver.
async fn connect_watched(t: &Target) -> (Connection, mpsc::UnboundedReceiver<u16>) {
    let conn = connect(t).await;
    let (tx, rx) = mpsc::unbounded_channel();
    conn.register_callback(ConnectionCloses(tx)).await.unwrap();
    (conn, rx)
}

async fn connection_closed_with(closes: &mut mpsc::UnboundedReceiver<u16>) -> u16 {
    tokio::time::timeout(Duration::from_secs(5), closes.recv())
        .await
        .expect("connection.close within 5 s")
        .expect("the connection callback is registered")
}

/// An open channel and the events recorded on it.
struct Chan {
    ch: Channel,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Chan {
    async fn open(conn: &Connection) -> Chan {
        let ch = conn.open_channel(None).await.unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        ch.register_callback(Recorder(tx)).await.unwrap();
        Chan { ch, events }
    }

    async fn event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("an event within 5 s")
            .expect("the channel's callback is registered")
    }

    /// Waits for the server's `channel.close` and returns its reply code.
    async fn closed_with(&mut self) -> u16 {
        loop {
            if let Event::Closed { code, text } = self.event().await {
                assert!(!text.is_empty());
                return code;
            }
        }
    }

    /// Collects confirms until every publish up to `last` is confirmed;
    /// returns every event seen meanwhile (returns included), in order.
    /// (RabbitMQ may confirm out of order; each tag is confirmed once.)
    async fn confirms_upto(&mut self, last: u64) -> Vec<Event> {
        let mut seen = Vec::new();
        let mut confirmed = std::collections::BTreeSet::new();
        while (1..=last).any(|tag| !confirmed.contains(&tag)) {
            let event = self.event().await;
            match &event {
                Event::Ack { tag, multiple } | Event::Nack { tag, multiple } => {
                    let tags = if *multiple { 1..=*tag } else { *tag..=*tag };
                    for t in tags {
                        // A multiple confirm may cover tags confirmed before.
                        assert!(confirmed.insert(t) || *multiple, "tag {t} confirmed twice");
                    }
                }
                Event::Closed { .. } => panic!("channel closed while confirming: {event:?}"),
                _ => {}
            }
            seen.push(event);
        }
        seen
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8]) {
        self.ch
            .basic_publish(
                BasicProperties::default().with_delivery_mode(2).finish(),
                body.to_vec(),
                BasicPublishArguments::new(exchange, key),
            )
            .await
            .unwrap();
    }

    async fn declare_durable(&self, queue: &str) {
        self.ch
            .queue_declare(QueueDeclareArguments::durable_client_named(queue))
            .await
            .unwrap();
    }

    /// The `(ready, consumers)` counts of a queue, by a passive declare.
    async fn counts(&self, queue: &str) -> (u32, u32) {
        let (_, ready, consumers) = self
            .ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .unwrap()
            .unwrap();
        (ready, consumers)
    }

    async fn consume(&self, queue: &str, tag: &str) -> Deliveries {
        let (_, rx) = self
            .ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, tag)
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .unwrap();
        Deliveries(rx)
    }

    async fn ack(&self, tag: u64) {
        self.ch
            .basic_ack(BasicAckArguments::new(tag, false))
            .await
            .unwrap();
    }
}

struct Delivered {
    tag: u64,
    redelivered: bool,
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Vec<u8>,
}

struct Deliveries(mpsc::UnboundedReceiver<ConsumerMessage>);

impl Deliveries {
    async fn next(&mut self) -> Delivered {
        let mut m = tokio::time::timeout(Duration::from_secs(5), self.0.recv())
            .await
            .expect("a delivery within 5 s")
            .expect("the consumer is open");
        let deliver = m.deliver.take().unwrap();
        Delivered {
            tag: deliver.delivery_tag(),
            redelivered: deliver.redelivered(),
            exchange: deliver.exchange().clone(),
            routing_key: deliver.routing_key().clone(),
            properties: m.basic_properties.take().unwrap(),
            body: m.content.take().unwrap_or_default(),
        }
    }

    async fn nothing_more(&mut self) {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), self.0.recv()).await {
            panic!("expected no delivery, got {:?}", m.content);
        }
    }
}

fn args(t: &Target, user: &str, password: &str, vhost: &str) -> OpenConnectionArguments {
    let (host, port) = t.host_and_port();
    OpenConnectionArguments::new(host, port, user, password)
        .virtual_host(vhost)
        .finish()
}

/// Closes a connection with the close handshake. amqprs marks its
/// connection closed before it registers for the close-ok, and its reader
/// stops at the next frame it finishes handling once the connection is
/// marked closed: a close that follows a received frame too closely finds
/// the reader gone ("failed to register responder"), whatever the server.
/// A moment's pause lets the reader finish that frame first.
async fn close(conn: Connection) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.close().await.unwrap();
}

async fn connect(t: &Target) -> Connection {
    Connection::open(&args(t, &t.user, &t.password, &t.vhost_name()))
        .await
        .unwrap_or_else(|e| panic!("connecting to {} with amqprs: {e}", t.label))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_advertises_rabbitmq_capabilities() {
    run_on_both(scenario_the_server_advertises_rabbitmq_capabilities).await;
}

async fn scenario_the_server_advertises_rabbitmq_capabilities(t: Arc<Target>) {
    let conn = connect(&t).await;
    let caps = conn.server_properties().capabilities();
    assert!(caps.publisher_confirms(), "publisher_confirms");
    assert!(caps.basic_nack(), "basic.nack");
    assert!(caps.consumer_cancel_notify(), "consumer_cancel_notify");
    assert!(
        caps.exchange_exchange_bindings(),
        "exchange_exchange_bindings"
    );
    assert!(caps.per_consumer_qos(), "per_consumer_qos");
    assert!(
        caps.authentication_failure_close(),
        "authentication_failure_close"
    );
    assert!(caps.consumer_priorities(), "consumer_priorities");
    assert!(caps.direct_reply_to(), "direct_reply_to");
    assert!(conn.frame_max() >= 4096);
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_bind_publish_with_confirms_consume_and_ack() {
    run_on_both(scenario_declare_bind_publish_with_confirms_consume_and_ack).await;
}

async fn scenario_declare_bind_publish_with_confirms_consume_and_ack(t: Arc<Target>) {
    let exchange = t.exchange("orders");
    let queue = t.queue("orders.eu");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.ch
        .exchange_declare(
            ExchangeDeclareArguments::new(&exchange, "direct")
                .durable(true)
                .finish(),
        )
        .await
        .unwrap();
    let (name, ready, consumers) = ch
        .ch
        .queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((name.as_str(), ready, consumers), (queue.as_str(), 0, 0));
    ch.ch
        .queue_bind(QueueBindArguments::new(&queue, &exchange, "eu"))
        .await
        .unwrap();
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();

    let mut headers = FieldTable::new();
    headers.insert(
        "x-origin".try_into().unwrap(),
        FieldValue::from("amqprs-test"),
    );
    // A 1 MiB body (cut into many frames both ways) and an empty one among them.
    let body = |i: usize| match i {
        7 => vec![b'x'; 1 << 20],
        11 => Vec::new(),
        _ => format!("m{i}").into_bytes(),
    };
    for i in 0..20 {
        ch.ch
            .basic_publish(
                BasicProperties::default()
                    .with_content_type("text/plain")
                    .with_headers(headers.clone())
                    .with_delivery_mode(2)
                    .finish(),
                body(i),
                BasicPublishArguments::new(&exchange, "eu"),
            )
            .await
            .unwrap();
    }
    let confirms = ch.confirms_upto(20).await;
    assert!(
        confirms.iter().all(|e| matches!(e, Event::Ack { .. })),
        "{confirms:?}"
    );
    assert_eq!(ch.counts(&queue).await, (20, 0));

    let consumer_ch = Chan::open(&conn).await;
    let mut deliveries = consumer_ch.consume(&queue, "c1").await;
    for i in 0..20 {
        let d = deliveries.next().await;
        assert_eq!(d.body, body(i), "message {i}");
        assert!(!d.redelivered);
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            (exchange.as_str(), "eu")
        );
        assert_eq!(
            d.properties.content_type().map(String::as_str),
            Some("text/plain")
        );
        assert_eq!(d.properties.headers(), Some(&headers));
        assert_eq!(d.properties.delivery_mode(), Some(2));
        consumer_ch.ack(d.tag).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ch.counts(&queue).await, (0, 1));
    if let Some(broker) = t.broker() {
        let info = broker.queue_info("/", &queue).unwrap();
        assert_eq!((info.ready, info.unacked, info.consumers), (0, 0, 1));
    }
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacked_deliveries() {
    run_on_both(scenario_prefetch_limits_unacked_deliveries).await;
}

async fn scenario_prefetch_limits_unacked_deliveries(t: Arc<Target>) {
    let queue = t.queue("q");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.declare_durable(&queue).await;
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    for i in 0..5 {
        ch.publish("", &queue, format!("m{i}").as_bytes()).await;
    }
    ch.confirms_upto(5).await;
    ch.ch
        .basic_qos(BasicQosArguments::new(0, 2, false))
        .await
        .unwrap();
    let mut deliveries = ch.consume(&queue, "").await;
    let first = deliveries.next().await;
    let second = deliveries.next().await;
    assert_eq!(
        (first.body.as_slice(), second.body.as_slice()),
        (&b"m0"[..], &b"m1"[..])
    );
    deliveries.nothing_more().await;
    ch.ack(first.tag).await;
    assert_eq!(deliveries.next().await.body, b"m2");
    deliveries.nothing_more().await;
    // A multiple ack frees both remaining slots.
    ch.ch
        .basic_ack(BasicAckArguments::new(0, true))
        .await
        .unwrap();
    assert_eq!(deliveries.next().await.body, b"m3");
    assert_eq!(deliveries.next().await.body, b"m4");
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_requeues_reject_drops_and_recover_redelivers() {
    run_on_both(scenario_nack_requeues_reject_drops_and_recover_redelivers).await;
}

async fn scenario_nack_requeues_reject_drops_and_recover_redelivers(t: Arc<Target>) {
    let queue = t.queue("q");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.declare_durable(&queue).await;
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    ch.publish("", &queue, b"again").await;
    ch.publish("", &queue, b"kept").await;
    ch.confirms_upto(2).await;
    let mut deliveries = ch.consume(&queue, "").await;
    let d = deliveries.next().await;
    assert_eq!((d.body.as_slice(), d.redelivered), (&b"again"[..], false));
    let kept = deliveries.next().await;
    assert_eq!(kept.body, b"kept");
    ch.ch
        .basic_nack(BasicNackArguments::new(d.tag, false, true))
        .await
        .unwrap();
    let d = deliveries.next().await;
    assert_eq!((d.body.as_slice(), d.redelivered), (&b"again"[..], true));
    ch.ch
        .basic_reject(BasicRejectArguments::new(d.tag, false))
        .await
        .unwrap();
    deliveries.nothing_more().await;
    // recover puts the still unacked "kept" back, redelivered.
    ch.ch.basic_recover(true).await.unwrap();
    let d = deliveries.next().await;
    assert_eq!((d.body.as_slice(), d.redelivered), (&b"kept"[..], true));
    ch.ack(d.tag).await;
    deliveries.nothing_more().await;
    let other = Chan::open(&conn).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The rejected message is gone, the acked one too.
    assert_eq!(other.counts(&queue).await, (0, 1));
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_fetches_one_message_at_a_time() {
    run_on_both(scenario_basic_get_fetches_one_message_at_a_time).await;
}

async fn scenario_basic_get_fetches_one_message_at_a_time(t: Arc<Target>) {
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    let (name, _, _) = ch
        .ch
        .queue_declare(QueueDeclareArguments::exclusive_server_named())
        .await
        .unwrap()
        .unwrap();
    assert!(name.starts_with("amq.gen-"), "{name}");
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    ch.publish("", &name, b"a").await;
    ch.publish("", &name, b"b").await;
    ch.confirms_upto(2).await;
    let (ok, _, body) = ch
        .ch
        .basic_get(BasicGetArguments::new(&name))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((body.as_slice(), ok.message_count()), (&b"a"[..], 1));
    assert!(!ok.redelivered());
    ch.ack(ok.delivery_tag()).await;
    let (ok, _, body) = ch
        .ch
        .basic_get(BasicGetArguments::new(&name).no_ack(true).finish())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((body.as_slice(), ok.message_count()), (&b"b"[..], 0));
    assert!(ch
        .ch
        .basic_get(BasicGetArguments::new(&name))
        .await
        .unwrap()
        .is_none());
    // Another connection may not touch the exclusive queue.
    let other = connect(&t).await;
    let mut och = Chan::open(&other).await;
    assert!(och
        .ch
        .basic_get(BasicGetArguments::new(&name))
        .await
        .is_err());
    assert_eq!(och.closed_with().await, 405);
    close(other).await;
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mandatory_unroutable_publish_is_returned_before_its_confirm() {
    run_on_both(scenario_a_mandatory_unroutable_publish_is_returned_before_its_confirm).await;
}

async fn scenario_a_mandatory_unroutable_publish_is_returned_before_its_confirm(t: Arc<Target>) {
    let nowhere = t.missing("nowhere");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    ch.ch
        .basic_publish(
            BasicProperties::default(),
            b"lost".to_vec(),
            BasicPublishArguments::new("amq.direct", &nowhere)
                .mandatory(true)
                .finish(),
        )
        .await
        .unwrap();
    // Not mandatory: dropped without a return, acked all the same.
    ch.publish("amq.direct", &nowhere, b"dropped").await;
    let events = ch.confirms_upto(2).await;
    assert_eq!(
        events.first(),
        Some(&Event::Return {
            code: 312,
            body: b"lost".to_vec()
        }),
        "{events:?}"
    );
    assert!(
        events[1..].iter().all(|e| matches!(e, Event::Ack { .. })),
        "{events:?}"
    );
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_errors_close_only_their_channel_with_rabbitmq_codes() {
    run_on_both(scenario_channel_errors_close_only_their_channel_with_rabbitmq_codes).await;
}

async fn scenario_channel_errors_close_only_their_channel_with_rabbitmq_codes(t: Arc<Target>) {
    let queue = t.queue("d");
    let missing = t.missing("missing");
    let conn = connect(&t).await;
    let mut good = Chan::open(&conn).await;
    good.declare_durable(&queue).await;

    // Redeclaring with other properties: 406.
    let mut bad = Chan::open(&conn).await;
    assert!(bad
        .ch
        .queue_declare(QueueDeclareArguments::new(&queue))
        .await
        .is_err());
    assert_eq!(bad.closed_with().await, 406);
    assert!(!bad.ch.is_open());

    // A passive declare of a missing queue: 404.
    let mut bad = Chan::open(&conn).await;
    assert!(bad
        .ch
        .queue_declare(QueueDeclareArguments::new(&missing).passive(true).finish())
        .await
        .is_err());
    assert_eq!(bad.closed_with().await, 404);

    // Publishing to a missing exchange: 404, asynchronously.
    let mut bad = Chan::open(&conn).await;
    bad.publish(&missing, "k", b"x").await;
    assert_eq!(bad.closed_with().await, 404);

    // Consuming from a missing queue: 404.
    let mut bad = Chan::open(&conn).await;
    assert!(bad
        .ch
        .basic_consume_rx(BasicConsumeArguments::new(&missing, ""))
        .await
        .is_err());
    assert_eq!(bad.closed_with().await, 404);

    // Acknowledging a delivery tag never given: 406.
    let mut bad = Chan::open(&conn).await;
    bad.ack(42).await;
    assert_eq!(bad.closed_with().await, 406);

    // Binding to a missing exchange: 404.
    let mut bad = Chan::open(&conn).await;
    assert!(bad
        .ch
        .queue_bind(QueueBindArguments::new(&queue, &missing, "k"))
        .await
        .is_err());
    assert_eq!(bad.closed_with().await, 404);

    // Declaring an exchange with a reserved name: 403.
    let mut bad = Chan::open(&conn).await;
    assert!(bad
        .ch
        .exchange_declare(ExchangeDeclareArguments::new("amq.tern-test", "direct"))
        .await
        .is_err());
    assert_eq!(bad.closed_with().await, 403);

    // The connection and the first channel are untouched.
    assert!(conn.is_open());
    good.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    good.publish("", &queue, b"still here").await;
    good.confirms_upto(1).await;
    assert_eq!(good.counts(&queue).await, (1, 0));
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_cancelled_by_the_client_or_by_deleting_their_queue() {
    run_on_both(scenario_consumers_are_cancelled_by_the_client_or_by_deleting_their_queue).await;
}

async fn scenario_consumers_are_cancelled_by_the_client_or_by_deleting_their_queue(t: Arc<Target>) {
    let queue = t.queue("q");
    let temp = t.queue("temp");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.declare_durable(&queue).await;
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let mut deliveries = ch.consume(&queue, "mine").await;
    ch.publish("", &queue, b"one").await;
    let d = deliveries.next().await;
    ch.ack(d.tag).await;
    let tag = ch
        .ch
        .basic_cancel(BasicCancelArguments::new("mine"))
        .await
        .unwrap();
    assert_eq!(tag, "mine");
    ch.publish("", &queue, b"two").await;
    ch.confirms_upto(2).await;
    deliveries.nothing_more().await;
    assert_eq!(ch.counts(&queue).await, (1, 0));

    // Deleting the queue cancels its consumer with a basic.cancel from the server.
    ch.ch
        .queue_declare(QueueDeclareArguments::new(&temp))
        .await
        .unwrap();
    let _watcher = ch.consume(&temp, "watcher").await;
    let other = Chan::open(&conn).await;
    other
        .ch
        .queue_delete(QueueDeleteArguments::new(&temp))
        .await
        .unwrap();
    loop {
        match ch.event().await {
            Event::Cancelled { consumer_tag } => {
                assert_eq!(consumer_tag, "watcher");
                break;
            }
            Event::Ack { .. } => {}
            other => panic!("expected basic.cancel, got {other:?}"),
        }
    }
    // The channel stays open.
    assert_eq!(ch.counts(&queue).await, (1, 0));
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_requeues_its_unacked_messages() {
    run_on_both(scenario_closing_a_connection_requeues_its_unacked_messages).await;
}

async fn scenario_closing_a_connection_requeues_its_unacked_messages(t: Arc<Target>) {
    let queue = t.queue("jobs");
    let first = connect(&t).await;
    let mut ch = Chan::open(&first).await;
    ch.declare_durable(&queue).await;
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    for i in 0..3 {
        ch.publish("", &queue, format!("j{i}").as_bytes()).await;
    }
    ch.confirms_upto(3).await;
    let mut deliveries = ch.consume(&queue, "").await;
    for i in 0..3 {
        assert_eq!(deliveries.next().await.body, format!("j{i}").into_bytes());
    }
    close(first).await;

    let second = connect(&t).await;
    let ch = Chan::open(&second).await;
    let mut deliveries = ch.consume(&queue, "").await;
    for i in 0..3 {
        let d = deliveries.next().await;
        assert_eq!(d.body, format!("j{i}").into_bytes());
        assert!(d.redelivered);
        ch.ack(d.tag).await;
    }
    close(second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_vhost_is_refused() {
    run_on_both(scenario_a_wrong_password_or_vhost_is_refused).await;
}

async fn scenario_a_wrong_password_or_vhost_is_refused(t: Arc<Target>) {
    // amqprs reports a refused handshake as text carrying the server's close.
    let wrong_password = format!("{}wrong", t.password);
    let err = Connection::open(&args(&t, &t.user, &wrong_password, &t.vhost_name()))
        .await
        .err()
        .expect("a wrong password is refused");
    // RabbitMQ closes the socket right after its connection.close, so amqprs
    // may see either; a reply code it did see must be 403.
    let text = err.to_string();
    assert!(
        text.contains("403") || text.contains("network io error"),
        "{text}"
    );
    if t.broker().is_some() {
        assert!(text.contains("403"), "{text}");
    }
    let err = Connection::open(&args(&t, &t.user, &t.password, &t.missing("nope")))
        .await
        .err()
        .expect("a missing vhost is refused");
    assert!(err.to_string().contains("530"), "{err}");
    let conn = connect(&t).await;
    let _ch = Chan::open(&conn).await;
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_errors_in_channel_methods_close_the_connection() {
    run_on_both(scenario_hard_errors_in_channel_methods_close_the_connection).await;
}

async fn scenario_hard_errors_in_channel_methods_close_the_connection(t: Arc<Target>) {
    let queue = t.queue("q");
    let exchange = t.exchange("x");

    // Reusing a consumer tag on a channel: 530 NOT_ALLOWED, a connection error.
    let (conn, mut closes) = connect_watched(&t).await;
    let ch = Chan::open(&conn).await;
    ch.declare_durable(&queue).await;
    let _first = ch.consume(&queue, "same").await;
    assert!(ch
        .ch
        .basic_consume_rx(BasicConsumeArguments::new(&queue, "same"))
        .await
        .is_err());
    assert_eq!(connection_closed_with(&mut closes).await, 530);

    // An unknown exchange type: 503 COMMAND_INVALID, a connection error.
    let (conn, mut closes) = connect_watched(&t).await;
    let ch = Chan::open(&conn).await;
    assert!(ch
        .ch
        .exchange_declare(ExchangeDeclareArguments::new(&exchange, "no-such-type"))
        .await
        .is_err());
    assert_eq!(connection_closed_with(&mut closes).await, 503);

    // Other connections are untouched.
    let conn = connect(&t).await;
    let ch = Chan::open(&conn).await;
    assert_eq!(ch.counts(&queue).await, (0, 0));
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_applies_publishes_returns_and_rejects_at_commit() {
    run_on_both(scenario_a_transaction_applies_publishes_returns_and_rejects_at_commit).await;
}

async fn scenario_a_transaction_applies_publishes_returns_and_rejects_at_commit(t: Arc<Target>) {
    let queue = t.queue("tx");
    let nowhere = t.missing("nowhere");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.declare_durable(&queue).await;
    ch.ch.tx_select().await.unwrap();
    ch.publish("", &queue, b"one").await;
    ch.ch
        .basic_publish(
            BasicProperties::default(),
            b"unroutable".to_vec(),
            BasicPublishArguments::new("amq.direct", &nowhere)
                .mandatory(true)
                .finish(),
        )
        .await
        .unwrap();
    ch.publish("", &queue, b"two").await;
    assert_eq!(ch.counts(&queue).await, (0, 0));
    assert!(
        ch.events.try_recv().is_err(),
        "nothing is returned before the commit"
    );
    ch.ch.tx_commit().await.unwrap();
    // The return came before commit-ok.
    assert_eq!(
        ch.events.try_recv().ok(),
        Some(Event::Return {
            code: 312,
            body: b"unroutable".to_vec()
        })
    );
    assert_eq!(ch.counts(&queue).await, (2, 0));

    // A reject without requeue drops the message only at the commit; one
    // rolled back leaves it unacked.
    let mut deliveries = ch.consume(&queue, "").await;
    let one = deliveries.next().await;
    let two = deliveries.next().await;
    ch.ch
        .basic_reject(BasicRejectArguments::new(one.tag, false))
        .await
        .unwrap();
    ch.ch.tx_rollback().await.unwrap();
    ch.ch
        .basic_reject(BasicRejectArguments::new(one.tag, false))
        .await
        .unwrap();
    ch.ch
        .basic_nack(BasicNackArguments::new(two.tag, false, false))
        .await
        .unwrap();
    deliveries.nothing_more().await;
    ch.ch.tx_commit().await.unwrap();
    let other = Chan::open(&conn).await;
    assert_eq!(other.counts(&queue).await, (0, 1));

    // Settling one delivery twice in a transaction: 406, at once.
    ch.publish("", &queue, b"once").await;
    ch.ch.tx_commit().await.unwrap();
    let once = deliveries.next().await;
    ch.ack(once.tag).await;
    ch.ack(once.tag).await;
    assert_eq!(ch.closed_with().await, 406);

    // A publish to a missing exchange in a transaction: 404, at once.
    let mut bad = Chan::open(&conn).await;
    bad.ch.tx_select().await.unwrap();
    bad.publish(&nowhere, "k", b"x").await;
    assert_eq!(bad.closed_with().await, 404);

    // Commit and rollback without tx.select: 406.
    let mut bad = Chan::open(&conn).await;
    assert!(bad.ch.tx_commit().await.is_err());
    assert_eq!(bad.closed_with().await, 406);
    let mut bad = Chan::open(&conn).await;
    assert!(bad.ch.tx_rollback().await.is_err());
    assert_eq!(bad.closed_with().await, 406);
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_round_trip_and_its_errors() {
    run_on_both(scenario_direct_reply_to_round_trip_and_its_errors).await;
}

async fn scenario_direct_reply_to_round_trip_and_its_errors(t: Arc<Target>) {
    const REPLY_TO: &str = "amq.rabbitmq.reply-to";
    let rpc = t.queue("rpc");
    let conn = connect(&t).await;
    let server = Chan::open(&conn).await;
    server
        .ch
        .queue_declare(QueueDeclareArguments::new(&rpc))
        .await
        .unwrap();
    let mut requests = server.consume(&rpc, "").await;

    // Request and reply on one connection, two channels.
    let client = Chan::open(&conn).await;
    let (_, replies) = client
        .ch
        .basic_consume_rx(
            BasicConsumeArguments::new(REPLY_TO, "")
                .manual_ack(false)
                .finish(),
        )
        .await
        .unwrap();
    let mut replies = Deliveries(replies);
    client
        .ch
        .basic_publish(
            BasicProperties::default()
                .with_reply_to(REPLY_TO)
                .with_correlation_id("42")
                .finish(),
            b"ping".to_vec(),
            BasicPublishArguments::new("", &rpc),
        )
        .await
        .unwrap();
    let request = requests.next().await;
    let address = request.properties.reply_to().unwrap().clone();
    assert!(address.starts_with("amq.rabbitmq.reply-to."), "{address}");
    server.ack(request.tag).await;
    server
        .ch
        .basic_publish(
            BasicProperties::default()
                .with_correlation_id("42")
                .finish(),
            b"pong".to_vec(),
            BasicPublishArguments::new("", &address),
        )
        .await
        .unwrap();
    let reply = replies.next().await;
    assert_eq!(reply.body, b"pong");
    assert_eq!(reply.routing_key, address);
    assert_eq!(
        reply.properties.correlation_id().map(String::as_str),
        Some("42")
    );
    // The reply took the reply channel's first delivery tag.
    assert_eq!(reply.tag, 1);

    // A reply consumer that acknowledges: 406.
    let mut bad = Chan::open(&conn).await;
    assert!(bad
        .ch
        .basic_consume_rx(
            BasicConsumeArguments::new(REPLY_TO, "")
                .manual_ack(true)
                .finish()
        )
        .await
        .is_err());
    assert_eq!(bad.closed_with().await, 406);

    // Asking for a reply without a reply consumer: 406.
    let mut bad = Chan::open(&conn).await;
    bad.ch
        .basic_publish(
            BasicProperties::default().with_reply_to(REPLY_TO).finish(),
            b"ping".to_vec(),
            BasicPublishArguments::new("", &rpc),
        )
        .await
        .unwrap();
    assert_eq!(bad.closed_with().await, 406);
    requests.nothing_more().await;
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_requeues_its_unacked_messages_in_order() {
    run_on_both(scenario_closing_a_channel_requeues_its_unacked_messages_in_order).await;
}

async fn scenario_closing_a_channel_requeues_its_unacked_messages_in_order(t: Arc<Target>) {
    let queue = t.queue("jobs");
    let conn = connect(&t).await;
    let mut ch = Chan::open(&conn).await;
    ch.declare_durable(&queue).await;
    ch.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    for i in 0..4 {
        ch.publish("", &queue, format!("j{i}").as_bytes()).await;
    }
    ch.confirms_upto(4).await;
    let mut deliveries = ch.consume(&queue, "").await;
    for i in 0..4 {
        let d = deliveries.next().await;
        assert_eq!(d.body, format!("j{i}").into_bytes());
        // Only j1 is acknowledged before the channel goes.
        if i == 1 {
            ch.ack(d.tag).await;
        }
    }
    ch.ch.close().await.unwrap();

    let other = Chan::open(&conn).await;
    assert_eq!(other.counts(&queue).await, (3, 0));
    let mut deliveries = other.consume(&queue, "").await;
    for body in ["j0", "j2", "j3"] {
        let d = deliveries.next().await;
        assert_eq!(d.body, body.as_bytes());
        assert!(d.redelivered);
        other.ack(d.tag).await;
    }
    deliveries.nothing_more().await;
    close(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_hands_over_on_cancel_in_order() {
    run_on_both(scenario_single_active_consumer_hands_over_on_cancel_in_order).await;
}

/// `x-single-active-consumer`: of two consumers on two connections only the
/// first receives, in order; once it is cancelled (everything it had
/// acked), the second takes over with what comes next, and the first gets
/// nothing more.
async fn scenario_single_active_consumer_hands_over_on_cancel_in_order(t: Arc<Target>) {
    let queue = t.queue("sac");
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-single-active-consumer".try_into().unwrap(),
        FieldValue::from(true),
    );
    let first = connect(&t).await;
    let ch1 = Chan::open(&first).await;
    ch1.ch
        .queue_declare(
            QueueDeclareArguments::durable_client_named(&queue)
                .arguments(arguments)
                .finish(),
        )
        .await
        .unwrap();
    let mut active = ch1.consume(&queue, "first").await;
    let second = connect(&t).await;
    let mut ch2 = Chan::open(&second).await;
    let mut waiting = ch2.consume(&queue, "second").await;
    ch2.ch
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    for i in 0..4 {
        ch2.publish("", &queue, format!("s{i}").as_bytes()).await;
    }
    ch2.confirms_upto(4).await;
    for i in 0..4 {
        let d = active.next().await;
        assert_eq!(d.body, format!("s{i}").into_bytes(), "{}", t.label);
        assert!(!d.redelivered, "{}", t.label);
        ch1.ack(d.tag).await;
    }
    waiting.nothing_more().await;
    // Both consumers count; the acks are handled before this reply.
    assert_eq!(ch1.counts(&queue).await, (0, 2), "{}", t.label);

    let tag = ch1
        .ch
        .basic_cancel(BasicCancelArguments::new("first"))
        .await
        .unwrap();
    assert_eq!(tag, "first");
    for i in 4..7 {
        ch2.publish("", &queue, format!("s{i}").as_bytes()).await;
    }
    ch2.confirms_upto(7).await;
    for i in 4..7 {
        let d = waiting.next().await;
        assert_eq!(d.body, format!("s{i}").into_bytes(), "{}", t.label);
        assert!(!d.redelivered, "{}", t.label);
        ch2.ack(d.tag).await;
    }
    waiting.nothing_more().await;
    active.nothing_more().await;
    assert_eq!(ch2.counts(&queue).await, (0, 1), "{}", t.label);
    close(first).await;
    close(second).await;
}
