//! The queue arguments behave as RabbitMQ's do: dead-lettering (the message
//! reaches the dead-letter exchange with an `x-death` history that says why,
//! from where, and how often), message and queue TTLs, length limits, the
//! delivery limit, `x-expires` and `x-max-priority`.

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

fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn s(v: &str) -> FieldValue {
    FieldValue::String(v.into())
}

/// A broker with a `dlx` fanout exchange feeding a `dead` queue, and a
/// `work` queue declared with `work_args` plus `x-dead-letter-exchange: dlx`.
async fn setup(dir: &std::path::Path, work_args: &[(&str, FieldValue)]) -> (Broker, ConnectionId) {
    let broker = Broker::open(BrokerConfig::new(dir)).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_exchange("/", ExchangeDeclare::new("dlx", ExchangeKind::Fanout))
        .await
        .unwrap();
    broker
        .declare_queue("/", QueueDeclare::new("dead"), conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "dead", "dlx", "", &FieldTable::new(), conn)
        .await
        .unwrap();
    let mut work = QueueDeclare::new("work");
    work.arguments = args(work_args);
    work.arguments
        .insert("x-dead-letter-exchange".into(), s("dlx"));
    broker.declare_queue("/", work, conn).await.unwrap();
    (broker, conn)
}

async fn publish(broker: &Broker, m: Message) {
    broker.publish("/", m).unwrap().confirmed().await.unwrap();
}

/// Waits for a message to arrive in `queue` and fetches it.
async fn fetch(ch: &mut Channel, queue: &str) -> GetOk {
    for _ in 0..200 {
        if let Some(m) = ch.get(queue, false).unwrap() {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing arrived in {queue}");
}

fn death(m: &Message) -> FieldTable {
    match m.properties.headers.as_ref().and_then(|h| h.get("x-death")) {
        Some(FieldValue::Array(a)) => match a.first() {
            Some(FieldValue::Table(t)) => t.clone(),
            other => panic!("x-death starts with {other:?}"),
        },
        other => panic!("no x-death: {other:?}"),
    }
}

fn field<'a>(t: &'a FieldTable, k: &str) -> &'a FieldValue {
    t.get(k).unwrap_or_else(|| panic!("no {k} in {t:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_dead_lettered_with_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(dir.path(), &[]).await;
    publish(&broker, message("work", "bad")).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let m = fetch(&mut ch, "work").await;
    ch.reject(m.tag, false).unwrap();
    let dead = fetch(&mut ch, "dead").await;
    assert_eq!(&dead.message.body[..], b"bad");
    let d = death(&dead.message);
    assert_eq!(field(&d, "reason"), &s("rejected"));
    assert_eq!(field(&d, "queue"), &s("work"));
    assert_eq!(field(&d, "exchange"), &s(""));
    assert_eq!(field(&d, "count"), &FieldValue::I64(1));
    assert_eq!(
        field(&d, "routing-keys"),
        &FieldValue::Array(vec![s("work")])
    );
    let h = dead.message.properties.headers.as_ref().unwrap();
    assert_eq!(h.get("x-first-death-reason"), Some(&s("rejected")));
    assert_eq!(broker.queue_info("/", "work").unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_with_requeue_is_not_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(dir.path(), &[]).await;
    publish(&broker, message("work", "retry me")).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let m = fetch(&mut ch, "work").await;
    ch.nack(m.tag, false, true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(broker.queue_info("/", "dead").unwrap().ready, 0);
    assert_eq!(broker.queue_info("/", "work").unwrap().ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_expire_by_queue_ttl_without_any_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(dir.path(), &[("x-message-ttl", FieldValue::I32(100))]).await;
    publish(&broker, message("work", "stale")).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let dead = fetch(&mut ch, "dead").await;
    assert_eq!(&dead.message.body[..], b"stale");
    assert_eq!(field(&death(&dead.message), "reason"), &s("expired"));
    assert_eq!(broker.queue_info("/", "work").unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expires_by_its_own_expiration_and_loses_it_when_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(dir.path(), &[]).await;
    let mut m = message("work", "short-lived");
    m.properties.expiration = Some("50".into());
    publish(&broker, m).await;
    publish(&broker, message("work", "forever")).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    let dead = fetch(&mut ch, "dead").await;
    assert_eq!(&dead.message.body[..], b"short-lived");
    assert_eq!(dead.message.properties.expiration, None);
    assert_eq!(
        field(&death(&dead.message), "original-expiration"),
        &s("50")
    );
    let alive = fetch(&mut ch, "work").await;
    assert_eq!(&alive.message.body[..], b"forever");

    let mut bad = message("work", "x");
    bad.properties.expiration = Some("soon".into());
    let err = broker.publish("/", bad).unwrap_err();
    assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_drops_the_oldest_into_the_dead_letter_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(dir.path(), &[("x-max-length", FieldValue::I32(2))]).await;
    for i in 0..5 {
        publish(&broker, message("work", &format!("m{i}"))).await;
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    let mut dead = Vec::new();
    for _ in 0..3 {
        let d = fetch(&mut ch, "dead").await;
        assert_eq!(field(&death(&d.message), "reason"), &s("maxlen"));
        dead.push(String::from_utf8(d.message.body.to_vec()).unwrap());
    }
    assert_eq!(dead, ["m0", "m1", "m2"]);
    assert_eq!(broker.queue_info("/", "work").unwrap().ready, 2);
    assert_eq!(&fetch(&mut ch, "work").await.message.body[..], b"m3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_overflow_refuses_new_messages_with_a_nack() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _conn) = setup(
        dir.path(),
        &[
            ("x-max-length", FieldValue::I32(1)),
            ("x-overflow", s("reject-publish")),
        ],
    )
    .await;
    publish(&broker, message("work", "first")).await;
    let second = broker.publish("/", message("work", "second")).unwrap();
    assert!(second.rejected);
    assert!(second.confirmed().await.is_err(), "the publisher is nacked");
    assert_eq!(broker.queue_info("/", "work").unwrap().ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_counts_deliveries_and_dead_letters_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_exchange("/", ExchangeDeclare::new("dlx", ExchangeKind::Fanout))
        .await
        .unwrap();
    broker
        .declare_queue("/", QueueDeclare::new("dead"), conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "dead", "dlx", "", &FieldTable::new(), conn)
        .await
        .unwrap();
    let mut qq = QueueDeclare::new("poison");
    qq.arguments = args(&[
        ("x-queue-type", s("quorum")),
        ("x-delivery-limit", FieldValue::I32(2)),
        ("x-dead-letter-exchange", s("dlx")),
    ]);
    broker.declare_queue("/", qq, conn).await.unwrap();
    publish(&broker, message("poison", "boom")).await;
    let mut ch = broker.open_channel("/", conn).unwrap();
    for attempt in 0..3u32 {
        let m = fetch(&mut ch, "poison").await;
        let count = m
            .message
            .properties
            .headers
            .as_ref()
            .and_then(|h| h.get("x-delivery-count"))
            .cloned();
        if attempt == 0 {
            assert_eq!(count, None, "a first delivery carries no x-delivery-count");
        } else {
            assert_eq!(count, Some(FieldValue::I64(i64::from(attempt))));
        }
        ch.nack(m.tag, false, true).unwrap();
    }
    let dead = fetch(&mut ch, "dead").await;
    assert_eq!(field(&death(&dead.message), "reason"), &s("delivery_limit"));
    assert_eq!(broker.queue_info("/", "poison").unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_cycle_back_into_the_same_queue_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    // A queue that dead-letters expired messages back into itself.
    let mut q = QueueDeclare::new("loop");
    q.arguments = args(&[
        ("x-message-ttl", FieldValue::I32(20)),
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s("loop")),
    ]);
    broker.declare_queue("/", q, conn).await.unwrap();
    publish(&broker, message("loop", "once")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        broker.queue_info("/", "loop").unwrap().ready,
        0,
        "the expired message came back at most once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_counts_survive_a_restart_so_a_poison_message_cannot_reset_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let qq = || {
        let mut q = QueueDeclare::new("poison");
        q.arguments = args(&[
            ("x-queue-type", s("quorum")),
            ("x-delivery-limit", FieldValue::I32(1)),
            ("x-dead-letter-exchange", s("dlx")),
        ]);
        q
    };
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_exchange("/", ExchangeDeclare::new("dlx", ExchangeKind::Fanout))
            .await
            .unwrap();
        broker
            .declare_queue("/", QueueDeclare::new("dead"), conn)
            .await
            .unwrap();
        broker
            .bind_queue("/", "dead", "dlx", "", &FieldTable::new(), conn)
            .await
            .unwrap();
        broker.declare_queue("/", qq(), conn).await.unwrap();
        publish(&broker, message("poison", "boom")).await;
        let mut ch = broker.open_channel("/", conn).unwrap();
        let first = fetch(&mut ch, "poison").await;
        assert!(!first.redelivered);
        // The consumer "crashes" with the broker: no ack, no nack.
        drop(ch);
        broker.close().unwrap();
    }
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let mut ch = broker.open_channel("/", conn).unwrap();
    let second = fetch(&mut ch, "poison").await;
    assert!(
        second.redelivered,
        "a message delivered before the restart is flagged redelivered"
    );
    assert_eq!(
        second
            .message
            .properties
            .headers
            .as_ref()
            .and_then(|h| h.get("x-delivery-count")),
        Some(&FieldValue::I64(1))
    );
    ch.nack(second.tag, false, true).unwrap();
    let dead = fetch(&mut ch, "dead").await;
    assert_eq!(field(&death(&dead.message), "reason"), &s("delivery_limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_queue_with_x_expires_is_deleted_and_a_used_one_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let expiring = |name: &str| {
        let mut q = QueueDeclare::new(name);
        q.arguments = args(&[("x-expires", FieldValue::I32(150))]);
        q
    };
    broker
        .declare_queue("/", expiring("idle"), conn)
        .await
        .unwrap();
    broker
        .declare_queue("/", expiring("busy"), conn)
        .await
        .unwrap();
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.consume("busy", ConsumeOptions::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        broker.queue_info("/", "idle").unwrap_err().reply_code(),
        ReplyCode::NotFound
    );
    assert!(
        broker.queue_info("/", "busy").is_ok(),
        "a queue with a consumer is in use"
    );
    drop(ch);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        broker.queue_info("/", "busy").unwrap_err().reply_code(),
        ReplyCode::NotFound,
        "once its last consumer goes, the clock starts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_queue_delivers_higher_priorities_first_and_fifo_within_one() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let mut q = QueueDeclare::new("jobs");
    q.arguments = args(&[("x-max-priority", FieldValue::I32(5))]);
    broker.declare_queue("/", q, conn).await.unwrap();
    // (body, priority): 9 is capped at the queue's maximum of 5.
    for (body, priority) in [
        ("a", None),
        ("b", Some(3)),
        ("c", Some(9)),
        ("d", Some(3)),
        ("e", Some(5)),
    ] {
        let mut m = message("jobs", body);
        m.properties.priority = priority;
        publish(&broker, m).await;
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    let mut order = Vec::new();
    let mut tags = Vec::new();
    for _ in 0..5 {
        let m = fetch(&mut ch, "jobs").await;
        order.push(String::from_utf8(m.message.body.to_vec()).unwrap());
        tags.push(m.tag);
    }
    assert_eq!(order, ["c", "e", "b", "d", "a"]);
    // Returned messages go back to their priority's place.
    ch.nack(tags[2], false, true).unwrap(); // b (3)
    ch.nack(tags[4], false, true).unwrap(); // a (0)
    let mut p = message("jobs", "f");
    p.properties.priority = Some(4);
    publish(&broker, p).await;
    let again: Vec<String> = [
        fetch(&mut ch, "jobs").await,
        fetch(&mut ch, "jobs").await,
        fetch(&mut ch, "jobs").await,
    ]
    .iter()
    .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
    .collect();
    assert_eq!(again, ["f", "b", "a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_bytes_drops_the_oldest_until_the_bodies_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(dir.path(), &[("x-max-length-bytes", FieldValue::I32(25))]).await;
    for body in ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc", "dd"] {
        publish(&broker, message("work", body)).await;
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    // 10 + 10 + 10 + 2 = 32 bytes: the oldest 10 must go to fit in 25.
    let dead = fetch(&mut ch, "dead").await;
    assert_eq!(&dead.message.body[..], b"aaaaaaaaaa");
    assert_eq!(field(&death(&dead.message), "reason"), &s("maxlen"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(broker.queue_info("/", "work").unwrap().ready, 3);
    assert_eq!(broker.queue_info("/", "dead").unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_bytes_with_reject_publish_nacks_what_does_not_fit_and_counts_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, conn) = setup(
        dir.path(),
        &[
            ("x-max-length-bytes", FieldValue::I32(20)),
            ("x-overflow", s("reject-publish")),
        ],
    )
    .await;
    publish(&broker, message("work", "0123456789")).await;
    publish(&broker, message("work", "0123456789")).await;
    let refused = broker.publish("/", message("work", "x")).unwrap();
    assert!(
        refused.rejected,
        "20 bytes are ready: one more byte does not fit"
    );
    // Taking a message out makes room; returning it takes the room back.
    let mut ch = broker.open_channel("/", conn).unwrap();
    let m = fetch(&mut ch, "work").await;
    assert!(!broker.publish("/", message("work", "y")).unwrap().rejected);
    ch.nack(m.tag, false, true).unwrap();
    assert!(broker.publish("/", message("work", "z")).unwrap().rejected);
}
