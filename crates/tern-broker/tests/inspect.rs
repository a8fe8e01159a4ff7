//! The operator's listings: exchanges, queues and bindings of a vhost with
//! their properties, as declared, and errors for what does not exist.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use bytes::Bytes;
use tern_broker::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_what_was_declared() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();

    let mut ae = FieldTable::new();
    ae.insert(
        "alternate-exchange".into(),
        FieldValue::String("amq.fanout".into()),
    );
    let mut orders = ExchangeDeclare::new("orders", ExchangeKind::Topic);
    orders.durable = false;
    orders.arguments = ae.clone();
    broker.declare_exchange("/", orders).await.unwrap();

    let mut work = QueueDeclare::new("work");
    work.arguments
        .insert("x-max-length".into(), FieldValue::I64(10));
    broker.declare_queue("/", work, conn).await.unwrap();
    broker
        .declare_queue("/", QueueDeclare::new("audit"), conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "work", "orders", "order.*", &FieldTable::new(), conn)
        .await
        .unwrap();
    broker
        .bind_queue("/", "audit", "orders", "#", &FieldTable::new(), conn)
        .await
        .unwrap();
    broker
        .bind_exchange("/", "orders", "amq.topic", "x", &FieldTable::new())
        .await
        .unwrap();
    let published = broker
        .publish(
            "/",
            Message {
                exchange: ExchangeName::new("orders").unwrap(),
                routing_key: "order.created".into(),
                properties: Properties::default(),
                body: Bytes::from_static(b"1"),
            },
        )
        .unwrap();
    published.confirmed().await.unwrap();

    let exchanges = broker.exchanges("/").unwrap();
    let names: Vec<&str> = exchanges.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "",
            "amq.direct",
            "amq.fanout",
            "amq.headers",
            "amq.match",
            "amq.topic",
            "orders"
        ]
    );
    let info = broker.exchange_info("/", "orders").unwrap();
    assert_eq!(info.kind, ExchangeKind::Topic);
    assert!(!info.durable && !info.auto_delete && !info.internal);
    assert_eq!(info.arguments, ae);
    assert_eq!(info.bindings, 2);

    let queues = broker.queues("/").unwrap();
    let summary: Vec<(&str, u64)> = queues.iter().map(|q| (q.name.as_str(), q.ready)).collect();
    assert_eq!(summary, [("audit", 1), ("work", 1)]);
    assert_eq!(
        queues[1].arguments.get("x-max-length"),
        Some(&FieldValue::I64(10))
    );

    let bindings: Vec<(String, String, String)> = broker
        .bindings("/")
        .unwrap()
        .into_iter()
        .map(|b| {
            (
                b.source.to_string(),
                b.destination.to_string(),
                b.routing_key,
            )
        })
        .collect();
    assert_eq!(
        bindings,
        [
            ("amq.topic".into(), "exchange 'orders'".into(), "x".into()),
            ("orders".into(), "queue 'audit'".into(), "#".into()),
            ("orders".into(), "queue 'work'".into(), "order.*".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_of_missing_things_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    assert_eq!(
        broker.exchanges("nowhere").unwrap_err(),
        BrokerError::VhostNotFound("nowhere".into())
    );
    assert!(matches!(
        broker.queues("nowhere").unwrap_err(),
        BrokerError::VhostNotFound(_)
    ));
    assert!(matches!(
        broker.bindings("nowhere").unwrap_err(),
        BrokerError::VhostNotFound(_)
    ));
    assert!(matches!(
        broker.exchange_info("/", "missing").unwrap_err(),
        BrokerError::ExchangeNotFound { .. }
    ));
}
