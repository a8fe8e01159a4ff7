//! Deduplication over AMQP with lapin, with the names of RabbitMQ's
//! message-deduplication plugin: an `x-message-deduplication` exchange and
//! a queue with `x-message-deduplication: true`. Duplicates are confirmed
//! (and, published mandatory, not returned) but delivered once. Each
//! scenario also runs against RabbitMQ, where it is skipped with a printed
//! line unless the plugin is enabled.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::sync::Arc;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use target::{reply_code, run_on_both, Target};

/// Publishes mandatory with confirms, one message per key, and returns
/// each outcome.
async fn publish_keys(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    keys: &[&str],
) -> Vec<Confirmation> {
    let mut outcomes = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-deduplication-header".into(),
            AMQPValue::LongString((*key).into()),
        );
        let outcome = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                format!("{i}:{key}").as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        outcomes.push(outcome);
    }
    outcomes
}

async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduplicating_exchange_routes_each_key_once() {
    run_on_both(scenario_a_deduplicating_exchange_routes_each_key_once).await;
}

async fn scenario_a_deduplicating_exchange_routes_each_key_once(t: Arc<Target>) {
    let exchange = t.exchange("once");
    let queue = t.queue("once.work");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-cache-size".into(), AMQPValue::LongLongInt(1000));
    let declared = ch
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom("x-message-deduplication".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await;
    if let Err(e) = &declared {
        if t.broker().is_none() && reply_code(e) == Some(503) {
            println!("RabbitMQ has no rabbitmq_message_deduplication plugin: skipped");
            return;
        }
    }
    declared.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let outcomes = publish_keys(&ch, &exchange, "ignored", &["a", "b", "a", "c", "b"]).await;
    for (i, o) in outcomes.iter().enumerate() {
        assert!(
            matches!(o, Confirmation::Ack(None)),
            "publish {i} on {}: {o:?}",
            t.label
        );
    }
    assert_eq!(
        drain(&ch, &queue).await,
        ["0:a", "1:b", "3:c"],
        "{}",
        t.label
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduplicating_queue_enqueues_each_key_once() {
    run_on_both(scenario_a_deduplicating_queue_enqueues_each_key_once).await;
}

async fn scenario_a_deduplicating_queue_enqueues_each_key_once(t: Arc<Target>) {
    let queue = t.queue("dedup.q");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        arguments,
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let outcomes = publish_keys(&ch, "", &queue, &["a", "a", "b"]).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Confirmation::Ack(None))));
    let bodies = drain(&ch, &queue).await;
    if t.broker().is_none() && bodies.len() == 3 {
        // RabbitMQ without the plugin ignores the argument.
        println!("RabbitMQ has no rabbitmq_message_deduplication plugin: skipped");
        return;
    }
    assert_eq!(bodies, ["0:a", "2:b"], "{}", t.label);
}
