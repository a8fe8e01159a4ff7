//! FIFO message groups over AMQP with lapin: a queue declared with
//! `x-message-group-header` has at most one message of a group unacked at
//! a time, across consumers and connections, delivered in publish order
//! (a returned one first again), while other groups go to other consumers
//! in parallel. Tern only: RabbitMQ has no such feature.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod target;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use target::Target;

const HEADER: &str = "x-group";

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn declare_grouped(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[(
            "x-message-group-header",
            AMQPValue::LongString(HEADER.into()),
        )]),
    )
    .await
    .unwrap();
}

/// Publishes `group:seq` bodies with the group header, each confirmed.
async fn publish(conn: &Connection, queue: &str, messages: &[(&str, u32)]) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (group, seq) in messages {
        let headers = table(&[(HEADER, AMQPValue::LongString((*group).into()))]);
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            format!("{group}:{seq}").as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

async fn consumer(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
) -> (lapin::Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (ch, c)
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
            d.map(|d| d.map(|d| String::from_utf8_lossy(&d.data).into_owned()))
        );
    }
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_group_goes_to_the_second_consumer_while_the_first_holds_its_group() {
    let t = Target::tern().await;
    let queue = t.queue("groups");
    let conn1 = t.connect().await;
    let conn2 = t.connect().await;
    declare_grouped(&conn1, &queue).await;
    let (ch1, mut c1) = consumer(&conn1, &queue, 1).await;
    publish(&conn1, &queue, &[("A", 0), ("A", 1), ("B", 0), ("B", 1)]).await;
    let a0 = next(&mut c1).await;
    assert_eq!(body(&a0), "A:0");
    // The second consumer, on another connection, with credit to spare,
    // gets B's first message, and nothing of A while A:0 is out.
    let (_ch2, mut c2) = consumer(&conn2, &queue, 10).await;
    let b0 = next(&mut c2).await;
    assert_eq!(body(&b0), "B:0");
    nothing_more(&mut c2).await;
    // A requeued message is its group's next again, ahead of later ones.
    // The first consumer leaves (its unacked A:0 stays with its channel),
    // so the second is the only one left to take it.
    ch1.basic_cancel(c1.tag().as_str().into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish(&conn2, &queue, &[("A", 2)]).await;
    nothing_more(&mut c2).await;
    a0.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let again = next(&mut c2).await;
    assert_eq!(body(&again), "A:0");
    assert!(again.redelivered);
    nothing_more(&mut c2).await;
    again.ack(BasicAckOptions::default()).await.unwrap();
    let a1 = next(&mut c2).await;
    assert_eq!(body(&a1), "A:1");
    nothing_more(&mut c2).await;
    b0.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(body(&next(&mut c2).await), "B:1");
    a1.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(body(&next(&mut c2).await), "A:2");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_each_group_is_consumed_one_at_a_time_in_publish_order() {
    const GROUPS: u32 = 4;
    const PER_GROUP: u32 = 25;
    let t = Target::tern().await;
    let queue = t.queue("load");
    let publisher = t.connect().await;
    declare_grouped(&publisher, &queue).await;
    let mut messages = Vec::new();
    let names: Vec<String> = (0..GROUPS).map(|g| format!("g{g}")).collect();
    for seq in 0..PER_GROUP {
        for name in &names {
            messages.push((name.as_str(), seq));
        }
    }
    // Groups out right now, and each group's deliveries in arrival order.
    let out: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let seen: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let mut tasks = Vec::new();
    let mut conns = Vec::new();
    for who in ["c1", "c2"] {
        let conn = t.connect().await;
        let (ch, mut c) = consumer(&conn, &queue, 5).await;
        conns.push((conn, ch));
        let (out, seen) = (Arc::clone(&out), Arc::clone(&seen));
        tasks.push(tokio::spawn(async move {
            let mut handled = 0u32;
            while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), c.next()).await
            {
                let text = body(&d);
                let (group, seq) = text.split_once(':').unwrap();
                {
                    let mut out = out.lock().unwrap();
                    if let Some(other) = out.insert(group.to_string(), who.to_string()) {
                        panic!("{text} delivered to {who} while {other} holds group {group}");
                    }
                }
                seen.lock()
                    .unwrap()
                    .entry(group.to_string())
                    .or_default()
                    .push(seq.parse().unwrap());
                tokio::time::sleep(Duration::from_millis(2)).await;
                // Out of the table before the ack: the broker may deliver
                // the group's next message as soon as the ack arrives.
                out.lock().unwrap().remove(group);
                d.ack(BasicAckOptions::default()).await.unwrap();
                handled += 1;
            }
            handled
        }));
    }
    publish(&publisher, &queue, &messages).await;
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, GROUPS * PER_GROUP);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    for name in &names {
        assert_eq!(
            seen.get(name).unwrap(),
            &(0..PER_GROUP).collect::<Vec<_>>(),
            "group {name} in publish order"
        );
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_group_header_argument_is_a_precondition_failure_naming_it() {
    let t = Target::tern().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            t.queue("bad").as_str().into(),
            QueueDeclareOptions::default(),
            table(&[("x-message-group-header", AMQPValue::LongString("".into()))]),
        )
        .await
        .unwrap_err();
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            assert_eq!(amqp.get_id(), 406);
            assert!(
                amqp.get_message()
                    .as_str()
                    .contains("x-message-group-header"),
                "{amqp:?}"
            );
        }
        other => panic!("expected a channel error, got {other:?}"),
    }
    // Only the channel closed: the connection still works.
    assert!(conn.create_channel().await.is_ok());
    t.cleanup().await;
}
