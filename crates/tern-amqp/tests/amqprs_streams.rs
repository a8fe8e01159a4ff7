//! Stream queues consumed with amqprs, a client whose framing and consumer
//! model differ from lapin's (`tests/streams.rs` drives lapin), using
//! RabbitMQ's argument names only: `x-queue-type: stream` on the queue,
//! `x-stream-offset` on the consumer (`first`, `last`, `next`, a numeric
//! offset, an AMQP timestamp), a consumer prefetch whose credit acks give
//! back, and the `x-stream-offset` header on every delivery.
//!
//! Every scenario is differential (see `target/mod.rs`): the same
//! assertions against Tern and, when `TERN_TEST_RABBITMQ_URL` is set,
//! against that RabbitMQ. A RabbitMQ without streams (before 3.9, or with
//! the `stream_queue` feature flag off) refuses the declaration; the
//! RabbitMQ half then prints a line and passes.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use target::{run_on_both, Target};
use tokio::sync::mpsc;

async fn connect(t: &Target) -> Connection {
    let (host, port) = t.host_and_port();
    let args = OpenConnectionArguments::new(host, port, &t.user, &t.password)
        .virtual_host(&t.vhost_name())
        .finish();
    Connection::open(&args)
        .await
        .unwrap_or_else(|e| panic!("connecting to {} with amqprs: {e}", t.label))
}

/// Closes with the handshake, after a pause that lets amqprs' reader finish
/// the last frame (see `amqprs_client.rs`).
async fn close(conn: Connection) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.close().await.unwrap();
}

fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in pairs {
        t.insert((*k).try_into().unwrap(), v.clone());
    }
    t
}

/// Declares the stream; `false` (with a printed line) when this RabbitMQ
/// has no streams, so the scenario stops there.
async fn declare_stream(t: &Target, conn: &Connection, name: &str) -> bool {
    let ch = conn.open_channel(None).await.unwrap();
    let declared = ch
        .queue_declare(
            QueueDeclareArguments::durable_client_named(name)
                .arguments(table(&[("x-queue-type", "stream".into())]))
                .finish(),
        )
        .await;
    match declared {
        Ok(_) => true,
        Err(e) if t.broker().is_none() => {
            println!(
                "RabbitMQ half skipped: this RabbitMQ refused a stream queue ({e}); \
                 streams need RabbitMQ 3.9+ with the stream_queue feature flag"
            );
            false
        }
        Err(e) => panic!("{}: declaring a stream: {e}", t.label),
    }
}

/// Publishes each body with a confirm awaited before the next (so on
/// RabbitMQ each is a chunk of its own, which `last` depends on).
async fn publish_all(conn: &Connection, queue: &str, bodies: &[&str]) {
    let ch = conn.open_channel(None).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let (tx, mut confirms) = mpsc::unbounded_channel();
    ch.register_callback(ConfirmWaiter(tx)).await.unwrap();
    for (i, b) in bodies.iter().enumerate() {
        ch.basic_publish(
            BasicProperties::default().with_delivery_mode(2).finish(),
            b.as_bytes().to_vec(),
            BasicPublishArguments::new("", queue),
        )
        .await
        .unwrap();
        let tag = tokio::time::timeout(Duration::from_secs(5), confirms.recv())
            .await
            .expect("a confirm within 5 s")
            .unwrap();
        assert_eq!(tag, i as u64 + 1, "publish {b} confirmed");
    }
    ch.close().await.unwrap();
}

/// Sends each positive confirm's tag; a nack fails the test.
struct ConfirmWaiter(mpsc::UnboundedSender<u64>);

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ConfirmWaiter {
    async fn close(
        &mut self,
        _: &Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: amqprs::Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: amqprs::Ack) {
        let _ = self.0.send(ack.delivery_tag());
    }
    async fn publish_nack(&mut self, _: &Channel, nack: amqprs::Nack) {
        panic!("publish {} nacked", nack.delivery_tag());
    }
    async fn publish_return(
        &mut self,
        _: &Channel,
        _: amqprs::Return,
        _: BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

/// A stream consumer: its channel (with a consumer prefetch) and deliveries.
struct StreamConsumer {
    ch: Channel,
    rx: mpsc::UnboundedReceiver<ConsumerMessage>,
}

struct Delivered {
    tag: u64,
    offset: i64,
    body: String,
}

impl StreamConsumer {
    async fn attach(
        conn: &Connection,
        queue: &str,
        prefetch: u16,
        args: &[(&str, FieldValue)],
    ) -> StreamConsumer {
        let ch = conn.open_channel(None).await.unwrap();
        ch.basic_qos(BasicQosArguments::new(0, prefetch, false))
            .await
            .unwrap();
        let (_, rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, "")
                    .manual_ack(true)
                    .arguments(table(args))
                    .finish(),
            )
            .await
            .unwrap();
        StreamConsumer { ch, rx }
    }

    async fn next(&mut self) -> Delivered {
        let mut m = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("a delivery within 5 s")
            .expect("the consumer is open");
        let deliver = m.deliver.take().unwrap();
        let props = m.basic_properties.take().unwrap();
        let offset = match props
            .headers()
            .and_then(|h| h.get(&"x-stream-offset".try_into().unwrap()))
        {
            Some(FieldValue::l(o)) => *o,
            other => panic!("expected an x-stream-offset long, got {other:?}"),
        };
        Delivered {
            tag: deliver.delivery_tag(),
            offset,
            body: String::from_utf8(m.content.take().unwrap_or_default()).unwrap(),
        }
    }

    async fn nothing_more(&mut self) {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await
        {
            panic!("expected no delivery, got {:?}", m.content);
        }
    }

    async fn ack(&self, tag: u64, multiple: bool) {
        self.ch
            .basic_ack(BasicAckArguments::new(tag, multiple))
            .await
            .unwrap();
    }

    /// Reads `n` deliveries, acking each, and checks that each one's
    /// `x-stream-offset` header is the offset its body names (`mN`).
    async fn read_acking(&mut self, label: &str, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..n {
            let d = self.next().await;
            assert_eq!(format!("m{}", d.offset), d.body, "{label}: offset header");
            self.ack(d.tag, false).await;
            got.push(d.body);
        }
        got
    }
}

fn ms(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_consumes_a_stream_from_every_offset_spec() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = connect(&t).await;
        let name = t.queue("stream");
        if !declare_stream(&t, &conn, &name).await {
            return;
        }
        publish_all(&conn, &name, &["m0", "m1", "m2"]).await;
        // A whole second after the first three, so a timestamp (seconds)
        // falls between them and the next two on either broker.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let between = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        tokio::time::sleep(Duration::from_millis(100)).await;
        publish_all(&conn, &name, &["m3", "m4"]).await;

        let far_future = u64::from(u32::MAX) * 2;
        let all = ["m0", "m1", "m2", "m3", "m4"];
        for (spec, expected) in [
            (FieldValue::from("first"), ms(&all)),
            (FieldValue::l(2), ms(&all[2..])),
            (FieldValue::l(0), ms(&all)),
            (FieldValue::l(-1), ms(&all)),
            (FieldValue::l(1000), vec![]),
            (FieldValue::from("last"), ms(&["m4"])),
            (FieldValue::from("next"), vec![]),
            (FieldValue::T(0), ms(&all)),
            (FieldValue::T(between), ms(&["m3", "m4"])),
            (FieldValue::T(far_future), vec![]),
        ] {
            let label = format!("{} {spec:?}", t.label);
            let mut c =
                StreamConsumer::attach(&conn, &name, 10, &[("x-stream-offset", spec.clone())])
                    .await;
            assert_eq!(
                c.read_acking(&label, expected.len()).await,
                expected,
                "{label}"
            );
            c.nothing_more().await;
            c.ch.close().await.unwrap();
        }
        // `next` and no offset at all both wait for what comes next.
        let mut next = StreamConsumer::attach(
            &conn,
            &name,
            10,
            &[("x-stream-offset", FieldValue::from("next"))],
        )
        .await;
        let mut default = StreamConsumer::attach(&conn, &name, 10, &[]).await;
        next.nothing_more().await;
        default.nothing_more().await;
        publish_all(&conn, &name, &["m5"]).await;
        for c in [&mut next, &mut default] {
            assert_eq!(c.read_acking(t.label, 1).await, ms(&["m5"]), "{}", t.label);
        }
        close(conn).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_stream_credit_is_the_prefetch_and_acks_give_it_back() {
    run_on_both(|t: Arc<Target>| async move {
        let conn = connect(&t).await;
        let name = t.queue("stream");
        if !declare_stream(&t, &conn, &name).await {
            return;
        }
        let bodies: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = bodies.iter().map(|b| b.as_str()).collect();
        publish_all(&conn, &name, &refs).await;

        let mut c = StreamConsumer::attach(
            &conn,
            &name,
            3,
            &[("x-stream-offset", FieldValue::from("first"))],
        )
        .await;
        // Three in flight, then nothing until an ack.
        let d: Vec<Delivered> = vec![c.next().await, c.next().await, c.next().await];
        let offsets: Vec<i64> = d.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, [0, 1, 2], "{}", t.label);
        c.nothing_more().await;
        // One ack, out of order: one more message.
        c.ack(d[1].tag, false).await;
        let d3 = c.next().await;
        assert_eq!((d3.offset, d3.body.as_str()), (3, "m3"), "{}", t.label);
        c.nothing_more().await;
        // A multiple ack up to the newest returns the rest of the credit.
        c.ack(d3.tag, true).await;
        let more: Vec<i64> = vec![c.next().await.offset, c.next().await.offset];
        let last = c.next().await;
        assert_eq!(more, [4, 5], "{}", t.label);
        assert_eq!(last.offset, 6, "{}", t.label);
        c.nothing_more().await;
        c.ack(last.tag, true).await;
        assert_eq!(c.next().await.body, "m7", "{}", t.label);
        c.nothing_more().await;

        // A second consumer on another channel has its own position and credit.
        let mut other =
            StreamConsumer::attach(&conn, &name, 100, &[("x-stream-offset", FieldValue::l(5))])
                .await;
        assert_eq!(
            other.read_acking(t.label, 3).await,
            ms(&["m5", "m6", "m7"]),
            "{}",
            t.label
        );
        other.nothing_more().await;
        close(conn).await;
    })
    .await;
}
