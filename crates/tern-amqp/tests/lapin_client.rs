//! The AMQP server driven by a real client, lapin: handshake, declarations,
//! publish with confirms, consume with prefetch, acks and nacks, channel
//! errors, requeue on disconnect, basic.get, returns, and refused logins.
//!
//! Every scenario is differential: it runs against an in-process Tern and,
//! when `TERN_TEST_RABBITMQ_URL` is set (e.g.
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), against that RabbitMQ too, with
//! the same assertions, so the expectations written here are RabbitMQ's.
//! Names are prefixed per run so runs against a shared RabbitMQ never
//! collide, and whatever a scenario declared is deleted afterwards (even
//! when it fails).

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};

/// The variable naming a RabbitMQ to run every scenario against as well.
const RABBITMQ_URL_VAR: &str = "TERN_TEST_RABBITMQ_URL";

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
}

/// One server a scenario runs against: Tern in-process, or a RabbitMQ.
struct Target {
    /// "tern" or "rabbitmq", for messages.
    label: &'static str,
    /// `host:port`.
    host_port: String,
    user: String,
    password: String,
    /// The vhost, percent-encoded as in a URL (`%2f` for `/`).
    vhost: String,
    /// Prepended to every queue, exchange and vhost name a scenario uses.
    prefix: String,
    /// Set for Tern: lets a scenario look inside the broker too.
    tern: Option<Harness>,
    /// What the scenario declared, deleted after it.
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "tern-test-{:x}-{:x}-{}.",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Target {
    async fn tern() -> Target {
        let h = Harness::start().await;
        Target {
            label: "tern",
            host_port: format!("127.0.0.1:{}", h.server.local_addr().port()),
            user: "guest".into(),
            password: "guest".into(),
            vhost: "%2f".into(),
            prefix: unique_prefix(),
            tern: Some(h),
            queues: Mutex::default(),
            exchanges: Mutex::default(),
        }
    }

    /// A RabbitMQ at `url`: `amqp://user:password@host:port/vhost`.
    fn rabbitmq(url: &str) -> Target {
        let rest = url
            .strip_prefix("amqp://")
            .unwrap_or_else(|| panic!("{RABBITMQ_URL_VAR} must start with amqp://: {url}"));
        let (creds, rest) = rest
            .split_once('@')
            .unwrap_or_else(|| panic!("{RABBITMQ_URL_VAR} must hold user:password@: {url}"));
        let (user, password) = creds.split_once(':').unwrap_or((creds, ""));
        let (host_port, vhost) = rest.split_once('/').unwrap_or((rest, "%2f"));
        Target {
            label: "rabbitmq",
            host_port: host_port.into(),
            user: user.into(),
            password: password.into(),
            vhost: if vhost.is_empty() { "%2f" } else { vhost }.into(),
            prefix: unique_prefix(),
            tern: None,
            queues: Mutex::default(),
            exchanges: Mutex::default(),
        }
    }

    fn uri(&self, user: &str, password: &str, vhost: &str) -> String {
        format!("amqp://{user}:{password}@{}/{vhost}", self.host_port)
    }

    fn url(&self) -> String {
        self.uri(&self.user, &self.password, &self.vhost)
    }

    async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("connecting to {} ({}): {e:?}", self.label, self.url()))
    }

    /// The prefixed name of a queue the scenario declares; deleted afterwards.
    fn queue(&self, name: &str) -> String {
        let name = format!("{}{name}", self.prefix);
        self.queues.lock().unwrap().push(name.clone());
        name
    }

    /// The prefixed name of an exchange the scenario declares; deleted afterwards.
    fn exchange(&self, name: &str) -> String {
        let name = format!("{}{name}", self.prefix);
        self.exchanges.lock().unwrap().push(name.clone());
        name
    }

    /// A prefixed name for something that must not exist.
    fn missing(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Tern's broker, for looking inside; `None` on RabbitMQ.
    fn broker(&self) -> Option<&Broker> {
        self.tern.as_ref().map(|h| &h.broker)
    }

    /// Deletes what the scenario declared (what is already gone is fine).
    async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let Ok(conn) = Connection::connect(&self.url(), ConnectionProperties::default()).await
        else {
            eprintln!("{}: cleanup could not connect", self.label);
            return;
        };
        // A failed delete closes its channel: one channel per delete.
        for q in queues {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for x in exchanges {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

/// Runs `scenario` against Tern, then against RabbitMQ if
/// `TERN_TEST_RABBITMQ_URL` is set (saying so when it is not).
async fn run_on_both<F, Fut>(scenario: F)
where
    F: Fn(Arc<Target>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_on(Arc::new(Target::tern().await), &scenario).await;
    match std::env::var(RABBITMQ_URL_VAR) {
        Ok(url) if !url.is_empty() => run_on(Arc::new(Target::rabbitmq(&url)), &scenario).await,
        _ => println!(
            "RabbitMQ half skipped: {RABBITMQ_URL_VAR} is not set \
             (set it to e.g. amqp://guest:guest@127.0.0.1:5672/%2f to check against RabbitMQ)"
        ),
    }
}

async fn run_on<F, Fut>(target: Arc<Target>, scenario: &F)
where
    F: Fn(Arc<Target>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    println!("running against {} at {}", target.label, target.host_port);
    // A task, so a failed assertion still lets the cleanup run.
    let outcome = tokio::spawn(scenario(target.clone())).await;
    target.cleanup().await;
    if let Err(e) = outcome {
        eprintln!("the scenario failed against {}", target.label);
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the scenario against {} did not finish: {e}", target.label),
        }
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

/// The `(ready, consumers)` counts of a queue, by a passive declare.
async fn queue_counts(ch: &lapin::Channel, queue: &str) -> (u32, u32) {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (q.message_count(), q.consumer_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_bind_publish_with_confirms_consume_and_ack() {
    run_on_both(scenario_declare_bind_publish_with_confirms_consume_and_ack).await;
}

async fn scenario_declare_bind_publish_with_confirms_consume_and_ack(t: Arc<Target>) {
    let exchange = t.exchange("orders");
    let queue = t.queue("orders.eu");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
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
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
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
                exchange.as_str().into(),
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
            queue.as_str().into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 20);

    let consumer_ch = conn.create_channel().await.unwrap();
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
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
        assert_eq!(d.exchange.as_str(), exchange);
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
    assert_eq!(queue_counts(&ch, &queue).await, (0, 1));
    if let Some(broker) = t.broker() {
        // Unacked counts are not visible over AMQP: Tern's broker only.
        let info = broker.queue_info("/", &queue).unwrap();
        assert_eq!((info.ready, info.unacked, info.consumers), (0, 0, 1));
    }
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacked_deliveries() {
    run_on_both(scenario_prefetch_limits_unacked_deliveries).await;
}

async fn scenario_prefetch_limits_unacked_deliveries(t: Arc<Target>) {
    let queue = t.queue("q");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        publish(&ch, "", &queue, format!("m{i}").as_bytes()).await;
    }
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
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
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_requeue_redelivers() {
    run_on_both(scenario_nack_with_requeue_redelivers).await;
}

async fn scenario_nack_with_requeue_redelivers(t: Arc<Target>) {
    let queue = t.queue("q");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, "", &queue, b"again").await;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
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
    // The rejected message is gone, not back in the queue.
    let other = conn.create_channel().await.unwrap();
    assert_eq!(queue_counts(&other, &queue).await, (0, 1));
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_error_closes_only_that_channel() {
    run_on_both(scenario_a_channel_error_closes_only_that_channel).await;
}

async fn scenario_a_channel_error_closes_only_that_channel(t: Arc<Target>) {
    let queue = t.queue("d");
    let missing = t.missing("missing");
    let conn = t.connect().await;
    let good = conn.create_channel().await.unwrap();
    let bad = conn.create_channel().await.unwrap();
    good.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let err = bad
        .queue_declare(
            queue.as_str().into(),
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
        publish(&good, "", &queue, b"still here").await,
        Confirmation::Ack(None)
    );
    let got = good
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data, b"still here");
    let third = conn.create_channel().await.unwrap();
    let err = third
        .queue_declare(
            missing.as_str().into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "{err:?}");
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_requeues_its_unacked_messages() {
    run_on_both(scenario_closing_a_connection_requeues_its_unacked_messages).await;
}

async fn scenario_closing_a_connection_requeues_its_unacked_messages(t: Arc<Target>) {
    let queue = t.queue("jobs");
    let first = t.connect().await;
    let ch = first.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        publish(&ch, "", &queue, format!("j{i}").as_bytes()).await;
    }
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
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

    let second = t.connect().await;
    let ch = second.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
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
    second.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_fetches_one_message_at_a_time() {
    run_on_both(scenario_basic_get_fetches_one_message_at_a_time).await;
}

async fn scenario_basic_get_fetches_one_message_at_a_time(t: Arc<Target>) {
    let conn = t.connect().await;
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
    if let Some(broker) = t.broker() {
        assert!(broker.queue_info("/", &name).is_err());
    }
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "{err:?}");
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mandatory_unroutable_publish_is_returned_before_its_confirm() {
    run_on_both(scenario_a_mandatory_unroutable_publish_is_returned_before_its_confirm).await;
}

async fn scenario_a_mandatory_unroutable_publish_is_returned_before_its_confirm(t: Arc<Target>) {
    // A routing key no binding on the shared amq.direct can match.
    let nowhere = t.missing("nowhere");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            nowhere.as_str().into(),
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
        publish(&ch, "amq.direct", &nowhere, b"dropped").await,
        Confirmation::Ack(None)
    );
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_missing_exchange_closes_the_channel_with_404() {
    run_on_both(scenario_publishing_to_a_missing_exchange_closes_the_channel_with_404).await;
}

async fn scenario_publishing_to_a_missing_exchange_closes_the_channel_with_404(t: Arc<Target>) {
    let missing = t.missing("no-such-exchange");
    let after = t.queue("x");
    let ok = t.queue("ok");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let result = match ch
        .basic_publish(
            missing.as_str().into(),
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
                after.as_str().into(),
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
            ok.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_vhost_is_refused() {
    run_on_both(scenario_a_wrong_password_or_vhost_is_refused).await;
}

async fn scenario_a_wrong_password_or_vhost_is_refused(t: Arc<Target>) {
    let wrong_password = format!("{}wrong", t.password);
    let err = Connection::connect(
        &t.uri(&t.user, &wrong_password, &t.vhost),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    let err = Connection::connect(
        &t.uri(&t.user, &t.password, &t.missing("nope")),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(reply_code(&err), Some(530), "{err:?}");
    // The server still serves.
    let conn = t.connect().await;
    // Kept: lapin closes a dropped channel, racing the connection's close.
    let _ch = conn.create_channel().await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_cancels_its_consumers_with_basic_cancel() {
    run_on_both(scenario_deleting_a_queue_cancels_its_consumers_with_basic_cancel).await;
}

async fn scenario_deleting_a_queue_cancels_its_consumers_with_basic_cancel(t: Arc<Target>) {
    let temp = t.queue("temp");
    let after = t.queue("after");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        temp.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            temp.as_str().into(),
            "watcher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let other = conn.create_channel().await.unwrap();
    other
        .queue_delete(temp.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("the consumer ends within 5 s");
    assert!(end.is_none(), "expected the consumer to be cancelled");
    // The channel stays open.
    ch.queue_declare(
        after.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}
