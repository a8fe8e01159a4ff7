//! Exchange-level deduplication (type `x-message-deduplication`, as in
//! RabbitMQ's plugin): a message whose key was seen within the window is
//! confirmed but routed nowhere; the exchange fans out like `fanout`; the
//! window survives a restart, ends with the exchange, and takes a message's
//! own `x-cache-ttl`; a message that reached no queue leaves no key.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use bytes::Bytes;
use tern_broker::*;

fn message(key: &str, body: &str, ttl: Option<i64>) -> Message {
    let mut headers = FieldTable::new();
    headers.insert(
        "x-deduplication-header".into(),
        FieldValue::String(key.into()),
    );
    if let Some(ttl) = ttl {
        headers.insert("x-cache-ttl".into(), FieldValue::I64(ttl));
    }
    Message {
        exchange: ExchangeName::new("once").unwrap(),
        // Ignored: the exchange fans out.
        routing_key: "anything".into(),
        properties: Properties {
            headers: Some(headers),
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// Publishes, waits for the confirm (duplicates get one too) and returns
/// how many queues the exchange routes to.
async fn publish(broker: &Broker, m: Message) -> usize {
    let published = broker.publish("/", m).unwrap();
    let routed = published.routed;
    published.confirmed().await.unwrap();
    routed
}

fn dedup_exchange(arguments: &[(&str, FieldValue)]) -> ExchangeDeclare {
    let mut d = ExchangeDeclare::new("once", ExchangeKind::Fanout);
    d.kind = "x-message-deduplication".into();
    for (k, v) in arguments {
        d.arguments.insert((*k).into(), v.clone());
    }
    d
}

async fn declare(broker: &Broker, queues: &[&str]) {
    broker
        .declare_exchange(
            "/",
            dedup_exchange(&[("x-cache-size", FieldValue::I64(100))]),
        )
        .await
        .unwrap();
    let conn = broker.new_connection_id();
    for q in queues {
        broker
            .declare_queue("/", QueueDeclare::new(*q), conn)
            .await
            .unwrap();
        broker
            .bind_queue("/", q, "once", "", &FieldTable::new(), conn)
            .await
            .unwrap();
    }
}

async fn bodies(broker: &Broker, queue: &str) -> Vec<String> {
    let mut ch = broker
        .open_channel("/", broker.new_connection_id())
        .unwrap();
    let mut out = Vec::new();
    while let Some(got) = ch.get(queue, true).unwrap() {
        out.push(String::from_utf8(got.message.body.to_vec()).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_confirmed_but_routed_nowhere_and_the_rest_fans_out() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    declare(&broker, &["a", "b"]).await;
    assert_eq!(publish(&broker, message("k1", "first", None)).await, 2);
    // Counted as routed where the original went: mandatory does not return it.
    assert_eq!(publish(&broker, message("k1", "again", None)).await, 2);
    assert_eq!(publish(&broker, message("k2", "second", None)).await, 2);
    assert_eq!(bodies(&broker, "a").await, ["first", "second"]);
    assert_eq!(bodies(&broker, "b").await, ["first", "second"]);
    let info = broker.exchange_info("/", "once").unwrap();
    assert_eq!(info.type_name, "x-message-deduplication");
    assert_eq!(info.kind, ExchangeKind::Fanout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_reached_no_queue_leaves_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    declare(&broker, &[]).await;
    assert_eq!(publish(&broker, message("k", "lost", None)).await, 0);
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("late"), conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "late", "once", "", &FieldTable::new(), conn)
        .await
        .unwrap();
    // The retry of an unroutable message gets through.
    assert_eq!(publish(&broker, message("k", "retried", None)).await, 1);
    assert_eq!(bodies(&broker, "late").await, ["retried"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_survives_a_restart_and_ends_with_the_exchange() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        declare(&broker, &["a"]).await;
        publish(&broker, message("k1", "first", None)).await;
        broker.close().unwrap();
    }
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let info = broker.exchange_info("/", "once").unwrap();
    assert_eq!(info.type_name, "x-message-deduplication");
    publish(&broker, message("k1", "after restart", None)).await;
    assert_eq!(bodies(&broker, "a").await, ["first"]);

    // A new exchange of the same name starts with an empty window.
    broker.delete_exchange("/", "once", false).await.unwrap();
    declare(&broker, &["a"]).await;
    publish(&broker, message("k1", "new exchange", None)).await;
    assert_eq!(bodies(&broker, "a").await, ["new exchange"]);
    broker.close().unwrap();

    // And that is what a restart finds too.
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    publish(&broker, message("k1", "duplicate", None)).await;
    assert!(bodies(&broker, "a").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_may_bring_its_own_window() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    declare(&broker, &["a"]).await;
    publish(&broker, message("short", "1", Some(50))).await;
    publish(&broker, message("long", "2", None)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&broker, message("short", "3", None)).await;
    publish(&broker, message("long", "4", None)).await;
    assert_eq!(bodies(&broker, "a").await, ["1", "2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_other_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let refused = |args: &[(&str, FieldValue)]| {
        let broker = broker.clone();
        let d = dedup_exchange(args);
        async move { broker.declare_exchange("/", d).await.unwrap_err() }
    };
    let e = refused(&[("x-cache-size", FieldValue::I64(0))]).await;
    assert!(e.to_string().contains("x-cache-size"), "{e}");
    let e = refused(&[("x-cache-ttl", FieldValue::String("soon".into()))]).await;
    assert!(e.to_string().contains("x-cache-ttl"), "{e}");
    let e = refused(&[("x-cache-persistence", FieldValue::String("tape".into()))]).await;
    assert!(e.to_string().contains("x-cache-persistence"), "{e}");

    declare(&broker, &[]).await;
    let mut fanout = ExchangeDeclare::new("once", ExchangeKind::Fanout);
    fanout
        .arguments
        .insert("x-cache-size".into(), FieldValue::I64(100));
    let e = broker.declare_exchange("/", fanout).await.unwrap_err();
    assert!(
        e.to_string().contains("x-message-deduplication"),
        "a fanout is not a deduplicating exchange: {e}"
    );
}
