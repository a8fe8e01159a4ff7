//! Queue-level deduplication (`x-message-deduplication: true`): a message
//! whose `x-deduplication-header` (or `message_id`) was seen within the
//! window is confirmed but not enqueued, across restarts, and the window
//! ends by `x-cache-ttl` and `x-cache-size`.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_broker::*;

fn message(key: Option<&str>, message_id: Option<&str>, body: &str) -> Message {
    let headers = key.map(|k| {
        let mut t = FieldTable::new();
        t.insert(
            "x-deduplication-header".into(),
            FieldValue::String(k.into()),
        );
        t
    });
    Message {
        exchange: ExchangeName::default_exchange(),
        routing_key: "q".into(),
        properties: Properties {
            headers,
            message_id: message_id.map(str::to_string),
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// Publishes and waits for the confirm, which duplicates get too.
async fn publish(broker: &Broker, m: Message) {
    let published = broker.publish("/", m).unwrap();
    assert_eq!(published.routed, 1);
    published.confirmed().await.unwrap();
}

fn dedup_queue(ttl: Option<i64>, size: Option<i64>) -> QueueDeclare {
    let mut d = QueueDeclare::new("q");
    d.arguments
        .insert("x-message-deduplication".into(), FieldValue::Bool(true));
    if let Some(ttl) = ttl {
        d.arguments
            .insert("x-cache-ttl".into(), FieldValue::I64(ttl));
    }
    if let Some(size) = size {
        d.arguments
            .insert("x-cache-size".into(), FieldValue::I64(size));
    }
    d
}

fn ready(broker: &Broker) -> u64 {
    broker.queue_info("/", "q").unwrap().ready
}

async fn bodies(broker: &Broker, n: usize) -> Vec<String> {
    let mut ch = broker
        .open_channel("/", broker.new_connection_id())
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let got = ch.get("q", true).unwrap().unwrap();
        out.push(String::from_utf8(got.message.body.to_vec()).unwrap());
    }
    assert!(ch.get("q", true).unwrap().is_none());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_confirmed_but_not_enqueued() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", dedup_queue(None, None), conn)
        .await
        .unwrap();
    publish(&broker, message(Some("a"), None, "a1")).await;
    publish(&broker, message(Some("a"), None, "a2")).await;
    publish(&broker, message(Some("b"), None, "b1")).await;
    // Without the header, the message id is the key.
    publish(&broker, message(None, Some("id-1"), "i1")).await;
    publish(&broker, message(None, Some("id-1"), "i2")).await;
    // With neither, nothing is a duplicate.
    publish(&broker, message(None, None, "n1")).await;
    publish(&broker, message(None, None, "n2")).await;
    assert_eq!(bodies(&broker, 5).await, ["a1", "b1", "i1", "n1", "n2"]);
    // Consumed keys are still remembered.
    publish(&broker, message(Some("a"), None, "a3")).await;
    assert_eq!(ready(&broker), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_key_enqueue_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", dedup_queue(None, None), conn)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..50 {
                publish(
                    &broker,
                    message(Some(&format!("k{j}")), None, &format!("{i}")),
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ready(&broker), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_survives_a_restart_and_ends_with_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_millis(1500);
    // The key is admitted between these two moments: the window is
    // certainly open before `before + ttl` and certainly closed after
    // `after + ttl`, however slow the machine.
    let (before, after) = {
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_queue("/", dedup_queue(Some(1500), None), conn)
            .await
            .unwrap();
        let before = Instant::now();
        publish(&broker, message(Some("a"), None, "a1")).await;
        let after = Instant::now();
        broker.close().unwrap();
        (before, after)
    };
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    publish(&broker, message(Some("a"), None, "a2")).await;
    assert!(
        before.elapsed() < ttl,
        "the restart took longer than the window"
    );
    assert_eq!(ready(&broker), 1);
    tokio::time::sleep(
        (after + ttl + Duration::from_millis(100)).saturating_duration_since(Instant::now()),
    )
    .await;
    publish(&broker, message(Some("a"), None, "a3")).await;
    assert_eq!(bodies(&broker, 2).await, ["a1", "a3"]);
    broker.close().unwrap();

    // And the window's log is replayed again on the next start.
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    publish(&broker, message(Some("a"), None, "a4")).await;
    assert_eq!(ready(&broker), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_keys_go_beyond_the_cache_size_and_arguments_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    for bad in [
        {
            let mut d = dedup_queue(None, None);
            d.arguments.insert(
                "x-message-deduplication".into(),
                FieldValue::String("yes".into()),
            );
            d
        },
        dedup_queue(None, Some(0)),
        dedup_queue(Some(-1), None),
    ] {
        let err = broker.declare_queue("/", bad, conn).await.unwrap_err();
        assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{err}");
    }
    broker
        .declare_queue("/", dedup_queue(None, Some(2)), conn)
        .await
        .unwrap();
    for key in ["a", "b", "c", "b", "a"] {
        publish(&broker, message(Some(key), None, key)).await;
    }
    // "a" was evicted by "c", so its second publish is enqueued; "b" was not.
    assert_eq!(bodies(&broker, 4).await, ["a", "b", "c", "a"]);
}
